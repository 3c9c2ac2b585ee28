"""Guided on test references [A, B) (seed i) with the volume projection only from a step on:
volume "free" at steps < FROM and MODE ("keep" or "no_growth") from FROM on, other guidance options
NAME=VALUE on top of the toy defaults. Experiment only: the package's `volume` option holds for a
whole run, so this wraps the pipeline's step function and counts its calls (every step but the
schedule's last is guided under a constant schedule, and one more call scores the final latent, so
call k of a run's 25 is step k).
Usage: python volume_late.py WEIGHTS A B OUT.json FROM MODE [NAME=VALUE ...]"""
import ast
import json
import sys

import torch

import vlm3d_guidance.pipeline as pipeline_module
from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import run_condition, summarize

torch.set_num_threads(1)
w, a, b, out, first, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6]
overrides = {k: ast.literal_eval(v) for k, v in (arg.split("=", 1) for arg in sys.argv[7:])}
pipe = toy.load_pipeline(weights=None if w == "shipped" else w)
refs = toy.references("test", count=b - a, seed=0, start=a)
steps = toy.TOY_SAMPLING["num_inference_steps"]  # calls per run: 24 guided steps + the final reward
stock_step = pipeline_module.reward_and_gradient
calls = [0]


def step_with_late_volume(*args, **kwargs):
    k = calls[0] % steps
    calls[0] += 1
    kwargs["volume"] = mode if k >= first else "free"
    return stock_step(*args, **kwargs)


pipeline_module.reward_and_gradient = step_with_late_volume


def show(done, total, row):
    assert calls[0] == done * steps, (calls[0], done)  # 24 guided steps and the final reward per run
    print(row.reference, "FAIL " + row.reason if row.failed else "ok", round(row.iou, 3),
          round(row.extra["volume_ratio"], 2), flush=True)


name = f"guided volume {mode} from step {first} " + " ".join(sys.argv[7:])
rows = run_condition(pipe, refs, name, overrides, seeds=range(a, b), progress=show)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f volume %.2f s/asset %.1f" % (s["failures"], s["count"], s["mean_iou"],
      s["median_volume_ratio"], s["seconds_per_asset"]), s["reasons"])
