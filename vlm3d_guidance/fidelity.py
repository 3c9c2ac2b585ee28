"""What the critic sees versus what the user gets: the guidance mesh (``grid_resolution``, maybe
coarse-to-fine) against the exported mesh (``octree_resolution``, hy3dgen's own extractor), compared
by the silhouette IoU of the critic's views.

Conventions: SDF NEGATIVE inside (the package's), world ``[-box_v, box_v]^3``; silhouettes are
``render_views(..., shading="silhouette")`` coverage thresholded at 0.5.
"""

from __future__ import annotations

import numpy as np
import torch

from .geometry.adaptive import coarse_to_fine_sdf
from .geometry.grid import FieldGrid
from .geometry.marching_cubes import marching_cubes
from .render import fit_to_points, orbit_cameras, render_views


def silhouette_iou(va, fa, vb, fb, cams, size: int = 448, backend: str = "torch") -> torch.Tensor:
    """``[N]`` IoU per view of the two meshes' silhouettes (coverage > 0.5) under ``cams``."""
    with torch.no_grad():
        a = render_views(va.float(), fa, cams, size=size, shading="silhouette", backend=backend)[:, 0] > 0.5
        b = render_views(vb.float(), fb, cams, size=size, shading="silhouette", backend=backend)[:, 0] > 0.5
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    return inter / union.clamp_min(1)


def sdf_on_grid(sdf_fn, grid: FieldGrid, chunk: int = 1 << 20) -> torch.Tensor:
    """Dense ``[N, N, N]`` float32 values of ``sdf_fn`` (points ``[P, 3]`` -> ``[P]``) on ``grid``."""
    axis = grid.axis(dtype=torch.float32)
    n = grid.num_points
    out = torch.empty(n, n, n)
    for i in range(n):  # slice by slice: bounded memory at 385^3
        y, z = torch.meshgrid(axis, axis, indexing="ij")
        pts = torch.stack([axis[i].expand_as(y), y, z], dim=-1).reshape(-1, 3)
        out[i] = sdf_fn(pts).reshape(n, n)
    return out


def guidance_mesh(sdf_fn, resolution: int, box_v: float = 1.01, coarse_to_fine: bool = True):
    """The guidance mesh of an analytic field: ``(verts [V, 3], faces [F, 3])``, dense or coarse-to-fine."""
    grid = FieldGrid(resolution, box_v)
    if coarse_to_fine:
        sdf, _, _ = coarse_to_fine_sdf(lambda flat: sdf_fn(grid.points_at(flat)), grid)
    else:
        sdf = sdf_on_grid(sdf_fn, grid)
    return marching_cubes(sdf, bounds=(-box_v, box_v))


def exported_mesh(sdf_fn, octree_resolution: int = 384, box_v: float = 1.01):
    """The mesh hy3dgen's stock extractor (``MCSurfaceExtractor``, as ``pipeline._export`` uses it)
    makes of the field: ``(verts, faces)`` tensors. The field is hy3dgen's (positive inside)."""
    from hy3dgen.shapegen.models.autoencoders.surface_extractors import MCSurfaceExtractor

    field = -sdf_on_grid(sdf_fn, FieldGrid(octree_resolution, box_v))
    v, f = MCSurfaceExtractor().run(field, mc_level=0.0, bounds=box_v, octree_resolution=octree_resolution)
    return torch.as_tensor(np.asarray(v, dtype=np.float32)), torch.as_tensor(np.ascontiguousarray(f), dtype=torch.long)


def critic_view_iou(guide, export, num_views: int = 4, elevation: float = 20.0, fov: float = 40.0,
                    size: int = 448, fill: float | None = 0.9, box_v: float = 1.01) -> torch.Tensor:
    """``[N]`` silhouette IoU of the critic's views (orbit fitted to the guidance mesh, as during
    guidance) of ``guide = (verts, faces)`` and ``export = (verts, faces)``."""
    cams = orbit_cameras(num_views, elevation=elevation, fov=fov, bounds=box_v)
    if fill is not None:
        cams = fit_to_points(cams, guide[0].float(), fill)
    return silhouette_iou(guide[0], guide[1], export[0], export[1], cams, size=size)
