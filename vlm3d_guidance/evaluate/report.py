"""A ``vlm3d-guide`` output folder -> ``report.json``, ``report.md``, ``report.png`` (each atomically).

:func:`evaluate_folder` runs five steps, each its own function: load the folder (meshes, config,
prompt, the run's cameras), geometry (:mod:`.geometry`), critic rewards and CLIP similarity of the
clay views (:mod:`.scores`), write the three files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..outputs import atomic_write_bytes, atomic_write_json
from .geometry import _as_trimesh, mesh_metrics, metric_differences, pair_metrics
from .scores import QUERY_NAMES, clay_views, clip_similarity, critic_rewards

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


def find_mesh(folder: str | os.PathLike, stem: str) -> Path | None:
    """``<folder>/<stem>.<ext>`` for the first extension of :data:`MESH_EXTENSIONS` present."""
    for ext in MESH_EXTENSIONS:
        path = Path(folder) / f"{stem}.{ext}"
        if path.is_file():
            return path
    return None


def _cell(value: Any) -> str:
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
        return "(" + ", ".join(_cell(v) for v in value) + ")"
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
    return _cell(value)


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
        change = _cell(d) if name.startswith("chamfer") else _fmt_change(d)  # a distance, not a change
        lines.append(f"| {name} | {_cell(a)} | {_cell(b)} | {change} |")
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


def _load(folder: Path, prompt: str | None, num_views, elevation, fov) -> dict:
    """The folder's meshes, config, prompt and cameras (the run's own: ``config.json``'s "guidance",
    unless given; GuidanceConfig's defaults for a folder without one)."""
    from ..config import GuidanceConfig

    guided_path = find_mesh(folder, "mesh")
    if guided_path is None:
        raise FileNotFoundError(f"no mesh.{{{','.join(MESH_EXTENSIONS)}}} in {folder}")
    baseline_path = find_mesh(folder, "baseline")
    config: dict = {}
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    notes: list[str] = []
    meshes = {"guided": _as_trimesh(guided_path)}
    if baseline_path is not None:
        meshes["baseline"] = _as_trimesh(baseline_path)
    else:
        notes.append("no baseline mesh in the folder: guided metrics only")
    run = {**GuidanceConfig().to_dict(), **(config.get("guidance") or {})}
    cameras = dict(num_views=num_views or run["num_views"], elevation=run["elevation"] if elevation is None else elevation,
                   fov=run["fov"] if fov is None else fov)
    return dict(config=config, prompt=config.get("prompt") if prompt is None else prompt, meshes=meshes, notes=notes,
                cameras=cameras, names={"guided": guided_path.name,
                                        "baseline": baseline_path.name if baseline_path else None})


def _geometry(meshes: dict, chamfer_samples: int, seed: int) -> dict:
    """``metrics`` (baseline None without one), ``change`` and ``chamfer`` of the report."""
    if "baseline" in meshes:
        pair = pair_metrics(meshes["baseline"], meshes["guided"], chamfer_samples, seed)
        return dict(metrics={"baseline": pair["baseline"], "guided": pair["guided"]}, change=pair["change"],
                    chamfer=pair["chamfer"])
    return dict(metrics={"baseline": None, "guided": mesh_metrics(meshes["guided"])}, change={}, chamfer=None)


def _critic(critic: Any, views: dict, prompt: str, device: Any) -> tuple[dict, str | None]:
    """``({mesh name: {query: reward} or None}, critic model name or None)`` of the clay views."""
    name = None
    if isinstance(critic, (str, os.PathLike)):
        from ..critic import VLMCritic

        name = str(critic)
        critic = VLMCritic.from_pretrained(name, device=device)
    rewards = {mesh: (critic_rewards(None, critic, prompt, images=v) if v is not None else None)
               for mesh, v in views.items()}
    return rewards, name


def _clip(clip_model: Any, views: dict, prompt: str, device: Any) -> dict:
    """``{"model": label, mesh name: {"similarity", "clip_d"} or None}`` of the clay views."""
    label = clip_model if isinstance(clip_model, (str, os.PathLike)) else type(clip_model[0]).__name__
    clip: dict[str, Any] = {"model": str(label)}
    for name, v in views.items():
        if v is None:
            clip[name] = None
            continue
        sim = clip_similarity(v, prompt, clip_model, device=device)
        clip[name] = {"similarity": sim, "clip_d": 1.0 - sim}
    return clip


def _write(folder: Path, report: dict, views: dict) -> dict:
    """``report.png`` (when a mesh has views), ``report.md`` and ``report.json`` (last); the report's
    ``figure`` and ``paths`` are filled in here."""
    png_path = folder / "report.png"
    report["figure"] = None
    if any(v is not None for v in views.values()):
        atomic_write_bytes(png_path, _figure_png(views, report["prompt"] or ""))
        report["figure"] = str(png_path)
    else:
        report["notes"].append("both meshes are empty: no figure")
    json_path, md_path = folder / "report.json", folder / "report.md"
    report["paths"] = {"json": str(json_path), "md": str(md_path), "png": report["figure"]}
    atomic_write_bytes(md_path, report_markdown(report).encode("utf-8"))
    atomic_write_json(json_path, report)  # strict JSON: NaN/inf become null
    return report


def evaluate_folder(
    folder: str | os.PathLike,
    critic: Any = None,
    clip_model: Any = None,
    prompt: str | None = None,
    num_views: int | None = None,
    elevation: float | None = None,
    size: int = 224,
    chamfer_samples: int = 10000,
    seed: int = 0,
    device: Any = "cpu",
    fov: float | None = None,
) -> dict:
    """Evaluate a ``vlm3d-guide`` output folder and write its report next to the meshes.

    Expected layout: ``mesh.<ext>`` (the guided result; ext one of glb/obj/ply/stl), optional
    ``baseline.<ext>`` (``--compare``), ``config.json`` (at least ``"prompt"``; maybe
    ``"critic_model"`` and ``"guidance"``) and ``views.png`` (not read).

    Args:
        folder: the output folder.
        critic: a :class:`~vlm3d_guidance.critic.VLMCritic`, or a model folder / hub id loaded with
            ``VLMCritic.from_pretrained``; None skips the rewards.
        clip_model: a CLIP model folder / hub id (see :func:`clip_similarity`); None skips CLIP.
        prompt: the description; default ``config.json``'s ``"prompt"``.
        num_views, elevation, fov: the cameras of the clay views rendered for the critic, CLIP and
            the figure; default the run's own (``config.json``'s ``"guidance"``).
        size: the views' side in pixels.
        chamfer_samples, seed: the pair's chamfer distance sampling.
        device: where the views are rendered and a critic or CLIP model given by name is loaded.

    Returns:
        The report dict (also in ``report.json``): ``folder``, ``prompt``, ``config``, ``meshes``,
        ``cameras``, ``metrics`` (``baseline`` may be None), ``change``, ``chamfer``, ``rewards``,
        ``clip``, ``figure``, ``notes`` and ``paths`` (``json``, ``md``, ``png`` -- the latter None
        when no mesh has a surface). Each file is written atomically (temporary file + ``os.replace``).
    """
    folder = Path(folder)
    run = _load(folder, prompt, num_views, elevation, fov)
    prompt, notes, meshes = run["prompt"], run["notes"], run["meshes"]
    report: dict[str, Any] = {
        "folder": str(folder),
        "prompt": prompt,
        "config": run["config"],
        "critic_model": run["config"].get("critic_model") if critic is not None else None,
        "meshes": run["names"],
        "cameras": run["cameras"],
        **_geometry(meshes, chamfer_samples, seed),
    }
    if report["metrics"]["guided"].get("self_intersecting_faces") is None:
        notes.append("self-intersections not counted (pymeshlab unavailable)")

    # clay views, shared by the critic, CLIP and the figure
    views = {name: clay_views(m, size=size, device=device, **run["cameras"]) for name, m in meshes.items()}

    report["rewards"] = None
    if critic is not None and prompt:
        report["rewards"], name = _critic(critic, views, prompt, device)
        report["critic_model"] = name or report["critic_model"]
    elif critic is not None:
        notes.append("no prompt (argument or config.json): critic rewards skipped")

    report["clip"] = None
    if clip_model is not None and prompt:
        report["clip"] = _clip(clip_model, views, prompt, device)
    elif clip_model is not None:
        notes.append("no prompt (argument or config.json): CLIP similarity skipped")

    report["notes"] = notes
    return _write(folder, report, views)
