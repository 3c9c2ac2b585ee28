"""The toy world: part-assembled objects with analytic signed distance functions.

Conventions (stated once for the whole toy package):

- World space is the sampler's box ``[-1.01, 1.01]^3`` with **+y up**; the reference camera looks
  from azimuth 30 degrees (0 = on the +z axis, 90 = on the +x axis, as
  :func:`~vlm3d_guidance.render.orbit_cameras`) and 20 degrees elevation.
- An SDF is **negative inside**, in world units. Hunyuan's field is positive inside; the toy
  generator is trained on ``field = clamp(-sdf / TRUNCATION, -1, 1)`` so its iso-level 0 is the surface.
- Every intact object is normalised on its own (as Hunyuan's training meshes are): the bounding box
  of its parts is centred at the origin and its longest half-extent scaled to :data:`HALF_EXTENT`.
  A broken variant keeps its intact object's placement, so a part that is missing or moved is the
  only difference (the judge compares against the intact parts).

Classes (each with continuous parameters; a target can be *broken*, the toy failure modes):

========= ============================================= =============================================
class     parts (description)                            broken variants
========= ============================================= =============================================
table     top + 4 legs ("a table with four legs")        a leg detached (gap under the top), a leg missing
mug       body + handle ("a mug with a handle")          handle detached and floating, handle missing
cup       body ("a cup without a handle")                none (it is one part)
lamp      base + pole + shade ("a lamp with a base, a    shade floating (the pole ends below it), shade
          pole and a shade")                             missing, pole missing (the shade then floats)
========= ============================================= =============================================

A missing-handle mug has the geometry of a cup: :attr:`ToyObject.geometry_class` says what the
shape *is* (used to label the critic's training data), :attr:`ToyObject.cls` what it was meant to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

CLASSES = ("table", "mug", "cup", "lamp")
DESCRIPTIONS = {
    "table": "a table with four legs",
    "mug": "a mug with a handle",
    "cup": "a cup without a handle",
    "lamp": "a lamp with a base, a pole and a shade",
}
BREAK_MODES = {
    "table": ("leg detached", "leg missing"),
    "mug": ("handle floating", "handle missing"),
    "cup": (),
    "lamp": ("shade floating", "shade missing", "pole missing"),
}
HALF_EXTENT = 0.8  # longest half-extent of a normalised object (inside box_v = 1.01)
TRUNCATION = 0.2  # world units over which the training field goes from 0 to +-1
REFERENCE_AZIMUTH = 30.0
REFERENCE_ELEVATION = 20.0


# ---------------------------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class Part:
    """One primitive. ``kind`` in {"box", "cylinder", "torus", "frustum"}; ``params`` as below.

    - box: center (3,), half (3,)
    - cylinder (axis +y): center (3,), radius, half_height
    - torus: center (3,), normal (3,) unit (the ring's axis), major a, minor b, optional
      half_space (3,) unit: only the half ring on that side of the centre is kept
    - frustum (axis +y, solid): center (3,), r_bottom, r_top, half_height
    """

    name: str
    kind: str
    params: dict

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """``p [N, 3]`` -> signed distance ``[N]`` (exact for box/cylinder/torus, a bound for frustum)."""
        c = torch.as_tensor(self.params["center"], dtype=p.dtype, device=p.device)
        q = p - c
        k = self.kind
        if k == "box":
            half = torch.as_tensor(self.params["half"], dtype=p.dtype, device=p.device)
            d = q.abs() - half
            return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)
        if k == "cylinder":
            r, hh = self.params["radius"], self.params["half_height"]
            d = torch.stack([q[:, [0, 2]].norm(dim=-1) - r, q[:, 1].abs() - hh], dim=-1)
            return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)
        if k == "torus":
            n = torch.as_tensor(self.params["normal"], dtype=p.dtype, device=p.device)
            w = q @ n  # along the ring's axis
            inplane = (q - w[:, None] * n).norm(dim=-1)
            d = torch.sqrt((inplane - self.params["major"]) ** 2 + w ** 2) - self.params["minor"]
            cut = self.params.get("half_space")  # keep only the half with (q . cut) >= 0
            if cut is not None:
                d = torch.maximum(d, -(q @ torch.as_tensor(cut, dtype=p.dtype, device=p.device)))
            return d
        if k == "frustum":
            r0, r1, hh = self.params["r_bottom"], self.params["r_top"], self.params["half_height"]
            t = ((q[:, 1] + hh) / (2 * hh)).clamp(0, 1)
            radius = r0 + (r1 - r0) * t
            slope = math.atan2(abs(r0 - r1), 2 * hh)
            d_r = (q[:, [0, 2]].norm(dim=-1) - radius) * math.cos(slope)
            d = torch.stack([d_r, q[:, 1].abs() - hh], dim=-1)
            return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)
        raise ValueError(f"unknown part kind {k!r}")

    def transformed(self, scale: float, shift: np.ndarray) -> "Part":
        """The part after ``x -> scale * (x + shift)``."""
        p = dict(self.params)
        p["center"] = tuple(float(v) for v in scale * (np.asarray(p["center"]) + shift))
        for key in ("half",):
            if key in p:
                p[key] = tuple(float(v) * scale for v in p[key])
        for key in ("radius", "half_height", "major", "minor", "r_bottom", "r_top"):
            if key in p:
                p[key] = float(p[key]) * scale
        return Part(self.name, self.kind, p)


# -------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class ToyObject:
    """An object of the toy world (normalised into the box).

    Attributes:
        cls: the class it was sampled as (one of :data:`CLASSES`).
        params: the continuous parameters it was built from.
        parts: its primitives (world units, normalised).
        broken: None for an intact object, else the break mode (see :data:`BREAK_MODES`).
        intact_parts: the parts of the intact object it was derived from (same normalisation as
            the intact object): the judge's ground truth.
    """

    cls: str
    params: dict
    parts: tuple
    broken: str | None = None
    intact_parts: tuple = field(default=(), repr=False)

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.cls]

    @property
    def geometry_class(self) -> str | None:
        """What the shape is: its class when intact, "cup" for a handle-less mug, else None."""
        if self.broken is None:
            return self.cls
        if self.broken == "handle missing":
            return "cup"
        return None

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """``p [N, 3]`` -> union SDF ``[N]`` (negative inside)."""
        return torch.stack([part.sdf(p) for part in self.parts], dim=0).min(dim=0).values

    def field(self, p: torch.Tensor) -> torch.Tensor:
        """The generator's training field at ``p``: ``clamp(-sdf / TRUNCATION, -1, 1)`` (positive inside)."""
        return (-self.sdf(p) / TRUNCATION).clamp(-1.0, 1.0)


def _table(rng: np.random.Generator) -> tuple[dict, list]:
    w, d = rng.uniform(0.7, 1.0), rng.uniform(0.45, 0.8)
    t, H = rng.uniform(0.06, 0.1), rng.uniform(0.6, 1.0)
    r, inset = rng.uniform(0.09, 0.13), rng.uniform(0.04, 0.12)
    params = dict(half_width=w, half_depth=d, half_thickness=t, leg_length=H, leg_radius=r, inset=inset)
    parts = [Part("top", "box", dict(center=(0.0, H + t, 0.0), half=(w, t, d)))]
    for i, (sx, sz) in enumerate(((1, 1), (1, -1), (-1, 1), (-1, -1))):
        x, z = sx * (w - inset - r), sz * (d - inset - r)
        parts.append(Part(f"leg{i}", "cylinder", dict(center=(x, H / 2 + 0.01, z), radius=r, half_height=H / 2 + 0.01)))
    return params, parts


def _body(rng: np.random.Generator) -> tuple[dict, list]:
    R, h = rng.uniform(0.35, 0.5), rng.uniform(0.35, 0.55)
    return dict(radius=R, half_height=h), [Part("body", "cylinder", dict(center=(0.0, h, 0.0), radius=R, half_height=h))]


def _handle(R: float, h: float, azimuth: float, a: float, b: float, offset: float = 0.0) -> Part:
    """A half ring (C shape) in the vertical plane through the body axis at ``azimuth`` (radians),
    its ends sunk 0.03 into the body wall (``offset`` further out: detached by ``offset - 0.03``)."""
    radial = np.array([math.sin(azimuth), 0.0, math.cos(azimuth)])
    tangent = np.array([math.cos(azimuth), 0.0, -math.sin(azimuth)])
    center = (R - 0.03 + offset) * radial + np.array([0.0, h, 0.0])
    return Part("handle", "torus", dict(center=tuple(center), normal=tuple(tangent), major=a, minor=b,
                                        half_space=tuple(radial)))


def _mug(rng: np.random.Generator) -> tuple[dict, list]:
    params, parts = _body(rng)
    a = min(rng.uniform(0.18, 0.26), 0.8 * params["half_height"])
    b = rng.uniform(0.065, 0.09)
    # the handle faces the reference camera's half of the world (within 100 degrees of it), so the
    # reference shows it; hidden_handle_references() turns it away on purpose
    az = math.radians(REFERENCE_AZIMUTH) + rng.uniform(-1.0, 1.0) * math.radians(100.0)
    params.update(handle_major=a, handle_minor=b, handle_azimuth=az)
    parts.append(_handle(params["radius"], params["half_height"], az, a, b))
    return params, parts


def _cup(rng: np.random.Generator) -> tuple[dict, list]:
    return _body(rng)


def _lamp(rng: np.random.Generator) -> tuple[dict, list]:
    rb, hb = rng.uniform(0.3, 0.45), rng.uniform(0.04, 0.07)
    rp, P = rng.uniform(0.08, 0.11), rng.uniform(0.9, 1.3)
    r1, r2, s = rng.uniform(0.35, 0.5), rng.uniform(0.15, 0.3), rng.uniform(0.35, 0.5)
    params = dict(base_radius=rb, base_half_height=hb, pole_radius=rp, pole_top=P,
                  shade_bottom_radius=r1, shade_top_radius=r2, shade_height=s)
    shade_bottom = P - 0.1
    parts = [
        Part("base", "cylinder", dict(center=(0.0, hb, 0.0), radius=rb, half_height=hb)),
        Part("pole", "cylinder", dict(center=(0.0, (hb + P) / 2, 0.0), radius=rp, half_height=(P - hb) / 2 + 0.01)),
        Part("shade", "frustum", dict(center=(0.0, shade_bottom + s / 2, 0.0), r_bottom=r1, r_top=r2, half_height=s / 2)),
    ]
    return params, parts


_BUILDERS = {"table": _table, "mug": _mug, "cup": _cup, "lamp": _lamp}


def _break(cls: str, params: dict, parts: list, mode: str, rng: np.random.Generator, scale: float) -> list:
    """The parts of the broken variant ``mode`` (world units, before normalisation by ``scale``).

    Gaps are drawn in normalised units (what the sampler's box shows) and divided by ``scale``.
    """
    parts = list(parts)
    if cls == "table":
        i = 1 + int(rng.integers(4))
        leg = parts[i]
        if mode == "leg missing":
            return parts[:i] + parts[i + 1:]
        gap = rng.uniform(0.15, 0.3) / scale
        H = params["leg_length"]
        length = H - gap
        c = leg.params["center"]
        parts[i] = Part(leg.name, "cylinder", dict(center=(c[0], length / 2, c[2]), radius=leg.params["radius"],
                                                   half_height=length / 2))
        return parts
    if cls == "mug":
        if mode == "handle missing":
            return parts[:1]
        a, b = params["handle_major"], params["handle_minor"]
        gap = rng.uniform(0.1, 0.16) / scale
        parts[1] = _handle(params["radius"], params["half_height"], params["handle_azimuth"], a, b, offset=0.03 + gap)
        return parts
    if cls == "lamp":
        if mode == "shade missing":
            return parts[:2]
        if mode == "pole missing":
            return [parts[0], parts[2]]
        gap = rng.uniform(0.15, 0.3) / scale  # the pole ends this far below the shade
        hb, top = params["base_half_height"], params["pole_top"] - 0.1 - gap
        parts[1] = Part("pole", "cylinder", dict(center=(0.0, (hb + top) / 2, 0.0), radius=params["pole_radius"],
                                                 half_height=(top - hb) / 2 + 0.01))
        return parts
    raise ValueError(f"class {cls!r} has no broken variants")


def _part_bounds(part: Part) -> tuple[np.ndarray, np.ndarray]:
    """Analytic axis-aligned bounds of one part (exact; a half ring's flat ends are bounded by its tube)."""
    p = part.params
    c = np.asarray(p["center"], dtype=np.float64)
    if part.kind == "box":
        h = np.asarray(p["half"])
    elif part.kind == "cylinder":
        h = np.array([p["radius"], p["half_height"], p["radius"]])
    elif part.kind == "frustum":
        r = max(p["r_bottom"], p["r_top"])
        h = np.array([r, p["half_height"], r])
    else:  # torus: the ring is c + a (cos t u + sin t v), u = in-plane direction, v = n x u
        n = np.asarray(p["normal"], dtype=np.float64)
        a, b = p["major"], p["minor"]
        if p.get("half_space") is not None:
            u = np.asarray(p["half_space"], dtype=np.float64)
            v = np.cross(n, u)
            # t in [-90, 90] degrees: the u-component a cos t runs over [0, a], the v-component over [-a, a]
            lo = c + np.minimum(0.0, a * u) - a * np.abs(v) - b
            hi = c + np.maximum(0.0, a * u) + a * np.abs(v) + b
            return lo, hi
        h = a * np.sqrt(np.clip(1.0 - n ** 2, 0.0, None)) + b  # full ring: a * |in-plane extent| + tube
    return c - h, c + h


def _bounds(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds of the union of ``parts``."""
    boxes = [_part_bounds(p) for p in parts]
    return np.min([lo for lo, _ in boxes], axis=0), np.max([hi for _, hi in boxes], axis=0)


def _normalisation(parts: list) -> tuple[float, np.ndarray]:
    """``(scale, shift)`` that centre the parts' bounds and scale their longest half-extent to HALF_EXTENT."""
    lo, hi = _bounds(parts)
    return HALF_EXTENT / float(((hi - lo) / 2).max()), -(lo + hi) / 2


def _apply(parts: list, norm: tuple[float, np.ndarray]) -> list:
    return [p.transformed(norm[0], norm[1]) for p in parts]


def sample_object(rng: np.random.Generator, cls: str | None = None, broken: str | bool | None = None) -> ToyObject:
    """One random object.

    Args:
        rng: the random stream (its draws fully determine the object).
        cls: a class name, or None for a uniformly random class.
        broken: None/False for intact, a mode name, or True for a random mode of the class.
    """
    cls = CLASSES[int(rng.integers(len(CLASSES)))] if cls is None else cls
    if cls not in _BUILDERS:
        raise ValueError(f"unknown toy class {cls!r}; choose one of {CLASSES}")
    recorder = _Recorder(rng)
    params, parts = _BUILDERS[cls](recorder)
    params["draws"] = tuple(recorder.draws)
    intact = ToyObject(cls, params, tuple(_apply(parts, _normalisation(parts))))
    intact = replace(intact, intact_parts=intact.parts)
    if not broken:
        return intact
    return broken_variant(intact, rng, None if broken is True else broken)


def broken_variant(obj: ToyObject, rng: np.random.Generator, mode: str | None = None) -> ToyObject | None:
    """A broken variant of intact ``obj``: same parameters and placement, one part moved or removed.

    Returns None for a class without break modes. ``mode`` None draws one from ``rng``.
    """
    modes = BREAK_MODES[obj.cls]
    if not modes:
        return None
    mode = modes[int(rng.integers(len(modes)))] if mode is None else mode
    if mode not in modes:
        raise ValueError(f"{obj.cls} has no break mode {mode!r}; modes: {modes}")
    _, parts = _BUILDERS[obj.cls](_Replay(obj.params["draws"]))
    norm = _normalisation(parts)
    shrink = 1.0
    for _ in range(6):  # a moved part must stay inside the box: halve its gap until it does
        broken = _apply(_break(obj.cls, obj.params, parts, mode, rng, norm[0] / shrink), norm)
        lo, hi = _bounds(broken)
        if max(-lo.min(), hi.max()) <= 0.95:
            break
        shrink *= 0.5
    return replace(obj, parts=tuple(broken), broken=mode)


class _Recorder:
    """Wraps a numpy Generator and records every ``uniform`` draw a builder makes, in order."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self.draws: list = []

    def uniform(self, lo=0.0, hi=1.0):
        v = float(self._rng.uniform(lo, hi))
        self.draws.append(v)
        return v


class _Replay:
    """Feeds a builder the recorded draws again (so a variant rebuilds exactly the same object)."""

    def __init__(self, draws):
        self._values = list(draws)
        self._i = 0

    def uniform(self, lo=0.0, hi=1.0):
        v = self._values[self._i]
        self._i += 1
        return v


def with_handle_azimuth(obj: ToyObject, azimuth_deg: float) -> ToyObject:
    """The same mug with its handle turned to ``azimuth_deg`` (world azimuth, degrees)."""
    if obj.cls != "mug" or obj.broken is not None:
        raise ValueError("with_handle_azimuth takes an intact mug")
    draws = list(obj.params["draws"])
    draws[4] = (azimuth_deg - REFERENCE_AZIMUTH) / 100.0  # the fifth draw places the handle (see _mug)
    params, parts = _BUILDERS["mug"](_Replay(draws))
    params["draws"] = tuple(draws)
    intact = tuple(_apply(parts, _normalisation(parts)))
    return ToyObject("mug", params, intact, None, intact)
