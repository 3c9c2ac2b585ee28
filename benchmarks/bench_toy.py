"""The toy-world experiment: does guidance repair broken shapes? Judged on the exported meshes.

    python benchmarks/bench_toy.py main      # >= 64 test references, unguided vs guided (toy defaults)
    python benchmarks/bench_toy.py knobs     # the knob study on the first --knob-count references
    python benchmarks/bench_toy.py language  # hidden-handle mugs: does the output follow the prompt?
    python benchmarks/bench_toy.py sampler   # unguided under other CFG scales / step counts
    python benchmarks/bench_toy.py controls  # is the update able to repair, is the critic's gradient informative?
    python benchmarks/bench_toy.py gradients # cosine between the critic's and the truth's latent gradients
    python benchmarks/bench_toy.py noise     # float noise floor: the knob rows again with 2 threads
    python benchmarks/bench_toy.py summary   # tables (markdown) + knob plot from the saved parts
    python benchmarks/bench_toy.py --quick   # CI smoke run (2 references, a temporary results folder)

Each part writes ``benchmarks/toy_results/<part>.json`` (rows and summaries; ``--results DIR``
elsewhere, ``--weights DIR`` measures a candidate toy instead of the shipped one), so the parts
can run in separate processes; ``summary`` prints the markdown that goes into RESULTS.md and writes
``benchmarks/toy_results/knobs.png``. One torch thread per process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "toy_results"

# the knob study: name -> guidance overrides (applied on top of the toy defaults). The lam rows are
# the sweep the toy default lam is chosen from; every other knob is varied at the default lam.
LAMS = (0.0, 0.01, 0.02, 0.05, 0.1)
KNOBS = {
    **{("lam=0 (unguided)" if lam == 0 else f"lam={lam:g}"): dict(lam=lam) for lam in LAMS},
    "schedule=cosine": dict(schedule="cosine"),
    "window=first half": dict(end=0.5),
    "views=1": dict(num_views=1),
    "query=content only": dict(query="content"),
    "query=geometry only": dict(query="geometry"),
    "gradient=full": dict(gradient="full"),
    "volume=keep": dict(volume="keep"),
    "volume=no_growth": dict(volume="no_growth"),
    "volume=keep from half": dict(volume="keep", volume_start=0.5),
}


def _default_label(name: str) -> str:
    """The knob's row name, marked when it is the toy default's lam."""
    from vlm3d_guidance.toy import TOY_GUIDANCE

    return f"{name} (default)" if name == f"lam={TOY_GUIDANCE.lam:g}" else name


def _progress(name):
    start = time.perf_counter()

    def report(done, total, row):
        print(f"  [{name}] {done}/{total} {row.reference}: {'FAIL ' + row.reason if row.failed else 'ok'} "
              f"IoU {row.iou:.3f} reward {row.reward if row.reward is None else round(row.reward, 2)} "
              f"{row.seconds:.1f} s (elapsed {time.perf_counter() - start:.0f} s)", flush=True)

    return report


def _run(pipe, refs, name, overrides, uphill=False):
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.toy.experiment import record_uphill, run_condition

    overrides = dict(overrides)
    query = overrides.pop("query", None)
    critic = VLMCritic(pipe.critic.model, pipe.critic.processor, query=query) if query else None
    if uphill:
        with record_uphill(pipe) as steps:
            rows = run_condition(pipe, refs, name, overrides, critic=critic, progress=_progress(name))
        return rows, steps
    return run_condition(pipe, refs, name, overrides, critic=critic, progress=_progress(name)), None


def _save(part, payload):
    from vlm3d_guidance.outputs import atomic_write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{part}.json", payload)


def part_main(args):
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import summarize, uphill_summary
    from vlm3d_guidance.toy.report import write_report

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.count, seed=0)
    unguided, _ = _run(pipe, refs, "unguided", dict(lam=0.0))
    guided, steps = _run(pipe, refs, "guided", {}, uphill=True)
    columns = {"unguided": unguided, "guided": guided}
    _save("main", dict(summaries={k: summarize(v) for k, v in columns.items()}, uphill=uphill_summary(steps),
                       rows={k: [r.to_dict() for r in v] for k, v in columns.items()}))
    write_report(RESULTS / "main_report", refs, columns, dict(split="test", seed=0, count=args.count,
                                                              guidance=pipe.config.to_dict(), sampling=toy.TOY_SAMPLING))


def part_knobs(args):
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import summarize

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.knob_count, seed=0)
    out = {}
    names = [n for n in KNOBS if not args.only or any(o in n for o in args.only)]
    for name in names:
        rows, _ = _run(pipe, refs, name, KNOBS[name])
        out[name] = dict(summary=summarize(rows), rows=[r.to_dict() for r in rows])
        _save("knobs" if not args.only else f"knobs_{args.only[0].replace('=', '_').replace(' ', '_')}", out)


def part_language(args):
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import handle_present, run_condition

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.hidden_handle_references(count=args.language_count)
    out = {}
    for prompt, wants_handle in (("a mug with a handle", True), ("a cup without a handle", False)):
        for name, overrides in (("unguided", dict(lam=0.0)), ("guided", {})):
            rows = run_condition(pipe, refs, name, overrides, prompts=[prompt] * len(refs),
                                 progress=_progress(f"{name} / {prompt}"))
            follows = [handle_present(r) == wants_handle for r in rows]
            out[f"{name} / {prompt}"] = dict(follows=sum(follows), count=len(rows),
                                             rows=[r.to_dict() for r in rows])
    _save("language", out)


def part_noise(args):
    """The float noise floor of a comparison: the knob references sampled again with 2 torch threads
    instead of 1 (the same model, seeds and settings; only the order of floating-point sums
    differs), unguided and guided at lam 0.02 and 0.05, compared run by run with the knob study's
    1-thread rows (``knobs_lam.json``, which must exist)."""
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import summarize

    one_thread = json.loads((RESULTS / "knobs_lam.json").read_text())
    torch.set_num_threads(2)
    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.knob_count, seed=0)
    names = ("lam=0 (unguided)", "lam=0.02", "lam=0.05")
    for name in names:  # before any sampling: the 1-thread rows must be of these references
        if [b["reference"] for b in one_thread[name]["rows"]] != [r.name for r in refs]:
            raise SystemExit(f"knobs_lam.json's {name} rows are for other references; rerun knobs --only lam")
    out = {}
    for name in names:
        rows, _ = _run(pipe, refs, f"{name}, 2 threads", KNOBS[name])
        base = one_thread[name]["rows"]
        change = [abs(r.iou - b["iou"]) for r, b in zip(rows, base)]
        out[name] = dict(summary=summarize(rows), one_thread=one_thread[name]["summary"],
                         verdict_flips=sum(r.failed != b["failed"] for r, b in zip(rows, base)),
                         mean_abs_iou_change=sum(change) / len(change), max_abs_iou_change=max(change),
                         rows=[r.to_dict() for r in rows])
        _save("noise", out)


def noise_table(noise: dict) -> list:
    """Markdown lines: per condition, 1 vs 2 threads."""
    lines = ["| condition | failed, 1 thread | failed, 2 threads | verdicts that flip | mean IoU 1 -> 2 threads "
             "| mean / max abs IoU change per run |", "|---|--:|--:|--:|---|---|"]
    for name, v in noise.items():
        n = v["summary"]["count"]
        lines.append(f"| {name} | {v['one_thread']['failures']}/{n} | {v['summary']['failures']}/{n} | "
                     f"{v['verdict_flips']} | {v['one_thread']['mean_iou']:.3f} -> {v['summary']['mean_iou']:.3f} | "
                     f"{v['mean_abs_iou_change']:.3f} / {v['max_abs_iou_change']:.3f} |")
    return lines


def part_sampler(args):
    """Unguided samples under other sampler settings (CFG scale, step count) on the knob references:
    is the generator's failure rate a sampler setting or the model?"""
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import run_condition, summarize

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.knob_count, seed=0)
    out = {}
    for name, change in (("guidance_scale=1", dict(guidance_scale=1.0)), ("guidance_scale=2", dict(guidance_scale=2.0)),
                         ("guidance_scale=5 (toy default)", {}), ("guidance_scale=8", dict(guidance_scale=8.0)),
                         ("50 steps", dict(num_inference_steps=50))):
        rows = run_condition(pipe, refs, name, dict(lam=0.0), sampling=dict(toy.TOY_SAMPLING, **change),
                             progress=_progress(name))
        out[name] = dict(summary=summarize(rows), rows=[r.to_dict() for r in rows])
    _save("sampler", out)


# the controls: name -> (reward, guidance overrides). "truth views" is ReferenceViewReward (it knows
# the intact object: an upper bound for the update, not a critic), "truth-parts" the same with every
# part of the object weighted alike (part_pixel_weights); "critic" is the shipped critic.
# lam 0.05 where a row names none: the toy default when these were measured (v3.1); pinned so the
# rows stay what they were when the default moved to 0.02
CONTROLS = {
    "truth-view reward, fixed cameras": ("truth", dict(fill=None, lam=0.05)),
    "truth-view reward, fixed cameras, lam=0.2": ("truth", dict(fill=None, lam=0.2)),
    "critic, fixed cameras": ("critic", dict(fill=None, lam=0.05)),
    "critic negated": ("negated", dict(lam=0.05)),
    "part-weighted truth-view reward, fixed cameras": ("truth-parts", dict(fill=None, lam=0.05)),
}


def part_controls(args):
    """Guidance with rewards that isolate the update from the critic, on the knob references:
    a reward that knows the intact object's views (can the update repair at all?) and the critic's
    reward negated (does the critic's gradient carry information?)."""
    from dataclasses import replace

    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import NegatedCritic, ReferenceViewReward, run_condition, summarize

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.knob_count, seed=0)
    out = {}
    names = [n for n in CONTROLS if not args.only or any(o in n for o in args.only)]
    for name in names:
        kind, overrides = CONTROLS[name]
        cfg = replace(pipe.config, **overrides)
        rows, report = [], _progress(name)
        for i, ref in enumerate(refs):
            critic = (ReferenceViewReward.for_reference(ref, cfg, part_weighted=kind == "truth-parts")
                      if kind.startswith("truth")
                      else NegatedCritic(pipe.critic) if kind == "negated" else None)
            rows += run_condition(pipe, [ref], name, overrides, critic=critic, seeds=[i])
            report(i + 1, len(refs), rows[-1])
        out[name] = dict(summary=summarize(rows), rows=[r.to_dict() for r in rows])
        _save("controls" if not args.only else f"controls_{args.only[0].replace(' ', '_').replace(',', '')}", out)


GRADIENT_STEPS = (2, 7, 12, 17, 22)  # of the toy's 25 sampling steps


def part_gradients(args):
    """Cosine between the critic's gradient and the truth-view reward's at the unguided sampler's
    clean estimates (knob references, steps :data:`GRADIENT_STEPS`). 0 = no information; the
    spread of a random direction's cosine in this dimension is about 1 / sqrt(L * C)."""
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import gradient_agreement

    pipe = toy.load_pipeline(weights=args.weights)
    refs = toy.references("test", count=args.knob_count, seed=0)
    rows = gradient_agreement(pipe, refs, GRADIENT_STEPS)
    _save("gradients", dict(steps=list(GRADIENT_STEPS), rows=rows))


def gradient_table(rows, key: str = "cosine") -> list:
    """Markdown lines: per step, the cosines' mean, spread, mean magnitude and share > 0 (``key``
    "cosine": vs the truth-view reward; "cosine_parts": vs the part-weighted one)."""
    import numpy as np

    against = "part-weighted truth" if key == "cosine_parts" else "truth"
    lines = [f"| step (sigma) | mean cosine critic vs {against} | sd | mean abs | share > 0 | n |",
             "|---|--:|--:|--:|--:|--:|"]
    for step in sorted({r["step"] for r in rows}):
        cs = np.array([r.get(key) for r in rows if r["step"] == step and r.get(key) is not None])
        sigma = next(r["sigma"] for r in rows if r["step"] == step)
        if cs.size:
            lines.append(f"| {step} ({sigma:.2f}) | {cs.mean():+.3f} | {cs.std():.3f} | {np.abs(cs).mean():.3f} | "
                         f"{(cs > 0).mean():.2f} | {cs.size} |")
    return lines


def critic_auc_by_class(rows) -> str:
    """``"table 0.40 (1 ok / 15 failed), ..."``: per class, the probability that a judge-ok export's
    critic reward exceeds a judge-failed one's (ties count half); "n/a" where a side is empty."""
    out = []
    for cls in ("table", "mug", "cup", "lamp"):
        rs = [r for r in rows if r["reference"].endswith(cls) and r["reward"] is not None]
        ok = [r["reward"] for r in rs if not r["failed"]]
        bad = [r["reward"] for r in rs if r["failed"]]
        auc = (sum((a > b) + 0.5 * (a == b) for a in ok for b in bad) / (len(ok) * len(bad))
               if ok and bad else None)
        out.append(f"{cls} {'n/a' if auc is None else f'{auc:.2f}'} ({len(ok)} ok / {len(bad)} failed)")
    return ", ".join(out)


def part_summary(args):
    from vlm3d_guidance.toy.experiment import markdown_table, wilson

    lines = []
    main = RESULTS / "main.json"
    if main.exists():
        m = json.loads(main.read_text())
        lines += ["### Unguided vs guided (toy defaults)", "", markdown_table(m["summaries"]), ""]
        u, g = m["summaries"]["unguided"], m["summaries"]["guided"]
        if u["failure_rate"]:
            lines.append(f"Guided / unguided failure rate {g['failure_rate'] / u['failure_rate']:.2f} (target <= 0.33); "
                         f"IoU {g['mean_iou'] - u['mean_iou']:+.3f} (target >= -0.01); guided "
                         f"{g['seconds_per_asset']:.1f} s / asset (target <= 20 s).")
        up = m.get("uphill")
        if up:
            lines.append(f"Guided steps whose applied update raised the reward at the clean estimate: "
                         f"{up['raised']}/{up['count']} ({up['share']:.2f}); mean change {up['mean_change']:+.3f}.")
        lines.append("Is the critic right on the generator's final meshes? Per class, the AUC of the unguided "
                     "exports' final reward for judge-ok vs judge-failed (0.5 = blind): "
                     + critic_auc_by_class(m["rows"]["unguided"]) + ".")
        lines.append("")
    knob_files = sorted(RESULTS.glob("knobs*.json"))
    if knob_files:
        found = {}
        for f in knob_files:
            found.update(json.loads(f.read_text()))
        merged = {_default_label(n): found[n] for n in KNOBS if n in found}  # the table in KNOBS' order
        lines += ["### Knob study", "", markdown_table({k: v["summary"] for k, v in merged.items()}), ""]
        _plot(merged)
    control_files = sorted(RESULTS.glob("controls*.json"))
    if control_files:
        found = {}
        for f in control_files:
            found.update(json.loads(f.read_text()))
        lines += ["### Controls (same references and seeds as the knob study)", "",
                  markdown_table({n: found[n]["summary"] for n in CONTROLS if n in found}), ""]
    grads = RESULTS / "gradients.json"
    if grads.exists():
        grad_rows = json.loads(grads.read_text())["rows"]
        lines += ["### Gradient agreement (critic vs truth-view reward, unguided estimates)", "",
                  *gradient_table(grad_rows), ""]
        if any(r.get("cosine_parts") is not None for r in grad_rows):
            lines += [*gradient_table(grad_rows, "cosine_parts"), ""]
    noise = RESULTS / "noise.json"
    if noise.exists():
        lines += ["### Float noise floor (knob references, 2 torch threads instead of 1)", "",
                  *noise_table(json.loads(noise.read_text())), ""]
    sampler = RESULTS / "sampler.json"
    if sampler.exists():
        rows = json.loads(sampler.read_text())
        lines += ["### Unguided sampler settings", "", markdown_table({k: v["summary"] for k, v in rows.items()}), ""]
    lang = RESULTS / "language.json"
    if lang.exists():
        lang_rows = json.loads(lang.read_text())
        lines += ["### Language constrains geometry (hidden handle)", "",
                  "| condition | follows the prompt | 95 % CI |", "|---|--:|---|"]
        for name, v in lang_rows.items():
            lo, hi = wilson(v["follows"], v["count"])
            lines.append(f"| {name} | {v['follows']}/{v['count']} | [{lo:.2f}, {hi:.2f}] |")
        lines.append("")
    print("\n".join(lines))


def _plot(merged):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(merged)
    rates = [merged[n]["summary"]["failure_rate"] for n in names]
    cis = [merged[n]["summary"]["failure_ci95"] for n in names]
    ious = [merged[n]["summary"]["mean_iou"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    y = range(len(names))
    a.barh(y, rates, xerr=[[r - c[0] for r, c in zip(rates, cis)], [c[1] - r for r, c in zip(rates, cis)]],
           color="#c0504d")
    a.set_yticks(list(y), names)
    a.invert_yaxis()
    a.set_xlabel("failure rate (judge, 95 % Wilson CI)")
    b.barh(y, ious, color="#4f81bd")
    b.set_yticks(list(y), [""] * len(names))
    b.invert_yaxis()
    b.set_xlabel("mean volumetric IoU with the intact object")
    b.set_xlim(min(ious) - 0.05 if ious else 0, 1)
    fig.suptitle("Toy world knob study (same references and seeds per row)")
    fig.tight_layout()
    fig.savefig(RESULTS / "knobs.png", dpi=110)


def main(argv=None):
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="?", choices=("main", "knobs", "language", "sampler", "controls", "gradients",
                                                    "noise", "summary"),
                        help="which part (default with --quick: main)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: main on 2 references, results in a "
                        "temporary folder (benchmarks/toy_results is left alone)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--knob-count", type=int, default=16)
    parser.add_argument("--language-count", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="knobs, controls: run only the conditions whose names contain these")
    parser.add_argument("--weights", default=None, help="a toy weights folder to measure instead of the shipped one "
                        "(a candidate from python -m vlm3d_guidance.toy.train --out)")
    parser.add_argument("--results", default=None, help=f"folder for the parts' results (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.results:
        RESULTS = Path(args.results)
    if args.quick:
        import tempfile

        RESULTS = Path(tempfile.mkdtemp(prefix="bench_toy_quick_"))
        args.part, args.count = args.part or "main", 2
    elif args.part is None:
        parser.error("give a part: main, knobs, language, sampler, controls, gradients, noise or summary (or --quick)")
    torch.set_num_threads(1)
    {"main": part_main, "knobs": part_knobs, "language": part_language, "sampler": part_sampler,
     "controls": part_controls, "gradients": part_gradients, "noise": part_noise,
     "summary": part_summary}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
