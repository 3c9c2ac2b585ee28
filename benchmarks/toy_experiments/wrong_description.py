"""Wrong-description matching samples: does the prompt steer once matching has seen a mismatched one?

Every matching sample so far paired an object's estimate with its own description, and the stronger
the matching, the more guidance added handles whatever the prompt said (hidden-handle mugs with "a cup
without a handle": P3 2/8 follow, P4 0/8). This adds, for each mug sample of the package's matching
samples cache, the same surface and views with the prompt "a cup without a handle" and the target
towards the mug without its handle (``broken_variant(obj, mode="handle missing")``: the body alone, the
same placement), part-weighted as every target (``mug``: with the MUG's part weights, so the handle's
pixels weigh as much as in the mug's own sample, ~10x a body pixel; else the cup's, all 1), and fine-tunes the shipped matched critic one more
phase on all samples.

    python wrong_description.py prep CACHE OUT.pt [mug]     # the mug-as-cup samples (1 thread)
    python wrong_description.py train CACHE WD.pt MODEL_OUT  # one phase from the shipped critic (2 threads)
    python gradient_matching_candidate.py MODEL_OUT CAND      # then bench_toy language / guided_eval.py
"""
import sys
import time

import numpy as np
import torch

from vlm3d_guidance import toy
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models
from vlm3d_guidance.toy.experiment import part_meshes
from vlm3d_guidance.toy.references import _mesh_tensors
from vlm3d_guidance.toy.train import critic_shapes
from vlm3d_guidance.toy.world import DESCRIPTIONS, broken_variant

CFG = toy.TOY_GUIDANCE
PHASE = dict(epochs=1, class_repeat={"table": 2, "mug": 2, "mug as cup": 2})


def cup_sample(sample, cup, weigh_like=None) -> dict:
    """``sample`` (a mug's) with the cup prompt and the target towards ``cup`` (the handle-less mug),
    part-weighted by ``weigh_like``'s parts (default ``cup``'s)."""
    _, target = gm.part_weighted_target(sample["verts"], sample["faces"], sample["cams"], _mesh_tensors(cup),
                                        part_meshes(weigh_like if weigh_like is not None else cup), CFG)
    return dict(sample, cls="mug as cup", prompt=DESCRIPTIONS["cup"], t_verts=target)


def prep(cache, out, weights="cup"):
    torch.set_num_threads(1)
    samples = torch.load(cache, weights_only=False)
    shapes = critic_shapes(gm.MATCHING["objects"])
    rows, t0 = [], time.perf_counter()
    for s in samples:
        if s["cls"] != "mug":
            continue
        obj = shapes[s["i"]][0]
        assert obj.cls == "mug" and obj.broken is None
        cup = broken_variant(obj, np.random.default_rng(0), mode="handle missing")
        rows.append(cup_sample(s, cup, obj if weights == "mug" else None))
    torch.save(rows, out)
    print(f"{len(rows)} mug-as-cup samples in {time.perf_counter() - t0:.0f} s")


def train(cache, wd, model_out):
    torch.set_num_threads(2)
    samples = torch.load(cache, weights_only=False) + torch.load(wd, weights_only=False)
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.MATCHED_CRITIC_FOLDER), device="cpu",
                                       dtype="float32", attn_implementation="eager")
    gm.train_phase(critic, samples, PHASE, gm.MATCHING, CFG,
                   log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True))
    models.save_critic(model_out, critic.model)


if __name__ == "__main__":
    {"prep": prep, "train": train}[sys.argv[1]](*sys.argv[2:])
