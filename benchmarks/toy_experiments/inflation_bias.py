"""Does a reward's gradient want the surface to grow or shrink? ("inflation cosine")

At the 80 estimates of `bench_toy.py gradients` (16 knob references, steps 2, 7, 12, 17, 22 of the
unguided runs), each reward's gradient w.r.t. the guidance mesh's vertices (through the same
render, cameras fitted to the mesh as the guided step fits them) is compared with the outward unit
vertex normals: cosine of the flattened ``[V, 3]`` fields. +1: move every vertex outward (grow),
-1: inward (shrink/erode), 0: no net growth. Rewards: the critic (dual query) of each weights folder
given, and the part-weighted truth-view reward (through the same cameras).

Usage: python inflation_bias.py OUT.json shipped [WEIGHTS ...]
"""
import json
import sys

import numpy as np
import torch
import trimesh

from vlm3d_guidance import toy
from vlm3d_guidance.render import fit_to_points, render_views
from vlm3d_guidance.toy.config import TOY_GUIDANCE, TOY_SAMPLING
from vlm3d_guidance.toy.experiment import ReferenceViewReward, part_meshes, part_pixel_weights, unguided_estimates
from vlm3d_guidance.toy.render_latent import latent_surface

torch.set_num_threads(1)
out, names = sys.argv[1], sys.argv[2:]
STEPS = (2, 7, 12, 17, 22)
cfg = TOY_GUIDANCE
pipes = {n: toy.load_pipeline(weights=None if n == "shipped" else n) for n in names}
base = pipes[names[0]]
refs = toy.references("test", count=16, seed=0)


def vertex_gradient(reward_fn, verts, faces, cams):
    v = verts.detach().clone().requires_grad_(True)
    images = render_views(v, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend)
    (g,) = torch.autograd.grad(reward_fn(images), v)
    return g


rows = []
for ref, estimates in unguided_estimates(base, refs, STEPS):
    parts = part_meshes(ref.object)  # the part-weighted truth's meshes
    for k, sigma, x0 in estimates:
        surface = latent_surface(base.pipeline.vae, x0, cfg, TOY_SAMPLING["octree_resolution"])
        if surface is None:
            continue
        verts, faces = surface
        cams = fit_to_points(cfg.cameras(), verts, cfg.fill)
        mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
        normals = torch.as_tensor(np.asarray(mesh.vertex_normals), dtype=torch.float32)
        # marching cubes' winding: make the normals point outward (away from the centroid, on average)
        if float(((verts - verts.mean(0)) * normals).sum()) < 0:
            normals = -normals
        row = dict(reference=ref.name, step=k, sigma=sigma)
        plain = ReferenceViewReward.seen_by(ref, cams, cfg)
        truth = ReferenceViewReward(plain.truth_views, part_pixel_weights(parts, cams, cfg))
        rewards = {"truth (part-weighted)": lambda im: truth.reward(im, ref.prompt)}
        for n, p in pipes.items():
            rewards[n] = (lambda critic: (lambda im: critic.reward(im, ref.prompt)))(p.critic)
        for name, fn in rewards.items():
            g = vertex_gradient(fn, verts, faces, cams)
            row[name] = float(torch.nn.functional.cosine_similarity(g.flatten(), normals.flatten(), dim=0))
        rows.append(row)
        print(ref.name, k, {n: round(row[n], 3) for n in rewards}, flush=True)
json.dump(rows, open(out, "w"), indent=1)
for name in ["truth (part-weighted)"] + names:
    vals = np.array([r[name] for r in rows])
    print("%-24s inflation cosine mean %+.3f, share > 0 %.2f (n %d)" % (name, vals.mean(), (vals > 0).mean(), len(vals)))
