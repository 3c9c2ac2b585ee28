"""The toy world's defaults: the guidance knobs and the sampler settings a toy run uses."""

from __future__ import annotations

from ..config import GuidanceConfig

#: Guidance at the toy defaults (the critic was trained on exactly these views: 4 orbit views at
#: 20 degrees elevation, 140 px, clay shading, of the mesh marching cubes extracts from a 32^3 grid).
TOY_GUIDANCE = GuidanceConfig(lam=0.05, schedule="constant", num_views=4, render_size=140,
                              grid_resolution=32, backend="torch")

#: hy3dgen call arguments of a toy run (fewer steps and a coarser export than the real defaults).
TOY_SAMPLING = dict(num_inference_steps=25, guidance_scale=5.0, octree_resolution=64, num_chunks=20000)
