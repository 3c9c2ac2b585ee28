"""What a run leaves for people to look at: meshes, a contact sheet of views, the reward trace.

Every file is written atomically: the bytes go to a temporary file in the destination folder,
which is then renamed over the destination with ``os.replace``. A crash or Ctrl-C leaves either
the previous file or the complete new one, never a half-written one (a stray ``.<name>.*.tmp``
can remain only if the process is killed with SIGKILL between the two steps).

Functions here take plain values (trimesh meshes, ``StepRecord`` lists or their dicts) and are
used by the CLI and the example notebooks alike.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

#: Mesh formats the CLI writes (trimesh exporters), the first is the default.
MESH_FORMATS = ("glb", "obj", "ply", "stl")


def _read_umask() -> int:
    """The process umask; POSIX can only read it by setting it, so this runs once, at import."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


# --------------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """Strict JSON (a NaN or infinity is written as null, which every JSON reader accepts)."""
    text = json.dumps(_strict(value), indent=2, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _strict(value: Any):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _json_default(value: Any):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return _strict(value.item())
        if isinstance(value, np.ndarray):
            return _strict(value.tolist())
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return _strict(value.to_dict())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# meshes
# --------------------------------------------------------------------------------------------------


def mesh_bytes(mesh, fmt: str = "glb") -> bytes:
    """The file content of ``mesh`` (a ``trimesh.Trimesh``) in ``fmt`` (one of :data:`MESH_FORMATS`)."""
    if fmt not in MESH_FORMATS:
        raise ValueError(f"format must be one of {', '.join(MESH_FORMATS)} (got {fmt!r})")
    data = mesh.export(file_type=fmt)
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def write_mesh(path: str | os.PathLike, mesh, fmt: str | None = None) -> Path:
    """Write ``mesh`` atomically; ``fmt`` defaults to the file's extension."""
    path = Path(path)
    return atomic_write_bytes(path, mesh_bytes(mesh, fmt or path.suffix.lstrip(".").lower()))


# --------------------------------------------------------------------------------------------------
# views and the contact sheet
# --------------------------------------------------------------------------------------------------


def render_mesh_views(mesh, num_views: int = 4, elevation: float = 20.0, fov: float = 40.0,
                      size: int = 256, box_v: float = 1.01, device="cpu", backend: str = "auto",
                      fill: float | None = 0.9):
    """Clay views of ``mesh`` from the critic's orbit: float tensor ``[N, 3, size, size]`` in [0, 1].

    The mesh is rendered in its own frame (Hunyuan3D meshes live in ``[-box_v, box_v]^3``) by the
    same cameras the critic uses during guidance, fitted to the mesh as the critic's are
    (``fill``, see :class:`~vlm3d_guidance.config.GuidanceConfig`; None frames the whole box).
    ``None`` or an empty mesh gives ``None``.
    """
    import numpy as np
    import torch

    from .render import fit_to_points, orbit_cameras, render_views

    if mesh is None or len(getattr(mesh, "faces", ())) == 0:
        return None
    verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long, device=device)
    cams = orbit_cameras(num_views=num_views, elevation=elevation, fov=fov, device=device, bounds=box_v)
    if fill is not None:
        cams = fit_to_points(cams, verts, fill)
    with torch.no_grad():
        images = render_views(verts, faces, cams, size=size, shading="clay", backend=backend)
    return images.detach().float().clamp(0.0, 1.0).cpu()


def contact_sheet(rows: Sequence[tuple[str, Any]], num_views: int, size: int):
    """A PIL image: one row of ``num_views`` tiles (``size`` px square) per ``(label, images)``.

    ``images`` is ``[N, 3, H, W]`` in [0, 1] (resized to ``size`` if needed) or None (a grey row
    marked "no surface"). The label is drawn in the top-left corner of the row's first tile. The
    sheet is exactly ``num_views * size`` wide and ``len(rows) * size`` high.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    sheet = Image.new("RGB", (num_views * size, max(1, len(rows)) * size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * size
        if images is None:
            draw.rectangle([0, top, num_views * size - 1, top + size - 1], fill=(200, 200, 200))
            draw.text((6, top + size // 2), "no surface", fill=(0, 0, 0))
        else:
            for i in range(min(num_views, images.shape[0])):
                arr = (images[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
                tile = Image.fromarray(arr)
                if tile.size != (size, size):
                    tile = tile.resize((size, size), Image.BICUBIC)
                sheet.paste(tile, (i * size, top))
        if label:
            box = draw.textbbox((4, top + 3), label)
            draw.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(255, 255, 255))
            draw.text((4, top + 3), label, fill=(20, 20, 20))
    return sheet


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# the reward trace
# --------------------------------------------------------------------------------------------------


def trace_records(trace: Iterable[Any]) -> list[dict]:
    """``StepRecord`` objects (or their dicts) as plain dicts."""
    return [rec.to_dict() if hasattr(rec, "to_dict") else dict(rec) for rec in trace]


def trace_figure(trace: Iterable[Any], final_rewards: dict | None = None, title: str = "", item: int = 0):
    """A matplotlib ``Figure``: the critic's reward per sampling step and the scheduled lambda.

    Args:
        trace: ``GuidedOutput.trace`` (or ``trace.json``'s ``"records"``).
        final_rewards: optional ``{"guided": r, "baseline": r}``: the reward of each final latent,
            drawn as horizontal lines (the baseline is unguided, so it has no per-step trace).
        item: which batch item's reward to plot.
    """
    from matplotlib.figure import Figure

    records = trace_records(trace)
    steps = [rec["step"] for rec in records]
    rewards = [_item(rec.get("reward"), item) for rec in records]
    lams = [rec.get("lam", 0.0) for rec in records]
    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = [s for s, r in zip(steps, rewards) if r is not None]
    ys = [r for r in rewards if r is not None]
    ax.plot(xs, ys, "o-", color="tab:blue", label="reward of the clean-latent estimate")
    colors = {"guided": "tab:blue", "baseline": "tab:orange"}
    for name, value in (final_rewards or {}).items():
        if value is not None and math.isfinite(value):
            ax.axhline(value, color=colors.get(name, "grey"), linestyle="--", linewidth=1,
                       label=f"final {name}: {value:+.4f}")
    ax.set_xlabel("sampling step")
    ax.set_ylabel("critic reward  r = z_yes - z_no")
    if steps:
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
    ax2 = ax.twinx()
    ax2.step(steps, lams, where="mid", color="tab:green", alpha=0.5, label="lambda")
    ax2.set_ylabel("lambda", color="tab:green")
    ax2.tick_params(axis="y", colors="tab:green")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=7, loc="best")
    if not ys:
        ax.text(0.5, 0.5, "no reward computed (guidance off or no surface)", ha="center",
                va="center", transform=ax.transAxes, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _item(values, index: int):
    if not values or index >= len(values):
        return None
    value = values[index]
    return None if value is None or not math.isfinite(value) else float(value)


__all__ = ["MESH_FORMATS", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "mesh_bytes",
           "write_mesh", "render_mesh_views", "contact_sheet", "png_bytes", "trace_records",
           "trace_figure", "figure_png"]
