"""Probe: does the toy generator improve with more training? (Not part of the shipped training.)

    python benchmarks/probe_generator_steps.py --work /work/toyrun3/work --steps 1500

Continues the DiT + conditioner of a training run's cached ``generator.pt`` (``--work``, from
``python -m vlm3d_guidance.toy.train --work ...``) for ``--steps`` more flow-matching steps (a fresh
one-cycle schedule, same data), then samples the first ``--count`` test references unguided with
the shipped critic and judges the exports, before and after. Prints both summaries.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def unguided(weights: Path, count: int) -> dict:
    from vlm3d_guidance import toy
    from vlm3d_guidance.toy.experiment import run_condition, summarize

    pipe = toy.load_pipeline(weights=weights)
    rows = run_condition(pipe, toy.references("test", count=count, seed=0), "unguided", dict(lam=0.0))
    return summarize(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    from vlm3d_guidance.toy import models, train

    work = Path(args.work)
    _, vae, _ = torch.load(work / "autoencoder.pt", weights_only=False)
    latents = torch.load(work / "latents.pt", weights_only=False)
    dit, conditioner = torch.load(work / "generator.pt", weights_only=False)
    scale = latents["scale_factor"]
    vae.scale_factor = scale
    config = models.generator_config(scale)
    sizes = dict(train.SIZES, dit_steps=args.steps)
    shapes = train.generator_shapes(sizes["gen_objects"])
    refs = train.prepare_references(shapes, instantiate_from_config(config["image_processor"]))
    before = unguided(models.WEIGHTS_DIR, args.count)
    dit, conditioner = train.train_generator(latents["generator"], refs, scale, sizes, print, init=(dit, conditioner))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        shutil.copytree(models.WEIGHTS_DIR, weights)
        models.save_generator(models.generator_folder(weights), config, dit, vae, conditioner)
        manifest = json.loads((weights / models.MANIFEST).read_text())  # re-hash the probe's generator
        manifest["files"] = {rel: models.sha256(weights / rel) for rel in manifest["files"]}
        (weights / models.MANIFEST).write_text(json.dumps(manifest))
        after = unguided(weights, args.count)
    for name, s in (("shipped", before), (f"+{args.steps} steps", after)):
        print(f"{name}: failures {s['failures']}/{s['count']}, IoU {s['mean_iou']:.3f}, reasons {s['reasons']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
