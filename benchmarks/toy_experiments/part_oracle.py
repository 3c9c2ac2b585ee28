"""The part-weighted truth-view reward as the guidance reward (an upper-bound control, like
`bench_toy.py controls`), on test references [A, B) with seed i for reference i, fixed cameras.
ReferenceViewReward(part_weighted=True): -100 * mean(w * (views - truth)^2), each truth pixel
weighted by the inverse pixel area of the part it shows (toy.experiment.part_pixel_weights).
Usage: python part_oracle.py A B LAM OUT.json [plain]  (plain: the unweighted truth-view reward)
(The first 16 references' rows, po_0.json and po_1.json, came from an ad-hoc first version with the
same weights written inline; the library version gives the same rows: see RESULTS.md.)"""
import sys, json, torch
from dataclasses import replace
from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import ReferenceViewReward, run_condition, summarize
torch.set_num_threads(1)
a, b, lam, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
weighted = not (len(sys.argv) > 5 and sys.argv[5] == "plain")
name = "part-weighted truth" if weighted else "truth"
pipe = toy.load_pipeline()
cfg = replace(pipe.config, fill=None, lam=lam)
refs = toy.references("test", count=b - a, seed=0, start=a)
rows = []
for i, ref in zip(range(a, b), refs):
    reward = ReferenceViewReward.for_reference(ref, cfg, part_weighted=weighted)
    rows += run_condition(pipe, [ref], name, dict(fill=None, lam=lam), critic=reward, seeds=[i])
    r = rows[-1]
    print(i, ref.name, "FAIL " + r.reason if r.failed else "ok", round(r.iou, 3), flush=True)
json.dump([r.to_dict() for r in rows], open(out, "w"), indent=1)
s = summarize(rows)
print("fail %d/%d iou %.3f" % (s["failures"], s["count"], s["mean_iou"]), s["reasons"])
