"""``vlm3d-guide --image ...``: one run (load the pipeline, sample, write every output)."""

from __future__ import annotations

import contextlib
import functools
import datetime
import sys
import time
import warnings
from pathlib import Path

from .. import __version__
from .common import PROG, JobError, _fmt, _RunFailed, _say, _short, _silence_progress_bars
from .models import _local_path, _looks_local, check_models
from .options import build_parser
from .preflight import REPORT_FILES, check_backend, check_image, check_output, check_prompt, existing_outputs, \
    prompt_checker, resolve_devices
from .common import UsageError
from .settings import TINY_NOTICE, TOY_NOTICE, check_settings, guidance_config, read_config_file, resolve_settings

DEMO_IMAGE = "builtin:demo"
TOY_IMAGE = "builtin:toy"
TOY_DEMO_REFERENCE = 0  # index of the test-split reference --toy uses without --image


def demo_image():
    """The picture ``--tiny`` uses when no ``--image`` is given: a block on a transparent background."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((256, 256, 4), np.uint8)
    rgba[48:208, 72:184, :3] = (176, 112, 56)
    rgba[48:208, 72:184, 3] = 255
    return Image.fromarray(rgba)


@functools.lru_cache(maxsize=1)
def toy_reference():
    """The built-in reference ``--toy`` uses without ``--image`` (a test-split toy object); made once
    per process (its prompt is read before loading, its image when sampling)."""
    from ..toy import references

    return references("test", count=1, start=TOY_DEMO_REFERENCE)[0]


def load_pipeline(s: dict, devices: dict, quiet: bool):
    """The :class:`GuidedHunyuanPipeline` for ``s`` (tiny models or real ones)."""
    import torch

    from ..pipeline import GuidedHunyuanPipeline

    _quiet_hy3dgen()
    cfg = guidance_config(s)
    dtype, critic_dtype = getattr(torch, devices["dtype"]), getattr(torch, devices["critic_dtype"])
    if s["tiny"]:
        from ..critic import VLMCritic
        from ..tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

        hunyuan = load_tiny_hunyuan_pipeline("standard", device=devices["device"], dtype=dtype)
        critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl"), device=devices["critic_device"],
                                           dtype=critic_dtype, query=s["critic_query"])
        pipe = GuidedHunyuanPipeline(hunyuan, critic, cfg)
    elif s.get("toy"):
        from .. import toy

        pipe = toy.load_pipeline(device=devices["device"], config=cfg)
        if s["critic_query"] != "dual":
            from ..critic import VLMCritic

            pipe.critic = VLMCritic(pipe.critic.model, pipe.critic.processor, query=s["critic_query"])
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

    from .. import outputs

    started = time.perf_counter()
    cfg = pipe.config
    picture = demo_image() if str(image) == DEMO_IMAGE else toy_reference().image if str(image) == TOY_IMAGE \
        else str(image)
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
        final = {"guided": guided.final_reward[0]}  # the critic's reward of the exported mesh
        if baseline is not None:
            final["baseline"] = baseline.final_reward[0]
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
                   device=devices["device"], backend=cfg.backend, fill=cfg.fill)
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
        notice=TINY_NOTICE.split(": ", 1)[1] if s["tiny"] else TOY_NOTICE.split(": ", 1)[1] if s.get("toy") else None,
        finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    )
    outputs.atomic_write_json(out / "config.json", config)  # last: marks the run complete
    return config


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
    elif s["toy"] and image in (None, TOY_IMAGE):
        image_path = TOY_IMAGE  # --toy without --image: a built-in test reference, with its own prompt
        prompt = prompt if prompt is not None else toy_reference().prompt
    else:
        image_path = check_image(image)
    out = check_output(args.output, args.overwrite)
    devices = resolve_devices(s)
    check_backend(s, devices)
    sources = check_models(s)
    prompt_checker(s)(prompt)

    if s["toy"] and prompt is None:
        raise UsageError("--toy needs --prompt with your own --image: the toy critic judges shapes but cannot "
                         "describe pictures; e.g. --prompt \"a table with four legs\" (the toy's classes: "
                         "a table with four legs, a mug with a handle, a cup without a handle, a lamp with a "
                         "base, a pole and a shade)")
    if s["tiny"] and not quiet:  # --quiet: the notice is in config.json
        print(TINY_NOTICE, file=sys.stderr, flush=True)
    if s["toy"] and not quiet:
        print(TOY_NOTICE, file=sys.stderr, flush=True)
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
        print(f"final critic reward (exported mesh): {rewards}  (prompt: {_short(config['prompt'], 60)!r})")
        for name in config["outputs"]:
            print(f"wrote {out / name}")
    return 0
