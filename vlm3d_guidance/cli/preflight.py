"""Checks of a run's inputs before any model loads: the image, the prompt, the output folder, devices."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..outputs import MESH_FORMATS
from .common import PROG, UsageError
from .settings import DTYPES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_STEMS = ("mesh", "baseline")
OUTPUT_FILES = ("views.png", "trace.json", "trace.png", "config.json")
REPORT_FILES = ("report.json", "report.md", "report.png")


def check_image(path) -> Path:
    """A readable image file (opened and decoded here, so a broken file is caught before models load)."""
    if path is None:
        raise UsageError("--image is required (a picture of one object; a PNG with a transparent background "
                         f"is best); e.g. {PROG} --image ref.png -o out/")
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"image not found: {path}; check the path")
    if not p.is_file():
        raise UsageError(f"image {path} is not a file; give the path of one picture (for a folder use "
                         f"'{PROG} batch')")
    from PIL import Image

    try:
        with Image.open(p) as img:
            img.load()
            size = img.size
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot read image {path} ({reason}); give a PNG, JPEG or WebP picture") from None
    if min(size) < 8:
        raise UsageError(f"image {path} is only {size[0]}x{size[1]} pixels; give a picture of at least 64x64")
    return p.resolve()


def check_prompt(prompt) -> None:
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty; describe the object (e.g. \"a wooden chair\") or leave --prompt out "
                         "to let the critic describe the image")


def prompt_checker(s: dict):
    """``check(prompt)``: a UsageError when the critic's queries with ``prompt`` would not fit its context.

    Counts with the critic's tokenizer alone (its config and processor are read once, on the first
    prompt; no weights), so a description of 25k tokens is refused before any model loads. With
    ``--lam 0`` the critic never sees the views during sampling and every prompt passes.
    """
    state = {}

    def check(prompt) -> None:
        if prompt is None or s["lam"] == 0:
            return
        from ..critic.prompt import prompt_length

        if not state:
            from transformers import AutoConfig, AutoProcessor

            if s["tiny"]:
                from ..tiny import build_tiny_qwen

                path = build_tiny_qwen("qwen2_5_vl")
            elif s.get("toy"):
                from ..toy.models import CRITIC_FOLDER, WEIGHTS_DIR

                path = str(WEIGHTS_DIR / CRITIC_FOLDER)
            else:
                path = s["critic"]
            state.update(config=AutoConfig.from_pretrained(path), processor=AutoProcessor.from_pretrained(path))
        try:
            prompt_length(state["processor"], state["config"], prompt, s["critic_query"], s["views"],
                          s["render_size"])
        except ValueError as exc:
            raise UsageError(f"--prompt: {exc}") from None

    return check


def resolve_devices(s: dict, env=os.environ) -> dict:
    """Concrete devices and dtypes (imports torch, loads nothing)."""
    import torch

    def device_of(value, what):
        if value in (None, "auto"):
            value = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(value)
        except (RuntimeError, TypeError, ValueError):
            raise UsageError(f"{what} {value!r} is not a device; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"{what} {value} asked for CUDA but torch sees no CUDA GPU (torch "
                                 f"{torch.__version__}); use --device cpu (slow) or install a CUDA build of torch")
            if dev.index is None and env.get("LOCAL_RANK") not in (None, ""):
                dev = torch.device("cuda", int(env["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise UsageError(f"{what} {value}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                                 "pick cuda:0..cuda:{}".format(torch.cuda.device_count() - 1))
        elif dev.type != "cpu" and not (dev.type == "mps" and torch.backends.mps.is_available()):
            raise UsageError(f"{what} {value!r} is not usable here; use cpu or cuda")
        return str(dev)

    device = device_of(s["device"], "--device")
    critic_device = device_of(s["critic_device"] or device, "--critic-device")

    def dtype_of(value, dev, auto_cuda):
        if value == "auto":
            if s["tiny"] or s.get("toy"):
                return "float32"
            return auto_cuda if torch.device(dev).type == "cuda" else "float32"
        return DTYPES[str(value).lower()]

    return dict(device=device, critic_device=critic_device,
                dtype=dtype_of(s["dtype"], device, "float16"),
                critic_dtype=dtype_of(s["critic_dtype"], critic_device, "bfloat16"))


def check_backend(s: dict, devices: dict) -> None:
    if s["backend"] != "nvdiffrast":
        return
    import importlib

    try:
        importlib.import_module("nvdiffrast.torch")
    except Exception as exc:  # ImportError, or a broken build
        raise UsageError(f"--backend nvdiffrast, but nvdiffrast cannot be imported ({type(exc).__name__}); "
                         "install it (README: 'nvdiffrast') or use --backend torch / auto") from None
    if not devices["device"].startswith("cuda"):
        raise UsageError("--backend nvdiffrast renders on CUDA only, but the device is "
                         f"{devices['device']}; use --backend torch on CPU")


def existing_outputs(folder: Path) -> list:
    """Files of an earlier run (or eval) in ``folder``."""
    if not folder.is_dir():
        return []
    names = [f"{stem}.{ext}" for stem in OUTPUT_STEMS for ext in MESH_FORMATS]
    return [folder / n for n in (*names, *OUTPUT_FILES, *REPORT_FILES) if (folder / n).exists()]


def check_output(path, overwrite: bool) -> Path:
    if path is None:
        raise UsageError(f"-o OUT is required (the folder that receives mesh, views, trace and config); "
                         f"e.g. {PROG} --image ref.png -o out/")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {path} is a file; give a folder")
    found = existing_outputs(out)
    if found and not overwrite:
        what = "an earlier run" if (out / "config.json").is_file() else "an earlier run that did not finish"
        raise UsageError(f"{found[0]} already exists ({what}); pass --overwrite to replace it, or "
                         "choose another -o folder")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    # A real probe, not os.access: root passes access() everywhere, yet a read-only mount or /proc
    # would only fail after sampling. The probe file is removed at once.
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".vlm3d-write-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {parent} ({exc.strerror or exc}); choose an -o folder you can "
                         "write to") from None
    return out
