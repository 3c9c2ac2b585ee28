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

import contextlib
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import GuidanceConfig
from .guidance.step import StepRecord, normalized_update, reward_and_gradient, timed

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
    """

    meshes: Any
    latents: torch.Tensor
    trace: list
    prompts: list
    described: list
    config: GuidanceConfig
    warnings: list = field(default_factory=list)

    def rewards(self) -> list:
        """Per-step reward of batch item 0 (None where not computed)."""
        return [rec.reward[0] if rec.reward else None for rec in self.trace]


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
                <subfolder>`` first, else the Hugging Face hub). A ``model_path`` naming
                Hunyuan3D-2.1 loads through the ``hy3dshape`` package (see README).
            critic: a Qwen-VL model id or local folder.
            device, dtype: for the Hunyuan pipeline.
            critic_device, critic_dtype: for the critic (default: ``device``; bfloat16 on CUDA,
                float32 on CPU).
            critic_query: the critic's query ("dual", "content", "geometry", a template, or a
                dict of weights).
        """
        from .critic import VLMCritic

        pipeline_cls = _hunyuan_pipeline_class(model_path)
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
        base = config or self.config
        unknown = sorted(set(kwargs) - set(base.to_dict()))
        if unknown:
            raise ValueError(
                f"unknown keyword argument(s) {unknown}. GuidedHunyuanPipeline takes hy3dgen's keywords "
                f"{['image', *_STOCK_DEFAULTS]} plus callback, callback_steps, prompt, return_dict, config "
                f"and the guidance options {sorted(base.to_dict())}")
        cfg = base.replace(**kwargs) if kwargs else base
        cfg.validate()
        num_inference_steps = _positive_int("num_inference_steps", num_inference_steps)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable as callback(step, t, outputs) (got {callback!r})")
        callback_steps = 1 if callback_steps is None else _positive_int("callback_steps", callback_steps, " or None")
        pipe = self.pipeline
        if image is None:
            raise ValueError("image is required: a path, a PIL image, a list of them, or a dict of views")
        prompts = self._check_prompts(prompt, image)

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

        cameras = None
        if cfg.lam > 0:
            from .render import orbit_cameras

            cameras = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov,
                                    device=device, bounds=box_v)

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
                        timed(record.seconds, "dit", device), _checkpointed(pipe.model, full and cfg.dit_checkpointing):
                    noise_pred = self._velocity(z, t, cond, guidance, guidance_scale, do_cfg)

                update = None
                if lam > 0:
                    update = self._guidance_update(z, noise_pred, sigma, lam, prompts, cameras, cfg, record,
                                                   box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                                   full=full)
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
        return GuidedOutput(meshes=meshes, latents=latents, trace=trace, prompts=prompts,
                            described=described, config=cfg, warnings=run_warnings)

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
                         mc_level, num_chunks, full):
        """``lam * normalize(grad)`` per batch item (zeros for skipped items), or None if none ran."""
        pipe = self.pipeline
        x0 = z + (1.0 - sigma) * noise_pred if full else (z.float() + (1.0 - sigma) * noise_pred.float()).clone()
        updates, any_ran = [], False
        for b in range(z.shape[0]):
            result = reward_and_gradient(
                x0[b:b + 1] if not full else x0[b:b + 1].detach(), pipe.vae, self.critic, prompts[b], cameras,
                box_v=box_v, mc_level=mc_level, grid_resolution=cfg.grid_resolution,
                render_size=cfg.render_size, shading=cfg.shading, backend=cfg.backend,
                num_chunks=num_chunks, seconds=record.seconds, coarse_to_fine=cfg.coarse_to_fine)
            grad = result.gradient
            if grad is not None and full:
                with timed(record.seconds, "dit_backward", z.device):
                    (grad,) = torch.autograd.grad(x0[b:b + 1], z, grad.to(x0.dtype),
                                                  retain_graph=b + 1 < z.shape[0])
                    grad = grad[b:b + 1]
                if not torch.isfinite(grad).all():
                    grad, result.skipped = None, "non-finite gradient"
            record.reward.append(result.reward)
            record.skipped.append(result.skipped)
            if grad is None:
                record.grad_norm.append(None)
                updates.append(torch.zeros_like(z[b:b + 1], dtype=torch.float32).detach())
                continue
            record.grad_norm.append(float(grad.float().norm()))
            updates.append(normalized_update(grad.detach(), lam, cfg.normalize, cfg.clip))
            any_ran = True
        record.guided = any_ran
        return torch.cat(updates).detach() if any_ran else None

    def reward_of_latents(self, latents: torch.Tensor, prompt, *, box_v: float = 1.01, mc_level: float = 0.0,
                          config: GuidanceConfig | None = None, num_chunks: int = 8000) -> list:
        """The critic's reward of final (or clean) latents ``[B, L, C]``: one float or None per item."""
        from .render import orbit_cameras

        cfg = config or self.config
        prompts = [prompt] * latents.shape[0] if isinstance(prompt, str) else list(prompt)
        cameras = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov,
                                device=latents.device, bounds=box_v)
        rewards = []
        for b in range(latents.shape[0]):
            result = reward_and_gradient(
                latents[b:b + 1].detach().float(), self.pipeline.vae, self.critic, prompts[b], cameras,
                box_v=box_v, mc_level=mc_level, grid_resolution=cfg.grid_resolution,
                render_size=cfg.render_size, shading=cfg.shading, backend=cfg.backend,
                num_chunks=num_chunks, seconds={}, want_gradient=False, coarse_to_fine=cfg.coarse_to_fine)
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


def _hunyuan_pipeline_class(model_path: str):
    """hy3dgen's pipeline class, or hy3dshape's for Hunyuan3D-2.1 (with a clear error if absent)."""
    if "2.1" in str(model_path).split("/")[-1]:
        try:
            from hy3dshape.pipelines import Hunyuan3DDiTFlowMatchingPipeline
        except ImportError as exc:
            raise ImportError(
                "Hunyuan3D-2.1 needs the hy3dshape package, which is not on PyPI: clone "
                "https://github.com/Tencent-Hunyuan/Hunyuan3D-2.1 and add its hy3dshape folder to "
                "PYTHONPATH (see the README section 'Hunyuan3D 2.1')") from exc
        return Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    return Hunyuan3DDiTFlowMatchingPipeline


def _schedule_sigmas(scheduler) -> torch.Tensor:
    """The sigmas the scheduler steps through (consistency schedulers keep them in ``sigmas_``)."""
    return scheduler.sigmas_ if hasattr(scheduler, "sigmas_") else scheduler.sigmas


def _clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    return tree


def _positive_int(name: str, value, alternatives: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``name`` (any integral type; not bool, not < 1)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer{alternatives} (got {value!r})")
    return int(value)


def _patch_forward(module, wrap) -> None:
    """Replace ``module.forward`` by ``wrap(module.forward)`` on the instance (undo with :func:`_unpatch_forward`)."""
    module.__dict__.setdefault("_vlm3d_saved_forward", [])
    module._vlm3d_saved_forward.append(module.__dict__.get("forward"))
    module.forward = wrap(module.forward)


def _unpatch_forward(module) -> None:
    saved = module._vlm3d_saved_forward.pop()
    if saved is None:
        del module.forward  # back to the class's forward
    else:
        module.forward = saved
    if not module._vlm3d_saved_forward:
        del module._vlm3d_saved_forward


def _detached_aux(forward):
    """A MoE gate forward whose load-balancing loss (3rd output) carries no gradient."""
    def gate_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor):
            out = (out[0], out[1], out[2].detach())
        return out
    return gate_forward


@contextlib.contextmanager
def _dit_train_mode(model, enabled: bool):
    """Run the DiT in train mode while active (gradient="full"), then restore every module's own mode.

    Hunyuan3D 2.1's (hy3dshape) MoE blocks compute their eval-mode path (``moe_infer``) under
    ``torch.no_grad``, so with the DiT in ``.eval()`` the gradient through it is wrong. Their
    train-mode path is differentiable and has no active dropout (dropout 0.0), but it attaches the
    gate's load-balancing loss with an autograd trick (``AddAuxiliaryLoss``) whose backward adds
    ``d aux / d input`` to every gradient. So the aux loss of every ``MoEGate`` is detached while
    active: the gradient is then exactly that of the velocity. hy3dgen 2.0's DiT
    (``Hunyuan3DDiT``) has no dropout, no ``self.training`` branch and no MoE, so train mode
    changes nothing there (same values, same gradients).

    The previous mode of EACH submodule is restored (a model may mix modes), also on error.
    """
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    gates = [m for m in model.modules() if type(m).__name__ == "MoEGate"]
    for gate in gates:
        _patch_forward(gate, _detached_aux)
    model.train()
    try:
        yield
    finally:
        for gate in gates:
            _unpatch_forward(gate)
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _checkpointed(model, enabled: bool):
    """Recompute the DiT's transformer blocks in backward (activation checkpointing) while active.

    hy3dgen's DiT has no checkpointing switch; this wraps each block's forward with
    ``torch.utils.checkpoint`` for the duration and restores it afterwards. The recomputation
    happens in backward, so the DiT's train mode (:func:`_dit_train_mode`) must still be on then.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    blocks = [m for name in ("double_blocks", "single_blocks", "blocks") for m in getattr(model, name, [])]
    for block in blocks:
        _patch_forward(block, lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))
    try:
        yield
    finally:
        for block in blocks:
            _unpatch_forward(block)
