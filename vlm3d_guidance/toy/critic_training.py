"""The toy critic's data and training (stages ``critic_data`` and ``critic`` of
:mod:`vlm3d_guidance.toy.train`).

The samples are rendered exactly as the guided step renders (the toy guidance grid, the orbit
cameras fitted to the mesh, ``render_views`` at the toy size) and labelled by what the rendered
surface shows; the critic is transformers' ``Qwen2_5_VLForConditionalGeneration`` trained with a
logistic loss on :class:`~vlm3d_guidance.critic.VLMCritic`'s own reward ``r = z_yes - z_no``.
A sample is ``(images uint8 [N, 3, H, W], description, label 0/1, kind)``; ``kind`` is "final",
"estimate@<sigma>" or "rollout@<sigma>".
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import models
from .judge import judge_surface
from .world import CLASSES, DESCRIPTIONS

def _label_description(obj_cls: str, geometry_class: str | None, rng: np.random.Generator) -> list:
    """``[(description, label)]`` for one rendered shape: its own class's description, and one other."""
    own = DESCRIPTIONS[obj_cls]
    out = [(own, float(geometry_class == obj_cls))]
    if geometry_class is not None:
        hard = {"mug": "cup", "cup": "mug"}.get(geometry_class)
        others = [c for c in CLASSES if c != geometry_class]
        other = hard if hard is not None and rng.random() < 0.6 else others[int(rng.integers(len(others)))]
        if other != obj_cls:
            out.append((DESCRIPTIONS[other], 0.0))
        elif geometry_class != obj_cls:  # a handle-less mug described as a cup: a match
            out.append((DESCRIPTIONS[geometry_class], 1.0))
    return out


def verdict_geometry(verdict: dict, intact) -> str | None:
    """What a judged shape shows: ``intact.cls`` when the verdict is ok, ``"cup"`` for a mug judged
    only "missing handle", else None (broken)."""
    if not verdict["failed"]:
        return intact.cls
    return "cup" if intact.cls == "mug" and verdict["reason"] == "missing handle" else None


def shown_geometry(verts: torch.Tensor, faces: torch.Tensor, intact) -> str | None:
    """What a decoded surface shows (:func:`verdict_geometry` of :func:`~vlm3d_guidance.toy.judge`
    against the ``intact`` object it was encoded from)."""
    return verdict_geometry(judge_surface(verts, faces, intact), intact)


def view_turns(guidance, sizes, seed: int):
    """Azimuth offsets (degrees) for the critic's samples, one per rendered surface: uniform over
    one view spacing (``360 / guidance.num_views``) with ``sizes["critic_turned_views"]``, so the
    critic learns to judge the orbit turned by any angle (what ``GuidanceConfig.rotate_views``
    shows it), else always 0. Drawn from their own stream (``seed + 1000``): the labels' draws do
    not change with it."""
    rng = np.random.default_rng(seed + 1000)
    spacing = 360.0 / guidance.num_views
    while True:
        yield float(rng.uniform(0.0, spacing)) if sizes.get("critic_turned_views", False) else 0.0


@contextmanager
def recorded_estimates(pipeline):
    """Record the clean-latent estimate ``x0 = z + (1 - sigma) v`` (``[B, L, C]``, the CFG-combined
    velocity, as the guided step forms it) at every scheduler step of a stock hy3dgen call.

    Yields the list it fills with ``(sigma, x0)`` in step order.
    """
    estimates: list = []
    original = pipeline.scheduler.step
    scale = pipeline.scheduler.config.num_train_timesteps

    def step(noise_pred, t, latents, *args, **kwargs):
        sigma = float(t) / scale
        estimates.append((sigma, (latents.float() + (1.0 - sigma) * noise_pred.float()).detach().clone()))
        return original(noise_pred, t, latents, *args, **kwargs)

    pipeline.scheduler.step = step
    try:
        yield estimates
    finally:
        del pipeline.scheduler.step  # back to the class's method


def rollout_samples(pipeline, shapes, guidance, sizes, log, seed: int) -> tuple[list, dict]:
    """The generator's own sampling runs, rendered where guidance looks at them.

    For each of the first ``sizes["critic_rollouts"]`` intact critic-split objects, the stock
    hy3dgen ``pipeline`` samples from its reference (:data:`~vlm3d_guidance.toy.config.TOY_SAMPLING`,
    seed ``seed + i``); the clean-latent estimates at the steps ``sizes["critic_rollout_steps"]`` are
    rendered as the guided step renders them and labelled by the judge's verdict on the run's
    EXPORTED mesh (:func:`verdict_geometry`): what the run was heading for, which is what a reward
    that steers the run has to predict from a blurry early estimate.

    Returns:
        ``(samples, stats)``: samples as in :func:`make_critic_data`, kind ``"rollout@<sigma>"``;
        stats counts runs and failed runs per class.
    """
    from .config import TOY_SAMPLING
    from .judge import judge
    from .references import render_reference
    from .render_latent import latent_surface, surface_views

    rng = np.random.default_rng(seed)
    turns = view_turns(guidance, sizes, seed)
    export = TOY_SAMPLING["octree_resolution"]
    samples: list = []
    stats: dict = {}
    start = time.perf_counter()
    for i, (obj, _) in enumerate(shapes[: sizes["critic_rollouts"]]):
        with recorded_estimates(pipeline) as estimates:
            mesh = pipeline(image=render_reference(obj), generator=torch.Generator().manual_seed(seed + i),
                            enable_pbar=False, **TOY_SAMPLING)[0]
        geometry = verdict_geometry(judge(mesh, SimpleNamespace(object=obj)), obj)
        runs = stats.setdefault(obj.cls, dict(runs=0, failed=0))
        runs["runs"] += 1
        runs["failed"] += geometry != obj.cls
        for k in sizes["critic_rollout_steps"]:
            sigma, x0 = estimates[k]
            surface = latent_surface(pipeline.vae, x0, guidance, export)
            if surface is None:
                continue
            u8 = surface_views(*surface, guidance, azimuth_offset=next(turns)).mul(255).round().to(torch.uint8)
            for desc, label in _label_description(obj.cls, geometry, rng):
                samples.append((u8, desc, label, f"rollout@{sigma:.2f}"))
        if i % 20 == 0:
            log(f"critic data: rollout {i}/{sizes['critic_rollouts']}, {len(samples)} samples, {stats} "
                f"({time.perf_counter() - start:.0f} s)")
    return samples, stats


def make_critic_data(shapes, latents, dit, conditioner, vae, refs, guidance, sizes, log, seed: int) -> dict:
    """Stage 6: the critic's samples, rendered as the guided step renders.

    Args:
        shapes: ``[(intact, broken or None)]`` critic-split objects; ``latents``: their latents
            (``intact``, ``broken`` ``[N, L, C]``, unscaled); ``refs``: their conditioner inputs
            (``image``, ``mask``, as :func:`~vlm3d_guidance.toy.train.prepare_references` makes).
        seed: seeds the labels' description draws and the estimates' noise and sigmas.

    Labels follow what the rendered surface SHOWS, not what it was encoded from: each final
    latent's surface (the mesh the views are made of) is judged against its intact object
    (:func:`shown_geometry`), because the autoencoder does not draw every break it is given (a
    missing leg can come back, a gap can close) and a "No" on a picture of an intact table teaches
    the critic nothing about tables. A clean-latent estimate at random sigma is labelled by the
    shown geometry of the final latent it was noised from.

    Returns:
        dict with ``samples`` ``[(images uint8 [N, 3, H, W], description, label, kind)]`` and
        ``stats`` (counts of final latents whose shown geometry differs from the nominal one).
    """
    from .config import TOY_SAMPLING
    from .render_latent import latent_surface, surface_views

    rng = np.random.default_rng(seed)
    turns = view_turns(guidance, sizes, seed)
    gen = torch.Generator().manual_seed(seed)
    scale = vae.scale_factor
    export = TOY_SAMPLING["octree_resolution"]
    data = []
    stats = dict(final_latents=0, empty=0, intact_shown_broken=0, broken_shown_intact=0)
    start = time.perf_counter()
    for i, (obj, broken) in enumerate(shapes):
        nominal = {"intact": obj.geometry_class}
        if broken is not None:
            nominal["broken"] = broken.geometry_class
        shown, items = {}, []
        for key in nominal:
            surface = latent_surface(vae, latents[key][i:i + 1] * scale, guidance, export)
            stats["final_latents"] += 1
            if surface is None:
                stats["empty"] += 1
                shown[key] = None
                continue
            shown[key] = shown_geometry(*surface, obj)
            stats["intact_shown_broken"] += key == "intact" and shown[key] != nominal[key]
            stats["broken_shown_intact"] += key == "broken" and shown[key] == obj.cls
            items.append((surface, shown[key], "final"))
        for _ in range(sizes["critic_estimates"]):
            target = "broken" if broken is not None and rng.random() < 0.5 else "intact"
            x1 = latents[target][i:i + 1] * scale
            s = float(rng.uniform(0.15, 0.95))
            eps = torch.randn(x1.shape, generator=gen)
            z = s * x1 + (1 - s) * eps
            with torch.no_grad():
                cond = conditioner(image=refs["image"][i:i + 1], mask=refs["mask"][i:i + 1])["main"]
                both = dit(torch.cat([z, z]), torch.tensor([s, s]), {"main": torch.cat([cond, torch.zeros_like(cond)])})
                vc, vu = both.chunk(2)
                v = vu + 5.0 * (vc - vu)
            surface = latent_surface(vae, z + (1 - s) * v, guidance, export)
            if surface is not None:
                items.append((surface, shown[target], f"estimate@{s:.2f}"))
        for surface, geometry, kind in items:
            u8 = surface_views(*surface, guidance, azimuth_offset=next(turns)).mul(255).round().to(torch.uint8)
            for desc, label in _label_description(obj.cls, geometry, rng):
                data.append((u8, desc, label, kind))
        if i % 20 == 0:
            log(f"critic data: object {i}/{len(shapes)}, {len(data)} samples, {stats} "
                f"({time.perf_counter() - start:.0f} s)")
    log(f"critic data: {len(data)} samples; shown vs nominal geometry of the final latents: {stats}")
    return dict(samples=data, stats=stats)


def train_critic(data, sizes, log, folder: Path, seed: int):
    """Stage 7: the toy critic (saved to ``folder``) trained on its reward's logistic loss; ``seed``
    initialises the model, ``seed + 1`` draws the held-out split and the sample order."""
    from ..critic import VLMCritic

    model = models.new_critic_model(seed=seed)
    models.write_critic_files(folder)
    critic = VLMCritic(model, models.critic_processor(folder))
    model.requires_grad_(True)
    model.train()  # Qwen2.5-VL has no dropout: train mode changes nothing but the flag
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(len(data))
    held = set(order[: max(1, len(data) // 10)].tolist())
    train_idx = [i for i in order if i not in held]
    weights = label_balance_weights(data, sizes["critic_max_weight"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=sizes["critic_lr"], weight_decay=0.01)
    batch = 8
    total_steps = sizes["critic_epochs"] * math.ceil(len(train_idx) / batch)  # optimizer steps, all epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sizes["critic_lr"], total_steps=max(1, total_steps),
                                                pct_start=0.05)
    start = time.perf_counter()
    seen = 0
    for epoch in range(sizes["critic_epochs"]):
        rng.shuffle(train_idx)
        running = []
        for b0 in range(0, len(train_idx), batch):
            opt.zero_grad(set_to_none=True)
            chunk = train_idx[b0:b0 + batch]
            for i in chunk:
                images, desc, label, _ = data[i]
                r = critic.reward(images.float() / 255, desc)
                loss = weights[i] * torch.nn.functional.binary_cross_entropy_with_logits(r, torch.tensor(label)) / len(chunk)
                loss.backward()
                running.append(float(loss.detach()) * len(chunk))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            seen += len(chunk)
        acc = critic_accuracy(critic, data, sorted(held))
        log(f"critic epoch {epoch}: loss {np.mean(running):.4f}, held-out balanced accuracy {acc['balanced']:.3f} "
            f"{acc['per_description']}, accuracy {acc['all']:.3f} "
            f"(final {acc['final']:.3f}, estimates {acc['estimate']:.3f}, rollouts {acc['rollout']:.3f}; "
            f"majority answer {acc['majority_baseline']:.3f}) "
            f"({time.perf_counter() - start:.0f} s)")
    model.requires_grad_(False)
    model.eval()
    return model, critic_accuracy(critic, data, sorted(held))


def label_balance_weights(data, max_weight: float = 3.0) -> list:
    """Per-sample loss weights under which every description's Yes and No samples weigh the same
    (each capped at ``max_weight`` times the mean: uncapped, the rare groups' weights of ~7 with a
    3x learning rate for the vision tower made training diverge to a constant answer).

    Without them the critic can score well on the description alone (in v2's data 47 of 622
    "a mug with a handle" samples were Yes: the guidance grid rarely shows a handle whole), and it
    did: its reward was the same for every mug, whatever the views showed. Mean weight 1.
    """
    from collections import Counter

    groups = Counter((d[1], d[2] > 0.5) for d in data)
    per_desc = Counter(d[1] for d in data)
    raw = [per_desc[d[1]] / (2 * groups[(d[1], d[2] > 0.5)]) for d in data]
    mean = float(np.mean(raw))
    capped = [min(w / mean, max_weight) for w in raw]
    mean = float(np.mean(capped))
    return [w / mean for w in capped]


@torch.no_grad()
def critic_accuracy(critic, data, indices) -> dict:
    hits = {"all": [], "final": [], "estimate": [], "rollout": []}
    for i in indices:
        images, desc, label, kind = data[i]
        r = float(critic.reward(images.float() / 255, desc))
        ok = (r > 0) == (label > 0.5)
        hits["all"].append(ok)
        hits[kind.split("@")[0]].append(ok)
    out = {k: float(np.mean(v)) if v else math.nan for k, v in hits.items()}
    by_group: dict = {}
    for i, ok in zip(indices, hits["all"]):
        by_group.setdefault(data[i][1], {}).setdefault(data[i][2] > 0.5, []).append(ok)
    # balanced accuracy per description (mean of the Yes and No hit rates present): 0.5 = blind
    out["per_description"] = {d.split(" ")[1]: round(float(np.mean([np.mean(v) for v in g.values()])), 3)
                              for d, g in sorted(by_group.items())}
    out["balanced"] = float(np.mean(list(out["per_description"].values()))) if by_group else math.nan
    yes = float(np.mean([data[i][2] > 0.5 for i in indices])) if indices else math.nan
    out["majority_baseline"] = max(yes, 1.0 - yes)  # accuracy of always giving the commoner answer
    return out
