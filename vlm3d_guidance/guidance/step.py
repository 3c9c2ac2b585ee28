"""One guided step's critic gradient: clean latent -> field -> mesh -> views -> reward -> gradient.

This is the one place that composes the stages (geometry, render, critic). Each stage runs
forward once; backward is taken stage by stage (critic, render, decode) with
``torch.autograd.grad`` over detached boundaries. By the chain rule this gives exactly the
gradient of one end-to-end backward, and it lets the trace time every stage separately.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..geometry import decode_surface
from ..render import fit_to_points, render_views

STAGES = ("dit", "decode", "render", "critic_forward", "critic_backward", "render_backward",
          "decode_backward", "dit_backward")


@dataclass
class StepRecord:
    """What happened at one sampling step (one entry of :attr:`GuidedOutput.trace`).

    Attributes:
        step: index in the sampling loop (0-based).
        sigma: hy3dgen's sigma at this step (0 = noise, 1 = data).
        lam: the scheduled guidance strength at this step (0 when the step is not guided).
        reward: the critic's reward of the clean-latent estimate, one float per batch item
            (None for items where it could not be computed).
        grad_norm: L2 norm of the raw gradient d r / d latent, one per batch item (None if none).
        guided: True when a guidance update was added to the step for at least one item.
        skipped: why guidance did not run, per batch item (None where it ran): "not scheduled"
            (lambda is 0 at this step: outside the window, between ``every`` steps, or the
            schedule's last step, which does not move the latent; ``reward`` and ``grad_norm``
            are then empty), "empty surface", "non-finite reward" or "non-finite gradient"
            (``reward``/``grad_norm`` hold None for that item).
        seconds: wall time per stage (keys from ``STAGES`` plus "step" for the whole step).
    """

    step: int
    sigma: float
    lam: float
    reward: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    guided: bool = False
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(step=self.step, sigma=self.sigma, lam=self.lam, reward=self.reward,
                    grad_norm=self.grad_norm, guided=self.guided, skipped=self.skipped,
                    seconds=self.seconds)


@contextmanager
def timed(seconds: dict, name: str, device: torch.device | None = None):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass
class RewardResult:
    """Reward and gradient of one batch item's clean latent.

    ``gradient`` has the shape of the latent given ([1, L, C]) or is None with ``skipped`` set.
    """

    reward: float | None
    gradient: torch.Tensor | None
    skipped: str | None
    images: torch.Tensor | None = None
    cameras: object = None


def reward_and_gradient(x0: torch.Tensor, vae, critic, prompt: str, cameras, *, box_v: float,
                        mc_level: float, grid_resolution: int, render_size: int, shading: str,
                        backend: str, num_chunks: int, seconds: dict,
                        want_gradient: bool = True, keep_images: bool = False,
                        coarse_to_fine: bool = False, fill: float | None = None) -> RewardResult:
    """The critic's reward of one clean latent and its gradient w.r.t. that latent.

    Args:
        x0: clean-latent estimate ``[1, L, C]`` (any float dtype; the gradient has its dtype).
        vae: hy3dgen ``ShapeVAE`` (``vae(x / scale_factor)`` then ``vae.geo_decoder``).
        critic: a :class:`~vlm3d_guidance.critic.VLMCritic` (may live on another device).
        prompt: the description inserted into the critic's query.
        cameras: :class:`~vlm3d_guidance.render.Cameras` for the views.
        seconds: dict that receives per-stage wall times (accumulated).
        want_gradient: False computes the reward only (no graph is kept).
        coarse_to_fine: decode the guidance grid only near the surface (see
            :func:`~vlm3d_guidance.geometry.decode_surface`).
        fill: fit ``cameras`` to this step's mesh (:func:`~vlm3d_guidance.render.fit_to_points`,
            from the vertices without gradient) so the object spans ``fill`` of every view; None
            renders with ``cameras`` as given. The cameras used are returned in the result.

    Returns:
        :class:`RewardResult`; ``skipped`` is "empty surface", "non-finite reward" or
        "non-finite gradient" when the step must go unguided (``gradient`` None then).
    """
    device = x0.device
    with torch.enable_grad() if want_gradient else torch.no_grad():
        leaf = x0.detach().requires_grad_(want_gradient)
        vae_dtype = next(vae.parameters()).dtype
        with timed(seconds, "decode", device):
            (verts, faces), = decode_surface(vae, leaf.to(vae_dtype), resolution=grid_resolution,
                                             box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                             coarse_to_fine=coarse_to_fine)
        if faces.shape[0] == 0:
            return RewardResult(None, None, "empty surface")
        # Render in float32 at least (float64 stays float64: exact gradient checks need it).
        verts_in = verts.detach().to(torch.promote_types(verts.dtype, torch.float32))
        verts_in.requires_grad_(want_gradient)
        if fill is not None:
            cameras = fit_to_points(cameras, verts_in.detach(), fill)
        with timed(seconds, "render", device):
            images = render_views(verts_in, faces, cameras, size=render_size, shading=shading,
                                  backend=backend)
        images_in = images.detach().requires_grad_(want_gradient)
        with timed(seconds, "critic_forward", device):
            reward = critic.reward(images_in, prompt)
        value = float(reward.detach())
        kept = images.detach() if keep_images else None
        if not math.isfinite(value):
            return RewardResult(None, None, "non-finite reward", kept, cameras)
        if not want_gradient:
            return RewardResult(value, None, None, kept, cameras)
        with timed(seconds, "critic_backward", device):
            (g_images,) = torch.autograd.grad(reward, images_in)
        with timed(seconds, "render_backward", device):
            (g_verts,) = torch.autograd.grad(images, verts_in, g_images)
        with timed(seconds, "decode_backward", device):
            (g_x0,) = torch.autograd.grad(verts, leaf, g_verts.to(verts.dtype), allow_unused=True)
    if g_x0 is None or not torch.isfinite(g_x0).all():
        return RewardResult(value, None, "non-finite gradient", kept, cameras)
    return RewardResult(value, g_x0, None, kept, cameras)


def normalized_update(gradient: torch.Tensor, lam: float, normalize: str, clip: float | None) -> torch.Tensor:
    """``lam * normalize(gradient)``, optionally clipped to an RMS of ``clip``.

    Args:
        gradient: ``[1, L, C]`` raw gradient of the reward.
        normalize: "none" (raw, as in the paper) or "rms" (divide by the gradient's RMS).
    """
    g = gradient.float()
    if normalize == "rms":
        rms = g.pow(2).mean().sqrt()
        g = g / rms.clamp_min(torch.finfo(g.dtype).tiny)
    update = lam * g
    if clip is not None:
        rms = update.pow(2).mean().sqrt()
        if rms > clip:
            update = update * (clip / rms)
    return update
