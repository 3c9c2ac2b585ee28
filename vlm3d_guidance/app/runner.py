"""The models behind the web app and one job run on them.

The server loads one :class:`~vlm3d_guidance.pipeline.GuidedHunyuanPipeline` at start
(:func:`load_models`: ``--tiny``, ``--toy`` or the normal model options, through the CLI's own
checks and loader) and runs every job with the CLI's :func:`~vlm3d_guidance.cli.run_job`, so a job
writes exactly what ``vlm3d-guide`` writes (mesh, baseline, views.png, trace.json, trace.png,
config.json). :class:`_JobPipeline` gives each job its own guidance config and a per-step callback
(live progress, cancel) without touching the shared pipeline.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .jobs import JobCancelled



@dataclass
class Example:
    """A built-in reference: a picture file, its name and prompt."""

    name: str
    path: Path
    prompt: str | None


@dataclass
class Models:
    """What the server runs: the pipeline, the server's settings and devices, the examples."""

    pipe: object
    settings: dict
    devices: dict
    label: str


def _toy_module():
    try:
        return importlib.import_module("vlm3d_guidance.toy")
    except Exception as exc:  # absent (ImportError) or broken
        from .. import cli

        raise cli.UsageError(f"--toy needs vlm3d_guidance.toy (the trained toy world), which this install "
                             f"lacks or cannot import ({type(exc).__name__}: {exc}); update vlm3d_guidance, "
                             "or use --tiny or the normal model options") from None


def load_models(args) -> Models:
    """Resolve and check the settings of ``args`` (the CLI's run options), then load the models.

    Every check is the CLI's (:func:`~vlm3d_guidance.cli.resolve_settings`, ``check_settings``,
    ``resolve_devices``, ``check_backend``, ``check_models``) and runs before any model loads;
    ``--tiny`` and ``--toy`` (the trained toy world, with its own defaults) are the CLI's too.
    """
    from .. import cli

    file_cfg = cli.read_config_file(args.config_file) if getattr(args, "config_file", None) else None
    s = cli.resolve_settings(args, file_cfg["settings"] if file_cfg else None)  # --config: a run's settings
    if s["toy"]:
        _toy_module()  # a clear error when the toy world cannot be imported
    cli.check_settings(s)
    devices = cli.resolve_devices(s)
    cli.check_backend(s, devices)
    cli.check_models(s)
    pipe = cli.load_pipeline(s, devices, quiet=True)
    label = ("toy models (vlm3d_guidance.toy)" if s["toy"] else "tiny random-weight models" if s["tiny"]
             else f"{s['model_path']}/{s['subfolder']} + {s['critic']}")
    return Models(pipe=pipe, settings=s, devices=devices, label=label)


def write_examples(folder: Path, toy: bool | None = None, repo_example: Path | None = None) -> list:
    """The page's built-in examples as files in ``folder``: the toy world's test references
    (``toy=True``; ``None``: when vlm3d_guidance.toy exists), else ``examples/ref.png`` of the
    repository (when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    toy_module = None
    with_toy = bool(toy)
    if toy is None:
        try:
            toy_module = importlib.import_module("vlm3d_guidance.toy")
            with_toy = hasattr(toy_module, "references")
        except Exception:  # absent or broken: the repository's example instead
            with_toy = False
    if with_toy:
        toy_module = toy_module or _toy_module()
        for k, ref in enumerate(toy_module.references(split="test", count=16, seed=0)):
            name = str(getattr(ref, "name", f"toy-{k}"))
            path = folder / f"{k:02d}.png"
            ref.image.save(path)
            examples.append(Example(name=name, path=path, prompt=getattr(ref, "prompt", None)))
        return examples
    repo_example = repo_example or Path(__file__).resolve().parents[2] / "examples" / "ref.png"
    if repo_example.is_file():
        path = folder / "ref.png"
        shutil.copyfile(repo_example, path)
        examples.append(Example(name="ref.png (examples/)", path=path, prompt=None))
    return examples


class _JobPipeline:
    """The shared pipeline seen by one job: its own config and a per-step callback.

    ``run_job`` reads ``.config``, calls the pipeline (guided, then the baseline with
    ``config=cfg.replace(lam=0)``) and ``reward_of_latents``; each is forwarded with this job's
    config, so concurrent jobs never change the shared pipeline.
    """

    def __init__(self, pipe, config, on_step: Callable[[str, int, int, float | None], None], cancel):
        self._pipe, self.config, self._on_step, self._cancel = pipe, config, on_step, cancel
        self.pipeline = pipe.pipeline
        self._calls = 0

    def __call__(self, **kwargs):
        cfg = kwargs.pop("config", self.config)
        self._calls += 1
        phase = "guided" if self._calls == 1 else "baseline"  # run_job's order
        total = kwargs["num_inference_steps"]

        def callback(step, t, outputs):
            record = getattr(outputs, "record", None)
            reward = record.reward[0] if record is not None and record.reward else None
            self._on_step(phase, step + 1, total, reward)
            if self._cancel.is_set():
                raise JobCancelled()

        if self._cancel.is_set():
            raise JobCancelled()
        return self._pipe(config=cfg, callback=callback, **kwargs)

    def reward_of_latents(self, latents, prompt, **kwargs):
        kwargs.setdefault("config", self.config)
        return self._pipe.reward_of_latents(latents, prompt, **kwargs)


def run(models: Models, s: dict, image: Path, prompt: str | None, out: Path, *, on_step, cancel,
        command: list) -> dict:
    """One job with the CLI's ``run_job``: returns its config.json dict (outputs in ``out``)."""
    from .. import cli

    proxy = _JobPipeline(models.pipe, cli.guidance_config(s), on_step, cancel)
    return cli.run_job(proxy, s, models.devices, image, prompt, s["seed"], out, quiet=True, command=command,
                       extra=dict(served_by=f"{cli.PROG} serve"))
