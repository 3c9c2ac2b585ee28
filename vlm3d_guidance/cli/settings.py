"""The settings of a run: defaults, ``--tiny`` defaults, ``--config`` files, the command line; checked
without torch or models."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..outputs import MESH_FORMATS
from .common import PROG, UsageError

# Every setting a run is made of (the keys of config.json's "settings"), with its default.
DEFAULTS = dict(
    tiny=False,
    toy=False,
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
    volume="free",
    volume_start=0.0,
    views=4,
    elevation=20.0,
    fov=40.0,
    render_size=448,
    shading="clay",
    backend="auto",
    grid_resolution=128,
    coarse_to_fine=True,
    rotate_views=False,
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
# --toy: the trained toy world shipped in the package (vlm3d_guidance.toy); its defaults are the toy's own
# (toy.TOY_GUIDANCE and toy.TOY_SAMPLING, repeated here to keep this module free of torch; a test
# keeps them equal).
TOY_DEFAULTS = dict(steps=25, guidance_scale=5.0, lam=0.02, octree_resolution=64, grid_resolution=32,
                    coarse_to_fine=False, render_size=140, views=4, backend="torch", num_chunks=20000,
                    device="cpu", critic_device=None, sheet_size=140)
TOY_MODEL_PATH, TOY_SUBFOLDER, TOY_CRITIC = "vlm3d-toy/Hunyuan3D-toy", "hunyuan3d-dit-toy", "toy:critic-matched"
TOY_NOTICE = (f"{PROG}: --toy: the trained toy world (a small Hunyuan3D generator that often breaks parts, "
              "and a small Qwen2.5-VL critic trained to spot it); its shapes are tables, mugs, cups and lamps.")
TINY_MODEL_PATH, TINY_SUBFOLDER, TINY_CRITIC = "vlm3d-tiny/Hunyuan3D-2", "hunyuan3d-dit-v2-0", "tiny:qwen2_5_vl"
TINY_NOTICE = (f"{PROG}: --tiny: built-in tiny RANDOM-WEIGHT models. The shapes, words and rewards are "
               "meaningless; they exist to try the tool offline in seconds. Drop --tiny for real results "
               "(Hunyuan3D-2 and Qwen2.5-VL-7B from the Hugging Face hub, a GPU with ~40 GB).")

# GuidanceConfig field <- settings key
_GUIDANCE_KEYS = dict(lam="lam", schedule="schedule", start="start", end="end", every="every",
                      gradient="gradient", dit_checkpointing="dit_checkpointing", normalize="normalize",
                      clip="clip", volume="volume", volume_start="volume_start",
                      num_views="views", elevation="elevation", fov="fov",
                      render_size="render_size", shading="shading", backend="backend",
                      grid_resolution="grid_resolution", coarse_to_fine="coarse_to_fine",
                      rotate_views="rotate_views")
_FLAGS = {key: "--" + key.replace("_", "-") for key in DEFAULTS}
_FLAGS.update(guidance_scale="--cfg", views="--views", steps="--steps", critic="--critic")

# Upper bounds on the knobs that size memory (generous): a typo such as --views 400 or --render-size
# 4480 would otherwise load the models and then run out of memory.
MAXIMA = dict(views=64, render_size=2048, grid_resolution=512, octree_resolution=1024, sheet_size=2048)
DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16", "float32": "float32", "fp32": "float32", "float": "float32"}



def resolve_settings(args, file_settings: dict | None = None) -> dict:
    """DEFAULTS < --tiny defaults < --config file < options given on the command line."""
    file_settings = dict(file_settings or {})
    explicit = {key: getattr(args, key) for key in DEFAULTS if getattr(args, key, None) is not None}
    tiny = bool(explicit.get("tiny") or file_settings.get("tiny"))
    toy = bool(explicit.get("toy") or file_settings.get("toy"))
    if tiny and toy:
        raise UsageError("--tiny and --toy pick different built-in models; drop one of them")
    for flag, on in (("--tiny", tiny), ("--toy", toy)):
        given = [_FLAGS[k] for k in ("model_path", "subfolder", "critic") if k in explicit] if on else []
        if given:
            raise UsageError(f"{flag} uses the built-in {flag[2:]} models, but {', '.join(given)} was given; "
                             f"drop {flag} to use your models, or drop " + ", ".join(given))
    settings = dict(DEFAULTS)
    if tiny:
        settings.update(TINY_DEFAULTS)
    if toy:
        settings.update(TOY_DEFAULTS)
    unknown = sorted(set(file_settings) - set(DEFAULTS))
    if unknown:
        raise UsageError(f"--config file has unknown settings {unknown}; it was written by another version "
                         "of vlm3d-guide: remove those keys")
    settings.update(file_settings)
    settings.update(explicit)
    settings["tiny"], settings["toy"] = tiny, toy
    if tiny:
        settings.update(model_path=TINY_MODEL_PATH, subfolder=TINY_SUBFOLDER, critic=TINY_CRITIC)
    if toy:
        settings.update(model_path=TOY_MODEL_PATH, subfolder=TOY_SUBFOLDER, critic=TOY_CRITIC)
    return settings


def guidance_config(settings: dict):
    """The :class:`GuidanceConfig` of ``settings`` (a UsageError naming the option when invalid)."""
    from ..config import GuidanceConfig

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
    if s["format"] not in MESH_FORMATS:
        raise UsageError(f"--format must be glb, obj, ply or stl (got {s['format']!r}); glb is the default")
    if s["critic_query"] not in ("dual", "content", "geometry"):
        raise UsageError(f"--critic-query must be dual, content or geometry (got {s['critic_query']!r})")
    for key in ("dtype", "critic_dtype"):
        if s[key] != "auto" and str(s[key]).lower() not in DTYPES:
            raise UsageError(f"{_FLAGS[key]} {s[key]!r} is not a dtype; use float16, bfloat16, float32 or auto")
    for key in ("model_path", "subfolder", "critic"):
        if not isinstance(s[key], str) or not s[key].strip():
            raise UsageError(f"{_FLAGS[key]} must be a non-empty name or path (got {s[key]!r})")


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
