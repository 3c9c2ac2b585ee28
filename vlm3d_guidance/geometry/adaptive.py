"""Coarse-to-fine sampling of a field on a :class:`~.grid.FieldGrid`: decode where the surface is.

Decoding the dense grid costs one decoder query per grid point, ``(R + 1)^3`` of them, though only
the cubes that the surface crosses matter to marching cubes. :func:`coarse_to_fine_sdf` decodes:

1. the coarse lattice: every other grid point (even indices; ``R`` must be even), exactly the same
   points as the fine grid has there;
2. every fine point of the coarse cells whose 8 corners do not all share a sign, dilated by
   ``dilate`` coarse cells;
3. then, until nothing is missing: the 3x3x3 neighbourhood of every endpoint of a crossing edge that
   marching cubes finds on the assembled field, where any of it was not decoded.

Points never decoded take the trilinear interpolation of the coarse values (inside a cell whose
corners share a sign, that keeps the sign, so no surface is invented there). After step 3 every
grid cube the surface crosses has all 8 corners decoded, so the topology and the vertices equal
those of the dense grid for every part of the surface that touches the band. What it can miss, like
hy3dgen's own hierarchical decoders, is a part that no coarse cell sees at all: a piece thinner
than the coarse spacing (``2 * spacing``) lying between coarse points and away from the rest of the
surface. Use the dense grid where that matters.

Conventions: values in the package's SDF convention (negative inside, level 0); ``decode(flat)``
takes flat grid indices ``[P]`` (``grid.linear_index`` order) and returns their values ``[P]``
without gradients; NaN is treated as outside, as everywhere in :mod:`.decode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import FieldGrid
from .marching_cubes import extract_topology


def coarse_to_fine_sdf(decode, grid: FieldGrid, dilate: int = 1, device=None, dtype=torch.float32):
    """Field values on ``grid``, decoded only near the surface.

    Args:
        decode: ``decode(flat [P] long) -> values [P]`` in the SDF convention (no gradient needed).
        grid: the fine grid; ``grid.resolution`` must be even and at least 4.
        dilate: coarse cells added around every sign-changing coarse cell (>= 0).
        device, dtype: of the returned field.

    Returns:
        ``(sdf [N, N, N], decoded [N, N, N] bool, topology)`` with ``N = grid.num_points``: decoded
        values where ``decoded`` (NaN kept: marching cubes counts it as outside), coarse trilinear
        interpolation elsewhere; and the :class:`~.marching_cubes.MCTopology` of ``sdf``, every
        crossed cube of which has its 8 corners decoded.
    """
    r = int(grid.resolution)
    if r % 2 or r < 4:
        raise ValueError(f"coarse-to-fine decoding needs an even grid resolution >= 4, got {r}")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    n = grid.num_points
    vals = torch.zeros(n, n, n, dtype=dtype, device=device)
    known = torch.zeros(n, n, n, dtype=torch.bool, device=device)

    def fetch(mask: torch.Tensor) -> None:
        need = (mask & ~known).reshape(-1).nonzero().squeeze(1)
        if need.numel():
            vals.view(-1)[need] = decode(need).to(device=device, dtype=dtype)
            known.view(-1)[need] = True

    # 1. the coarse lattice
    lattice = torch.zeros_like(known)
    lattice[::2, ::2, ::2] = True
    fetch(lattice)
    coarse = vals[::2, ::2, ::2]
    finite = torch.isfinite(coarse)
    big = coarse[finite].abs().max() if bool(finite.any()) else coarse.new_tensor(1.0)
    coarse = torch.where(finite, coarse, big)  # NaN -> outside, like the dense path
    # 2. fine points of sign-changing coarse cells, dilated
    c = coarse[None, None]
    lo = -F.max_pool3d(-c, 2, stride=1)[0, 0]
    hi = F.max_pool3d(c, 2, stride=1)[0, 0]
    cells = (lo <= 0) & (hi >= 0)  # [R/2]^3
    if dilate:
        cells = F.max_pool3d(cells[None, None].float(), 2 * dilate + 1, stride=1, padding=dilate)[0, 0] > 0
    fine_cells = cells.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)  # [R]^3
    fetch(F.max_pool3d(fine_cells[None, None].float(), 2, stride=1, padding=1)[0, 0] > 0)
    interp = F.interpolate(coarse[None, None], size=(n, n, n), mode="trilinear", align_corners=True)[0, 0]
    # 3. complete every crossed cube
    while True:
        sdf = torch.where(known, vals, interp)
        topo = extract_topology(sdf, grid, 0.0)
        if topo.is_empty:
            return sdf, known, topo
        ends = torch.cat([topo.edge_p0, topo.edge_p1]).to(known.device)
        hood = torch.zeros(1, 1, n, n, n, device=known.device)
        hood.view(-1)[ends] = 1.0
        hood = F.max_pool3d(hood, 3, stride=1, padding=1)[0, 0] > 0
        if bool((hood & ~known).any()):
            fetch(hood)
            continue
        return sdf, known, topo
