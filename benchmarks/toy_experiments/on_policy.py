"""On-policy matching samples, as first made (ninth session), before MATCHING's fifth phase existed.

Every matching sample of phases 0-3 is an estimate of the STOCK sampler's run; guidance moves the run
away from those, and there the critic's gradient agreed far less (`guided_agreement.py`). This makes
samples of the shipped pipeline's GUIDED runs of critic-split objects A..B-1 (guided by the shipped
matched critic at LAM, each object's own description, seed ROLLOUT_SEED + i as the stock samples),
through the package's own `gradient_matching.range_samples(critic=..., lams=...)`; the first version of
this script wrote the same loop by hand, and its rows were checked equal bit for bit to the package's
(objects 0 and 70, all 9 steps each) before the package's rows replaced it.

    python on_policy.py prep A B LAM OUT.pt   # 1 thread; the ninth session ran 0 70 0.02 and 70 140 0.05
    # then, with the two files concatenated as the package's on-policy cache of phase 4 in WORK (the name
    # holds the guiding critic's sha256; without it the package makes the samples itself), train the
    # phase on a copy CAND of the shipped weights: the package's command with PHASE appended to MATCHING
    python on_policy.py train CAND WORK       # = gradient_matching --threads 2 --jobs 2 --resume-phase 4
"""
import sys

import torch

from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models

#: the fifth phase tried (not shipped): P4's recipe, then this
PHASE = dict(epochs=2, class_repeat=dict(table=2, mug=2), on_policy=dict(objects=140, lams=(0.02, 0.05)))


def prep(a, b, lam, out):
    torch.set_num_threads(1)
    a, b, lam = int(a), int(b), float(lam)
    rows = gm.range_samples(models.WEIGHTS_DIR, b, a, b, gm.MATCHING["steps"],
                            critic=str(models.WEIGHTS_DIR / models.MATCHED_CRITIC_FOLDER), lams=[lam] * b)
    torch.save(rows, out)
    print(f"{len(rows)} on-policy samples of objects {a}..{b - 1} at lam {lam} -> {out}")


def train(cand, work):
    gm.MATCHING["phases"].append(PHASE)
    return gm.main(["--weights", cand, "--work", work, "--threads", "2", "--jobs", "2", "--resume-phase", "4"])


if __name__ == "__main__":
    {"prep": prep, "train": train}[sys.argv[1]](*sys.argv[2:])
