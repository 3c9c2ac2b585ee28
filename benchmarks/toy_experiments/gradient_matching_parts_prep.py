"""Like gradient_matching_prep.py (same samples), but the target is the PART-WEIGHTED truth-view reward's vertex
gradient: -100 * mean(w * (V - T)^2), w = each truth pixel's part's inverse pixel area (largest part
1, capped at 20; background 1), the part silhouettes rendered through the sample's fitted cameras.
Usage: python gradient_matching_parts_prep.py IN OUT [FIRST LAST]
(The measured run: gm_0_200.pt rows 0-1260 and 1260-1800, gm_200_280.pt all; two processes.)"""
import sys, time, torch
torch.set_num_threads(1)
from vlm3d_guidance import toy
from vlm3d_guidance.toy.render_latent import latent_surface
from vlm3d_guidance.toy.train import critic_shapes
from vlm3d_guidance.toy.references import sdf_grid, BOX_V
from vlm3d_guidance.geometry import marching_cubes
from vlm3d_guidance.render import render_views
from vlm3d_guidance.render.cameras import fit_to_points
cfg = toy.TOY_GUIDANCE
pipe = toy.load_pipeline()
rows = torch.load(sys.argv[1], weights_only=False)
if len(sys.argv) > 4: rows = rows[int(sys.argv[3]):int(sys.argv[4])]
shapes = critic_shapes(max(r['i'] for r in rows) + 1)
part_meshes = {}
def parts_of(i):
    if i not in part_meshes:
        part_meshes.clear()
        part_meshes[i] = [tuple(t.float() if t.is_floating_point() else t for t in marching_cubes(sdf_grid(p, 96), bounds=(-BOX_V, BOX_V))) for p in shapes[i][0].parts]
    return part_meshes[i]
def part_weights(i, cams):
    with torch.no_grad():
        sil = [render_views(v, f, cams, size=cfg.render_size, shading="silhouette", backend=cfg.backend)[:, :1].clamp(0, 1) for v, f in parts_of(i)]
    areas = torch.stack([s.sum() for s in sil])
    rel = (areas.max() / areas.clamp_min(1.0)).clamp(max=20.0)
    w = torch.ones_like(sil[0])
    for s, r in zip(sil, rel):
        w = torch.maximum(w, s * r)
    return w
t0 = time.perf_counter()
out = []
for n, r in enumerate(rows):
    verts, faces = latent_surface(pipe.pipeline.vae, r['x0'].float(), cfg, 64)
    cams = fit_to_points(cfg.cameras(1.01), verts, cfg.fill)
    w = part_weights(r['i'], cams)
    v = verts.clone().requires_grad_(True)
    V = render_views(v, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend).clamp(0, 1)
    T = r['T'].float() / 255
    (w * V * (T - V.detach())).sum().backward()
    V8 = V.detach().mul(255).round().to(torch.uint8)
    r = dict(r, verts=verts, faces=faces, cams=cams, t_verts=v.grad.clone(), weights_mean=float(w.mean()))
    r['V'] = V8
    del r['T'], r['mask']
    out.append(r)
    if n % 100 == 0:
        print(n, f"{time.perf_counter() - t0:.0f} s, |t| {float(r['t_verts'].norm()):.3f}, w mean {r['weights_mean']:.3f}", flush=True)
torch.save(out, sys.argv[2])
print("done", len(out), f"{time.perf_counter() - t0:.0f} s")
