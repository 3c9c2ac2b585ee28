"""``vlm3d-guide eval DIR``: evaluate a run's output folder (report.json, report.md, report.png)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from .common import PROG, UsageError, _Parser, _silence_progress_bars
from .models import check_hf_model
from .preflight import resolve_devices
from .settings import DEFAULTS, TINY_NOTICE


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
    parser.add_argument("--views", type=int, metavar="N", help="clay views rendered (default: the run's, "
                        "from config.json; 4 without one)")
    parser.add_argument("--size", type=int, default=224, metavar="PX", help="view size (default 224)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument("--quiet", action="store_true", help="do not print the report")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")
    return parser


def run_eval(argv: list) -> int:
    args = build_eval_parser().parse_args(argv)
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"eval folder not found: {args.folder}; give the -o folder of a {PROG} run")
    from ..evaluate import MESH_EXTENSIONS, evaluate_folder, find_mesh

    if find_mesh(folder, "mesh") is None:
        raise UsageError(f"no mesh.{{{','.join(MESH_EXTENSIONS)}}} in {args.folder}; give the -o folder of a "
                         f"{PROG} run")
    if (folder / "report.json").exists() and not args.overwrite:
        raise UsageError(f"{folder / 'report.json'} already exists; pass --overwrite to replace the report")
    if args.tiny and args.critic:
        raise UsageError("--tiny scores with the tiny critic, but --critic was given; drop one of them")
    if (args.views is not None and args.views < 1) or args.size < 28:
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
        from ..critic import VLMCritic
        from ..tiny import build_tiny_qwen

        critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl"), device=devices["device"])
    report = evaluate_folder(folder, critic=critic, clip_model=args.clip, prompt=prompt, num_views=args.views,
                             size=args.size, device=devices["device"])
    if not args.quiet:
        print((folder / "report.md").read_text())
        for path in report["paths"].values():
            if path:
                print(f"wrote {path}")
    return 0
