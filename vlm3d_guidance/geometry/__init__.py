"""Latent -> field -> mesh, differentiable at the surface.

- :class:`FieldGrid` -- the one grid <-> world mapping (hy3dgen's stock grid, points at both ends).
- :func:`marching_cubes` -- differentiable marching cubes on an SDF grid (negative inside).
- :func:`decode_field` -- dense no-grad SDF from a Hunyuan latent.
- :func:`decode_surface` -- meshes whose vertices carry gradients to the latent (sparse re-decode).
"""

from .decode import decode_field, decode_surface
from .grid import FieldGrid, as_stock_export
from .marching_cubes import MCTopology, extract_topology, marching_cubes

__all__ = ["FieldGrid", "as_stock_export", "MCTopology", "extract_topology", "marching_cubes", "decode_field", "decode_surface"]
