"""The critic's views of a latent, made exactly as the guided step makes them (no gradient)."""

from __future__ import annotations

import torch

from ..config import GuidanceConfig
from ..geometry import decode_surface
from ..geometry.grid import as_stock_export
from ..render import render_views
from ..render.cameras import fit_to_points


@torch.no_grad()
def latent_surface(vae, latent: torch.Tensor, cfg: GuidanceConfig, export_resolution: int | None,
                   box_v: float = 1.01, mc_level: float = 0.0, num_chunks: int = 20000):
    """``(verts [V, 3] float32, faces [F, 3] long)`` the guided step renders for ``latent [1, L, C]``,
    or None when the field has no surface.

    ``decode_surface`` at ``cfg.grid_resolution`` (and ``cfg.coarse_to_fine``), the vertices placed
    where hy3dgen's extractor puts an export of ``export_resolution`` (:func:`as_stock_export`;
    None: left in the decode grid's placement).
    """
    (verts, faces), = decode_surface(vae, latent.float(), resolution=cfg.grid_resolution, box_v=box_v,
                                     mc_level=mc_level, num_chunks=num_chunks, coarse_to_fine=cfg.coarse_to_fine)
    if faces.shape[0] == 0:
        return None
    verts = verts.float()
    return (verts if export_resolution is None else as_stock_export(verts, export_resolution, box_v)), faces


@torch.no_grad()
def surface_views(verts: torch.Tensor, faces: torch.Tensor, cfg: GuidanceConfig, box_v: float = 1.01,
                  azimuth_offset: float = 0.0):
    """``[N, 3, S, S]`` clay views in [0, 1] of a placed surface: the config's orbit cameras (turned
    by ``azimuth_offset`` degrees) fitted to it (``cfg.fill``), ``render_views`` at ``cfg.render_size``."""
    cams = cfg.cameras(box_v, verts.device, azimuth_offset)
    if cfg.fill is not None:
        cams = fit_to_points(cams, verts, cfg.fill)
    return render_views(verts, faces, cams, size=cfg.render_size, shading=cfg.shading,
                        backend=cfg.backend).clamp(0, 1)


@torch.no_grad()
def latent_views(vae, latent: torch.Tensor, cfg: GuidanceConfig, export_resolution: int | None, box_v: float = 1.01,
                 mc_level: float = 0.0, num_chunks: int = 20000):
    """``[N, 3, S, S]`` clay views in [0, 1] of the surface of ``latent [1, L, C]``, or None when empty.

    The stages and arguments of :func:`~vlm3d_guidance.guidance.step.reward_and_gradient` in the
    pipeline: :func:`latent_surface` then :func:`surface_views` (tests/test_toy_world.py checks
    equality with the guided step's images).
    """
    surface = latent_surface(vae, latent, cfg, export_resolution, box_v, mc_level, num_chunks)
    return None if surface is None else surface_views(*surface, cfg, box_v=box_v)
