"""Is the critic right where guidance takes the run? Gradient agreement at GUIDED estimates.

`bench_toy.py gradients` measures the critic's agreement with the part-weighted truth at the stock
sampler's estimates; guidance then moves the run elsewhere. This takes the estimates the guided
steps judged (guidance options NAME=VALUE, e.g. lam=0.05) on test references [A, B), seed i, steps
2, 7, 12, 17, 22, and measures the same cosines there (`experiment.gradient_agreement(guided=...)`).
Usage: python guided_agreement.py WEIGHTS A B OUT.json [NAME=VALUE ...]   (WEIGHTS: "shipped" or a folder)
"""
import json

import numpy as np

from toy_run_args import toy_run_args
from vlm3d_guidance.toy.experiment import gradient_agreement

run = toy_run_args()
pipe, refs, a, b, out, guided = run.pipe, run.refs, run.a, run.b, run.out, run.options
rows = gradient_agreement(pipe, refs, (2, 7, 12, 17, 22), seeds=range(a, b), guided=guided or None)
json.dump(dict(guided=guided, rows=rows), open(out, "w"), indent=1)
cs = np.array([r["cosine_parts"] for r in rows if r["cosine_parts"] is not None])
print(f"{guided or 'unguided'}: cosine with the part-weighted truth {cs.mean():+.3f} ({(cs > 0).mean():.0%} > 0, n {cs.size})")
for cls in ("table", "mug", "cup", "lamp"):
    c = [r["cosine_parts"] for r in rows if cls in r["reference"] and r["cosine_parts"] is not None]
    if c:
        print(f"  {cls}: {np.mean(c):+.3f} (n {len(c)})")
