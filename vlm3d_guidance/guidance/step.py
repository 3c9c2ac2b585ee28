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

from ..geometry import as_stock_export, decode_surface, mesh_volume
from ..geometry.device import read_host
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
        grad_norm: L2 norm of the gradient d r / d latent the update is made from (after the
            ``volume`` projection where one is set), one per batch item (None if none).
        zero_share: share of that gradient's entries that are exactly 0, one per batch item (None
            if none): a share near 1 means the backward underflowed or is cut somewhere.
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
    zero_share: list = field(default_factory=list)
    guided: bool = False
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    decoding: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(step=self.step, sigma=self.sigma, lam=self.lam, reward=self.reward,
                    grad_norm=self.grad_norm, zero_share=self.zero_share, guided=self.guided, skipped=self.skipped,
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


def backward_scaled(output: torch.Tensor, inputs: torch.Tensor, grad_output: torch.Tensor,
                    low_dtype: torch.dtype, target: float = 256.0, **kwargs) -> torch.Tensor:
    """``d <output, grad_output> / d inputs`` through a network that runs in ``low_dtype``.

    In float16 a small ``grad_output`` (a reward's gradient at a vertex is often ~1e-6) underflows
    inside the network's backward. So it is first multiplied by a power of two ``s`` that brings
    its largest entry to ``(target / 2, target]``, and the result divided by ``s`` in float32 or
    wider (exact: powers of two); if that overflows, once more with ``s / 2^12``. Any other dtype
    runs unscaled. Under RMS normalisation the scale cancels anyway; this keeps the raw gradient
    right too. ``kwargs`` go to ``torch.autograd.grad`` (e.g. ``retain_graph``).
    """
    def wide(g, scale):
        return None if g is None else g.to(torch.promote_types(g.dtype, torch.float32)) / scale

    if low_dtype != torch.float16:  # no read of the device: only float16 needs the scale
        (g,) = torch.autograd.grad(output, inputs, grad_output, allow_unused=True, **kwargs)
        return wide(g, 1.0)
    peak = float(grad_output.detach().abs().max()) if grad_output.numel() else 0.0
    if not math.isfinite(peak) or peak == 0.0:
        (g,) = torch.autograd.grad(output, inputs, grad_output, allow_unused=True, **kwargs)
        return wide(g, 1.0)
    scale = 2.0 ** (math.ceil(math.log2(target)) - math.ceil(math.log2(peak)))
    keep = bool(kwargs.pop("retain_graph", False))
    (g,) = torch.autograd.grad(output, inputs, grad_output * scale, allow_unused=True, retain_graph=True, **kwargs)
    if g is not None and not bool(torch.isfinite(g).all()):
        scale /= 4096.0
        (g,) = torch.autograd.grad(output, inputs, grad_output * scale, allow_unused=True, retain_graph=keep,
                                   **kwargs)
    return wide(g, scale)


def zero_share(gradient: torch.Tensor) -> float:
    """Share of exactly-zero entries of ``gradient``."""
    return float((gradient == 0).float().mean())


@dataclass
class RewardResult:
    """Reward and gradient of one batch item's clean latent.

    ``gradient`` has the shape of the latent given ([1, L, C]), its dtype promoted to at least
    float32, or is None with ``skipped`` set; ``grad_norm`` and ``zero_share`` are its L2 norm
    and share of exact zeros (read together with the reward: one device read per call).
    """

    reward: float | None
    gradient: torch.Tensor | None
    skipped: str | None
    images: torch.Tensor | None = None
    cameras: object = None
    grad_norm: float | None = None
    zero_share: float | None = None


def reward_and_gradient(x0: torch.Tensor, vae, critic, prompt: str, cameras, *, box_v: float,
                        mc_level: float, grid_resolution: int, render_size: int, shading: str,
                        backend: str, num_chunks: int, seconds: dict,
                        want_gradient: bool = True, keep_images: bool = False,
                        coarse_to_fine: bool = False, fill: float | None = None,
                        export_resolution: int | None = None, track=None, profile: bool = False,
                        volume: str = "free") -> RewardResult:
    """The critic's reward of one clean latent and its gradient w.r.t. that latent.

    Args:
        x0: clean-latent estimate ``[1, L, C]`` (any float dtype; the gradient has it, at least float32).
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
        export_resolution: the exported mesh's ``octree_resolution`` when hy3dgen's stock
            marching cubes makes it: the guidance mesh is then placed where that export puts the
            surface (:func:`~vlm3d_guidance.geometry.as_stock_export`, which shrinks by R/(R+1)
            towards ``-box_v``), so the critic's views match the export; None renders it as decoded.
        track: a :class:`~vlm3d_guidance.geometry.SurfaceTrack` to decode around the previous
            step's surface (with ``coarse_to_fine``), updated in place; None: no tracking.
        profile: time the stages on CUDA too (synchronising around each, see :func:`timed`).
        volume: "free" (default) returns the reward's gradient as it is; "keep" and "no_growth"
            also pull the guidance mesh's enclosed volume back to the latent (one more decode
            backward) and remove that direction from the gradient (:func:`project_volume`), always
            or only where the gradient would grow the shape.

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
        placed = verts_in if export_resolution is None else as_stock_export(verts_in, export_resolution, box_v)
        if fill is not None:
            cameras = fit_to_points(cameras, placed.detach(), fill)
        with timed(seconds, "render", device, profile):
            images = render_views(placed, faces, cameras, size=render_size, shading=shading,
                                  backend=backend)
        images_in = images.detach().requires_grad_(want_gradient)
        with timed(seconds, "critic_forward", device, profile):
            reward = critic.reward(images_in, prompt)
        kept = images.detach() if keep_images else None
        if not want_gradient:
            value = float(reward.detach())
            if not math.isfinite(value):
                return RewardResult(None, None, "non-finite reward", kept, cameras)
            return RewardResult(value, None, None, kept, cameras)
        with timed(seconds, "critic_backward", device, profile):
            (g_images,) = torch.autograd.grad(reward, images_in)
        with timed(seconds, "render_backward", device, profile):
            (g_verts,) = torch.autograd.grad(images, verts_in, g_images)
        with timed(seconds, "decode_backward", device, profile):
            g_x0 = backward_scaled(verts, leaf, g_verts.to(verts.dtype), vae_dtype, retain_graph=volume != "free")
            if g_x0 is not None:  # kept in float32 at least: a float16 cast would underflow it again
                g_x0 = g_x0.to(torch.promote_types(leaf.dtype, torch.float32))
            if g_x0 is not None and volume != "free":
                enclosed = mesh_volume(verts_in, faces)
                (g_verts_volume,) = torch.autograd.grad(enclosed, verts_in)
                g_volume = backward_scaled(verts, leaf, g_verts_volume.to(verts.dtype), vae_dtype)
                if g_volume is not None:
                    g_x0 = project_volume(g_x0, g_volume.to(g_x0.dtype), enclosed.detach().sign(), volume)
    if g_x0 is None:
        value = float(reward.detach())
        if not math.isfinite(value):
            return RewardResult(None, None, "non-finite reward", kept, cameras)
        return RewardResult(value, None, "non-finite gradient", kept, cameras)
    # the one device read of the step: reward, "gradient finite" and its norm together
    g = g_x0.detach()
    value, finite, norm, zeros = read_host(torch.stack([
        reward.detach().to(g.device, torch.float64).reshape(()), torch.isfinite(g).all().double(),
        g.double().norm(), (g == 0).double().mean()]))
    if not math.isfinite(value):
        return RewardResult(None, None, "non-finite reward", kept, cameras)
    if not finite:
        return RewardResult(value, None, "non-finite gradient", kept, cameras)
    return RewardResult(value, g_x0, None, kept, cameras, grad_norm=norm, zero_share=zeros)


@torch.no_grad()
def reward_of_mesh(verts: torch.Tensor, faces: torch.Tensor, critic, prompt: str, cameras, *,
                   render_size: int, shading: str, backend: str, fill: float | None) -> float | None:
    """The critic's reward of one finished mesh (e.g. the exported one), as the critic would see it
    during guidance: the same cameras, fitted to this mesh when ``fill`` is set, the same shading.

    Args:
        verts: ``[V, 3]`` world coordinates; faces: ``[F, 3]`` (either winding: shading is two-sided).

    Returns:
        the reward as a float, or None for an empty mesh or a non-finite reward.
    """
    if faces.shape[0] == 0 or verts.shape[0] == 0:
        return None
    verts = verts.to(torch.promote_types(verts.dtype, torch.float32))
    if fill is not None:
        cameras = fit_to_points(cameras, verts, fill)
    images = render_views(verts, faces, cameras, size=render_size, shading=shading, backend=backend)
    value = float(critic.reward(images, prompt))
    return value if math.isfinite(value) else None


def project_volume(gradient: torch.Tensor, volume_gradient: torch.Tensor, orientation: torch.Tensor,
                   mode: str) -> torch.Tensor:
    """The reward's gradient without the part that changes the enclosed volume (to first order).

    ``g - (<g, gv> / <gv, gv>) gv``: a step along the result leaves ``V`` unchanged to first order,
    as ``<gv, result> = 0``. Read on the device only (no host sync).

    Args:
        gradient: ``g``, ``[1, L, C]`` gradient of the reward w.r.t. the clean latent.
        volume_gradient: ``gv``, same shape, gradient of the mesh's signed volume ``V``.
        orientation: 0-dim, the sign of ``V`` (``+1`` when the faces wind outward), so that
            ``orientation * gv`` points to growth.
        mode: "keep" removes the volume direction always; "no_growth" only when ``g`` grows
            the shape (``<g, orientation * gv> > 0``), so shrinking steps pass unchanged.

    Returns:
        the projected gradient, shape and dtype of ``gradient`` (``gradient`` itself when ``gv`` is 0).
    """
    dot = (gradient * volume_gradient).sum()
    norm2 = volume_gradient.pow(2).sum()
    coef = dot / norm2.clamp_min(torch.finfo(norm2.dtype).tiny)
    if mode == "no_growth":
        coef = torch.where(dot * orientation > 0, coef, torch.zeros_like(coef))
    elif mode != "keep":
        raise ValueError(f"volume must be 'free', 'keep' or 'no_growth' (got {mode!r})")
    return gradient - coef * volume_gradient


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
