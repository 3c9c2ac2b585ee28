"""On-policy matching samples: train the critic's gradient where guidance takes the run.

Every matching sample so far is an estimate of the STOCK sampler's run; guidance moves the run away
from those, and there the critic's gradient may agree less (`guided_agreement.py` measures it). This
makes matching samples the same way (`gradient_matching.matching_sample`: fitted cameras, the
part-weighted truth's vertex gradient as target) from estimates of the shipped pipeline's GUIDED runs
(critic-split objects, the object's own description, seed ROLLOUT_SEED + i as the stock samples) and
fine-tunes the shipped matched critic one more phase on the stock samples plus these.

    python on_policy.py prep A B LAM OUT.pt             # guided samples of critic objects A..B-1 (1 thread)
    python on_policy.py train CACHE P1.pt,P2.pt MODEL_OUT EPOCHS   # one phase from the shipped critic (2 threads)
    python gradient_matching_candidate.py MODEL_OUT CAND            # then guided_eval.py / bench_toy.py
"""
import sys
import time

import torch

from vlm3d_guidance import toy
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models
from vlm3d_guidance.toy.critic_training import recorded_estimates
from vlm3d_guidance.toy.experiment import part_meshes
from vlm3d_guidance.toy.references import _mesh_tensors, render_reference
from vlm3d_guidance.toy.train import ROLLOUT_SEED, critic_shapes

CFG = toy.TOY_GUIDANCE


def prep(a, b, lam, out):
    torch.set_num_threads(1)
    a, b, lam = int(a), int(b), float(lam)
    pipe = toy.load_pipeline()
    shapes = critic_shapes(gm.MATCHING["objects"])
    rows, t0 = [], time.perf_counter()
    for i in range(a, b):
        obj = shapes[i][0]
        with recorded_estimates(pipe.pipeline) as estimates:
            pipe(image=render_reference(obj), prompt=obj.description, generator=torch.Generator().manual_seed(ROLLOUT_SEED + i),
                 enable_pbar=False, output_type="latent", lam=lam, **{k: v for k, v in toy.TOY_SAMPLING.items()})
        truth, parts = _mesh_tensors(obj), part_meshes(obj)
        for k in gm.MATCHING["steps"]:
            sigma, x0 = estimates[k]
            sample = gm.matching_sample(obj, x0, pipe.pipeline.vae, CFG, truth, parts)
            if sample is not None:
                rows.append(dict(sample, i=i, step=k, sigma=sigma, source=f"guided lam {lam}"))
        print(f"[{time.strftime('%H:%M:%S')}] object {i}: {len(rows)} samples ({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save(rows, out)


def train(cache, parts, model_out, epochs):
    torch.set_num_threads(2)
    samples = torch.load(cache, weights_only=False)
    for p in parts.split(","):
        samples += torch.load(p, weights_only=False)
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.MATCHED_CRITIC_FOLDER), device="cpu",
                                       dtype="float32", attn_implementation="eager")
    phase = dict(epochs=int(epochs), class_repeat={"table": 2, "mug": 2})
    gm.train_phase(critic, samples, phase, gm.MATCHING, CFG,
                   log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    models.save_critic(model_out, critic.model)


if __name__ == "__main__":
    {"prep": prep, "train": train}[sys.argv[1]](*sys.argv[2:])
