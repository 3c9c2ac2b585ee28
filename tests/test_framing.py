"""Framing: the critic's views are fitted to the object (GuidanceConfig.fill), checked by projecting
the mesh and by the rendered silhouettes; and the orbit cameras' own geometry."""
import math

import pytest
import torch
import trimesh

from vlm3d_guidance.render import fit_to_points, orbit_cameras, projected_extent, render_views


def small_offcentre_mesh():
    """A thin box and an ellipsoid, off the origin: about a third of the box [-1, 1]^3."""
    box = trimesh.creation.box(extents=(0.7, 0.25, 0.3))
    box.apply_translation((0.25, -0.3, 0.1))
    ell = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    ell.apply_scale((0.15, 0.35, 0.2))
    ell.apply_translation((-0.2, 0.05, -0.1))
    m = trimesh.util.concatenate([box, ell])
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.long)


def extent_fraction(cams, verts):
    """Per view: larger side of the projected bounding box as a fraction of the image side, and
    whether the box lies inside the image."""
    b = projected_extent(cams, verts)
    side = torch.maximum(b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]) / 2
    inside = (b[:, 0] >= -1) & (b[:, 1] <= 1) & (b[:, 2] >= -1) & (b[:, 3] <= 1)
    return side, inside


@pytest.mark.parametrize("views,elevation", [(4, 20.0), (6, -10.0), (1, 60.0)])
def test_fitted_views_fill_the_image_with_the_object(views, elevation):
    v, f = small_offcentre_mesh()
    orbit = orbit_cameras(views, elevation=elevation, fov=40.0)
    before, _ = extent_fraction(orbit, v)
    assert before.max() < 0.6  # the box-framing orbit: the object fills well under 85 %
    cams = fit_to_points(orbit, v, fill=0.9)
    side, inside = extent_fraction(cams, v)
    assert torch.allclose(side, torch.full_like(side, 0.9), atol=1e-5) and inside.all()
    b = projected_extent(cams, v)
    assert torch.allclose((b[:, 0] + b[:, 1]) / 2, torch.zeros(views), atol=1e-5)  # centred
    assert torch.equal(cams.view, orbit.view) and torch.equal(cams.eye, orbit.eye)  # same orbit, cropped
    # in pixels: the silhouette's bounding box spans >= 85 % of the side in every view
    size = 112
    sil = render_views(v, f, cams, size=size, shading="silhouette", backend="torch")[:, 0] > 0.5
    for i in range(views):
        rows = sil[i].any(dim=1).nonzero()
        cols = sil[i].any(dim=0).nonzero()
        span = max(int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
        assert 0.85 * size <= span <= size - 2, (i, span)


def test_fit_keeps_the_perspective_only_moves_the_window():
    """ndc' = a (ndc - m) for every point, with one a and m per view."""
    v, _ = small_offcentre_mesh()
    orbit = orbit_cameras(3, dtype=torch.float64)
    cams = fit_to_points(orbit, v.double(), fill=0.8)
    pts = torch.rand(50, 3, dtype=torch.float64) - 0.5
    ndc0 = (lambda c: c[..., :2] / c[..., 3:])(orbit.to_clip(pts))
    ndc1 = (lambda c: c[..., :2] / c[..., 3:])(cams.to_clip(pts))
    for i in range(3):
        a = (ndc1[i, 1] - ndc1[i, 0]) / (ndc0[i, 1] - ndc0[i, 0])
        assert torch.allclose(a[0], a[1]) and a[0] > 1.5  # one zoom for x and y, and it zooms in
        m = ndc0[i] - ndc1[i] / a[0]
        assert torch.allclose(m, m[0].expand_as(m), atol=1e-10)
    clip1 = cams.to_clip(pts)
    assert torch.allclose(clip1[..., 2:], orbit.to_clip(pts)[..., 2:])  # depth and w unchanged
    with pytest.raises(ValueError, match="fill"):
        fit_to_points(orbit, v, fill=1.5)
    with pytest.raises(ValueError, match=r"\[P, 3\]"):
        fit_to_points(orbit, v[:0], fill=0.9)


def test_orbit_cameras_frame_the_box_circumsphere():
    cams = orbit_cameras(num_views=4, elevation=20.0, fov=40.0, dtype=torch.float64)
    d = 1.01 * math.sqrt(3) / math.sin(math.radians(20))
    assert torch.allclose(cams.eye.norm(dim=1), torch.full((4,), d, dtype=torch.float64))
    el = math.radians(20)
    assert torch.allclose(cams.eye[0], torch.tensor([0.0, d * math.sin(el), d * math.cos(el)], dtype=torch.float64))
    assert torch.allclose(cams.eye[1], torch.tensor([d * math.cos(el), d * math.sin(el), 0.0], dtype=torch.float64))
    clip = cams.to_clip(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64))
    ndc = clip[..., :3] / clip[..., 3:]
    assert ndc[:, 0, :2].abs().max() < 1e-12  # every camera looks at the origin
    assert (ndc[:, 1, 1] > 0.05).all() and ndc[:, 1, 0].abs().max() < 1e-12  # +y is up in every view
    # the box's circumsphere touches the image edges: max |ndc| over its surface is 1, in x and y
    n = 40000
    k = torch.arange(n, dtype=torch.float64) + 0.5
    phi, cos_t = k * math.pi * (3 - math.sqrt(5)), 1 - 2 * k / n
    sin_t = (1 - cos_t ** 2).sqrt()
    sphere = 1.01 * math.sqrt(3) * torch.stack([sin_t * phi.cos(), cos_t, sin_t * phi.sin()], dim=1)
    c = cams.to_clip(sphere)
    ndc = c[..., :2] / c[..., 3:]
    assert torch.allclose(ndc.abs().amax(dim=1), torch.ones(4, 2, dtype=torch.float64), atol=2e-3)
    assert ndc.abs().max() <= 1 + 1e-9
    depth = c[..., 2] / c[..., 3]
    assert depth.min() > -1 and depth.max() < 1  # inside near/far
