"""``vlm3d-guide``: the command line of vlm3d_guidance.

Commands::

    vlm3d-guide --image ref.png --prompt "a wooden chair with four legs" -o out/
    vlm3d-guide --image ref.png -o out/                 # the critic describes the image itself
    vlm3d-guide --tiny --image ref.png -o out/          # built-in tiny models: offline, seconds
    vlm3d-guide batch inputs/ -o out/                   # a folder of images or a JSONL manifest
    vlm3d-guide eval out/                               # report.json / report.md / report.png
    vlm3d-guide serve --tiny                            # a web page (vlm3d_guidance.app)

One run writes into its output folder (each file atomically, ``config.json`` last)::

    mesh.<fmt>       the guided mesh (glb by default; obj, ply, stl)
    baseline.<fmt>   with --compare: the unguided mesh from the same seed (lambda = 0)
    views.png        contact sheet of clay views from the critic's cameras (baseline row, guided row)
    trace.json       one record per sampling step (sigma, lambda, reward, gradient norm, seconds)
    trace.png        the reward trace plotted
    config.json      the resolved settings (``vlm3d-guide --config config.json`` repeats the run)

User mistakes are found before any model loads and reported as one line
``vlm3d-guide: error: <problem>; <fix>`` with exit code 2 and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import __version__

PROG = "vlm3d-guide"

# Every setting a run is made of (the keys of config.json's "settings"), with its default.
DEFAULTS = dict(
    tiny=False,
    model_path="tencent/Hunyuan3D-2",
    subfolder="hunyuan3d-dit-v2-0",
    critic="Qwen/Qwen2.5-VL-7B-Instruct",
    critic_query="dual",
    steps=50,
    guidance_scale=5.0,
    seed=0,
    lam=0.02,
    schedule="constant",
    start=0.0,
    end=1.0,
    every=1,
    gradient="x0",
    dit_checkpointing=False,
    normalize="rms",
    clip=None,
    views=4,
    elevation=20.0,
    fov=40.0,
    render_size=448,
    shading="clay",
    backend="auto",
    grid_resolution=64,
    coarse_to_fine=False,
    octree_resolution=384,
    mc_level=0.0,
    num_chunks=8000,
    device="auto",
    dtype="auto",
    critic_device=None,
    critic_dtype="auto",
    format="glb",
    compare=False,
    sheet_size=256,
)
# --tiny changes these defaults (an explicit option still wins) so that a run takes seconds on CPU.
TINY_DEFAULTS = dict(steps=8, octree_resolution=64, grid_resolution=32, render_size=56, views=4,
                     num_chunks=20000, device="cpu", critic_device=None, sheet_size=128)
TINY_MODEL_PATH, TINY_SUBFOLDER, TINY_CRITIC = "vlm3d-tiny/Hunyuan3D-2", "hunyuan3d-dit-v2-0", "tiny:qwen2_5_vl"
TINY_NOTICE = (f"{PROG}: --tiny: built-in tiny RANDOM-WEIGHT models. The shapes, words and rewards are "
               "meaningless; they exist to try the tool offline in seconds. Drop --tiny for real results "
               "(Hunyuan3D-2 and Qwen2.5-VL-7B from the Hugging Face hub, a GPU with ~40 GB).")

# GuidanceConfig field <- settings key
_GUIDANCE_KEYS = dict(lam="lam", schedule="schedule", start="start", end="end", every="every",
                      gradient="gradient", dit_checkpointing="dit_checkpointing", normalize="normalize",
                      clip="clip", num_views="views", elevation="elevation", fov="fov",
                      render_size="render_size", shading="shading", backend="backend",
                      grid_resolution="grid_resolution", coarse_to_fine="coarse_to_fine")
_FLAGS = {key: "--" + key.replace("_", "-") for key in DEFAULTS}
_FLAGS.update(guidance_scale="--cfg", views="--views", steps="--steps", critic="--critic")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_STEMS = ("mesh", "baseline")
OUTPUT_FILES = ("views.png", "trace.json", "trace.png", "config.json")
REPORT_FILES = ("report.json", "report.md", "report.png")
# Upper bounds on the knobs that size memory (generous): a typo such as --views 400 or --render-size
# 4480 would otherwise load the models and then run out of memory.
MAXIMA = dict(views=64, render_size=2048, grid_resolution=512, octree_resolution=1024, sheet_size=2048)
DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}


DEMO_IMAGE = "builtin:demo"


def demo_image():
    """The picture ``--tiny`` uses when no ``--image`` is given: a block on a transparent background."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[48:208, 72:184, :3] = (176, 112, 56)
    rgba[48:208, 72:184, 3] = 255
    return Image.fromarray(rgba)


class UsageError(Exception):
    """A user mistake: reported as one line ``vlm3d-guide: error: <problem>; <fix>``, exit code 2."""


class JobError(Exception):
    """A run that ran but could not produce its outputs (for example no surface was extracted)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message}; see '{self.prog} --help'")


# ==================================================================================================
# argument parsers
# ==================================================================================================


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every knob of a run. Defaults are None here and resolved later (--config, --tiny, DEFAULTS)."""
    d = DEFAULTS
    t = TINY_DEFAULTS

    def dflt(key):
        text = f"default: {d[key]}"
        return text + (f"; --tiny: {t[key]}" if key in t and t[key] != d[key] else "")

    g = parser.add_argument_group("models")
    g.add_argument("--tiny", action="store_true", default=None,
                   help="use the built-in tiny random-weight models (offline, seconds on CPU; meaningless "
                        "shapes, for trying the tool)")
    g.add_argument("--model-path", dest="model_path", metavar="PATH",
                   help=f"Hunyuan3D hub repo or local folder ({dflt('model_path')}); looked up in "
                        "$HY3DGEN_MODELS/<path>/<subfolder> first (default ~/.cache/hy3dgen)")
    g.add_argument("--subfolder", metavar="NAME", help=f"model subfolder ({dflt('subfolder')}; also "
                   "hunyuan3d-dit-v2-0-fast, -turbo, or with --model-path tencent/Hunyuan3D-2mini "
                   "hunyuan3d-dit-v2-mini)")
    g.add_argument("--critic", metavar="MODEL", help=f"Qwen-VL critic: hub id or local folder ({dflt('critic')})")
    g.add_argument("--critic-query", dest="critic_query", choices=("dual", "content", "geometry"),
                   help=f"the critic's question ({dflt('critic_query')}: content match AND geometric quality)")

    g = parser.add_argument_group("sampling")
    g.add_argument("--steps", type=int, metavar="N", help=f"sampling steps ({dflt('steps')})")
    g.add_argument("--cfg", dest="guidance_scale", type=float, metavar="W",
                   help=f"classifier-free guidance scale ({dflt('guidance_scale')})")
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed ({dflt('seed')})")
    g.add_argument("--octree-resolution", dest="octree_resolution", type=int, metavar="N",
                   help=f"grid of the exported mesh ({dflt('octree_resolution')})")
    g.add_argument("--mc-level", dest="mc_level", type=float, metavar="L",
                   help=f"iso-level of the exported surface ({dflt('mc_level')})")
    g.add_argument("--num-chunks", dest="num_chunks", type=int, metavar="N",
                   help=f"field queries per decoder call; lower it to save memory ({dflt('num_chunks')})")

    g = parser.add_argument_group("guidance")
    g.add_argument("--lam", type=float, metavar="L",
                   help=f"guidance strength lambda; 0 = unguided ({dflt('lam')})")
    g.add_argument("--schedule", choices=("constant", "linear", "cosine"),
                   help=f"how lambda varies over the guided window ({dflt('schedule')})")
    g.add_argument("--start", type=float, metavar="F", help=f"guided window start, fraction of steps ({dflt('start')})")
    g.add_argument("--end", type=float, metavar="F", help=f"guided window end, fraction of steps ({dflt('end')})")
    g.add_argument("--every", type=int, metavar="K", help=f"guide every K-th step in the window ({dflt('every')})")
    g.add_argument("--gradient", choices=("x0", "full"),
                   help=f"x0: gradient w.r.t. the clean-latent estimate (cheap); full: through the DiT "
                        f"(~2-3x memory and time) ({dflt('gradient')})")
    g.add_argument("--dit-checkpointing", dest="dit_checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="with --gradient full: recompute DiT blocks in backward (less memory)")
    g.add_argument("--normalize", choices=("rms", "none"),
                   help=f"rms: lambda is the RMS of each update; none: raw gradient ({dflt('normalize')})")
    g.add_argument("--clip", type=float, metavar="C", help="cap on the RMS of one update (default: off)")

    g = parser.add_argument_group("the critic's views")
    g.add_argument("--views", type=int, metavar="N", help=f"views per critic query ({dflt('views')})")
    g.add_argument("--elevation", type=float, metavar="DEG", help=f"camera elevation ({dflt('elevation')})")
    g.add_argument("--fov", type=float, metavar="DEG", help=f"camera field of view ({dflt('fov')})")
    g.add_argument("--render-size", dest="render_size", type=int, metavar="PX",
                   help=f"view size; multiples of 28 are exact for Qwen-VL ({dflt('render_size')})")
    g.add_argument("--shading", choices=("clay", "normals", "silhouette"), help=f"view shading ({dflt('shading')})")
    g.add_argument("--backend", choices=("auto", "torch", "nvdiffrast"),
                   help=f"rasterizer; auto = nvdiffrast on CUDA when installed ({dflt('backend')})")
    g.add_argument("--grid-resolution", dest="grid_resolution", type=int, metavar="N",
                   help=f"field grid used for guidance at every step ({dflt('grid_resolution')})")
    g.add_argument("--coarse-to-fine", dest="coarse_to_fine", action=argparse.BooleanOptionalAction,
                   help="decode that grid only near the surface: same mesh wherever the surface touches "
                        "the coarse band, far fewer decoder queries (needs an even --grid-resolution; can "
                        f"miss a piece thinner than two cells) ({dflt('coarse_to_fine')})")

    g = parser.add_argument_group("devices")
    g.add_argument("--device", metavar="DEV", help=f"device of the Hunyuan pipeline, e.g. cuda, cuda:1, cpu "
                   f"({dflt('device')}: cuda when available; under torchrun/accelerate cuda:$LOCAL_RANK)")
    g.add_argument("--dtype", metavar="T", help=f"float16 | bfloat16 | float32 for Hunyuan ({dflt('dtype')}: "
                   "float16 on CUDA, float32 on CPU)")
    g.add_argument("--critic-device", dest="critic_device", metavar="DEV",
                   help="device of the critic (default: --device); put it on a second GPU to split memory")
    g.add_argument("--critic-dtype", dest="critic_dtype", metavar="T",
                   help="critic dtype (default auto: bfloat16 on CUDA, float32 on CPU)")

    g = parser.add_argument_group("output")
    g.add_argument("--format", choices=("glb", "obj", "ply", "stl"), help=f"mesh format ({dflt('format')})")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also sample the unguided baseline with the same seed (baseline.<fmt>, two rows in views.png)")
    g.add_argument("--sheet-size", dest="sheet_size", type=int, metavar="PX",
                   help=f"tile size of views.png ({dflt('sheet_size')})")
    g.add_argument("--config", dest="config_file", metavar="FILE",
                   help="take settings (and image, prompt, seed) from a run's config.json; options given "
                        "here win")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages (errors still print)")
    g.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    """The parser of a single run (``vlm3d-guide --image ...``)."""
    parser = _Parser(
        prog=PROG,
        usage=(f"{PROG} --image IMAGE [--prompt TEXT] -o OUT [options]\n"
               f"       {PROG} batch INPUTS -o OUT [options]     (see '{PROG} batch --help')\n"
               f"       {PROG} eval DIR [options]                (see '{PROG} eval --help')\n"
               f"       {PROG} serve [--tiny | --toy] [options]  (a web page; see '{PROG} serve --help')"),
        description=("Generate a Hunyuan3D shape from a reference image with a vision-language critic "
                     "steering every sampling step (VLM3D, sec. 4.3.2). Try it offline in seconds with "
                     "--tiny."),
        epilog=("outputs in OUT: mesh.<fmt>, baseline.<fmt> (--compare), views.png, trace.json, trace.png, "
                "config.json. Existing outputs are kept unless --overwrite."),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g = parser.add_argument_group("input")
    g.add_argument("--image", metavar="IMAGE", help="reference image of one object (PNG with transparent "
                   "background is best; an RGB image is treated as all object); with --tiny it may be left out "
                   "(a built-in picture)")
    g.add_argument("--prompt", metavar="TEXT", help="what the object is, for the critic (default: the critic "
                   "describes the image)")
    g.add_argument("-o", "--output", metavar="OUT", help="output folder (created if missing)")
    _add_run_options(parser)
    return parser


def build_batch_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} batch",
        description=("Run many jobs: INPUTS is a folder of images (one job per image, prompt described by "
                     "the critic unless --prompt) or a JSONL manifest, one object per line: "
                     '{"image": "chair.png", "prompt": "a wooden chair", "seed": 0, "name": "chair"} '
                     "(prompt, seed and name optional; image paths relative to the manifest). Each job "
                     "writes OUT/<name>/. Resumable: jobs whose folder has config.json are skipped. A "
                     "failed job is recorded (OUT/<name>/error.txt) and the rest carry on. Under torchrun "
                     "or accelerate launch each process takes jobs i with i % WORLD_SIZE == RANK."),
        epilog="summary: printed at the end and written to OUT/summary.json and OUT/summary.md.",
    )
    parser.add_argument("inputs", metavar="INPUTS", help="folder of images, or a .jsonl manifest")
    parser.add_argument("-o", "--output", metavar="OUT", help="output folder")
    parser.add_argument("--prompt", metavar="TEXT", help="prompt for jobs without their own")
    _add_run_options(parser)
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} eval",
        description=("Evaluate an output folder of vlm3d-guide (mesh, optional baseline): mesh metrics, "
                     "baseline-versus-guided changes, critic rewards per query (--critic or --tiny), CLIP "
                     "similarity (--clip). Writes DIR/report.json, report.md and report.png."),
    )
    parser.add_argument("folder", metavar="DIR", help="a vlm3d-guide output folder")
    parser.add_argument("--critic", metavar="MODEL", help="Qwen-VL critic (hub id or folder) for rewards")
    parser.add_argument("--tiny", action="store_true", help="score with the tiny random-weight critic (a smoke test)")
    parser.add_argument("--clip", metavar="MODEL", help="CLIP model (hub id or folder) for text-image similarity, "
                        "e.g. openai/clip-vit-large-patch14")
    parser.add_argument("--prompt", metavar="TEXT", help="description (default: config.json's prompt)")
    parser.add_argument("--device", metavar="DEV", help="device for the critic and CLIP (default: cuda when available)")
    parser.add_argument("--views", type=int, default=4, metavar="N", help="clay views rendered (default 4)")
    parser.add_argument("--size", type=int, default=224, metavar="PX", help="view size (default 224)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--quiet", action="store_true", help="do not print the report")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")
    return parser


# ==================================================================================================
# settings: resolve and check (no model is loaded here)
# ==================================================================================================


def resolve_settings(args, file_settings: dict | None = None) -> dict:
    """DEFAULTS < --tiny defaults < --config file < options given on the command line."""
    file_settings = dict(file_settings or {})
    explicit = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None}
    tiny = bool(explicit.get("tiny") or file_settings.get("tiny"))
    if tiny:
        given = [_FLAGS[k] for k in ("model_path", "subfolder", "critic") if k in explicit]
        if given:
            raise UsageError(f"--tiny uses the built-in tiny models, but {', '.join(given)} was given; "
                             "drop --tiny to use your models, or drop " + ", ".join(given))
    settings = dict(DEFAULTS)
    if tiny:
        settings.update(TINY_DEFAULTS)
    unknown = sorted(set(file_settings) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"--config file has unknown settings {unknown}; it was written by another version "
                         "of vlm3d-guide: remove those keys")
    settings.update(file_settings)
    settings.update(explicit)
    settings["tiny"] = tiny
    if tiny:
        settings.update(model_path=TINY_MODEL_PATH, subfolder=TINY_SUBFOLDER, critic=TINY_CRITIC)
    return settings


def guidance_config(settings: dict):
    """The :class:`GuidanceConfig` of ``settings`` (a UsageError naming the option when invalid)."""
    from .config import GuidanceConfig

    kwargs = {field: settings[key] for field, key in _GUIDANCE_KEYS.items()}
    try:
        return GuidanceConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        flag = _FLAGS.get(_GUIDANCE_KEYS.get(field, ""), None)
        if field in ("need", "0"):  # start/end message
            flag = "--start/--end"
        raise UsageError(f"bad value for {flag or 'a guidance option'}: {message}; see '{PROG} --help'") from None


def check_settings(s: dict) -> None:
    """Everything about option values that can be checked without torch or models."""
    guidance_config(s)

    def need_int(key, minimum):
        value = s[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UsageError(f"{_FLAGS[key]} must be an integer >= {minimum} (got {value!r}); "
                             f"the default is {DEFAULTS[key]}")

    def need_finite(key):
        value = s[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise UsageError(f"{_FLAGS[key]} must be a finite number (got {value!r}); the default is {DEFAULTS[key]}")

    need_int("steps", 1)
    for key, maximum in MAXIMA.items():
        if isinstance(s[key], int) and s[key] > maximum:
            raise UsageError(f"{_FLAGS[key]} {s[key]} is too large (at most {maximum}; the default is "
                             f"{DEFAULTS[key]}); it would run out of memory")
    need_int("seed", 0)
    if s["seed"] >= 2 ** 63:
        raise UsageError(f"--seed must be < 2**63 (got {s['seed']}); any smaller non-negative integer works")
    need_int("octree_resolution", 16)
    need_int("num_chunks", 1)
    need_int("sheet_size", 16)
    need_finite("guidance_scale")
    need_finite("mc_level")
    if s["guidance_scale"] < 0:
        raise UsageError(f"--cfg must be >= 0 (got {s['guidance_scale']}); 5.0 is Hunyuan3D's default")
    if s["format"] not in ("glb", "obj", "ply", "stl"):
        raise UsageError(f"--format must be glb, obj, ply or stl (got {s['format']!r}); glb is the default")
    if s["critic_query"] not in ("dual", "content", "geometry"):
        raise UsageError(f"--critic-query must be dual, content or geometry (got {s['critic_query']!r})")
    for key in ("dtype", "critic_dtype"):
        if s[key] != "auto" and str(s[key]).lower() not in DTYPES:
            raise UsageError(f"{_FLAGS[key]} {s[key]!r} is not a dtype; use float16, bfloat16, float32 or auto")
    for key in ("model_path", "subfolder", "critic"):
        if not isinstance(s[key], str) or not s[key].strip():
            raise UsageError(f"{_FLAGS[key]} must be a non-empty name or path (got {s[key]!r})")


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
            if s["tiny"]:
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


def _looks_local(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or os.sep in name.replace("/", "", 1) or name.count("/") != 1
            or os.path.isabs(name))


def _local_path(name: str) -> str:
    return os.path.abspath(os.path.expanduser(name))


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_files(repo_id: str, what: str) -> list:
    """The repo's file names on the hub (a UsageError when the hub is unreachable or the repo unknown)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        raise UsageError("huggingface_hub is not installed; pip install huggingface_hub, or give a local "
                         "folder") from None
    try:
        info = HfApi().model_info(repo_id, timeout=15)
    except GatedRepoError:
        raise UsageError(f"{what} {repo_id} is gated on the Hugging Face hub; accept its licence on "
                         f"https://huggingface.co/{repo_id} and log in with 'hf auth login'") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{what} {repo_id} is not on the Hugging Face hub and not a local folder; check the "
                         "name or path") from None
    except Exception as exc:
        from huggingface_hub import constants

        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to download {what} "
                         f"{repo_id} ({reason}); check the network or proxy, or download the weights on a "
                         "connected machine and pass a local folder") from None
    return [s.rfilename for s in (info.siblings or [])]


def check_hunyuan(model_path: str, subfolder: str) -> str:
    """Where hy3dgen will find the model: a one-line description, or a UsageError."""
    base = os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")
    if _looks_local(model_path):
        local = Path(_local_path(model_path)) / subfolder
    else:
        local = Path(os.path.expanduser(os.path.join(base, model_path, subfolder)))
    wanted = ("config.yaml", "model.fp16.safetensors")
    if local.exists():
        missing = [f for f in wanted if not (local / f).is_file()]
        if missing:
            raise UsageError(f"model folder {local} lacks {', '.join(missing)}; it needs config.yaml and "
                             "model.fp16.safetensors (delete the folder to download it again)")
        return f"local folder {local}"
    if _looks_local(model_path):
        raise UsageError(f"model folder not found: {local}; check --model-path and --subfolder (a local model "
                         "is <path>/<subfolder>/config.yaml + model.fp16.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(repo_id=model_path, allow_patterns=[f"{subfolder}/*"],
                                        local_files_only=True)) / subfolder
        if all((cached / f).is_file() for f in wanted):
            return f"Hugging Face cache {cached}"
    except Exception:
        pass
    if _offline():
        raise UsageError(f"Hunyuan3D model {model_path}/{subfolder} is not downloaded and HF_HUB_OFFLINE is "
                         f"set; run once with network (or 'hf download {model_path} --include "
                         f"\"{subfolder}/*\"'), or put it in $HY3DGEN_MODELS/{model_path}/{subfolder}")
    files = _hub_files(model_path, "Hunyuan3D model")
    if not any(f.startswith(subfolder + "/") for f in files):
        subs = sorted({f.split("/", 1)[0] for f in files if "/" in f and "dit" in f.split("/", 1)[0]})
        raise UsageError(f"the hub repo {model_path} has no subfolder {subfolder}; choose --subfolder from "
                         f"{', '.join(subs) or '(none found)'}")
    return f"download from the Hugging Face hub ({model_path}/{subfolder}, first use only)"


def check_hf_model(name: str, what: str, flag: str) -> str:
    """A transformers model (critic or CLIP): local folder, cached, or reachable on the hub."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{what} folder {name} has no config.json; point {flag} at a transformers "
                             "model folder")
        return f"local folder {path}"
    if _looks_local(name):
        raise UsageError(f"{what} folder not found: {name}; check {flag} (a hub id looks like Org/Name)")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str) and any(
                isinstance(try_to_load_from_cache(name, w), str)
                for w in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")):
            return "Hugging Face cache"
    except Exception:
        pass
    if _offline():
        raise UsageError(f"{what} {name} is not downloaded and HF_HUB_OFFLINE is set; run once with network "
                         f"(or 'hf download {name}'), or pass a local folder to {flag}")
    _hub_files(name, what)
    return "download from the Hugging Face hub (first use only)"


def check_models(s: dict) -> dict:
    if s["tiny"]:
        return dict(hunyuan="built-in tiny model", critic="built-in tiny critic")
    if "2.1" in s["model_path"].rstrip("/").split("/")[-1]:
        import importlib.util

        if importlib.util.find_spec("hy3dshape") is None:
            raise UsageError("Hunyuan3D-2.1 needs the hy3dshape package (not on PyPI); clone "
                             "https://github.com/Tencent-Hunyuan/Hunyuan3D-2.1 and add its hy3dshape folder "
                             "to PYTHONPATH, or use --model-path tencent/Hunyuan3D-2")
    return dict(hunyuan=check_hunyuan(s["model_path"], s["subfolder"]),
                critic=check_hf_model(s["critic"], "critic", "--critic"))


def existing_outputs(folder: Path) -> list:
    """Files of an earlier run (or eval) in ``folder``."""
    if not folder.is_dir():
        return []
    names = [f"{stem}.{ext}" for stem in OUTPUT_STEMS for ext in ("glb", "obj", "ply", "stl")]
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


def read_config_file(path) -> dict:
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config file not found: {path}; give a config.json written by {PROG}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read --config {path} ({exc}); give a config.json written by {PROG}") from None
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise UsageError(f"--config {path} has no \"settings\"; give a config.json written by {PROG}")
    return data


# ==================================================================================================
# running
# ==================================================================================================


@dataclass
class Job:
    name: str
    image: Path
    prompt: str | None
    seed: int
    problem: str | None = None  # set when the image is unusable (the job fails without running)


def load_pipeline(s: dict, devices: dict, quiet: bool):
    """The :class:`GuidedHunyuanPipeline` for ``s`` (tiny models or real ones)."""
    import torch

    from .pipeline import GuidedHunyuanPipeline

    _quiet_hy3dgen()
    cfg = guidance_config(s)
    dtype, critic_dtype = getattr(torch, devices["dtype"]), getattr(torch, devices["critic_dtype"])
    if s["tiny"]:
        from .critic import VLMCritic
        from .tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

        hunyuan = load_tiny_hunyuan_pipeline("standard", device=devices["device"], dtype=dtype)
        critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl"), device=devices["critic_device"],
                                           dtype=critic_dtype, query=s["critic_query"])
        pipe = GuidedHunyuanPipeline(hunyuan, critic, cfg)
    else:
        model_path = _local_path(s["model_path"]) if _looks_local(s["model_path"]) else s["model_path"]
        pipe = GuidedHunyuanPipeline.from_pretrained(
            model_path=model_path, subfolder=s["subfolder"], critic=s["critic"], device=devices["device"],
            dtype=dtype, critic_device=devices["critic_device"], critic_dtype=critic_dtype, config=cfg,
            critic_query=s["critic_query"])
    vae = getattr(pipe.pipeline, "vae", None)
    if vae is not None and getattr(vae, "surface_extractor", None) is not None:
        vae.surface_extractor = _SilentSurfaceExtractor(vae.surface_extractor)
    return pipe


class _SilentSurfaceExtractor:
    """hy3dgen's surface extractor prints a full traceback when a field has no surface at the level
    (and returns None for it). The CLI reports an empty surface in one line (:class:`JobError`), so
    that traceback is kept off the terminal."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.inner, name)


def _quiet_hy3dgen() -> None:
    """hy3dgen logs every load at INFO with its own handler; keep its warnings only."""
    import logging

    with contextlib.suppress(Exception):
        import hy3dgen.shapegen.utils  # noqa: F401  (creates the logger)
    logging.getLogger("hy3dgen.shapgen").setLevel(logging.WARNING)


def run_job(pipe, s: dict, devices: dict, image: Path, prompt: str | None, seed: int, out: Path, *,
            quiet: bool, command: list, extra: dict | None = None) -> dict:
    """Sample (guided, and the baseline with --compare), then write every output into ``out``.

    Returns the dict written to ``config.json``. Raises :class:`JobError` when no surface comes out.
    """
    import torch

    from . import outputs

    started = time.perf_counter()
    cfg = pipe.config
    picture = demo_image() if str(image) == DEMO_IMAGE else str(image)
    call = dict(num_inference_steps=s["steps"], guidance_scale=s["guidance_scale"],
                octree_resolution=s["octree_resolution"], mc_level=s["mc_level"], num_chunks=s["num_chunks"],
                enable_pbar=not quiet, return_dict=True)
    seconds = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        guided = pipe(image=picture, prompt=prompt, generator=torch.Generator().manual_seed(seed), **call)
        seconds["guided"] = time.perf_counter() - t
        used_prompt = guided.prompts[0]
        if guided.described[0] and not quiet:
            _say(f"the critic described the image as: {used_prompt!r}")
        baseline = None
        if s["compare"]:
            t = time.perf_counter()
            baseline = pipe(image=picture, prompt=used_prompt, generator=torch.Generator().manual_seed(seed),
                            config=cfg.replace(lam=0.0), **call)
            seconds["baseline"] = time.perf_counter() - t
        t = time.perf_counter()
        final = {"guided": pipe.reward_of_latents(guided.latents, used_prompt, mc_level=s["mc_level"],
                                                  num_chunks=s["num_chunks"])[0]}
        if baseline is not None:
            final["baseline"] = pipe.reward_of_latents(baseline.latents, used_prompt, mc_level=s["mc_level"],
                                                       num_chunks=s["num_chunks"])[0]
        seconds["final_reward"] = time.perf_counter() - t
    run_warnings = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
    if not quiet:
        for message in run_warnings:
            _say(f"warning: {message}")

    mesh = guided.meshes[0] if guided.meshes else None
    if mesh is None or len(mesh.faces) == 0:
        raise JobError("the guided sample has no surface at the iso-level (empty mesh); try another --seed, "
                       "a lower --lam, or --mc-level")
    base_mesh = baseline.meshes[0] if baseline is not None and baseline.meshes else None

    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's config.json (the completion marker) and reports describe files about to be
    # replaced: remove them before the first new file lands, so an interrupted --overwrite never
    # leaves an old config.json vouching for a mix of old and new files.
    for old in existing_outputs(out):
        if old.name == "config.json" or old.name in REPORT_FILES:
            old.unlink()
    fmt = s["format"]
    written = []
    t = time.perf_counter()
    outputs.write_mesh(out / f"mesh.{fmt}", mesh, fmt)
    written.append(f"mesh.{fmt}")
    if baseline is not None:
        if base_mesh is not None and len(base_mesh.faces):
            outputs.write_mesh(out / f"baseline.{fmt}", base_mesh, fmt)
            written.append(f"baseline.{fmt}")
        else:
            run_warnings.append("the baseline sample has no surface: baseline mesh not written")

    view_kw = dict(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, size=s["sheet_size"],
                   device=devices["device"], backend=cfg.backend)
    rows = []
    if baseline is not None:
        rows.append((f"baseline (lam=0)  r={_fmt(final.get('baseline'))}", outputs.render_mesh_views(base_mesh, **view_kw)))
    rows.append((f"guided (lam={cfg.lam:g})  r={_fmt(final['guided'])}", outputs.render_mesh_views(mesh, **view_kw)))
    sheet = outputs.contact_sheet(rows, cfg.num_views, s["sheet_size"])
    outputs.atomic_write_bytes(out / "views.png", outputs.png_bytes(sheet))
    written.append("views.png")

    records = outputs.trace_records(guided.trace)
    trace = dict(prompt=used_prompt, seed=seed, num_inference_steps=s["steps"], lam=cfg.lam,
                 schedule=cfg.schedule, final_reward=final, records=records)
    outputs.atomic_write_json(out / "trace.json", trace)
    written.append("trace.json")
    fig = outputs.trace_figure(records, final, title=_short(used_prompt, 70))
    outputs.atomic_write_bytes(out / "trace.png", outputs.figure_png(fig))
    written.append("trace.png")
    seconds["write"] = time.perf_counter() - t

    # outputs of an earlier run in this folder that this run does not replace would be stale
    for stale in existing_outputs(out):
        if stale.name not in written and stale.name != "config.json":
            stale.unlink()
    seconds["total"] = time.perf_counter() - started
    config = dict(
        tool=PROG, version=__version__, command=command,
        image=str(image), prompt=used_prompt, prompt_described=bool(guided.described[0]), seed=seed,
        model_path=s["model_path"], subfolder=s["subfolder"], critic_model=s["critic"], tiny=s["tiny"],
        settings={**s, "seed": seed}, resolved=devices, guidance=cfg.to_dict(), final_reward=final,
        outputs=written + ["config.json"], warnings=run_warnings, seconds=seconds,
        notice=TINY_NOTICE.split(": ", 1)[1] if s["tiny"] else None,
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    )
    outputs.atomic_write_json(out / "config.json", config)  # last: marks the run complete
    return config


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run_single(argv: list) -> int:
    args = build_parser().parse_args(argv)
    quiet = args.quiet
    file_cfg = read_config_file(args.config_file) if args.config_file else None
    image = args.image if args.image is not None else (file_cfg or {}).get("image")
    prompt = args.prompt if args.prompt is not None else (file_cfg or {}).get("prompt")
    check_prompt(args.prompt)
    s = resolve_settings(args, file_cfg["settings"] if file_cfg else None)
    check_settings(s)
    if s["tiny"] and image in (None, DEMO_IMAGE):
        image_path = DEMO_IMAGE  # --tiny without --image: a built-in picture, so a fresh clone runs as is
    else:
        image_path = check_image(image)
    out = check_output(args.output, args.overwrite)
    devices = resolve_devices(s)
    check_backend(s, devices)
    sources = check_models(s)

    if s["tiny"] and not quiet:  # --quiet: the notice is in config.json
        print(TINY_NOTICE, file=sys.stderr, flush=True)
    if quiet:
        _silence_progress_bars()
    else:
        _say(f"Hunyuan3D {s['model_path']}/{s['subfolder']}: {sources['hunyuan']}")
        _say(f"critic {s['critic']}: {sources['critic']}")
        _say(f"device {devices['device']} ({devices['dtype']}), critic on {devices['critic_device']} "
             f"({devices['critic_dtype']})")
    pipe = load_pipeline(s, devices, quiet)
    try:
        config = run_job(pipe, s, devices, image_path, prompt, s["seed"], out, quiet=quiet,
                         command=[PROG, *argv])
    except JobError as exc:
        raise _RunFailed(str(exc)) from None
    if not quiet:
        rewards = ", ".join(f"{k} {_fmt(v)}" for k, v in config["final_reward"].items())
        print(f"final critic reward: {rewards}  (prompt: {_short(config['prompt'], 60)!r})")
        for name in config["outputs"]:
            print(f"wrote {out / name}")
    return 0


class _RunFailed(Exception):
    """A run that could not finish (exit code 1, one line)."""


# ==================================================================================================
# batch
# ==================================================================================================


def _unique(names: list) -> list:
    seen, out = {}, []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}-{n + 1}")
    return out


def collect_jobs(inputs: str, default_prompt: str | None, default_seed: int) -> list:
    """Jobs from a folder of images or a JSONL manifest (image problems are recorded, not raised)."""
    src = Path(inputs).expanduser()
    if not src.exists():
        raise UsageError(f"batch input not found: {inputs}; give a folder of images or a .jsonl manifest")
    jobs = []
    if src.is_dir():
        images = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {inputs}; put reference images "
                             "there or give a .jsonl manifest")
        names = _unique([p.stem for p in images])
        jobs = [Job(n, p.resolve(), default_prompt, default_seed) for n, p in zip(names, images)]
    else:
        try:
            lines = src.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read manifest {inputs} ({exc}); give a UTF-8 .jsonl file") from None
        entries = []
        example = '{"image": "chair.png", "prompt": "a wooden chair", "seed": 0}'
        for lineno, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{inputs}:{lineno}: not JSON ({exc.args[0] if exc.args else exc}); each line "
                                 f"must be an object like {example}") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise UsageError(f"{inputs}:{lineno}: needs an \"image\" path; each line must be an object like "
                                 f"{example}")
            unknown = sorted(set(entry) - {"image", "prompt", "seed", "name"})
            if unknown:
                raise UsageError(f"{inputs}:{lineno}: unknown keys {unknown}; allowed: image, prompt, seed, name")
            prompt = entry.get("prompt", default_prompt)
            if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
                raise UsageError(f"{inputs}:{lineno}: \"prompt\" must be a non-empty string (or left out)")
            seed = entry.get("seed", default_seed)
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
                raise UsageError(f"{inputs}:{lineno}: \"seed\" must be a non-negative integer (got {seed!r})")
            name = entry.get("name")
            if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name
                                     or "\\" in name or name in (".", "..")):
                raise UsageError(f"{inputs}:{lineno}: \"name\" must be a plain folder name (got {name!r})")
            image = Path(entry["image"]).expanduser()
            image = image if image.is_absolute() else src.parent / image
            entries.append((name, image, prompt, seed, lineno))
        if not entries:
            raise UsageError(f"manifest {inputs} has no jobs; add one JSON object per line like {example}")
        auto = _unique([e[1].stem for e in entries])
        names = [e[0] or a for e, a in zip(entries, auto)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UsageError(f"{inputs}: job names {dupes} are used twice; give each line its own \"name\"")
        jobs = [Job(n, e[1].resolve(), e[2], e[3]) for n, e in zip(names, entries)]
    for job in jobs:
        try:
            check_image(job.image)
        except UsageError as exc:
            job.problem = str(exc)
    return jobs


def shard() -> tuple[int, int]:
    """(rank, world_size) from torchrun / accelerate launch environment variables."""
    try:
        rank = int(os.environ.get("RANK", "0") or 0)
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise UsageError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not "
                         "integers; launch with torchrun or accelerate launch, or unset them") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun or accelerate launch, "
                         "or unset them")
    return rank, world


def _job_state(folder: Path) -> dict:
    """What is on disk for one job: done (config.json), failed (error.txt) or pending."""
    cfg, err = folder / "config.json", folder / "error.txt"
    if cfg.is_file():
        with contextlib.suppress(Exception):
            c = json.loads(cfg.read_text())
            return dict(status="done", prompt=c.get("prompt"), seed=c.get("seed"),
                        reward=(c.get("final_reward") or {}).get("guided"),
                        baseline_reward=(c.get("final_reward") or {}).get("baseline"),
                        seconds=(c.get("seconds") or {}).get("total"), rank=c.get("rank"), error=None)
        return dict(status="done", error=None)
    if err.is_file():
        return dict(status="failed", error=(err.read_text().splitlines() or [""])[0])
    return dict(status="pending", error=None)


def _table(rows: list, compare: bool) -> str:
    head = ["job", "status", "reward"] + (["baseline"] if compare else []) + ["seconds", "prompt / error"]
    body = []
    for r in rows:
        note = r.get("error") or r.get("prompt") or ""
        cells = [r["name"], r["status"], _fmt(r.get("reward"))]
        if compare:
            cells.append(_fmt(r.get("baseline_reward")))
        cells += ["" if r.get("seconds") is None else f"{r['seconds']:.1f}", _short(note, 60)]
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def _markdown_table(rows: list, compare: bool) -> str:
    head = ["job", "status", "reward"] + (["baseline"] if compare else []) + ["seconds", "prompt / error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        note = (r.get("error") or r.get("prompt") or "").replace("|", "\\|")
        cells = [r["name"], r["status"], _fmt(r.get("reward"))]
        if compare:
            cells.append(_fmt(r.get("baseline_reward")))
        cells += ["" if r.get("seconds") is None else f"{r['seconds']:.1f}", note]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (POSIX flock; no-op elsewhere) so summary rewrites do not race."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_summary(out: Path, jobs: list, s: dict) -> dict:
    """OUT/summary.json + summary.md from what is on disk for every job (all ranks)."""
    from . import outputs

    with _locked(out / ".summary.lock"):
        rows = []
        for job in jobs:
            rows.append(dict(name=job.name, image=str(job.image), **{"prompt": job.prompt, "seed": job.seed,
                                                                     **_job_state(out / job.name)}))
        counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "failed", "pending")}
        summary = dict(tool=PROG, version=__version__, counts=counts, jobs=rows,
                       updated=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        outputs.atomic_write_json(out / "summary.json", summary)
        md = (f"# {PROG} batch summary\n\n{counts['done']} done, {counts['failed']} failed, "
              f"{counts['pending']} pending\n\n" + _markdown_table(rows, s["compare"]))
        outputs.atomic_write_text(out / "summary.md", md)
    return summary


def run_batch(argv: list) -> int:
    from . import outputs

    args = build_batch_parser().parse_args(argv)
    quiet = args.quiet
    check_prompt(args.prompt)
    if args.output is None:
        raise UsageError(f"-o OUT is required (one subfolder per job goes there); e.g. {PROG} batch inputs/ -o out/")
    out = Path(args.output).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {args.output} is a file; give a folder")
    rank, world = shard()
    file_cfg = read_config_file(args.config_file) if args.config_file else None
    s = resolve_settings(args, file_cfg["settings"] if file_cfg else None)
    check_settings(s)
    jobs = collect_jobs(args.inputs, args.prompt, s["seed"])
    devices = resolve_devices(s)
    check_backend(s, devices)
    mine = [job for i, job in enumerate(jobs) if i % world == rank]
    todo = [job for job in mine if args.overwrite or not (out / job.name / "config.json").is_file()]
    runnable = [job for job in todo if job.problem is None]
    sources = check_models(s) if runnable else {}

    if s["tiny"] and not quiet:  # --quiet: the notice is in config.json
        print(TINY_NOTICE, file=sys.stderr, flush=True)
    if quiet:
        _silence_progress_bars()
    else:
        where = f" (rank {rank} of {world})" if world > 1 else ""
        _say(f"batch{where}: {len(jobs)} jobs, {len(mine)} mine, {len(mine) - len(todo)} already done, "
             f"{len(todo)} to run")
        for key, value in sources.items():
            _say(f"{key}: {value}")
    out.mkdir(parents=True, exist_ok=True)

    results = []
    pipe = load_pipeline(s, devices, quiet) if runnable else None
    for k, job in enumerate(mine, 1):
        folder = out / job.name
        row = dict(name=job.name, image=str(job.image), prompt=job.prompt, seed=job.seed)
        if job not in todo:
            results.append({**row, **_job_state(folder), "status": "skipped"})
            continue
        if not quiet:
            _say(f"[{k}/{len(mine)}] {job.name}: {job.image.name}")
        started = time.perf_counter()
        try:
            if job.problem is not None:
                raise JobError(job.problem)
            if args.overwrite and folder.is_dir():
                for old in existing_outputs(folder):
                    old.unlink()
            config = run_job(pipe, s, devices, job.image, job.prompt, job.seed, folder, quiet=quiet,
                             command=[PROG, "batch", *argv],
                             extra=dict(job=job.name, rank=rank, world_size=world))
            with contextlib.suppress(FileNotFoundError):
                (folder / "error.txt").unlink()
            results.append({**row, "status": "done", "prompt": config["prompt"], "error": None,
                            "reward": config["final_reward"].get("guided"),
                            "baseline_reward": config["final_reward"].get("baseline"),
                            "seconds": config["seconds"]["total"], "rank": rank})
        except Exception as exc:  # one failed job is recorded; the rest carry on
            line = (str(exc).splitlines() or [""])[0] or type(exc).__name__
            if not isinstance(exc, (JobError, UsageError)):
                line = f"{type(exc).__name__}: {line}"
            folder.mkdir(parents=True, exist_ok=True)
            outputs.atomic_write_text(folder / "error.txt", line + "\n\n" + traceback.format_exc())
            results.append({**row, "status": "failed", "error": line, "rank": rank,
                            "seconds": time.perf_counter() - started})
            _say(f"job {job.name} failed: {line} (details in {folder / 'error.txt'}); carrying on")

    if world > 1:
        outputs.atomic_write_json(out / f"summary.rank{rank}-of-{world}.json",
                                  dict(rank=rank, world_size=world, jobs=results))
    summary = write_summary(out, jobs, s)
    if not quiet:
        print(_table(results, s["compare"]))
        c = summary["counts"]
        print(f"all jobs: {c['done']} done, {c['failed']} failed, {c['pending']} pending; "
              f"summary in {out / 'summary.json'} and {out / 'summary.md'}")
    return 1 if any(r["status"] == "failed" for r in results) else 0


# ==================================================================================================
# eval
# ==================================================================================================


def run_eval(argv: list) -> int:
    args = build_eval_parser().parse_args(argv)
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"eval folder not found: {args.folder}; give the -o folder of a {PROG} run")
    from .evaluate import MESH_EXTENSIONS, evaluate_folder, find_mesh

    if find_mesh(folder, "mesh") is None:
        raise UsageError(f"no mesh.{{{','.join(MESH_EXTENSIONS)}}} in {args.folder}; give the -o folder of a "
                         f"{PROG} run")
    if (folder / "report.json").exists() and not args.overwrite:
        raise UsageError(f"{folder / 'report.json'} already exists; pass --overwrite to replace the report")
    if args.tiny and args.critic:
        raise UsageError("--tiny scores with the tiny critic, but --critic was given; drop one of them")
    if args.views < 1 or args.size < 28:
        raise UsageError(f"--views must be >= 1 and --size >= 28 (got {args.views}, {args.size})")
    config = {}
    with contextlib.suppress(Exception):
        config = json.loads((folder / "config.json").read_text())
    prompt = args.prompt or config.get("prompt")
    if (args.critic or args.tiny or args.clip) and not prompt:
        raise UsageError(f"no prompt: {folder / 'config.json'} has none; pass --prompt \"what the object is\"")
    critic_name = args.critic
    if critic_name:
        check_hf_model(critic_name, "critic", "--critic")
    if args.clip:
        check_hf_model(args.clip, "CLIP model", "--clip")
    devices = resolve_devices(dict(DEFAULTS, device=args.device or "auto", tiny=bool(args.tiny)))

    if args.quiet:
        _silence_progress_bars()
    critic = critic_name
    if args.tiny:
        if not args.quiet:
            print(TINY_NOTICE, file=sys.stderr, flush=True)
        from .critic import VLMCritic
        from .tiny import build_tiny_qwen

        critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl"), device=devices["device"])
    report = evaluate_folder(folder, critic=critic, clip_model=args.clip, prompt=prompt, num_views=args.views,
                             size=args.size, device=devices["device"])
    if not args.quiet:
        print((folder / "report.md").read_text())
        for path in report["paths"].values():
            if path:
                print(f"wrote {path}")
    return 0


# ==================================================================================================
# entry point
# ==================================================================================================


def _silence_progress_bars() -> None:
    """--quiet: no tqdm bars from us, hy3dgen, transformers or huggingface_hub."""
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when it is first imported
    for module, name in (("transformers.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
        if module.split(".")[0] in sys.modules:
            with contextlib.suppress(Exception):
                getattr(__import__(module, fromlist=[name]), name)()


def _terminate(signum, frame):  # pragma: no cover - exercised by launchers
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    """The ``vlm3d-guide`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if "--quiet" in argv:
        _silence_progress_bars()
    command, rest = "run", argv
    if argv and argv[0] in ("batch", "eval", "serve"):
        command, rest = argv[0], argv[1:]
    with contextlib.suppress(ValueError):  # not in the main thread (e.g. a notebook): keep defaults
        signal.signal(signal.SIGTERM, _terminate)
    try:
        if command == "batch":
            return run_batch(rest)
        if command == "eval":
            return run_eval(rest)
        if command == "serve":  # the web app (vlm3d_guidance.app): parses its own options, serves until Ctrl-C
            from .app import serve_main

            return serve_main(rest)
        return run_single(rest)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _RunFailed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        end_bar = "" if "--quiet" in argv else "\n"  # ends a progress bar's line; --quiet: exactly one line
        print(f"{end_bar}{PROG}: interrupted; files already written are complete (none is half-written)",
              file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:
        if debug:
            raise
        line = (str(exc).splitlines() or [""])[0]
        print(f"{PROG}: error: {type(exc).__name__}: {line}; rerun with --debug for the traceback and "
              "report it if it looks like a bug", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
