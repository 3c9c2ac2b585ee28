"""The toy world's defaults: the guidance knobs and the sampler settings a toy run uses."""

from __future__ import annotations

from ..config import GuidanceConfig

#: Guidance at the toy defaults. The critic was trained on exactly these views: 4 orbit views at
#: 20 degrees elevation fitted to the object (fill 0.9), 140 px, clay shading, of the mesh marching
#: cubes extracts from a dense 32^3 grid (placed where the 64^3 export will be). A dense grid: at
#: 32^3 the coarse-to-fine lattice (16^3) could miss the thin lamp poles and table legs.
#: lam 0.02: the knob study's best (v3.1 critic; benchmarks/RESULTS.md): on the 64 main references
#: 27/64 failed and IoU 0.670 (unguided 27/64, 0.671), where lam 0.05 made it 29/64 and 0.637.
TOY_GUIDANCE = GuidanceConfig(lam=0.02, schedule="constant", num_views=4, render_size=140,
                              grid_resolution=32, coarse_to_fine=False, fill=0.9, backend="torch")

#: hy3dgen call arguments of a toy run (fewer steps and a coarser export than the real defaults).
TOY_SAMPLING = dict(num_inference_steps=25, guidance_scale=5.0, octree_resolution=64, num_chunks=20000)
