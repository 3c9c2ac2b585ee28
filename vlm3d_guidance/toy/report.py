"""``vlm3d-guide toy-eval``: the unguided-vs-guided experiment written as report.json/.md/.png."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..outputs import atomic_write_bytes, atomic_write_json, atomic_write_text, png_bytes
from .experiment import markdown_table, run_condition, summarize

TILE = 160


def mesh_tile(mesh, size: int = TILE):
    """PIL RGB clay render of ``mesh`` from the reference camera (grey tile when there is none)."""
    from PIL import Image

    from ..render import render_views
    from .references import reference_camera

    if mesh is None or len(mesh.faces) == 0:
        return Image.new("RGB", (size, size), (200, 200, 200))
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long)
    with torch.no_grad():
        img = render_views(verts, faces, reference_camera(), size=size, shading="clay", backend="torch")[0]
    return Image.fromarray(img.permute(1, 2, 0).mul(255).round().clamp(0, 255).to(torch.uint8).numpy())


def comparison_sheet(refs, columns: dict):
    """PIL image: one row per reference (reference, then one tile per condition); failures framed red.

    Args:
        refs: the references, in row order.
        columns: condition name -> rows (:class:`~vlm3d_guidance.toy.experiment.Row`, same order).
    """
    from PIL import Image, ImageDraw

    names = list(columns)
    head = 18
    sheet = Image.new("RGB", ((1 + len(names)) * TILE, head + len(refs) * TILE), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(["reference", *names]):
        draw.text((c * TILE + 4, 3), title, fill=(0, 0, 0))
    for r, ref in enumerate(refs):
        top = head + r * TILE
        white = Image.new("RGBA", ref.image.size, (255, 255, 255, 255))
        white.alpha_composite(ref.image.convert("RGBA"))
        sheet.paste(white.convert("RGB").resize((TILE, TILE)), (0, top))
        draw.text((4, top + 3), ref.name.split("-")[-1], fill=(0, 0, 0))
        for c, name in enumerate(names, start=1):
            row = columns[name][r]
            sheet.paste(mesh_tile(row.mesh), (c * TILE, top))
            colour = (200, 30, 30) if row.failed else (30, 150, 60)
            draw.rectangle([c * TILE, top, (c + 1) * TILE - 1, top + TILE - 1], outline=colour, width=3)
            label = (row.reason if row.failed else "ok") + f"  IoU {row.iou:.2f}"
            draw.text((c * TILE + 5, top + TILE - 14), label[:30], fill=colour)
    return sheet


def write_report(out_dir, refs, columns: dict, meta: dict) -> dict:
    """report.json (every row + summaries + meta), report.md (table) and report.png (rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {name: summarize(rows) for name, rows in columns.items()}
    report = dict(meta=meta, summaries=summaries,
                  rows={name: [r.to_dict() for r in rows] for name, rows in columns.items()})
    atomic_write_json(out / "report.json", report)
    md = ["# Toy world: unguided vs guided", "",
          f"{len(refs)} held-out references (split `{meta.get('split')}`, seed {meta.get('seed')}), "
          "the same sampler seed per reference in every condition; judged on the exported mesh.", "",
          markdown_table(summaries), ""]
    if "unguided" in summaries and "guided" in summaries:
        u, g = summaries["unguided"], summaries["guided"]
        ratio = g["failure_rate"] / u["failure_rate"] if u["failure_rate"] else math.nan
        md += [f"Guided / unguided failure rate: {ratio:.2f} (target <= 0.33); "
               f"IoU change {g['mean_iou'] - u['mean_iou']:+.3f} (target >= -0.01).", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    atomic_write_bytes(out / "report.png", png_bytes(comparison_sheet(refs, columns)))
    return report


def toy_eval(out_dir, count: int = 64, seed: int = 0, pipe=None, guided_overrides: dict | None = None,
             progress=None) -> dict:
    """Run the experiment on ``count`` test references and write the report into ``out_dir``."""
    from . import load_pipeline
    from .config import TOY_SAMPLING
    from .references import references

    pipe = pipe or load_pipeline()
    refs = references("test", count=count, seed=seed)
    start = time.perf_counter()
    columns = {
        "unguided": run_condition(pipe, refs, "unguided", dict(lam=0.0), progress=progress),
        "guided": run_condition(pipe, refs, "guided", dict(guided_overrides or {}), progress=progress),
    }
    meta = dict(split="test", seed=seed, count=count, guidance=pipe.config.to_dict() | (guided_overrides or {}),
                sampling=TOY_SAMPLING, torch_threads=torch.get_num_threads(),
                wall_seconds=round(time.perf_counter() - start, 1))
    return write_report(out_dir, refs, columns, meta)
