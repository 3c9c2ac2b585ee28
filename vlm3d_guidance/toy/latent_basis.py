"""Latent-space gradient matching: the decoder's pull-back of a vertex gradient, in a small stored basis.

Guidance steps along the LATENT gradient ``J^T g`` (``J = d placed verts / d x0``: the VAE decoder,
marching cubes and the export's placement; ``g`` a reward's vertex gradient ``[V, 3]``), not along
``g``. Matching ``cos(g, t)`` (:mod:`.gradient_matching`'s vertex phases) therefore weighs vertex
directions the decoder hardly moves as much as those it moves most; the volume direction is a small
share of ``g`` and ``t`` but the largest share of the latent step (benchmarks/RESULTS.md, tenth and
eleventh sessions). A latent phase matches ``cos(J^T g, J^T t)`` instead.

``J`` is nearly low-rank (on six toy estimates the top 16 of its 512 singular directions hold
98.4-99.8 % of ``|J|_F^2``), so each sample stores ``B = Q^T J^T`` (``[k, 3V]``), ``Q`` (``[512, k]``)
an orthonormal basis of a randomized range finder of ``J^T``: ``k - 1`` Gaussian vertex probes and
the volume's latent gradient ``J^T dVol/dverts``. Then ``B g`` are the coordinates of ``J^T g`` in
``Q`` and the loss needs no decoder: ``1 - cos(B g, B t)``. At ``k = 24`` that cosine was within
0.024 of the exact one on the six estimates.

Conventions: vertices are the PLACED surface (``as_stock_export``: where the 64^3 export puts it),
flattened row-major (``[V, 3] -> [3V]``, vertex-major); latents ``x0 [1, L, C]`` flatten the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: probes per sample of the shipped recipe: 23 Gaussian + the volume direction
BASIS_RANK = 24


def latent_basis(vae, x0: torch.Tensor, cfg, verts_expected: torch.Tensor, export_resolution: int = 64,
                 rank: int = BASIS_RANK, seed: int = 0):
    """``(B [rank, 3V] float32, volume_coords [rank])`` for the clean estimate ``x0 [1, L, C]``.

    ``B = Q^T J^T`` maps a vertex gradient of the surface ``verts_expected [V, 3]`` (placed, as
    :func:`~vlm3d_guidance.toy.gradient_matching.matching_sample` stores it) to the coordinates of its
    latent gradient in the orthonormal latent basis ``Q [L*C, rank]``; ``volume_coords = B dVol/dverts``.
    The probes are the same for every sample (``seed``). Returns None when the surface re-extracted
    here differs from ``verts_expected`` (then ``B`` would describe another surface).

    ``J q`` needs a forward-mode product; it is the double-backward trick (``u = J^T w`` is linear in
    ``w``, so ``d<u, q>/dw = J q``), under math attention, whose double backward exists on CPU.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..geometry import as_stock_export, decode_surface, mesh_volume

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        leaf = x0.float().clone().requires_grad_(True)
        (verts, faces), = decode_surface(vae, leaf, resolution=cfg.grid_resolution, box_v=1.01, mc_level=0.0,
                                         num_chunks=20000, coarse_to_fine=cfg.coarse_to_fine)
        placed = as_stock_export(verts.float(), export_resolution, 1.01)
        if placed.shape != verts_expected.shape or float((placed.detach() - verts_expected).abs().max()) > 1e-4:
            return None
        pv = placed.detach().requires_grad_(True)
        (volume_grad,) = torch.autograd.grad(mesh_volume(pv, faces), pv)
        gen = torch.Generator().manual_seed(seed)
        probes = [torch.randn(placed.shape, generator=gen) for _ in range(rank - 1)] + [volume_grad]
        columns = [torch.autograd.grad(placed, leaf, p, retain_graph=True)[0].flatten() for p in probes]  # J^T p
        q, _ = torch.linalg.qr(torch.stack(columns, 1))
        w = torch.zeros_like(placed, requires_grad=True)
        (u,) = torch.autograd.grad(placed, leaf, w, create_graph=True)
        rows = [torch.autograd.grad(u, w, q[:, i].reshape(leaf.shape), retain_graph=True)[0].flatten()
                for i in range(rank)]
    basis = torch.stack(rows).detach()
    return basis, basis @ volume_grad.flatten()


def with_latent_basis(sample: dict, vae, x0: torch.Tensor, cfg, rank: int = BASIS_RANK) -> dict | None:
    """The matching ``sample`` with ``basis`` (``B``, float16 ``[rank, 3V]``), ``t_latent [rank]``
    (``B t``, the truth's latent gradient, from the float32 ``B``) and ``volume_latent [rank]`` added;
    None when :func:`latent_basis` finds another surface."""
    made = latent_basis(vae, x0, cfg, sample["verts"], rank=rank)
    if made is None:
        return None
    basis, volume = made
    return dict(sample, basis=basis.half(), t_latent=basis @ sample["t_verts"].flatten(), volume_latent=volume)


def latent_cosine(critic, sample: dict, cfg, create_graph: bool = False):
    """``(r, cos(B g, B t))``: the critic's reward and the cosine of its latent gradient with the
    truth's, in the sample's basis (``g`` from :func:`~.gradient_matching.vertex_gradient`)."""
    from .gradient_matching import vertex_gradient

    reward, grad = vertex_gradient(critic, sample, cfg, create_graph)
    return reward, F.cosine_similarity(sample["basis"].float() @ grad.flatten(), sample["t_latent"], dim=0)
