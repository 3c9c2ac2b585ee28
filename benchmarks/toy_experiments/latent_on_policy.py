"""OP (thirteenth session, measured): the shipped recipe plus one latent phase on the shipped critic's
OWN guided runs at the shipped lam (0.02): the shipped critic guides critic-split objects 0-69 (seed
``ROLLOUT_SEED + i``, each object's description), its 9 judged estimates per run join the 2,518 stock
samples, then 1 epoch (tables and mugs twice), all by the package command (``--resume-phase 5``):

    cp -r vlm3d_guidance/toy/weights OP && python latent_on_policy.py OP WORK
    python guided_eval.py OP 0 32 a.json lam=0.02 ; python guided_eval.py OP 32 64 b.json lam=0.02

The ninth session's on-policy phase (vertex space, half of it at lam 0.05) left the failures/IoU
trade-off where it was; its untested next steps were another round from the critic that ships and
samples at the lam to be shipped only; the latent phase since lowered the critic's volume bias (volume
cosine on guided runs +0.56 -> +0.43).
WORK must hold the 280-object cache with bases. Rows and log: ``latent_on_policy_*``; numbers in
benchmarks/RESULTS.md (thirteenth session).
"""
import sys

from vlm3d_guidance.toy import gradient_matching as gm

PHASE = dict(epochs=1, class_repeat=dict(table=2, mug=2), space="latent", on_policy=dict(objects=70, lams=(0.02,)))

if __name__ == "__main__":
    weights, work = sys.argv[1], sys.argv[2]
    gm.MATCHING = dict(gm.MATCHING, phases=gm.MATCHING["phases"] + [PHASE])
    sys.exit(gm.main(["--weights", weights, "--work", work, "--threads", "2", "--jobs", "2", "--resume-phase", "5"]))
