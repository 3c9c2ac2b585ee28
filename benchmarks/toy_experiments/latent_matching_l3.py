"""L3 (twelfth session, measured, not shipped): the shipped recipe plus a second latent phase, the same
as phase 4 (2 epochs, tables and mugs x2), run by the package command on a copy of the shipped weights.

    cp -r vlm3d_guidance/toy/weights L3 && python latent_matching_l3.py L3 WORK
    python guided_eval.py L3 0 8 a.json lam=0.02 ; python guided_eval.py L3 8 16 b.json lam=0.02   # and 0 32 / 32 64

WORK must hold the command's sample cache (``samples_280_..._rank24.pt``), or the command makes it
(about 43 min in two processes with ``--jobs 2``). Rows: ``latent_matching_l3_eval.json``; log:
``latent_matching_l3_training.log``; numbers in benchmarks/RESULTS.md (twelfth session).
"""
import sys

from vlm3d_guidance.toy import gradient_matching as gm

if __name__ == "__main__":
    weights, work = sys.argv[1], sys.argv[2]
    gm.MATCHING = dict(gm.MATCHING, phases=gm.MATCHING["phases"] + [dict(epochs=2, class_repeat=dict(table=2, mug=2), space="latent")])
    sys.exit(gm.main(["--weights", weights, "--work", work, "--threads", "2", "--resume-phase", "5"]))
