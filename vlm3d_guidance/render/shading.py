"""Shading of rasterized views. The per-pixel functions work on any ``[..., 3]`` layout: image maps
``[B, H, W, 3]`` (row 0 at the bottom) or the packed covered pixels ``[P, 3]`` that
:func:`~vlm3d_guidance.render.views.render_views` shades.

- normals: area-weighted vertex normals, rotated to CAMERA space per view (x right, y up, z towards
  the viewer), interpolated, renormalised and turned to face the camera (two-sided). Rotating the
  vertex normals before interpolating equals rotating the interpolated normals (both are linear).
- "clay": ``albedo * (ambient + diffuse * max(0, n . l))`` with a light fixed in camera space
  (upper left, in front), light grey, on the background colour.
- "normals": ``(n_cam + 1) / 2``.
- "silhouette": coverage ``1`` on the object, ``0`` on the background.
"""

from __future__ import annotations

import torch

CLAY_ALBEDO = 0.8
CLAY_AMBIENT = 0.35
CLAY_DIFFUSE = 0.65
LIGHT_DIR_CAM = (-0.4, 0.6, 1.0)  # towards the light, camera space (normalised at use)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[V, 3]`` (outward for outward winding), differentiable."""
    faces = faces.long()
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area
    n = torch.zeros_like(verts)
    for k in range(3):
        n = n.index_add(0, faces[:, k], fn)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)


def vertex_normals_camera(n_world: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Vertex normals ``[V, 3]`` (world) -> ``[B, V, 3]`` in each camera's frame (``rotations [B, 3, 3]``)."""
    return torch.einsum("bij,vj->bvi", rotations.to(n_world.dtype), n_world)


def facing_camera(n_cam: torch.Tensor) -> torch.Tensor:
    """Interpolated camera-space normals ``[..., 3]`` -> unit normals turned towards the camera
    (``z >= 0``, two-sided shading)."""
    n = torch.nn.functional.normalize(n_cam, dim=-1, eps=1e-12)
    flip = torch.where(n[..., 2:3] < 0, -1.0, 1.0).to(n.dtype)
    return n * flip


def clay(n_cam: torch.Tensor) -> torch.Tensor:
    """Lambert + ambient grey ``[..., 3]`` from camera-space unit normals ``[..., 3]``."""
    light = torch.nn.functional.normalize(torch.tensor(LIGHT_DIR_CAM, dtype=n_cam.dtype, device=n_cam.device), dim=0)
    lam = (n_cam * light).sum(-1, keepdim=True).clamp_min(0.0)
    return (CLAY_ALBEDO * (CLAY_AMBIENT + CLAY_DIFFUSE * lam)).expand(*n_cam.shape[:-1], 3)


def normal_colors(n_cam: torch.Tensor) -> torch.Tensor:
    """``(n + 1) / 2`` in ``[0, 1]``."""
    return 0.5 * (n_cam + 1.0)
