"""Probe: which discrete events make the reward jump along a latent direction (float64 tiny models).

r(x0 + t u) for u = the gradient direction at a random latent (RMS 0.05), t in steps of 1e-4 up to 4e-3,
views fitted once at x0 and then held fixed; per step it prints the reward change minus the first-
order prediction, with and without the silhouette antialias pass, whether the marching-cubes
topology changed, how many faces flipped orientation, how many pixels changed triangle, and the
largest image change. A continuous reward shows only the ~5e-8 float32 floor of the critic's norms.

    python benchmarks/probe_continuity.py
"""
import os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch, numpy as np, sys
torch.set_num_threads(1)
from vlm3d_guidance.tiny import load_tiny_hunyuan_pipeline, build_tiny_qwen
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.guidance import reward_and_gradient
from vlm3d_guidance.render import orbit_cameras, render_views
from vlm3d_guidance.render import raster_torch
from vlm3d_guidance.geometry import decode_surface
pipe = load_tiny_hunyuan_pipeline("standard", dtype=torch.float64)
critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl"), dtype=torch.float64)
x0 = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
cams = orbit_cameras(2, dtype=torch.float64)
R=24
kw = dict(box_v=1.01, mc_level=0.0, grid_resolution=R, render_size=56, shading="clay", backend="torch", num_chunks=20000)
res = reward_and_gradient(x0, pipe.vae, critic, "a red box", cams, seconds={}, fill=0.9, **kw)
cams = res.cameras; g = res.gradient
u = g / g.pow(2).mean().sqrt() * 0.05
pred = float((g*u).sum())
def sil_edges(v, f):
    pos = cams.to_clip(v)
    ndc = pos[..., :2] / pos[..., 3:]
    a, b, c = ndc[:, f[:, 0]], ndc[:, f[:, 1]], ndc[:, f[:, 2]]
    orient = ((b - a)[..., 0] * (c - a)[..., 1] - (b - a)[..., 1] * (c - a)[..., 0]) > 0
    return orient  # [N, F] front-facing per face
def state(t):
    x = x0 + t*u
    with torch.no_grad():
        (v, f), = decode_surface(pipe.vae, x, resolution=R, num_chunks=20000)
        img_aa = render_views(v, f, cams, size=56, shading="clay", backend="torch")
        img_no = render_views(v, f, cams, size=56, shading="clay", backend="torch", antialias=False)
        r_aa = float(critic.reward(img_aa, "a red box")); r_no = float(critic.reward(img_no, "a red box"))
        tri = raster_torch.rasterize(cams.to_clip(v), f, (56, 56))[..., 3]
    return dict(r=r_aa, r_no=r_no, f=f, img=img_aa, img_no=img_no, orient=sil_edges(v, f), tri=tri)
ts = np.linspace(0.0, 4e-3, 41)
prev = state(float(ts[0])); prevt = ts[0]
for t in ts[1:]:
    s = state(float(t))
    dt = t - prevt
    jump = (s["r"] - prev["r"]) - pred * dt
    jump_no = (s["r_no"] - prev["r_no"]) - pred * dt
    topo = s["f"].shape == prev["f"].shape and bool(torch.equal(s["f"], prev["f"]))
    orient = int((s["orient"] != prev["orient"]).sum()) if topo else -1
    tri = int((s["tri"] != prev["tri"]).sum())
    di = float((s["img"] - prev["img"]).abs().max()); dn = float((s["img_no"] - prev["img_no"]).abs().max())
    print(f"t={t:.1e} dr-lin={jump:+.2e} (no AA {jump_no:+.2e}) topo_same={topo} faces_flipped={orient} px_tri_changed={tri} max|dimg| aa={di:.2e} noaa={dn:.2e}", flush=True)
    prev, prevt = s, t
