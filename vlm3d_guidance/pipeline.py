"""GuidedHunyuanPipeline: hy3dgen's flow-matching sampler with VLM critic guidance at every step.

A drop-in for ``hy3dgen.shapegen.Hunyuan3DDiTFlowMatchingPipeline``: same call, same keywords,
same defaults, same return value (a list of ``trimesh.Trimesh``), plus ``prompt`` and the guidance
knobs. The sampling loop is re-implemented here over the wrapped pipeline's own components
(``prepare_image``, ``encode_cond``, ``prepare_latents``, ``retrieve_timesteps``, ``model``,
``scheduler.step``, ``_export``) because the stock ``__call__`` runs under
``torch.inference_mode`` and its callback cannot reach autograd. With ``lam=0`` the loop performs
exactly the stock operations in the stock order, so its output is bit-identical to the stock call
with the same generator.

Conventions (hy3dgen's): sigma runs from 0 (noise) to 1 (data); the DiT predicts the velocity
``v = x - eps``; the clean-latent estimate is ``x0 = z + (1 - sigma) * v``; the Euler step is
``z' = z + (sigma' - sigma) * v``. Guidance adds ``lam_i * normalize(d r / d x0)`` (or
``d r / d z`` in "full" mode) after the Euler step (VLM3D eq. 10).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GuidanceConfig, _positive_int
from .geometry.device import read_host
from .guidance.step import StepRecord, backward_scaled, normalized_update, reward_and_gradient, timed, zero_share
from .surgery import _checkpointed, _dit_train_mode

_STOCK_DEFAULTS = dict(
    num_inference_steps=50, timesteps=None, sigmas=None, eta=0.0, guidance_scale=5.0,
    generator=None, box_v=1.01, octree_resolution=384, mc_level=0.0, mc_algo=None,
    num_chunks=8000, output_type="trimesh", enable_pbar=True,
)


@dataclass
class GuidedOutput:
    """What ``pipe(..., return_dict=True)`` returns.

    Attributes:
        meshes: what hy3dgen returns for ``output_type`` (a list of ``trimesh.Trimesh`` or None
            per image for "trimesh"; the final latents for "latent").
        latents: final latents ``[B, L, C]``.
        trace: one :class:`~vlm3d_guidance.guidance.step.StepRecord` per sampling step.
        prompts: the description used for each batch item (the critic's own description when
            the prompt was None).
        described: True per item when its prompt came from ``critic.describe``.
        config: the resolved :class:`GuidanceConfig`.
        warnings: the warnings raised during the run (each reason once).
        final_reward: per item, the critic's reward of the EXPORTED mesh (``octree_resolution``,
            what the user gets), seen through the critic's cameras fitted to it; None where there
            is no mesh, no critic view could be scored, or ``output_type`` is not "trimesh". The
            trace's rewards are those of the per-step guidance meshes instead.
    """

    meshes: Any
    latents: torch.Tensor
    trace: list
    prompts: list
    described: list
    config: GuidanceConfig
    warnings: list = field(default_factory=list)
    final_reward: list = field(default_factory=list)

    def rewards(self, item: int | None = None) -> list:
        """The critic's reward per sampling step (None where not computed: step not guided, or skipped).

        ``rewards()[b][i]`` is batch item ``b``'s reward at step ``i`` (one list per item, in batch
        order); ``rewards(b)`` is item ``b``'s list alone (``rewards(0)`` for a single image).
        """
        if item is not None and not -len(self.prompts) <= item < len(self.prompts):
            raise IndexError(f"item {item} is out of range for a batch of {len(self.prompts)}")
        items = range(len(self.prompts)) if item is None else [item % len(self.prompts)]
        per_item = [[rec.reward[b] if len(rec.reward) > b else None for rec in self.trace] for b in items]
        return per_item if item is None else per_item[0]


class GuidedHunyuanPipeline:
    """Hunyuan3D 2.x shape sampling steered by a VLM critic (VLM3D sec. 4.3.2).

    Args:
        pipeline: a loaded ``Hunyuan3DDiTFlowMatchingPipeline`` (hy3dgen 2.0.x, or hy3dshape's
            for Hunyuan3D 2.1).
        critic: a :class:`~vlm3d_guidance.critic.VLMCritic`; may live on another device/dtype.
        config: default :class:`GuidanceConfig` (per-call keyword overrides win).
    """

    def __init__(self, pipeline, critic, config: GuidanceConfig | None = None):
        self.pipeline = pipeline
        self.critic = critic
        self.config = (config or GuidanceConfig()).validate()
        for module in (pipeline.model, pipeline.vae, pipeline.conditioner):
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, model_path: str = "tencent/Hunyuan3D-2", subfolder: str = "hunyuan3d-dit-v2-0",
                        critic: str = "Qwen/Qwen2.5-VL-7B-Instruct", device: str = "cuda",
                        dtype: torch.dtype = torch.float16, critic_device: str | None = None,
                        critic_dtype: torch.dtype | None = None, config: GuidanceConfig | None = None,
                        critic_query="dual", critic_kwargs: dict | None = None, **hunyuan_kwargs):
        """Load the Hunyuan3D pipeline and the critic.

        Args:
            model_path, subfolder: as hy3dgen's ``from_pretrained`` (``$HY3DGEN_MODELS/<model_path>/
                <subfolder>`` first, else the Hugging Face hub). A model whose ``config.yaml`` names
                ``hy3dshape.*`` targets (Hunyuan3D 2.1, e.g. ``"tencent/Hunyuan3D-2.1"``,
                ``subfolder="hunyuan3d-dit-v2-1"``) loads through hy3dshape's pipeline, which must
                be importable (see README); :mod:`~vlm3d_guidance.model_routing`.
            critic: a Qwen-VL model id or local folder.
            device, dtype: for the Hunyuan pipeline.
            critic_device, critic_dtype: for the critic (default: ``device``; bfloat16 on CUDA,
                float32 on CPU).
            critic_query: the critic's query ("dual", "content", "geometry", a template, or a
                dict of weights).
        """
        from .critic import VLMCritic

        from .model_routing import hunyuan_pipeline_class

        pipeline_cls = hunyuan_pipeline_class(model_path, subfolder)  # by the folder's config.yaml targets
        pipeline = pipeline_cls.from_pretrained(model_path, subfolder=subfolder, device=device,
                                                dtype=dtype, **hunyuan_kwargs)
        critic_device = critic_device or device
        if critic_dtype is None:
            critic_dtype = torch.bfloat16 if torch.device(critic_device).type == "cuda" else torch.float32
        vlm = VLMCritic.from_pretrained(critic, device=critic_device, dtype=critic_dtype,
                                        query=critic_query, **(critic_kwargs or {}))
        return cls(pipeline=pipeline, critic=vlm, config=config)

    # ------------------------------------------------------------------ the call
    def __call__(self, image=None, num_inference_steps: int = 50, timesteps=None, sigmas=None,
                 eta: float = 0.0, guidance_scale: float = 5.0, generator=None, box_v=1.01,
                 octree_resolution=384, mc_level=0.0, mc_algo=None, num_chunks=8000,
                 output_type: str | None = "trimesh", enable_pbar=True, *, prompt=None,
                 return_dict: bool = False, config: GuidanceConfig | None = None, **kwargs):
        """Sample shapes for ``image`` with the critic steering every step.

        Every parameter of hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline.__call__`` keeps its
        position, meaning and default (``timesteps`` and ``eta`` are accepted and, as in hy3dgen,
        unused; ``callback``/``callback_steps`` are honoured). Our own parameters are keyword-only,
        so a positional stock call means the same here. Additionally:

        Args:
            prompt: the description the critic checks the shape against; a string, one string
                per image, or None to let the critic describe the reference image itself.
            return_dict: False (default) returns what hy3dgen returns; True a
                :class:`GuidedOutput` with latents and the per-step trace.
            config: a :class:`GuidanceConfig` for this call (default: the pipeline's).
            **kwargs: ``callback(step, t, outputs)`` and ``callback_steps`` as in hy3dgen
                (``outputs.prev_sample`` is the next latent, guidance included;
                ``outputs.record`` is the step's :class:`StepRecord`, as in the trace; without
                ``callback_steps`` the callback runs at every step, where hy3dgen would fail), and
                guidance overrides by name (``lam=0.05``, ``gradient="full"``, ...). Any other
                name is a ValueError listing the accepted ones.

        Returns:
            list of ``trimesh.Trimesh`` (or None where no surface), or a :class:`GuidedOutput`.

        Bad arguments (guidance options, ``num_inference_steps``, ``callback_steps``, a missing
        image, prompts that do not match the images) raise ValueError before any model runs.
        """
        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)
        cfg, prompts = self.check_inputs(image, prompt, num_inference_steps, callback, callback_steps, config,
                                         **kwargs)
        num_inference_steps = int(num_inference_steps)
        callback_steps = 1 if callback_steps is None else int(callback_steps)
        pipe = self.pipeline
        if cfg.lam > 0:
            from .guidance.checks import check_attention_has_backward

            check_attention_has_backward(cfg.gradient)  # sageattention has no backward: fail before work

        pipe.set_surface_extractor(mc_algo)
        device, dtype = pipe.device, pipe.dtype
        do_cfg = guidance_scale >= 0 and not (getattr(pipe.model, "guidance_embed", False) is True)

        with torch.inference_mode():
            cond_inputs = pipe.prepare_image(image)
            image_tensor = cond_inputs.pop("image")
            cond = pipe.encode_cond(image=image_tensor, additional_cond_inputs=cond_inputs,
                                    do_classifier_free_guidance=do_cfg, dual_guidance=False)
        batch_size = image_tensor.shape[0]
        cond = _clone_tree(cond)  # leave inference mode: usable in autograd ("full" mode)

        described = [p is None for p in prompts]
        run_warnings: list = []
        if any(described):
            prompts = self._describe_missing(prompts, image)
            if cfg.lam > 0:  # the critic's own words must fit its context too, before sampling starts
                for p in dict.fromkeys(p for p, d in zip(prompts, described) if d):
                    self.critic.check_prompt(p, cfg.num_views, cfg.render_size)

        from hy3dgen.shapegen.pipelines import retrieve_timesteps

        sigmas = np.linspace(0, 1, num_inference_steps) if sigmas is None else sigmas
        with torch.inference_mode():
            timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps,
                                                                device, sigmas=sigmas)
            latents = pipe.prepare_latents(batch_size, dtype, device, generator)
        latents = latents.clone()
        schedule_sigmas = _schedule_sigmas(pipe.scheduler)

        guidance = None
        if getattr(pipe.model, "guidance_embed", False) is True:
            guidance = torch.tensor([guidance_scale] * batch_size, device=device, dtype=dtype)

        # the stock marching cubes places the exported surface by R/(R+1); the critic sees it there too
        export_resolution = int(octree_resolution) if mc_algo in (None, "mc") else None
        cameras = cfg.cameras(box_v, device) if cfg.lam > 0 else None

        # one surface track per batch item: decode around the previous step's surface
        tracks = None
        if cfg.lam > 0 and cfg.coarse_to_fine and cfg.track_surface:
            from .geometry import SurfaceTrack

            tracks = [SurfaceTrack() for _ in range(batch_size)]

        trace: list[StepRecord] = []
        warned: set = set()
        bar = tqdm(timesteps, disable=not enable_pbar, desc="Guided sampling" if cfg.lam > 0 else "Sampling (unguided)")
        for i, t in enumerate(bar):
            sigma = float(schedule_sigmas[i])
            lam = cfg.lam_at(i, num_inference_steps)
            if float(schedule_sigmas[i + 1]) == sigma:
                lam = 0.0  # a step that does not move z (the schedule's last) is never guided
            record = StepRecord(step=i, sigma=sigma, lam=lam)
            step_start = time.perf_counter()
            full = lam > 0 and cfg.gradient == "full"

            # "full" mode needs the DiT's graph; otherwise the DiT runs exactly as stock, without one.
            # The train-mode switch spans forward AND backward (checkpointing recomputes in backward).
            z = latents.detach().requires_grad_(True) if full else latents
            with _dit_train_mode(pipe.model, full):
                with (torch.enable_grad() if full else torch.inference_mode()), \
                        timed(record.seconds, "dit", device, cfg.profile), _checkpointed(pipe.model, full and cfg.dit_checkpointing):
                    noise_pred = self._velocity(z, t, cond, guidance, guidance_scale, do_cfg)

                update = None
                if lam > 0:
                    step_cameras = cfg.cameras(box_v, device, cfg.azimuth_offset(i)) if cfg.rotate_views else cameras
                    update = self._guidance_update(z, noise_pred, sigma, lam, prompts, step_cameras, cfg, record,
                                                   box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                                   full=full, export_resolution=export_resolution, tracks=tracks,
                                                   volume=cfg.volume_at(i, num_inference_steps))
                else:
                    record.skipped = ["not scheduled"] * batch_size

            with torch.inference_mode():
                outputs = pipe.scheduler.step(noise_pred.detach(), t, latents)
                latents = outputs.prev_sample
                if update is not None:
                    latents = (latents.float() + update.to(latents.device)).to(latents.dtype)
                    outputs.prev_sample = latents  # the callback sees the latent the loop goes on with
            latents = latents.clone() if latents.is_inference() else latents

            for reason in {r for r in record.skipped if r not in (None, "not scheduled")}:
                if reason not in warned:
                    warned.add(reason)
                    message = (f"VLM guidance skipped at step {i} ({reason}); the step ran unguided "
                               "and sampling continues. Further such steps are recorded in the trace only.")
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    run_warnings.append(message)
            record.seconds["step"] = time.perf_counter() - step_start
            trace.append(record)
            if enable_pbar and record.reward and record.reward[0] is not None:
                bar.set_postfix(reward=f"{record.reward[0]:+.3f}")
            if callback is not None and i % callback_steps == 0:
                outputs.record = record  # this step's StepRecord (reward, lam, ...) for live progress
                callback(i // getattr(pipe.scheduler, "order", 1), t, outputs)

        with torch.inference_mode():
            meshes = pipe._export(latents, output_type, box_v, mc_level, num_chunks, octree_resolution,
                                  mc_algo, enable_pbar=enable_pbar)
        if not return_dict:
            return meshes
        final = self.reward_of_meshes(meshes, prompts, config=cfg) if output_type == "trimesh" else [None] * batch_size
        return GuidedOutput(meshes=meshes, latents=latents, trace=trace, prompts=prompts,
                            described=described, config=cfg, warnings=run_warnings, final_reward=final)

    # ------------------------------------------------------------------ checks
    def check_inputs(self, image, prompt=None, num_inference_steps=50, callback=None, callback_steps=None,
                     config: GuidanceConfig | None = None, **guidance) -> tuple[GuidanceConfig, list]:
        """Every check of a call that needs no model run, as diffusers' ``check_inputs``.

        Raises ValueError naming the problem and the fix: unknown keywords, bad guidance options,
        ``num_inference_steps``/``callback_steps`` not positive integers, a callback that is not
        callable, no image, prompts that do not match the images, and (when guidance is on) a
        prompt whose critic queries would not fit the critic's context (counted by its tokenizer
        for ``num_views`` views of ``render_size`` px; no model runs).

        Returns:
            ``(config, prompts)``: the call's resolved :class:`GuidanceConfig` and one prompt (or
            None: to be described by the critic) per image.
        """
        base = config or self.config
        unknown = sorted(set(guidance) - set(base.to_dict()))
        if unknown:
            raise ValueError(
                f"unknown keyword argument(s) {unknown}. GuidedHunyuanPipeline takes hy3dgen's keywords "
                f"{['image', *_STOCK_DEFAULTS]} plus callback, callback_steps, prompt, return_dict, config "
                f"and the guidance options {sorted(base.to_dict())}")
        cfg = base.replace(**guidance) if guidance else base
        cfg.validate()
        _positive_int("num_inference_steps", num_inference_steps)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable as callback(step, t, outputs) (got {callback!r})")
        if callback_steps is not None:
            _positive_int("callback_steps", callback_steps, alternatives=" or None")
        if image is None:
            raise ValueError("image is required: a path, a PIL image, a list of them, or a dict of views")
        prompts = self._check_prompts(prompt, image)
        if cfg.lam > 0:
            for p in dict.fromkeys(p for p in prompts if p is not None):
                self.critic.check_prompt(p, cfg.num_views, cfg.render_size)
        return cfg, prompts

    # ------------------------------------------------------------------ pieces
    def _velocity(self, latents, t, cond, guidance, guidance_scale, do_cfg):
        """The stock CFG velocity, operation for operation (``[cond, uncond]`` batch)."""
        pipe = self.pipeline
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        timestep = t.expand(latent_model_input.shape[0]).to(latents.dtype) / pipe.scheduler.config.num_train_timesteps
        noise_pred = pipe.model(latent_model_input, timestep, cond, guidance=guidance)
        if do_cfg:
            noise_pred_cond, noise_pred_uncond = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        return noise_pred

    def _guidance_update(self, z, noise_pred, sigma, lam, prompts, cameras, cfg, record, *, box_v,
                         mc_level, num_chunks, full, export_resolution=None, tracks=None, volume="free"):
        """``lam * normalize(grad)`` per batch item (zeros for skipped items), or None if none ran.

        Each item's reward gradient w.r.t. its clean latent comes from its own decode, render and
        critic pass; in "full" mode ONE backward through the DiT then carries all of them at once
        (``d sum_b <x0_b, g_b> / d z``: batch items do not interact in the DiT, so its row ``b`` is
        item ``b``'s gradient), instead of one backward per item with the graph retained. Each
        item's gradient check, norm and zero share come back in one device read. ``volume`` is this
        step's :attr:`GuidanceConfig.volume` mode (:meth:`GuidanceConfig.volume_at`).
        """
        pipe = self.pipeline
        x0 = z + (1.0 - sigma) * noise_pred if full else (z.float() + (1.0 - sigma) * noise_pred.float()).clone()
        results = []
        for b in range(z.shape[0]):
            results.append(reward_and_gradient(
                x0[b:b + 1] if not full else x0[b:b + 1].detach(), pipe.vae, self.critic, prompts[b], cameras,
                box_v=box_v, mc_level=mc_level, grid_resolution=cfg.grid_resolution,
                render_size=cfg.render_size, shading=cfg.shading, backend=cfg.backend,
                num_chunks=num_chunks, seconds=record.seconds, coarse_to_fine=cfg.coarse_to_fine, fill=cfg.fill,
                export_resolution=export_resolution, track=None if tracks is None else tracks[b],
                profile=cfg.profile, volume=volume))
            record.decoding.append(None if tracks is None else tracks[b].last)
        grads = [r.gradient for r in results]
        norms = [(r.grad_norm, r.zero_share) for r in results]
        if full and any(g is not None for g in grads):
            wide = torch.promote_types(x0.dtype, torch.float32)  # scaled before any float16 cast
            g_x0 = torch.cat([torch.zeros_like(x0[b:b + 1], dtype=wide) if g is None else g.to(wide)
                              for b, g in enumerate(grads)]).detach()
            with timed(record.seconds, "dit_backward", z.device, cfg.profile):
                g_z = backward_scaled(x0, z, g_x0, x0.dtype)
            grads = [None if g is None else g_z[b:b + 1] for b, g in enumerate(grads)]
            stats = read_host(torch.stack([torch.stack([g.double().norm(), torch.isfinite(g).all().double(),
                                                        (g == 0).double().mean()])
                                           for g in g_z.split(1)]).reshape(-1))
            norms = []
            for b, g in enumerate(grads):
                n_b, finite, zeros = stats[3 * b:3 * b + 3]
                if g is not None and not finite:
                    grads[b], results[b].skipped = None, "non-finite gradient"
                norms.append((n_b, zeros))
        updates, any_ran = [], False
        for b, (result, grad) in enumerate(zip(results, grads)):
            record.reward.append(result.reward)
            record.skipped.append(result.skipped)
            if grad is None:
                record.grad_norm.append(None)
                record.zero_share.append(None)
                updates.append(torch.zeros_like(z[b:b + 1], dtype=torch.float32).detach())
                continue
            record.grad_norm.append(norms[b][0])
            record.zero_share.append(norms[b][1])
            updates.append(normalized_update(grad.detach(), lam, cfg.normalize, cfg.clip))
            any_ran = True
        record.guided = any_ran
        return torch.cat(updates).detach() if any_ran else None

    def reward_of_meshes(self, meshes, prompt, *, config: GuidanceConfig | None = None,
                         box_v: float = 1.01) -> list:
        """The critic's reward of finished meshes (``trimesh.Trimesh`` or None each): one float or
        None per mesh, through the critic's cameras fitted to each mesh (``config.fill``)."""
        from .guidance.step import reward_of_mesh

        cfg = config or self.config
        prompts = [prompt] * len(meshes) if isinstance(prompt, str) else list(prompt)
        device = self.critic.device if self.critic.device.type != "cpu" else self.pipeline.device
        cameras = cfg.cameras(box_v, device)
        out = []
        for mesh, p in zip(meshes, prompts):
            if mesh is None or len(getattr(mesh, "faces", ())) == 0:
                out.append(None)
                continue
            verts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=device)
            faces = torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long, device=device)
            out.append(reward_of_mesh(verts, faces, self.critic, p, cameras, render_size=cfg.render_size,
                                      shading=cfg.shading, backend=cfg.backend, fill=cfg.fill))
        return out

    def reward_of_latents(self, latents: torch.Tensor, prompt, *, box_v: float = 1.01, mc_level: float = 0.0,
                          config: GuidanceConfig | None = None, num_chunks: int = 8000) -> list:
        """The critic's reward of final (or clean) latents ``[B, L, C]``: one float or None per item."""
        cfg = config or self.config
        prompts = [prompt] * latents.shape[0] if isinstance(prompt, str) else list(prompt)
        cameras = cfg.cameras(box_v, latents.device)
        rewards = []
        for b in range(latents.shape[0]):
            result = reward_and_gradient(
                latents[b:b + 1].detach().float(), self.pipeline.vae, self.critic, prompts[b], cameras,
                box_v=box_v, mc_level=mc_level, grid_resolution=cfg.grid_resolution,
                render_size=cfg.render_size, shading=cfg.shading, backend=cfg.backend,
                num_chunks=num_chunks, seconds={}, want_gradient=False, coarse_to_fine=cfg.coarse_to_fine,
                fill=cfg.fill)
            rewards.append(result.reward)
        return rewards

    def _check_prompts(self, prompt, image) -> list:
        count = len(image) if isinstance(image, list) else 1
        prompts = [prompt] * count if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != count:
            raise ValueError(f"got {len(prompts)} prompts for {count} images; give one prompt per image "
                             "(or a single string for all, or None to let the critic describe each image)")
        for p in prompts:
            if p is not None and (not isinstance(p, str) or not p.strip()):
                raise ValueError(f"prompt must be a non-empty string or None (got {p!r}); None lets the "
                                 "critic describe the reference image")
        return prompts

    def _describe_missing(self, prompts, image) -> list:
        from PIL import Image

        images = image if isinstance(image, list) else [image]
        out = []
        for p, img in zip(prompts, images):
            if p is not None:
                out.append(p)
                continue
            if isinstance(img, dict):
                img = img.get("front", next(iter(img.values())))
            if isinstance(img, str):
                img = Image.open(img)
            out.append(self.critic.describe(img))  # transparent parts are seen on white
        return out


def _schedule_sigmas(scheduler) -> torch.Tensor:
    """The sigmas the scheduler steps through (consistency schedulers keep them in ``sigmas_``)."""
    return scheduler.sigmas_ if hasattr(scheduler, "sigmas_") else scheduler.sigmas


def _clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    return tree
