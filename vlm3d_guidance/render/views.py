"""render_views: mesh + cameras -> images for the critic, composed from the primitives.

Backends share nvdiffrast's conventions (see raster_torch.py): clip-space ``pos [B, V, 4]``,
``rast [B, H, W, 4] = (u, v, z/w, triangle_id + 1)`` with row 0 at the BOTTOM. The only place where
rows are flipped to the image convention (row 0 = top) is the end of :func:`render_views`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import raster_nvdiffrast, raster_torch
from .antialias import antialias as edge_antialias
from .antialias import edge_topology
from .cameras import Cameras
from .raster_torch import interpolate_covered
from ..config import BACKENDS, SHADINGS
from .shading import clay, facing_camera, normal_colors, vertex_normals, vertex_normals_camera


def get_backend(name: str = "auto", device=None):
    """A namespace with ``rasterize``, ``interpolate``, ``antialias`` and ``name``.

    ``"auto"`` picks nvdiffrast when it imports and ``device`` is CUDA, else torch. ``"nvdiffrast"``
    when it is missing raises ImportError with the install hint. ``antialias`` is always the
    silhouette-edge antialias (works on either backend's ``rast``).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        name = "nvdiffrast" if dev.type == "cuda" and raster_nvdiffrast.available() else "torch"
    if name == "nvdiffrast":
        raster_nvdiffrast._dr()  # clear ImportError with the install hint when missing
        if dev.type != "cuda":
            raise ValueError("backend='nvdiffrast' needs CUDA tensors; use backend='torch' on CPU")
        mod = raster_nvdiffrast
    else:
        mod = raster_torch
    return SimpleNamespace(name=name, rasterize=mod.rasterize, interpolate=mod.interpolate, antialias=edge_antialias)


def render_views(verts: torch.Tensor, faces: torch.Tensor, cams: Cameras, size: int = 448,
                 shading: str = "clay", backend: str = "auto", background: float = 1.0,
                 antialias: bool = True) -> torch.Tensor:
    """Render ``len(cams)`` views of one mesh.

    Args:
        verts: ``[V, 3]`` world coordinates (gradients flow back to them); faces: ``[F, 3]`` long,
            welded, outward winding.
        cams: :class:`Cameras` (e.g. :func:`orbit_cameras`).
        size: square image side in pixels.
        shading: "clay" (Lambert + ambient, light grey), "normals" (camera-space ``(n + 1) / 2``) or
            "silhouette" (antialiased coverage: 1 object, 0 background, in all channels).
        backend: "auto" | "torch" | "nvdiffrast".
        background: grey level of the background for "clay"/"normals".
        antialias: silhouette-edge antialias (the only source of silhouette gradients).

    Returns:
        ``[N, 3, size, size]`` in ``[0, 1]``, row 0 = TOP of the image, dtype ``verts``' (>= float32).
    """
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    n = len(cams)
    dtype = torch.promote_types(verts.dtype, torch.float32)
    bg = 0.0 if shading == "silhouette" else float(background)
    if faces.shape[0] == 0:
        img = torch.full((n, 3, size, size), bg, dtype=dtype, device=verts.device)
        return img + 0.0 * verts.sum()  # keeps the graph connected: zero gradient, no error
    be = get_backend(backend, verts.device)
    faces = faces.long().to(verts.device)
    pos = cams.to(verts.device, dtype).to_clip(verts.to(dtype))  # [N, V, 4]
    rast = be.rasterize(pos, faces, (size, size))
    if shading == "silhouette":
        color = (rast[..., 3:4] > 0).to(dtype)
    else:
        # shade only the covered pixels (packed [P, 3]), then place them on the background
        flat = rast.reshape(-1, 4)
        covered = torch.nonzero(flat[:, 3].detach() > 0).squeeze(1)
        vn = vertex_normals_camera(vertex_normals(verts.to(dtype), faces), cams.rotations().to(verts.device))
        normals = facing_camera(interpolate_covered(vn, flat, covered, faces, size * size))  # [P, 3]
        shaded = clay(normals) if shading == "clay" else normal_colors(normals)
        color = torch.full((flat.shape[0], 3), bg, dtype=dtype, device=verts.device)
        color = color.index_put((covered,), shaded.to(dtype)).reshape(n, size, size, 3)
    if antialias:
        color = be.antialias(color, rast, pos, faces, edge_topology(faces))
    color = color.flip(1)  # rows: bottom-up (rasterizer) -> top-down (images)
    img = color.permute(0, 3, 1, 2)
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    return img.clamp(0.0, 1.0)
