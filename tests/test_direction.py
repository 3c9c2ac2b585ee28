"""The update points uphill, not only has the right size (float64 tiny models, cameras held fixed):

(a) first-order ascent r(x0 - t u) < r(x0) < r(x0 + t u) on every tiny flavour, at the clean estimate
    x0 a two-step run applies its update to;
(b) finite differences along purely random directions, and ~0 along directions orthogonal to g;
(c) the normals' backward (shading) against finite differences under a non-rigid displacement;
(d) a two-step run's update equals lam * g / rms(g) with g from one end-to-end backward;
and (batches) one DiT backward for all items gives the per-item updates.
"""
import pytest
import torch
import trimesh
from PIL import Image

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.geometry import as_stock_export, decode_surface, mesh_volume
from vlm3d_guidance.guidance import StepRecord, reward_and_gradient
from vlm3d_guidance.guidance.step import project_volume
from vlm3d_guidance.render import fit_to_points, orbit_cameras, render_views
from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

F64 = torch.float64
CFG = GuidanceConfig(num_views=2, render_size=56, grid_resolution=24, backend="torch")
OCTREE = 24
PROMPT = "a red box"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def critic64(root):
    return VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=root), dtype=F64)


def _image(flavour):
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    img.paste((200, 40, 40, 255), (16, 12, 48, 52))
    return {"front": img, "left": img, "back": img} if flavour == "mv" else img


def _two_step(guided, flavour, **kw):
    """Two steps, sigma 0 -> 1 (guided) then 1 -> 1 (never guided): the unguided run ends exactly at
    the first step's clean estimate x0, and a guided one at x0 + its update."""
    return guided(image=_image(flavour), prompt=PROMPT, generator=torch.manual_seed(0), num_inference_steps=2,
                  octree_resolution=OCTREE, output_type="latent", enable_pbar=False, **kw)


def _end_to_end(pipe, critic, x0, cfg=CFG):
    """r and d r / d x0 from ONE backward through decode, placement, render and critic (cameras
    fitted to the mesh without gradient, as the pipeline does), not the staged one of the step."""
    leaf = x0.detach().clone().requires_grad_(True)
    (v, f), = decode_surface(pipe.vae, leaf, resolution=cfg.grid_resolution, coarse_to_fine=cfg.coarse_to_fine)
    v = as_stock_export(v, OCTREE)
    cams = fit_to_points(orbit_cameras(cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, dtype=F64),
                         v.detach(), cfg.fill)
    r = critic.reward(render_views(v, f, cams, size=cfg.render_size, shading=cfg.shading, backend="torch"), PROMPT)
    (g,) = torch.autograd.grad(r, leaf)
    return float(r.detach()), g, cams


def _reward(pipe, critic, x, cams, cfg=CFG):
    return reward_and_gradient(x, pipe.vae, critic, PROMPT, cams, box_v=1.01, mc_level=0.0,
                               grid_resolution=cfg.grid_resolution, render_size=cfg.render_size,
                               shading=cfg.shading, backend="torch", num_chunks=8000, seconds={},
                               want_gradient=False, coarse_to_fine=cfg.coarse_to_fine,
                               export_resolution=OCTREE).reward


@pytest.mark.parametrize("flavour", ["standard", "fast", "turbo", "mv"])
def test_two_step_update_is_lam_g_over_rms_and_ascends(root, critic64, flavour):
    pipe = load_tiny_hunyuan_pipeline(flavour, root=root, dtype=F64)
    guided = GuidedHunyuanPipeline(pipe, critic64, CFG)
    x0 = _two_step(guided, flavour, lam=0.0)
    out = _two_step(guided, flavour, return_dict=True)
    r0, g, cams = _end_to_end(pipe, critic64, x0)
    want = CFG.lam * g / g.pow(2).mean().sqrt()
    if flavour != "turbo":  # turbo's consistency scheduler does not end a two-step run at x0
        # (d) the update the run applied is lam * g / rms(g), g from the independent end-to-end backward
        u = out.latents - x0
        assert float((u - want).norm() / want.norm()) < 1e-5
        assert out.trace[0].reward[0] == pytest.approx(r0, abs=1e-7)  # the pipeline forms x0 in float32
    # (a) first-order ascent along the update, cameras held at x0's. The reward jumps by ~1e-5 at
    # discrete events (a pixel centre crossing a silhouette edge, a marching-cubes case change; see
    # the report in benchmarks/RESULTS.md) spaced ~1e-3 apart in t here, so small t only.
    slope = float((g * want).sum())
    for t in (1e-4, 3e-4):
        lo, hi = _reward(pipe, critic64, x0 - t * want, cams), _reward(pipe, critic64, x0 + t * want, cams)
        print(f"\n{flavour} t={t}: r(x0-tu)-r0={lo - r0:+.3e} r(x0+tu)-r0={hi - r0:+.3e} first order {slope * t:+.3e}")
        assert lo < r0 < hi
        if t == 1e-4:  # by the predicted amount (at 3e-4, standard's + side crosses an event: +4e-5)
            assert abs((hi - lo) / 2 - slope * t) < 0.25 * slope * t
    step = _reward(pipe, critic64, x0 + want, cams) - r0
    print(f"{flavour} the step actually taken (t=1): r change {step:+.3e}, first order {slope:+.3e}")


def test_finite_differences_along_random_and_orthogonal_directions(root, critic64):
    pipe = load_tiny_hunyuan_pipeline("standard", root=root, dtype=F64)
    x0 = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(3), dtype=F64)
    r0, g, cams = _end_to_end(pipe, critic64, x0)
    gn = g / g.norm()
    steps = (1e-3, 3e-4)
    gen = torch.Generator().manual_seed(5)
    rows = []
    def fd(d):  # central differences at two step sizes: one may straddle a discrete event
        return [(_reward(pipe, critic64, x0 + e * d, cams) - _reward(pipe, critic64, x0 - e * d, cams)) / (2 * e)
                for e in steps]

    for k in range(8):
        d = torch.randn(x0.shape, generator=gen, dtype=F64)
        d /= d.norm()
        p = d - (d * gn).sum() * gn
        p /= p.norm()
        rows.append((float((g * d).sum()), fd(d), fd(p)))
    gnorm = float(g.norm())
    print(f"\n|g| = {gnorm:.4e}; analytic and fd along random d; fd along d orthogonal to g:")
    for an, fds, fps in rows:
        print(f"  {an:+.4e} {fds[0]:+.4e} {fds[1]:+.4e}   {fps[0]:+.2e} {fps[1]:+.2e}")
    for an, fds, fps in rows:
        assert min(abs(f - an) for f in fds) < 0.05 * abs(an) + 2e-3 * gnorm
        assert min(abs(f) for f in fps) < 3e-3 * gnorm
    assert sum(abs(an) > 0.02 * gnorm for an, _, _ in rows) >= 6  # random directions carry signal


@pytest.mark.parametrize("shading", ["normals", "clay"])
def test_normals_backward_under_a_non_rigid_displacement(shading):
    m = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    v0, f = torch.tensor(m.vertices, dtype=F64), torch.tensor(m.faces)
    x, y, z = v0.unbind(1)
    field = torch.stack([0.3 * torch.sin(3 * y), 0.2 * x * z, 0.25 * torch.cos(2 * x) * y], dim=1)  # bends, shears
    cams = orbit_cameras(2, elevation=20.0, fov=40.0, distance=3.0, dtype=F64)
    with torch.no_grad():
        sil = render_views(v0, f, cams, size=96, shading="silhouette")[:, :1]
        inner = -torch.nn.functional.max_pool2d(-sil, 7, stride=1, padding=3)
    w = inner * torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0), dtype=F64)

    def loss(s):
        return (render_views(v0 + s * field, f, cams, size=96, shading=shading, backend="torch") * w).sum()

    s = torch.zeros((), dtype=F64, requires_grad=True)
    (an,) = torch.autograd.grad(loss(s), s)
    h = 1e-5
    with torch.no_grad():
        fd = (loss(torch.tensor(h, dtype=F64)) - loss(torch.tensor(-h, dtype=F64))) / (2 * h)
    assert abs(float(an)) > 0.1
    assert abs(float(an) - float(fd)) < 1e-3 * abs(float(fd)), (float(an), float(fd))


def test_full_mode_batch_one_backward_equals_per_item(root, critic64):
    """B = 2 in "full" mode: the one backward through the DiT gives each item the update that its own
    backward gives."""
    pipe = load_tiny_hunyuan_pipeline("standard", root=root, dtype=F64)
    cfg = CFG.replace(gradient="full", fill=None)
    guided = GuidedHunyuanPipeline(pipe, critic64, cfg)
    with torch.inference_mode():
        inputs = pipe.prepare_image([_image("standard"), _image("standard").rotate(90)])
        cond = pipe.encode_cond(image=inputs.pop("image"), additional_cond_inputs=inputs,
                                do_classifier_free_guidance=True, dual_guidance=False)
    cond = {k: v.clone() for k, v in cond.items()}
    sigma, t = 0.4, torch.tensor(400.0, dtype=F64)
    z = torch.randn((2, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(1), dtype=F64)
    cams = orbit_cameras(2, dtype=F64)
    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        v = guided._velocity(zz, t, cond, None, 5.0, True)
    record = StepRecord(step=0, sigma=sigma, lam=cfg.lam)
    update = guided._guidance_update(zz, v, sigma, cfg.lam, [PROMPT, PROMPT], cams, cfg, record, box_v=1.01,
                                     mc_level=0.0, num_chunks=8000, full=True)
    for b in range(2):  # reference: this item's own backward through a fresh DiT graph
        zb = z.clone().requires_grad_(True)
        with torch.enable_grad():
            x0 = zb + (1 - sigma) * guided._velocity(zb, t, cond, None, 5.0, True)
        res = reward_and_gradient(x0[b:b + 1].detach(), pipe.vae, critic64, PROMPT, cams, box_v=1.01, mc_level=0.0,
                                  grid_resolution=cfg.grid_resolution, render_size=cfg.render_size, shading="clay",
                                  backend="torch", num_chunks=8000, seconds={}, coarse_to_fine=cfg.coarse_to_fine)
        (gz,) = torch.autograd.grad(x0[b:b + 1], zb, res.gradient)
        assert gz[1 - b].abs().max() == 0  # the items do not interact in the DiT
        want = cfg.lam * gz[b:b + 1] / gz[b:b + 1].pow(2).mean().sqrt()
        assert torch.allclose(update[b:b + 1].double(), want, rtol=1e-5, atol=1e-9)


def _volume_gradient(pipe, x0, cfg=CFG):
    """V and d V / d x0 of the guidance mesh (as the step places it) from ONE end-to-end backward."""
    leaf = x0.detach().clone().requires_grad_(True)
    (v, f), = decode_surface(pipe.vae, leaf, resolution=cfg.grid_resolution, coarse_to_fine=cfg.coarse_to_fine)
    volume = mesh_volume(as_stock_export(v, OCTREE), f)
    (gv,) = torch.autograd.grad(volume, leaf)
    return float(volume.detach()), gv


def test_volume_keep_removes_the_volume_direction_and_the_run_applies_it(root, critic64):
    pipe = load_tiny_hunyuan_pipeline("standard", root=root, dtype=F64)
    guided = GuidedHunyuanPipeline(pipe, critic64, CFG)
    x0 = _two_step(guided, "standard", lam=0.0)
    _, g, cams = _end_to_end(pipe, critic64, x0)
    volume, gv = _volume_gradient(pipe, x0)
    assert volume != 0 and float(gv.norm()) > 0
    want_keep = g - (g * gv).sum() / (gv * gv).sum() * gv

    def step_gradient(mode):
        return reward_and_gradient(x0, pipe.vae, critic64, PROMPT, cams, box_v=1.01, mc_level=0.0,
                                   grid_resolution=CFG.grid_resolution, render_size=CFG.render_size,
                                   shading=CFG.shading, backend="torch", num_chunks=8000, seconds={},
                                   coarse_to_fine=CFG.coarse_to_fine, export_resolution=OCTREE,
                                   volume=mode).gradient

    g_free, g_keep, g_no_growth = step_gradient("free"), step_gradient("keep"), step_gradient("no_growth")
    assert float((g_free - g).norm() / g.norm()) < 1e-9
    assert float((g_keep - want_keep).norm() / want_keep.norm()) < 1e-9
    assert abs(float((g_keep * gv).sum())) < 1e-9 * float(g_keep.norm() * gv.norm())
    grows = float((g * gv).sum()) * volume > 0
    assert torch.equal(g_no_growth, g_keep if grows else g_free)

    # finite differences of the volume itself: along g it changes at the rate <g, gv>, along the kept
    # gradient not at first order (central differences, the mesh re-extracted at every point)
    def volume_at(x):
        with torch.no_grad():
            (v, f), = decode_surface(pipe.vae, x, resolution=CFG.grid_resolution, coarse_to_fine=CFG.coarse_to_fine)
            return float(mesh_volume(as_stock_export(v, OCTREE), f))

    for d, slope in ((g / g.norm(), float((g * gv).sum() / g.norm())), (g_keep / g_keep.norm(), 0.0)):
        fds = [(volume_at(x0 + e * d) - volume_at(x0 - e * d)) / (2 * e) for e in (1e-3, 3e-4)]
        print(f"volume slope analytic {slope:+.4e}, fd {fds[0]:+.4e} {fds[1]:+.4e}, |gv| {float(gv.norm()):.3e}")
        assert min(abs(f - slope) for f in fds) < 0.05 * abs(slope) + 3e-3 * float(gv.norm())

    # the run applies lam * g_keep / rms(g_keep); with volume_start after its guided step, lam * g / rms(g)
    out = _two_step(guided, "standard", volume="keep", return_dict=True)
    want = CFG.lam * want_keep / want_keep.pow(2).mean().sqrt()
    assert float(((out.latents - x0) - want).norm() / want.norm()) < 1e-5
    late = _two_step(guided, "standard", volume="keep", volume_start=0.5, return_dict=True)
    want_free = CFG.lam * g / g.pow(2).mean().sqrt()
    assert float(((late.latents - x0) - want_free).norm() / want_free.norm()) < 1e-5


def test_project_volume_on_hand_made_vectors():
    g = torch.tensor([[[1.0, 2.0, 0.0]]], dtype=F64)
    gv = torch.tensor([[[0.0, 1.0, 1.0]]], dtype=F64)
    kept = project_volume(g, gv, torch.tensor(1.0, dtype=F64), "keep")
    assert torch.allclose(kept, torch.tensor([[[1.0, 1.0, -1.0]]], dtype=F64))  # <g, gv> / <gv, gv> = 1
    # g grows the shape when the orientation is +1 (<g, gv> = 2 > 0): projected; with -1 it shrinks it: kept as is
    assert torch.equal(project_volume(g, gv, torch.tensor(1.0, dtype=F64), "no_growth"), kept)
    assert torch.equal(project_volume(g, gv, torch.tensor(-1.0, dtype=F64), "no_growth"), g)
    assert torch.equal(project_volume(g, torch.zeros_like(gv), torch.tensor(1.0, dtype=F64), "keep"), g)
    with pytest.raises(ValueError, match="volume must be"):
        project_volume(g, gv, torch.tensor(1.0, dtype=F64), "shrink")
