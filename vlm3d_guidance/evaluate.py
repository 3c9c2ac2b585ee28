"""Evaluation: what guidance changes in a mesh, measured on the raw output.

Four families of numbers, all plain Python values (JSON-ready):

- :func:`mesh_metrics` -- geometry of ONE mesh as the sampler produced it (no floater removal,
  no repair): connected components, floater area, watertightness, Euler characteristic and genus,
  self-intersecting faces (pymeshlab), area, signed volume, bounding box.
- :func:`pair_metrics` -- a (baseline, guided) pair made from the same image and seed: both metric
  dicts, their differences ``guided - baseline`` and a seeded symmetric chamfer distance.
- :func:`critic_rewards` -- the VLM critic's reward ``r = z_yes - z_no`` of a mesh's clay views under
  each query template (``dual``, ``content``, ``geometry``).
- :func:`clip_similarity` -- mean text-to-image cosine similarity with a CLIP model; the paper's
  CLIP-D is ``1 - similarity`` (lower is better).

:func:`evaluate_folder` runs them on a ``vlm3d-guide`` output folder and writes ``report.json``,
``report.md`` and ``report.png`` atomically next to the meshes.

Conventions
-----------
- Topology is measured after merging coincident vertices (exact position match) on a copy, so that
  a mesh exported with split vertices (per-face normals or UVs) is not counted as many pieces.
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
- Images are float tensors ``[N, 3, H, W]`` in ``[0, 1]`` unless said otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import trimesh

from .outputs import atomic_write_bytes, atomic_write_json

#: Query templates scored by :func:`critic_rewards`, in report order.
QUERY_NAMES = ("dual", "content", "geometry")

#: Mesh file extensions that :func:`evaluate_folder` looks for, in order of preference.
MESH_EXTENSIONS = ("glb", "obj", "ply", "stl")

#: Keys of :func:`mesh_metrics` shown in the Markdown table, in order.
_TABLE_KEYS = (
    "vertices",
    "faces",
    "components",
    "floater_area_ratio",
    "watertight",
    "euler_number",
    "genus",
    "self_intersecting_faces",
    "area",
    "volume",
    "bbox_min",
    "bbox_max",
)


# --------------------------------------------------------------------------------------------------
# geometry of one mesh
# --------------------------------------------------------------------------------------------------


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
    """Copy with exactly coincident vertices merged and index-degenerate faces dropped.

    Returns the new mesh and the number of faces dropped.
    """
    verts = np.asarray(mesh.vertices, dtype=np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0:
        return trimesh.Trimesh(), 0
    uniq, inverse = np.unique(verts, axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    ok = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    dropped = int((~ok).sum())
    faces = faces[ok]
    # keep referenced vertices only, so V in V - E + F counts what the faces use
    used = np.unique(faces.reshape(-1))
    remap = np.full(len(uniq), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return trimesh.Trimesh(vertices=uniq[used], faces=remap[faces], process=False), dropped


def _component_labels(mesh: trimesh.Trimesh) -> tuple[int, np.ndarray]:
    """Number of vertex-connected components and the component label of every face."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces, dtype=np.int64)
    n = len(mesh.vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    count, vertex_labels = connected_components(graph, directed=False)
    return int(count), vertex_labels[faces[:, 0]]


def _signed_volume(mesh: trimesh.Trimesh) -> float:
    """Sum over faces of ``det(v0, v1, v2) / 6``: the enclosed volume for a closed, outward-wound mesh."""
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


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
    out.update(
        components=count,
        largest_component_area=largest,
        floater_area_ratio=float(max(0.0, 1.0 - largest / total)) if total > 0 else 0.0,
        watertight=watertight,
        winding_consistent=winding,
        euler_number=euler,
        genus=int((2 * count - euler) // 2) if watertight else None,
        area=total,
        volume=_signed_volume(merged),
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
    squared), with ``samples`` points per mesh drawn with ``seed`` (deterministic). ``None`` when
    either mesh has no area.
    """
    from scipy.spatial import cKDTree

    a, b = _as_trimesh(a), _as_trimesh(b)
    if len(a.faces) == 0 or len(b.faces) == 0 or a.area <= 0 or b.area <= 0:
        return None
    rng = np.random.default_rng(seed)
    pa = _sample_surface(a, samples, rng)
    pb = _sample_surface(b, samples, rng)
    d_ab, _ = cKDTree(pb).query(pa)
    d_ba, _ = cKDTree(pa).query(pb)
    return float(d_ab.mean() + d_ba.mean())


def _sample_surface(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniformly distributed over the surface area, from ``rng``."""
    tri = np.asarray(mesh.triangles, dtype=np.float64)
    areas = np.asarray(mesh.area_faces, dtype=np.float64)
    face = rng.choice(len(tri), size=count, p=areas / areas.sum())
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    t = tri[face]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


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


# --------------------------------------------------------------------------------------------------
# rendering helpers (the render stage is imported lazily: evaluation of geometry works without it)
# --------------------------------------------------------------------------------------------------


def _images_from_render(result: Any):
    """The image tensor ``[N, 3, H, W]`` from whatever ``render_views`` returned."""
    import torch

    if isinstance(result, Mapping):
        for key in ("images", "image", "rgb", "color"):
            if key in result:
                result = result[key]
                break
    elif not isinstance(result, torch.Tensor) and hasattr(result, "images"):
        result = result.images
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        result = result[0]
    if not isinstance(result, torch.Tensor) or result.dim() != 4:
        raise TypeError(f"render_views returned {type(result).__name__}; expected images [N, 3, H, W]")
    if result.shape[1] not in (3, 4) and result.shape[-1] in (3, 4):
        result = result.permute(0, 3, 1, 2)
    return result[:, :3]


def render_clay_views(
    mesh: trimesh.Trimesh,
    num_views: int = 4,
    elevation: float = 20.0,
    size: int = 224,
    device: Any = "cpu",
    fill: float | None = 0.9,
):
    """Clay-shaded views of ``mesh`` on an orbit, as a float tensor ``[N, 3, size, size]`` in [0, 1].

    Uses :func:`vlm3d_guidance.render.orbit_cameras` and :func:`vlm3d_guidance.render.render_views`
    (imported here, so a missing render stage only disables the functions that need pixels). The
    mesh is rendered in its own frame (Hunyuan3D meshes live in ``[-1.01, 1.01]^3``), the orbit
    fitted to it as the critic's is during guidance (``fill`` of the image, see
    :class:`~vlm3d_guidance.config.GuidanceConfig`; None frames the whole box, the same cameras for
    every mesh). Coincident vertices are merged first (a welded mesh shades smoothly).
    """
    import torch

    from vlm3d_guidance.render import fit_to_points, orbit_cameras, render_views

    m, _ = _merged(_as_trimesh(mesh))  # welded: smooth clay shading and silhouette antialias
    verts = torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32, device=device).reshape(-1, 3)
    faces = torch.as_tensor(np.asarray(m.faces), dtype=torch.long, device=device).reshape(-1, 3)
    cams = orbit_cameras(num_views=num_views, elevation=elevation, device=device)
    if fill is not None and len(verts):
        cams = fit_to_points(cams, verts, fill)
    with torch.no_grad():
        images = _images_from_render(render_views(verts, faces, cams, size=size, shading="clay"))
    return images.detach().float().clamp(0.0, 1.0)


def _to_float(value: Any) -> float:
    """A Python float from a reward: a number, a one-element tensor, or an object with ``.reward``."""
    import torch

    for attr in ("reward", "value", "r"):
        if not isinstance(value, (torch.Tensor, float, int)) and hasattr(value, attr):
            value = getattr(value, attr)
            break
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item())
    return float(value)


def _model_device(model: Any):
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def critic_rewards(
    mesh: trimesh.Trimesh,
    critic: Any,
    prompt: str,
    num_views: int = 4,
    elevation: float = 20.0,
    size: int = 224,
    queries: Iterable[str] = QUERY_NAMES,
    images: Any = None,
) -> dict:
    """The critic's reward ``r = z_yes - z_no`` of the mesh's clay views under each query template.

    Args:
        mesh: the mesh to score.
        critic: a :class:`vlm3d_guidance.critic.VLMCritic`. One critic per query is built sharing its
            ``model`` and ``processor`` (``VLMCritic(model, processor, query=name,
            reward_mode="logit")``); no weights are copied.
        prompt: the text description filled into the templates.
        num_views, elevation, size: the orbit rendered (``size`` should be a multiple of 28 for
            Qwen-VL critics, see DESIGN.md).
        queries: template names, default ``("dual", "content", "geometry")``.
        images: already rendered views ``[N, 3, H, W]`` in [0, 1] to score instead of rendering.

    Returns:
        ``{name: float}`` for each query; evaluated without gradients.
    """
    import torch

    from vlm3d_guidance.critic import VLMCritic

    device = _model_device(critic.model)
    if images is None:
        images = render_clay_views(mesh, num_views, elevation, size, device=device)
    else:
        images = torch.as_tensor(images, dtype=torch.float32).to(device)
    out: dict[str, float] = {}
    for name in queries:
        scorer = VLMCritic(critic.model, critic.processor, query=name, reward_mode="logit")
        with torch.no_grad():
            out[name] = _to_float(scorer.reward(images, prompt))
    return out


# --------------------------------------------------------------------------------------------------
# CLIP text-to-image similarity
# --------------------------------------------------------------------------------------------------

#: Models loaded by name, per (name, device): ``(model, processor)``; open_clip entries hold
#: ``(model, (preprocess, tokenizer))`` under ``"open_clip:<spec>"``.
_CLIP_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def _load_clip(clip_model: Any, device: Any = "cpu"):
    """``(model, processor)`` from a local folder / hub id (cached per name and device) or a given pair."""
    if isinstance(clip_model, tuple):
        return clip_model
    key = (str(clip_model), str(device))
    if key not in _CLIP_CACHE:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(key[0]).to(device).eval()
        processor = CLIPProcessor.from_pretrained(key[0])
        _CLIP_CACHE[key] = (model, processor)
    return _CLIP_CACHE[key]


def _to_pil_list(images: Any) -> list:
    """PIL RGB images from a tensor/array ``[N, 3, H, W]`` in [0, 1] or a list of PIL images."""
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, (list, tuple)) and all(isinstance(i, Image.Image) for i in images):
        return [i.convert("RGB") for i in images]
    try:
        import torch

        if isinstance(images, torch.Tensor):
            images = images.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected images [N, 3, H, W] in [0, 1], got shape {arr.shape}")
    arr = np.clip(arr[:, :3], 0.0, 1.0)
    if arr.shape[1] == 1:
        arr = np.repeat(arr, 3, axis=1)
    u8 = np.round(arr * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(x) for x in u8]


def clip_similarity(images: Any, text: str, clip_model: Any, device: Any = "cpu") -> float:
    """Mean cosine similarity between each image and ``text`` under a CLIP model.

    Args:
        images: float ``[N, 3, H, W]`` in [0, 1] (tensor or array; quantised to 8 bits like a saved
            render) or a list of PIL images.
        text: the description.
        clip_model: a local folder or hub id loadable by transformers' ``CLIPModel`` /
            ``CLIPProcessor``, an ``open_clip:<architecture>/<pretrained>`` spec when open_clip
            is installed, or a ready ``(model, processor)`` pair of transformers objects. Models
            loaded by name are cached for the process.
        device: where a model loaded by name runs.

    Returns:
        ``mean_i cos(f_img(x_i), f_txt(text))``. CLIP-D in the paper's spirit is ``1 - similarity``.
    """
    import torch

    pil = _to_pil_list(images)
    if isinstance(clip_model, str) and clip_model.startswith("open_clip:"):
        return _open_clip_similarity(pil, text, clip_model[len("open_clip:"):], device)
    model, processor = _load_clip(clip_model, device)
    device = _model_device(model)
    # CLIP's text tower has a fixed number of positions (77 for the released models): truncate a
    # long description to it, as open_clip's tokenizer does, instead of failing inside the model.
    max_length = getattr(getattr(getattr(model, "config", None), "text_config", None), "max_position_embeddings", None)
    inputs = processor(text=[text], images=pil, return_tensors="pt", padding=True,
                       truncation=max_length is not None, max_length=max_length)
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = model(**inputs)
    img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
    return float((img @ txt[0]).mean().item())


def _open_clip_similarity(pil: list, text: str, spec: str, device: Any = "cpu") -> float:
    """The same number with open_clip (``spec`` = ``architecture/pretrained``, e.g. ``ViT-B-32/openai``)."""
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("open_clip is not installed: pip install 'vlm3d-guidance[clip]'") from exc
    import torch

    key = ("open_clip:" + spec, str(device))
    if key not in _CLIP_CACHE:
        arch, _, pretrained = spec.partition("/")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        _CLIP_CACHE[key] = (model.to(device).eval(), (preprocess, open_clip.get_tokenizer(arch)))
    model, (preprocess, tokenizer) = _CLIP_CACHE[key]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]).to(device))
        txt = model.encode_text(tokenizer([text]).to(device))
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    return float((img @ txt[0]).mean().item())


# --------------------------------------------------------------------------------------------------
# a CLI output folder -> report.json, report.md, report.png
# --------------------------------------------------------------------------------------------------


def find_mesh(folder: str | os.PathLike, stem: str) -> Path | None:
    """``<folder>/<stem>.<ext>`` for the first extension of :data:`MESH_EXTENSIONS` present."""
    for ext in MESH_EXTENSIONS:
        path = Path(folder) / f"{stem}.{ext}"
        if path.is_file():
            return path
    return None


def _fmt(value: Any) -> str:
    """One Markdown table cell."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0.0:
            return "0"
        return f"{v:.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value).replace("|", "\\|")


def _fmt_change(value: Any) -> str:
    """A signed change cell."""
    if value is None:
        return "–"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt_change(v) for v in value) + ")"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):+d}" if value else "0"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0.0:
            return "0"
        return f"{v:+.4g}" if 1e-3 <= abs(v) < 1e5 else f"{v:+.3e}"
    return _fmt(value)


def _change(a: Any, b: Any) -> Any:
    """``b - a`` when both are numbers (bools as 0/1) or equal-length number lists, else None."""
    d = metric_differences({"x": a}, {"x": b})
    return d.get("x")


def _table_rows(report: Mapping[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """``(metric, baseline, guided, change)`` rows of the report table."""
    metrics = report.get("metrics", {})
    base, guided = metrics.get("baseline"), metrics.get("guided") or {}
    rows = []
    for key in _TABLE_KEYS:
        a = base.get(key) if base else None
        b = guided.get(key)
        rows.append((key, a, b, _change(a, b) if base else None))
    if report.get("chamfer") is not None:
        rows.append(("chamfer distance (baseline to guided)", None, None, report["chamfer"]))
    rewards = report.get("rewards") or {}
    for name in QUERY_NAMES:
        a = (rewards.get("baseline") or {}).get(name)
        b = (rewards.get("guided") or {}).get(name)
        if a is not None or b is not None:
            rows.append((f"critic reward ({name})", a, b, _change(a, b)))
    clip = report.get("clip") or {}
    for key, label in (("similarity", "CLIP similarity"), ("clip_d", "CLIP-D (1 - similarity)")):
        a = (clip.get("baseline") or {}).get(key)
        b = (clip.get("guided") or {}).get(key)
        if a is not None or b is not None:
            rows.append((label, a, b, _change(a, b)))
    return rows


def report_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown report: a header, the ``metric | baseline | guided | change`` table and notes."""
    lines = [f"# Evaluation of `{report.get('folder', '')}`", ""]
    if report.get("prompt"):
        lines += [f"Prompt: {report['prompt']}", ""]
    if report.get("critic_model"):
        lines += [f"Critic model: `{report['critic_model']}`", ""]
    if (report.get("clip") or {}).get("model"):
        lines += [f"CLIP model: `{report['clip']['model']}`", ""]
    lines += ["| metric | baseline | guided | change |", "|---|---|---|---|"]
    for name, a, b, d in _table_rows(report):
        change = _fmt(d) if name.startswith("chamfer") else _fmt_change(d)  # a distance, not a change
        lines.append(f"| {name} | {_fmt(a)} | {_fmt(b)} | {change} |")
    lines.append("")
    lines.append(
        "Geometry is measured on the raw meshes (no floater removal) after merging coincident "
        "vertices; change = guided - baseline; genus is given for watertight meshes only."
    )
    if report.get("figure"):
        lines += ["", f"![clay views]({Path(report['figure']).name})"]
    notes = report.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _figure_png(views: Mapping[str, Any], title: str = "") -> bytes:
    """PNG bytes of a grid: one row per mesh (``baseline`` then ``guided``), one column per view."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [(name, views[name]) for name in ("baseline", "guided") if views.get(name) is not None]
    ncols = max(int(v.shape[0]) for _, v in rows)
    fig = Figure(figsize=(2.2 * ncols, 2.3 * len(rows) + (0.3 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        arr = np.asarray(imgs.detach().cpu().float().numpy() if hasattr(imgs, "detach") else imgs)
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():  # a light frame: clay views have a white background
                spine.set_edgecolor("0.85")
            if c < arr.shape[0]:
                ax.imshow(np.clip(arr[c, :3].transpose(1, 2, 0), 0.0, 1.0))
            if c == 0:
                ax.set_ylabel(name, fontsize=12)
    if title:
        fig.suptitle(title[:120], fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def evaluate_folder(
    folder: str | os.PathLike,
    critic: Any = None,
    clip_model: Any = None,
    prompt: str | None = None,
    num_views: int = 4,
    elevation: float = 20.0,
    size: int = 224,
    chamfer_samples: int = 10000,
    seed: int = 0,
    device: Any = "cpu",
) -> dict:
    """Evaluate a ``vlm3d-guide`` output folder and write its report next to the meshes.

    Expected layout: ``mesh.<ext>`` (the guided result; ext one of glb/obj/ply/stl), optional
    ``baseline.<ext>`` (``--compare``), ``config.json`` (at least ``"prompt"``; maybe
    ``"critic_model"``) and ``views.png`` (not read).

    Args:
        folder: the output folder.
        critic: a :class:`~vlm3d_guidance.critic.VLMCritic`, or a model folder / hub id loaded with
            ``VLMCritic.from_pretrained``; None skips the rewards.
        clip_model: a CLIP model folder / hub id (see :func:`clip_similarity`); None skips CLIP.
        prompt: the description; default ``config.json``'s ``"prompt"``.
        num_views, elevation, size: the clay views rendered for the critic, CLIP and the figure.
        chamfer_samples, seed: the pair's chamfer distance sampling.
        device: where a critic or CLIP model given by name is loaded.

    Returns:
        The report dict (also in ``report.json``): ``folder``, ``prompt``, ``config``, ``meshes``,
        ``metrics`` (``baseline`` may be None), ``change``, ``chamfer``, ``rewards``, ``clip``,
        ``figure``, ``notes`` and ``paths`` (``json``, ``md``, ``png`` -- the latter None when the
        figure was skipped). Each file is written atomically (temporary file + ``os.replace``).
    """
    folder = Path(folder)
    guided_path = find_mesh(folder, "mesh")
    if guided_path is None:
        raise FileNotFoundError(f"no mesh.{{{','.join(MESH_EXTENSIONS)}}} in {folder}")
    baseline_path = find_mesh(folder, "baseline")
    config: dict = {}
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    if prompt is None:
        prompt = config.get("prompt")
    notes: list[str] = []

    meshes = {"guided": _as_trimesh(guided_path)}
    if baseline_path is not None:
        meshes["baseline"] = _as_trimesh(baseline_path)
    else:
        notes.append("no baseline mesh in the folder: guided metrics only")

    report: dict[str, Any] = {
        "folder": str(folder),
        "prompt": prompt,
        "config": config,
        "critic_model": config.get("critic_model") if critic is not None else None,
        "meshes": {"guided": guided_path.name, "baseline": baseline_path.name if baseline_path else None},
    }
    if "baseline" in meshes:
        pair = pair_metrics(meshes["baseline"], meshes["guided"], chamfer_samples, seed)
        report["metrics"] = {"baseline": pair["baseline"], "guided": pair["guided"]}
        report["change"], report["chamfer"] = pair["change"], pair["chamfer"]
    else:
        report["metrics"] = {"baseline": None, "guided": mesh_metrics(meshes["guided"])}
        report["change"], report["chamfer"] = {}, None
    if report["metrics"]["guided"].get("self_intersecting_faces") is None:
        notes.append("self-intersections not counted (pymeshlab unavailable)")

    # clay views, shared by the critic, CLIP and the figure
    views: dict[str, Any] = {}
    try:
        for name, m in meshes.items():
            views[name] = render_clay_views(m, num_views, elevation, size) if len(m.faces) else None
    except ImportError as exc:
        views = {}
        notes.append(f"render stage not importable ({exc}): no figure, rewards or CLIP")

    report["rewards"] = None
    if critic is not None and prompt and views:
        if isinstance(critic, (str, os.PathLike)):
            from vlm3d_guidance.critic import VLMCritic

            report["critic_model"] = str(critic)
            critic = VLMCritic.from_pretrained(str(critic), device=device)
        report["rewards"] = {
            name: (critic_rewards(meshes[name], critic, prompt, images=v) if v is not None else None)
            for name, v in views.items()
        }
    elif critic is not None and not prompt:
        notes.append("no prompt (argument or config.json): critic rewards skipped")

    report["clip"] = None
    if clip_model is not None and prompt and views:
        label = clip_model if isinstance(clip_model, (str, os.PathLike)) else type(clip_model[0]).__name__
        clip: dict[str, Any] = {"model": str(label)}
        for name, v in views.items():
            if v is None:
                clip[name] = None
                continue
            sim = clip_similarity(v, prompt, clip_model, device=device)
            clip[name] = {"similarity": sim, "clip_d": 1.0 - sim}
        report["clip"] = clip
    elif clip_model is not None and not prompt:
        notes.append("no prompt (argument or config.json): CLIP similarity skipped")

    png_path = folder / "report.png"
    report["figure"] = None
    if views and any(v is not None for v in views.values()):
        atomic_write_bytes(png_path, _figure_png(views, prompt or ""))
        report["figure"] = str(png_path)
    elif views:
        notes.append("both meshes are empty: no figure")

    report["notes"] = notes
    json_path, md_path = folder / "report.json", folder / "report.md"
    report["paths"] = {"json": str(json_path), "md": str(md_path), "png": report["figure"]}
    atomic_write_bytes(md_path, report_markdown(report).encode("utf-8"))
    atomic_write_json(json_path, report)  # strict JSON: NaN/inf become null
    return report
