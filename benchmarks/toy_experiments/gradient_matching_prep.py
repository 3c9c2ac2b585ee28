"""Per sample: the placed surface (verts, faces) the guided step renders, its fitted cameras, and the
truth-view reward's gradient w.r.t. the vertices (t_verts = J_render^T (T - V), through the same
render). Usage: python gradient_matching_prep.py IN OUT [FIRST LAST]"""
import sys, time, torch
torch.set_num_threads(1)
from vlm3d_guidance import toy
from vlm3d_guidance.toy.render_latent import latent_surface
from vlm3d_guidance.render import render_views
from vlm3d_guidance.render.cameras import fit_to_points
cfg = toy.TOY_GUIDANCE
pipe = toy.load_pipeline()
rows = torch.load(sys.argv[1], weights_only=False)
if len(sys.argv) > 4: rows = rows[int(sys.argv[3]):int(sys.argv[4])]
t0 = time.perf_counter()
out = []
for n, r in enumerate(rows):
    verts, faces = latent_surface(pipe.pipeline.vae, r['x0'].float(), cfg, 64)
    cams = fit_to_points(cfg.cameras(1.01), verts, cfg.fill)
    v = verts.clone().requires_grad_(True)
    V = render_views(v, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend).clamp(0, 1)
    T = r['T'].float() / 255
    (V * (T - V.detach())).sum().backward()
    V8 = V.detach().mul(255).round().to(torch.uint8)
    r = dict(r, verts=verts, faces=faces, cams=cams, t_verts=v.grad.clone(), Vmatch=float((V8 == r['V']).float().mean()))
    r['V'] = V8
    out.append(r)
    if n % 100 == 0:
        print(n, f"{time.perf_counter() - t0:.0f} s, match {r['Vmatch']:.4f}, |t| {float(r['t_verts'].norm()):.3f}", flush=True)
torch.save(out, sys.argv[2])
print("done", len(out), f"{time.perf_counter() - t0:.0f} s")
