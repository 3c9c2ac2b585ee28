"""``vlm3d-guide toy-eval -o OUT``: the toy world's unguided-vs-guided experiment (report.json/.md/.png)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import PROG, UsageError, _Parser, _say, _silence_progress_bars
from .preflight import REPORT_FILES, check_output


def build_toy_eval_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"{PROG} toy-eval",
        description=("Sample held-out toy references unguided (lam=0) and guided at the toy defaults, with the "
                     "same seed per reference, judge every exported mesh by its geometry (floating or missing "
                     "parts, IoU with the intact object) and write OUT/report.json, report.md and report.png."),
    )
    parser.add_argument("-o", "--output", metavar="OUT", help="folder for the report (required)")
    parser.add_argument("--count", type=int, default=64, metavar="N", help="test references (default 64)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="test-split seed (default 0)")
    parser.add_argument("--lam", type=float, default=None, metavar="L", help="guided condition's lambda "
                        "(default: the toy default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")
    return parser


def run_toy_eval(argv: list) -> int:
    args = build_toy_eval_parser().parse_args(argv)
    if args.count < 1 or args.count > 4096:
        raise UsageError(f"--count must be in 1..4096 (got {args.count})")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0 (got {args.seed})")
    if args.lam is not None and not (args.lam > 0 and args.lam < 100):
        raise UsageError(f"--lam must be in (0, 100) for the guided condition (got {args.lam})")
    out = check_output(args.output, args.overwrite)
    found = [out / n for n in REPORT_FILES if (out / n).exists()]
    if found and not args.overwrite:  # pragma: no cover - check_output already refuses these
        raise UsageError(f"{found[0]} already exists; pass --overwrite")
    from ..toy.models import verify_weights

    try:
        verify_weights()
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if args.quiet:
        _silence_progress_bars()
    import torch
    from tqdm.auto import tqdm

    from ..toy.report import toy_eval

    torch.set_num_threads(1)
    bar = tqdm(total=2 * args.count, desc="toy-eval", disable=args.quiet)

    def progress(done, total, row):
        bar.update(1)
        bar.set_postfix(last=f"{row.condition}: {'FAIL' if row.failed else 'ok'}")

    out.mkdir(parents=True, exist_ok=True)
    report = toy_eval(out, count=args.count, seed=args.seed, progress=progress,
                      guided_overrides=None if args.lam is None else dict(lam=args.lam))
    bar.close()
    if not args.quiet:
        for name, s in report["summaries"].items():
            lo, hi = s["failure_ci95"]
            _say(f"{name}: failure rate {s['failure_rate']:.3f} [{lo:.2f}, {hi:.2f}] over {s['count']}, mean IoU "
                 f"{s['mean_iou']:.3f}, median volume ratio {s['median_volume_ratio']:.2f}, "
                 f"{s['seconds_per_asset']:.1f} s / asset")
        for name in REPORT_FILES:
            print(f"wrote {Path(out) / name}")
    return 0
