"""Latent-space gradient matching (vlm3d_guidance.toy.latent_basis): the stored basis against a plain
autograd reference, the latent cosine's plumbing, and that a latent phase trains what it says."""

import numpy as np
import pytest
import torch

from vlm3d_guidance import toy
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.geometry import as_stock_export, decode_surface, mesh_volume
from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models
from vlm3d_guidance.toy.critic_training import recorded_estimates
from vlm3d_guidance.toy.experiment import NegatedCritic
from vlm3d_guidance.toy.latent_basis import latent_basis, latent_cosine, with_latent_basis
from vlm3d_guidance.toy.references import render_reference
from vlm3d_guidance.toy.train import ROLLOUT_SEED, critic_shapes

CFG = toy.TOY_GUIDANCE
RANK = 4
SAMPLING = dict({k: v for k, v in toy.TOY_SAMPLING.items() if k != "octree_resolution"}, num_inference_steps=4)


@pytest.fixture(scope="module")
def generator():
    return models.load_generator()


@pytest.fixture(scope="module")
def estimate(generator):
    """``(object, x0, sample)``: the clean estimate at step 3 of a 4-step run of a critic-split table."""
    obj = critic_shapes(1)[0][0]
    with recorded_estimates(generator) as estimates:
        generator(image=render_reference(obj), generator=torch.Generator().manual_seed(ROLLOUT_SEED),
                  enable_pbar=False, output_type="latent", **SAMPLING)
    x0 = estimates[3][1]
    return obj, x0, gm.matching_sample(obj, x0, generator.vae, CFG)


@pytest.fixture(scope="module")
def samples(generator):
    """Samples with rank-4 bases at steps 1 and 3 of 4-step runs of a table, a mug and a cup."""
    return gm.matching_samples(generator, critic_shapes(3), [1, 3], CFG, SAMPLING, log=lambda msg: None, basis_rank=RANK)


def test_basis_is_the_decoder_pullback_in_the_probes_orthonormal_basis(generator, estimate):
    """``B g = Q^T J^T g`` with ``Q`` the orthonormalised pull-backs of the same probes, all made here
    by plain backward passes (the module's rows come from double backward): equal to float32 rounding.
    The volume direction is in ``Q``'s span, so its coordinates keep its whole latent norm."""
    _, x0, sample = estimate
    basis, volume_coords = latent_basis(generator.vae, x0, CFG, sample["verts"], rank=RANK)
    assert basis.shape == (RANK, sample["verts"].numel()) and volume_coords.shape == (RANK,)

    leaf = x0.float().clone().requires_grad_(True)
    (verts, faces), = decode_surface(generator.vae, leaf, resolution=CFG.grid_resolution, box_v=1.01, mc_level=0.0,
                                     num_chunks=20000, coarse_to_fine=CFG.coarse_to_fine)
    placed = as_stock_export(verts.float(), 64, 1.01)
    assert torch.equal(placed.detach(), sample["verts"])
    pv = placed.detach().requires_grad_(True)
    (volume_grad,) = torch.autograd.grad(mesh_volume(pv, faces), pv)

    def pullback(g):  # J^T g, [L*C]
        return torch.autograd.grad(placed, leaf, g, retain_graph=True)[0].flatten()

    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(placed.shape, generator=gen) for _ in range(RANK - 1)] + [volume_grad]
    q, _ = torch.linalg.qr(torch.stack([pullback(p) for p in probes], 1))
    assert torch.allclose(q.T @ q, torch.eye(RANK), atol=1e-5)
    for g in (torch.randn(placed.shape, generator=torch.Generator().manual_seed(7)), sample["t_verts"]):
        expected = q.T @ pullback(g)
        assert torch.allclose(basis @ g.flatten(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    latent_volume = pullback(volume_grad)
    assert torch.allclose(volume_coords, q.T @ latent_volume, rtol=1e-4, atol=1e-4 * float(latent_volume.abs().max()))
    assert float(volume_coords.norm()) == pytest.approx(float(latent_volume.norm()), rel=1e-4)
    # a random vertex direction is mostly outside a rank-4 basis of a 512-dim latent: its norm shrinks
    g = torch.randn(placed.shape, generator=torch.Generator().manual_seed(8))
    assert float((basis @ g.flatten()).norm()) < 0.9 * float(pullback(g).norm())


def test_another_surface_gets_no_basis(generator, estimate):
    _, x0, sample = estimate
    assert latent_basis(generator.vae, x0, CFG, sample["verts"] + 1e-3, rank=RANK) is None
    assert latent_basis(generator.vae, x0, CFG, sample["verts"][:-1], rank=RANK) is None
    assert with_latent_basis(dict(sample, verts=sample["verts"] + 1e-3), generator.vae, x0, CFG, RANK) is None


def test_samples_with_bases_are_the_vertex_samples_plus_their_bases(samples):
    plain = gm.matching_samples(models.load_generator(), critic_shapes(3)[:1], [1, 3], CFG, SAMPLING, log=lambda m: None)
    for a, b in zip(plain, samples):
        for key in ("verts", "faces", "V", "t_verts"):
            assert torch.equal(a[key], b[key]), key
    for s in samples:
        assert s["basis"].dtype == torch.float16 and s["basis"].shape == (RANK, s["verts"].numel())
        assert torch.allclose(s["basis"].float() @ s["t_verts"].flatten(), s["t_latent"], rtol=2e-3,
                              atol=2e-3 * float(s["t_latent"].abs().max()))  # B stored in float16, t_latent from float32


def test_latent_cosine_of_a_critic_against_its_own_latent_gradient_is_one(samples):
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.CRITIC_FOLDER), dtype="float32",
                                       attn_implementation="eager")
    s = samples[2]
    _, own = gm.vertex_gradient(critic, s, CFG)
    mine = dict(s, t_latent=s["basis"].float() @ own.flatten())
    assert float(latent_cosine(critic, mine, CFG)[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(latent_cosine(NegatedCritic(critic), mine, CFG)[1]) == pytest.approx(-1.0, abs=1e-5)
    assert gm.phase_cosine(dict(space="latent")) is latent_cosine
    assert gm.phase_cosine(dict()) is gm.phase_cosine(dict(space="vertex")) is gm.matching_cosine
    with pytest.raises(ValueError, match="use 'vertex' or 'latent'"):
        gm.phase_cosine(dict(space="pixels"))


def test_a_latent_phase_raises_the_training_samples_latent_cosine(samples):
    """Measured: the 4 training samples' mean latent cosine -0.129 -> +0.219 (3 epochs, lr 1e-3)."""
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.CRITIC_FOLDER), dtype="float32",
                                       attn_implementation="eager")
    sizes = dict(gm.MATCHING, lr=1e-3, batch=2, held_share=0.34)
    train, _ = gm.held_out_split(samples, sizes["held_share"], np.random.default_rng(sizes["seed"]))
    before = np.mean([float(latent_cosine(critic, samples[k], CFG)[1]) for k in train])
    history = gm.train_phase(critic, samples, dict(epochs=3, space="latent"), sizes, CFG, log=lambda msg: None)
    after = np.mean([float(latent_cosine(critic, samples[k], CFG)[1]) for k in train])
    print(f"\ntraining samples' latent cosine {before:+.3f} -> {after:+.3f}; held out {[h['all'] for h in history]}")
    assert after > before + 0.1
    assert len(history) == 4


@pytest.mark.parametrize("recipe, message", [
    (dict(phases=[dict(epochs=1, space="pixels")]), "use 'vertex' or 'latent'"),
    (dict(basis_rank=None, phases=[dict(epochs=1, space="latent")]), "has a latent phase but no basis_rank"),
])
def test_a_recipe_the_command_cannot_train_is_refused_before_any_work(tmp_path, monkeypatch, capsys, recipe, message):
    monkeypatch.setattr(gm, "QUICK", dict(gm.QUICK, **recipe))
    with pytest.raises(SystemExit):
        gm.main(["--quick", "--work", str(tmp_path / "work")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
