"""The toy training's own pieces: aligned-latent encoder, conditioner targets, OT coupling."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import trimesh

from vlm3d_guidance.toy.conditioner import PART_DIM, PART_SLOTS, center_errors, part_targets
from vlm3d_guidance.toy.encoder import (STENCIL_SPACING, TOKENS, encoder_input, part_area, stencil_field,
                                        token_seeds, tokens_per_part)
from vlm3d_guidance.toy.flow import ot_pair
from vlm3d_guidance.toy.references import split_object
from vlm3d_guidance.toy.world import Part, broken_variant


@pytest.mark.parametrize("part,mesh", [
    (Part("b", "box", dict(center=(0, 0, 0), half=(0.1, 0.2, 0.3))), trimesh.creation.box((0.2, 0.4, 0.6))),
    (Part("c", "cylinder", dict(center=(0, 0, 0), radius=0.1, half_height=0.25)),
     trimesh.creation.cylinder(0.1, 0.5, sections=512)),
    (Part("t", "torus", dict(center=(0, 0, 0), normal=(0, 0, 1), major=0.3, minor=0.05)),
     trimesh.creation.torus(0.3, 0.05, major_sections=256, minor_sections=128)),
])
def test_part_area_matches_a_fine_mesh(part, mesh):
    assert part_area(part) == pytest.approx(mesh.area, rel=2e-3)


def test_frustum_area_is_analytic():
    """A frustum with equal radii is a cylinder; with a zero top radius a cone (pi r (r + slant))."""
    cyl = Part("f", "frustum", dict(center=(0, 0, 0), r_bottom=0.1, r_top=0.1, half_height=0.2))
    assert part_area(cyl) == pytest.approx(2 * math.pi * 0.1 * 0.4 + 2 * math.pi * 0.01)
    cone = Part("f", "frustum", dict(center=(0, 0, 0), r_bottom=0.3, r_top=0.0, half_height=0.2))
    assert part_area(cone) == pytest.approx(math.pi * 0.3 * (0.3 + 0.5))


def test_tokens_per_part_sum_and_minimum():
    table = split_object("generator", 0, 0)
    assert table.cls == "table"
    n = tokens_per_part(table.parts)
    assert n.sum() == TOKENS and n.min() >= 4
    assert n[0] == n.max()  # the top is the largest part


def test_broken_variant_has_the_intact_seeds_and_empty_stencils_where_a_part_is_gone():
    table = split_object("generator", 0, 0)
    broken = broken_variant(table, np.random.default_rng(0), "leg missing")
    (gone,) = [p for p in table.parts if p not in broken.parts]
    seeds_a, stencil_a = encoder_input(table)
    seeds_b, stencil_b = encoder_input(broken)
    assert seeds_a.shape == (1, TOKENS, 3) and stencil_a.shape == (1, TOKENS, 125)
    assert torch.equal(seeds_a, seeds_b)
    on_gone = gone.sdf(seeds_a[0].double()).abs() < 1e-3
    assert on_gone.sum() >= 4
    # the stencil centre (index 62 of 5^3) at a seed on the surface reads ~0; where the leg is
    # gone the whole stencil reads "outside" unless another part is within reach
    centre = stencil_a[0, :, 62]
    assert centre.abs().max() < 1e-3 / STENCIL_SPACING + 1e-6
    centre_b = stencil_b[0, :, 62]
    expected = (-broken.sdf(seeds_a[0].double()) / STENCIL_SPACING).clamp(-1, 1).float()
    assert torch.allclose(centre_b, expected, atol=1e-6)
    assert float((centre_b[on_gone] < -0.2).float().mean()) > 0.5  # "outside" where the leg was
    assert centre_b[~on_gone].abs().max() < 1e-2  # the other parts' seeds are still on the surface


def test_stencil_matches_the_analytic_box_field():
    box = Part("b", "box", dict(center=(0, 0, 0), half=(0.3, 0.3, 0.3)))
    seeds = torch.tensor([[0.3, 0.0, 0.0]])
    values = stencil_field(box, seeds).view(5, 5, 5)  # [x, y, z], offsets -0.2..0.2
    x_offsets = torch.linspace(-0.2, 0.2, 5)
    expected = (-x_offsets / STENCIL_SPACING).clamp(-1, 1)  # inside for negative x offsets
    assert torch.allclose(values[:, 2, 2], expected, atol=1e-6)


def test_token_seeds_are_deterministic_and_on_the_surface():
    mug = split_object("generator", 0, 1)
    a, b = token_seeds(mug), token_seeds(mug)
    assert torch.equal(a, b)
    assert float(mug.sdf(a.double()).abs().max()) < 2e-3


def test_part_targets_layout():
    table = split_object("generator", 0, 0)
    t = part_targets(table).view(PART_SLOTS, PART_DIM)
    assert t.shape == (PART_SLOTS, PART_DIM)
    assert (t[: len(table.parts), 0] == 1).all() and (t[len(table.parts):, 0] == -1).all()
    for row, part in zip(t, table.parts):
        assert torch.allclose(row[1:4], 2 * torch.tensor(part.params["center"], dtype=torch.float32))
    shifted = t.clone()
    shifted[1, 1] += 2 * 0.05  # leg 0's centre moved by 0.05 in x
    err = center_errors(shifted.flatten()[None], t.flatten()[None])
    assert err.shape == (len(table.parts),)
    assert float(err.max()) == pytest.approx(0.05, abs=1e-6) and float(err.sum()) == pytest.approx(0.05, abs=1e-6)


def test_ot_pair_is_the_optimal_permutation():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 6, 4, generator=gen)
    x = torch.randn(3, 6, 4, generator=gen)
    paired = ot_pair(eps, x)
    for b in range(3):
        best = min(itertools.permutations(range(6)), key=lambda perm: float((eps[b] - x[b, list(perm)]).pow(2).sum()))
        assert torch.equal(paired[b], x[b, list(best)])
    # a random pairing costs more on average: that is the point
    assert float((eps - paired).pow(2).sum()) < float((eps - x).pow(2).sum())


def test_training_script_quick_run_reproduces_a_loadable_toy(tmp_path):
    """``python -m vlm3d_guidance.toy.train --quick`` end to end (every stage at tiny sizes): the
    exported folder passes the manifest check, loads through hy3dgen's and transformers' loaders
    and samples; ``--from-stage critic`` reruns only the critic stages from the cache."""
    import json

    from vlm3d_guidance import toy
    from vlm3d_guidance.toy import models, train

    out, work = tmp_path / "weights", tmp_path / "work"
    assert train.main(["--quick", "--out", str(out), "--work", str(work)]) == 0
    manifest = models.verify_weights(out)
    assert set(manifest["wall_seconds"]) == set(train.STAGES[:-1])  # the export is written before its own time
    assert manifest["data"]["critic_samples"] == manifest["data"]["critic_yes"] + manifest["data"]["critic_no"] > 0
    assert manifest["sizes"] == train.QUICK
    rollouts = manifest["data"]["critic_label_stats"]["rollouts"]
    assert sum(v["runs"] for v in rollouts.values()) == train.QUICK["critic_rollouts"]
    times = json.loads((work / "times.json").read_text())
    pipe = toy.load_pipeline(weights=out)
    ref = toy.references("test", count=1)[0]
    mesh = pipe(image=ref.image, prompt=ref.prompt, generator=torch.Generator().manual_seed(0), enable_pbar=False,
                **dict(toy.TOY_SAMPLING, num_inference_steps=2), lam=0.0)[0]
    assert toy.judge(mesh, ref)["reason"]  # a verdict on whatever the untrained generator draws

    # the rollouts' recorded estimates: the last step's x0 = z + (1 - sigma) v lands on sigma = 1,
    # so it IS the sampler's final latent; one estimate per step, sigmas rising from 0
    from vlm3d_guidance.toy.critic_training import recorded_estimates

    with recorded_estimates(pipe.pipeline) as estimates:
        final = pipe.pipeline(image=ref.image, generator=torch.Generator().manual_seed(0), enable_pbar=False,
                              num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    assert [round(s, 6) for s, _ in estimates] == sorted(round(s, 6) for s, _ in estimates) and len(estimates) == 3
    assert estimates[0][0] == 0.0
    torch.testing.assert_close(estimates[-1][1], final.float(), rtol=0, atol=1e-5)
    assert "step" not in vars(pipe.pipeline.scheduler)  # the hook is gone

    generator_file = next((out / "generator").rglob("model.fp16.safetensors"))
    generator_hash = models.sha256(generator_file)
    assert train.main(["--quick", "--out", str(out), "--work", str(work), "--from-stage", "critic"]) == 0
    rerun = json.loads((work / "times.json").read_text())
    assert {k: rerun[k] for k in ("autoencoder", "generator")} == {k: times[k] for k in ("autoencoder", "generator")}
    assert models.sha256(next((out / "generator").rglob("model.fp16.safetensors"))) == generator_hash
