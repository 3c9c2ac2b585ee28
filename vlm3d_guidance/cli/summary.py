"""The batch summary: the state of every job on disk, as a terminal table and OUT/summary.{json,md}."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from .. import __version__
from .common import PROG, _fmt, _short


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
    from .. import outputs

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
