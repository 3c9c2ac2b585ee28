"""M400 (thirteenth session): the shipped recipe's latent phase (phase 4) on 400 critic-split objects
instead of 280; phases 0-3 unchanged (on the first 280, ``objects=280``). Run by the package command
from the critic of phases 0-3 (P4's weights, commit 1f0ed6f) with ``--resume-phase 4``:

    git archive 1f0ed6f vlm3d_guidance/toy/weights | tar -x -C tmp && mv tmp/vlm3d_guidance/toy/weights P3
    python latent_matching_400.py P3 WORK
    python guided_eval.py P3 0 32 a.json lam=0.02 ; python guided_eval.py P3 32 64 b.json lam=0.02

WORK holds the 280-object cache (``samples_280_..._rank24.pt``); the command extends it to 400 objects
(objects 280-399, about 18 s per object per process with ``--jobs 2``) or finds the extended cache.
The held-out latent cosine of critics on the old and the new held-out objects:

    python latent_matching_400.py compare WORK CRITIC_FOLDER ...

Rows and logs: ``latent_matching_400_*``; numbers in benchmarks/RESULTS.md (thirteenth session).
"""
import sys

from vlm3d_guidance.toy import gradient_matching as gm

RECIPE = dict(gm.MATCHING, objects=400,
              phases=[dict(p, objects=280) for p in gm.MATCHING["phases"][:4]] + gm.MATCHING["phases"][4:])


def compare(work: str, critics: list[str]) -> None:
    """Each critic's held-out latent cosine (the recipe's split) on the 28 held-out objects below 280
    (the shipped recipe's held-out set) and on the 12 among objects 280-399, by class."""
    from pathlib import Path

    import numpy as np
    import torch

    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.toy.config import TOY_GUIDANCE

    torch.set_num_threads(2)
    samples = torch.load(Path(work) / gm._cache_name(RECIPE["objects"], RECIPE["steps"], RECIPE["basis_rank"]), weights_only=False)
    _, held = gm.held_out_split(samples, RECIPE["held_share"], np.random.default_rng(RECIPE["seed"]),
                                gm.object_blocks(RECIPE), RECIPE["seed"])
    for folder in critics:
        critic = VLMCritic.from_pretrained(folder, device="cpu", dtype="float32", attn_implementation="eager")
        for name, idx in (("objects < 280", [k for k in held if samples[k]["i"] < 280]),
                          ("objects 280-399", [k for k in held if samples[k]["i"] >= 280])):
            print(folder, name, len(idx), "samples:", gm.held_out_cosine(critic, samples, idx, TOY_GUIDANCE, gm.latent_cosine), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    weights, work = sys.argv[1], sys.argv[2]
    gm.MATCHING = RECIPE
    sys.exit(gm.main(["--weights", weights, "--work", work, "--threads", "2", "--jobs", "2", "--resume-phase", "4"]))
