"""Guided on test references [A, B) (seed i for reference i) with guidance overrides given as
NAME=VALUE (Python literals, e.g. lam=0.05 rotate_views=True), weights "shipped" or a folder.
Usage: python guided_eval.py WEIGHTS A B OUT.json [NAME=VALUE ...]"""
import ast
import json
import sys

import torch

from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import run_condition, summarize

torch.set_num_threads(1)
w, a, b, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
overrides = {k: ast.literal_eval(v) for k, v in (arg.split("=", 1) for arg in sys.argv[5:])}
pipe = toy.load_pipeline(weights=None if w == "shipped" else w)
refs = toy.references("test", count=b - a, seed=0, start=a)


def show(done, total, row):
    print(row.reference, "FAIL " + row.reason if row.failed else "ok", round(row.iou, 3), flush=True)


rows = run_condition(pipe, refs, "guided " + " ".join(sys.argv[5:]), overrides, seeds=range(a, b), progress=show)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f s/asset %.1f" % (s["failures"], s["count"], s["mean_iou"], s["seconds_per_asset"]),
      s["reasons"])
