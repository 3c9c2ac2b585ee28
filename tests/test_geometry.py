"""Geometry: grid mapping, differentiable marching cubes, dense/sparse decoding of a tiny REAL ShapeVAE."""
import math

import numpy as np
import pytest
import torch
import trimesh

from vlm3d_guidance.geometry import FieldGrid, decode_field, decode_surface, extract_topology, marching_cubes


def sphere_sdf(n, r=0.7, center=(0.0, 0.0, 0.0), box=1.01, dtype=torch.float64):
    a = torch.linspace(-box, box, n, dtype=dtype)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    c = center
    return ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2).sqrt() - r


def tm(v, f):
    return trimesh.Trimesh(v.detach().numpy(), f.numpy(), process=False)


def test_grid_matches_stock_points():
    from hy3dgen.shapegen.models.autoencoders.volume_decoders import generate_dense_grid_points

    g = FieldGrid(16, 1.01)
    xyz, size, _ = generate_dense_grid_points(np.array([-1.01] * 3), np.array([1.01] * 3), 16, indexing="ij")
    assert size == [17, 17, 17] and g.shape == (17, 17, 17)
    assert torch.equal(g.points(), torch.from_numpy(xyz).reshape(-1, 3))
    flat = torch.tensor([0, 5, 17 ** 3 - 1, 1234])
    assert torch.equal(g.points_at(flat), g.points()[flat])
    assert torch.equal(g.linear_index(g.unravel(flat)), flat)
    assert g.index_to_world(torch.tensor([16.0, 0.0, 8.0])).tolist() == pytest.approx([1.01, -1.01, 0.0])


@pytest.mark.parametrize("n", [65, 129])
def test_sphere_watertight_outward_volume(n):
    v, f = marching_cubes(sphere_sdf(n), bounds=(-1.01, 1.01))
    m = tm(v, f)
    assert f.dtype == torch.long and v.shape[1] == 3
    assert m.is_watertight and m.is_winding_consistent
    vol = 4.0 / 3.0 * math.pi * 0.7 ** 3
    assert m.volume > 0  # outward winding
    assert abs(m.volume / vol - 1) < 5e-3
    # vertices lie on the sphere to within interpolation error, and are welded (Euler: sphere genus 0)
    assert (v.norm(dim=1) - 0.7).abs().max() < 2.02 / (n - 1) * 0.1
    assert len(v) - len(m.edges_unique) + len(f) == 2


def test_vertex_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    base = sphere_sdf(12, r=0.6) + 0.05 * torch.randn(12, 12, 12, generator=g, dtype=torch.float64)
    sdf = base.clone().requires_grad_(True)
    v, f = marching_cubes(sdf)
    w = torch.randn(v.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((v * w).sum(), sdf)
    nz = torch.nonzero(grad.reshape(-1)).squeeze(1)
    assert nz.numel() > 50
    idx = nz[torch.randperm(nz.numel(), generator=g)[:40]]
    h = 1e-6
    for i in idx.tolist():
        vals = []
        for sgn in (1, -1):
            p = base.clone().reshape(-1)
            p[i] += sgn * h
            vp, fp = marching_cubes(p.reshape(base.shape))
            assert torch.equal(fp, f)  # the perturbation keeps the topology
            vals.append((vp * w).sum())
        fd = (vals[0] - vals[1]) / (2 * h)
        assert abs(fd - grad.reshape(-1)[i]) <= 1e-6 * max(abs(fd), 1e-3)


def test_no_gradient_away_from_surface():
    sdf = sphere_sdf(33, r=0.5).requires_grad_(True)
    v, f = marching_cubes(sdf)
    (grad,) = torch.autograd.grad(v.sum() + v.norm(), sdf)
    s = sdf.detach()
    crossing = torch.zeros_like(s, dtype=torch.bool)
    for d in range(3):
        a, b = s.narrow(d, 0, 32), s.narrow(d, 1, 32)
        x = (a < 0) != (b < 0)
        crossing.narrow(d, 0, 32).logical_or_(x)
        crossing.narrow(d, 1, 32).logical_or_(x)
    assert (grad[~crossing] == 0).all()
    assert (grad[crossing] != 0).float().mean() > 0.9


def test_empty_and_exact_iso_and_nan():
    v, f = marching_cubes(torch.ones(8, 8, 8))
    assert v.shape == (0, 3) and f.shape == (0, 3) and f.dtype == torch.long
    v, f = marching_cubes(-torch.ones(8, 8, 8))
    assert v.shape == (0, 3)
    # many values exactly on the iso level (vertices on grid points): still welded and watertight
    s = torch.round(sphere_sdf(33, r=0.6) * 8) / 8
    assert (s == 0).sum() > 50
    v, f = marching_cubes(s)
    assert tm(v, f).is_watertight and tm(v, f).volume > 0
    # NaN counts as outside: a NaN inside the sphere opens an inner surface around it, exactly as an
    # outside value there would
    s = sphere_sdf(33, r=0.5)
    v_clean, f_clean = marching_cubes(s)
    s[16, 16, 16] = float("nan")  # deep inside: changes the surface
    s[14, 18, 16] = float("nan")
    v, f = marching_cubes(s)
    ref = s.clone()
    ref[torch.isnan(ref)] = 0.25  # an ordinary outside value at the same points
    v_ref, f_ref = marching_cubes(ref)
    assert torch.isfinite(v).all() and tm(v, f).is_watertight
    assert f.shape[0] > f_clean.shape[0] and len(tm(v, f).split(only_watertight=False)) == 3
    assert torch.equal(f, f_ref)  # the same surface; only the vertices next to the NaNs move (by their value)
    moved = (v - v_ref).norm(dim=1) > 1e-12
    assert 0 < int(moved.sum()) <= 12 and float((v - v_ref).abs().max()) < 0.05


def test_random_field_watertight_with_centre_vertices():
    g = torch.Generator().manual_seed(1)
    r = torch.nn.functional.pad(torch.randn(20, 20, 20, generator=g, dtype=torch.float64), (1,) * 6, value=1.0)
    topo = extract_topology(r, FieldGrid(21))
    assert topo.center_edges.shape[0] > 0  # Lewiner's ambiguous cases are exercised
    v, f = marching_cubes(r)
    assert tm(v, f).is_watertight
    # centre vertices lie inside their cubes
    cube_min = torch.floor(FieldGrid(21).world_to_index(v[topo.edge_p0.shape[0]:]))
    assert (FieldGrid(21).world_to_index(v[topo.edge_p0.shape[0]:]) - cube_min).gt(0).all()


@pytest.fixture(scope="module")
def tiny_vae():
    from hy3dgen.shapegen.models.autoencoders.model import ShapeVAE

    torch.manual_seed(0)
    # num_freqs=2: a random decoder with the stock 8 frequencies gives a field that is noise at the grid
    # scale (surface through most grid points); trained decoders are smooth, like this one
    vae = ShapeVAE(num_latents=64, embed_dim=8, width=32, heads=2, num_decoder_layers=1, num_freqs=2)
    vae = vae.eval().double()
    x0 = torch.randn(2, 64, 8, dtype=torch.float64)
    # shape the random field so the stock level 0 cuts a surface (about half the box inside)
    with torch.no_grad():
        sdf = decode_field(vae, x0, resolution=12)
        vae.geo_decoder.output_proj.bias += sdf.median()
    return vae, x0


def test_decode_field_matches_stock_decoder(tiny_vae):
    from hy3dgen.shapegen.models.autoencoders.volume_decoders import VanillaVolumeDecoder

    vae, x0 = tiny_vae
    with torch.no_grad():
        ref = VanillaVolumeDecoder()(vae(x0 / vae.scale_factor), vae.geo_decoder, bounds=1.01,
                                     octree_resolution=12, num_chunks=500, enable_pbar=False)
    sdf = decode_field(vae, x0, resolution=12, mc_level=0.1, num_chunks=300)
    assert sdf.shape == (2, 13, 13, 13)
    # the stock decoder returns float32 (`.float()`); same points, same values up to that rounding
    assert ref.dtype == torch.float32
    assert (sdf - (0.1 - ref.double())).abs().max() < 1e-6
    frac_inside = (sdf < 0).double().mean()
    assert 0.2 < frac_inside < 0.8


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_sparse_decode_equals_dense_with_grad(tiny_vae):
    vae, x0 = tiny_vae
    R = 24
    g = torch.Generator().manual_seed(3)
    xs = x0.clone().requires_grad_(True)
    meshes, sparse_bytes = _saved_bytes(lambda: decode_surface(vae, xs, resolution=R, num_chunks=2000))
    xd = x0.clone().requires_grad_(True)

    def dense():
        h = vae(xd / vae.scale_factor)
        pts = FieldGrid(R).points(dtype=torch.float64)
        field = vae.geo_decoder(queries=pts[None].expand(2, -1, -1), latents=h)[..., 0]
        return [marching_cubes((0.0 - field[b]).reshape(R + 1, R + 1, R + 1)) for b in range(2)]

    dmeshes, dense_bytes = _saved_bytes(dense)
    loss_s, loss_d = 0.0, 0.0
    for (vs, fs), (vd, fd) in zip(meshes, dmeshes):
        assert vs.shape[0] > 100 and torch.equal(fs, fd)
        assert (vs - vd).abs().max() < 1e-12
        w = torch.randn(vs.shape, generator=g, dtype=torch.float64)
        loss_s = loss_s + (vs * w).sum()
        loss_d = loss_d + (vd * w).sum()
    (gs,) = torch.autograd.grad(loss_s, xs)
    (gd,) = torch.autograd.grad(loss_d, xd)
    assert gs.abs().max() > 0
    assert (gs - gd).norm() / gd.norm() < 1e-10
    assert sparse_bytes < 0.5 * dense_bytes, (sparse_bytes, dense_bytes)


def test_decode_surface_empty(tiny_vae):
    vae, x0 = tiny_vae
    meshes = decode_surface(vae, x0, resolution=8, mc_level=-1e6)  # nothing is inside
    assert all(v.shape == (0, 3) and f.shape == (0, 3) for v, f in meshes)


# ----------------------------------------------------------------------------- coarse-to-fine decoding

def _field_decoder(field: torch.Tensor):
    """``decode(flat)`` over a precomputed field, counting the points asked for."""
    asked = []

    def decode(flat):
        asked.append(flat.numel())
        return field.reshape(-1)[flat]

    return decode, asked


def _same_topology(a, b):
    return (torch.equal(a.edge_p0, b.edge_p0) and torch.equal(a.edge_p1, b.edge_p1)
            and torch.equal(a.center_edges, b.center_edges) and torch.equal(a.faces, b.faces))


def test_coarse_to_fine_on_analytic_fields():
    from vlm3d_guidance.geometry.adaptive import coarse_to_fine_sdf

    R = 48
    grid = FieldGrid(R)
    a = grid.axis(dtype=torch.float64)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    bumpy = (x * x + y * y + z * z).sqrt() - 0.6 - 0.05 * torch.sin(6 * x) * torch.sin(5 * y)
    # (1) a bumpy sphere: every decoded value is the field's, the topology is the dense one's
    decode, asked = _field_decoder(bumpy)
    sdf, known, topo = coarse_to_fine_sdf(decode, grid, dtype=torch.float64)
    assert torch.equal(sdf[known], bumpy[known]) and sum(asked) == int(known.sum())
    assert _same_topology(topo, extract_topology(bumpy, grid))
    assert known.double().mean() < 0.45, float(known.double().mean())
    # (2) a plate through the odd grid row y = 3h only (between coarse points), reaching far beyond
    #     the sphere: the coarse lattice never sees it, but it touches the band, and step 3 follows
    #     it cube by cube
    h = grid.spacing
    plate = torch.maximum((y - 3 * h).abs() - 0.6 * h, torch.maximum(x.abs(), z.abs()) - 0.95)
    field = torch.minimum(bumpy, plate)
    assert (field[::2, ::2, ::2] < 0).sum() == (bumpy[::2, ::2, ::2] < 0).sum()  # invisible to the coarse grid
    decode, asked = _field_decoder(field)
    sdf, known, topo = coarse_to_fine_sdf(decode, grid, dtype=torch.float64)
    assert _same_topology(topo, extract_topology(field, grid))
    assert len(asked) > 5  # it took several growth rounds
    # (3) what it cannot see: a blob smaller than a coarse cell, between coarse points, away from
    #     everything else, is missed (the dense grid finds it)
    c = grid.axis(dtype=torch.float64)[41]  # an odd index, far from the sphere: only (41, 41, 41) is inside
    blob = ((x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2).sqrt() - 0.6 * h
    with_blob = torch.minimum(bumpy, blob)
    decode, _ = _field_decoder(with_blob)
    _, _, topo = coarse_to_fine_sdf(decode, grid, dtype=torch.float64)
    assert _same_topology(topo, extract_topology(bumpy, grid))
    assert extract_topology(with_blob, grid).faces.shape[0] > topo.faces.shape[0]
    # (4) NaN values (unknown cells of hierarchical decoders) count as outside, as on the dense path
    holey = bumpy.clone()
    holey[:4] = float("nan")
    decode, _ = _field_decoder(holey)
    _, _, topo = coarse_to_fine_sdf(decode, grid, dtype=torch.float64)
    assert _same_topology(topo, extract_topology(holey, grid))
    decode, _ = _field_decoder(torch.full_like(bumpy, float("nan")))
    assert coarse_to_fine_sdf(decode, grid, dtype=torch.float64)[2].is_empty
    with pytest.raises(ValueError, match="even grid resolution"):
        coarse_to_fine_sdf(decode, FieldGrid(47))


def test_coarse_to_fine_decode_surface_equals_dense(tiny_vae):
    """On the tiny ShapeVAE: the same faces, vertices and latent gradients as the dense grid, from
    fewer decoder queries."""
    vae, x0 = tiny_vae
    queries = [0]
    hook = vae.geo_decoder.register_forward_hook(
        lambda m, a, k, out: queries.__setitem__(0, queries[0] + out.shape[0] * out.shape[1]), with_kwargs=True)
    try:
        results = []
        for c2f in (False, True):
            queries[0] = 0
            xs = x0.clone().requires_grad_(True)
            meshes = decode_surface(vae, xs, resolution=32, num_chunks=3000, coarse_to_fine=c2f)
            w = torch.Generator().manual_seed(4)
            loss = sum((v * torch.randn(v.shape, generator=w, dtype=v.dtype)).sum() for v, _ in meshes)
            (g,) = torch.autograd.grad(loss, xs)
            results.append((meshes, g, queries[0]))
    finally:
        hook.remove()
    (dense, g_dense, q_dense), (c2f, g_c2f, q_c2f) = results
    for (vd, fd), (vc, fc) in zip(dense, c2f):
        assert vd.shape[0] > 100 and torch.equal(fd, fc)
        assert (vd - vc).abs().max() < 1e-12
    assert (g_dense - g_c2f).norm() <= 1e-10 * g_dense.norm()
    # this random field is surface-rich (about half the box inside, many pieces), so the band is
    # wide: 0.81 of the dense queries here (smooth shapes: well under half, see the analytic test)
    assert q_c2f < 0.9 * q_dense, (q_c2f, q_dense)
