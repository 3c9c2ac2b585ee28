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
from ..geometry.device import read_host
from ..render import render_views

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
        seconds: wall time per stage (keys from ``STAGES`` plus "step" for the whole step). On
            CUDA the stages are timed only with ``GuidanceConfig.profile`` (each costs two device
            synchronisations); on the CPU always.
        decoding: per batch item, how the guidance grid was decoded (None where not decoded or
            dense): ``dict(mode="full"|"tracked", reason, queries, dense)`` from the surface track
            (``reason`` says why a full decode ran, e.g. the surface left the band).
    """

    step: int
    sigma: float
    lam: float
    reward: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    guided: bool = False
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    decoding: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(step=self.step, sigma=self.sigma, lam=self.lam, reward=self.reward,
                    grad_norm=self.grad_norm, guided=self.guided, skipped=self.skipped,
                    seconds=self.seconds, decoding=self.decoding)


@contextmanager
def timed(seconds: dict, name: str, device: torch.device | None = None, profile: bool = True):
    """Add the wall time of the block to ``seconds[name]``. On CUDA the device is synchronised
    before and after (exact stage times), and only when ``profile``: otherwise nothing is timed
    there (no synchronisation). On the CPU the time is always recorded (no synchronisation needed)."""
    if device is not None and device.type == "cuda":
        if not profile:
            yield
            return
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

    ``gradient`` has the shape of the latent given ([1, L, C]) or is None with ``skipped`` set;
    ``grad_norm`` is its L2 norm (read together with the reward: one device read per call).
    """

    reward: float | None
    gradient: torch.Tensor | None
    skipped: str | None
    images: torch.Tensor | None = None
    grad_norm: float | None = None


def reward_and_gradient(x0: torch.Tensor, vae, critic, prompt: str, cameras, *, box_v: float,
                        mc_level: float, grid_resolution: int, render_size: int, shading: str,
                        backend: str, num_chunks: int, seconds: dict,
                        want_gradient: bool = True, keep_images: bool = False,
                        coarse_to_fine: bool = False, track=None, profile: bool = False) -> RewardResult:
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
        track: a :class:`~vlm3d_guidance.geometry.SurfaceTrack` to decode around the previous
            step's surface (with ``coarse_to_fine``), updated in place; None: no tracking.
        profile: time the stages on CUDA too (synchronising around each, see :func:`timed`).

    The device is read once per call (reward, gradient finiteness and norm in one transfer);
    the backward passes run before it, also when the reward turns out non-finite.

    Returns:
        :class:`RewardResult`; ``skipped`` is "empty surface", "non-finite reward" or
        "non-finite gradient" when the step must go unguided (``gradient`` None then).
    """
    device = x0.device
    with torch.enable_grad() if want_gradient else torch.no_grad():
        leaf = x0.detach().requires_grad_(want_gradient)
        vae_dtype = next(vae.parameters()).dtype
        with timed(seconds, "decode", device, profile):
            (verts, faces), = decode_surface(vae, leaf.to(vae_dtype), resolution=grid_resolution,
                                             box_v=box_v, mc_level=mc_level, num_chunks=num_chunks,
                                             coarse_to_fine=coarse_to_fine,
                                             tracks=None if track is None else [track])
        if faces.shape[0] == 0:  # a shape the host knows already: no device read
            return RewardResult(None, None, "empty surface")
        # Render in float32 at least (float64 stays float64: exact gradient checks need it).
        verts_in = verts.detach().to(torch.promote_types(verts.dtype, torch.float32))
        verts_in.requires_grad_(want_gradient)
        with timed(seconds, "render", device, profile):
            images = render_views(verts_in, faces, cameras, size=render_size, shading=shading,
                                  backend=backend)
        images_in = images.detach().requires_grad_(want_gradient)
        with timed(seconds, "critic_forward", device, profile):
            reward = critic.reward(images_in, prompt)
        kept = images.detach() if keep_images else None
        if not want_gradient:
            value = float(reward.detach())
            if not math.isfinite(value):
                return RewardResult(None, None, "non-finite reward", kept)
            return RewardResult(value, None, None, kept)
        with timed(seconds, "critic_backward", device, profile):
            (g_images,) = torch.autograd.grad(reward, images_in)
        with timed(seconds, "render_backward", device, profile):
            (g_verts,) = torch.autograd.grad(images, verts_in, g_images)
        with timed(seconds, "decode_backward", device, profile):
            (g_x0,) = torch.autograd.grad(verts, leaf, g_verts.to(verts.dtype), allow_unused=True)
    if g_x0 is None:
        value = float(reward.detach())
        if not math.isfinite(value):
            return RewardResult(None, None, "non-finite reward", kept)
        return RewardResult(value, None, "non-finite gradient", kept)
    # the one device read of the step: reward, "gradient finite" and its norm together
    g = g_x0.detach()
    value, finite, norm = read_host(torch.stack([reward.detach().to(g.device, torch.float64).reshape(()),
                                                 torch.isfinite(g).all().double(), g.double().norm()]))
    if not math.isfinite(value):
        return RewardResult(None, None, "non-finite reward", kept)
    if not finite:
        return RewardResult(value, None, "non-finite gradient", kept)
    return RewardResult(value, g_x0, None, kept, grad_norm=norm)


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
    if clip is not None:  # scale by min(1, clip / rms) without reading the device
        rms = update.pow(2).mean().sqrt()
        update = update * (clip / rms).clamp(max=1.0)
    return update
