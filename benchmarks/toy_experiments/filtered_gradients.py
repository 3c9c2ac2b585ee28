"""Does filtering a reward's vertex gradient (normal component only, smoothed over the mesh) before
pulling it back to the latent make the critic agree better with the truth?

At the 80 estimates of `bench_toy.py gradients`: each reward's gradient w.r.t. the guidance mesh's
vertices ``g [V, 3]`` (cameras fitted as the guided step fits them), filtered, then pulled back
through the decoder and marching cubes to the clean latent, exactly as the guided step does. Filters:
``raw`` (the guided step's), ``normal`` (``(g . n) n``, n the unit vertex normals: only the
surface's motion along its normal changes the shape) and ``normal+smooth<k>`` (that normal speed
smoothed by k Jacobi steps ``s <- (s + mean over mesh neighbours) / 2``). Reported: the cosine of the
critic's filtered latent gradient with the part-weighted truth's RAW latent gradient (the direction
that repairs, `part_oracle.py`), and the truth's filtered gradient with its raw one (what a filter
costs the signal).

Usage: python filtered_gradients.py OUT.json shipped [WEIGHTS ...]
"""
import json
import sys

import numpy as np
import torch
import trimesh

from vlm3d_guidance import toy
from vlm3d_guidance.geometry import as_stock_export, decode_surface
from vlm3d_guidance.guidance.step import backward_scaled
from vlm3d_guidance.render import fit_to_points, render_views
from vlm3d_guidance.toy.config import TOY_GUIDANCE, TOY_SAMPLING
from vlm3d_guidance.toy.experiment import ReferenceViewReward, part_meshes, part_pixel_weights, unguided_estimates

torch.set_num_threads(1)
out, names = sys.argv[1], sys.argv[2:]
STEPS = (2, 7, 12, 17, 22)
FILTERS = ("raw", "normal", "normal+smooth2", "normal+smooth8")
cfg = TOY_GUIDANCE
export = TOY_SAMPLING["octree_resolution"]
pipes = {n: toy.load_pipeline(weights=None if n == "shipped" else n) for n in names}
base = pipes[names[0]]
vae = base.pipeline.vae
refs = toy.references("test", count=16, seed=0)


def smooth(speed, faces, steps):
    """Jacobi steps ``s <- (s + mean of the mesh neighbours' s) / 2`` of a per-vertex scalar ``[V]``."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = torch.cat([edges, edges.flip(1)])
    degree = torch.zeros(speed.shape[0]).index_add_(0, edges[:, 0], torch.ones(edges.shape[0]))
    for _ in range(steps):
        total = torch.zeros_like(speed).index_add_(0, edges[:, 0], speed[edges[:, 1]])
        speed = 0.5 * (speed + total / degree.clamp_min(1))
    return speed


def filtered(g, normals, faces, name):
    if name == "raw":
        return g
    speed = (g * normals).sum(1)
    if name.startswith("normal+smooth"):
        speed = smooth(speed, faces, int(name[len("normal+smooth"):]))
    return speed[:, None] * normals


rows = []
for ref, estimates in unguided_estimates(base, refs, STEPS):
    parts = part_meshes(ref.object)  # the part-weighted truth's meshes
    for k, sigma, x0 in estimates:
        leaf = x0.clone().requires_grad_(True)
        with torch.enable_grad():
            (verts, faces), = decode_surface(vae, leaf, resolution=cfg.grid_resolution, box_v=1.01, mc_level=0.0,
                                             num_chunks=20000, coarse_to_fine=cfg.coarse_to_fine)
        if faces.shape[0] == 0:
            continue
        placed = as_stock_export(verts.detach(), export, 1.01)
        cams = fit_to_points(cfg.cameras(), placed, cfg.fill)
        mesh = trimesh.Trimesh(placed.numpy(), faces.numpy(), process=False)
        normals = torch.as_tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32)
        plain = ReferenceViewReward.seen_by(ref, cams, cfg)
        truth = ReferenceViewReward(plain.truth_views, part_pixel_weights(parts, cams, cfg))
        rewards = {"truth": lambda im: truth.reward(im, ref.prompt)}
        for n, p in pipes.items():
            rewards[n] = (lambda critic: (lambda im: critic.reward(im, ref.prompt)))(p.critic)
        latent = {}
        for rname, fn in rewards.items():
            v = placed.clone().requires_grad_(True)
            with torch.enable_grad():
                images = render_views(v, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend)
                (g,) = torch.autograd.grad(fn(images), v)
            # as_stock_export is affine (a uniform shrink towards -box_v): its vertex Jacobian is a scalar
            shrink = float(export) / (export + 1)
            for fname in FILTERS:
                gv = filtered(g, normals, faces, fname) * shrink
                gx = backward_scaled(verts, leaf, gv.to(verts.dtype), torch.float32, retain_graph=True)
                latent[(rname, fname)] = gx.flatten()
        cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
        row = dict(reference=ref.name, step=k, sigma=sigma)
        for rname in rewards:
            for fname in FILTERS:
                row[f"{rname}/{fname}"] = cos(latent[(rname, fname)], latent[("truth", "raw")])
        rows.append(row)
        print(ref.name, k, {key: round(v, 3) for key, v in row.items() if "/" in key}, flush=True)
json.dump(rows, open(out, "w"), indent=1)
for key in [k for k in rows[0] if "/" in k]:
    vals = np.array([r[key] for r in rows])
    print("%-40s cosine with the truth's raw latent gradient: mean %+.3f, share > 0 %.2f" % (key, vals.mean(), (vals > 0).mean()))
