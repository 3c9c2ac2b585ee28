"""Gradient agreement (bench_toy gradients' measurement) of a fine-tuned critic at a render size.
Usage: python pairs_at_size_gradients.py MODEL_FOLDER|shipped SIZE [OUT.json]
(the cosine with the plain truth, then with the part-weighted truth overall and by class)"""
import sys, json, numpy as np, torch
from dataclasses import replace
from transformers import Qwen2_5_VLForConditionalGeneration
from vlm3d_guidance import toy
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy.experiment import gradient_agreement
torch.set_num_threads(1)
folder, size = sys.argv[1], int(sys.argv[2])
pipe = toy.load_pipeline()
if folder != "shipped":
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32).eval()
    pipe.critic = VLMCritic(model, pipe.critic.processor)
pipe.config = replace(pipe.config, render_size=size)
rows = gradient_agreement(pipe, toy.references("test", count=16, seed=0), (2, 7, 12, 17, 22))
c = np.array([r["cosine"] for r in rows if r["cosine"] is not None])
print(folder, size, "mean cos %+.3f share>0 %.2f mean abs %.3f n %d" % (c.mean(), (c > 0).mean(), np.abs(c).mean(), c.size))
for s in (2, 7, 12, 17, 22):
    cs = np.array([r["cosine"] for r in rows if r["step"] == s and r["cosine"] is not None]); print("  step", s, "%+.3f %.2f" % (cs.mean(), (cs > 0).mean()))
cp = [r for r in rows if r["cosine_parts"] is not None]
print("part-weighted: mean cos %+.3f share>0 %.2f" % (np.mean([r["cosine_parts"] for r in cp]), np.mean([r["cosine_parts"] > 0 for r in cp])),
      {c: round(float(np.mean([r["cosine_parts"] for r in cp if r["reference"].endswith(c)])), 3) for c in ("table", "mug", "cup", "lamp")})
out = sys.argv[3] if len(sys.argv) > 3 else f"/work/exp/v6/grad_{folder.split('/')[-1]}_{size}.json"
json.dump(rows, open(out, "w"))
