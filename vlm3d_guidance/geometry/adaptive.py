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


def coarse_to_fine_sdf(decode, grid: FieldGrid, dilate: int = 1, device=None, dtype=torch.float32,
                       initial=None, stats: dict | None = None):
    """Field values on ``grid``, decoded only near the surface.

    Args:
        decode: ``decode(flat [P] long) -> values [P]`` in the SDF convention (no gradient needed).
        grid: the fine grid; ``grid.resolution`` must be even and at least 4.
        dilate: coarse cells added around every sign-changing coarse cell (>= 0).
        device, dtype: of the returned field.
        initial: optional ``(values [N, N, N], known [N, N, N] bool)`` already decoded (reused, not
            asked for again); both are updated in place.
        stats: optional dict; ``stats["queries"]`` is increased by the number of points decoded.

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
    vals, known, fetch = _fetcher(decode, grid, device, dtype, initial, stats)
    # 1. the coarse lattice
    coarse, interp = _lattice(vals, known, fetch, 2)
    # 2. fine points of sign-changing coarse cells, dilated
    cells = _sign_change_cells(coarse)  # [R/2]^3
    if dilate:
        cells = F.max_pool3d(cells[None, None].float(), 2 * dilate + 1, stride=1, padding=dilate)[0, 0] > 0
    fine_cells = cells.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)  # [R]^3
    fetch(cell_corners(fine_cells))
    # 3. complete every crossed cube
    sdf, topo, _ = complete_crossed_cubes(vals, known, interp, fetch, grid)
    return sdf, known, topo


def _fetcher(decode, grid: FieldGrid, device, dtype, initial, stats):
    """``(values, known, fetch)``: ``fetch(mask)`` decodes the points of ``mask`` not yet known."""
    n = grid.num_points
    if initial is not None:
        vals, known = initial
    else:
        vals = torch.zeros(n, n, n, dtype=dtype, device=device)
        known = torch.zeros(n, n, n, dtype=torch.bool, device=device)

    def fetch(mask: torch.Tensor) -> int:
        need = (mask & ~known).reshape(-1).nonzero().squeeze(1)
        if need.numel():
            vals.view(-1)[need] = decode(need).to(device=vals.device, dtype=vals.dtype)
            known.view(-1)[need] = True
            if stats is not None:
                stats["queries"] = stats.get("queries", 0) + int(need.numel())
        return int(need.numel())

    return vals, known, fetch


def _lattice(vals, known, fetch, stride: int):
    """Decode every ``stride``-th point; return the lattice values (NaN -> outside) and their
    trilinear interpolation onto the full grid ``[N, N, N]``."""
    lattice = torch.zeros_like(known)
    lattice[::stride, ::stride, ::stride] = True
    fetch(lattice)
    coarse = vals[::stride, ::stride, ::stride]
    finite = torch.isfinite(coarse)
    big = torch.where(finite, coarse.abs(), torch.zeros_like(coarse)).amax()
    big = torch.where(big > 0, big, torch.ones_like(big))
    coarse = torch.where(finite, coarse, big)  # NaN -> outside, like the dense path
    n = vals.shape[0]
    interp = F.interpolate(coarse[None, None], size=(n, n, n), mode="trilinear", align_corners=True)[0, 0]
    return coarse, interp


def _sign_change_cells(coarse: torch.Tensor) -> torch.Tensor:
    """Cells of a lattice ``[M, M, M]`` whose 8 corners do not all share a sign: ``[M-1]^3`` bool."""
    c = coarse[None, None]
    lo = -F.max_pool3d(-c, 2, stride=1)[0, 0]
    hi = F.max_pool3d(c, 2, stride=1)[0, 0]
    return (lo <= 0) & (hi >= 0)


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Boolean ``[N, N, N]`` mask grown by ``radius`` points along every axis (a cube, Chebyshev
    distance), by shifted ORs (separable; much cheaper than ``max_pool3d`` on the CPU)."""
    out = mask.clone()
    for _ in range(radius):
        out = _dilate_axes(out, (0, 1, 2))
    return out


def cell_corners(cells: torch.Tensor) -> torch.Tensor:
    """``[R, R, R]`` cell mask -> ``[R+1]^3`` mask of every corner of those cells."""
    r = cells.shape[0]
    pts = torch.zeros((r + 1,) * 3, dtype=torch.bool, device=cells.device)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                pts[dx:dx + r, dy:dy + r, dz:dz + r] |= cells
    return pts


def crossed_cube_corners(sdf: torch.Tensor) -> torch.Tensor:
    """``[N, N, N]`` bool: the 8 corners of every grid cube that has a crossing edge (inside =
    ``sdf < 0``, NaN outside). For an edge along axis ``a`` these are its two ends and their
    neighbours across the other two axes (the 4 cubes around the edge): exactly what marching
    cubes reads around the surface, and nothing more."""
    inside = sdf < 0
    out = torch.zeros_like(inside)
    for axis in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        start = torch.zeros_like(inside)
        start[tuple(lo)] = inside[tuple(lo)] != inside[tuple(hi)]
        across = _dilate_axes(start, [b for b in range(3) if b != axis])
        out |= across
        out[tuple(hi)] |= across[tuple(lo)]
    return out


def _dilate_axes(mask: torch.Tensor, axes) -> torch.Tensor:
    out = mask
    for axis in axes:
        grown = out.clone()
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        grown[tuple(lo)] |= out[tuple(hi)]
        grown[tuple(hi)] |= out[tuple(lo)]
        out = grown
    return out


def complete_crossed_cubes(vals, known, fill, fetch, grid: FieldGrid, max_rounds: int | None = None):
    """Grow the decoded set until every cube the surface crosses has its 8 corners decoded.

    The field is ``vals`` where ``known``, ``fill`` elsewhere. Each round finds the crossing edges
    from the signs and decodes the corners of the cubes around them where unknown
    (:func:`crossed_cube_corners`); then the topology is extracted once.

    Returns ``(sdf, topology, rounds)``; with ``max_rounds``, stops early after that many rounds
    that decoded something and returns ``(sdf, None, rounds)`` (the caller decides what then).
    """
    rounds = 0
    while True:
        sdf = torch.where(known, vals, fill)
        if not fetch(crossed_cube_corners(sdf)):
            return sdf, extract_topology(sdf, grid, 0.0), rounds
        rounds += 1
        if max_rounds is not None and rounds >= max_rounds:
            return torch.where(known, vals, fill), None, rounds
