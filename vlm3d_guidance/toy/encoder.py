"""The toy autoencoder's encoder: shapes -> hy3dgen ``ShapeVAE`` latents ``[1, 64, 8]`` (training only).

hy3dgen 2.0.2's ``ShapeVAE`` has no encoder, so the toy brings its own. A latent is a set of
:data:`TOKENS` tokens ``[2 * seed_xyz (3), features (5)]``:

* the **seeds** lie on the surface of the INTACT object the shape was derived from (farthest-point
  samples of each part, the count per part proportional to the square root of its area, at least
  :data:`MIN_PER_PART`), so a broken shape and its intact original have tokens at the same places;
* the **features** are a small MLP of the ACTUAL shape's field ``clamp(-sdf / h, -1, 1)`` on a
  ``5^3`` stencil of spacing ``h = 0.1`` around each seed: a missing leg's tokens say "empty here",
  a floating part's say "surface shifted".

Why not a free encoder (3DShape2VecSet-style cross-attention from surface samples, v2's): its
tokens' places differ between an object and its broken variant, and the autoencoder learned to
close gaps and restore missing legs (its decode check passed 42 % of broken shapes as intact), so
the generator could not even be taught the failures the critic was meant to repair. The aligned
latents decode broken shapes as broken (the manifest's ``autoencoder_checks``).

The DiT sees the tokens as a set (hy3dgen's ``Hunyuan3DDiT`` has no positional embedding); the
seed coordinates are part of each token, so they are generated too.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TOKENS = 64  # = ShapeVAE num_latents
MIN_PER_PART = 4
STENCIL_SIDE = 5
STENCIL_SPACING = 0.1
POSITION_SCALE = 2.0  # token[:3] = 2 * seed: unit-ish variance like the features
FEATURES = 5  # token[3:]; embed_dim = 3 + FEATURES


def part_area(part) -> float:
    """Analytic surface area of a :class:`~vlm3d_guidance.toy.world.Part` (a half torus counts half)."""
    p = part.params
    if part.kind == "box":
        h = p["half"]
        return 8.0 * (h[0] * h[1] + h[1] * h[2] + h[0] * h[2])
    if part.kind == "cylinder":
        r, hh = p["radius"], p["half_height"]
        return 2.0 * math.pi * r * 2.0 * hh + 2.0 * math.pi * r * r
    if part.kind == "torus":
        full = 4.0 * math.pi ** 2 * p["major"] * p["minor"]
        return full * (0.5 if p.get("half_space") is not None else 1.0)
    if part.kind == "frustum":
        r0, r1, hh = p["r_bottom"], p["r_top"], p["half_height"]
        return math.pi * (r0 + r1) * math.hypot(r0 - r1, 2.0 * hh) + math.pi * (r0 * r0 + r1 * r1)
    raise ValueError(f"unknown part kind {part.kind!r}")


def tokens_per_part(parts, total: int = TOKENS, minimum: int = MIN_PER_PART) -> np.ndarray:
    """How many of ``total`` seeds each part gets: proportional to sqrt(area), at least ``minimum``,
    summing to ``total``."""
    w = np.array([math.sqrt(part_area(p)) for p in parts])
    n = np.maximum(minimum, np.floor(total * w / w.sum())).astype(int)
    while n.sum() > total:
        n[np.argmax(n)] -= 1
    while n.sum() < total:
        n[np.argmax(w / n)] += 1
    return n


def project_to_surface(sdf_fn, pts: torch.Tensor) -> torch.Tensor:
    """One Newton step of ``pts [N, 3]`` onto the zero set of ``sdf_fn`` (exact for exact SDFs)."""
    with torch.enable_grad():
        pts = pts.detach().requires_grad_(True)
        d = sdf_fn(pts)
        (g,) = torch.autograd.grad(d.sum(), pts)
    return (pts - d[:, None] * torch.nn.functional.normalize(g, dim=-1)).detach()


def part_box(part) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo [3], hi [3])`` float64: the part's bounds grown by 0.05."""
    from .world import _part_bounds

    lo, hi = _part_bounds(part)
    return torch.as_tensor(lo - 0.05, dtype=torch.float64), torch.as_tensor(hi + 0.05, dtype=torch.float64)


def farthest_points(points: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``[count]`` of farthest-point samples of ``points [N, 3]`` (starting at index 0)."""
    chosen = [0]
    dist = (points - points[0]).norm(dim=-1)
    for _ in range(count - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, (points - points[nxt]).norm(dim=-1))
    return torch.tensor(chosen)


def token_seeds(obj, candidates: int = 512, seed: int = 0) -> torch.Tensor:
    """``[TOKENS, 3]`` float32 seeds on the surface of the intact object ``obj`` derives from
    (``obj.intact_parts``, or its own parts when it is intact), deterministic for ``seed``: an object
    and its broken variants get the same seeds."""
    gen = torch.Generator().manual_seed(seed)
    parts = obj.intact_parts or obj.parts

    def union(p):
        return torch.stack([q.sdf(p) for q in parts]).min(0).values

    out = []
    for part, n in zip(parts, tokens_per_part(parts)):
        lo, hi = part_box(part)
        cand = lo + (hi - lo) * torch.rand(candidates * 4, 3, generator=gen, dtype=torch.float64)
        for _ in range(3):
            cand = project_to_surface(part.sdf, cand)
        on_surface = cand[union(cand).abs() < 2e-3][:candidates]  # on this part, not buried in another
        if on_surface.shape[0] < n:  # pragma: no cover - every part shows far more surface than this
            on_surface = cand[: max(int(n), candidates)]
        out.append(on_surface[farthest_points(on_surface, int(n))])
    return torch.cat(out).float()


_OFFSETS = torch.stack(torch.meshgrid(*[torch.linspace(-1.0, 1.0, STENCIL_SIDE)] * 3, indexing="ij"), -1)
_OFFSETS = _OFFSETS.reshape(-1, 3) * (STENCIL_SPACING * (STENCIL_SIDE - 1) / 2)


def stencil_field(obj, seeds: torch.Tensor) -> torch.Tensor:
    """``[K, 125]``: ``clamp(-obj.sdf / h, -1, 1)`` on the 5^3 stencil around each of ``seeds [K, 3]``."""
    pts = (seeds[:, None, :] + _OFFSETS[None]).reshape(-1, 3)
    with torch.no_grad():
        return (-obj.sdf(pts) / STENCIL_SPACING).clamp(-1, 1).reshape(seeds.shape[0], -1).float()


class StencilEncoder(torch.nn.Module):
    """``(seeds [B, K, 3], stencils [B, K, 125]) -> latents [B, K, 3 + FEATURES]``."""

    def __init__(self, width: int = 128):
        super().__init__()
        c = torch.nn
        self.net = c.Sequential(c.Linear(STENCIL_SIDE ** 3, width), c.SiLU(), c.Linear(width, width), c.SiLU(),
                                c.Linear(width, FEATURES))

    def forward(self, seeds: torch.Tensor, stencils: torch.Tensor) -> torch.Tensor:
        return torch.cat([POSITION_SCALE * seeds, self.net(stencils)], dim=-1)


def encoder_input(obj) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seeds [1, K, 3], stencils [1, K, 125])`` of one object (seeds from its intact original)."""
    seeds = token_seeds(obj)
    return seeds[None], stencil_field(obj, seeds)[None]
