"""Is the critic right where guidance takes the run? Gradient agreement at GUIDED estimates.

`bench_toy.py gradients` measures the critic's agreement with the part-weighted truth at the stock
sampler's estimates; guidance then moves the run elsewhere. This takes the estimates the guided
steps judged (guidance options NAME=VALUE, e.g. lam=0.05) on test references [A, B), seed i, steps
2, 7, 12, 17, 22, and measures the same cosines there (`experiment.gradient_agreement(guided=...)`).
Usage: python guided_agreement.py WEIGHTS A B OUT.json [NAME=VALUE ...]   (WEIGHTS: "shipped" or a folder)
"""
import ast
import json
import sys

import numpy as np
import torch

from vlm3d_guidance import toy
from vlm3d_guidance.toy.experiment import gradient_agreement

torch.set_num_threads(1)
w, a, b, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
guided = {k: ast.literal_eval(v) for k, v in (arg.split("=", 1) for arg in sys.argv[5:])}
pipe = toy.load_pipeline(weights=None if w == "shipped" else w)
refs = toy.references("test", count=b - a, seed=0, start=a)
rows = gradient_agreement(pipe, refs, (2, 7, 12, 17, 22), seeds=range(a, b), guided=guided or None)
json.dump(dict(guided=guided, rows=rows), open(out, "w"), indent=1)
cs = np.array([r["cosine_parts"] for r in rows if r["cosine_parts"] is not None])
print(f"{guided or 'unguided'}: cosine with the part-weighted truth {cs.mean():+.3f} ({(cs > 0).mean():.0%} > 0, n {cs.size})")
for cls in ("table", "mug", "cup", "lamp"):
    c = [r["cosine_parts"] for r in rows if cls in r["reference"] and r["cosine_parts"] is not None]
    if c:
        print(f"  {cls}: {np.mean(c):+.3f} (n {len(c)})")
