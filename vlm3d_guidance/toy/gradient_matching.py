"""Gradient matching: fine-tune the toy critic so its reward's gradient points where the truth's does.

``python -m vlm3d_guidance.toy.gradient_matching [--weights DIR] [--threads 2]`` refines the base
critic that :mod:`vlm3d_guidance.toy.train` makes (``<weights>/critic``) into the matched critic the
toy guides with (``<weights>/critic-matched``), and adds it to the manifest.

Why: a critic trained to classify (Yes for intact, No for broken) can be right about a shape and still
have a gradient that points nowhere useful; guidance follows the gradient. The base critic's latent
gradient agreed with the truth's at cosine +0.13 on the test estimates and guidance changed nothing;
matched, +0.69 (benchmarks/RESULTS.md). What is matched, per sample (a critic-split object's unguided
sampling run, the clean estimate ``x0`` at one of :data:`MATCHING` ``["steps"]``):

* ``V = render_views(surface(x0))`` through the guided step's own cameras (fitted to the surface),
  as the guided step renders it: ``latent_surface`` at the toy guidance grid, placed as the export;
* the target ``t = d/dverts sum(w * V * sg(T - V))``, the vertex gradient of the part-weighted
  truth-view reward ``-1/2 sum(w (V - T)^2)``: ``T`` the intact object's views through the same
  cameras, ``w`` :func:`~vlm3d_guidance.toy.experiment.part_pixel_weights` (a table leg's pixels
  count as much in total as the top's);
* the critic's vertex gradient ``g = J_render^T dr/dV`` (``r = z_yes - z_no`` of the default dual
  query), and the loss ``1 - cos(g, t) + w_keep (r - r_start)^2`` (the second term keeps the
  verdicts of the critic the phase started from). ``dr/dV`` is differentiated again
  (``create_graph``), so the critic runs with eager attention (sdpa has no double backward on CPU).

A phase with ``space="latent"`` matches the decoder's pull-backs instead, ``1 - cos(B g, B t)``
with each sample's stored latent basis ``B`` (:mod:`.latent_basis`): guidance steps along
``J^T g``, not ``g``, and vertex matching left the critic's latent step biased towards growing the
shape (its latent volume cosine +0.62 on held-out estimates, the truth's +0.34; after the latent
phase +0.48).

Training runs in :data:`MATCHING` ``["phases"]`` (each its own one-cycle schedule and ``r_start``),
holding out ``held_share`` of the objects (their cosine is logged per epoch and kept in the
manifest). A phase with ``on_policy`` first lets the critic as it stands guide the first
``on_policy["objects"]`` objects (at ``on_policy["lams"]``, one per block of objects) and adds the
estimates its guided steps judged as samples (:func:`on_policy_samples`): guidance takes the run to
estimates the stock sampler never makes, and there the critic's gradient agreed far less (P4: +0.73
at stock estimates, +0.30 on lam 0.05 runs, negative at their last steps). The shipped recipe has no
such phase: one was tried (``benchmarks/toy_experiments/on_policy.py``) and not shipped. A phase with
``objects=N`` trains on the first N objects only, so a recipe may add objects for its later phases
(the held-out split keeps each block of objects apart: :func:`held_out_split`). ``--jobs N`` makes
the samples in N processes (the same rows); a cache of fewer objects with the same steps and rank is
extended rather than made again; ``--resume-phase K`` starts from the folder's matched critic, made
by phases ``0..K-1`` of the same recipe, and runs the rest.
The shipped matched critic is the one these settings describe: phases 0-2 were run as separate
scripts over several sessions (``benchmarks/toy_experiments/gradient_matching_*``), phase 3 by this
command (``--resume-phase 3``, its samples made again by this module), phase 4 by this command
(``--resume-phase 4``) on samples with bases made by ``benchmarks/toy_experiments/latent_matching.py
prep`` (equal, tensor for tensor, to this module's on the objects checked); measured times and the
provenance in the manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .latent_basis import BASIS_RANK, latent_cosine, with_latent_basis

#: the shipped matched critic's recipe: 280 critic-split objects, 9 estimates each (2,520 samples,
#: each with a rank-``basis_rank`` latent basis), five phases: four in vertex space, then one in
#: latent space (the last three show tables' and mugs' samples twice per epoch: the classes that fail)
MATCHING = dict(objects=280, steps=[2, 5, 7, 10, 12, 15, 17, 20, 22], lr=1e-4, w_keep=0.05, batch=8,
                held_share=0.1, seed=0, basis_rank=BASIS_RANK,
                phases=[dict(epochs=2), dict(epochs=2), dict(epochs=3, class_repeat=dict(table=2, mug=2)),
                        dict(epochs=2, class_repeat=dict(table=2, mug=2)),
                        dict(epochs=2, class_repeat=dict(table=2, mug=2), space="latent")])
QUICK = dict(MATCHING, objects=3, steps=[2, 22], batch=2, basis_rank=4,
             phases=[dict(epochs=1), dict(epochs=1, class_repeat=dict(table=2), on_policy=dict(objects=1, lams=(0.05,)),
                                          space="latent")])


def matching_sample(obj, x0: torch.Tensor, vae, cfg, truth_mesh=None, parts=None) -> dict | None:
    """One matching sample of critic-split object ``obj`` from a clean estimate ``x0 [1, L, C]``.

    Returns ``dict(verts [V, 3] float32, faces [F, 3] long, cams, V [N, 3, S, S] uint8 (the surface's
    views), t_verts [V, 3] (the part-weighted truth-view reward's vertex gradient), cls, prompt)``,
    or None when the estimate has no surface. ``cfg`` is the guidance config whose views are matched
    (cameras fitted to the surface with ``cfg.fill``, ``cfg.render_size``, ``cfg.shading``).
    """
    from ..render.cameras import fit_to_points
    from .experiment import part_meshes
    from .references import _mesh_tensors
    from .render_latent import latent_surface

    surface = latent_surface(vae, x0.float(), cfg, 64)
    if surface is None:
        return None
    verts, faces = surface
    cams = fit_to_points(cfg.cameras(1.01), verts, cfg.fill)
    views, target = part_weighted_target(verts, faces, cams, truth_mesh if truth_mesh is not None else _mesh_tensors(obj),
                                         parts if parts is not None else part_meshes(obj), cfg)
    return dict(cls=obj.cls, prompt=obj.description, verts=verts, faces=faces, cams=cams,
                V=views.mul(255).round().to(torch.uint8), t_verts=target)


def part_weighted_target(verts, faces, cams, truth_mesh, parts, cfg):
    """``(V, t)``: the views ``V [N, 3, S, S]`` of the surface ``verts [V, 3]``, ``faces [F, 3]``
    through ``cams`` and the target ``t [V, 3] = d/dverts sum(w * V * sg(T - V))``, ``T`` the views
    of ``truth_mesh`` (``(verts, faces)``) and ``w`` :func:`part_pixel_weights` of ``parts``."""
    from ..render import render_views
    from .experiment import part_pixel_weights

    weights = part_pixel_weights(parts, cams, cfg)

    def render(v, f):
        return render_views(v, f, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend).clamp(0, 1)

    with torch.no_grad():
        truth = render(*truth_mesh)
    v = verts.clone().requires_grad_(True)
    with torch.enable_grad():
        views = render(v, faces)
        (weights * views * (truth - views.detach())).sum().backward()
    return views.detach(), v.grad.clone()


def matching_samples(pipeline, shapes, steps, cfg, sampling: dict, log=print, start: int = 0,
                     lams: list | None = None, basis_rank: int | None = None) -> list[dict]:
    """The samples of critic-split ``shapes`` (``[(ToyObject, _)]``, object ``start + j``): each
    object's unguided run of hy3dgen's ``pipeline`` (seed ``ROLLOUT_SEED + i``, ``sampling``
    arguments) recorded, one :func:`matching_sample` per step in ``steps``, tagged with ``i``,
    ``step`` and ``sigma``.

    On-policy samples: with ``lams`` (one per shape), ``pipeline`` is a
    :class:`~vlm3d_guidance.GuidedHunyuanPipeline` and object ``start + j`` runs GUIDED by its critic
    at ``lam = lams[j]`` with the object's own description (same seed); the estimates are the ones
    its guided steps judged, and the samples are also tagged ``source="guided lam <lam>"``.

    With ``basis_rank`` each sample also gets its latent basis (:func:`.latent_basis.with_latent_basis`,
    for latent phases); an estimate whose surface the basis cannot reproduce is dropped.
    """
    from .critic_training import recorded_estimates
    from .experiment import part_meshes
    from .references import _mesh_tensors, render_reference
    from .train import ROLLOUT_SEED  # the critic-data rollouts' seeds: object i samples with ROLLOUT_SEED + i

    stock = pipeline.pipeline if lams is not None else pipeline
    rows, t0 = [], time.perf_counter()
    for j, (obj, _) in enumerate(shapes):
        i = start + j
        generator = torch.Generator().manual_seed(ROLLOUT_SEED + i)
        with recorded_estimates(stock) as estimates:
            if lams is None:
                pipeline(image=render_reference(obj), generator=generator, enable_pbar=False, output_type="latent", **sampling)
            else:
                pipeline(image=render_reference(obj), prompt=obj.description, generator=generator, enable_pbar=False,
                         output_type="latent", lam=lams[j], **sampling)
        truth, parts = _mesh_tensors(obj), part_meshes(obj)
        tag = {} if lams is None else dict(source=f"guided lam {lams[j]}")
        for k in steps:
            sigma, x0 = estimates[k]
            sample = matching_sample(obj, x0, stock.vae, cfg, truth, parts)
            if sample is not None and basis_rank:
                sample = with_latent_basis(sample, stock.vae, x0, cfg, basis_rank)
            if sample is not None:
                rows.append(dict(sample, i=i, step=k, sigma=sigma, **tag))
        if j % 20 == 0 or j == len(shapes) - 1:
            log(f"matching samples: object {i}, {len(rows)} samples ({time.perf_counter() - t0:.0f} s)")
    return rows


def on_policy_lams(on_policy: dict) -> list:
    """The lam each of the first ``on_policy["objects"]`` critic-split objects is guided at: the
    objects in ``len(lams)`` equal contiguous blocks, block ``b`` at ``on_policy["lams"][b]``."""
    count, lams = on_policy["objects"], list(on_policy["lams"])
    return [lams[i * len(lams) // count] for i in range(count)]


def _samples_worker(job: tuple) -> str:
    """One process's share of :func:`range_samples` (``job = (weights, objects, start, stop, steps,
    path, critic, lams, basis_rank)``, one torch thread), saved to ``path``; spawned by :func:`sample_objects`."""
    weights, objects, start, stop, steps, path, critic, lams, basis_rank = job
    torch.set_num_threads(1)
    rows = range_samples(weights, objects, start, stop, steps,
                         log=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] [{start}-{stop - 1}] {msg}", flush=True),
                         critic=critic, lams=lams, basis_rank=basis_rank)
    torch.save(rows, path)
    return path


def range_samples(weights, objects: int, start: int, stop: int, steps: list, log=print,
                  critic: str | None = None, lams: list | None = None, basis_rank: int | None = None) -> list[dict]:
    """:func:`matching_samples` of critic-split objects ``start .. stop-1`` (of the first ``objects``),
    with the generator in ``weights`` at the toy's sampling and guidance settings. On-policy: with
    ``critic`` (a saved critic's folder) and ``lams`` (one per object ``0 .. objects-1``) the runs are
    guided by that critic (as :func:`vlm3d_guidance.toy.load_pipeline` builds it, at :data:`TOY_SAMPLING`
    with its export resolution, which places the surface the guided step judges). ``basis_rank``: see
    :func:`matching_samples`."""
    from .config import TOY_GUIDANCE, TOY_SAMPLING
    from .train import critic_shapes

    pipeline = models.load_generator(Path(weights))
    shapes = critic_shapes(objects)[start:stop]
    if critic is None:
        sampling = {k: v for k, v in TOY_SAMPLING.items() if k != "octree_resolution"}
        return matching_samples(pipeline, shapes, steps, TOY_GUIDANCE, sampling, log, start=start, basis_rank=basis_rank)
    from ..critic import VLMCritic
    from ..pipeline import GuidedHunyuanPipeline

    guided = GuidedHunyuanPipeline(pipeline=pipeline, critic=VLMCritic.from_pretrained(critic, device="cpu", dtype="float32"),
                                   config=TOY_GUIDANCE)
    return matching_samples(guided, shapes, steps, TOY_GUIDANCE, dict(TOY_SAMPLING), log, start=start,
                            lams=lams[start:stop], basis_rank=basis_rank)


def sample_objects(weights: Path, objects: int, steps: list, jobs: int, work: Path, log=print,
                   critic: str | None = None, lams: list | None = None, basis_rank: int | None = None,
                   start: int = 0) -> list[dict]:
    """:func:`range_samples` of critic-split objects ``start .. objects-1``: in this process when
    ``jobs`` is 1, else split into ``jobs`` contiguous ranges run in spawned processes of one thread
    each; the same rows, in the same order, either way (each object samples with its own seed)."""
    import multiprocessing

    if jobs <= 1:
        return range_samples(weights, objects, start, objects, steps, log, critic=critic, lams=lams, basis_rank=basis_rank)
    bounds = np.linspace(start, objects, jobs + 1).round().astype(int)
    kind = "samples" if critic is None else "on_policy"
    tasks = [(str(weights), objects, int(a), int(b), list(steps), str(work / f"{kind}_part_{a}_{b}.pt"), critic, lams,
              basis_rank)
             for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with multiprocessing.get_context("spawn").Pool(len(tasks)) as pool:
        paths = pool.map(_samples_worker, tasks)
    rows = []
    for path in paths:
        rows.extend(torch.load(path, weights_only=False))
        Path(path).unlink()
    return rows


def vertex_gradient(critic, sample: dict, cfg, create_graph: bool = False):
    """``(r, g)``: the critic's reward of the sample's views and its gradient pulled back through the
    render to the vertices, ``g = J_render^T dr/dV`` (``[V, 3]``); with ``create_graph`` both stay
    differentiable in the critic's weights."""
    from ..render import render_views

    v = sample["verts"].clone().requires_grad_(True)
    with torch.enable_grad():
        views = render_views(v, sample["faces"], sample["cams"], size=cfg.render_size, shading=cfg.shading,
                             backend=cfg.backend).clamp(0, 1)
        detached = views.detach().requires_grad_(True)
        reward = critic.reward(detached, sample["prompt"])
        image_grad, = torch.autograd.grad(reward, detached, create_graph=create_graph)
        vertex_grad, = torch.autograd.grad(views, v, grad_outputs=image_grad, create_graph=create_graph)
    return reward, vertex_grad


def matching_cosine(critic, sample: dict, cfg, create_graph: bool = False):
    """``(r, cos(g, t))`` of :func:`vertex_gradient` and the sample's target ``t_verts``."""
    reward, grad = vertex_gradient(critic, sample, cfg, create_graph)
    return reward, F.cosine_similarity(grad.flatten(), sample["t_verts"].flatten(), dim=0)


def held_out_split(samples: list[dict], share: float, rng: np.random.Generator,
                   bounds: list[int] | None = None, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, held)`` sample indices: ``share`` of the objects (``sample["i"]``) held out whole.

    Without ``bounds`` the held-out objects are drawn by one permutation from ``rng``. With increasing
    object counts ``bounds`` (:func:`object_blocks`), each block is split on its own: objects below
    ``bounds[0]`` by the permutation from ``rng``, objects in ``[bounds[b-1], bounds[b])`` by one from
    ``np.random.default_rng([seed, bounds[b-1]])``. So a recipe that adds objects for a later phase
    keeps the earlier phases' split, and nothing an earlier phase trained on is held out later.
    """
    objects = sorted({s["i"] for s in samples})
    edges = [0] + list(bounds or [max(objects) + 1])
    held_objects: set = set()
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        block = [i for i in objects if lo <= i < hi]
        draw = rng if b == 0 else np.random.default_rng([seed, lo])
        held_objects |= set(draw.permutation(block)[: max(1, int(len(block) * share))].tolist()) if block else set()
    train = [k for k, s in enumerate(samples) if s["i"] not in held_objects]
    return train, [k for k, s in enumerate(samples) if s["i"] in held_objects]


def phase_objects(phase: dict, sizes: dict) -> int:
    """How many critic-split objects (the first ones) a phase trains and holds out on: ``phase["objects"]``,
    by default all of the recipe's ``sizes["objects"]``."""
    return phase.get("objects", sizes["objects"])


def object_blocks(sizes: dict) -> list[int]:
    """The recipe's object counts, increasing: the blocks :func:`held_out_split` splits one by one."""
    return sorted({phase_objects(p, sizes) for p in sizes["phases"]} | {sizes["objects"]})


def phase_cosine(phase: dict):
    """The cosine a phase matches: :func:`matching_cosine` (vertex gradients; ``space`` absent or
    ``"vertex"``) or :func:`.latent_basis.latent_cosine` (``space="latent"``: the decoder's pull-backs)."""
    space = phase.get("space", "vertex")
    if space not in ("vertex", "latent"):
        raise ValueError(f"phase space={space!r}: use 'vertex' or 'latent'")
    return latent_cosine if space == "latent" else matching_cosine


def held_out_cosine(critic, samples: list[dict], idx: list[int], cfg, cosine=matching_cosine) -> dict:
    """Mean ``cosine`` (default :func:`matching_cosine`) over ``idx``: ``all``, ``positive`` share, by class."""
    cos = [float(cosine(critic, samples[k], cfg)[1]) for k in idx]
    by_class: dict = {}
    for k, c in zip(idx, cos):
        by_class.setdefault(samples[k]["cls"], []).append(c)
    return dict(all=round(float(np.mean(cos)), 4), positive=round(float(np.mean(np.array(cos) > 0)), 3),
                by_class={c: round(float(np.mean(v)), 4) for c, v in sorted(by_class.items())})


def train_phase(critic, samples: list[dict], phase: dict, sizes: dict, cfg, log=print) -> list[dict]:
    """One phase of matching: ``phase["epochs"]`` epochs of AdamW (``sizes["lr"]`` one-cycle, weight
    decay 0.01, gradient clip 1.0, batch ``sizes["batch"]``) on the loss of the module docstring,
    anchored to the rewards the critic gives at the phase's start. ``phase["class_repeat"]`` shows a
    class's training samples that many times per epoch; ``phase["objects"]`` limits the phase to the
    first that many objects (:func:`phase_objects`; the held-out split: :func:`held_out_split` over
    :func:`object_blocks`); ``phase["space"]`` picks the cosine
    (:func:`phase_cosine`; a latent phase needs samples with bases). Returns the held-out cosine per
    epoch, in the phase's space (the first entry: before training)."""
    cosine = phase_cosine(phase)
    rng = np.random.default_rng(sizes["seed"])  # the split, then the epochs' shuffles: the same every phase
    train, held = held_out_split(samples, sizes["held_share"], rng, object_blocks(sizes), sizes["seed"])
    limit = phase_objects(phase, sizes)
    train, held = ([k for k in idx if samples[k]["i"] < limit] for idx in (train, held))
    repeat = phase.get("class_repeat", {})
    train = [k for k in train for _ in range(repeat.get(samples[k]["cls"], 1))]
    model = critic.model
    with torch.no_grad():
        start_reward = {k: float(critic.reward(samples[k]["V"].float() / 255, samples[k]["prompt"])) for k in sorted(set(train))}
    history = [held_out_cosine(critic, samples, held, cfg, cosine)]
    log(f"matching phase {phase}: {len(train)} training samples, {len(held)} held out; before {history[0]}")
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=sizes["lr"], weight_decay=0.01)
    total = phase["epochs"] * math.ceil(len(train) / sizes["batch"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=sizes["lr"], total_steps=total, pct_start=0.1)
    t0 = time.perf_counter()
    for epoch in range(phase["epochs"]):
        rng.shuffle(train)
        cosines, skipped = [], []
        for b0 in range(0, len(train), sizes["batch"]):
            chunk = train[b0:b0 + sizes["batch"]]
            opt.zero_grad(set_to_none=True)
            for k in chunk:
                reward, cos = cosine(critic, samples[k], cfg, create_graph=True)
                loss = ((1 - cos) + sizes["w_keep"] * (reward - start_reward[k]) ** 2) / len(chunk)
                if not torch.isfinite(loss):  # a degenerate sample must not poison the weights: skip it, say so
                    skipped.append(k)
                    continue
                loss.backward()
                cosines.append(float(cos.detach()))
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.parameters())
            if not grads_finite:
                skipped.extend(chunk)
                opt.zero_grad(set_to_none=True)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
        model.eval()
        history.append(held_out_cosine(critic, samples, held, cfg, cosine))
        model.train()
        note = f"; skipped {len(skipped)} non-finite samples (objects {sorted({samples[k]['i'] for k in skipped})})" if skipped else ""
        log(f"  epoch {epoch}: train cos {np.mean(cosines) if cosines else float('nan'):+.3f}; held out {history[-1]} "
            f"({time.perf_counter() - t0:.0f} s){note}")
    model.requires_grad_(False)
    model.eval()
    return history


def on_policy_samples(critic, weights: Path, work: Path, phase: int, on_policy: dict, steps: list, jobs: int,
                      log=print, basis_rank: int | None = None) -> tuple[list[dict], bool]:
    """``(rows, from_cache)``: phase ``phase``'s on-policy samples: the critic as it stands (saved to ``work``) guides the first
    ``on_policy["objects"]`` critic-split objects at :func:`on_policy_lams`; one :func:`matching_sample`
    per step of each guided run (:func:`matching_samples` with ``lams``). Cached in ``work`` under the
    phase and the sha256 of the guiding critic's weights, so a cache is used only for the same critic."""
    folder = work / f"critic_for_phase_{phase}"
    shutil.rmtree(folder, ignore_errors=True)
    models.save_critic(folder, critic.model)
    digest = models.sha256(folder / "model.safetensors")[:16]
    lams = on_policy_lams(on_policy)
    cache = work / f"on_policy_{phase}_{on_policy['objects']}_{'-'.join(map(str, on_policy['lams']))}{_rank_tag(basis_rank)}_{digest}.pt"
    from_cache = cache.exists()
    if from_cache:
        rows = torch.load(cache, weights_only=False)
        log(f"{len(rows)} on-policy samples from {cache}")
    else:
        rows = sample_objects(weights, on_policy["objects"], steps, jobs, work, log, critic=str(folder), lams=lams,
                              basis_rank=basis_rank)
        torch.save(rows, cache)
        log(f"{len(rows)} on-policy samples (guided at lam {sorted(set(lams))}) -> {cache}")
    shutil.rmtree(folder, ignore_errors=True)
    return rows, from_cache


def _without_resume_prefix(provenance: str) -> str:
    """An earlier resume's provenance without its leading "phases 0-K and the wall times without
    'resumed_': " (a later resume states its own, instead of nesting them)."""
    import re

    return re.sub(r"^phases 0-\d+ and the wall times without 'resumed_': ", "", provenance)


def _rank_tag(basis_rank: int | None) -> str:
    return f"_rank{basis_rank}" if basis_rank else ""


def _cache_name(objects: int, steps: list, basis_rank: int | None) -> str:
    """The sample cache's file name: the samples depend on the objects, steps and basis rank only."""
    return f"samples_{objects}_{'-'.join(map(str, steps))}{_rank_tag(basis_rank)}.pt"


def _smaller_cache(work: Path, objects: int, steps: list, basis_rank: int | None) -> tuple[int, Path] | None:
    """``(n, path)``: the cache in ``work`` of the most objects ``n < objects`` with the same steps and
    basis rank (its samples are those of objects ``0..n-1``, the same in any larger run), or None."""
    found = [(n, work / _cache_name(n, steps, basis_rank)) for n in range(objects - 1, 0, -1)]
    return next(((n, p) for n, p in found if p.exists()), None)


def _explicit_objects(sizes: dict) -> list[dict]:
    """The recipe's phases, each with its object count written out (:func:`phase_objects`)."""
    return [dict(p, objects=phase_objects(p, sizes)) for p in sizes["phases"]]


def main(argv=None) -> int:
    from ..critic import VLMCritic
    from .config import TOY_GUIDANCE

    parser = argparse.ArgumentParser(prog="python -m vlm3d_guidance.toy.gradient_matching",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(models.WEIGHTS_DIR),
                        help="toy weights folder made by toy.train (its critic/ is refined; default: the package's)")
    parser.add_argument("--work", default=None, help="cache folder for the samples (default: <weights>/../toy_matching_work)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes (one thread each) that make the samples (default 1; 2 on a 2-core CPU)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole command")
    parser.add_argument("--resume-phase", type=int, default=0, metavar="K",
                        help="start from the folder's matched critic, made by phases 0..K-1 of the same recipe, "
                             "and run phases K.. only (default 0: start from the base critic)")
    args = parser.parse_args(argv)
    weights = Path(args.weights)
    manifest = models.verify_weights(weights)  # before any work: a missing or corrupt folder is refused
    sizes = QUICK if args.quick else MATCHING
    if args.threads < 1 or args.jobs < 1:
        parser.error("--threads and --jobs must be at least 1")
    try:  # the recipe, before any work: every phase's space known, latent phases with bases to train on
        latent = [phase_cosine(p) is latent_cosine for p in sizes["phases"]]
    except ValueError as err:
        parser.error(f"the recipe's {err}")
    if any(latent) and not sizes.get("basis_rank"):
        parser.error("the recipe has a latent phase but no basis_rank: its samples need latent bases (basis_rank=24)")
    if not all(1 <= phase_objects(p, sizes) <= sizes["objects"] for p in sizes["phases"]):
        parser.error(f"every phase's objects must be in 1..{sizes['objects']} (the recipe's objects)")
    if not 0 <= args.resume_phase < len(sizes["phases"]):
        parser.error(f"--resume-phase must be in 0..{len(sizes['phases']) - 1} (the recipe has {len(sizes['phases'])} phases)")
    earlier = manifest.get("matching")
    if args.resume_phase:
        if earlier is None or not (weights / models.MATCHED_CRITIC_FOLDER).is_dir():
            parser.error(f"--resume-phase {args.resume_phase} needs a matched critic in {weights}; "
                         "run without --resume-phase first")
        # the basis rank matters to latent phases only: a recipe that adds one may resume after vertex phases;
        # the object count per phase: a recipe may add objects for its later phases
        ignored = {"phases", "objects"} | (set() if any(latent[: args.resume_phase]) else {"basis_rank"})
        same = {k: v for k, v in earlier["sizes"].items() if k not in ignored} == {k: v for k, v in sizes.items() if k not in ignored}
        if not same or _explicit_objects(earlier["sizes"]) != _explicit_objects(sizes)[: args.resume_phase]:
            parser.error(f"the matched critic in {weights} was not made by phases 0..{args.resume_phase - 1} of this "
                         f"recipe (its manifest: {earlier['sizes']}); run without --resume-phase")
    skipped_on_policy = [n for n, phase in enumerate(sizes["phases"][: args.resume_phase]) if "on_policy" in phase]
    if skipped_on_policy:
        parser.error(f"phase {skipped_on_policy[-1]} adds on-policy samples that later phases train on; "
                     f"resume at phase {skipped_on_policy[-1]} or earlier")
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else weights.parent / "toy_matching_work"
    work.mkdir(parents=True, exist_ok=True)
    times: dict = {}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # the samples depend on the objects, steps and basis rank only: cached under a name that says which
    rank = sizes.get("basis_rank")  # samples carry latent bases when the recipe names a rank
    cache = work / _cache_name(sizes["objects"], sizes["steps"], rank)
    t = time.perf_counter()
    smaller = _smaller_cache(work, sizes["objects"], sizes["steps"], rank)
    extended_from = None  # the objects whose samples came from a smaller cache (their time is not in this run's)
    if cache.exists():
        samples = torch.load(cache, weights_only=False)
        log(f"{len(samples)} matching samples from {cache}")
    elif smaller is not None:  # the first objects' samples are cached: make only the others
        first, path = smaller
        extended_from = first
        samples = torch.load(path, weights_only=False)
        log(f"{len(samples)} matching samples of objects 0-{first - 1} from {path}")
        samples = samples + sample_objects(weights, sizes["objects"], sizes["steps"], args.jobs, work, log,
                                           basis_rank=rank, start=first)
        torch.save(samples, cache)
        times[f"samples_{first}_to_{sizes['objects']}"] = time.perf_counter() - t
    else:
        samples = sample_objects(weights, sizes["objects"], sizes["steps"], args.jobs, work, log, basis_rank=rank)
        torch.save(samples, cache)
        times["samples"] = time.perf_counter() - t
    start_folder = models.MATCHED_CRITIC_FOLDER if args.resume_phase else models.CRITIC_FOLDER
    critic = VLMCritic.from_pretrained(str(weights / start_folder), device="cpu", dtype="float32",
                                       attn_implementation="eager")
    history = list(earlier["held_out_cosine"][: args.resume_phase]) if args.resume_phase else []
    on_policy_count, on_policy_from_cache = 0, False
    for n, phase in enumerate(sizes["phases"]):
        if n < args.resume_phase:
            continue
        if "on_policy" in phase:  # the critic as it stands guides; its runs' estimates join the samples
            t = time.perf_counter()
            rows, cached = on_policy_samples(critic, weights, work, n, phase["on_policy"], sizes["steps"], args.jobs, log,
                                             basis_rank=rank)
            on_policy_from_cache |= cached
            samples = samples + rows
            on_policy_count += len(rows)
            times[f"on_policy_{n}"] = time.perf_counter() - t
        t = time.perf_counter()
        history.append(train_phase(critic, samples, phase, sizes, TOY_GUIDANCE, log))
        times[f"phase_{n}"] = time.perf_counter() - t
    staging = work / models.MATCHED_CRITIC_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    models.save_critic(staging, critic.model)
    target = weights / models.MATCHED_CRITIC_FOLDER
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(staging), str(target))
    for p in sorted(target.rglob("*")):
        if p.is_file():
            manifest["files"][p.relative_to(weights).as_posix()] = models.sha256(p)
    command = ("python -m vlm3d_guidance.toy.gradient_matching" + (" --quick" if args.quick else "")
               + (f" --threads {args.threads}" if args.threads != 1 else "")
               + (f" --jobs {args.jobs}" if args.jobs != 1 else ""))
    wall = {k: round(v, 1) for k, v in times.items()}
    if args.resume_phase:  # phases 0..K-1 (and their samples) came from the run the manifest recorded
        resumed = command + f" --resume-phase {args.resume_phase}"
        wall = dict({k: v for k, v in earlier["wall_seconds"].items() if not k.startswith("phase_")
                     or int(k.split("_")[1]) < args.resume_phase}, **{f"resumed_{k}": v for k, v in wall.items()})
        command = earlier["command"] + "; then " + resumed
    # the recipe's time: its samples once, then every phase (a resumed run's own samples are listed, not added)
    total = sum(v for k, v in wall.items() if not (k == "resumed_samples" and "samples" in wall))
    manifest["matching"] = dict(
        command=command, sizes=sizes, samples=len(samples) - on_policy_count, on_policy_samples=on_policy_count,
        samples_from_cache=not any(k.startswith("samples") for k in times),
        on_policy_from_cache=on_policy_from_cache,
        held_out_cosine=history, wall_seconds=wall, total_wall_seconds=round(total, 1),
        **({"samples_of_first_objects_from_cache": extended_from} if extended_from else {}),
        **({"provenance": f"phases 0-{args.resume_phase - 1} and the wall times without 'resumed_': "
            + _without_resume_prefix(earlier["provenance"])} if args.resume_phase and "provenance" in earlier else {}))
    manifest["total_bytes"] = sum((weights / rel).stat().st_size for rel in manifest["files"])
    (weights / models.MANIFEST).write_text(json.dumps(manifest, indent=2))
    log(f"matched critic in {target}; {manifest['matching']['total_wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    from vlm3d_guidance.toy import gradient_matching as _gm

    sys.exit(_gm.main())
