"""Analytic shapes with thin parts, as signed distance functions (NEGATIVE inside, world units,
inside ``[-1, 1]^3``, +y up), to measure what the guidance grid loses against the export.

Each function maps points ``[P, 3]`` to values ``[P]``; unions are exact minima of exact box /
capsule / torus distances (the union's distance is exact outside, a bound inside: enough here).
"""

from __future__ import annotations

import torch


def _box(p, centre, half):
    q = (p - p.new_tensor(centre)).abs() - p.new_tensor(half)
    return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)


def _cylinder_y(p, centre, radius, half_height):
    q = p - p.new_tensor(centre)
    d = torch.stack([q[:, [0, 2]].norm(dim=-1) - radius, q[:, 1].abs() - half_height], dim=-1)
    return d.clamp_min(0).norm(dim=-1) + d.amax(dim=-1).clamp_max(0)


def _torus_xy(p, centre, major, minor):
    q = p - p.new_tensor(centre)
    ring = torch.stack([q[:, :2].norm(dim=-1) - major, q[:, 2]], dim=-1)
    return ring.norm(dim=-1) - minor


def chair(p: torch.Tensor) -> torch.Tensor:
    """Seat, four legs 0.07 thick (4.4 cells of a 128^3 grid over [-1.01, 1.01]), a back."""
    parts = [_box(p, (0, -0.05, 0), (0.4, 0.04, 0.4)), _box(p, (0, 0.45, -0.365), (0.4, 0.45, 0.035))]
    parts += [_box(p, (sx * 0.35, -0.52, sz * 0.35), (0.035, 0.43, 0.035)) for sx in (-1, 1) for sz in (-1, 1)]
    return torch.stack(parts).amin(dim=0)


def table(p: torch.Tensor) -> torch.Tensor:
    """A thin top (0.05) on four round legs of radius 0.03 (1.9 cells at 128^3)."""
    parts = [_box(p, (0, 0.3, 0), (0.75, 0.025, 0.45))]
    parts += [_cylinder_y(p, (sx * 0.65, -0.3, sz * 0.37), 0.03, 0.58) for sx in (-1, 1) for sz in (-1, 1)]
    return torch.stack(parts).amin(dim=0)


def mug(p: torch.Tensor) -> torch.Tensor:
    """A cylindrical cup (wall 0.06) with a torus handle (tube radius 0.05)."""
    outer = _cylinder_y(p, (0, 0, 0), 0.42, 0.45)
    inner = _cylinder_y(p, (0, 0.08, 0), 0.36, 0.45)
    cup = torch.maximum(outer, -inner)
    handle = _torus_xy(p, (0.52, 0, 0), 0.22, 0.05)
    return torch.minimum(cup, torch.maximum(handle, -outer))


def sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 0.6


SHAPES = {"chair": chair, "table": table, "mug": mug, "sphere": sphere}
