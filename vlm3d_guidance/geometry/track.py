"""Decoding that follows the surface from one sampling step to the next.

The clean-latent estimate changes little between neighbouring sampling steps, so neither does its
surface. :func:`tracked_sdf` decodes, on the fine grid:

1. the band: the corners of every cube the PREVIOUS step's surface crossed, grown by ``band``
   cells (Chebyshev distance);
2. a sparse sentinel lattice (every ``stride``-th point, ``stride`` dividing the resolution) that
   watches the rest of the box;
3. then, as :func:`~.adaptive.complete_crossed_cubes`, the neighbourhood of every crossing edge
   until every crossed cube has its 8 corners decoded (points never decoded take the lattice's
   trilinear interpolation, which keeps the lattice's sign inside cells whose corners agree).

The surface has LEFT the band when a sentinel cell whose corners disagree in sign lies entirely
outside the band (a new piece, or a jump), or when step 3 still has to grow after
``max_rounds`` rounds (the surface walked out of the band). Then the step falls back to the full
coarse-to-fine decode (:func:`~.adaptive.coarse_to_fine_sdf`, reusing every value already decoded)
and the reason is recorded in :attr:`SurfaceTrack.last`. The first step (no previous surface) is
always a full coarse-to-fine decode.

What the result guarantees is that of coarse-to-fine decoding: the same topology and vertices as
the dense grid for every part of the surface that touches what was decoded. What it cannot see is a
new piece smaller than a sentinel cell (``stride`` cells) lying between sentinel points, away from
the band: the full coarse-to-fine decode, which sees pieces down to two cells, runs whenever the
surface is lost, and the dense grid sees everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adaptive import (_fetcher, _lattice, _sign_change_cells, coarse_to_fine_sdf,
                       complete_crossed_cubes, crossed_cube_corners, dilate)
from .grid import FieldGrid


@dataclass
class SurfaceTrack:
    """One batch item's surface, carried from sampling step to sampling step.

    Attributes:
        band: cells added around the previous surface's cubes (>= 0). The completion (step 3)
            follows a surface that moved out of them, a round per cell, up to ``max_rounds``.
        stride: sentinel lattice spacing in fine cells (even, >= 2; when it does not divide the
            resolution, every step is a full coarse-to-fine decode).
        max_rounds: growth rounds of the completion before the surface counts as lost.
        grid: the grid of the previous surface (a different grid starts afresh).
        points: ``[P]`` long, flat grid indices of the corners of every cube the previous surface
            crossed (what marching cubes read there, :func:`~.adaptive.crossed_cube_corners`).
        last: what the last call did: ``dict(mode="full"|"tracked", reason=str|None,
            queries=int, dense=int)`` (``reason`` says why a full decode ran).
        history: every ``last``, in order.
    """

    band: int = 0
    stride: int = 4
    max_rounds: int = 3
    grid: FieldGrid | None = None
    points: torch.Tensor | None = None
    last: dict | None = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        if int(self.band) < 0:
            raise ValueError(f"band must be >= 0 cells, got {self.band}")
        if int(self.stride) < 2 or int(self.stride) % 2:
            raise ValueError(f"stride must be an even number >= 2, got {self.stride}")
        if int(self.max_rounds) < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")

    def reset(self) -> None:
        self.grid, self.points = None, None


def tracked_sdf(decode, grid: FieldGrid, track: SurfaceTrack, device=None, dtype=torch.float32):
    """Field values on ``grid`` decoded around ``track``'s previous surface (see module doc).

    Args:
        decode: ``decode(flat [P] long) -> values [P]`` in the SDF convention, no gradient.
        grid: the fine grid (even resolution >= 4).
        track: the :class:`SurfaceTrack`; updated with this step's surface and ``last``.
        device, dtype: of the returned field.

    Returns:
        ``(sdf [N, N, N], decoded [N, N, N] bool, topology)`` as
        :func:`~.adaptive.coarse_to_fine_sdf`.
    """
    stats = {"queries": 0}
    reason = None
    r = int(grid.resolution)
    if track.points is None or track.grid != grid:
        reason = "first step" if track.points is None else "grid changed"
    elif track.points.numel() == 0:
        reason = "no previous surface"
    elif r % int(track.stride):
        reason = f"stride {track.stride} does not divide the resolution {r}"
    vals = known = topo = None
    if reason is None:
        vals, known, fetch = _fetcher(decode, grid, device, dtype, None, stats)
        n = grid.num_points
        seed = torch.zeros(n, n, n, dtype=torch.bool, device=known.device)
        seed.view(-1)[track.points.to(known.device)] = True
        band = dilate(seed, int(track.band)) if track.band else seed
        fetch(band)
        coarse, interp = _lattice(vals, known, fetch, int(track.stride))
        touched = _block_any(band, int(track.stride))  # [R/s]^3
        if bool((_sign_change_cells(coarse) & ~touched).any()):
            reason = "surface outside the band (sentinel lattice)"
        else:
            sdf, topo, rounds = complete_crossed_cubes(vals, known, interp, fetch, grid,
                                                       max_rounds=int(track.max_rounds))
            if topo is None:
                reason = f"surface left the band (still growing after {rounds} rounds)"
    if reason is not None:
        initial = None if vals is None else (vals, known)
        sdf, known, topo = coarse_to_fine_sdf(decode, grid, device=device, dtype=dtype,
                                              initial=initial, stats=stats)
    track.grid = grid
    track.points = crossed_cube_corners(sdf).reshape(-1).nonzero().squeeze(1)
    track.last = dict(mode="full" if reason else "tracked", reason=reason, queries=stats["queries"],
                      dense=grid.num_points ** 3)
    track.history.append(track.last)
    return sdf, known, topo


def _block_any(mask: torch.Tensor, s: int) -> torch.Tensor:
    """``[R+1]^3`` point mask -> ``[R/s]^3``: does any point of lattice cell ``(I, J, K)`` (points
    ``s I .. s I + s`` along every axis, both ends included) lie in ``mask``?"""
    out = mask
    for axis in range(3):
        m = out.shape[axis] - 1  # = R
        body = out.narrow(axis, 0, m)
        shape = list(body.shape)
        shape[axis:axis + 1] = [m // s, s]
        blocks = body.reshape(shape).any(dim=axis + 1)  # points s I .. s I + s - 1
        ends = out.index_select(axis, torch.arange(s, m + 1, s, device=mask.device))  # point s I + s
        out = blocks | ends
    return out
