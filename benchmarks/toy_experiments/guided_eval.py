"""Guided on test references [A, B) (seed i for reference i) with guidance overrides given as
NAME=VALUE (Python literals, e.g. lam=0.05 rotate_views=True), weights "shipped" or a folder.
Usage: python guided_eval.py WEIGHTS A B OUT.json [NAME=VALUE ...]"""
import json

from toy_run_args import toy_run_args
from vlm3d_guidance.toy.experiment import run_condition, summarize

run = toy_run_args()
pipe, refs, a, b, out, overrides = run.pipe, run.refs, run.a, run.b, run.out, run.options


def show(done, total, row):
    print(row.reference, "FAIL " + row.reason if row.failed else "ok", round(row.iou, 3), flush=True)


rows = run_condition(pipe, refs, "guided " + " ".join(run.option_args), overrides, seeds=range(a, b), progress=show)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f s/asset %.1f" % (s["failures"], s["count"], s["mean_iou"], s["seconds_per_asset"]),
      s["reasons"])
