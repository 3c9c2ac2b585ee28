"""The toy world's defaults: the guidance knobs and the sampler settings a toy run uses."""

from __future__ import annotations

from ..config import GuidanceConfig

#: Guidance at the toy defaults. The critic was trained on exactly these views: 4 orbit views at
#: 20 degrees elevation fitted to the object (fill 0.9), 140 px, clay shading, of the mesh marching
#: cubes extracts from a dense 32^3 grid (placed where the 64^3 export will be). A dense grid: at
#: 32^3 the coarse-to-fine lattice (16^3) could miss the thin lamp poles and table legs.
#: The critic is the gradient-matched one (``critic-matched``, :mod:`.gradient_matching`: four phases
#: on vertex gradients, then one on latent gradients, :mod:`.latent_basis`).
#: lam 0.02, constant, whole run: of its knob study's lam sweep (16 references; unguided 7/16, IoU
#: 0.662) the fewest failures at IoU within 0.01 of unguided (0.01: 6/16 at 0.707; 0.02: 3/16 at 0.675;
#: 0.05: 4/16 at 0.612; 0.1: 5/16 at 0.497; cosine schedule at 0.02: 4/16 at 0.696). On the 64 main
#: references 13/64 failed, IoU 0.672 (unguided 27/64, 0.671). benchmarks/RESULTS.md has the rest.
TOY_GUIDANCE = GuidanceConfig(lam=0.02, schedule="constant", num_views=4, render_size=140,
                              grid_resolution=32, coarse_to_fine=False, fill=0.9, backend="torch")

#: hy3dgen call arguments of a toy run (fewer steps and a coarser export than the real defaults).
TOY_SAMPLING = dict(num_inference_steps=25, guidance_scale=5.0, octree_resolution=64, num_chunks=20000)
