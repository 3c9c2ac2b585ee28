"""Tests of vlm3d_guidance.evaluate on meshes with known answers, a report folder and tiny real models."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from vlm3d_guidance import evaluate as ev
from vlm3d_guidance.evaluate.report import _cell


def _pymeshlab_works() -> bool:
    try:
        import pymeshlab  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


HAS_PYMESHLAB = _pymeshlab_works()


def _import_or_skip(**needs: tuple[str, ...]):
    """Import each module and check it has the named attributes, or skip naming what is missing.

    Only for stages written in parallel that may not have landed yet (an empty folder imports as a
    namespace package, hence the attribute check).
    """
    loaded = []
    for name, attrs in needs.items():
        module = name.replace("__", ".")
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure means "not landed yet"
            pytest.skip(f"{module} is not importable yet ({type(exc).__name__}: {exc})")
        missing = [a for a in attrs if not hasattr(mod, a)]
        if missing:
            pytest.skip(f"{module} has no {', '.join(missing)} yet")
        loaded.append(mod)
    return loaded


# ------------------------------------------------------------------------------------------------
# known-answer meshes
# ------------------------------------------------------------------------------------------------


def open_cylinder(radius: float, height: float, sections: int = 256, rings: int = 4) -> trimesh.Trimesh:
    """A tube without caps: ``sections`` around, ``rings`` rows of quads along z, welded seam."""
    theta = np.arange(sections) * 2.0 * np.pi / sections
    z = np.linspace(0.0, height, rings + 1)
    verts = np.array([[radius * math.cos(t), radius * math.sin(t), zz] for zz in z for t in theta])
    faces = []
    for r in range(rings):
        for s in range(sections):
            a, b = r * sections + s, r * sections + (s + 1) % sections
            c, d = a + sections, b + sections
            faces += [[a, b, d], [a, d, c]]
    return trimesh.Trimesh(verts, np.array(faces), process=False)


def test_two_disjoint_spheres():
    big = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    small = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    small.apply_translation((3.0, 0.0, 0.0))
    m = ev.mesh_metrics(trimesh.util.concatenate([big, small]))
    assert m["components"] == 2
    # The two icospheres are similar polyhedra (scale 0.3), so the small one's share of the area is
    # exactly 0.3^2 / (1 + 0.3^2), whatever the tessellation.
    assert m["floater_area_ratio"] == pytest.approx(0.3**2 / (1.0 + 0.3**2), rel=1e-12)
    assert m["largest_component_area"] == pytest.approx(m["area"] / (1.0 + 0.3**2), rel=1e-12)
    assert m["watertight"] is True and m["volume_reliable"] is True
    assert m["euler_number"] == 4 and m["genus"] == 0
    # Against the smooth spheres: an inscribed polyhedron has a little less area and volume; with
    # 642 vertices per sphere the deficit is 0.48 % (area) and 0.86 % (volume).
    area, volume = 4 * math.pi * (1.0 + 0.3**2), 4 / 3 * math.pi * (1.0 + 0.3**3)
    assert 0.994 * area < m["area"] < area
    assert 0.990 * volume < m["volume"] < volume
    assert m["bbox_min"] == pytest.approx([-1.0, -1.0, -1.0], abs=1e-12)
    assert m["bbox_max"] == pytest.approx([3.3, 1.0, 1.0], abs=1e-12)
    assert m["vertices"] == 642 + 642 and m["faces"] == 1280 + 1280
    if HAS_PYMESHLAB:
        assert m["self_intersecting_faces"] == 0


def test_two_disjoint_icosahedra_exact_area_and_volume():
    """Regular icosahedra (subdivision 0) have closed forms: edge a = R / sin(2 pi / 5),
    area 5 sqrt(3) a^2, volume 5 (3 + sqrt(5)) a^3 / 12."""
    radii = (1.0, 0.5)
    parts = []
    for k, radius in enumerate(radii):
        ico = trimesh.creation.icosphere(subdivisions=0, radius=radius)
        ico.apply_translation((4.0 * k, 0.0, 0.0))
        parts.append(ico)
    m = ev.mesh_metrics(trimesh.util.concatenate(parts))
    edges = [r / math.sin(2 * math.pi / 5) for r in radii]
    areas = [5 * math.sqrt(3) * a**2 for a in edges]
    assert m["area"] == pytest.approx(sum(areas), rel=1e-12)
    assert m["volume"] == pytest.approx(sum(5 * (3 + math.sqrt(5)) / 12 * a**3 for a in edges), rel=1e-12)
    assert m["floater_area_ratio"] == pytest.approx(areas[1] / sum(areas), rel=1e-12)
    # V - E + F = 12 - 30 + 20 per icosahedron
    assert (m["components"], m["euler_number"], m["genus"], m["watertight"]) == (2, 4, 0, True)


def test_split_vertices_are_merged_before_counting():
    """A triangle soup (every face with its own corners) is still one closed sphere."""
    soup = trimesh.creation.icosphere(subdivisions=2)
    soup.unmerge_vertices()
    assert len(soup.vertices) == 3 * len(soup.faces)
    m = ev.mesh_metrics(soup)
    assert m["vertices"] == 3 * len(soup.faces)
    assert m["merged_vertices"] == 162
    assert (m["components"], m["euler_number"], m["genus"], m["watertight"]) == (1, 2, 0, True)
    assert m["floater_area_ratio"] == 0.0


def _revolved_polygon_area_volume(R: float, r: float, major: int, minor: int) -> tuple[float, float]:
    """Exact area and volume of trimesh's torus: a regular ``minor``-gon of circumradius r, centred
    at distance R from the z axis, swept through ``major`` equal rotations with flat faces.

    Each of the ``major`` wedges is {rho ((1-s) u_i + s u_i+1) + z e_z : (rho, z) in polygon}, whose
    volume is sin(2 pi / major) * integral of rho over the polygon = sin(2 pi / major) * R * A_poly.
    Each polygon edge sweeps planar isosceles trapezoids with parallel sides 2 rho sin(pi / major).
    """
    area_poly = minor / 2 * r**2 * math.sin(2 * math.pi / minor)
    volume = major * math.sin(2 * math.pi / major) * R * area_poly
    phi = np.arange(minor + 1) * 2 * math.pi / minor
    rho, z = R + r * np.cos(phi), r * np.sin(phi)
    half = math.pi / major
    height = np.sqrt((np.diff(rho) * math.cos(half)) ** 2 + np.diff(z) ** 2)
    area = major * float(np.sum((rho[:-1] + rho[1:]) * math.sin(half) * height))
    return area, volume


def test_torus():
    R, r, major, minor = 1.0, 0.3, 128, 64
    torus = trimesh.creation.torus(major_radius=R, minor_radius=r, major_sections=major, minor_sections=minor)
    m = ev.mesh_metrics(torus)
    assert m["watertight"] is True and m["volume_reliable"] is True
    assert m["components"] == 1
    assert m["euler_number"] == 0
    assert m["genus"] == 1
    assert m["floater_area_ratio"] == 0.0
    area, volume = _revolved_polygon_area_volume(R, r, major, minor)
    assert m["area"] == pytest.approx(area, rel=1e-12)
    assert m["volume"] == pytest.approx(volume, rel=1e-12)
    # ... and the smooth torus within the tessellation error (0.07 % area, 0.2 % volume here)
    assert m["area"] == pytest.approx(4 * math.pi**2 * R * r, rel=1e-3)
    assert m["volume"] == pytest.approx(2 * math.pi**2 * R * r**2, rel=3e-3)
    assert m["bbox_max"][2] == pytest.approx(r, abs=1e-12)
    # inward winding: same magnitude, negative signed volume; topology unchanged
    flipped = ev.mesh_metrics(trimesh.Trimesh(torus.vertices, torus.faces[:, ::-1], process=False))
    assert flipped["volume"] == pytest.approx(-volume, rel=1e-12)
    assert (flipped["euler_number"], flipped["genus"]) == (0, 1)


def test_two_tori_total_genus():
    a = trimesh.creation.torus(1.0, 0.3, 32, 16)
    b = trimesh.creation.torus(0.5, 0.2, 32, 16)
    b.apply_translation((3.0, 0.0, 0.0))
    ball = trimesh.creation.icosphere(subdivisions=1, radius=0.2)
    ball.apply_translation((0.0, 3.0, 0.0))
    m = ev.mesh_metrics(trimesh.util.concatenate([a, b, ball]))
    # chi = 0 + 0 + 2 over 3 components: total genus (2 * 3 - 2) / 2 = 2
    assert (m["components"], m["euler_number"], m["genus"]) == (3, 2, 2)
    assert m["floater_area_ratio"] == pytest.approx(1.0 - a.area / (a.area + b.area + ball.area), rel=1e-12)


def test_open_cylinder():
    radius, height, sections = 0.5, 2.0, 256
    m = ev.mesh_metrics(open_cylinder(radius, height, sections=sections))
    assert m["watertight"] is False and m["genus"] is None and m["volume_reliable"] is False
    assert m["components"] == 1
    # an annulus: V - E + F = 5*256 - (4*256 + 5*256 + 4*256) + 8*256 = 0
    assert m["euler_number"] == 0
    # flat rectangles of width 2 r sin(pi / n): exact, and the smooth 2 pi r h within (pi/n)^2 / 6
    assert m["area"] == pytest.approx(sections * 2 * radius * math.sin(math.pi / sections) * height, rel=1e-12)
    assert m["area"] == pytest.approx(2 * math.pi * radius * height, rel=3e-5)
    assert m["floater_area_ratio"] == 0.0
    assert isinstance(m["volume"], float)  # reported, but flagged unreliable


@pytest.mark.skipif(not HAS_PYMESHLAB, reason="pymeshlab not importable")
def test_self_intersecting_pair():
    """A unit cube pierced through its +x face by a 1 x 0.6 x 0.6 rod.

    Exactly 10 faces intersect a non-adjacent face: the cube's two +x triangles (the rod's
    0.6 x 0.6 section crosses that face's diagonal) and the rod's eight side triangles (each spans
    x in [0, 1] and so crosses the plane x = 0.5 inside the cube's face). The rod's end caps (x = 0
    inside the cube, x = 1 outside) and the cube's other faces touch nothing.
    """
    cube = trimesh.creation.box(extents=(1, 1, 1))
    rod = trimesh.creation.box(extents=(1, 0.6, 0.6))
    rod.apply_translation((0.5, 0.0, 0.0))
    pierced = ev.mesh_metrics(trimesh.util.concatenate([cube, rod]))
    assert pierced["self_intersecting_faces"] == 10
    assert pierced["components"] == 2
    assert pierced["floater_area_ratio"] == pytest.approx(3.12 / 9.12, rel=1e-12)  # rod area 2*0.36 + 4*0.6
    rod.apply_translation((3.0, 0.0, 0.0))
    disjoint = ev.mesh_metrics(trimesh.util.concatenate([cube, rod]))
    assert disjoint["self_intersecting_faces"] == 0
    assert disjoint["components"] == 2
    assert ev.mesh_metrics(cube, self_intersections=False)["self_intersecting_faces"] is None
    # faces that share an edge or a vertex are not intersections
    assert ev.mesh_metrics(trimesh.creation.icosphere(subdivisions=2))["self_intersecting_faces"] == 0


def test_empty_mesh():
    m = ev.mesh_metrics(trimesh.Trimesh())
    assert m["vertices"] == 0 and m["faces"] == 0 and m["components"] == 0
    assert m["floater_area_ratio"] == 0.0 and m["area"] == 0.0 and m["volume"] == 0.0
    assert m["watertight"] is False and m["genus"] is None
    assert m["bbox_min"] is None and m["bbox_max"] is None
    json.dumps(m)
    pair = ev.pair_metrics(trimesh.Trimesh(), trimesh.creation.box())
    assert pair["chamfer"] is None
    assert pair["change"]["components"] == 1


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------


def _square(z: float) -> trimesh.Trimesh:
    v = np.array([[0, 0, z], [1, 0, z], [1, 1, z], [0, 1, z]], dtype=float)
    return trimesh.Trimesh(v, np.array([[0, 1, 2], [0, 2, 3]]), process=False)


def test_pair_metrics_and_chamfer():
    # two parallel unit squares at distance h: every nearest neighbour is ~h away, chamfer ~ 2h
    h = 0.2
    pair = ev.pair_metrics(_square(0.0), _square(h), chamfer_samples=4000, seed=3)
    assert pair["chamfer"] == pytest.approx(2 * h, rel=0.02)
    again = ev.pair_metrics(_square(0.0), _square(h), chamfer_samples=4000, seed=3)
    assert again["chamfer"] == pair["chamfer"]  # seeded
    assert ev.chamfer_distance(_square(0.0), _square(0.0), 4000) < 0.05

    base = trimesh.creation.icosphere(subdivisions=2)
    floater = trimesh.creation.icosphere(subdivisions=1, radius=0.1)
    floater.apply_translation((2.0, 0.0, 0.0))
    pair = ev.pair_metrics(trimesh.util.concatenate([base, floater]), base)
    assert pair["baseline"]["components"] == 2 and pair["guided"]["components"] == 1
    assert pair["change"]["components"] == -1
    assert pair["change"]["floater_area_ratio"] == pytest.approx(-pair["baseline"]["floater_area_ratio"])
    assert pair["change"]["watertight"] == 0
    assert pair["change"]["bbox_max"][0] == pytest.approx(1.0 - 2.1, rel=1e-6)
    assert "genus" in pair["change"]
    assert pair["chamfer"] > 0


# ------------------------------------------------------------------------------------------------
# report folder
# ------------------------------------------------------------------------------------------------


def _render_available() -> bool:
    try:
        from vlm3d_guidance.render import orbit_cameras, render_views  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _write_folder(folder: Path, prompt: str = "a red chair") -> tuple[trimesh.Trimesh, trimesh.Trimesh]:
    folder.mkdir(parents=True, exist_ok=True)
    guided = trimesh.creation.icosphere(subdivisions=2, radius=0.6)
    floater = trimesh.creation.icosphere(subdivisions=1, radius=0.1)
    floater.apply_translation((0.8, 0.0, 0.0))
    baseline = trimesh.util.concatenate([trimesh.creation.icosphere(subdivisions=2, radius=0.6), floater])
    guided.export(folder / "mesh.glb")
    baseline.export(folder / "baseline.obj")
    (folder / "config.json").write_text(json.dumps({"prompt": prompt, "critic_model": "tiny"}))
    (folder / "views.png").write_bytes(b"")  # present in real folders; not read
    return baseline, guided


def test_evaluate_folder_writes_report(tmp_path):
    folder = tmp_path / "out"
    _write_folder(folder)
    report = ev.evaluate_folder(folder)
    paths = report["paths"]
    assert Path(paths["json"]).is_file() and Path(paths["md"]).is_file()
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp files left
    on_disk = json.loads(Path(paths["json"]).read_text())
    assert on_disk["prompt"] == "a red chair"
    assert on_disk["metrics"]["baseline"]["components"] == 2
    assert on_disk["metrics"]["guided"]["components"] == 1
    assert on_disk["change"]["components"] == -1
    assert on_disk["chamfer"] > 0
    assert on_disk["meshes"] == {"guided": "mesh.glb", "baseline": "baseline.obj"}
    md = Path(paths["md"]).read_text()
    assert "| metric | baseline | guided | change |" in md
    assert "| components | 2 | 1 | -1 |" in md
    assert "| watertight | yes | yes | 0 |" in md
    assert f"| chamfer distance (baseline to guided) | – | – | {_cell(on_disk['chamfer'])} |" in md
    if _render_available():
        assert paths["png"] and Path(paths["png"]).stat().st_size > 0
        from PIL import Image

        assert Image.open(paths["png"]).size[0] > Image.open(paths["png"]).size[1]  # 2 rows x 4 views
    else:
        assert paths["png"] is None
        assert any("render" in n for n in report["notes"])
        assert "render stage not importable" in md


def test_evaluate_folder_uses_the_runs_cameras(tmp_path):
    """The clay views of the report are outputs.render_mesh_views (the CLI's views.png path) with the
    cameras of the run's config.json, on the welded mesh; explicit arguments win."""
    from vlm3d_guidance.outputs import render_mesh_views

    folder = tmp_path / "run"
    _, guided = _write_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["guidance"] = {"num_views": 3, "elevation": 35.0, "fov": 30.0}
    (folder / "config.json").write_text(json.dumps(config))
    report = ev.evaluate_folder(folder, size=56)
    assert report["cameras"] == {"num_views": 3, "elevation": 35.0, "fov": 30.0}
    views = ev.clay_views(trimesh.load(folder / "mesh.glb", force="mesh"), size=56, **report["cameras"])
    assert torch.equal(views, render_mesh_views(guided, num_views=3, elevation=35.0, fov=30.0, size=56))
    other = render_mesh_views(guided, num_views=3, elevation=20.0, fov=40.0, size=56)
    assert float((views - other).abs().max()) > 0.1  # the cameras matter
    assert ev.evaluate_folder(folder, size=56, num_views=2, elevation=10.0)["cameras"] == {
        "num_views": 2, "elevation": 10.0, "fov": 30.0}


def test_evaluate_folder_guided_only(tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    trimesh.creation.box().export(folder / "mesh.ply")
    (folder / "config.json").write_text(json.dumps({"prompt": "a box"}))
    report = ev.evaluate_folder(folder)
    assert report["metrics"]["baseline"] is None
    assert report["metrics"]["guided"]["watertight"] is True
    assert "| watertight | – | yes | – |" in Path(report["paths"]["md"]).read_text()
    with pytest.raises(FileNotFoundError):
        ev.evaluate_folder(tmp_path)


# ------------------------------------------------------------------------------------------------
# CLIP: a tiny random CLIPModel with a locally built tokenizer, through from_pretrained
# ------------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE: printable Latin-1 bytes map to themselves,
    the rest to code points from 256 upwards, in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    extra, out = 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    alphabet = _byte_alphabet()
    merges = ["r e", "re d</w>", "c h", "ch a", "cha i", "chai r</w>", "b o", "bo x</w>"]
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]:
        vocab.setdefault(tok, len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    assert tokenizer.tokenize("a red chair") == ["a</w>", "red</w>", "chair</w>"]

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, an output with pooler_output in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_similarity_matches_hand_computation(tiny_clip):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 40, 48, generator=g)
    text = "a red chair"
    sim = ev.clip_similarity(images, text, str(tiny_clip))

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(x) for x in u8]
    pixel_values = processor(images=pil, return_tensors="pt")["pixel_values"]
    input_ids = processor(text=[text], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        f_img = _features(model.get_image_features(pixel_values=pixel_values))
        f_txt = _features(model.get_text_features(input_ids=input_ids))
    f_img = f_img / f_img.norm(dim=-1, keepdim=True)
    f_txt = f_txt / f_txt.norm(dim=-1, keepdim=True)
    hand = float((f_img @ f_txt[0]).mean())
    assert sim == pytest.approx(hand, abs=1e-6)
    assert -1.0 <= sim <= 1.0
    # the same images given as PIL, and a different text gives a different number
    assert ev.clip_similarity(pil, text, str(tiny_clip)) == pytest.approx(sim, abs=1e-6)
    assert ev.clip_similarity(images, "a box", str(tiny_clip)) != pytest.approx(sim, abs=1e-6)


def test_clip_similarity_truncates_a_long_description(tiny_clip):
    """The tiny text tower has 32 positions (77 for released CLIPs): a longer description is cut
    to them, so it scores exactly like its first 32 tokens."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    long_text = " ".join(["a red chair"] * 20)  # 60 words, 62 tokens with start and end
    sim = ev.clip_similarity(images, long_text, str(tiny_clip))
    assert math.isfinite(sim)
    # the first 30 words (plus start/end tokens: 32 positions) give the same number
    assert sim == pytest.approx(ev.clip_similarity(images, " ".join(["a red chair"] * 10), str(tiny_clip)), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# critic rewards and a full report (need the critic, render and tiny modules of parallel work)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_critic(tmp_path_factory):
    critic_mod, _, tiny = _import_or_skip(
        vlm3d_guidance__critic=("VLMCritic",),
        vlm3d_guidance__render=("orbit_cameras", "render_views"),
        vlm3d_guidance__tiny=("build_tiny_qwen",),
    )
    path = tiny.build_tiny_qwen("qwen2_5_vl", root=tmp_path_factory.mktemp("tiny_qwen"))
    return critic_mod.VLMCritic.from_pretrained(path, device="cpu")


def test_critic_rewards(tiny_critic):
    from vlm3d_guidance.critic import VLMCritic

    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    rewards = ev.critic_rewards(mesh, tiny_critic, "a ball", num_views=2, size=56)
    assert set(rewards) == {"dual", "content", "geometry"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in rewards.values())
    # each number is that query's critic on the critic's clay views, rendered here with the public
    # render API (the orbit fitted to the mesh, as during guidance), not with evaluate's own helpers
    from vlm3d_guidance.render import fit_to_points, orbit_cameras, render_views

    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces)
    with torch.no_grad():
        images = render_views(v, f, fit_to_points(orbit_cameras(2), v, 0.9), size=56, shading="clay")
    for name in ("dual", "content", "geometry"):
        scorer = VLMCritic(tiny_critic.model, tiny_critic.processor, query=name, reward_mode="logit")
        with torch.no_grad():
            direct = float(scorer.reward(images, "a ball"))
        assert rewards[name] == pytest.approx(direct, abs=1e-5), name
    assert len({round(v, 6) for v in rewards.values()}) == 3  # three different questions, three numbers


def test_evaluate_folder_with_critic_and_clip(tmp_path, tiny_critic, tiny_clip):
    folder = tmp_path / "out"
    _write_folder(folder, prompt="a red chair")
    report = ev.evaluate_folder(folder, critic=tiny_critic, clip_model=str(tiny_clip), num_views=2, size=56)
    for name in ("baseline", "guided"):
        assert set(report["rewards"][name]) == {"dual", "content", "geometry"}
        sim = report["clip"][name]["similarity"]
        assert report["clip"][name]["clip_d"] == pytest.approx(1.0 - sim)
    md = Path(report["paths"]["md"]).read_text()
    assert "critic reward (dual)" in md and "CLIP-D" in md
    assert Path(report["paths"]["png"]).is_file()


def test_reports_are_strict_json(tmp_path):
    """The one JSON writer (report.json, trace.json, config.json): NaN and infinities, as Python,
    numpy scalars or arrays, become null; the file parses with a reader that rejects NaN."""
    from vlm3d_guidance.outputs import atomic_write_json

    value = {"a": float("nan"), "b": [1.0, float("inf"), np.float32("nan")], "c": np.array([0.5, -np.inf]),
             "d": {"e": (np.float64(2.0), -float("inf"))}, "f": np.int64(3)}
    path = atomic_write_json(tmp_path / "report.json", value)

    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=reject) == {
        "a": None, "b": [1.0, None, None], "c": [0.5, None], "d": {"e": [2.0, None]}, "f": 3}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it
