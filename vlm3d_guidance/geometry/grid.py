"""The one place where grid indices and world coordinates meet.

A :class:`FieldGrid` is the regular lattice the field is sampled on. It reproduces hy3dgen's stock
dense grid exactly: ``resolution`` cells per axis, so ``resolution + 1`` points per axis, the first at
``-box_v`` and the last at ``+box_v`` (``numpy.linspace(-box_v, box_v, resolution + 1)``), axis order
x, y, z with ``indexing="ij"`` (the array ``field[i, j, k]`` is the value at ``(x_i, y_j, z_k)``).

Note on the stock extractor: hy3dgen 2.0.2's ``MCSurfaceExtractor`` maps marching-cubes vertex
indices to world space with ``idx / grid_size * size + min`` where ``grid_size = resolution + 1``
(the number of POINTS, not cells), which shrinks every mesh by ``resolution / (resolution + 1)``
towards ``-box_v``. We do NOT copy that: here ``world = -box_v + idx * spacing`` with
``spacing = 2 * box_v / resolution``, so index ``resolution`` lands exactly on ``+box_v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_POINTS_CACHE: dict = {}
_POINTS_CACHE_SIZE = 4


@dataclass(frozen=True)
class FieldGrid:
    """A cubic lattice over ``[-box_v, box_v]^3`` with ``resolution`` cells per axis.

    Attributes:
        resolution: number of cells per axis; the grid has ``resolution + 1`` points per axis.
        box_v: half extent of the box (hy3dgen's ``box_v`` / ``bounds``, default 1.01).
    """

    resolution: int
    box_v: float = 1.01

    def __post_init__(self):
        if int(self.resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if not self.box_v > 0:
            raise ValueError(f"box_v must be > 0, got {self.box_v}")

    @classmethod
    def from_bounds(cls, num_points: int, bounds=(-1.01, 1.01)) -> "FieldGrid":
        """The grid with ``num_points`` per axis spanning symmetric ``bounds = (lo, hi)``."""
        lo, hi = float(bounds[0]), float(bounds[1])
        if abs(lo + hi) > 1e-9 * max(1.0, abs(hi)):
            raise ValueError(f"bounds must be symmetric (-b, b), got {bounds}")
        return cls(resolution=int(num_points) - 1, box_v=hi)

    @property
    def num_points(self) -> int:
        """Points per axis (``resolution + 1``)."""
        return int(self.resolution) + 1

    @property
    def spacing(self) -> float:
        """World distance between neighbouring grid points."""
        return 2.0 * self.box_v / self.resolution

    @property
    def shape(self) -> tuple:
        return (self.num_points,) * 3

    def axis(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """The ``num_points`` world coordinates along one axis (both ends included)."""
        # computed in float64 then cast, like numpy.linspace, so both ends are exact
        a = torch.linspace(-self.box_v, self.box_v, self.num_points, dtype=torch.float64)
        return a.to(device=device, dtype=dtype)

    def points(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """All grid points in world space, ``[num_points**3, 3]``, x slowest, z fastest (ij order).

        Built in float32 and then cast to ``dtype``, exactly like hy3dgen's stock grid."""
        a = self.axis(device, torch.float32).to(dtype)
        xs, ys, zs = torch.meshgrid(a, a, a, indexing="ij")
        return torch.stack([xs, ys, zs], dim=-1).reshape(-1, 3)

    def points_at(self, flat: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """World points ``[P, 3]`` of flat grid indices, bit-identical to the rows of :meth:`points`
        (and to hy3dgen's float32 ``linspace`` grid cast to ``dtype``)."""
        a = self.axis(flat.device, torch.float32)
        ijk = self.unravel(flat)
        return a[ijk].to(dtype)

    def index_to_world(self, idx: torch.Tensor) -> torch.Tensor:
        """Continuous grid index coordinates ``[..., 3]`` -> world coordinates ``[..., 3]``."""
        return idx * self.spacing - self.box_v

    def world_to_index(self, xyz: torch.Tensor) -> torch.Tensor:
        """World coordinates ``[..., 3]`` -> continuous grid index coordinates ``[..., 3]``."""
        return (xyz + self.box_v) / self.spacing

    def linear_index(self, ijk: torch.Tensor) -> torch.Tensor:
        """Integer ``[..., 3]`` grid indices -> flat index into ``field.reshape(-1)`` (ij order)."""
        n = self.num_points
        return (ijk[..., 0] * n + ijk[..., 1]) * n + ijk[..., 2]

    def unravel(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat indices -> integer ``[..., 3]`` grid indices (inverse of :meth:`linear_index`)."""
        n = self.num_points
        return torch.stack([flat // (n * n), (flat // n) % n, flat % n], dim=-1)


def as_stock_export(verts: torch.Tensor, octree_resolution: int, box_v: float = 1.01) -> torch.Tensor:
    """Where hy3dgen's stock ``MCSurfaceExtractor`` puts a surface point that lies at ``verts``
    (``[V, 3]`` world): ``-box_v + (verts + box_v) * R / (R + 1)`` with ``R = octree_resolution``
    (its ``idx / (R + 1)`` mapping, see the module note). Applied to the guidance mesh, the critic
    sees the object where the exported mesh will be (differentiable, an affine map)."""
    r = int(octree_resolution)
    return (verts + box_v) * (r / (r + 1.0)) - box_v


def cached_points(grid: FieldGrid, device=None, dtype=torch.float32) -> torch.Tensor:
    """:meth:`FieldGrid.points`, built once per ``(resolution, box_v, device, dtype)`` and kept (the
    last few such keys). The result is shared: do not modify it in place."""
    key = (int(grid.resolution), float(grid.box_v), str(torch.device(device or "cpu")), dtype)
    pts = _POINTS_CACHE.pop(key, None)
    if pts is None:
        pts = grid.points(device, dtype)
        while len(_POINTS_CACHE) >= _POINTS_CACHE_SIZE:
            _POINTS_CACHE.pop(next(iter(_POINTS_CACHE)))
    _POINTS_CACHE[key] = pts  # most recent last
    return pts
