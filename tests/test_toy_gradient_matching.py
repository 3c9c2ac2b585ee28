"""Gradient matching (vlm3d_guidance.toy.gradient_matching): its targets, its loss's plumbing, that
training does what it says, the command end to end, and which critic the toy loads."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm3d_guidance import toy
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models
from vlm3d_guidance.toy.experiment import NegatedCritic, ReferenceViewReward
from vlm3d_guidance.toy.references import make_reference
from vlm3d_guidance.toy.train import critic_shapes

CFG = toy.TOY_GUIDANCE


@pytest.fixture(scope="module")
def shapes():
    return critic_shapes(3)


@pytest.fixture(scope="module")
def samples(shapes):
    """Estimates at steps 1 and 3 of a 4-step run of the shipped generator, for a table, a mug, a cup."""
    generator = models.load_generator()
    sampling = dict({k: v for k, v in toy.TOY_SAMPLING.items() if k != "octree_resolution"}, num_inference_steps=4)
    return gm.matching_samples(generator, shapes, [1, 3], CFG, sampling, log=lambda msg: None)


def base_critic():
    return VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.CRITIC_FOLDER), dtype="float32",
                                     attn_implementation="eager")


def test_on_policy_samples_at_lam_0_are_the_stock_ones_and_guidance_moves_them(samples, shapes):
    """On-policy samples (``matching_samples`` with ``lams``: the runs guided by the critic): at lam 0
    the guided loop is the stock sampler, so they equal the stock samples exactly; guided, they move.
    ``on_policy_lams`` splits the objects into equal blocks, one per lam."""
    from vlm3d_guidance.pipeline import GuidedHunyuanPipeline

    generator = models.load_generator()
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.MATCHED_CRITIC_FOLDER), dtype="float32")
    guided = GuidedHunyuanPipeline(pipeline=generator, critic=critic, config=CFG)
    sampling = dict(toy.TOY_SAMPLING, num_inference_steps=4)
    at_zero = gm.matching_samples(guided, shapes[:1], [1, 3], CFG, sampling, log=lambda msg: None, lams=[0.0])
    moved = gm.matching_samples(guided, shapes[:1], [1, 3], CFG, sampling, log=lambda msg: None, lams=[0.5])
    for a, b in zip(samples[:2], at_zero):
        assert (a["i"], a["step"]) == (b["i"], b["step"]) and b["source"] == "guided lam 0.0"
        for key in ("verts", "faces", "V", "t_verts"):
            assert torch.equal(a[key], b[key]), key
    for a, b in zip(samples[:2], moved):  # step 0 was guided: the estimates of steps 1 and 3 moved
        assert a["verts"].shape != b["verts"].shape or (a["verts"] - b["verts"]).abs().max() > 1e-3
    assert gm.on_policy_lams(dict(objects=5, lams=(0.02, 0.05))) == [0.02, 0.02, 0.02, 0.05, 0.05]
    assert gm.on_policy_lams(dict(objects=140, lams=(0.02, 0.05))).index(0.05) == 70


def test_samples_cover_every_object_and_step(samples, shapes):
    assert [(s["i"], s["step"]) for s in samples] == [(i, k) for i in range(3) for k in (1, 3)]
    assert [s["cls"] for s in samples[::2]] == [obj.cls for obj, _ in shapes] == ["table", "mug", "cup"]
    s = samples[0]
    assert s["V"].dtype == torch.uint8 and s["V"].shape == (CFG.num_views, 3, CFG.render_size, CFG.render_size)
    assert s["t_verts"].shape == s["verts"].shape and float(s["t_verts"].norm()) > 0
    assert s["sigma"] < samples[1]["sigma"]  # hy3dgen's time runs from noise (0) to data (1)


def test_target_is_the_part_weighted_truth_rewards_vertex_gradient(samples, shapes):
    """The target against an independent implementation: the gradient of ReferenceViewReward
    (-100 mean(w (V - T)^2), part-weighted, the truth rendered through the sample's cameras) pulled
    back to the vertices is parallel to it (the two differ by the factor 200 / numel)."""
    for s in samples:
        truth = ReferenceViewReward.seen_by(make_reference(shapes[s["i"]][0], "x"), s["cams"], CFG, part_weighted=True)
        _, grad = gm.vertex_gradient(truth, s, CFG)
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), s["t_verts"].flatten(), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-5)
        assert float(grad.norm() / s["t_verts"].norm()) == pytest.approx(200 / s["V"].numel(), rel=1e-4)


def test_matching_cosine_of_a_critic_against_its_own_gradient_is_one(samples):
    critic = base_critic()
    s = samples[2]
    _, own = gm.vertex_gradient(critic, s, CFG)
    assert float(gm.matching_cosine(critic, dict(s, t_verts=own), CFG)[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(gm.matching_cosine(NegatedCritic(critic), dict(s, t_verts=own), CFG)[1]) == pytest.approx(-1.0, abs=1e-5)
    # create_graph keeps the cosine differentiable in the critic's weights
    critic.model.requires_grad_(True)
    _, cos = gm.matching_cosine(critic, s, CFG, create_graph=True)
    cos.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in critic.model.parameters())


def test_held_out_split_keeps_objects_whole(samples):
    train, held = gm.held_out_split(samples, 0.34, np.random.default_rng(0))
    assert sorted(train + held) == list(range(len(samples)))
    assert not {samples[k]["i"] for k in train} & {samples[k]["i"] for k in held}
    assert len({samples[k]["i"] for k in held}) == 1


def test_a_phase_of_matching_raises_the_training_samples_cosine(samples):
    """Measured: mean cosine of the 4 training samples -0.015 -> +0.218 after 3 epochs at lr 1e-3."""
    critic = base_critic()
    sizes = dict(gm.MATCHING, lr=1e-3, batch=2, held_share=0.34)
    train, _ = gm.held_out_split(samples, sizes["held_share"], np.random.default_rng(sizes["seed"]))
    before = np.mean([float(gm.matching_cosine(critic, samples[k], CFG)[1]) for k in train])
    history = gm.train_phase(critic, samples, dict(epochs=3), sizes, CFG, log=lambda msg: None)
    after = np.mean([float(gm.matching_cosine(critic, samples[k], CFG)[1]) for k in train])
    print(f"\ntraining samples' cosine {before:+.3f} -> {after:+.3f}; held out {[h['all'] for h in history]}")
    assert after > before + 0.1
    assert len(history) == 4 and set(history[0]) == {"all", "positive", "by_class"}
    assert not any(p.requires_grad for p in critic.model.parameters())


def test_a_non_finite_sample_is_skipped_reported_and_survived(samples):
    """A sample whose target is NaN (a degenerate estimate) gives a NaN loss: it is left out of the
    step, the epoch's log names its object, and the weights stay finite."""
    critic = base_critic()
    broken = [dict(s) for s in samples]
    broken[0] = dict(broken[0], t_verts=torch.full_like(broken[0]["t_verts"], float("nan")))
    lines = []
    sizes = dict(gm.MATCHING, lr=1e-3, batch=2, held_share=0.34)
    gm.train_phase(critic, broken, dict(epochs=1), sizes, CFG, log=lines.append)
    assert all(bool(torch.isfinite(p).all()) for p in critic.model.parameters())
    assert "skipped 1 non-finite samples (objects [0])" in lines[-1], lines[-1]
    assert np.isfinite(float(gm.matching_cosine(critic, samples[1], CFG)[1]))


def base_only_weights(weights):
    """A copy of the shipped weights in ``weights`` as toy.train leaves them: the base critic only."""
    shutil.copytree(models.WEIGHTS_DIR, weights)
    shutil.rmtree(weights / models.MATCHED_CRITIC_FOLDER)
    manifest = json.loads((weights / models.MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(models.MATCHED_CRITIC_FOLDER + "/")}
    manifest.pop("matching")
    (weights / models.MANIFEST).write_text(json.dumps(manifest))
    return weights


def test_command_quick_run_adds_a_loadable_matched_critic(tmp_path):
    weights = base_only_weights(tmp_path / "weights")
    base = toy.load_pipeline(weights=weights)
    with pytest.raises(FileNotFoundError, match="no matched critic"):
        toy.load_pipeline(weights=weights, critic="matched")

    assert gm.main(["--quick", "--weights", str(weights), "--work", str(tmp_path / "work")]) == 0
    manifest = models.verify_weights(weights)  # every file, the new ones included, against its hash
    assert {k for k in manifest["files"] if k.startswith(models.MATCHED_CRITIC_FOLDER + "/")} >= {
        f"{models.MATCHED_CRITIC_FOLDER}/model.safetensors", f"{models.MATCHED_CRITIC_FOLDER}/config.json", f"{models.MATCHED_CRITIC_FOLDER}/tokenizer.json"}
    assert manifest["matching"]["command"] == "python -m vlm3d_guidance.toy.gradient_matching --quick"
    assert manifest["matching"]["samples"] == 6 and len(manifest["matching"]["held_out_cosine"]) == 2
    matched = toy.load_pipeline(weights=weights)  # the matched critic by default once there
    changed = [not torch.equal(p, q) for p, q in zip(matched.critic.model.parameters(), base.critic.model.parameters())]
    assert any(changed), "the matched critic must differ from the base critic it started from"
    base_again = toy.load_pipeline(weights=weights, critic="base").critic.model
    assert all(torch.equal(p, q) for p, q in zip(base_again.parameters(), base.critic.model.parameters()))


def test_two_jobs_then_a_resumed_phase_make_the_critic_one_uninterrupted_run_makes(tmp_path, monkeypatch, capsys):
    one, two = base_only_weights(tmp_path / "one"), base_only_weights(tmp_path / "two")
    with pytest.raises(SystemExit):  # refused before any work: nothing to resume from
        gm.main(["--quick", "--resume-phase", "1", "--weights", str(two), "--work", str(tmp_path / "w2")])
    assert "needs a matched critic" in capsys.readouterr().err
    assert gm.main(["--quick", "--weights", str(one), "--work", str(tmp_path / "w1")]) == 0
    monkeypatch.setattr(gm, "QUICK", dict(gm.QUICK, phases=gm.QUICK["phases"][:1]))  # a run stopped after phase 0
    assert gm.main(["--quick", "--jobs", "2", "--weights", str(two), "--work", str(tmp_path / "w2")]) == 0
    monkeypatch.undo()
    with pytest.raises(SystemExit):  # one's critic went through both phases: it is not where phase 1 starts
        gm.main(["--quick", "--resume-phase", "1", "--weights", str(one), "--work", str(tmp_path / "w1")])
    assert "was not made by phases 0..0 of this recipe" in capsys.readouterr().err
    assert gm.main(["--quick", "--resume-phase", "1", "--weights", str(two), "--work", str(tmp_path / "w2")]) == 0

    cache = f"samples_{gm.QUICK['objects']}_{'-'.join(map(str, gm.QUICK['steps']))}_rank{gm.QUICK['basis_rank']}.pt"
    serial, parallel = (torch.load(tmp_path / w / cache, weights_only=False) for w in ("w1", "w2"))
    assert [(s["i"], s["step"]) for s in parallel] == [(s["i"], s["step"]) for s in serial] and len(serial) == 6
    for a, b in zip(serial, parallel):
        for key in ("verts", "faces", "V", "t_verts", "basis", "t_latent", "volume_latent"):
            assert torch.equal(a[key], b[key]), key
    critics = [load_file(str(w / models.MATCHED_CRITIC_FOLDER / "model.safetensors")) for w in (one, two)]
    assert critics[0].keys() == critics[1].keys()
    assert all(torch.equal(critics[0][k], critics[1][k]) for k in critics[0])
    first, resumed = (models.verify_weights(w)["matching"] for w in (one, two))
    assert resumed["held_out_cosine"] == first["held_out_cosine"] and len(first["held_out_cosine"]) == 2
    assert resumed["command"] == ("python -m vlm3d_guidance.toy.gradient_matching --quick --jobs 2; then "
                                  "python -m vlm3d_guidance.toy.gradient_matching --quick --resume-phase 1")
    assert set(resumed["wall_seconds"]) == {"samples", "phase_0", "resumed_on_policy_1", "resumed_phase_1"}
    assert first["on_policy_samples"] == resumed["on_policy_samples"] == 2  # object 0, guided, steps 2 and 22
    with pytest.raises(SystemExit):  # phase 1's on-policy samples are not kept in the weights: no resuming past it
        gm.main(["--quick", "--resume-phase", "2", "--weights", str(two), "--work", str(tmp_path / "w2")])


def test_the_toy_loads_the_shipped_matched_critic_by_default():
    manifest = models.verify_weights()
    assert manifest["matching"]["command"].startswith("python -m vlm3d_guidance.toy.gradient_matching")
    stored = {f: load_file(str(models.WEIGHTS_DIR / f / "model.safetensors")) for f in (models.MATCHED_CRITIC_FOLDER, models.CRITIC_FOLDER)}
    key = "model.layers.0.mlp.down_proj.weight"  # on disk; in memory transformers names it model.language_model.layers...
    assert not torch.equal(stored[models.MATCHED_CRITIC_FOLDER][key], stored[models.CRITIC_FOLDER][key])
    for critic, folder in ((None, models.MATCHED_CRITIC_FOLDER), ("matched", models.MATCHED_CRITIC_FOLDER), ("base", models.CRITIC_FOLDER)):
        loaded = toy.load_pipeline(critic=critic).critic.model.state_dict()["model.language_model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(loaded, stored[folder][key]), (critic, folder)
    with pytest.raises(ValueError, match="use 'matched'"):
        toy.load_pipeline(critic="best")


def test_the_shipped_matched_critic_was_made_by_the_current_recipe():
    """The manifest's recipe is the module's (a change to MATCHING must come with weights made by it),
    with one held-out history per phase."""
    matching = models.verify_weights()["matching"]
    assert matching["sizes"] == json.loads(json.dumps(gm.MATCHING))
    assert len(matching["held_out_cosine"]) == len(gm.MATCHING["phases"])
    assert matching["command"].endswith("--resume-phase 4")


def test_a_later_resume_states_its_provenance_prefix_once():
    earlier = "phases 0-2 and the wall times without 'resumed_': made by scripts"
    assert gm._without_resume_prefix(earlier) == "made by scripts"
    assert gm._without_resume_prefix("made by scripts") == "made by scripts"


def test_held_out_blocks_keep_the_first_blocks_split_and_hold_out_a_share_of_each_later_block():
    """A recipe that adds objects for a later phase (bounds [280, 400]) holds out exactly the objects
    the 280-object recipe held out below 280, and 10 % of objects 280-399 besides."""
    samples = [dict(i=i) for i in range(400) for _ in range(2)]
    first = [s for s in samples if s["i"] < 280]
    _, held_280 = gm.held_out_split(first, 0.1, np.random.default_rng(0))
    _, held_280_blocks = gm.held_out_split(first, 0.1, np.random.default_rng(0), [280], seed=0)
    train, held = gm.held_out_split(samples, 0.1, np.random.default_rng(0), [280, 400], seed=0)
    old = {first[k]["i"] for k in held_280}
    assert {first[k]["i"] for k in held_280_blocks} == old and len(old) == 28
    held_objects = {samples[k]["i"] for k in held}
    assert {i for i in held_objects if i < 280} == old
    assert len([i for i in held_objects if i >= 280]) == 12
    assert not held_objects & {samples[k]["i"] for k in train} and len(train) + len(held) == len(samples)
    assert gm.object_blocks(dict(objects=400, phases=[dict(objects=280), dict()])) == [280, 400]
    assert gm.object_blocks(gm.MATCHING) == sorted({gm.phase_objects(p, gm.MATCHING) for p in gm.MATCHING["phases"]} | {gm.MATCHING["objects"]})


def test_a_recipe_that_adds_objects_extends_the_sample_cache_and_resumes_from_the_smaller_one(tmp_path, monkeypatch, capsys):
    weights, work = base_only_weights(tmp_path / "weights"), tmp_path / "work"
    monkeypatch.setattr(gm, "QUICK", dict(gm.QUICK, objects=2, phases=[dict(epochs=1)]))
    assert gm.main(["--quick", "--weights", str(weights), "--work", str(work)]) == 0
    two = torch.load(work / gm._cache_name(2, gm.QUICK["steps"], gm.QUICK["basis_rank"]), weights_only=False)
    monkeypatch.setattr(gm, "QUICK", dict(gm.QUICK, objects=3, phases=[dict(epochs=1, objects=4)]))
    with pytest.raises(SystemExit):  # refused before any work
        gm.main(["--quick", "--resume-phase", "1", "--weights", str(weights), "--work", str(work)])
    assert "every phase's objects must be in 1..3" in capsys.readouterr().err
    monkeypatch.setattr(gm, "QUICK", dict(gm.QUICK, objects=3, phases=[dict(epochs=1, objects=2), dict(epochs=1, space="latent")]))
    assert gm.main(["--quick", "--resume-phase", "1", "--weights", str(weights), "--work", str(work)]) == 0
    assert "matching samples of objects 0-1 from" in capsys.readouterr().out
    three = torch.load(work / gm._cache_name(3, gm.QUICK["steps"], gm.QUICK["basis_rank"]), weights_only=False)
    alone = gm.range_samples(weights, 3, 2, 3, gm.QUICK["steps"], log=lambda msg: None, basis_rank=gm.QUICK["basis_rank"])
    assert [(s["i"], s["step"]) for s in three] == [(s["i"], s["step"]) for s in two + alone] and len(three) == 6
    for a, b in zip(three, two + alone):
        for key in ("verts", "V", "t_verts", "basis", "t_latent"):
            assert torch.equal(a[key], b[key]), key
    matching = models.verify_weights(weights)["matching"]
    assert set(matching["wall_seconds"]) == {"samples", "phase_0", "resumed_samples_2_to_3", "resumed_phase_1"}
    assert len(matching["held_out_cosine"]) == 2 and matching["samples"] == 6 and not matching["samples_from_cache"]
    assert matching["samples_of_first_objects_from_cache"] == 2  # their time is not in this run's wall times
