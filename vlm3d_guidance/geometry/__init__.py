"""Latent -> field -> mesh, differentiable at the surface.

- :class:`FieldGrid` -- the one grid <-> world mapping (hy3dgen's stock grid, points at both ends).
- :func:`marching_cubes` -- differentiable marching cubes on an SDF grid (negative inside).
- :func:`decode_field` -- dense no-grad SDF from a Hunyuan latent.
- :func:`decode_surface` -- meshes whose vertices carry gradients to the latent (sparse re-decode).
- :class:`SurfaceTrack` -- decode around the previous sampling step's surface (:mod:`.track`).
- :func:`mesh_volume` -- a mesh's enclosed volume, differentiable in its vertices.
- marching-cubes topology from scikit-image or, on the field's own device, from :mod:`.mc_torch`.
"""

from .decode import decode_field, decode_surface
from .grid import FieldGrid, as_stock_export
from .marching_cubes import MCTopology, extract_topology, marching_cubes
from .track import SurfaceTrack, tracked_sdf
from .volume import mesh_volume

__all__ = ["FieldGrid", "as_stock_export", "MCTopology", "extract_topology", "marching_cubes", "decode_field",
           "decode_surface", "SurfaceTrack", "tracked_sdf", "mesh_volume"]
