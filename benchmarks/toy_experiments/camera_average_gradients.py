"""Does averaging the critic's gradient over rotated view sets make it agree better with the truth?

At the unguided sampler's clean estimates of the 16 knob references, steps (2, 7, 12, 17, 22) (the
80 estimates of `bench_toy.py gradients`), the critic's gradient w.r.t. the estimate is computed as
the guided step computes it (4 orbit views fitted to the estimate's mesh), once per azimuth offset in
OFFSETS (the 4 views rotated together), and the unit gradients are averaged over the first k sets.
Each is compared (cosine, latent space) with the part-weighted truth-view reward's gradient through
the offset-0 cameras (the views `gradient_agreement` and the guided step use) and with that truth
averaged over the same sets.

Usage: python camera_average_gradients.py WEIGHTS|shipped OUT.json
"""
import json
import sys

import torch

from vlm3d_guidance import toy
from vlm3d_guidance.guidance.step import reward_and_gradient
from vlm3d_guidance.render import orbit_cameras
from vlm3d_guidance.toy.experiment import (ReferenceViewReward, part_meshes, part_pixel_weights, step_arguments,
                                           unguided_estimates)

torch.set_num_threads(1)
weights, out = sys.argv[1], sys.argv[2]
OFFSETS = (0.0, 45.0, 22.5, 67.5)  # the first two: rotations by half the views' spacing
STEPS = (2, 7, 12, 17, 22)
pipe = toy.load_pipeline(weights=None if weights == "shipped" else weights)
cfg = pipe.config
refs = toy.references("test", count=16, seed=0)
common = step_arguments(cfg)  # as the toy guided step judges an estimate


def unit(g):
    g = g.flatten().float()
    return g / g.norm()


rows = []
for ref, estimates in unguided_estimates(pipe, refs, STEPS):
    parts = part_meshes(ref.object)  # the part-weighted truth's meshes
    for k, sigma, x0 in estimates:
        critic_units, truth_units = [], []
        for offset in OFFSETS:
            cams = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, bounds=1.01,
                                 azimuth_offset=offset)
            judged = reward_and_gradient(x0, pipe.pipeline.vae, pipe.critic, ref.prompt, cams, fill=cfg.fill, **common)
            if judged.gradient is None:
                break
            plain = ReferenceViewReward.seen_by(ref, judged.cameras, cfg)
            weighted = ReferenceViewReward(plain.truth_views, part_pixel_weights(parts, judged.cameras, cfg))
            truth = reward_and_gradient(x0, pipe.pipeline.vae, weighted, ref.prompt, judged.cameras, fill=None, **common)
            if truth.gradient is None:
                break
            critic_units.append(unit(judged.gradient))
            truth_units.append(unit(truth.gradient))
        if len(critic_units) < len(OFFSETS):
            rows.append(dict(reference=ref.name, step=k, sigma=sigma, skipped=True))
            continue
        row = dict(reference=ref.name, step=k, sigma=sigma,
                   single=[float(c @ t) for c, t in zip(critic_units, truth_units)])
        for n in range(1, len(OFFSETS) + 1):
            avg_c = torch.stack(critic_units[:n]).mean(0)
            avg_t = torch.stack(truth_units[:n]).mean(0)
            row[f"avg{n}_vs_truth0"] = float(unit(avg_c) @ truth_units[0])
            row[f"avg{n}_vs_avgtruth"] = float(unit(avg_c) @ unit(avg_t))
        row["truth_offsets_cos"] = float(truth_units[0] @ truth_units[1])
        row["critic_offsets_cos"] = float(critic_units[0] @ critic_units[1])
        rows.append(row)
        print(ref.name, k, {key: round(v, 3) for key, v in row.items() if key.startswith("avg")}, flush=True)
json.dump(rows, open(out, "w"), indent=1)
ok = [r for r in rows if not r.get("skipped")]
print("estimates", len(ok))
for key in ["avg%d_vs_truth0" % n for n in range(1, 5)] + ["avg%d_vs_avgtruth" % n for n in range(1, 5)] + [
        "truth_offsets_cos", "critic_offsets_cos"]:
    vals = [r[key] for r in ok]
    print("%-20s mean %+.3f  share>0 %.2f" % (key, sum(vals) / len(vals), sum(v > 0 for v in vals) / len(vals)))
single = [[r["single"][j] for r in ok] for j in range(len(OFFSETS))]
print("single set per offset:", ["%g: %+.3f" % (o, sum(s) / len(s)) for o, s in zip(OFFSETS, single)])
