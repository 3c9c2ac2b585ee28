"""Rendering: cameras, torch rasterizer, silhouette-edge antialias (vs finite differences and analytic
areas), shading/orientation, backends, and an inverse-rendering fit through the whole chain."""
import math

import pytest
import torch
import trimesh

from vlm3d_guidance.geometry import marching_cubes
from vlm3d_guidance.render import get_backend, interpolate, orbit_cameras, rasterize, render_views
from vlm3d_guidance.render.raster_nvdiffrast import available as nvdiffrast_available
from vlm3d_guidance.render.raster_torch import barycentrics, interpolate_covered, visibility

D, FOV, R = 3.0, 40.0, 0.8


def sdf_grid(n, r=R, c=(0.0, 0.0, 0.0), axes=(1.0, 1.0, 1.0), dtype=torch.float64):
    a = torch.linspace(-1.01, 1.01, n, dtype=dtype)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    return ((x - c[0]) ** 2 / axes[0] + (y - c[1]) ** 2 / axes[1] + (z - c[2]) ** 2 / axes[2]).sqrt() - r


def ico(sub, r=R):
    m = trimesh.creation.icosphere(subdivisions=sub, radius=r)
    return torch.tensor(m.vertices), torch.tensor(m.faces)


def mc_sphere(n, r=R):
    v, f = marching_cubes(sdf_grid(n, r))
    return v.detach(), f


def disc_area(size, r=R, d=D, fov=FOV):
    """Analytic pixel area of a centred sphere's image under perspective."""
    rad = size / 2 / math.tan(math.radians(fov) / 2) * math.tan(math.asin(r / d))
    return math.pi * rad * rad


def coverage(v, f, cams, size, **kw):
    return render_views(v, f, cams, size=size, shading="silhouette", backend="torch", **kw)[:, 0].sum()


# The orbit cameras' geometry (eyes, look-at, up, the circumsphere touching the image edges) and the
# framing fitted to the object are tested in test_framing.py.


def test_rasterize_conventions_and_perspective_barycentrics():
    v, f = ico(3)
    cams = orbit_cameras(3, elevation=30.0, fov=FOV, distance=D, dtype=torch.float64)
    pos = cams.to_clip(v)
    H, W = 48, 64
    rast = rasterize(pos, f, (H, W))
    assert rast.shape == (3, H, W, 4)
    ids = rast[..., 3]
    assert ids.min() == 0 and ids.max() <= f.shape[0] and (ids == ids.round()).all()
    # interpolating world positions and projecting them back lands exactly on each pixel centre
    p = interpolate(v, rast, f)
    ph = torch.cat([p, torch.ones_like(p[..., :1])], -1)
    clip = torch.einsum("bij,bhwj->bhwi", cams.mvp, ph)
    cov = ids > 0
    ndc = clip[..., :2] / clip[..., 3:]
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    cx = ((2 * cols + 1) / W - 1.0).expand(3, H, W)
    cy = ((2 * rows + 1) / H - 1.0).expand(3, H, W)  # row 0 at the bottom (ndc y = -1)
    assert (ndc[..., 0] - cx)[cov].abs().max() < 1e-9 and (ndc[..., 1] - cy)[cov].abs().max() < 1e-9
    assert ((clip[..., 2] / clip[..., 3] - rast[..., 2])[cov]).abs().max() < 1e-9  # z/w channel
    # u, v are barycentrics inside the triangle; background is all zeros
    u, w = rast[..., 0][cov], rast[..., 1][cov]
    assert (u >= -1e-9).all() and (w >= -1e-9).all() and (u + w <= 1 + 1e-9).all()
    assert (rast[~cov] == 0).all()


def test_barycentric_gradients_gradcheck():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 3, 4, generator=g, dtype=torch.float64) * 0.3
    pos[..., 3] = 2.0 + torch.rand(1, 3, generator=g, dtype=torch.float64)
    pos.requires_grad_(True)
    tri = torch.tensor([[0, 1, 2]])
    z = torch.zeros(5, dtype=torch.long)
    px, py = torch.tensor([3, 4, 5, 2, 6]), torch.tensor([4, 4, 3, 5, 2])
    assert torch.autograd.gradcheck(lambda p: barycentrics(p, tri, z, z, px, py, (9, 9)), (pos,))


@pytest.mark.parametrize("mesh", ["ico4", "mc65"])
def test_sphere_coverage_matches_disc_area(mesh):
    v, f = ico(4) if mesh == "ico4" else mc_sphere(65)
    cams = orbit_cameras(2, elevation=0.0, fov=FOV, distance=D)
    for aa in (True, False):
        c = coverage(v, f, cams, 128, antialias=aa) / 2
        assert abs(c / disc_area(128) - 1) < 0.01


@pytest.mark.parametrize("mesh", ["ico2", "ico4", "mc96"])
def test_silhouette_gradient_matches_finite_differences(mesh):
    v, f = {"ico2": lambda: ico(2), "ico4": lambda: ico(4), "mc96": lambda: mc_sphere(96)}[mesh]()
    if mesh == "mc96":
        assert f.shape[0] > 50000
    cams = orbit_cameras(2, elevation=0.0, fov=FOV, distance=D, dtype=torch.float64)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(coverage(v * s, f, cams, 128), s)
    h = 1e-2
    with torch.no_grad():
        fd = (coverage(v * (1 + h), f, cams, 128) - coverage(v * (1 - h), f, cams, 128)) / (2 * h)
    assert abs(g / fd - 1) < 0.02, (g.item(), fd.item())
    # and it is the rate of change of the true covered area (analytic, sphere of radius R * s)
    if mesh != "ico2":  # a 320-face polyhedron is not a sphere
        da = 2 * (disc_area(128, R * (1 + 1e-6)) - disc_area(128, R * (1 - 1e-6))) / 2e-6  # 2 views
        assert abs(g / da - 1) < 0.02


def test_interior_shading_gradient_matches_finite_differences():
    """Interior (u, v) gradients: clay shading on pixels well inside the silhouette (fixed mask)."""
    v, f = ico(4)
    cams = orbit_cameras(2, elevation=20.0, fov=FOV, distance=D, dtype=torch.float64)
    t = torch.tensor([0.05, -0.03, 0.02], dtype=torch.float64)
    with torch.no_grad():
        sil = render_views(v + t, f, cams, size=96, shading="silhouette")[:, :1]
        inner = -torch.nn.functional.max_pool2d(-sil, 7, stride=1, padding=3)  # eroded by 3 px
    assert inner.sum() > 1000
    w = inner * torch.linspace(0.5, 1.5, 96, dtype=torch.float64)[:, None]

    def loss(shift):
        return (render_views(v + shift, f, cams, size=96, shading="clay", backend="torch") * w).sum()

    x = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(x), x)
    h = 1e-4
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = h
        with torch.no_grad():
            fd = (loss(t + e) - loss(t - e)) / (2 * h)
        assert abs(g[k] - fd) < 0.02 * g.abs().max(), (k, g, fd)


def brute_force_zbuffer(pos, tri, size):
    """Reference z-buffer: every pixel centre against every triangle, float64, plain loops over
    triangles. Returns (ids [B, H, W] with 0 = background, depth gap to the second-nearest hit)."""
    B = pos.shape[0]
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1  # ndc of pixel centres
    Y, X = torch.meshgrid(c, c, indexing="ij")  # row 0 = bottom (ndc y = -1)
    best = torch.full((B, size, size), math.inf, dtype=torch.float64)
    second = best.clone()
    ids = torch.zeros(B, size, size, dtype=torch.long)
    ndc = pos[..., :3] / pos[..., 3:]
    for k, (i, j, m) in enumerate(tri.tolist()):
        a, b, d = ndc[:, i], ndc[:, j], ndc[:, m]  # [B, 3]

        def edge(p, q):
            return ((q[:, 0] - p[:, 0])[:, None, None] * (Y - p[:, 1][:, None, None])
                    - (q[:, 1] - p[:, 1])[:, None, None] * (X - p[:, 0][:, None, None]))

        e0, e1, e2 = edge(a, b), edge(b, d), edge(d, a)
        area = e0 + e1 + e2
        inside = (((e0 >= 0) & (e1 >= 0) & (e2 >= 0)) | ((e0 <= 0) & (e1 <= 0) & (e2 <= 0))) & (area != 0)
        z = (e1 * a[:, 2, None, None] + e2 * b[:, 2, None, None] + e0 * d[:, 2, None, None]) / area
        inside &= (z >= -1) & (z <= 1)
        z = torch.where(inside, z, torch.full_like(z, math.inf))
        nearer = z < best
        second = torch.where(nearer, best, torch.minimum(second, z))
        ids = torch.where(nearer, torch.full_like(ids, k + 1), ids)
        best = torch.where(nearer, z, best)
    return ids, second - best


def test_visibility_matches_brute_force_zbuffer():
    """Two interpenetrating spheres seen from 3 views: the nearest triangle at every pixel centre
    equals a plain per-triangle reference (pixels whose two nearest hits are closer than 1e-9 in
    depth, i.e. shared edges and vertices, may pick either)."""
    v1, f1 = ico(2, r=0.5)
    v2, f2 = ico(1, r=0.35)
    v = torch.cat([v1 + torch.tensor([0.2, 0.0, 0.0], dtype=v1.dtype), v2 - torch.tensor([0.25, 0.1, 0.3], dtype=v1.dtype)])
    f = torch.cat([f1, f2 + v1.shape[0]])
    cams = orbit_cameras(3, elevation=30.0, distance=2.2, dtype=torch.float64)
    pos = cams.to_clip(v)
    ids = visibility(pos, f, (40, 40))
    ref, gap = brute_force_zbuffer(pos, f, 40)
    clear = gap > 1e-9
    assert clear.sum() > 0.9 * (ref > 0).sum() > 1000
    assert torch.equal(ids[clear], ref[clear])
    assert torch.equal(ids > 0, ref > 0)  # coverage everywhere, shared edges included: no pinholes
    # the packed interpolation used by render_views equals interpolate() at the covered pixels
    rast = rasterize(pos, f, (40, 40))
    attr = torch.randn(3, v.shape[0], 5, dtype=torch.float64)
    flat = rast.reshape(-1, 4)
    covered = torch.nonzero(flat[:, 3] > 0).squeeze(1)
    packed = interpolate_covered(attr, flat, covered, f, 40 * 40)
    full = interpolate(attr, rast, f).reshape(-1, 5)
    assert torch.allclose(packed, full[covered], rtol=0, atol=1e-14)


def test_render_views_shapes_orientation_and_modes():
    v, f = mc_sphere(33, r=0.3)
    v = v + torch.tensor([0.0, 0.5, 0.0], dtype=v.dtype)  # above the origin: top half of every image
    cams = orbit_cameras(4)
    for mode in ("clay", "normals", "silhouette"):
        img = render_views(v.float(), f, cams, size=56, shading=mode)
        assert img.shape == (4, 3, 56, 56) and img.dtype == torch.float32
        assert img.min() >= 0 and img.max() <= 1
    sil = render_views(v.float(), f, cams, size=56, shading="silhouette")
    assert sil[:, :, :28].sum() > 20 * sil[:, :, 28:].sum()  # row 0 = top of the image
    assert (sil[:, 0] == sil[:, 1]).all() and sil[:, :, 0, 0].eq(0).all()
    clay = render_views(v.float(), f, cams, size=56, shading="clay", background=1.0)
    assert clay[:, :, -1, -1].eq(1).all()
    assert (clay[:, 0] - clay[:, 2]).abs().max() < 1e-6  # grey clay
    nrm = render_views(v.float(), f, cams, size=56, shading="normals")
    # Exact values at every covered pixel well inside the silhouette: the analytic sphere normal where
    # the pixel's ray meets the sphere, in camera space, through the clay formula and (n + 1) / 2.
    from vlm3d_guidance.render.shading import CLAY_ALBEDO, CLAY_AMBIENT, CLAY_DIFFUSE, LIGHT_DIR_CAM

    light = torch.nn.functional.normalize(torch.tensor(LIGHT_DIR_CAM), dim=0)
    inner = -torch.nn.functional.max_pool2d(-sil[:, :1], 5, stride=1, padding=2)[:, 0] > 0.99
    centre = torch.tensor([0.0, 0.5, 0.0])
    inv = torch.linalg.inv(cams.mvp.double())
    px = (torch.arange(56, dtype=torch.float64) + 0.5) / 56 * 2 - 1
    checked = 0
    for i in range(4):
        rows, cols = inner[i].nonzero(as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            ndc_x, ndc_y = px[c], -px[r]  # image row 0 = top
            near = inv[i] @ torch.tensor([ndc_x, ndc_y, -1.0, 1.0], dtype=torch.float64)
            far = inv[i] @ torch.tensor([ndc_x, ndc_y, 1.0, 1.0], dtype=torch.float64)
            o, d = near[:3] / near[3], far[:3] / far[3]
            d = torch.nn.functional.normalize(d - o, dim=0)
            oc = o - centre.double()
            b = (oc * d).sum()
            hit = o + (-b - (b * b - (oc * oc).sum() + 0.3 ** 2).sqrt()) * d  # nearest intersection
            n_cam = cams.rotations(torch.float64)[i] @ torch.nn.functional.normalize(hit - centre.double(), dim=0)
            want_clay = CLAY_ALBEDO * (CLAY_AMBIENT + CLAY_DIFFUSE * max(0.0, float(n_cam @ light.double())))
            assert abs(float(clay[i, 0, r, c]) - want_clay) < 0.04, (i, r, c)  # a 33^3 MC sphere
            assert (nrm[i, :, r, c].double() - (n_cam + 1) / 2).abs().max() < 0.04, (i, r, c)
            checked += 1
    assert checked > 25


def test_empty_mesh_and_backends():
    v = torch.zeros(0, 3, requires_grad=True)
    img = render_views(v, torch.zeros(0, 3, dtype=torch.long), orbit_cameras(2), size=28, background=1.0)
    assert img.shape == (2, 3, 28, 28) and img.eq(1).all()
    img.sum().backward()
    assert get_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError):
        get_backend("opengl")
    if not nvdiffrast_available():
        with pytest.raises((ImportError, ValueError)) as err:
            get_backend("nvdiffrast", "cpu")
        if err.type is ImportError:
            assert "pip install git+https://github.com/NVlabs/nvdiffrast --no-build-isolation" in str(err.value)


@pytest.mark.skipif(not nvdiffrast_available(), reason="needs CUDA and nvdiffrast")
def test_torch_and_nvdiffrast_agree():
    v, f = mc_sphere(65)
    v, f = v.float().cuda(), f.cuda()
    cams = orbit_cameras(4, device="cuda")
    pos = cams.to_clip(v)
    rt = get_backend("torch", "cuda").rasterize(pos, f, (128, 128))
    rn = get_backend("nvdiffrast", "cuda").rasterize(pos, f, (128, 128))
    same = (rt[..., 3] == rn[..., 3])
    assert same.float().mean() > 0.995
    both = same & (rt[..., 3] > 0)
    assert (rt[..., :3] - rn[..., :3])[both].abs().max() < 1e-3
    for mode in ("silhouette", "clay"):
        s = torch.tensor(1.0, device="cuda", requires_grad=True)
        grads, imgs = [], []
        for be in ("torch", "nvdiffrast"):
            img = render_views(v * s, f, cams, size=128, shading=mode, backend=be)
            imgs.append(img.detach())
            grads.append(torch.autograd.grad(img.sum(), s)[0])
        assert (imgs[0] - imgs[1]).abs().mean() < 2e-3
        assert abs(grads[0] / grads[1] - 1) < 0.02


def test_inverse_rendering_fits_silhouettes():
    """Fit a 24^3 SDF grid (start: small sphere) to an offset ellipsoid's silhouettes."""
    cams = orbit_cameras(4, elevation=20.0, fov=40.0)
    tv, tf = marching_cubes(sdf_grid(64, 0.5, (0.15, 0.1, 0.0), (1.0, 0.6, 1.0), torch.float32))
    with torch.no_grad():
        target = render_views(tv, tf, cams, size=64, shading="silhouette")[:, 0] > 0.5

    def iou(img):
        m = img > 0.5
        return ((m & target).sum() / (m | target).sum()).item()

    sdf = sdf_grid(24, 0.3, dtype=torch.float32).requires_grad_(True)
    opt = torch.optim.Adam([sdf], lr=0.03)
    ious = []
    for _ in range(40):
        v, f = marching_cubes(sdf)
        img = render_views(v, f, cams, size=64, shading="silhouette")[:, 0]
        ious.append(iou(img.detach()))
        loss = ((img - target.float()) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ious[0] < 0.45 and ious[-1] > 0.85, ious
