"""Does a critic's gradient agree better with the truth when it is averaged over augmented copies of
its views (randomised smoothing: pixel noise and small shifts, as CLIP-guided generation does)?

At the 80 estimates of `bench_toy.py gradients`: the reward ``mean_k critic(aug_k(views))`` with K
fixed augmentations (Gaussian pixel noise of std SIGMA and an integer shift of up to SHIFT pixels
per view, replicate padding; augmentation 0 of K = 1 is the identity), its latent gradient through
the guided step's stages (cameras fitted as there), and its cosine with the part-weighted truth's.

Usage: python augmented_gradients.py WEIGHTS|shipped OUT.json
"""
import json
import sys

import numpy as np
import torch

from vlm3d_guidance import toy
from vlm3d_guidance.guidance.step import reward_and_gradient
from vlm3d_guidance.toy.experiment import (ReferenceViewReward, part_meshes, part_pixel_weights, step_arguments,
                                           unguided_estimates)

torch.set_num_threads(1)
weights, out = sys.argv[1], sys.argv[2]
STEPS = (2, 7, 12, 17, 22)
SETTINGS = {"none": (1, 0.0, 0), "noise.03 x4": (4, 0.03, 0), "shift6 x4": (4, 0.0, 6),
            "noise.03+shift6 x4": (4, 0.03, 6), "noise.03+shift6 x8": (8, 0.03, 6)}


class AugmentedCritic:
    def __init__(self, critic, count, sigma, shift, seed):
        self.critic, self.count, self.sigma, self.shift, self.seed = critic, count, sigma, shift, seed
        self.device = critic.device

    def check_prompt(self, *args, **kwargs):
        return self.critic.check_prompt(*args, **kwargs)

    def augment(self, images, k):
        if self.count == 1:
            return images
        gen = torch.Generator().manual_seed(self.seed * 100 + k)
        out = images
        if self.shift:
            pad = self.shift
            padded = torch.nn.functional.pad(out, (pad, pad, pad, pad), mode="replicate")
            size = images.shape[-1]
            views = []
            for v in range(images.shape[0]):
                dx, dy = (int(t) for t in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
                views.append(padded[v, :, dy:dy + size, dx:dx + size])
            out = torch.stack(views)
        if self.sigma:
            out = (out + self.sigma * torch.randn(out.shape, generator=gen)).clamp(0, 1)
        return out

    def reward(self, images, prompt):
        return torch.stack([self.critic.reward(self.augment(images, k), prompt) for k in range(self.count)]).mean()


pipe = toy.load_pipeline(weights=None if weights == "shipped" else weights)
cfg = pipe.config
refs = toy.references("test", count=16, seed=0)
common = step_arguments(cfg)  # as the toy guided step judges an estimate
rows = []
for seed, (ref, estimates) in enumerate(unguided_estimates(pipe, refs, STEPS)):  # reference i runs with seed i
    parts = part_meshes(ref.object)  # the part-weighted truth's meshes
    for k, sigma, x0 in estimates:
        row = dict(reference=ref.name, step=k, sigma=sigma)
        truth_g = None
        for name, (count, noise, shift) in SETTINGS.items():
            judge = AugmentedCritic(pipe.critic, count, noise, shift, seed=seed * 1000 + k)
            judged = reward_and_gradient(x0.clone(), pipe.pipeline.vae, judge, ref.prompt, cfg.cameras(), fill=cfg.fill,
                                         **common)
            if judged.gradient is None:
                break
            if truth_g is None:
                plain = ReferenceViewReward.seen_by(ref, judged.cameras, cfg)
                weighted = ReferenceViewReward(plain.truth_views, part_pixel_weights(parts, judged.cameras, cfg))
                truth_g = reward_and_gradient(x0.clone(), pipe.pipeline.vae, weighted, ref.prompt, judged.cameras,
                                              fill=None, **common).gradient
            row[name] = float(torch.nn.functional.cosine_similarity(judged.gradient.flatten(), truth_g.flatten(),
                                                                    dim=0))
        if len(row) == 3 + len(SETTINGS):
            rows.append(row)
            print(ref.name, k, {n: round(row[n], 3) for n in SETTINGS}, flush=True)
json.dump(rows, open(out, "w"), indent=1)
for name in SETTINGS:
    vals = np.array([r[name] for r in rows])
    print("%-22s cosine vs part-weighted truth: mean %+.3f, share > 0 %.2f (n %d)" % (name, vals.mean(), (vals > 0).mean(), len(vals)))
