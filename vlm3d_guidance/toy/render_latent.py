"""The critic's views of a latent, made exactly as the guided step makes them (no gradient)."""

from __future__ import annotations

import torch

from ..config import GuidanceConfig
from ..geometry import decode_surface
from ..render import orbit_cameras, render_views


@torch.no_grad()
def latent_views(vae, latent: torch.Tensor, cfg: GuidanceConfig, box_v: float = 1.01, mc_level: float = 0.0,
                 num_chunks: int = 20000):
    """``[N, 3, S, S]`` clay views in [0, 1] of the surface of ``latent [1, L, C]``, or None when empty.

    Same stages and arguments as :func:`~vlm3d_guidance.guidance.step.reward_and_gradient`:
    ``decode_surface`` at ``cfg.grid_resolution``, ``orbit_cameras`` from the config, ``render_views``.
    """
    (verts, faces), = decode_surface(vae, latent.float(), resolution=cfg.grid_resolution, box_v=box_v,
                                     mc_level=mc_level, num_chunks=num_chunks, coarse_to_fine=cfg.coarse_to_fine)
    if faces.shape[0] == 0:
        return None
    cams = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, device=latent.device,
                         bounds=box_v)
    return render_views(verts.float(), faces, cams, size=cfg.render_size, shading=cfg.shading,
                        backend=cfg.backend).clamp(0, 1)
