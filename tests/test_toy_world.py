"""The toy world's objects, splits and the independent judge, on analytic and hand-made meshes."""

import math

import numpy as np
import pytest
import torch
import trimesh

from vlm3d_guidance.toy import hidden_handle_references, judge, references
from vlm3d_guidance.toy.judge import BOX_V, LATTICE, inside_lattice
from vlm3d_guidance.toy.references import Reference, object_mesh, split_object
from vlm3d_guidance.toy.world import BREAK_MODES, CLASSES, Part, ToyObject, broken_variant, sample_object


def _ref(parts):
    obj = ToyObject("table", {}, tuple(parts), None, tuple(parts))
    return Reference(image=None, prompt="x", mesh=None, name="hand", object=obj)


def _box(center, half):
    return Part("p", "box", dict(center=tuple(center), half=tuple(half)))


def test_inside_lattice_matches_a_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    axis = np.linspace(-1.01, 1.01, 48)
    inside = inside_lattice(sphere, axis)
    pts = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    r = np.linalg.norm(pts, axis=-1)
    # away from the faceted surface (icosphere chord error < 0.003) the parity test is exact
    assert inside[r < 0.69].all() and not inside[r > 0.705].any()
    assert abs(inside.sum() - (r < 0.7).sum()) <= 0.01 * (r < 0.7).sum()


def test_judge_intact_box_and_analytic_iou():
    mesh = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    verdict = judge(mesh, _ref([_box((0, 0, 0), (0.5, 0.5, 0.5))]))
    assert not verdict["failed"] and verdict["reason"] == "ok" and verdict["components"] == 1
    assert verdict["iou"] > 0.97
    shifted = judge(mesh, _ref([_box((0.25, 0, 0), (0.5, 0.5, 0.5))]))
    assert shifted["iou"] == pytest.approx(0.75 / 1.25, abs=0.03)  # overlap 0.75, union 1.25
    assert verdict["volume_ratio"] == pytest.approx(1.0, abs=0.05)
    swollen = judge(trimesh.creation.box(extents=(1.2, 1.2, 1.2)), _ref([_box((0, 0, 0), (0.5, 0.5, 0.5))]))
    axis = np.linspace(-BOX_V, BOX_V, LATTICE)  # the judge's lattice: count its points inside each box
    ratio = (np.sum(np.abs(axis) < 0.6) / np.sum(np.abs(axis) < 0.5)) ** 3
    assert swollen["volume_ratio"] == pytest.approx(ratio, rel=1e-9) and not swollen["failed"]
    assert swollen["iou"] == pytest.approx(1 / ratio, rel=1e-9)


def test_judge_floating_part():
    body = trimesh.creation.box(extents=(1.0, 0.4, 1.0))
    piece = trimesh.creation.box(extents=(0.2, 0.2, 0.2))
    piece.apply_translation((0, 0.6, 0))  # 0.2 above the body: not touching
    mesh = trimesh.util.concatenate([body, piece])
    truth = [_box((0, 0, 0), (0.5, 0.2, 0.5)), Part("q", "box", dict(center=(0, 0.6, 0), half=(0.1, 0.1, 0.1)))]
    verdict = judge(mesh, _ref(truth))
    assert verdict["failed"] and verdict["reason"] == "floating part" and verdict["components"] == 2
    assert verdict["floating_share"] == pytest.approx(0.24 / (0.24 + 3.6), rel=1e-9)  # areas 6 * 0.2^2 and 2 * 1.8
    # a speck below 1 % of the area does not count as a floating part
    speck = trimesh.creation.box(extents=(0.05, 0.05, 0.05))
    speck.apply_translation((0, 0.6, 0))
    assert not judge(trimesh.util.concatenate([body, speck]), _ref(truth[:1]))["failed"]


def test_judge_missing_part():
    mesh = trimesh.creation.box(extents=(1.0, 0.4, 1.0))
    truth = [_box((0, 0, 0), (0.5, 0.2, 0.5)), Part("leg", "cylinder", dict(center=(0, -0.5, 0), radius=0.1,
                                                                              half_height=0.3))]
    verdict = judge(mesh, _ref(truth))
    assert verdict["failed"] and verdict["reason"] == "missing leg"
    assert verdict["coverage"]["leg"] < 0.2 and verdict["coverage"]["p"] > 0.95
    assert judge(None, _ref(truth))["reason"] == "empty"


@pytest.mark.parametrize("cls", [c for c in CLASSES if BREAK_MODES[c]])
def test_every_break_mode_fails_and_intact_passes(cls):
    rng = np.random.default_rng(7)
    obj = sample_object(rng, cls)
    ref = Reference(image=None, prompt=obj.description, mesh=None, name=cls, object=obj)
    intact = judge(object_mesh(obj, 64), ref)
    assert not intact["failed"] and intact["iou"] > 0.9, intact
    for mode in BREAK_MODES[cls]:
        broken = broken_variant(obj, np.random.default_rng(3), mode)
        verdict = judge(object_mesh(broken, 64), ref)
        assert verdict["failed"], (mode, verdict)
        expect = "floating" if mode in ("leg detached", "handle floating", "shade floating") else "missing"
        assert expect in verdict["reason"], (mode, verdict)


def test_objects_fit_the_box_and_are_normalised():
    for i in range(8):
        obj = split_object("test", 0, i)
        axis = torch.linspace(-1.01, 1.01, 41)
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        inside = pts[obj.sdf(pts) < 0]
        assert inside.abs().max() < 0.9  # half-extent 0.8 plus one lattice step
        for mode in BREAK_MODES[obj.cls]:
            b = broken_variant(obj, np.random.default_rng(i), mode)
            assert b.sdf(pts).reshape(41, 41, 41)[[0, -1]].min() > 0  # nothing touches the box walls


def test_references_are_deterministic_and_splits_disjoint():
    a = references("test", count=2, seed=5)
    b = references("test", count=2, seed=5)
    assert [r.name for r in a] == ["test-5-0-table", "test-5-1-mug"]
    assert np.array_equal(np.asarray(a[1].image), np.asarray(b[1].image))
    assert a[0].image.mode == "RGBA" and a[0].prompt == "a table with four legs"
    alpha = np.asarray(a[0].image)[..., 3]
    assert alpha.max() == 255 and alpha[0, 0] == 0  # the object is opaque, the background transparent
    assert a[0].mesh.is_watertight
    params = {split: split_object(split, 0, 4).params for split in ("generator", "critic", "test")}
    assert len({tuple(sorted(p.items())) for p in params.values()}) == 3
    with pytest.raises(ValueError, match="unknown split"):
        references("train")
    with pytest.raises(ValueError, match="count must be >= 1"):
        references("test", count=0)


def test_hidden_handle_points_away_from_the_reference_camera():
    ref = hidden_handle_references(count=1)[0]
    parts = {p.name: np.asarray(p.params["center"]) for p in ref.object.parts}
    offset = parts["handle"] - parts["body"]
    az = math.degrees(math.atan2(offset[0], offset[2]))
    assert abs(((az - 30.0) % 360.0) - 180.0) < 1e-6


@pytest.mark.parametrize("azimuth", [0.0, 37.5])
def test_toy_critic_views_are_the_guided_steps_views(tmp_path, azimuth):
    """The toy critic is trained on latent_views() / surface_views(); they must be exactly what the
    guided step renders, also with the orbit turned (``rotate_views``; the critic data's turned views)."""
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.guidance.step import reward_and_gradient
    from vlm3d_guidance.render import orbit_cameras
    from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline
    from vlm3d_guidance.toy.config import TOY_GUIDANCE
    from vlm3d_guidance.toy.render_latent import latent_surface, latent_views, surface_views

    pipe = load_tiny_hunyuan_pipeline("standard", root=tmp_path / "h")
    critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=tmp_path / "q"))
    x0 = torch.randn(1, 32, 8, generator=torch.Generator().manual_seed(0))
    cfg = TOY_GUIDANCE
    cams = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, bounds=1.01,
                         azimuth_offset=azimuth)
    assert torch.equal(cams.view, cfg.cameras(1.01, azimuth_offset=azimuth).view)
    result = reward_and_gradient(x0, pipe.vae, critic, "a box", cams, box_v=1.01, mc_level=0.0,
                                 grid_resolution=cfg.grid_resolution, render_size=cfg.render_size,
                                 shading=cfg.shading, backend=cfg.backend, num_chunks=20000, seconds={},
                                 want_gradient=False, keep_images=True, coarse_to_fine=cfg.coarse_to_fine,
                                 fill=cfg.fill, export_resolution=64)
    ours = surface_views(*latent_surface(pipe.vae, x0, cfg, 64), cfg, azimuth_offset=azimuth)
    assert result.images is not None and ours.shape == result.images.shape == (4, 3, 140, 140)
    assert torch.equal(ours, result.images.clamp(0, 1))
    assert ours.std() > 0.05  # an object, not an empty frame
    unturned = latent_views(pipe.vae, x0, cfg, export_resolution=64)
    assert torch.equal(unturned, ours) == (azimuth == 0.0)


def test_critic_data_views_turn_uniformly_over_one_view_spacing():
    from vlm3d_guidance.toy.config import TOY_GUIDANCE
    from vlm3d_guidance.toy.critic_training import view_turns

    turns = view_turns(TOY_GUIDANCE, dict(critic_turned_views=True), seed=3)
    drawn = np.array([next(turns) for _ in range(2000)])
    assert drawn.min() >= 0.0 and drawn.max() < 90.0  # 4 views: one spacing is 90 degrees
    assert np.histogram(drawn, bins=4, range=(0, 90))[0].min() > 420  # ~500 per quarter
    again = view_turns(TOY_GUIDANCE, dict(critic_turned_views=True), seed=3)
    assert [next(again) for _ in range(5)] == drawn[:5].tolist()
    still = view_turns(TOY_GUIDANCE, dict(critic_turned_views=False), seed=3)
    assert [next(still) for _ in range(5)] == [0.0] * 5


def test_broken_shapes_are_sampled_where_their_missing_part_was():
    """The autoencoder's samples of a table with a missing leg: about 1/10 of them (half the points
    over 5 parts: top, 3 legs and the missing leg's place) lie near the missing leg, where the
    target field says "outside". Sampled near its own parts only, the place got ~0.1 %."""
    from vlm3d_guidance.toy.train import field_samples

    intact = split_object("generator", 0, 0)
    broken = broken_variant(intact, np.random.default_rng(0), "leg missing")
    (gone,) = [p for p in intact.parts if p not in broken.parts]
    pts, target = field_samples(broken, 4000, torch.Generator().manual_seed(0))
    near = gone.sdf(pts.double()).abs() < 0.05
    assert 0.07 < float(near.float().mean()) < 0.13
    inside_gone = gone.sdf(pts.double()) < -0.01
    assert inside_gone.sum() > 50  # sampled inside the leg's old place, where the broken table is
    assert float((target[inside_gone] < 0).float().mean()) > 0.8  # outside (but where the top was)


def test_critic_labels_follow_the_shown_geometry():
    """shown_geometry judges the surface the critic sees against the intact object: an intact mug
    shows "mug", the same mug without its handle "cup", with a floating handle None (broken)."""
    from vlm3d_guidance.toy.references import _mesh_tensors
    from vlm3d_guidance.toy.critic_training import shown_geometry

    mug = split_object("critic", 0, 1)
    assert mug.cls == "mug"
    shown = {}
    for mode in (None, "handle missing", "handle floating"):
        obj = mug if mode is None else broken_variant(mug, np.random.default_rng(1), mode)
        verts, faces = _mesh_tensors(obj, 64)
        shown[mode] = shown_geometry(verts.float(), faces, mug)
    assert shown == {None: "mug", "handle missing": "cup", "handle floating": None}


def test_truth_view_reward_is_zero_on_the_truth_and_falls_as_the_mesh_moves():
    """The controls' ReferenceViewReward: 0 for the intact object's own views, lower the further a
    copy is moved, and refused with cameras fitted per step (its truth views would not line up)."""
    from dataclasses import replace

    from vlm3d_guidance.render import orbit_cameras, render_views
    from vlm3d_guidance.toy import TOY_GUIDANCE
    from vlm3d_guidance.toy.experiment import ReferenceViewReward

    cfg = replace(TOY_GUIDANCE, fill=None)
    ref = references("test", count=1)[0]
    reward = ReferenceViewReward.for_reference(ref, cfg)
    cams = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, bounds=1.01)
    faces = torch.as_tensor(np.asarray(ref.mesh.faces), dtype=torch.long)

    def value(shift):
        verts = torch.as_tensor(np.asarray(ref.mesh.vertices), dtype=torch.float32) + torch.tensor([shift, 0.0, 0.0])
        views = render_views(verts, faces, cams, size=cfg.render_size, shading=cfg.shading, backend=cfg.backend)
        return float(reward.reward(views.clamp(0, 1), "ignored"))

    assert value(0.0) == 0.0
    assert 0.0 > value(0.05) > value(0.2)
    with pytest.raises(ValueError, match="fill=None"):
        ReferenceViewReward.for_reference(ref, TOY_GUIDANCE)


def test_part_weighted_truth_reward_weighs_each_part_by_its_inverse_pixel_area():
    """part_pixel_weights: 1 off the object and on its largest part, A_max / A_part on a smaller
    part (a mug's handle); the weighted reward is -100 * mean(w * (views - truth)^2), 0 on the truth."""
    from dataclasses import replace

    from vlm3d_guidance.render import render_views
    from vlm3d_guidance.toy import TOY_GUIDANCE
    from vlm3d_guidance.toy.experiment import ReferenceViewReward, part_meshes, part_pixel_weights

    cfg = replace(TOY_GUIDANCE, fill=None)
    mug = references("test", count=2)[1]
    assert mug.object.cls == "mug" and [p.name for p in mug.object.parts] == ["body", "handle"]
    cams = cfg.cameras(1.01)
    w = part_pixel_weights(part_meshes(mug.object), cams, cfg)
    assert w.shape == (cfg.num_views, 1, cfg.render_size, cfg.render_size)
    handle = mug.object.parts[1]
    from vlm3d_guidance.geometry import marching_cubes
    from vlm3d_guidance.toy.references import BOX_V, sdf_grid

    def silhouette(part):
        v, f = marching_cubes(sdf_grid(part), bounds=(-BOX_V, BOX_V))
        return render_views(v.float(), f, cams, size=cfg.render_size, shading="silhouette", backend=cfg.backend)[:, :1]

    body_s, handle_s = silhouette(mug.object.parts[0]), silhouette(handle)
    ratio = float(body_s.clamp(0, 1).sum() / handle_s.clamp(0, 1).sum())
    assert 3.0 < ratio < 20.0  # the handle is a small part, under the cap
    assert float(w.max()) == pytest.approx(ratio, rel=1e-5)
    assert float(w[(body_s == 0) & (handle_s == 0)].max()) == 1.0  # background
    assert float(w[(body_s >= 1) & (handle_s == 0)].max()) == 1.0  # the body, the largest part
    reward = ReferenceViewReward.for_reference(mug, cfg, part_weighted=True)
    plain = ReferenceViewReward.for_reference(mug, cfg)
    views = reward.truth_views.clone()
    assert float(reward.reward(views, "ignored")) == 0.0
    views[:, :, 60:70, 60:70] = 1.0 - views[:, :, 60:70, 60:70]
    expected = -100.0 * (w * (views - reward.truth_views).pow(2)).mean()
    assert float(reward.reward(views, "ignored")) == pytest.approx(float(expected), rel=1e-6)
    assert float(plain.reward(views, "ignored")) == pytest.approx(
        float(-100.0 * (views - plain.truth_views).pow(2).mean()), rel=1e-6)


def test_summary_reports_the_median_volume_ratio_and_the_table_shows_it():
    from vlm3d_guidance.toy.experiment import Row, markdown_table, summarize

    def row(failed, iou, **extra):
        return Row("r", "c", 0, failed, "x" if failed else "ok", iou, 1.0, 2.0, 3, 0, None, extra)

    rows = [row(True, 0.2, volume_ratio=2.5), row(False, 0.8, volume_ratio=1.0), row(False, 0.5, volume_ratio=0.5),
            row(False, 0.5)]  # recorded without a volume ratio: left out of the median
    s = summarize(rows)
    assert (s["failures"], s["mean_iou"], s["median_volume_ratio"]) == (1, 0.5, 1.0)
    old = summarize([row(False, 0.5)])
    assert math.isnan(old["median_volume_ratio"])
    table = markdown_table({"new": s, "old": old}).splitlines()
    assert table[2].split(" | ")[4] == "1.00" and table[3].split(" | ")[4] == "-"
