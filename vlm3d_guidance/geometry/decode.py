"""Hunyuan latent -> field on a grid (dense, no grad) and -> mesh (sparse, differentiable).

hy3dgen's VAE decodes ``h = vae(x0 / vae.scale_factor)`` (post-KL + transformer), then
``vae.geo_decoder(queries=[B, Q, 3], latents=h) -> [B, Q, 1]``, a field POSITIVE inside with the
surface at ``mc_level``. We convert it exactly once, here, to the package's SDF convention:

    sdf = mc_level - field        # negative inside, surface at 0

The grid is :class:`~.grid.FieldGrid` ``(resolution, box_v)``: ``resolution + 1`` points per axis on
``[-box_v, box_v]`` -- the same points as hy3dgen's ``VanillaVolumeDecoder`` with
``octree_resolution=resolution, bounds=box_v`` (see grid.py for the stock extractor's off-by-one that
we do not copy).

:func:`decode_surface` only pays autograd memory for the surface: the dense grid is decoded without
gradients (chunked), marching cubes takes its topology from it, and then only the two grid points of
every crossing edge (about two per vertex) are decoded again WITH gradients through ``geo_decoder``
and ``h``; vertices are interpolated from those values (marching_cubes.MCTopology.vertices). The
result equals marching cubes on a densely-decoded-with-grad field, values and gradients.

The latents' key/value projection of ``geo_decoder``'s cross-attention does not depend on the
queries, so :func:`shared_kv` computes it once per call (with the module's own ``ln_2`` and
``c_kv`` layers) and hands it to the module's own ``kv_cache`` slot; every chunk then reuses it,
the no-grad passes as a detached copy. The output is the stock module's, bit for bit.
"""

from __future__ import annotations

import contextlib

import torch

from . import device as _device
from .adaptive import coarse_to_fine_sdf
from .grid import FieldGrid, cached_points
from .marching_cubes import extract_topology, finite_endpoints

SHARE_KV = True  # default of decode_surface(share_kv=None); benchmarks switch it off for "before"
GPU_CHUNK = 1 << 16  # query points per geo_decoder call on a GPU at least (not measured here: no GPU)


def _kv_slot(geo_decoder):
    """``(attention module, block)`` whose ``kv_cache``/``data`` slot can hold the latents' k/v, or
    None for decoders without that structure (then nothing is shared)."""
    block = getattr(geo_decoder, "cross_attn_decoder", None)
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "kv_cache") or not hasattr(attn, "c_kv") or not hasattr(block, "ln_2"):
        return None
    return attn, block


@contextlib.contextmanager
def shared_kv(geo_decoder, h: torch.Tensor, enabled: bool = True):
    """While active, ``geo_decoder(queries=..., latents=h)`` reuses one k/v projection of ``h``.

    The projection is ``c_kv(ln_2(latents_proj(h) if downsampled else h))``, computed here once by
    the module's own layers in the current grad mode, and placed in the attention's own
    ``kv_cache`` slot (restored on exit). Only valid for calls with these very latents ``h``.
    Yields a function ``detached()`` that switches the slot to a detached copy (for no-grad passes)
    and back (``detached(False)``)."""
    slot = _kv_slot(geo_decoder) if enabled else None
    if slot is None:
        yield lambda on=True: None
        return
    attn, block = slot
    lat = geo_decoder.latents_proj(h) if getattr(geo_decoder, "downsample_ratio", 1) != 1 else h
    kv = attn.c_kv(block.ln_2(lat))
    saved = (attn.kv_cache, attn.data)
    attn.kv_cache, attn.data = True, kv

    def detached(on: bool = True):
        attn.data = kv.detach() if on else kv

    try:
        yield detached
    finally:
        attn.kv_cache, attn.data = saved


def chunk_size(num_chunks: int, device) -> int:
    """Points per decoder call: ``num_chunks``, at least :data:`GPU_CHUNK` on a GPU."""
    return max(int(num_chunks), GPU_CHUNK) if torch.device(device).type == "cuda" else int(num_chunks)


def _latent_tokens(vae, x0: torch.Tensor) -> torch.Tensor:
    """``h = vae(x0 / vae.scale_factor)`` -- ``[B, L, width]``, with whatever grad mode is active."""
    return vae(x0 / vae.scale_factor)


def _decode_points(vae, h: torch.Tensor, pts: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``geo_decoder`` at ``pts [P, 3]`` for every batch row of ``h``: ``[B, P]`` (grad mode as set)."""
    out = []
    b = h.shape[0]
    num_chunks = chunk_size(num_chunks, h.device)
    for s in range(0, pts.shape[0], num_chunks):
        q = pts[s: s + num_chunks].unsqueeze(0).expand(b, -1, -1)
        out.append(vae.geo_decoder(queries=q, latents=h)[..., 0])
    if not out:
        return h.new_zeros(b, 0)
    return torch.cat(out, dim=1)


def _field_to_sdf(field: torch.Tensor, mc_level: float) -> torch.Tensor:
    """Hunyuan field (positive inside, level ``mc_level``) -> SDF (negative inside, level 0)."""
    return mc_level - field


@torch.no_grad()
def _dense_sdf(vae, h: torch.Tensor, grid: FieldGrid, mc_level: float, num_chunks: int):
    pts = cached_points(grid, h.device, h.dtype)
    field = _decode_points(vae, h, pts, num_chunks)
    field = field.to(torch.promote_types(field.dtype, torch.float32))
    sdf = _field_to_sdf(field, mc_level).reshape(h.shape[0], *grid.shape)
    bad = torch.isnan(sdf)
    # NaN (unknown cells of hierarchical decoders) -> outside; off the CPU without reading the
    # device (the replacement is computed whether or not there is a NaN)
    if not _device.host_reads_are_free(sdf.device) or bool(bad.any()):
        big = torch.nan_to_num(sdf.abs(), nan=0.0, posinf=0.0).amax().clamp_min(1e-6)
        sdf = torch.where(bad, big, sdf)
    return sdf


@torch.no_grad()
def _row_sdf(vae, hb: torch.Tensor, grid: FieldGrid, mc_level: float, num_chunks: int,
             coarse_to_fine: bool, track):
    """One batch row's no-grad SDF ``[N, N, N]`` and topology: dense, coarse-to-fine, or following
    ``track``'s surface (:func:`~.track.tracked_sdf`)."""
    if track is None and not coarse_to_fine:
        sdf = _dense_sdf(vae, hb, grid, mc_level, num_chunks)[0]
        return sdf, extract_topology(sdf, grid, 0.0)
    from .track import tracked_sdf

    dtype = torch.promote_types(hb.dtype, torch.float32)

    def decode(flat):
        pts = grid.points_at(flat.to(hb.device), hb.dtype)
        return _field_to_sdf(_decode_points(vae, hb, pts, num_chunks)[0].to(dtype), mc_level)

    if track is not None:
        sdf, _, topo = tracked_sdf(decode, grid, track, device=hb.device, dtype=dtype)
    else:
        sdf, _, topo = coarse_to_fine_sdf(decode, grid, device=hb.device, dtype=dtype)
    return sdf, topo


def decode_field(vae, x0: torch.Tensor, resolution: int = 64, box_v: float = 1.01,
                 mc_level: float = 0.0, num_chunks: int = 8000) -> torch.Tensor:
    """Dense SDF grid from a clean latent, without gradients.

    Args:
        vae: hy3dgen ``ShapeVAE`` (anything with ``__call__``, ``scale_factor``, ``geo_decoder``).
        x0: ``[B, L, C]`` clean latent (as the DiT produces it, before ``1 / scale_factor``).
        resolution: cells per axis; the grid has ``resolution + 1`` points per axis.
        box_v: half extent of the box ``[-box_v, box_v]^3``.
        mc_level: hy3dgen's iso level of the raw field.
        num_chunks: query points per ``geo_decoder`` call (bounds memory).

    Returns:
        ``[B, R, R, R]`` (float32, or float64 for a float64 model) with ``R = resolution + 1``, axis order x, y, z, NEGATIVE inside,
        surface at 0 (``sdf = mc_level - field``); NaN replaced by an outside value.
    """
    grid = FieldGrid(resolution, box_v)
    with torch.no_grad():
        h = _latent_tokens(vae, x0)
        return _dense_sdf(vae, h, grid, mc_level, num_chunks)


def decode_surface(vae, x0: torch.Tensor, resolution: int = 64, box_v: float = 1.01,
                   mc_level: float = 0.0, num_chunks: int = 8000, return_sdf: bool = False,
                   coarse_to_fine: bool = False, tracks=None, share_kv: bool | None = None):
    """Meshes from a clean latent whose vertices are differentiable w.r.t. ``x0``.

    Args: as :func:`decode_field`, plus
        coarse_to_fine: decode the no-grad grid only near the surface
            (:func:`~.adaptive.coarse_to_fine_sdf`: the coarse lattice, the band around its sign
            changes, then every crossed cube completed; needs an even ``resolution``). Same mesh as
            the dense grid wherever the surface touches the band, at a fraction of the decoder
            queries; it can miss a piece thinner than two grid cells that no coarse point sees.
        tracks: optional list of ``B`` :class:`~.track.SurfaceTrack` (or None entries): decode each
            row around its previous surface (:func:`~.track.tracked_sdf`; a full coarse-to-fine
            decode on the first call and whenever the surface leaves the band); updated in place.
        share_kv: compute the latents' k/v projection once per row (:func:`shared_kv`); None:
            :data:`SHARE_KV` (True).

    Returns:
        list of ``B`` pairs ``(verts [V, 3] world coords, faces [F, 3] long)`` (outward winding,
        empty ``(0, 3)`` tensors where the field has no surface). Vertex dtype is ``h``'s dtype
        promoted to at least float32. With ``return_sdf=True`` also the no-grad SDF
        ``[B, R, R, R]`` used for the topology: ``(meshes, sdf)``.
    """
    grid = FieldGrid(resolution, box_v)
    h = _latent_tokens(vae, x0)  # WITH grad (if enabled): [B, L, W]
    if tracks is not None and len(tracks) != h.shape[0]:
        raise ValueError(f"got {len(tracks)} surface tracks for a batch of {h.shape[0]}; pass one per row")
    vdtype = torch.promote_types(h.dtype, torch.float32)
    share_kv = SHARE_KV if share_kv is None else share_kv
    meshes, sdfs = [], []
    for b in range(h.shape[0]):
        hb = h[b: b + 1]
        with shared_kv(vae.geo_decoder, hb, share_kv) as detached:
            detached(True)
            sdf, topo = _row_sdf(vae, hb.detach(), grid, mc_level, num_chunks, coarse_to_fine,
                                 None if tracks is None else tracks[b])
            detached(False)
            sdfs.append(sdf)
            if topo.is_empty:
                meshes.append((torch.zeros(0, 3, dtype=vdtype, device=h.device),
                               torch.zeros(0, 3, dtype=torch.long, device=h.device)))
                continue
            flat, inv0, inv1 = topo.endpoints()
            pts = grid.points_at(flat.to(h.device), h.dtype)
            s = _field_to_sdf(_decode_points(vae, hb, pts, num_chunks)[0].to(vdtype), mc_level)
        s = finite_endpoints(s, topo.outside_value)
        inv0, inv1 = inv0.to(h.device), inv1.to(h.device)
        verts = topo.vertices(s[inv0], s[inv1], 0.0)
        meshes.append((verts, topo.faces.to(h.device)))
    return (meshes, torch.stack(sdfs)) if return_sdf else meshes
