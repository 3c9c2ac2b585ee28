"""gradient_matching_parts_prep.py at another render size: the same estimates (the x0 stored by
gradient_matching_data.py), the guidance mesh and fitted cameras as there, but the views, the intact
truth's views, the part weights and the part-weighted truth reward's vertex gradient rendered at SIZE px
(the truth re-rendered from its mesh, since the stored T is 140 px). Only the classes named.
Usage: python gradient_matching_size_prep.py IN OUT SIZE CLASSES [FIRST LAST]
(the measured run: gm_0_200.pt and gm_200_280.pt, SIZE 280, CLASSES table,mug)"""
import sys, time, dataclasses, torch
torch.set_num_threads(1)
from vlm3d_guidance import toy
from vlm3d_guidance.toy.render_latent import latent_surface
from vlm3d_guidance.toy.experiment import part_meshes, part_pixel_weights
from vlm3d_guidance.toy.train import critic_shapes
from vlm3d_guidance.toy.references import _mesh_tensors
from vlm3d_guidance.render import render_views
from vlm3d_guidance.render.cameras import fit_to_points
size, classes = int(sys.argv[3]), set(sys.argv[4].split(","))
cfg = dataclasses.replace(toy.TOY_GUIDANCE, render_size=size)
pipe = toy.load_pipeline()
rows = [r for r in torch.load(sys.argv[1], weights_only=False) if r['cls'] in classes]
if len(sys.argv) > 6: rows = rows[int(sys.argv[5]):int(sys.argv[6])]
shapes = critic_shapes(max(r['i'] for r in rows) + 1)
cache = {}
def meshes_of(i):
    """(truth mesh, [part meshes]) of critic object i, as float32 vertices and long faces"""
    if i not in cache:
        cache.clear()
        obj = shapes[i][0]
        verts, faces = _mesh_tensors(obj)
        cache[i] = (verts.float(), faces), part_meshes(obj)  # parts at 96^3, as gradient_matching_parts_prep.py
    return cache[i]
render = lambda v, f, cams, shading=cfg.shading: render_views(v, f, cams, size=size, shading=shading, backend=cfg.backend)
t0 = time.perf_counter()
out = []
for n, r in enumerate(rows):
    verts, faces = latent_surface(pipe.pipeline.vae, r['x0'].float(), cfg, 64)
    cams = fit_to_points(cfg.cameras(1.01), verts, cfg.fill)
    (tv, tf), parts = meshes_of(r['i'])
    w = part_pixel_weights(parts, cams, cfg)
    with torch.no_grad():
        T = render(tv, tf, cams).clamp(0, 1)
    v = verts.clone().requires_grad_(True)
    V = render(v, faces, cams).clamp(0, 1)
    (w * V * (T - V.detach())).sum().backward()
    out.append(dict(i=r['i'], cls=r['cls'], prompt=r['prompt'], step=r['step'], sigma=r['sigma'], x0=r['x0'],
                    V=V.detach().mul(255).round().to(torch.uint8), verts=verts, faces=faces, cams=cams,
                    t_verts=v.grad.clone(), weights_mean=float(w.mean())))
    if n % 100 == 0:
        print(n, f"{time.perf_counter() - t0:.0f} s, |t| {float(v.grad.norm()):.3f}, w mean {float(w.mean()):.3f}", flush=True)
torch.save(out, sys.argv[2])
print("done", len(out), f"{time.perf_counter() - t0:.0f} s")
