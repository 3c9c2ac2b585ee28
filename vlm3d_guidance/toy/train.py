"""Train the toy generator and critic from scratch: ``python -m vlm3d_guidance.toy.train``.

Stages (each cached in ``--work``, so a later stage can be rerun alone with ``--from-stage``):

1. ``autoencoder``: hy3dgen's ``ShapeVAE`` decoder with an encoder of our own
   (:mod:`vlm3d_guidance.toy.encoder`: aligned latents, tokens seeded on the intact object's
   surface with features of the actual shape's field; 2.0.2's ShapeVAE has none), trained on the
   first ``ae_objects`` generator-split shapes (intact and broken) to reproduce the field
   ``clamp(-sdf / 0.2, -1, 1)`` at surface-near and uniform points (a broken shape is also
   sampled where its intact parts were). Every 1000 steps :func:`decode_check` judges held-out
   decodes (logged, and kept in the manifest). The encoder is not shipped.
2. ``latents``: every generator- and critic-split shape encoded; ``vae.scale_factor`` set so the
   DiT's latents have unit variance (``decode(x / scale_factor)`` as hy3dgen does).
3. ``references``: each generator-split intact object's reference through hy3dgen's own
   ImageProcessorV2, with its part parameters (:func:`~vlm3d_guidance.toy.conditioner.part_targets`).
4. ``conditioner``: the DINOv2 ``SingleImageEncoder`` pretrained to read the part parameters off the
   reference (:mod:`vlm3d_guidance.toy.conditioner`), then frozen.
5. ``generator``: ``Hunyuan3DDiT`` trained by flow matching in hy3dgen's convention
   (:mod:`vlm3d_guidance.toy.flow`: token-level OT coupling, EMA), conditioned on the frozen
   conditioner's tokens of the INTACT object's reference, while the target is a broken variant
   with probability :data:`BROKEN_SHARE` for classes that have one: the toy counterpart of noisy
   3D data. 10 % of conditions are dropped to zeros (hy3dgen's unconditional embedding) for CFG.
6. ``critic_data`` (:mod:`vlm3d_guidance.toy.critic_training`): critic-split shapes rendered exactly
   as the guided step renders (decode_surface at the toy guidance grid, the orbit cameras,
   render_views at the toy size), labelled by what the rendered surface shows: sound shapes with
   their description (Yes), broken ones (No), wrong descriptions (No; mug <-> cup are the hard
   pairs), and renders of the generator's own clean-latent estimates at random sigma labelled by
   the target they were noised from. Optionally (``critic_rollouts`` > 0; 0 in the shipped run)
   also the generator's own sampling runs from critic-split references
   (:func:`~vlm3d_guidance.toy.critic_training.rollout_samples`): the estimates at
   ``critic_rollout_steps``, labelled by the judge's verdict on the run's exported mesh. Measured
   with 200 runs (and 1 noised estimate, 4 epochs): the critic's held-out balanced accuracy fell
   from 0.71 to 0.51 and the run took 5,477 s, over the 90-minute budget (benchmarks/RESULTS.md).
   With ``critic_turned_views`` (off in the shipped run: measured, it did not help; see
   benchmarks/RESULTS.md) each sample's orbit is turned by a random azimuth within one view
   spacing (:func:`~vlm3d_guidance.toy.critic_training.view_turns`), so the critic judges any turn
   alike, as ``GuidanceConfig.rotate_views`` shows it.
7. ``critic``: transformers' ``Qwen2_5_VLForConditionalGeneration`` (small) trained with a logistic
   loss on the package's reward ``r = z_yes - z_no`` of the default dual query, through
   :class:`~vlm3d_guidance.critic.VLMCritic` itself (same prompt, same differentiable preprocessing).
8. ``export``: the weights in the published layouts plus ``manifest.json`` (sha256 of every file,
   command, seeds, data sizes, wall times).

The critic this makes is the base critic (``critic/``); ``python -m vlm3d_guidance.toy.gradient_matching``
then refines it into the matched critic the toy guides with (``critic-matched/``).

``--to-stage`` stops after a stage (the cache lets a later call go on with ``--from-stage``; the
manifest's wall times are the sum of the stages' own measured times). Runs on ``--threads``
torch threads (default 1); the measured wall time is written to the manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import models
from .conditioner import condition_tokens, part_targets, pretrain_conditioner
from .critic_training import make_critic_data, rollout_samples, train_critic
from .encoder import StencilEncoder, encoder_input, project_to_surface
from .flow import train_flow
from .judge import judge_surface
from .references import BOX_V, render_reference, split_object
from .world import BREAK_MODES, CLASSES, broken_variant

STAGES = ("autoencoder", "latents", "references", "conditioner", "generator", "critic_data", "critic", "export")
BROKEN_SHARE = 0.4  # of breakable classes' targets (3 of 4 classes): ~30 % of all targets
SEED = 0
ROLLOUT_SEED = 100_000  # the critic-data rollouts sample with seeds ROLLOUT_SEED + i

# sizes of the default run (the shipped weights); --quick divides the work for a smoke test
SIZES = dict(gen_objects=2400, critic_objects=320, ae_objects=800, ae_steps=3000, ae_batch=16, ae_points=2048,
             ae_pool=8192, ae_check_every=1000, ae_check_objects=16,
             cond_steps=2000, cond_batch=64, cond_lr=1e-3, cond_check_objects=64,
             dit_steps=1800, dit_batch=32, critic_epochs=10, critic_lr=3e-4, critic_estimates=2,
             critic_max_weight=3.0, critic_rollouts=0, critic_rollout_steps=[2, 7, 12, 17, 22])
QUICK = dict(gen_objects=16, critic_objects=8, ae_objects=8, ae_steps=6, ae_batch=4, ae_points=256, ae_pool=512,
             ae_check_every=6, ae_check_objects=2,
             cond_steps=4, cond_batch=4, cond_lr=1e-3, cond_check_objects=4,
             dit_steps=6, dit_batch=8, critic_epochs=1, critic_lr=3e-4, critic_estimates=1,
             critic_max_weight=3.0, critic_rollouts=2, critic_rollout_steps=[2, 22])


def field_samples(obj, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` query points and their target field.

    Half lie near the surface of each part in turn (the same number per part, so thin legs, poles
    and handles weigh as much as a table top), a quarter near the union's surface, a quarter
    uniform in the box; the near points are jittered by N(0, 0.02^2) per axis.

    The parts are those of the shape AND of the intact object it was derived from: a broken shape
    is sampled where its missing or moved part should be, so drawing the class's intact prototype
    costs as much as any other error there. (Sampled only near its own parts, a missing leg's
    place gets ~0.1 % of the uniform points, and the autoencoder learned to draw the leg anyway.)
    """
    parts = list(obj.parts) + [p for p in obj.intact_parts if p not in obj.parts]
    per_part = (count // 2) // len(parts)
    near = [project_to_surface(part.sdf, (torch.rand(per_part, 3, generator=gen) * 2 - 1) * BOX_V) for part in parts]
    union = count // 4
    near.append(project_to_surface(obj.sdf, (torch.rand(union, 3, generator=gen) * 2 - 1) * BOX_V))
    near = torch.cat(near)
    near = near + 0.02 * torch.randn(near.shape, generator=gen)
    rest = count - near.shape[0]
    pts = torch.cat([near.clamp(-BOX_V, BOX_V), (torch.rand(rest, 3, generator=gen) * 2 - 1) * BOX_V])
    with torch.no_grad():
        return pts, obj.field(pts)


# ------------------------------------------------------------------------------------ the shapes
def split_shapes(split: str, count: int, seed: int = SEED):
    """``[(intact, broken or None)]`` of objects 0..count-1 of ``split`` ("generator" or "critic"); the
    broken variant of object i is drawn from the stream ``[11 or 12, seed, i]``."""
    stream = {"generator": 11, "critic": 12}[split]
    return [(obj, broken_variant(obj, np.random.default_rng([stream, seed, i])))
            for i, obj in ((i, split_object(split, seed, i)) for i in range(count))]


def generator_shapes(count: int, seed: int = SEED):
    return split_shapes("generator", count, seed)


def critic_shapes(count: int, seed: int = SEED):
    return split_shapes("critic", count, seed)


# ------------------------------------------------------------------------------------ stages
def train_autoencoder(shapes, sizes, log, check_pairs=()):
    """Stage 1: ``(encoder, vae, checks)`` fitted to the shapes' fields.

    The encoder is :class:`~vlm3d_guidance.toy.encoder.StencilEncoder` (aligned latents: seeds on the
    intact object, features of the actual shape's field); each shape's field is sampled once
    (``ae_pool`` points, :func:`field_samples`) and each step draws ``ae_points`` of them. The
    latents get Gaussian noise in training (std 0.02 on the positions, 0.05 on the features): a
    smoother latent space for the DiT to land in.

    Every ``sizes["ae_check_every"]`` steps and at the end, :func:`decode_check` on
    ``check_pairs`` (held-out critic-split shapes), logged and returned as ``checks`` (a list of
    ``{"step": ..., **check}``); the weights returned are the last step's.
    """
    config = models.generator_config()
    torch.manual_seed(SEED)
    _, vae, _, _ = models.instantiate_generator(config)
    encoder = StencilEncoder()
    pool = [s for pair in shapes for s in pair if s is not None]
    gen = torch.Generator().manual_seed(SEED)
    seeds, stencils = (torch.cat(t) for t in zip(*[encoder_input(s) for s in pool]))
    fields = [field_samples(s, sizes["ae_pool"], gen) for s in pool]
    points = torch.stack([p for p, _ in fields])
    values = torch.stack([f for _, f in fields])
    noise_std = torch.tensor([0.02] * 3 + [0.05] * (models.VAE["embed_dim"] - 3))
    params = list(encoder.parameters()) + list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=sizes["ae_steps"], pct_start=0.05)
    vae.train()
    start = time.perf_counter()
    checks = []
    for step in range(sizes["ae_steps"]):
        idx = torch.randint(len(pool), (sizes["ae_batch"],), generator=gen)
        pick = torch.randint(points.shape[1], (sizes["ae_batch"], sizes["ae_points"]), generator=gen)
        pts = torch.gather(points[idx], 1, pick[..., None].expand(-1, -1, 3))
        target = torch.gather(values[idx], 1, pick)
        mu = encoder(seeds[idx], stencils[idx])
        z = mu + noise_std * torch.randn(mu.shape, generator=gen)
        field = vae.geo_decoder(queries=pts, latents=vae(z)).squeeze(-1)
        loss = (field - target).abs().mean() + 1e-3 * mu[..., 3:].pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == sizes["ae_steps"] - 1:
            log(f"autoencoder step {step}: L1 {float(loss.detach()):.4f} ({time.perf_counter() - start:.0f} s)")
        last = step == sizes["ae_steps"] - 1
        if check_pairs and ((step + 1) % sizes["ae_check_every"] == 0 or last):
            encoder.eval()
            vae.eval()
            check = dict(step=step + 1, **decode_check(encoder, vae, check_pairs))
            checks.append(check)
            log(f"autoencoder check at step {step + 1}: intact ok {check['intact_ok']:.2f}, broken failed "
                f"{check['broken_failed']:.2f}, fidelity {check['fidelity']:.3f}, IoU {check['iou']:.3f}")
            encoder.train()
            vae.train()
    vae.eval()
    return encoder.eval(), vae, checks


@torch.no_grad()
def decode_check(encoder, vae, pairs, resolution: int = 64) -> dict:
    """How faithfully the autoencoder shows what breaks a shape (the AE's stopping rule).

    Each intact shape and its broken variant of ``pairs [(intact, broken or None)]`` is encoded,
    decoded by ``vae`` at a ``resolution``^3 grid (marching cubes, as an export) and judged by
    :func:`~vlm3d_guidance.toy.judge` against the intact object. A faithful autoencoder passes
    the intact decodes and fails the broken ones.

    Returns:
        dict with ``intact_ok`` (share of intact decodes judged ok), ``broken_failed`` (share of
        broken decodes judged failed), ``fidelity`` (their mean), ``iou`` (mean IoU of intact
        decodes), ``n_intact``, ``n_broken``, ``intact_failures`` (``"<class>: <reason>"`` of each
        intact decode judged failed) and ``broken_passed`` (``"<class> <break mode>"`` of each broken
        decode judged ok).
    """
    from ..geometry import decode_surface

    def verdict(shape, truth):
        (verts, faces), = decode_surface(vae, encoder(*encoder_input(shape)), resolution=resolution, box_v=BOX_V)
        return judge_surface(verts, faces, truth)

    broken_pairs = [(a, b) for a, b in pairs if b is not None]
    intact = [verdict(a, a) for a, _ in pairs]
    broken = [verdict(b, a) for a, b in broken_pairs]
    ok = float(np.mean([not v["failed"] for v in intact]))
    bad = float(np.mean([v["failed"] for v in broken])) if broken else math.nan
    missed = [f"{a.cls}: {v['reason']}" for (a, _), v in zip(pairs, intact) if v["failed"]]
    passed = [f"{b.cls} {b.broken}" for (_, b), v in zip(broken_pairs, broken) if not v["failed"]]
    return dict(intact_ok=ok, broken_failed=bad, fidelity=float(np.nanmean([ok, bad])),
                iou=float(np.mean([v["iou"] for v in intact])), n_intact=len(intact), n_broken=len(broken),
                intact_failures=missed, broken_passed=passed)


@torch.no_grad()
def encode_all(encoder, shapes) -> dict:
    """Stage 2: latents ``[N, L, C]`` of intact and broken shapes (broken NaN where a class has none)."""
    intact = torch.cat([encoder(*encoder_input(a)) for a, _ in shapes])
    broken = torch.cat([encoder(*encoder_input(b)) if b is not None else torch.full_like(intact[:1], math.nan)
                        for _, b in shapes])
    return dict(intact=intact, broken=broken)


def prepare_references(shapes, image_processor) -> dict:
    """The conditioner's inputs for each intact object, made by hy3dgen's own ImageProcessorV2."""
    images, masks = [], []
    for obj, _ in shapes:
        out = image_processor(render_reference(obj))
        images.append(out["image"])
        masks.append(out["mask"])
    return dict(image=torch.cat(images), mask=torch.cat(masks))


def reference_inputs(shapes, image_processor) -> dict:
    """Stage 3: the conditioner's inputs (:func:`prepare_references`) and part targets of each intact
    object (:func:`~vlm3d_guidance.toy.conditioner.part_targets`)."""
    refs = prepare_references(shapes, image_processor)
    refs["target"] = torch.stack([part_targets(obj) for obj, _ in shapes])
    return refs


def train_generator(latents, cond_tokens, scale_factor, sizes, log):
    """Stage 5: the EMA DiT trained by flow matching (:func:`~vlm3d_guidance.toy.flow.train_flow`) on
    the broken-noisy pairs, conditioned on the frozen conditioner's cached tokens."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    torch.manual_seed(SEED + 1)
    dit = instantiate_from_config(models.generator_config(scale_factor)["model"])
    return train_flow(dit, latents["intact"] * scale_factor, latents["broken"] * scale_factor, cond_tokens,
                      steps=sizes["dit_steps"], batch=sizes["dit_batch"], broken_share=BROKEN_SHARE, log=log,
                      seed=SEED + 2)


# ------------------------------------------------------------------------------------ driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm3d_guidance.toy.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(models.WEIGHTS_DIR), help="where the weights go (default: the package's)")
    parser.add_argument("--work", default=None, help="stage cache folder (default: <out>/../toy_work)")
    parser.add_argument("--from-stage", choices=STAGES, default=STAGES[0], help="rerun from this stage on")
    parser.add_argument("--to-stage", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole script")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; the manifest records it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else SIZES
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "toy_work"
    work.mkdir(parents=True, exist_ok=True)
    first = STAGES.index(args.from_stage)
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() and first > 0 else {}
    log_file = open(work / "train.log", "a")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    last = STAGES.index(args.to_stage)

    def run(stage, fn):
        if STAGES.index(stage) > last:
            log(f"stopping after stage {args.to_stage} (--to-stage)")
            sys.exit(0)
        path = work / f"{stage}.pt"
        if STAGES.index(stage) < first and path.exists():
            return torch.load(path, weights_only=False)
        t = time.perf_counter()
        value = fn()
        torch.save(value, path)
        times[stage] = time.perf_counter() - t
        (work / "times.json").write_text(json.dumps(times, indent=2))
        log(f"stage {stage} done in {times[stage]:.0f} s")
        return value

    from .config import TOY_GUIDANCE

    log(f"toy training: sizes {sizes}")
    gen_shapes = generator_shapes(sizes["gen_objects"])
    crit_shapes = critic_shapes(sizes["critic_objects"])
    encoder, vae, ae_checks = run("autoencoder", lambda: train_autoencoder(
        gen_shapes[: sizes["ae_objects"]], sizes, log, check_pairs=crit_shapes[: sizes["ae_check_objects"]]))

    def _latents():
        lat = dict(generator=encode_all(encoder, gen_shapes), critic=encode_all(encoder, crit_shapes))
        std = float(lat["generator"]["intact"].std())
        lat["scale_factor"] = 1.0 / std
        return lat

    latents = run("latents", _latents)
    scale = latents["scale_factor"]
    vae.scale_factor = scale
    config = models.generator_config(scale)
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    image_processor = instantiate_from_config(config["image_processor"])  # hy3dgen's own ImageProcessorV2
    refs = run("references", lambda: dict(
        generator=reference_inputs(gen_shapes, image_processor),
        check=reference_inputs(crit_shapes[: sizes["cond_check_objects"]], image_processor)))

    def _conditioner():
        torch.manual_seed(SEED + 6)
        fresh = instantiate_from_config(config["conditioner"])
        return pretrain_conditioner(fresh, refs["generator"], refs["generator"]["target"], sizes, log,
                                    held_out=(refs["check"], refs["check"]["target"]), seed=SEED + 6)

    conditioner, cond_checks = run("conditioner", _conditioner)
    dit = run("generator", lambda: train_generator(
        latents["generator"], condition_tokens(conditioner, refs["generator"]), scale, sizes, log))

    def _critic_data():
        # the first cond_check_objects critic-split references were prepared by the references stage
        done = refs["check"]["image"].shape[0]
        rest = prepare_references(crit_shapes[done:], image_processor) if done < len(crit_shapes) else None
        crit_refs = {k: refs["check"][k][: len(crit_shapes)] if rest is None else torch.cat([refs["check"][k], rest[k]])
                     for k in ("image", "mask")}
        data = make_critic_data(crit_shapes, latents["critic"], dit, conditioner, vae, crit_refs, TOY_GUIDANCE,
                                sizes, log, seed=SEED + 3)
        if sizes["critic_rollouts"]:
            # the generator as it ships (fp16 weights, hy3dgen's own loader and sampler)
            staged = work / "rollout_generator"
            shutil.rmtree(staged, ignore_errors=True)
            models.save_generator(models.generator_folder(staged), config, dit, vae, conditioner)
            samples, stats = rollout_samples(models.load_generator(staged), crit_shapes, TOY_GUIDANCE, sizes, log,
                                             seed=ROLLOUT_SEED)
            shutil.rmtree(staged)
            data["samples"] += samples
            data["stats"]["rollouts"] = stats
            log(f"critic data: {len(samples)} rollout samples; runs per class {stats}")
        return data

    critic_data = run("critic_data", _critic_data)
    data = critic_data["samples"]
    critic_tmp = work / "critic"
    critic_model, accuracy = run("critic", lambda: train_critic(data, sizes, log, critic_tmp, seed=SEED + 4))

    def _export():
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        models.save_generator(models.generator_folder(staging), config, dit, vae, conditioner)
        models.save_critic(staging / models.CRITIC_FOLDER, critic_model)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        n_yes = sum(1 for d in data if d[2] > 0.5)
        manifest = dict(
            files={str(p.relative_to(staging)): models.sha256(p) for p in files},
            command="python -m vlm3d_guidance.toy.train" + (" --quick" if args.quick else "")
            + (f" --threads {args.threads}" if args.threads != 1 else ""),
            seeds=dict(base=SEED, splits="generator=1, critic=2, test=3 (numpy streams [split, seed, index])"),
            data=dict(generator_objects=sizes["gen_objects"], critic_objects=sizes["critic_objects"],
                      broken_share_of_breakable_targets=BROKEN_SHARE,
                      breakable_classes=[c for c in CLASSES if BREAK_MODES[c]],
                      critic_samples=len(data), critic_yes=n_yes, critic_no=len(data) - n_yes,
                      critic_label_stats=critic_data["stats"]),
            sizes=sizes, scale_factor=scale, autoencoder_checks=ae_checks, conditioner_checks=cond_checks, critic_held_out_accuracy=accuracy,
            wall_seconds={k: round(v, 1) for k, v in times.items()},
            total_wall_seconds=round(sum(times.values()), 1),
            machine=dict(python=platform.python_version(), torch=torch.__version__, threads=torch.get_num_threads(),
                         processor=platform.machine()),
            total_bytes=sum(p.stat().st_size for p in files),
        )
        (staging / models.MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return manifest

    manifest = run("export", _export)
    log(f"done: {manifest['total_bytes'] / 1e6:.1f} MB in {out}; total {manifest['total_wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    # run the module under its import name, so the cached stages pickle ``vlm3d_guidance.toy.train``
    # classes (not ``__main__``'s) and can be reloaded from anywhere
    from vlm3d_guidance.toy import train as _train

    sys.exit(_train.main())
