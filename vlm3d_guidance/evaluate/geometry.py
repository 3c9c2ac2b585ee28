"""Geometry of meshes as the sampler produced them: one mesh's metrics, a (baseline, guided) pair.

- :func:`mesh_metrics` -- connected components, floater area, watertightness, Euler characteristic
  and genus, self-intersecting faces (pymeshlab), area, signed volume, bounding box.
- :func:`pair_metrics` -- both metric dicts, their differences ``guided - baseline`` and a seeded
  symmetric chamfer distance (:func:`chamfer_distance`).

Conventions
-----------
- Topology is measured after merging coincident vertices (trimesh's ``merge_vertices``: equal
  positions after rounding to ``trimesh.tol.merge``, 1e-8) on a copy, so that a mesh exported with
  split vertices (per-face normals or UVs) is not counted as many pieces.
  Faces that become index-degenerate by the merge (two equal corner indices) are dropped and
  counted in ``degenerate_faces``. Nothing else is repaired.
- Components are connected through shared vertices (two triangles touching at one corner are one
  component). Unreferenced vertices are ignored.
- ``euler_number`` is ``V - E + F`` over referenced vertices, unique undirected edges and faces.
  ``genus`` is the TOTAL genus ``(2 * components - euler_number) / 2`` and is reported only for a
  watertight mesh (closed, every edge shared by exactly two faces); it is ``None`` otherwise.
- ``volume`` is trimesh's signed divergence-theorem volume (negative for inward-facing winding).
  It is only meaningful for a closed mesh; ``volume_reliable`` says whether the mesh is watertight
  with consistent winding.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import trimesh


def _as_trimesh(mesh: Any) -> trimesh.Trimesh:
    """A plain ``Trimesh`` (positions and faces only) from a Trimesh, a Scene or a path."""
    if isinstance(mesh, (str, os.PathLike)):
        mesh = trimesh.load(str(mesh), process=False)
    if isinstance(mesh, trimesh.Scene):
        geoms = [g for g in mesh.dump() if isinstance(g, trimesh.Trimesh)] if mesh.geometry else []
        mesh = trimesh.util.concatenate(geoms) if geoms else trimesh.Trimesh()
    if not isinstance(mesh, trimesh.Trimesh):
        raise TypeError(f"expected a trimesh.Trimesh, a Scene or a mesh path, got {type(mesh).__name__}")
    verts = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    return trimesh.Trimesh(vertices=verts, faces=faces, process=False)


def _merged(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, int]:
    """Copy with coincident vertices merged (trimesh), index-degenerate faces dropped and unreferenced
    vertices removed (so V in V - E + F counts what the faces use).

    Returns the new mesh and the number of faces dropped.
    """
    if len(mesh.faces) == 0:
        return trimesh.Trimesh(), 0
    merged = trimesh.Trimesh(vertices=np.asarray(mesh.vertices, dtype=np.float64) + 0.0,  # -0.0 -> 0.0
                             faces=np.asarray(mesh.faces, dtype=np.int64), process=False)
    merged.merge_vertices()
    faces = merged.faces
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    merged.update_faces(ok)
    merged.remove_unreferenced_vertices()
    return merged, int((~ok).sum())


def _component_labels(mesh: trimesh.Trimesh) -> tuple[int, np.ndarray]:
    """Number of vertex-connected components and the component label of every face."""
    vertex_labels = trimesh.graph.connected_component_labels(mesh.edges, node_count=len(mesh.vertices))
    return int(vertex_labels.max()) + 1, vertex_labels[np.asarray(mesh.faces)[:, 0]]


def count_self_intersecting_faces(mesh: trimesh.Trimesh) -> int | None:
    """Faces that intersect a non-adjacent face, by pymeshlab's per-face self-intersection selection.

    Returns ``None`` when pymeshlab is missing or fails. Faces that only share a vertex or an edge
    do not count. Use on a vertex-merged mesh (see :func:`mesh_metrics`), else faces that touch
    through duplicated vertices may be counted.
    """
    if len(mesh.faces) == 0:
        return 0
    try:
        import pymeshlab
    except Exception:  # noqa: BLE001 - an optional dependency; any import failure means "absent"
        return None
    try:
        ms = pymeshlab.MeshSet()
        ms.add_mesh(
            pymeshlab.Mesh(
                vertex_matrix=np.ascontiguousarray(mesh.vertices, dtype=np.float64),
                face_matrix=np.ascontiguousarray(mesh.faces, dtype=np.int32),
            )
        )
        ms.compute_selection_by_self_intersections_per_face()
        return int(ms.current_mesh().selected_face_number())
    except Exception:  # noqa: BLE001 - report "unknown" rather than fail an evaluation
        return None


def mesh_metrics(mesh: trimesh.Trimesh, self_intersections: bool = True) -> dict:
    """Geometry metrics of a raw mesh (no floater removal, no repair).

    Args:
        mesh: the mesh (a ``trimesh.Scene`` or a file path is accepted too; a scene is flattened).
        self_intersections: count self-intersecting faces with pymeshlab (the slowest metric:
            skip it on huge meshes by passing False; the key is then ``None``).

    Returns:
        A dict of plain Python values:
        ``vertices``, ``faces`` (of the mesh as given); ``merged_vertices``, ``degenerate_faces``
        (after merging coincident vertices); ``components``; ``largest_component_area``;
        ``floater_area_ratio`` (area outside the largest-area component / total area, 0 for an
        empty mesh); ``watertight``; ``winding_consistent``; ``euler_number``; ``genus`` (total
        genus, None unless watertight); ``area``; ``volume`` (signed); ``volume_reliable``;
        ``bbox_min``, ``bbox_max`` (lists of 3 floats, None when empty);
        ``self_intersecting_faces`` (int, or None when pymeshlab is absent or skipped).
        See the module docstring for the exact conventions.
    """
    raw = _as_trimesh(mesh)
    out: dict[str, Any] = {"vertices": int(len(raw.vertices)), "faces": int(len(raw.faces))}
    merged, dropped = _merged(raw)
    out["merged_vertices"] = int(len(merged.vertices))
    out["degenerate_faces"] = dropped
    if len(merged.faces) == 0:
        out.update(
            components=0,
            largest_component_area=0.0,
            floater_area_ratio=0.0,
            watertight=False,
            winding_consistent=False,
            euler_number=0,
            genus=None,
            area=0.0,
            volume=0.0,
            volume_reliable=False,
            bbox_min=None,
            bbox_max=None,
            self_intersecting_faces=0 if self_intersections else None,
        )
        return out

    count, face_labels = _component_labels(merged)
    face_areas = np.asarray(merged.area_faces, dtype=np.float64)
    comp_areas = np.bincount(face_labels, weights=face_areas, minlength=count)
    total = float(face_areas.sum())
    largest = float(comp_areas.max())
    watertight = bool(merged.is_watertight)
    winding = bool(merged.is_winding_consistent)
    euler = int(merged.euler_number)
    bounds = np.asarray(merged.bounds, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # trimesh divides by it for the centre of mass
        volume = float(merged.volume)  # signed: negative for inward winding
    out.update(
        components=count,
        largest_component_area=largest,
        floater_area_ratio=float(max(0.0, 1.0 - largest / total)) if total > 0 else 0.0,
        watertight=watertight,
        winding_consistent=winding,
        euler_number=euler,
        genus=int((2 * count - euler) // 2) if watertight else None,
        area=total,
        volume=volume,
        volume_reliable=bool(watertight and winding),
        bbox_min=[float(x) for x in bounds[0]],
        bbox_max=[float(x) for x in bounds[1]],
        self_intersecting_faces=count_self_intersecting_faces(merged) if self_intersections else None,
    )
    return out


# --------------------------------------------------------------------------------------------------
# a (baseline, guided) pair
# --------------------------------------------------------------------------------------------------


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def metric_differences(baseline: Mapping[str, Any], guided: Mapping[str, Any]) -> dict:
    """``guided - baseline`` for every key whose values are numbers (or equal-length number lists).

    Booleans count as numbers here (``True - False = 1``) so that a change of watertightness shows.
    Keys where either side is None or not numeric are left out.
    """
    diff: dict[str, Any] = {}
    for key in baseline:
        if key not in guided:
            continue
        a, b = baseline[key], guided[key]
        if isinstance(a, bool) and isinstance(b, bool):
            diff[key] = int(b) - int(a)
        elif _numeric(a) and _numeric(b):
            diff[key] = b - a
        elif (
            isinstance(a, (list, tuple))
            and isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_numeric(x) for x in (*a, *b))
        ):
            diff[key] = [y - x for x, y in zip(a, b)]
    return diff


def chamfer_distance(a: trimesh.Trimesh, b: trimesh.Trimesh, samples: int = 10000, seed: int = 0) -> float | None:
    """Symmetric chamfer distance between area-uniform surface samples of two meshes.

    ``mean_{p in A} min_{q in B} |p - q| + mean_{q in B} min_{p in A} |q - p|`` (Euclidean, not
    squared), with ``samples`` area-uniform points per mesh (trimesh) drawn with ``seed``
    (deterministic). ``None`` when
    either mesh has no area.
    """
    from scipy.spatial import cKDTree

    a, b = _as_trimesh(a), _as_trimesh(b)
    if len(a.faces) == 0 or len(b.faces) == 0 or a.area <= 0 or b.area <= 0:
        return None
    rng = np.random.default_rng(seed)
    pa, _ = trimesh.sample.sample_surface(a, samples, seed=rng)
    pb, _ = trimesh.sample.sample_surface(b, samples, seed=rng)
    d_ab, _ = cKDTree(pb).query(pa)
    d_ba, _ = cKDTree(pa).query(pb)
    return float(d_ab.mean() + d_ba.mean())


def pair_metrics(
    baseline: trimesh.Trimesh | Mapping[str, Any],
    guided: trimesh.Trimesh | Mapping[str, Any],
    chamfer_samples: int = 10000,
    seed: int = 0,
) -> dict:
    """Metrics of a (baseline, guided) pair made from the same image and seed.

    Args:
        baseline, guided: meshes (or already computed :func:`mesh_metrics` dicts; then no chamfer).
        chamfer_samples: surface points per mesh for the chamfer distance.
        seed: sampling seed (the result is deterministic for a given seed).

    Returns:
        ``{"baseline": {...}, "guided": {...}, "change": {key: guided - baseline},
        "chamfer": float | None}``.
    """
    meshes = not isinstance(baseline, Mapping) and not isinstance(guided, Mapping)
    mb = dict(baseline) if isinstance(baseline, Mapping) else mesh_metrics(baseline)
    mg = dict(guided) if isinstance(guided, Mapping) else mesh_metrics(guided)
    chamfer = chamfer_distance(baseline, guided, chamfer_samples, seed) if meshes else None
    return {"baseline": mb, "guided": mg, "change": metric_differences(mb, mg), "chamfer": chamfer}
