"""How much of a reward's latent gradient grows or shrinks the shape? ("volume cosine")

At the clean estimates of test references [A, B) (seed i; steps 2, 7, 12, 17, 22; the stock run, or
the guided run under NAME=VALUE options), for the critic and for the part-weighted truth (which
knows the intact object): the signed cosine between the reward's gradient g w.r.t. the clean latent
and the gradient of the guidance mesh's enclosed volume, both through the package's own step
(`reward_and_gradient`: volume "free" gives g, "keep" removes the volume direction, "no_growth"
removes it only when g grows the shape). |cosine| = |g - g_keep| / |g|; its sign is + when g grows
the shape. A cosine near +1 means an RMS-normalised step along g mostly swells the shape. Also the
critic's agreement with the truth split in two: the cosine of the two gradients as they are
("agreement") and of what is left of each after its volume direction is removed ("agreement_kept").
Usage: python volume_direction.py WEIGHTS A B OUT.json [NAME=VALUE ...]   (WEIGHTS: "shipped" or a folder)
"""
import json

import numpy as np
import torch

from toy_run_args import toy_run_args
from vlm3d_guidance.guidance.step import reward_and_gradient
from vlm3d_guidance.toy.experiment import ReferenceViewReward, step_arguments, unguided_estimates

run = toy_run_args()
pipe, refs, a, b, out, guided = run.pipe, run.refs, run.a, run.b, run.out, run.options
cfg, cams = pipe.config, pipe.config.cameras()
common = step_arguments(cfg)


def volume_cosine(reward, prompt, x0, cameras, fill):
    g = {mode: reward_and_gradient(x0, pipe.pipeline.vae, reward, prompt, cameras, fill=fill, volume=mode, **common)
         for mode in ("free", "keep", "no_growth")}
    if any(r.gradient is None for r in g.values()):
        return None, g
    share = float((g["free"].gradient - g["keep"].gradient).norm() / g["free"].gradient.norm())
    grows = torch.equal(g["no_growth"].gradient, g["keep"].gradient) and share > 0
    return (share if grows else -share), g


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


rows = []
for ref, estimates in unguided_estimates(pipe, refs, (2, 7, 12, 17, 22), seeds=range(a, b), guided=guided or None):
    for k, sigma, x0 in estimates:
        c_critic, gc = volume_cosine(pipe.critic, ref.prompt, x0, cams, cfg.fill)
        row = dict(reference=ref.name, step=k, sigma=sigma, critic=c_critic, truth=None, agreement=None,
                   agreement_kept=None)
        if c_critic is not None:
            cameras = gc["free"].cameras
            truth = ReferenceViewReward.seen_by(ref, cameras, cfg, part_weighted=True)
            row["truth"], gt = volume_cosine(truth, ref.prompt, x0, cameras, None)
            if row["truth"] is not None:
                row["agreement"] = cosine(gc["free"].gradient, gt["free"].gradient)
                row["agreement_kept"] = cosine(gc["keep"].gradient, gt["keep"].gradient)
        rows.append(row)
        print(*("%s" % v if isinstance(v, (str, int)) or v is None else "%+.3f" % v for v in row.values()), flush=True)
json.dump(dict(guided=guided, rows=rows), open(out, "w"), indent=1)
for who in ("critic", "truth", "agreement", "agreement_kept"):
    c = np.array([r[who] for r in rows if r[who] is not None])
    print(f"{guided or 'stock'} {who}: mean {c.mean():+.3f}, median {np.median(c):+.3f}, share > 0 {(c > 0).mean():.0%} "
          f"(n {c.size})")
    for k in (2, 7, 12, 17, 22):
        ck = [r[who] for r in rows if r["step"] == k and r[who] is not None]
        print(f"   step {k}: {np.mean(ck):+.3f}")
