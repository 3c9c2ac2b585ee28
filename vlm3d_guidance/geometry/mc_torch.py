"""Marching-cubes topology in torch, on the field's own device (no copy to the host, no compiler).

Same result contract as the scikit-image path of :func:`.marching_cubes.extract_topology`:
an :class:`~.marching_cubes.MCTopology` over the same grid, in the same edge order (sorted by
``axis * N^3 + p0``). The crossing edges -- the vertices -- are fixed by the signs alone and are the
same as scikit-image's, bit for bit. The triangles come from :mod:`.mc_tables` (case tables derived
from a rule, see there): identical surfaces in unambiguous cubes, the asymptotic decider on
ambiguous faces (as Lewiner's method), and a cube-centre vertex only in the rare configurations
that need one (``center_edges``, as on the scikit-image path).

Steps, all vectorised: classify the grid points (inside = ``sdf - iso < 0``; NaN and values equal to
``iso`` count as outside), build every cube's 8-bit sign code, keep the cubes that the surface
crosses, compute their 6 face bits from the (nudged, as on the scikit-image path) corner values,
look their triangles up, and turn each triangle's cube edges into global edge keys and those into
vertex indices by a sorted search.
"""

from __future__ import annotations

import torch

from . import device as _device
from .grid import FieldGrid
from .mc_tables import CENTER, CUBE_EDGES, FACE_CORNERS, corner_offset, triangle_table

_DELTA_REL = 4e-3  # the nudge of marching_cubes._DELTA_REL (kept equal: the face decider sees it)

_TABLE_CACHE: dict = {}


def _tables(device) -> tuple:
    """Triangle table, counts, corner and edge offsets on ``device`` (cached per device)."""
    key = str(device)
    if key not in _TABLE_CACHE:
        tris, centre = triangle_table()
        counts = (tris[:, :, 0] >= 0).sum(1)
        _TABLE_CACHE[key] = tuple(torch.from_numpy(a).to(device) for a in (tris, counts, centre))
    return _TABLE_CACHE[key]


def face_bits(c: torch.Tensor) -> torch.Tensor:
    """Asymptotic-decider bits ``[M]`` (int64, bit ``f`` for face ``f``) from corner values ``[M, 8]``.

    For an ambiguous face with cyclic corner values ``f0, f1, f2, f3`` (diagonals ``f0, f2`` and
    ``f1, f3`` of opposite signs) the bilinear interpolant's saddle value is
    ``(f0 f2 - f1 f3) / (f0 + f2 - f1 - f3)``; the bit is 1 when the saddle is inside (< 0), i.e. the
    inside diagonal is connected across the face. Non-ambiguous faces get 0. The expression reads
    the face's values in the face's own order, so both cubes sharing a face compute the same bit.
    """
    bits = torch.zeros(c.shape[0], dtype=torch.long, device=c.device)
    for f, q in enumerate(FACE_CORNERS):
        f0, f1, f2, f3 = (c[:, i] for i in q)
        i0, i1 = f0 < 0, f1 < 0
        amb = (i0 == (f2 < 0)) & (i1 == (f3 < 0)) & (i0 != i1)
        num_pos = f0 * f2 > f1 * f3  # sign of the saddle's numerator
        # diagonal f0-f2 inside: denominator < 0, saddle < 0 <=> num > 0; else the reverse
        connected = torch.where(i0, num_pos, f0 * f2 < f1 * f3)
        bits |= (amb & connected).long() << f
    return bits


def _finite_scale(d: torch.Tensor) -> torch.Tensor:
    """Largest finite ``|d|`` as a 0-d tensor (1 if there is none or it is 0); no host sync on CUDA
    (on the CPU, where a check is free, the slower NaN-safe pass runs only when needed)."""
    lo, hi = torch.aminmax(d)
    big = torch.maximum(-lo, hi)
    if not _device.host_reads_are_free(d.device) or not bool(torch.isfinite(big)):
        big = torch.nan_to_num(d.abs(), nan=0.0, posinf=0.0).amax()
    return torch.where(big > 0, big, torch.ones_like(big))


def extract_topology_torch(sdf: torch.Tensor, grid: FieldGrid, iso: float = 0.0, *,
                           outside_value: bool = True):
    """Marching-cubes topology of ``sdf [N, N, N]`` (negative inside) on ``sdf.device``.

    Returns a :class:`~.marching_cubes.MCTopology` whose tensors live on ``sdf.device``.
    ``outside_value=False`` keeps ``topology.outside_value`` as a 0-d tensor instead of a float
    (no host synchronisation for it)."""
    from .marching_cubes import MCTopology, _empty_topology

    n = grid.num_points
    if tuple(sdf.shape) != (n, n, n):
        raise ValueError(f"field shape {tuple(sdf.shape)} does not match grid {grid.shape}")
    dev = sdf.device
    d = sdf.detach().to(torch.promote_types(sdf.dtype, torch.float32))
    d = d - iso if iso != 0 else d
    inside = d < 0  # NaN and +inf are outside, -inf inside
    big = _finite_scale(d)
    r = n - 1
    # a cube is crossed when its 8 corners are neither all inside nor all outside (separable OR/AND)
    any_in, all_in = inside, inside
    for a in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[a], hi[a] = slice(0, r), slice(1, n)
        any_in = any_in[tuple(lo)] | any_in[tuple(hi)]
        all_in = all_in[tuple(lo)] & all_in[tuple(hi)]
    cubes = (any_in & ~all_in).reshape(-1).nonzero().squeeze(1)  # cube flat index in r^3
    big_out = float(big) if outside_value else big
    if cubes.numel() == 0:
        topo = _empty_topology(grid, 1.0)
        topo.outside_value = big_out
        return _to(topo, dev)
    ci, cj, ck = cubes // (r * r), (cubes // r) % r, cubes % r
    base = (ci * n + cj) * n + ck  # lowest corner, flat point index
    corner_off = torch.tensor([(o[0] * n + o[1]) * n + o[2] for o in map(corner_offset, range(8))],
                              device=dev)
    vals = d.reshape(-1)[base[:, None] + corner_off]  # [M, 8]
    code = ((vals < 0).long() << torch.arange(8, device=dev)).sum(1)  # [M] 8-bit sign code
    vals = torch.where(torch.isnan(vals), big, vals)
    vals = torch.where(torch.isinf(vals), torch.sign(vals) * big, vals)
    delta = _DELTA_REL * big
    vals = torch.where(vals.abs() < delta, torch.where(vals < 0, -delta, delta), vals)
    cfg = code + 256 * face_bits(vals)
    tris, counts, centre_mask = _tables(dev)
    t_max = tris.shape[1]
    cnt = counts[cfg]  # [M] triangles per cube
    m_idx = torch.repeat_interleave(torch.arange(cfg.shape[0], device=dev), cnt)  # [K]
    first = torch.cumsum(cnt, 0) - cnt
    slot = torch.arange(m_idx.shape[0], device=dev) - first[m_idx]
    tri_local = tris.reshape(-1, 3)[cfg[m_idx] * t_max + slot]  # [K, 3] local ids (12 = centre)
    n3 = n ** 3
    # few queries: a sorted search of the edge keys; many: a dense key -> vertex lookup (cumsum)
    keys, vid = _crossing_edges(inside, n, dense=m_idx.shape[0] * 48 > 3 * n3)
    num_e = keys.shape[0]
    edge_axis = torch.tensor([a for a, _ in CUBE_EDGES], device=dev)
    edge_start = torch.tensor([(o[0] * n + o[1]) * n + o[2] for _, o in CUBE_EDGES], device=dev)

    def edge_vertex(cube_base, e):  # global vertex index of cube edge(s) ``e`` (no centre ids)
        k = edge_axis[e] * n3 + cube_base + edge_start[e]
        return torch.searchsorted(keys, k) if vid is None else vid[k].long()

    is_c = tri_local == CENTER
    faces = edge_vertex(base[m_idx][:, None], tri_local.clamp_max(11))
    # centre vertices (rare): one per cube whose configuration has a centre mask
    cmask = centre_mask[cfg]  # [M]
    has_c = cmask > 0
    c_rank = torch.cumsum(has_c.long(), 0) - 1  # [M]
    faces = torch.where(is_c, num_e + c_rank[m_idx][:, None], faces)
    c_cubes = has_c.nonzero().squeeze(1)
    ev = edge_vertex(base[c_cubes][:, None], torch.arange(12, device=dev)[None])  # [C, 12]
    in_mask = (cmask[c_cubes][:, None] >> torch.arange(12, device=dev)[None]) & 1 > 0
    center_edges = torch.where(in_mask, ev, torch.full_like(ev, -1))
    e_axis = keys // n3
    e_p0 = keys % n3
    stride = torch.tensor([n * n, n, 1], device=dev)
    e_p1 = e_p0 + stride[e_axis]
    return MCTopology(grid, e_p0, e_p1, e_axis, center_edges, faces, big_out)


def _crossing_edges(inside: torch.Tensor, n: int, dense: bool):
    """Every crossing grid edge: ``keys [E]`` (``axis * n^3 + p0``, sorted: axis-major, then flat
    start index) and, with ``dense``, ``vid [3 n^3]`` int32, the vertex index of edge key ``k`` at
    ``vid[k]`` (meaningless for edges that do not cross); else ``vid`` is None."""
    r = n - 1
    cross = torch.zeros((3, n, n, n), dtype=torch.bool, device=inside.device)
    for a in range(3):
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[a], hi[a] = slice(0, r), slice(1, n)
        cross[a][tuple(lo)] = inside[tuple(lo)] != inside[tuple(hi)]
    flat = cross.reshape(-1)
    vid = torch.cumsum(flat, 0, dtype=torch.int32) - 1 if dense else None
    return flat.nonzero().squeeze(1), vid


def _to(topo, dev):
    for name in ("edge_p0", "edge_p1", "edge_axis", "center_edges", "faces"):
        setattr(topo, name, getattr(topo, name).to(dev))
    return topo
