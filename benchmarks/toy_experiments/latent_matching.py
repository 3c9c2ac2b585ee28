"""Gradient matching in LATENT space: the cosine of the decoder-pulled-back gradients (eleventh session).

`toy.gradient_matching` matches the critic's VERTEX gradient g to the truth's t (``1 - cos(g, t)``).
Guidance steps along the LATENT gradient ``J^T g`` (``J = d placed verts / d x0``, the decoder and
marching cubes). The tenth session found the two disagree where it matters: the volume direction is a
small share of g and t in vertex space but the largest share of the latent step. The decoder's
Jacobian is nearly low-rank (on six estimates the top 16 of its 512 singular directions hold
98.4-99.8 % of ``|J|_F^2``, and the top 32 give the latent cosine within 0.006), so the latent
cosine can be trained without running the decoder: per sample, an orthonormal latent basis ``Q``
(``[512, k]``: a randomized range finder of ``J^T`` on ``k - 1`` Gaussian vertex probes, plus the
volume's latent gradient ``gv = J^T dV/dverts``, orthonormalised) and ``B = Q^T J^T`` (``[k, 3V]``, k
JVPs through the decoder by the double-backward trick) are stored; then ``B g`` are the latent
gradient's coordinates and the loss is ``1 - cos(B g, B t) + w_keep (r - r_start)^2``.

The eleventh session ran this as an experiment (its ``prep`` and ``train`` commands); the twelfth
moved both into the package: :mod:`vlm3d_guidance.toy.latent_basis` and the latent phase (phase 4)
of ``python -m vlm3d_guidance.toy.gradient_matching``, which made the shipped critic (L2 below)
from these samples. What stays here is the analysis:

    python latent_matching.py check CRITIC S1.pt [S2.pt ...]   # a critic's cosines on train_phase's held-out samples
    python latent_matching.py spectrum                  # the full decoder Jacobian of 6 estimates: is it low-rank?

(``S*.pt``: samples with bases, e.g. the command's cache ``samples_280_..._rank24.pt``; ``spectrum``
uses the package's matched critic, P4 when it was run.)

Measured (benchmarks/RESULTS.md, eleventh session): L2 (280 objects, 2 epochs) lowered the volume
bias and guided 13/64 to failure at lam 0.02, IoU 0.672; P4 at the same lam also 13/64, at IoU 0.658.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

from vlm3d_guidance.toy import gradient_matching as gm
from vlm3d_guidance.toy import models
from vlm3d_guidance.toy.latent_basis import BASIS_RANK, latent_basis

RANK = BASIS_RANK   # latent basis size (23 probes + the volume direction)


def load_samples(paths):
    rows = []
    for p in paths:
        rows.extend(torch.load(p, weights_only=False))
    return rows


def check(critic_folder, *paths):
    """Per step, on the samples train_phase holds out of ``paths`` (same split): mean vertex cosine,
    latent cosine, and the latent volume cosines (+ = grows) of the critic's and the truth's gradients."""
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.toy.config import TOY_GUIDANCE as cfg

    torch.set_num_threads(1)
    samples = load_samples(paths)
    _, held = gm.held_out_split(samples, gm.MATCHING["held_share"], np.random.default_rng(gm.MATCHING["seed"]))
    critic = VLMCritic.from_pretrained(critic_folder, device="cpu", dtype="float32")
    rows = {}
    for s in (samples[k] for k in held):
        _, g = gm.vertex_gradient(critic, s, cfg)
        gl = s["basis"].float() @ g.flatten()
        vol = s["volume_latent"]
        rows.setdefault(s["step"], []).append((
            float(F.cosine_similarity(g.flatten(), s["t_verts"].flatten(), dim=0)),
            float(F.cosine_similarity(gl, s["t_latent"], dim=0)),
            float(F.cosine_similarity(gl, vol, dim=0)), float(F.cosine_similarity(s["t_latent"], vol, dim=0))))
    print(f"{critic_folder}: {len(held)} held-out samples")
    print("step    n  vertex cos  latent cos  critic vol cos  truth vol cos")
    for k in sorted(rows):
        a = np.array(rows[k])
        print(f"{k:4d} {len(a):4d}  {a[:, 0].mean():+.3f}      {a[:, 1].mean():+.3f}      {a[:, 2].mean():+.3f}          {a[:, 3].mean():+.3f}")
    a = np.concatenate([np.array(v) for v in rows.values()])
    print(f" all {len(a):4d}  {a[:, 0].mean():+.3f}      {a[:, 1].mean():+.3f}      {a[:, 2].mean():+.3f}          {a[:, 3].mean():+.3f}")


def spectrum():
    """The full ``J`` (512 JVPs) at steps 2/12/22 of critic-split objects 0 and 3's stock runs: the
    share of ``|J|_F^2`` in the top k singular directions, the latent cosine of P4's and the truth's
    gradients restricted to them against the exact one, and the rank-:data:`RANK` basis's cosine."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.geometry import as_stock_export, decode_surface
    from vlm3d_guidance.toy.config import TOY_GUIDANCE as cfg
    from vlm3d_guidance.toy.config import TOY_SAMPLING
    from vlm3d_guidance.toy.critic_training import recorded_estimates
    from vlm3d_guidance.toy.references import render_reference
    from vlm3d_guidance.toy.train import ROLLOUT_SEED, critic_shapes

    torch.set_num_threads(1)
    pipe = models.load_generator(models.WEIGHTS_DIR)
    critic = VLMCritic.from_pretrained(str(models.WEIGHTS_DIR / models.MATCHED_CRITIC_FOLDER), device="cpu", dtype="float32")
    sampling = {k: v for k, v in TOY_SAMPLING.items() if k != "octree_resolution"}

    def cos(a, b):
        return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))

    shapes = critic_shapes(4)
    for i in (0, 3):
        obj = shapes[i][0]
        with recorded_estimates(pipe) as estimates:
            pipe(image=render_reference(obj), generator=torch.Generator().manual_seed(ROLLOUT_SEED + i),
                 enable_pbar=False, output_type="latent", **sampling)
        for step in (2, 12, 22):
            x0 = estimates[step][1]
            sample = gm.matching_sample(obj, x0, pipe.vae, cfg)
            with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
                leaf = x0.float().clone().requires_grad_(True)
                (verts, _), = decode_surface(pipe.vae, leaf, resolution=cfg.grid_resolution, box_v=1.01, mc_level=0.0,
                                             num_chunks=20000, coarse_to_fine=cfg.coarse_to_fine)
                placed = as_stock_export(verts.float(), 64, 1.01)
                w = torch.zeros_like(placed, requires_grad=True)
                (u,) = torch.autograd.grad(placed, leaf, w, create_graph=True)
                eye = torch.eye(leaf.numel()).reshape((leaf.numel(),) + leaf.shape)
                (jac,) = torch.autograd.grad(u, w, eye, is_grads_batched=True)
            jac = jac.reshape(leaf.numel(), -1)  # row a: d placed / d x0_a, so J^T g = jac @ g
            _, g = gm.vertex_gradient(critic, sample, cfg)
            g, t = g.flatten(), sample["t_verts"].flatten()
            _, sv, vh = torch.linalg.svd(jac, full_matrices=False)
            energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
            cells = [f"k {k}: {float(energy[k - 1]):.3f} of |J|^2, cos {cos(sv[:k, None] * vh[:k] @ g, sv[:k, None] * vh[:k] @ t):+.3f}"
                     for k in (8, 16, 32)]
            basis, _ = latent_basis(pipe.vae, x0, cfg, sample["verts"])
            print(f"{obj.cls} step {step}: V {placed.shape[0]}; latent cos exact {cos(jac @ g, jac @ t):+.3f}, "
                  f"rank-{RANK} basis {cos(basis @ g, basis @ t):+.3f}; vertex cos {cos(g, t):+.3f}; " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    {"check": check, "spectrum": spectrum}[sys.argv[1]](*sys.argv[2:])
