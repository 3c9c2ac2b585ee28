"""GuidanceConfig: every knob of VLM test-time guidance, validated once, defaults explained."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")
GRADIENT_MODES = ("x0", "full")
NORMALIZATIONS = ("none", "rms")
SHADINGS = ("clay", "normals", "silhouette")
BACKENDS = ("auto", "torch", "nvdiffrast")
VOLUME_MODES = ("free", "keep", "no_growth")


@dataclass
class GuidanceConfig:
    """How the critic's gradient is added to Hunyuan3D's sampling steps (VLM3D eq. 10).

    At a guided step ``i`` with sigma ``s_i`` (hy3dgen's convention: 0 = noise, 1 = data)::

        v      = DiT(z_i)                         (with classifier-free guidance)
        x0     = z_i + (1 - s_i) * v              (clean-latent estimate)
        r      = critic(render(mesh(field(x0))))  (the dual-query log-odds)
        g      = d r / d x0   ("x0" mode)   or   d r / d z_i   ("full" mode, through the DiT)
        z_i+1  = z_i + (s_i+1 - s_i) * v + lam_i * normalize(g)

    Attributes (defaults and why):
        lam: guidance strength lambda. Default 0.02 with ``normalize="rms"``: each guided step
            then moves the latent by an update whose RMS is 0.02 per element, about the size of
            one Euler step of the 50-step sampler on a unit-variance latent (``(1/49) * |v|``),
            so guidance steers without overwhelming the sampler. With ``normalize="none"`` the
            scale depends on the critic's logits: start from ~1e-3 and watch the trace.
        schedule: how lambda varies over the guided window: "constant" (default, as eq. 10),
            "linear" (decays from ``lam`` to 0 over the window) or "cosine" (half-cosine decay);
            the decays follow the paper's annealing idea (sec. 4.3.1): strong early, when coarse
            structure forms, weak late, when details settle.
        start, end: the guided window as fractions of the steps, ``start <= i/(N-1) < end``
            (``end=1`` includes the last step).
            Default the whole run (the paper guides all 50 steps). The last step of the default
            schedule (sigma 1 -> 1) does not move the latent and is never guided.
        every: guide every k-th step inside the window (1 = every step, as the paper). Larger
            values trade quality for speed nearly linearly.
        gradient: "x0" (default): gradient w.r.t. the clean-latent estimate, no backward through
            the DiT; cheap, and the estimate is what the critic looks at. "full": through the DiT
            (and its CFG batch) to ``z_i``, as eq. 10 writes it; ~2-3x the memory and time.
        dit_checkpointing: in "full" mode, recompute DiT blocks in backward (saves memory).
        normalize: "rms" (default): ``g / rms(g)`` per batch item, scale-free, so ``lam`` means
            the same for any critic or resolution. "none": the raw gradient, as in the paper.
        clip: optional cap on the RMS of the update ``lam_i * normalize(g)`` per item (None = off).
        volume: what the update may do to the guidance mesh's enclosed volume ``V``. "free"
            (default): ``g`` as the critic gives it. "keep": ``g`` minus its component along
            ``dV/dx0`` (pulled back through the decoder like ``g``), before normalising: a step
            then changes ``V`` only to second order, so the critic's reward cannot be bought by
            swelling or thinning the shape, only by moving its surface. "no_growth": the same,
            but only at steps where ``g`` would grow the shape. Costs one more decoder backward
            per guided step. In "full" mode the projection is made at the clean estimate, before
            the DiT backward.
        volume_start: the ``volume`` mode holds from this fraction of the steps on,
            ``i/(N-1) >= volume_start`` (default 0: the whole run); earlier steps are "free". Early
            steps lay out the parts, where growing a missing one is a repair; late ones refine them,
            where growth is swelling. Measured on the toy world (16 references, lam 0.01; unguided
            7/16 failed): "free" 5/16, IoU 0.708; "keep" 8/16, 0.677 (its repairs are made by
            growth); "keep" from 0.5 6/16, 0.705 (benchmarks/RESULTS.md, tenth session).
        num_views, elevation, fov, render_size, shading, backend: the critic's views. Defaults
            4 views at 20 degrees elevation, 40 degrees fov, 448 px (a multiple of 28, so the
            Qwen-VL preprocessing is exact), clay shading (geometry only, like the paper's
            untextured Hunyuan shapes); backend "auto" = nvdiffrast on CUDA when installed.
        rotate_views: turn the whole orbit by a new azimuth at every guided step (default False:
            the same ``num_views`` azimuths at every step). Step ``i``'s offset is
            ``frac(i * 0.618...) * 360 / num_views`` degrees (the golden-ratio sequence: spread
            evenly over one view spacing, no random state, the same on every run). A critic's
            gradient has a part that belongs to the particular pictures (it changes when the views
            turn) and a part that belongs to the shape; with fixed views the first repeats at every
            step and adds up like the second, with turning views it changes from step to step and
            can average out. Only for a critic that judges every azimuth alike (a large pretrained
            VLM; the shipped toy critic knows one orbit). Measured on the toy world, it did not
            reduce failures, with the shipped critic or with one trained on turned orbits
            (benchmarks/RESULTS.md, fifth 2026-12-06 section).
        fill: framing. The views are fitted to the object at every guided step: from the step's
            guidance mesh (its vertices, without gradient) each view's image window is centred on
            the object's projected bounding box and zoomed so that its larger side spans ``fill``
            of the image (default 0.9; the orbit, view directions and perspective stay those of
            ``num_views``/``elevation``/``fov``). Without it an object fills about half the image
            and ~70 % of the critic's image tokens show background. Per step, because the clean
            estimate's shape and size change along the run; the reward's gradient is taken with
            that step's cameras held fixed. None frames the whole ``[-box_v, box_v]^3`` box instead.
        grid_resolution: the guidance field grid in cells per axis (points = cells + 1, as hy3dgen's
            ``octree_resolution`` and on the same bounds). Default 128, so that the critic judges
            a mesh that looks like the export (``octree_resolution``, 384 by default) and not a
            faceted 64^3 one with broken thin parts, which the dual query penalises: silhouette IoU
            of the critic's views against the 384^3 export >= 0.985 on analytic shapes with thin
            legs (0.94 at 64^3); see benchmarks/RESULTS.md. The guidance mesh is also placed where
            hy3dgen's stock marching cubes puts the exported surface (its R/(R+1) shrink, see
            :func:`~vlm3d_guidance.geometry.as_stock_export`); shading uses smooth
            (area-weighted vertex) normals.
        coarse_to_fine: decode that grid only near the surface: every other point first, then the
            cells around its sign changes, then every crossed cube completed (needs an even
            ``grid_resolution``). The same mesh as the dense grid wherever the surface touches that
            band, for about a quarter of the decoder queries at 128^3, which makes the default grid
            affordable; but a piece thinner than two cells (here 0.03 world units) that no coarse
            point sees is missed, as it would be on a dense 64^3 grid. Default True; False decodes
            every grid point (exact).
        track_surface: with ``coarse_to_fine``, decode from the second guided step on only a band
            around the previous step's surface plus a sentinel lattice (every 4th point), with a
            full coarse-to-fine decode whenever the surface leaves the band (recorded in the trace,
            ``StepRecord.decoding``). Same mesh as coarse-to-fine while the surface is followed;
            a new piece smaller than 4 cells between sentinel points is seen only at the next full
            decode. Default True (no effect without ``coarse_to_fine``).
        profile: time every stage of a guided step on CUDA (``StepRecord.seconds``), which costs two
            device synchronisations per stage. Off (default), a CUDA step records only its total
            time and reads the device once (reward, gradient check and norm together); on the CPU
            stage times are always recorded (they need no synchronisation there).
    """

    lam: float = 0.02
    schedule: str = "constant"
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    gradient: str = "x0"
    dit_checkpointing: bool = False
    normalize: str = "rms"
    clip: float | None = None
    volume: str = "free"
    volume_start: float = 0.0
    num_views: int = 4
    elevation: float = 20.0
    fov: float = 40.0
    render_size: int = 448
    shading: str = "clay"
    backend: str = "auto"
    fill: float | None = 0.9
    rotate_views: bool = False
    grid_resolution: int = 128
    coarse_to_fine: bool = True
    track_surface: bool = True
    profile: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> "GuidanceConfig":
        """Raise ValueError naming the first bad field and the fix; returns self."""
        _finite("lam", self.lam)
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0 (got {self.lam}); use 0 to switch guidance off")
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("gradient", self.gradient, GRADIENT_MODES)
        _choice("normalize", self.normalize, NORMALIZATIONS)
        _choice("volume", self.volume, VOLUME_MODES)
        _finite("volume_start", self.volume_start)
        if not 0.0 <= self.volume_start <= 1.0:
            raise ValueError(f"volume_start is a fraction of the steps, in [0, 1] (got {self.volume_start})")
        _choice("shading", self.shading, SHADINGS)
        _choice("backend", self.backend, BACKENDS)
        _finite("start", self.start)
        _finite("end", self.end)
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1 (got start={self.start}, end={self.end})")
        _positive_int("every", self.every)
        _positive_int("num_views", self.num_views)
        _positive_int("render_size", self.render_size, minimum=28)
        _positive_int("grid_resolution", self.grid_resolution, minimum=8)
        if not isinstance(self.coarse_to_fine, bool):
            raise ValueError(f"coarse_to_fine must be True or False (got {self.coarse_to_fine!r})")
        for name in ("track_surface", "profile", "rotate_views"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False (got {getattr(self, name)!r})")
        if self.coarse_to_fine and self.grid_resolution % 2:
            raise ValueError(f"coarse_to_fine needs an even grid_resolution (got {self.grid_resolution}); "
                             f"use {self.grid_resolution + 1}")
        _finite("elevation", self.elevation)
        _finite("fov", self.fov)
        if not 1.0 <= self.fov < 179.0:
            raise ValueError(f"fov is the full vertical field of view in degrees, 1..179 (got {self.fov})")
        if self.fill is not None:
            _finite("fill", self.fill)
            if not 0.0 < self.fill <= 1.0:
                raise ValueError(f"fill is the fraction of the image the object spans, in (0, 1], or None "
                                 f"to frame the whole box (got {self.fill})")
        if self.clip is not None:
            _finite("clip", self.clip)
            if self.clip <= 0:
                raise ValueError(f"clip must be > 0 or None (got {self.clip})")
        return self

    def replace(self, **overrides) -> "GuidanceConfig":
        """A copy with ``overrides`` applied (unknown names are a ValueError listing the known ones)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown guidance option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cameras(self, box_v: float = 1.01, device="cpu", azimuth_offset: float = 0.0):
        """The critic's orbit cameras before any fitting: ``num_views`` views at ``elevation`` and
        ``fov``, framing the box ``[-box_v, box_v]^3``, the orbit turned by ``azimuth_offset``
        degrees (:func:`~vlm3d_guidance.render.orbit_cameras`; a step's offset is
        :meth:`azimuth_offset`)."""
        from .render import orbit_cameras

        return orbit_cameras(num_views=self.num_views, elevation=self.elevation, fov=self.fov, device=device,
                             bounds=box_v, azimuth_offset=azimuth_offset)

    def azimuth_offset(self, step: int) -> float:
        """Degrees the orbit turns at sampling step ``step``: ``frac(step * (sqrt(5) - 1) / 2) * 360 /
        num_views`` with ``rotate_views``, else 0."""
        if not self.rotate_views:
            return 0.0
        return math.fmod(step * (math.sqrt(5.0) - 1.0) / 2.0, 1.0) * 360.0 / self.num_views

    def volume_at(self, step: int, num_steps: int) -> str:
        """The ``volume`` mode at sampling step ``step`` of ``num_steps``: ``volume`` from
        ``volume_start`` on, "free" before."""
        progress = step / (num_steps - 1) if num_steps > 1 else 1.0
        return self.volume if progress >= self.volume_start - 1e-9 else "free"

    def lam_at(self, step: int, num_steps: int) -> float:
        """Lambda at sampling step ``step`` of ``num_steps`` (0 outside the window or between ``every``)."""
        if self.lam == 0 or num_steps < 2:
            return 0.0
        progress = step / (num_steps - 1)
        if not (self.start <= progress and (progress < self.end or self.end == 1.0)):
            return 0.0
        first = math.ceil(self.start * (num_steps - 1) - 1e-9)
        if (step - first) % self.every != 0:
            return 0.0
        within = (progress - self.start) / (self.end - self.start)
        if self.schedule == "linear":
            return self.lam * (1.0 - within)
        if self.schedule == "cosine":
            return self.lam * 0.5 * (1.0 + math.cos(math.pi * within))
        return self.lam


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))} (got {value!r})")


def _finite(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (got {value!r})")


def _positive_int(name: str, value, minimum: int = 1, alternatives: str = "") -> int:
    """``value`` as an int, or a ValueError naming ``name``, the bound and ``alternatives`` (e.g.
    ``" or None"``). Any integral type is accepted (numpy's too), bool is not."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {bound}{alternatives} (got {value!r})")
    return int(value)
