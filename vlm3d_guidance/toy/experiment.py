"""The toy experiment: unguided vs guided on held-out references, judged on the exported meshes.

Every condition runs the same references with the same seeds (seed ``i`` for reference ``i``), so
guided and unguided rows differ only by guidance. The judge (:func:`~vlm3d_guidance.toy.judge`) looks
at the exported mesh only; the critic's reward of the final latents is reported beside it, never
used to decide success.
"""

from __future__ import annotations

import contextlib
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
                                              volume_ratio=verdict["volume_ratio"], prompt=prompts[i]))
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(refs), row)
    return rows


def summarize(rows) -> dict:
    """Failure rate with its 95 % interval, mean IoU, median volume ratio (the judge's
    ``volume_ratio``: above 1 the outputs swelled; NaN for rows recorded without it), mean final
    reward, seconds per asset."""
    n = len(rows)
    k = sum(r.failed for r in rows)
    rewards = [r.reward for r in rows if r.reward is not None and math.isfinite(r.reward)]
    reasons: dict = {}
    for r in rows:
        if r.failed:
            for part in r.reason.split("; "):
                key = "missing part" if part.startswith("missing") else part
                reasons[key] = reasons.get(key, 0) + 1
    volumes = [r.extra["volume_ratio"] for r in rows if math.isfinite(r.extra.get("volume_ratio", math.nan))]
    return dict(count=n, failures=k, failure_rate=k / n if n else math.nan, failure_ci95=wilson(k, n),
                mean_iou=float(np.mean([r.iou for r in rows])) if n else math.nan,
                median_volume_ratio=float(np.median(volumes)) if volumes else math.nan,
                mean_reward=float(np.mean(rewards)) if rewards else math.nan,
                seconds_per_asset=float(np.mean([r.seconds for r in rows])) if n else math.nan,
                reasons=reasons)


def handle_present(row) -> bool:
    """For the hidden-handle references: the exported mesh covers the ground-truth handle."""
    return row.extra["coverage"].get("handle", 0.0) >= 0.5


def markdown_table(summaries: dict) -> str:
    """``| condition | n | failure rate [95 % CI] | mean IoU | volume ratio | reward | s/asset |`` for
    named summaries (the volume ratio is the median; "-" for summaries recorded without it)."""
    lines = ["| condition | n | failure rate [95 % CI] | mean IoU | volume ratio (median) | final reward | s / asset |",
             "|---|--:|---|--:|--:|--:|--:|"]
    for name, s in summaries.items():
        lo, hi = s["failure_ci95"]
        volume = s.get("median_volume_ratio", math.nan)
        volume = f"{volume:.2f}" if math.isfinite(volume) else "-"
        lines.append(f"| {name} | {s['count']} | {s['failure_rate']:.3f} [{lo:.2f}, {hi:.2f}] | {s['mean_iou']:.3f} | "
                     f"{volume} | {s['mean_reward']:+.2f} | {s['seconds_per_asset']:.1f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def record_uphill(pipe):
    """Record, at every guided step, the reward at the clean estimate before and after the update.

    For each guided batch item: ``r(x0)`` (what the step measured) and ``r(x0 + u)`` with ``u`` the
    update the step actually applied (x0 mode: the update moves the clean estimate by exactly ``u``),
    seen as the step sees it (cameras fitted to each mesh when ``fill`` is set, the export's placement).
    A diagnostic: it costs one extra reward evaluation per guided step. Yields the list it fills
    with ``(step, r_before, r_after)``.
    """
    from ..guidance.step import reward_and_gradient

    steps: list = []
    original = pipe._guidance_update

    def wrapped(z, noise_pred, sigma, lam, prompts, cameras, cfg, record, **kw):
        update = original(z, noise_pred, sigma, lam, prompts, cameras, cfg, record, **kw)
        if update is None or kw.get("full"):
            return update
        x0 = z.detach().float() + (1.0 - sigma) * noise_pred.detach().float()
        for b in range(x0.shape[0]):
            before = record.reward[b] if b < len(record.reward) else None
            if before is None:
                continue
            after = reward_and_gradient(
                (x0[b:b + 1] + update[b:b + 1].to(x0.device)), pipe.pipeline.vae, pipe.critic, prompts[b], cameras,
                box_v=kw["box_v"], mc_level=kw["mc_level"], grid_resolution=cfg.grid_resolution,
                render_size=cfg.render_size, shading=cfg.shading, backend=cfg.backend,
                num_chunks=kw["num_chunks"], seconds={}, want_gradient=False,
                coarse_to_fine=cfg.coarse_to_fine, fill=cfg.fill,
                export_resolution=kw.get("export_resolution")).reward
            if after is not None:
                steps.append((record.step, before, after))
        return update

    pipe._guidance_update = wrapped
    try:
        yield steps
    finally:
        del pipe._guidance_update  # back to the class's method


def uphill_summary(steps) -> dict:
    """Share of recorded guided steps whose update raised the reward, and the mean change."""
    if not steps:
        return dict(count=0, raised=0, share=math.nan, mean_change=math.nan)
    changes = [after - before for _, before, after in steps]
    raised = sum(c > 0 for c in changes)
    return dict(count=len(changes), raised=raised, share=raised / len(changes), mean_change=float(np.mean(changes)))


def part_meshes(obj) -> list:
    """``[(verts [V, 3] float32, faces [F, 3])]``: each part of ``obj`` (a
    :class:`~vlm3d_guidance.toy.world.ToyObject`) alone, marching cubes of its SDF on the
    ground-truth grid of the sampler's box."""
    from ..geometry import marching_cubes
    from .references import BOX_V, sdf_grid

    meshes = []
    for part in obj.parts:
        verts, faces = marching_cubes(sdf_grid(part), bounds=(-BOX_V, BOX_V))
        meshes.append((verts.float(), faces))
    return meshes


def part_pixel_weights(meshes, cameras, cfg, cap: float = 20.0) -> torch.Tensor:
    """``[N, 1, S, S]`` per-pixel weights that make every part of an object count alike.

    Each part mesh of ``meshes`` (:func:`part_meshes` of the intact object) is rendered alone as a
    silhouette through ``cameras`` (``cfg.render_size``, ``cfg.backend``); a pixel a part covers
    weighs ``A_max / A_part`` (pixel areas summed over the views, the largest part 1, capped at
    ``cap``; where parts overlap, the largest weight), every other pixel 1. A table leg then weighs
    ~4-8 times a pixel of the top, a mug's handle ~10 times the body's.
    """
    from ..render import render_views

    with torch.no_grad():
        silhouettes = [render_views(verts, faces, cameras, size=cfg.render_size, shading="silhouette",
                                    backend=cfg.backend)[:, :1].clamp(0, 1) for verts, faces in meshes]
    areas = torch.stack([s.sum() for s in silhouettes])
    relative = (areas.max() / areas.clamp_min(1.0)).clamp(max=cap)
    weights = torch.ones_like(silhouettes[0])
    for silhouette, r in zip(silhouettes, relative):
        weights = torch.maximum(weights, silhouette * r)
    return weights


class ReferenceViewReward:
    """A diagnostic reward that KNOWS the answer: ``-100 * mean(w * (views - truth_views)^2)``, the
    critic's views compared with the intact ground truth's views from the same cameras (``w`` = 1,
    or :func:`part_pixel_weights` with ``part_weighted``: every part of the object counts alike).

    It answers "can the guided step repair a shape when its reward is right?", separating the
    update (decode -> mesh -> render -> x0 update) from the critic. Use it with ``fill=None``
    (cameras fixed, not fitted to each step's mesh, so the truth's views line up) and pass it as
    ``critic=`` to :func:`run_condition` one reference at a time (:meth:`for_reference`). It has the
    critic interface the pipeline uses (``reward``, ``check_prompt``, ``device``); it is not a
    critic, it never sees the prompt.
    """

    device = torch.device("cpu")

    def __init__(self, truth_views: torch.Tensor, weights: torch.Tensor | None = None):
        self.truth_views = truth_views  # [N, 3, S, S] in [0, 1]
        self.weights = weights  # [N, 1, S, S] or None (all 1)

    @classmethod
    def seen_by(cls, reference, cameras, cfg, part_weighted: bool = False) -> "ReferenceViewReward":
        """The reward whose truth views are ``reference.mesh`` rendered through ``cameras`` as the
        guided step renders (``cfg.render_size``, ``cfg.shading``, ``cfg.backend``); with
        ``part_weighted``, each pixel weighted by :func:`part_pixel_weights` of ``reference.object``'s
        parts."""
        from ..render import render_views

        verts = torch.as_tensor(np.asarray(reference.mesh.vertices), dtype=torch.float32)
        faces = torch.as_tensor(np.asarray(reference.mesh.faces), dtype=torch.long)
        with torch.no_grad():
            views = render_views(verts, faces, cameras, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend)
        weights = part_pixel_weights(part_meshes(reference.object), cameras, cfg) if part_weighted else None
        return cls(views.clamp(0, 1), weights)

    @classmethod
    def for_reference(cls, reference, cfg, box_v: float = 1.01, part_weighted: bool = False) -> "ReferenceViewReward":
        """The truth's views of ``reference.mesh`` with the cameras the guided step uses when
        ``cfg.fill`` is None (``cfg`` a :class:`~vlm3d_guidance.GuidanceConfig`)."""
        if cfg.fill is not None:
            raise ValueError("ReferenceViewReward needs fixed cameras: use it with fill=None")
        return cls.seen_by(reference, cfg.cameras(box_v), cfg, part_weighted=part_weighted)

    def check_prompt(self, *args, **kwargs) -> None:
        return None

    def reward(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """0-d tensor; ``images [N, 3, S, S]`` as the guided step renders them."""
        squared = (images - self.truth_views.to(images)).pow(2)
        if self.weights is not None:
            squared = self.weights.to(images) * squared
        return -100.0 * squared.mean()


class NegatedCritic:
    """A critic whose reward is minus ``critic``'s: guidance pushed the other way (a control: if the
    critic's gradient carries information, negating it must not give the same outcome)."""

    def __init__(self, critic):
        self.critic = critic
        self.device = critic.device

    def check_prompt(self, *args, **kwargs):
        return self.critic.check_prompt(*args, **kwargs)

    def reward(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        return -self.critic.reward(images, prompt)


def step_arguments(cfg, sampling: dict | None = None) -> dict:
    """The keyword arguments of :func:`~vlm3d_guidance.guidance.step.reward_and_gradient` with which a
    toy guided step judges a clean estimate (``cfg`` a :class:`~vlm3d_guidance.GuidanceConfig`,
    ``sampling`` the call's hy3dgen arguments, default :data:`TOY_SAMPLING`), except ``cameras``
    and ``fill``."""
    sampling = TOY_SAMPLING if sampling is None else sampling
    return dict(box_v=1.01, mc_level=0.0, grid_resolution=cfg.grid_resolution, render_size=cfg.render_size,
                shading=cfg.shading, backend=cfg.backend, num_chunks=sampling.get("num_chunks", 20000),
                seconds={}, coarse_to_fine=cfg.coarse_to_fine, export_resolution=sampling.get("octree_resolution"))


def unguided_estimates(pipe, refs, steps, seeds=None, sampling: dict | None = None, guided: dict | None = None):
    """Yield ``(reference, [(step, sigma, x0), ...])`` per reference: the clean-latent estimates
    ``x0 [1, L, C]`` (normal tensors, so they can take a gradient) at each of ``steps``, in order, of
    the stock hy3dgen sampler's run from that reference (seed ``i`` for reference ``i`` unless
    ``seeds``; ``sampling`` default :data:`TOY_SAMPLING`). With ``guided`` (guidance options, e.g.
    ``dict(lam=0.05)``) the run is ``pipe``'s guided one instead, and the estimates are the ones its
    guided steps judged (before their update)."""
    from .critic_training import recorded_estimates

    sampling = dict(TOY_SAMPLING if sampling is None else sampling)
    seeds = list(range(len(refs))) if seeds is None else list(seeds)
    for ref, seed in zip(refs, seeds):
        with recorded_estimates(pipe.pipeline) as estimates:
            if guided is None:
                pipe.pipeline(image=ref.image, generator=torch.Generator().manual_seed(seed), enable_pbar=False,
                              output_type="latent", **{k: v for k, v in sampling.items() if k != "octree_resolution"})
            else:
                pipe(image=ref.image, prompt=ref.prompt, generator=torch.Generator().manual_seed(seed),
                     enable_pbar=False, output_type="latent", **sampling, **guided)
        # cloned: recorded under hy3dgen's inference mode
        yield ref, [(k, estimates[k][0], estimates[k][1].clone()) for k in steps]


def gradient_agreement(pipe, refs, steps, seeds=None, sampling: dict | None = None, critic_for=None,
                       guided: dict | None = None) -> list:
    """Does the critic's gradient point where the truth's does? Cosines between latent gradients.

    For each reference, the unguided sampler runs (seed ``i``) and its clean-latent estimate
    ``x0 [1, L, C]`` is taken at each of ``steps``. There the critic's reward and its gradient
    w.r.t. ``x0`` are computed exactly as the guided step computes them (``pipe.config``: cameras
    fitted to this estimate's mesh when ``fill`` is set); then the gradient of
    :class:`ReferenceViewReward` (which knows the intact object) through the same stages and the
    SAME cameras, its truth views rendered with them.

    Args:
        critic_for: optional ``reference -> reward`` (anything with the critic's ``reward``) to
            compare instead of ``pipe.critic``.
        guided: guidance options (e.g. ``dict(lam=0.05)``): take the estimates from ``pipe``'s guided
            runs under them instead of the stock sampler's (:func:`unguided_estimates`): is the critic
            right where guidance takes the run?

    Returns:
        one dict per (reference, step): ``reference``, ``step``, ``sigma``, ``cosine`` (critic vs
        truth; None where a surface or gradient is missing), ``cosine_parts`` (critic vs the
        part-weighted truth, :func:`part_pixel_weights`) and ``reward`` (the critic's).
    """
    from ..guidance.step import reward_and_gradient

    sampling = dict(TOY_SAMPLING if sampling is None else sampling)
    cfg = pipe.config
    cams = cfg.cameras()
    common = step_arguments(cfg, sampling)
    out = []
    for ref, estimates in unguided_estimates(pipe, refs, steps, seeds, sampling, guided):
        critic = pipe.critic if critic_for is None else critic_for(ref)
        parts = part_meshes(ref.object)  # the part-weighted truth's meshes: the same at every step
        for k, sigma, x0 in estimates:
            judged = reward_and_gradient(x0, pipe.pipeline.vae, critic, ref.prompt, cams, fill=cfg.fill, **common)
            cosines = dict(cosine=None, cosine_parts=None)
            if judged.gradient is not None:
                plain = ReferenceViewReward.seen_by(ref, judged.cameras, cfg)
                weighted = ReferenceViewReward(plain.truth_views, part_pixel_weights(parts, judged.cameras, cfg))
                for key, knows in (("cosine", plain), ("cosine_parts", weighted)):
                    truth = reward_and_gradient(x0, pipe.pipeline.vae, knows, ref.prompt, judged.cameras, fill=None,
                                                **common)
                    if truth.gradient is not None:
                        cosines[key] = float(torch.nn.functional.cosine_similarity(
                            judged.gradient.flatten(), truth.gradient.flatten(), dim=0))
            out.append(dict(reference=ref.name, step=k, sigma=sigma, **cosines, reward=judged.reward))
    return out
