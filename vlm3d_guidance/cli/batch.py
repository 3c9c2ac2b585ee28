"""``vlm3d-guide batch INPUTS -o OUT``: many runs from a folder of images or a JSONL manifest."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .common import PROG, JobError, UsageError, _Parser, _say, _silence_progress_bars
from .models import check_models
from .options import _add_run_options
from .preflight import IMAGE_EXTENSIONS, check_backend, check_image, check_prompt, existing_outputs, \
    prompt_checker, resolve_devices
from .run import load_pipeline, run_job
from .settings import TINY_NOTICE, check_settings, read_config_file, resolve_settings
from .summary import _job_state, _table, write_summary


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


@dataclass
class Job:
    name: str
    image: Path
    prompt: str | None
    seed: int
    problem: str | None = None  # set when the image is unusable (the job fails without running)


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


def run_batch(argv: list) -> int:
    from .. import outputs

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
    fits = prompt_checker(s)
    for job in runnable:  # a prompt too long for the critic fails its job, before any model loads
        try:
            fits(job.prompt)
        except UsageError as exc:
            job.problem = str(exc)
    runnable = [job for job in todo if job.problem is None]

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
