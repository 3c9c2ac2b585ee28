"""Guided on test references [A, B) (seed i) with only a share BETA of the critic gradient's volume
component removed (g - BETA * <g, gv>/<gv, gv> gv; BETA 1 is the package's volume="keep"), other
guidance options NAME=VALUE on top of the toy defaults. Experiment only: it replaces the step's
`project_volume` in its own process.
Usage: python volume_damped.py WEIGHTS A B OUT.json BETA [NAME=VALUE ...]"""
import json

import vlm3d_guidance.guidance.step as step_module
from toy_run_args import toy_run_args
from vlm3d_guidance.toy.experiment import run_condition, summarize

run = toy_run_args(extra=1)
pipe, refs, a, b, out, overrides = run.pipe, run.refs, run.a, run.b, run.out, run.options
beta = float(run.extra[0])
stock_projection = step_module.project_volume


def damped(gradient, volume_gradient, orientation, mode):
    return gradient + beta * (stock_projection(gradient, volume_gradient, orientation, mode) - gradient)


step_module.project_volume = damped


def show(done, total, row):
    print(row.reference, "FAIL " + row.reason if row.failed else "ok", round(row.iou, 3),
          round(row.extra["volume_ratio"], 2), flush=True)


name = f"guided volume keep x{beta:g} " + " ".join(run.option_args)
rows = run_condition(pipe, refs, name, dict(overrides, volume="keep"), seeds=range(a, b), progress=show)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f volume %.2f s/asset %.1f" % (s["failures"], s["count"], s["mean_iou"],
      s["median_volume_ratio"], s["seconds_per_asset"]), s["reasons"])
