"""Pinhole cameras in OpenGL conventions.

World: +y up. Camera space: the camera looks down its -z axis, +x right, +y up. Clip space is
OpenGL's: ``clip = proj @ view @ [x, y, z, 1]``, ``ndc = clip.xyz / clip.w`` in ``[-1, 1]^3`` for
visible points, ndc ``y = +1`` at the TOP of the image (the rasterizers store row 0 at the bottom;
:func:`~vlm3d_guidance.render.views.render_views` flips once so its images have row 0 at the top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Cameras:
    """``N`` cameras.

    Attributes:
        view: ``[N, 4, 4]`` world -> camera.
        proj: ``[N, 4, 4]`` camera -> clip (OpenGL perspective, square aspect).
        eye: ``[N, 3]`` camera centres in world space.
        fov: full vertical field of view in degrees.
        near, far: clip planes (distances along the view axis).
    """

    view: torch.Tensor
    proj: torch.Tensor
    eye: torch.Tensor
    fov: float
    near: float
    far: float

    def __len__(self) -> int:
        return int(self.view.shape[0])

    @property
    def mvp(self) -> torch.Tensor:
        """``[N, 4, 4]`` world -> clip."""
        return self.proj @ self.view

    def to_clip(self, verts: torch.Tensor) -> torch.Tensor:
        """World vertices ``[V, 3]`` -> clip-space positions ``[N, V, 4]`` (differentiable)."""
        mvp = self.mvp.to(device=verts.device, dtype=verts.dtype)
        vh = torch.cat([verts, torch.ones_like(verts[:, :1])], dim=1)
        return torch.einsum("nij,vj->nvi", mvp, vh)

    def rotations(self, dtype=None) -> torch.Tensor:
        """``[N, 3, 3]`` world -> camera rotations."""
        r = self.view[:, :3, :3]
        return r if dtype is None else r.to(dtype)

    def to(self, device=None, dtype=None) -> "Cameras":
        f = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        return Cameras(f(self.view), f(self.proj), f(self.eye), self.fov, self.near, self.far)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[N, 4, 4]`` world -> camera matrices for eyes ``[N, 3]`` looking at ``target`` with ``up``."""
    fwd = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(fwd, up.expand_as(fwd), dim=-1), dim=-1)
    upv = torch.cross(right, fwd, dim=-1)
    n = eye.shape[0]
    m = torch.zeros(n, 4, 4, dtype=eye.dtype, device=eye.device)
    m[:, 0, :3], m[:, 1, :3], m[:, 2, :3] = right, upv, -fwd
    m[:, :3, 3] = -torch.einsum("nij,nj->ni", m[:, :3, :3], eye)
    m[:, 3, 3] = 1.0
    return m


def perspective(fov_deg: float, near: float, far: float, n: int = 1, dtype=torch.float32, device=None):
    """``[n, 4, 4]`` OpenGL perspective projection, square aspect, vertical fov in degrees."""
    f = 1.0 / math.tan(math.radians(fov_deg) / 2.0)
    p = torch.zeros(4, 4, dtype=dtype, device=device)
    p[0, 0], p[1, 1] = f, f
    p[2, 2] = -(far + near) / (far - near)
    p[2, 3] = -2.0 * far * near / (far - near)
    p[3, 2] = -1.0
    return p.expand(n, 4, 4).clone()


def fitted_distance(fov: float, bounds: float = 1.01) -> float:
    """Distance at which the bounding sphere of ``[-bounds, bounds]^3`` exactly fills the fov."""
    return bounds * math.sqrt(3.0) / math.sin(math.radians(fov) / 2.0)


def orbit_cameras(num_views: int = 4, elevation: float = 20.0, fov: float = 40.0, distance=None,
                  device="cpu", bounds: float = 1.01, azimuth_offset: float = 0.0,
                  dtype=torch.float32) -> Cameras:
    """Cameras on a circle around the origin, all looking at it with +y up.

    Azimuths are ``azimuth_offset + 360 * i / num_views`` degrees; azimuth 0 puts the camera on the
    +z axis (looking towards -z), azimuth 90 on the +x axis. ``elevation`` (degrees) lifts the
    cameras towards +y. ``fov`` is the full vertical field of view in degrees. ``distance=None``
    fits the bounding sphere of ``[-bounds, bounds]^3`` to the field of view.
    """
    if num_views < 1:
        raise ValueError("num_views must be >= 1")
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov}")
    d = fitted_distance(fov, bounds) if distance is None else float(distance)
    radius = bounds * math.sqrt(3.0)
    az = torch.tensor([math.radians(azimuth_offset + 360.0 * i / num_views) for i in range(num_views)],
                      dtype=torch.float64)
    el = math.radians(elevation)
    eye = torch.stack([d * math.cos(el) * torch.sin(az), torch.full_like(az, d * math.sin(el)),
                       d * math.cos(el) * torch.cos(az)], dim=-1)
    view = look_at(eye, torch.zeros(3, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    near = max(d - 1.05 * radius, 1e-2 * d)
    far = d + 1.05 * radius
    proj = perspective(fov, near, far, num_views, dtype=torch.float64)
    return Cameras(view, proj, eye, float(fov), near, far).to(device=device, dtype=dtype)


def projected_extent(cams: Cameras, points: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` NDC bounding box ``(x_min, x_max, y_min, y_max)`` of ``points [P, 3]`` in each view
    (no gradient). Points must lie in front of the cameras (``w > 0``)."""
    with torch.no_grad():
        clip = cams.to_clip(points.detach().to(cams.view.dtype))  # [N, P, 4]
        w = clip[..., 3]
        from ..geometry.device import host_reads_are_free

        # checked where a read is free (CPU); on a GPU the guided step's cameras orbit outside the box
        if host_reads_are_free(points.device) and not bool((w > 0).all()):
            raise ValueError("some points lie behind a camera; frame points inside the cameras' orbit")
        ndc = clip[..., :2] / w[..., None]
        lo, hi = ndc.amin(dim=1), ndc.amax(dim=1)
        return torch.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], dim=-1)


def fit_to_points(cams: Cameras, points: torch.Tensor, fill: float = 0.9) -> Cameras:
    """The same cameras with each view's projection cropped to the object: its projected bounding
    box is centred and its larger side spans ``fill`` of the image (in that view).

    Eyes, view directions and rotations stay those of ``cams`` (so shading and the perspective do not
    change); only the image window moves and zooms, a pinhole with a shifted principal point and a
    longer focal length: ``ndc' = a * (ndc - m)`` with ``m`` the box centre and ``a = fill / half
    its larger side``, i.e. ``proj' = S @ proj``. Computed from ``points`` (e.g. the mesh vertices)
    without gradient: the reward's gradient is taken with the cameras held fixed.

    Args:
        cams: cameras whose eyes lie outside the object (e.g. :func:`orbit_cameras`).
        points: ``[P, 3]`` world points of the object, ``P >= 1``.
        fill: fraction of the image side the larger projected side spans, in (0, 1].

    Returns:
        new :class:`Cameras` (``fov`` keeps the nominal value of ``cams``).
    """
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    if points.ndim != 2 or points.shape[-1] != 3 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [P, 3] tensor, got shape {tuple(points.shape)}")
    box = projected_extent(cams, points)  # [N, 4]
    mx, my = (box[:, 0] + box[:, 1]) / 2, (box[:, 2] + box[:, 3]) / 2
    half = torch.maximum(box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]) / 2
    half = half.clamp_min(1e-6)  # a single point: any zoom; keep it finite
    a = fill / half
    eye4 = torch.eye(4, dtype=cams.proj.dtype, device=cams.proj.device)
    shift = eye4.repeat(len(cams), 1, 1)
    shift[:, 0, 3], shift[:, 1, 3] = -mx, -my  # clip.x - m_x * clip.w  ->  ndc.x - m_x
    crop = eye4.repeat(len(cams), 1, 1)
    crop[:, 0, 0], crop[:, 1, 1] = a, a  # then zoom: ndc' = a * (ndc - m)
    proj = crop @ shift @ cams.proj
    return Cameras(cams.view.clone(), proj, cams.eye.clone(), cams.fov, cams.near, cams.far)
