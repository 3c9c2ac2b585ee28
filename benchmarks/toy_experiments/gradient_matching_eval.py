"""Guided at the toy defaults on test references [a, b) (seed i for reference i), a candidate folder.
Usage: python gradient_matching_eval.py WEIGHTS A B OUT.json [lam]"""
import sys, json, torch
from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import run_condition, summarize
torch.set_num_threads(1)
w, a, b, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ov = {} if len(sys.argv) < 6 else {"lam": float(sys.argv[5])}
pipe = toy.load_pipeline(weights=w)
refs = toy.references("test", count=b - a, seed=0, start=a)
rows = run_condition(pipe, refs, "guided", ov, seeds=range(a, b))
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f" % (s["failures"], s["count"], s["mean_iou"]), s["reasons"])
