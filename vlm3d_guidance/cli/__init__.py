"""``vlm3d-guide``: the command line of vlm3d_guidance.

Commands::

    vlm3d-guide --image ref.png --prompt "a wooden chair with four legs" -o out/
    vlm3d-guide --image ref.png -o out/                 # the critic describes the image itself
    vlm3d-guide --tiny --image ref.png -o out/          # built-in tiny models: offline, seconds
    vlm3d-guide batch inputs/ -o out/                   # a folder of images or a JSONL manifest
    vlm3d-guide eval out/                               # report.json / report.md / report.png

One run writes into its output folder (each file atomically, ``config.json`` last)::

    mesh.<fmt>       the guided mesh (glb by default; obj, ply, stl)
    baseline.<fmt>   with --compare: the unguided mesh from the same seed (lambda = 0)
    views.png        contact sheet of clay views from the critic's cameras (baseline row, guided row)
    trace.json       one record per sampling step (sigma, lambda, reward, gradient norm, seconds)
    trace.png        the reward trace plotted
    config.json      the resolved settings (``vlm3d-guide --config config.json`` repeats the run)

User mistakes are found before any model loads and reported as one line
``vlm3d-guide: error: <problem>; <fix>`` with exit code 2 and nothing written.

The package, one module per concern (each one imports only what it needs; torch and the models load
inside the functions that use them)::

    common.py     PROG, the error types (UsageError: exit 2, JobError, _RunFailed: exit 1), messages
    settings.py   DEFAULTS, --tiny defaults, --config files, resolve_settings / check_settings
    options.py    the options of a run (shared with batch) and the parser of a plain run
    preflight.py  checks before any model loads: image, prompt, output folder, devices, rasterizer
    models.py     where the models come from (local folder, cache, hub), checked before loading
    run.py        one run: load_pipeline, run_job (sample and write every output), run_single
    batch.py      ``vlm3d-guide batch``: jobs from a folder or manifest, sharding, resumption
    summary.py    the batch summary (terminal table, summary.json, summary.md)
    eval.py       ``vlm3d-guide eval``: the report of an output folder
    commands.py   the registry of subcommands

Adding a subcommand (``serve``, ``toy``, ...) is one module and one line: write
``cli/<name>.py`` with ``run_<name>(argv: list) -> int`` and register it in
:data:`~vlm3d_guidance.cli.commands.SUBCOMMANDS`; :func:`main` dispatches to it, maps its
:class:`UsageError` to exit code 2 and lists it in ``vlm3d-guide --help``.
"""

from __future__ import annotations

import contextlib
import importlib
import signal
import sys

from .batch import Job, build_batch_parser, collect_jobs, run_batch, shard
from .commands import SUBCOMMANDS
from .common import PROG, JobError, UsageError, _RunFailed, _silence_progress_bars
from .eval import build_eval_parser, run_eval
from .models import check_hf_model, check_hunyuan, check_models
from .options import build_parser
from .preflight import (IMAGE_EXTENSIONS, OUTPUT_FILES, OUTPUT_STEMS, REPORT_FILES, check_backend, check_image,
                        check_output, check_prompt, existing_outputs, resolve_devices)
from .run import DEMO_IMAGE, demo_image, load_pipeline, run_job, run_single
from .settings import (DEFAULTS, DTYPES, MAXIMA, TINY_CRITIC, TINY_DEFAULTS, TINY_MODEL_PATH, TINY_NOTICE,
                       TINY_SUBFOLDER, check_settings, guidance_config, read_config_file, resolve_settings)
from .summary import write_summary


def _entry(command: str):
    """The function ``f(argv) -> exit code`` of ``command`` ("run": a plain run)."""
    if command == "run":
        return run_single
    module, function, _ = SUBCOMMANDS[command]
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def _terminate(signum, frame):  # pragma: no cover - exercised by launchers
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    """The ``vlm3d-guide`` console script. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if "--quiet" in argv:
        _silence_progress_bars()
    command, rest = "run", argv
    if argv and argv[0] in SUBCOMMANDS:
        command, rest = argv[0], argv[1:]
    with contextlib.suppress(ValueError):  # not in the main thread (e.g. a notebook): keep defaults
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _entry(command)(rest)
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


__all__ = ["main", "SUBCOMMANDS", "PROG", "UsageError", "JobError", "DEFAULTS", "TINY_DEFAULTS", "TINY_NOTICE",
           "build_parser", "build_batch_parser", "build_eval_parser", "resolve_settings", "guidance_config",
           "check_settings", "read_config_file", "check_image", "check_prompt", "check_output", "check_backend",
           "check_models", "check_hunyuan", "check_hf_model", "existing_outputs", "resolve_devices",
           "load_pipeline", "run_job", "run_single", "run_batch", "run_eval", "collect_jobs", "shard", "Job",
           "write_summary", "demo_image", "DEMO_IMAGE", "IMAGE_EXTENSIONS", "OUTPUT_FILES", "OUTPUT_STEMS",
           "REPORT_FILES", "DTYPES", "MAXIMA", "TINY_CRITIC", "TINY_MODEL_PATH", "TINY_SUBFOLDER"]
