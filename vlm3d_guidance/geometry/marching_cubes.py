"""Differentiable marching cubes: topology from scikit-image, vertices recomputed in torch.

Convention (one for the whole package): a signed field ``sdf[i, j, k]`` sampled on a
:class:`~vlm3d_guidance.geometry.grid.FieldGrid` (axis order x, y, z, grid points at both ends of the
bounds), NEGATIVE inside, surface at ``iso``. Values equal to ``iso`` and NaN count as outside.

How it works:

1. Topology (no gradient). scikit-image's Lewiner marching cubes runs on a copy of the field in
   which values closer than ``delta`` to ``iso`` are pushed to ``iso +- delta`` keeping their side.
   Signs -- and so which edges cross -- are unchanged, but every skimage vertex now sits at a
   fraction ``t`` in ``[~2e-3, 1 - 2e-3]`` of its edge, so it has exactly one fractional coordinate
   and its edge (its two grid endpoints) is read off its position without ambiguity, including
   where the true field is exactly ``iso`` on a grid point. Vertices with two or more fractional
   coordinates are Lewiner's extra cube-centre vertices (ambiguous cases); they are identified by
   their cube.
2. Geometry (differentiable). Every edge vertex is recomputed as ``p0 + t (p1 - p0)`` with
   ``t = (iso - s0) / (s1 - s0)`` from the TRUE values ``s0, s1`` at its endpoints, so autograd
   reaches exactly those values and nothing else. A cube-centre vertex is the mean of its cube's
   edge vertices. Vertices are welded by edge (one vertex per crossing edge), so closed surfaces
   come out watertight, and faces are wound counter-clockwise seen from outside (outward normals,
   positive signed volume).

:class:`MCTopology` keeps step 1's result so that another source of endpoint values (the sparse
VAE decoder in :mod:`.decode`) can run step 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .grid import FieldGrid

# nudge: values within DELTA_REL * max|sdf - iso| of iso are pushed to iso +- that much (topology only)
_DELTA_REL = 4e-3
# a coordinate is "fractional" if it is further than this from an integer (t >= ~2e-3 guaranteed)
_FRAC_EPS = 5e-4

# the 12 cube edges as (axis, offset of the start corner): one definition, in mc_tables
from .mc_tables import CUBE_EDGES as _CUBE_EDGES  # noqa: E402
_CUBE_EDGE_AXIS = np.array([a for a, _ in _CUBE_EDGES], dtype=np.int64)  # [12]
_CUBE_EDGE_OFF = np.array([o for _, o in _CUBE_EDGES], dtype=np.int64)  # [12, 3]


@dataclass
class MCTopology:
    """Which grid edges carry vertices and how they are connected (no gradients).

    Attributes:
        grid: the lattice the field lives on.
        edge_p0, edge_p1: ``[E]`` long, flat grid indices (``grid.linear_index``) of the two
            endpoints of every crossing edge used by a vertex; ``p1 = p0 + unit step`` along the axis.
        edge_axis: ``[E]`` long in {0, 1, 2}.
        center_edges: ``[C, 12]`` long, rows of indices into the edge list (``-1`` = that cube edge
            does not cross); one row per Lewiner cube-centre vertex.
        faces: ``[F, 3]`` long into the vertex list ``[E edge vertices] + [C centre vertices]``,
            outward winding.
        outside_value: the largest finite ``|sdf - iso|`` (a float, or a 0-d tensor on the field's
            device from the torch backend: no host read); NaN endpoint values become
            ``iso + outside_value`` (outside), see :func:`finite_endpoints`.
    """

    grid: FieldGrid
    edge_p0: torch.Tensor
    edge_p1: torch.Tensor
    edge_axis: torch.Tensor
    center_edges: torch.Tensor
    faces: torch.Tensor
    outside_value: float | torch.Tensor = 1.0  # |sdf - iso| scale; NaN endpoints -> iso + this

    @property
    def num_vertices(self) -> int:
        return int(self.edge_p0.shape[0] + self.center_edges.shape[0])

    @property
    def is_empty(self) -> bool:
        return self.faces.shape[0] == 0

    def endpoints(self):
        """Unique flat grid indices touched by vertices, and where each edge's ends are in them.

        Returns ``(flat [P], inv0 [E], inv1 [E])`` with ``flat[inv0] == edge_p0`` and
        ``flat[inv1] == edge_p1``. ``P`` is about two per vertex.
        """
        e = self.edge_p0.shape[0]
        flat, inv = torch.unique(torch.cat([self.edge_p0, self.edge_p1]), return_inverse=True)
        return flat, inv[:e], inv[e:]

    def vertices(self, s0: torch.Tensor, s1: torch.Tensor, iso: float = 0.0) -> torch.Tensor:
        """World-space vertices ``[V, 3]`` from endpoint values ``s0, s1`` ``[E]`` (differentiable).

        ``s0``/``s1`` are the field values (SDF convention) at ``edge_p0``/``edge_p1``.
        """
        grid = self.grid
        dev, dt = s0.device, s0.dtype
        p0 = grid.index_to_world(grid.unravel(self.edge_p0.to(dev)).to(dt))  # [E, 3]
        t = (iso - s0) / (s1 - s0)
        step = torch.eye(3, dtype=dt, device=dev)[self.edge_axis.to(dev)] * grid.spacing  # no index check
        ev = p0 + t[:, None] * step
        if self.center_edges.shape[0] == 0:
            return ev
        ce = self.center_edges.to(dev)
        mask = (ce >= 0).to(dt)  # [C, 12]
        pts = ev[ce.clamp_min(0)] * mask[..., None]  # [C, 12, 3]
        cv = pts.sum(1) / mask.sum(1, keepdim=True)
        return torch.cat([ev, cv], dim=0)


def _sanitize_np(a: np.ndarray, iso: float) -> tuple:
    """``a - iso`` as float32 with NaN/+inf -> outside, -inf -> inside; returns (values, max_abs)."""
    d = np.asarray(a, dtype=np.float32) - np.float32(iso)  # a fresh array: safe to edit in place
    lo, hi = float(d.min()), float(d.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(d)
        big = float(np.abs(d[finite]).max()) if finite.any() else 1.0
        big = big if big > 0 else 1.0
        np.nan_to_num(d, copy=False, nan=big, posinf=big, neginf=-big)
        lo, hi = float(d.min()), float(d.max())
    big = max(abs(lo), abs(hi), 1e-30)
    return d, big, lo, hi


def _empty_topology(grid: FieldGrid, big: float = 1.0) -> MCTopology:
    z = torch.zeros(0, dtype=torch.long)
    return MCTopology(grid, z, z.clone(), z.clone(), torch.zeros(0, 12, dtype=torch.long),
                      torch.zeros(0, 3, dtype=torch.long), big)


# which topology extractor "auto" picks on the CPU (benchmarks/bench_step_speed.py measures both;
# see benchmarks/RESULTS.md); on every other device it is always "torch" (no host round trip)
CPU_BACKEND = "skimage"


def resolve_backend(backend: str, device) -> str:
    """``"torch"`` or ``"skimage"`` for ``backend`` in ("auto", "torch", "skimage") on ``device``."""
    if backend not in ("auto", "torch", "skimage"):
        raise ValueError(f"marching-cubes backend must be 'auto', 'torch' or 'skimage' (got {backend!r})")
    if backend != "auto":
        return backend
    return CPU_BACKEND if torch.device(device).type == "cpu" else "torch"


def extract_topology(sdf, grid: FieldGrid, iso: float = 0.0, backend: str = "auto") -> MCTopology:
    """Run step 1 (see module doc) on ``sdf`` (tensor or array ``[N, N, N]``, negative inside).

    ``backend``: "skimage" (Lewiner, on a host copy), "torch" (:mod:`.mc_torch`, on the field's
    device: the same crossing edges, so the same edge vertices; triangles may differ in ambiguous
    cubes), or "auto" (torch except on the CPU, where :data:`CPU_BACKEND`). The result's tensors
    live on the CPU for "skimage" and on ``sdf``'s device for "torch"."""
    dev = sdf.device if isinstance(sdf, torch.Tensor) else torch.device("cpu")
    if resolve_backend(backend, dev) == "torch":
        from .mc_torch import extract_topology_torch

        t = sdf if isinstance(sdf, torch.Tensor) else torch.from_numpy(np.asarray(sdf))
        return extract_topology_torch(t, grid, iso, outside_value=False)
    if isinstance(sdf, torch.Tensor):
        sdf = sdf.detach().cpu().numpy()
    sdf = np.asarray(sdf)
    n = grid.num_points
    if sdf.shape != (n, n, n):
        raise ValueError(f"field shape {sdf.shape} does not match grid {grid.shape}")
    d, big, lo, hi = _sanitize_np(sdf, iso)
    if not (lo < 0.0 <= hi):
        return _empty_topology(grid, big)
    delta = np.float32(_DELTA_REL * big)
    near = np.nonzero(np.abs(d).reshape(-1) < delta)[0]
    if len(near):
        dn = d.reshape(-1)
        dn[near] = np.where(dn[near] < 0, -delta, delta)
    from skimage import measure

    # SDF: values ascend outwards; 'ascent' + the flip below gives CCW-from-outside faces
    try:
        sv, sf, _, _ = measure.marching_cubes(d, 0.0, method="lewiner", gradient_direction="ascent")
    except (RuntimeError, ValueError):
        return _empty_topology(grid, big)
    sf = np.ascontiguousarray(sf[:, ::-1]).astype(np.int64)

    sv = sv.astype(np.float64)
    fl = np.floor(sv)
    fr = sv - fl
    isfrac = (fr > _FRAC_EPS) & (fr < 1.0 - _FRAC_EPS)
    nfrac = isfrac.sum(1)
    if (nfrac == 0).any():  # cannot happen after the nudge; guard against silent corruption
        raise RuntimeError("marching cubes: a vertex lies on a grid point after the nudge")
    is_edge = nfrac == 1
    n3 = n ** 3

    # --- edge vertices: axis = the fractional coordinate, p0 = its floor, others rounded
    ev = sv[is_edge]
    axis = np.argmax(isfrac[is_edge], axis=1)
    ijk = np.rint(ev).astype(np.int64)
    ijk[np.arange(len(ev)), axis] = np.floor(ev[np.arange(len(ev)), axis]).astype(np.int64)
    key_e = axis * n3 + (ijk[:, 0] * n + ijk[:, 1]) * n + ijk[:, 2]

    # --- centre vertices: identified by their cube
    cv = sv[~is_edge]
    cube = np.clip(np.floor(cv).astype(np.int64), 0, n - 2)
    key_c = (cube[:, 0] * n + cube[:, 1]) * n + cube[:, 2]
    ucube, inv_c = np.unique(key_c, return_inverse=True)
    if len(ucube):
        cijk = np.stack([ucube // (n * n), (ucube // n) % n, ucube % n], -1)  # [C, 3]
        start = cijk[:, None, :] + _CUBE_EDGE_OFF[None]  # [C, 12, 3]
        end = start + np.eye(3, dtype=np.int64)[_CUBE_EDGE_AXIS][None]
        crosses = (d[start[..., 0], start[..., 1], start[..., 2]] < 0) != (d[end[..., 0], end[..., 1], end[..., 2]] < 0)
        ckey = _CUBE_EDGE_AXIS[None] * n3 + (start[..., 0] * n + start[..., 1]) * n + start[..., 2]
        all_keys = np.concatenate([key_e, ckey[crosses]])
    else:
        all_keys = key_e
    ukey, inv_all = np.unique(all_keys, return_inverse=True)
    inv_e = inv_all[: len(key_e)]
    E = len(ukey)

    # vertex remap: skimage vertex -> our vertex index (edges first, then centres)
    remap = np.empty(len(sv), dtype=np.int64)
    remap[np.nonzero(is_edge)[0]] = inv_e
    remap[np.nonzero(~is_edge)[0]] = E + inv_c
    faces = remap[sf]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces = faces[ok]

    if len(ucube):
        center_edges = np.full((len(ucube), 12), -1, dtype=np.int64)
        center_edges[crosses] = inv_all[len(key_e):]
    else:
        center_edges = np.zeros((0, 12), dtype=np.int64)

    e_axis = ukey // n3
    e_p0 = ukey % n3
    e_p1 = e_p0 + np.array([n * n, n, 1], dtype=np.int64)[e_axis]

    # drop edge vertices no face uses (only possible for auxiliary centre edges)
    used = np.zeros(E + len(ucube), dtype=bool)
    used[faces.reshape(-1)] = True
    if not used[:E].all():
        keep_e = np.nonzero(used[:E])[0]
        # centre vertices still need every crossing edge of their cube: keep those too
        need = np.zeros(E, dtype=bool)
        need[keep_e] = True
        need[center_edges[center_edges >= 0]] = True
        keep_e = np.nonzero(need)[0]
        if len(keep_e) < E:
            new_idx = np.full(E, -1, dtype=np.int64)
            new_idx[keep_e] = np.arange(len(keep_e))
            vmap = np.concatenate([new_idx, len(keep_e) + np.arange(len(ucube))])
            faces = vmap[faces]
            center_edges = np.where(center_edges >= 0, new_idx[np.maximum(center_edges, 0)], -1)
            e_axis, e_p0, e_p1 = e_axis[keep_e], e_p0[keep_e], e_p1[keep_e]

    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).long()  # noqa: E731
    return MCTopology(grid, t(e_p0), t(e_p1), t(e_axis), t(center_edges), t(faces), big)


def finite_endpoints(s: torch.Tensor, big, iso: float = 0.0) -> torch.Tensor:
    """``s`` with NaN and +inf -> ``iso + big`` (outside), -inf -> ``iso - big``; gradient 1 where
    kept, 0 where replaced (as ``torch.nan_to_num``), and no host read when ``big`` is a tensor."""
    big = torch.as_tensor(big, dtype=s.dtype, device=s.device)
    s = torch.where(torch.isnan(s) | (s == float("inf")), iso + big, s)
    return torch.where(s == -float("inf"), iso - big, s)


def marching_cubes(sdf: torch.Tensor, bounds=(-1.01, 1.01), iso: float = 0.0, backend: str = "auto"):
    """Differentiable marching cubes.

    Args:
        sdf: ``[N, N, N]`` field, NEGATIVE inside, sampled at grid points that include both ends of
            ``bounds`` along every axis, axis order x, y, z (``sdf[i, j, k]`` at ``(x_i, y_j, z_k)``).
            NaN counts as outside.
        bounds: ``(lo, hi)`` symmetric world extent of the grid (default hy3dgen's ``box_v = 1.01``).
        iso: level of the surface.
        backend: the topology extractor (see :func:`extract_topology`).

    Returns:
        ``verts [V, 3]`` world coordinates (dtype/device of ``sdf``, differentiable w.r.t. the
        values at the two ends of every crossing edge only) and ``faces [F, 3]`` long, welded,
        counter-clockwise seen from outside. Empty ``(0, 3)`` tensors when nothing crosses ``iso``.
    """
    if sdf.dim() != 3 or not (sdf.shape[0] == sdf.shape[1] == sdf.shape[2]):
        raise ValueError(f"sdf must be [N, N, N], got {tuple(sdf.shape)}")
    grid = FieldGrid.from_bounds(sdf.shape[0], bounds)
    topo = extract_topology(sdf, grid, iso, backend)
    dev = sdf.device
    if topo.is_empty:
        return sdf.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=dev)
    flat = sdf.reshape(-1)
    # NaN / inf -> outside (finite); differentiable for the finite entries
    s0 = finite_endpoints(flat[topo.edge_p0.to(dev)], topo.outside_value, iso)
    s1 = finite_endpoints(flat[topo.edge_p1.to(dev)], topo.outside_value, iso)
    return topo.vertices(s0, s1, iso), topo.faces.to(dev)
