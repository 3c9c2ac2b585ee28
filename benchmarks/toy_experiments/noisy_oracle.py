"""How well must a reward's gradient agree with the part-weighted truth for guidance to repair?

The guided step's direction is replaced by ``c * u + sqrt(1 - c^2) * n`` (both unit vectors in the
flattened latent, ``n`` orthogonal to ``u``), where ``u`` is the part-weighted truth-view reward's
normalised gradient (the upper bound that repairs 21 of 27 failures, `part_oracle.py`) and ``n`` is

- ``random``: a fresh Gaussian direction at every step (seeded by reference and step), or
- ``critic``: the shipped critic's own gradient with its ``u`` component removed, i.e. the critic's
  "noise" at this step (the critic sees the step's mesh as it does when guiding: fitted cameras), or
- ``image``: the gradient of a random linear reward on the views, ``sum(views * R)`` with ``R`` a
  fresh Gaussian image per step (seeded by reference and step), pulled back through the same render
  and decoder as the critic's (fitted cameras): noise that, like the critic's gradient, lies in the
  directions the decoder and renderer can express, where a Gaussian latent direction mostly does not
  change the surface.

The update then has cosine exactly ``c`` with the truth's, and RMS ``lam`` (as ``normalize="rms"``).
Same references, seeds, fixed cameras for the truth, lam and 25 steps as `part_oracle.py`.

Usage: python noisy_oracle.py A B LAM C random|critic|image OUT.json
"""
import json
import math
import sys
from dataclasses import replace

import torch

from vlm3d_guidance import toy
from vlm3d_guidance.guidance.step import reward_and_gradient
from vlm3d_guidance.toy.experiment import ReferenceViewReward, run_condition, summarize

torch.set_num_threads(1)
a, b, lam, c, noise, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
assert noise in ("random", "critic", "image") and 0.0 <= c <= 1.0
pipe = toy.load_pipeline()
critic = pipe.critic
cfg = replace(pipe.config, fill=None, lam=lam)
refs = toy.references("test", count=b - a, seed=0, start=a)
measured = []  # (reference, step, cosine of the critic's gradient with u) for the critic mode
original = pipe._guidance_update


class RandomImageReward:
    """``sum(views * R)``, ``R`` a Gaussian image drawn from ``seed`` (the critic's interface)."""

    device = torch.device("cpu")

    def __init__(self, seed):
        self.seed = seed

    def check_prompt(self, *args, **kwargs):
        return None

    def reward(self, images, prompt):
        r = torch.randn(images.shape, generator=torch.Generator().manual_seed(self.seed))
        return (images * r.to(images)).sum()


def mixed(ref_index):
    def update_fn(z, noise_pred, sigma, lam_i, prompts, cameras, cfg_i, record, **kw):
        update = original(z, noise_pred, sigma, lam_i, prompts, cameras, cfg_i, record, **kw)
        if update is None:
            return None
        u = update.flatten() / update.flatten().norm()
        if noise == "random":
            gen = torch.Generator().manual_seed(1_000_003 * ref_index + record.step)
            n = torch.randn(u.shape, generator=gen)
        else:
            x0 = (z.float() + (1.0 - sigma) * noise_pred.float()).clone()
            judge = critic if noise == "critic" else RandomImageReward(1_000_003 * ref_index + record.step)
            judged = reward_and_gradient(
                x0, pipe.pipeline.vae, judge, prompts[0], pipe.config.cameras(), box_v=kw["box_v"],
                mc_level=kw["mc_level"], grid_resolution=cfg_i.grid_resolution, render_size=cfg_i.render_size,
                shading=cfg_i.shading, backend=cfg_i.backend, num_chunks=kw["num_chunks"], seconds={},
                coarse_to_fine=cfg_i.coarse_to_fine, fill=pipe.config.fill,
                export_resolution=kw.get("export_resolution"))
            if judged.gradient is None:
                n = torch.randn(u.shape, generator=torch.Generator().manual_seed(record.step))
            else:
                n = judged.gradient.flatten().float()
                if noise == "critic":
                    measured.append((ref_index, record.step, float(n @ u / n.norm())))
        n = n - (n @ u) * u
        n = n / n.norm()
        direction = c * u + math.sqrt(max(0.0, 1.0 - c * c)) * n
        rms = direction.pow(2).mean().sqrt()
        return (lam_i * direction / rms).reshape(update.shape)
    return update_fn


rows = []
for i, ref in zip(range(a, b), refs):
    reward = ReferenceViewReward.for_reference(ref, cfg, part_weighted=True)
    pipe._guidance_update = mixed(i)
    try:
        rows += run_condition(pipe, [ref], f"oracle c={c} + {noise}", dict(fill=None, lam=lam), critic=reward,
                              seeds=[i])
    finally:
        del pipe._guidance_update
    r = rows[-1]
    print(i, ref.name, "FAIL " + r.reason if r.failed else "ok", round(r.iou, 3), flush=True)
result = dict(rows=[r.to_dict() for r in rows], critic_cosines=measured)
json.dump(result, open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f" % (s["failures"], s["count"], s["mean_iou"]), s["reasons"])
if measured:
    cos = [m[2] for m in measured]
    print("critic gradient vs part-weighted truth during the run: mean %.3f, share > 0 %.2f"
          % (sum(cos) / len(cos), sum(x > 0 for x in cos) / len(cos)))
