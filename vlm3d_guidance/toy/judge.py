"""The independent judge: geometry of the exported mesh against the intact ground truth.

It never looks at the critic. A mesh **fails** when

- a part floats: a connected component other than the largest holds more than
  :data:`FLOAT_AREA_SHARE` (1 %) of the surface area, or
- a part is missing: some ground-truth part has less than :data:`COVER_SHARE` (half) of its interior
  covered by the mesh's interior,

and the volumetric IoU with the intact object is measured too. Coverage and IoU use one fixed
lattice of the box (:data:`LATTICE` points per axis); inside-ness of the mesh is decided by ray
parity (:func:`inside_lattice`), so the mesh should be closed (marching-cubes exports are).
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT_AREA_SHARE = 0.01
COVER_SHARE = 0.5
LATTICE = 72  # lattice points per axis for coverage and IoU (spacing 0.028)
BOX_V = 1.01


def _components(mesh):
    """Connected components (by shared vertices after merging) with their areas, largest first."""
    merged = mesh.copy()
    merged.merge_vertices()
    parts = merged.split(only_watertight=False)
    areas = sorted((float(p.area) for p in parts), reverse=True)
    return parts, areas


def inside_lattice(mesh, axis: np.ndarray) -> np.ndarray:
    """Which points of the lattice ``axis x axis x axis`` lie inside the closed ``mesh``.

    Ray parity along +z, one ray per lattice column ``(x_i, y_j)``: every triangle is intersected
    with the columns inside its xy bounds, and a point is inside when an odd number of hits lie
    above it. The rays are offset by a tiny irrational amount so that none passes exactly through
    a marching-cubes edge or vertex.

    Args:
        mesh: closed ``trimesh.Trimesh`` (or None).
        axis: ``[N]`` increasing, evenly spaced coordinates.

    Returns:
        ``[N, N, N]`` bool, indexed ``[x, y, z]``.
    """
    n = len(axis)
    out = np.zeros((n, n, n), dtype=bool)
    if mesh is None or len(mesh.faces) == 0:
        return out
    step = float(axis[1] - axis[0])
    tri = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]  # [F, 3, 3]
    tri = tri - np.array([axis[0] - step * 1e-4 * np.pi, axis[0] - step * 1e-4 * np.e, axis[0]])
    tri /= step  # lattice units: column (i, j) sits at x = i, y = j; point k at z = k
    lo = np.clip(np.ceil(tri[:, :, :2].min(1)), 0, n).astype(np.int64)
    hi = np.clip(np.floor(tri[:, :, :2].max(1)), -1, n - 1).astype(np.int64)
    cnt = np.clip(hi - lo + 1, 0, None)
    per = cnt[:, 0] * cnt[:, 1]
    fid = np.repeat(np.arange(len(tri)), per)
    if len(fid) == 0:
        return out
    local = np.arange(len(fid)) - np.repeat(np.cumsum(per) - per, per)
    width = cnt[fid, 1]
    ci = lo[fid, 0] + local // width
    cj = lo[fid, 1] + local % width
    a, b, c = tri[fid, 0], tri[fid, 1], tri[fid, 2]
    px, py = ci.astype(np.float64), cj.astype(np.float64)

    def edge(p, q):
        return (q[:, 0] - p[:, 0]) * (py - p[:, 1]) - (q[:, 1] - p[:, 1]) * (px - p[:, 0])

    w0, w1, w2 = edge(b, c), edge(c, a), edge(a, b)
    area = w0 + w1 + w2
    hit = (((w0 >= 0) & (w1 >= 0) & (w2 >= 0)) | ((w0 <= 0) & (w1 <= 0) & (w2 <= 0))) & (np.abs(area) > 1e-12)
    z = (w0 * a[:, 2] + w1 * b[:, 2] + w2 * c[:, 2])[hit] / area[hit]
    ci, cj = ci[hit], cj[hit]
    k = np.clip(np.ceil(z), 0, n).astype(np.int64)  # lattice points 0..k-1 lie below the hit
    counts = np.zeros((n, n, n + 1), dtype=np.int64)
    np.add.at(counts, (ci, cj, np.zeros_like(k)), 1)
    np.add.at(counts, (ci, cj, k), -1)
    return (np.cumsum(counts, axis=2)[:, :, :n] % 2) == 1


def judge(mesh, reference) -> dict:
    """Judge an exported mesh against a reference's intact object.

    Args:
        mesh: ``trimesh.Trimesh`` in the sampler's box (what the pipeline exports), or None.
        reference: a :class:`~vlm3d_guidance.toy.references.Reference` (or any object with an
            ``object`` attribute holding a :class:`~vlm3d_guidance.toy.world.ToyObject`).

    Returns:
        dict with ``failed`` (bool), ``reason`` ("ok", "empty", "floating part", "missing <part>",
        or both joined by "; "), ``iou`` (float), ``floating_share`` (area share of all but the
        largest component), ``components`` (count), ``coverage`` (part name -> covered share),
        ``volume_ratio`` (the mesh's interior over the intact object's, on the same lattice: above 1
        the shape swelled, below 1 it thinned; it does not enter ``failed``).
    """
    obj = reference.object
    truth_parts = obj.intact_parts or obj.parts
    if mesh is None or len(getattr(mesh, "faces", ())) == 0:
        return dict(failed=True, reason="empty", iou=0.0, floating_share=0.0, components=0,
                    coverage={p.name: 0.0 for p in truth_parts}, volume_ratio=0.0)
    parts, areas = _components(mesh)
    total = sum(areas)
    floating = [a for a in areas[1:] if a > FLOAT_AREA_SHARE * total]
    floating_share = float(sum(areas[1:]) / total) if total > 0 else 0.0

    axis = np.linspace(-BOX_V, BOX_V, LATTICE)
    lattice = torch.as_tensor(np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3))
    pred = inside_lattice(mesh, axis).reshape(-1)
    part_inside = {p.name: p.sdf(lattice).numpy() < 0 for p in truth_parts}
    coverage = {name: float(pred[m].mean()) if m.any() else 1.0 for name, m in part_inside.items()}
    missing = [name for name, share in coverage.items() if share < COVER_SHARE]
    truth = np.logical_or.reduce(list(part_inside.values()))
    union = np.logical_or(truth, pred).sum()
    iou = float(np.logical_and(truth, pred).sum() / union) if union else 0.0
    volume_ratio = float(pred.sum() / truth.sum()) if truth.any() else float("nan")

    reasons = []
    if floating:
        reasons.append("floating part")
    if missing:
        reasons.append("missing " + ", ".join(missing))
    return dict(failed=bool(reasons), reason="; ".join(reasons) or "ok", iou=iou, floating_share=floating_share,
                components=len(parts), coverage=coverage, volume_ratio=volume_ratio)


def judge_surface(verts: torch.Tensor, faces: torch.Tensor, intact) -> dict:
    """:func:`judge` of a decoded surface (``verts [V, 3]``, ``faces [F, 3]``; no faces = empty)
    against the ``intact`` :class:`~vlm3d_guidance.toy.world.ToyObject` it was made from."""
    from types import SimpleNamespace

    import trimesh

    mesh = trimesh.Trimesh(verts.double().numpy(), faces.numpy(), process=True) if faces.shape[0] else None
    return judge(mesh, SimpleNamespace(object=intact))
