"""Decoding that follows the surface between steps; the shared k/v projection; the points cache."""

import pytest
import torch

from vlm3d_guidance.geometry import FieldGrid, decode_surface, extract_topology
from vlm3d_guidance.geometry.decode import shared_kv
from vlm3d_guidance.geometry.grid import cached_points
from vlm3d_guidance.geometry.track import SurfaceTrack, tracked_sdf


def _same_topology(a, b):
    return (torch.equal(a.edge_p0, b.edge_p0) and torch.equal(a.edge_p1, b.edge_p1)
            and torch.equal(a.center_edges, b.center_edges) and torch.equal(a.faces, b.faces))


def _decoder(field):
    asked = []

    def decode(flat):
        asked.append(flat.numel())
        return field.reshape(-1)[flat]

    return decode, asked


def _moving(grid, t, dtype=torch.float32):
    """A bumpy sphere that drifts and breathes a little with ``t`` (one step = a fraction of a cell)."""
    a = grid.axis(dtype=torch.float64)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    cx = 0.004 * t
    r = ((x - cx) ** 2 + y * y + z * z).sqrt()
    return (r - 0.55 - 0.003 * t - 0.05 * torch.sin(6 * x + 0.1 * t) * torch.sin(5 * y)).to(dtype)


def test_tracked_decode_equals_dense_at_a_tenth_of_the_queries():
    grid = FieldGrid(128)
    dense = grid.num_points ** 3
    track = SurfaceTrack()
    for t in range(4):
        field = _moving(grid, t)
        decode, asked = _decoder(field)
        sdf, known, topo = tracked_sdf(decode, grid, track)
        assert _same_topology(topo, extract_topology(field, grid))  # the dense grid's mesh
        assert torch.equal(sdf[known], field[known]) and sum(asked) == int(known.sum())
        assert track.last["queries"] == sum(asked)
        if t == 0:
            assert track.last["mode"] == "full" and track.last["reason"] == "first step"
        else:
            assert track.last["mode"] == "tracked", track.last
            assert sum(asked) <= 0.10 * dense, sum(asked) / dense
    assert len(track.history) == 4


def test_surface_leaving_the_band_is_detected_and_decoded_fully():
    grid = FieldGrid(64)
    a = grid.axis(dtype=torch.float64)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    sphere = (x * x + y * y + z * z).sqrt() - 0.5
    track = SurfaceTrack()
    tracked_sdf(_decoder(sphere)[0], grid, track)
    # (1) a new piece far from the band, bigger than a sentinel cell: the lattice sees it
    blob = ((x - 0.8) ** 2 + (y - 0.8) ** 2 + (z - 0.8) ** 2).sqrt() - 0.12
    field = torch.minimum(sphere, blob)
    _, _, topo = tracked_sdf(_decoder(field)[0], grid, track)
    assert track.last["mode"] == "full" and "sentinel" in track.last["reason"]
    assert _same_topology(topo, extract_topology(field, grid))
    # (2) the surface grows by several cells (out of the band, no lattice cell left alone)
    grown = (x * x + y * y + z * z).sqrt() - 0.5 - 5 * grid.spacing
    tracked_sdf(_decoder(sphere)[0], grid, track)
    _, _, topo = tracked_sdf(_decoder(grown)[0], grid, track)
    assert track.last["mode"] == "full" and track.last["reason"] is not None
    assert _same_topology(topo, extract_topology(grown, grid))
    # (3) a small move stays tracked; a different grid starts afresh
    moved = (x * x + y * y + z * z).sqrt() - 0.5 - 5.5 * grid.spacing
    tracked_sdf(_decoder(moved)[0], grid, track)
    assert track.last["mode"] == "tracked"
    tracked_sdf(_decoder(sphere[::2, ::2, ::2])[0], FieldGrid(32), track)
    assert track.last["reason"] == "grid changed"
    with pytest.raises(ValueError, match="stride"):
        SurfaceTrack(stride=3)


@pytest.fixture(scope="module")
def tiny_vae(tiny_root):
    from vlm3d_guidance.tiny import load_tiny_hunyuan_pipeline

    pipe = load_tiny_hunyuan_pipeline("standard", root=str(tiny_root))
    vae = pipe.vae.float().eval()
    vae.requires_grad_(False)
    x0 = torch.randn(1, vae.geo_decoder.cross_attn_decoder.attn.n_data or 64, vae.post_kl.in_features,
                     generator=torch.Generator().manual_seed(0))
    return vae, x0


def test_shared_kv_equals_stock_decoder_values_and_gradients(tiny_vae):
    vae, x0 = tiny_vae
    geo = vae.geo_decoder
    q = torch.rand(1, 700, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    xa = x0.clone().requires_grad_(True)
    ha = vae(xa / vae.scale_factor)
    stock = geo(queries=q, latents=ha)
    xb = x0.clone().requires_grad_(True)
    hb = vae(xb / vae.scale_factor)
    calls = []
    hook = geo.cross_attn_decoder.attn.c_kv.register_forward_hook(lambda *a: calls.append(1))
    try:
        with shared_kv(geo, hb):
            shared = torch.cat([geo(queries=q[:, s:s + 100], latents=hb) for s in range(0, 700, 100)], 1)
    finally:
        hook.remove()
    assert len(calls) == 1  # one projection for seven chunks
    assert torch.equal(shared, stock)
    w = torch.randn(stock.shape, generator=torch.Generator().manual_seed(2))
    (ga,) = torch.autograd.grad((stock * w).sum(), xa)
    (gb,) = torch.autograd.grad((shared * w).sum(), xb)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-7) and ga.abs().sum() > 0
    assert geo.cross_attn_decoder.attn.kv_cache is False and geo.cross_attn_decoder.attn.data is None


def test_tracked_decode_surface_on_tiny_model(tiny_vae):
    """Moving latents on the tiny ShapeVAE at 128^3: the dense mesh every step, <= 10 % of the dense
    queries after the first, and the k/v projection computed once per step."""
    vae, x0 = tiny_vae
    geo = vae.geo_decoder
    queries, kv_calls = [0], [0]
    h1 = geo.register_forward_hook(lambda m, a, k, out: queries.__setitem__(0, queries[0] + out.shape[1]),
                                   with_kwargs=True)
    h2 = geo.cross_attn_decoder.attn.c_kv.register_forward_hook(lambda *a: kv_calls.__setitem__(0, kv_calls[0] + 1))
    track = SurfaceTrack()
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    dense_q = 129 ** 3
    try:
        for t in range(2):
            x = (x0 + 0.02 * t * direction).requires_grad_(True)
            queries[0] = kv_calls[0] = 0
            (vt, ft), = decode_surface(vae, x, resolution=128, num_chunks=20000, tracks=[track])
            q_tracked, kv_tracked = queries[0], kv_calls[0]
            with torch.no_grad():
                (vd, fd), = decode_surface(vae, x.detach(), resolution=128, num_chunks=20000, share_kv=False)
            assert ft.shape[0] > 1000 and torch.equal(ft, fd)
            assert torch.equal(vt.detach(), vd)
            assert kv_tracked == 1
            if t:
                assert track.last["mode"] == "tracked", track.last
                # the no-grad field: <= 10 % of the dense grid's 129^3 queries; on top, both paths
                # re-decode the crossing edges' endpoints with gradients (about 2 per vertex)
                assert track.last["queries"] <= 0.10 * dense_q, track.last["queries"] / dense_q
                assert q_tracked - track.last["queries"] <= 2.2 * vt.shape[0]
    finally:
        h1.remove()
        h2.remove()


def test_points_cache():
    g = FieldGrid(16)
    a = cached_points(g, "cpu", torch.float32)
    assert cached_points(FieldGrid(16), torch.device("cpu"), torch.float32) is a
    assert torch.equal(a, g.points())
    b = cached_points(g, "cpu", torch.float64)
    assert b is not a and b.dtype == torch.float64 and torch.equal(b, g.points(dtype=torch.float64))
    assert cached_points(FieldGrid(16, 1.2), "cpu", torch.float32) is not a
