"""Differentiable multi-view rendering: cameras, rasterizer backends, silhouette antialias, shading.

- :func:`orbit_cameras`, :class:`Cameras` -- OpenGL-convention cameras around the origin.
- :func:`render_views` -- ``[N, 3, H, W]`` images in ``[0, 1]`` (row 0 = top) for the critic.
- :func:`rasterize`, :func:`interpolate`, :func:`antialias` -- nvdiffrast-convention primitives
  (pure-torch backend; :func:`get_backend` picks nvdiffrast on CUDA when installed).
"""

from .antialias import EdgeTopology, antialias, edge_topology
from .cameras import Cameras, fit_to_points, look_at, orbit_cameras, perspective, projected_extent
from .raster_torch import interpolate, rasterize
from .shading import vertex_normals
from .views import get_backend, render_views

__all__ = ["Cameras", "orbit_cameras", "fit_to_points", "projected_extent", "look_at", "perspective", "render_views", "get_backend",
           "rasterize", "interpolate", "antialias", "edge_topology", "EdgeTopology", "vertex_normals"]
