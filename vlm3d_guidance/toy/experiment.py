"""The toy experiment: unguided vs guided on held-out references, judged on the exported meshes.

Every condition runs the same references with the same seeds (seed ``i`` for reference ``i``), so
guided and unguided rows differ only by guidance. The judge (:func:`~vlm3d_guidance.toy.judge`) looks
at the exported mesh only; the critic's reward of the final latents is reported beside it, never
used to decide success.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import TOY_SAMPLING
from .judge import judge


@dataclass
class Row:
    """One reference under one condition."""

    reference: str
    condition: str
    seed: int
    failed: bool
    reason: str
    iou: float
    reward: float | None
    seconds: float
    guided_steps: int
    skipped_steps: int
    mesh: object = field(default=None, repr=False)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("reference", "condition", "seed", "failed", "reason", "iou", "reward",
                                           "seconds", "guided_steps", "skipped_steps")}
        d.update(self.extra)
        return d


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_condition(pipe, refs, name: str, overrides: dict, critic=None, prompts=None, seeds=None,
                  sampling: dict | None = None, progress=None) -> list:
    """Sample every reference under ``overrides`` (guidance options; ``lam=0`` = unguided).

    Args:
        pipe: a :class:`~vlm3d_guidance.GuidedHunyuanPipeline` (e.g. :func:`toy.load_pipeline`).
        refs: references (see :func:`toy.references`).
        overrides: guidance options for this condition.
        critic: a critic to guide with instead of ``pipe.critic`` (the query ablations); the final
            reward is always measured with ``pipe.critic`` (the dual query).
        prompts: per-reference prompts (default: each reference's own).
        seeds: per-reference seeds (default ``0 .. len(refs)-1``).
        sampling: hy3dgen call arguments (default :data:`TOY_SAMPLING`).
        progress: optional callable ``(done, total, row)``.
    """
    sampling = dict(TOY_SAMPLING if sampling is None else sampling)
    seeds = list(range(len(refs))) if seeds is None else list(seeds)
    prompts = [r.prompt for r in refs] if prompts is None else list(prompts)
    judge_critic = pipe.critic
    rows = []
    for i, ref in enumerate(refs):
        start = time.perf_counter()
        if critic is not None:
            pipe.critic = critic
        try:
            out = pipe(image=ref.image, prompt=prompts[i], generator=torch.Generator().manual_seed(seeds[i]),
                       return_dict=True, enable_pbar=False, **sampling, **overrides)
        finally:
            pipe.critic = judge_critic
        seconds = time.perf_counter() - start
        mesh = out.meshes[0]
        verdict = judge(mesh, ref)
        reward = pipe.reward_of_latents(out.latents, prompts[i])[0]
        guided = sum(1 for rec in out.trace if rec.guided)
        skipped = sum(1 for rec in out.trace for s in rec.skipped if s not in (None, "not scheduled"))
        row = Row(ref.name, name, seeds[i], verdict["failed"], verdict["reason"], verdict["iou"], reward, seconds,
                  guided, skipped, mesh, dict(coverage=verdict["coverage"], components=verdict["components"],
                                              prompt=prompts[i]))
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(refs), row)
    return rows


def summarize(rows) -> dict:
    """Failure rate with its 95 % interval, mean IoU, mean final reward, seconds per asset."""
    n = len(rows)
    k = sum(r.failed for r in rows)
    rewards = [r.reward for r in rows if r.reward is not None and math.isfinite(r.reward)]
    reasons: dict = {}
    for r in rows:
        if r.failed:
            for part in r.reason.split("; "):
                key = "missing part" if part.startswith("missing") else part
                reasons[key] = reasons.get(key, 0) + 1
    return dict(count=n, failures=k, failure_rate=k / n if n else math.nan, failure_ci95=wilson(k, n),
                mean_iou=float(np.mean([r.iou for r in rows])) if n else math.nan,
                mean_reward=float(np.mean(rewards)) if rewards else math.nan,
                seconds_per_asset=float(np.mean([r.seconds for r in rows])) if n else math.nan,
                reasons=reasons)


def handle_present(row) -> bool:
    """For the hidden-handle references: the exported mesh covers the ground-truth handle."""
    return row.extra["coverage"].get("handle", 0.0) >= 0.5


def markdown_table(summaries: dict) -> str:
    """``| condition | failure rate [95 % CI] | mean IoU | reward | s/asset |`` for named summaries."""
    lines = ["| condition | n | failure rate [95 % CI] | mean IoU | final reward | s / asset |",
             "|---|--:|---|--:|--:|--:|"]
    for name, s in summaries.items():
        lo, hi = s["failure_ci95"]
        lines.append(f"| {name} | {s['count']} | {s['failure_rate']:.3f} [{lo:.2f}, {hi:.2f}] | {s['mean_iou']:.3f} | "
                     f"{s['mean_reward']:+.2f} | {s['seconds_per_asset']:.1f} |")
    return "\n".join(lines)
