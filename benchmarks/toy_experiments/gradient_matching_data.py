"""Gradient-matching data: the generator's own clean estimates of critic-split references (unguided
runs, seeds ROLLOUT_SEED + i), rendered as the guided step renders them (fitted cameras), with the
intact truth rendered through the SAME cameras and the mask of pixels the render's gradient reaches.
Usage: python gradient_matching_data.py START COUNT OUT (the measured run: 0 200, then 200 80;
the first stored x0 in float16, the second in float32; gradient_matching_prep.py re-renders V from the stored x0)"""
import sys, time, torch, numpy as np, torch.nn.functional as F
torch.set_num_threads(1)
from vlm3d_guidance import toy
from vlm3d_guidance.toy.train import critic_shapes, ROLLOUT_SEED
from vlm3d_guidance.toy.critic_training import recorded_estimates
from vlm3d_guidance.toy.render_latent import latent_surface
from vlm3d_guidance.toy.references import render_reference, _mesh_tensors
from vlm3d_guidance.render import render_views
from vlm3d_guidance.render.cameras import fit_to_points
start, count, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
STEPS = [2, 5, 7, 10, 12, 15, 17, 20, 22]
pipe = toy.load_pipeline()
cfg = pipe.config
samp = {k: v for k, v in toy.TOY_SAMPLING.items() if k != "octree_resolution"}
shapes = critic_shapes(start + count)[start:]
rows = []
t0 = time.perf_counter()
for j, (obj, _) in enumerate(shapes):
    i = start + j
    tv, tf = _mesh_tensors(obj)
    with recorded_estimates(pipe.pipeline) as est:
        pipe.pipeline(image=render_reference(obj), generator=torch.Generator().manual_seed(ROLLOUT_SEED + i),
                      enable_pbar=False, output_type="latent", **samp)
    for k in STEPS:
        sigma, x0 = est[k]
        s = latent_surface(pipe.pipeline.vae, x0.clone(), cfg, 64)
        if s is None:
            continue
        verts, faces = s
        cams = fit_to_points(cfg.cameras(1.01), verts, cfg.fill)
        with torch.no_grad():
            V = render_views(verts, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend).clamp(0, 1)
            T = render_views(tv, tf, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend).clamp(0, 1)
            A = render_views(verts, faces, cams, size=cfg.render_size, shading="silhouette", backend=cfg.backend)[:, :1]
        mask = F.max_pool2d((A > 0).float(), 3, 1, 1) > 0
        u8 = lambda x: x.mul(255).round().to(torch.uint8)
        rows.append(dict(i=i, cls=obj.cls, prompt=obj.description, step=k, sigma=sigma, x0=x0.clone(),
                         V=u8(V), T=u8(T), mask=mask))
    if j % 5 == 0:
        print(f"{i}: {len(rows)} samples ({time.perf_counter() - t0:.0f} s)", flush=True)
torch.save(rows, out)
print("done", len(rows), f"{time.perf_counter() - t0:.0f} s")
