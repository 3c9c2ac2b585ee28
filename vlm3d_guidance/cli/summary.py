"""The batch summary: the state of every job on disk, as a terminal table and OUT/summary.{json,md}."""

from __future__ import annotations

import contextlib
import datetime
import json
from pathlib import Path

from filelock import FileLock

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


def _summary_cells(rows: list, compare: bool, note) -> tuple[list, list]:
    """The header and one row of cells (strings) per job; ``note(text)`` fits the prompt / error cell."""
    head = ["job", "status", "reward"] + (["baseline"] if compare else []) + ["seconds", "prompt / error"]
    body = []
    for r in rows:
        cells = [r["name"], r["status"], _fmt(r.get("reward"))]
        if compare:
            cells.append(_fmt(r.get("baseline_reward")))
        cells += ["" if r.get("seconds") is None else f"{r['seconds']:.1f}",
                  note(r.get("error") or r.get("prompt") or "")]
        body.append([str(c) for c in cells])
    return head, body


def _table(rows: list, compare: bool) -> str:
    """The summary as aligned columns for the terminal (long prompts shortened)."""
    head, body = _summary_cells(rows, compare, lambda text: _short(text, 60))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def _markdown_table(rows: list, compare: bool) -> str:
    """The summary as a Markdown table (prompts in full, ``|`` escaped)."""
    head, body = _summary_cells(rows, compare, lambda text: text.replace("|", "\\|"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def write_summary(out: Path, jobs: list, s: dict) -> dict:
    """OUT/summary.json + summary.md from what is on disk for every job (all ranks)."""
    from .. import outputs

    with FileLock(out / ".summary.lock"):  # ranks of a sharded batch rewrite the summary in turn
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
