"""Guided on test references [A, B) (seed i) with only a share BETA of the critic gradient's volume
component removed (g - BETA * <g, gv>/<gv, gv> gv; BETA 1 is the package's volume="keep"), other
guidance options NAME=VALUE on top of the toy defaults. Experiment only: it replaces the step's
`project_volume` in its own process.
Usage: python volume_damped.py WEIGHTS A B OUT.json BETA [NAME=VALUE ...]"""
import ast
import json
import sys

import torch

import vlm3d_guidance.guidance.step as step_module
from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import run_condition, summarize

torch.set_num_threads(1)
w, a, b, out, beta = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
overrides = {k: ast.literal_eval(v) for k, v in (arg.split("=", 1) for arg in sys.argv[6:])}
stock_projection = step_module.project_volume


def damped(gradient, volume_gradient, orientation, mode):
    return gradient + beta * (stock_projection(gradient, volume_gradient, orientation, mode) - gradient)


step_module.project_volume = damped
pipe = toy.load_pipeline(weights=None if w == "shipped" else w)
refs = toy.references("test", count=b - a, seed=0, start=a)


def show(done, total, row):
    print(row.reference, "FAIL " + row.reason if row.failed else "ok", round(row.iou, 3),
          round(row.extra["volume_ratio"], 2), flush=True)


name = f"guided volume keep x{beta:g} " + " ".join(sys.argv[6:])
rows = run_condition(pipe, refs, name, dict(overrides, volume="keep"), seeds=range(a, b), progress=show)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f volume %.2f s/asset %.1f" % (s["failures"], s["count"], s["mean_iou"],
      s["median_volume_ratio"], s["seconds_per_asset"]), s["reasons"])
