"""Tiny Hunyuan3D models: real classes, real on-disk layout, real loader, real sampler."""
import hashlib
import os

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from vlm3d_guidance.tiny import HUNYUAN_FLAVOURS, build_tiny_hunyuan, load_tiny_hunyuan_pipeline


def _reference_image(size=64):
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = (200, 60, 40, 255)
    return Image.fromarray(rgba)


def _image_for(flavour):
    img = _reference_image()
    return {"front": img, "left": img.rotate(90), "back": img} if flavour == "mv" else img


def test_flavours_cover_the_published_family():
    assert set(HUNYUAN_FLAVOURS) == {"standard", "fast", "turbo", "mv", "mini"}


@pytest.mark.parametrize("flavour", HUNYUAN_FLAVOURS)
def test_real_from_pretrained_and_stock_call_give_a_mesh(tiny_root, flavour, monkeypatch):
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    tiny = build_tiny_hunyuan(flavour, root=tiny_root)
    assert sorted(p.name for p in tiny.folder.iterdir()) == [".complete", "config.yaml", "model.fp16.safetensors"]
    monkeypatch.setenv("HY3DGEN_MODELS", str(tiny.root))
    pipe = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
        tiny.model_path, subfolder=tiny.subfolder, device="cpu", dtype=torch.float32)
    assert type(pipe.model).__name__ == "Hunyuan3DDiT"
    assert type(pipe.vae).__name__ == "ShapeVAE"
    assert pipe.model.guidance_embed is (flavour in ("fast", "turbo"))
    expected_scheduler = "ConsistencyFlowMatchEulerDiscreteScheduler" if flavour == "turbo" else "FlowMatchEulerDiscreteScheduler"
    assert type(pipe.scheduler).__name__ == expected_scheduler
    if flavour == "mini":  # 2mini's published choices: fewer latents, 1:2 double/single blocks, no qkv bias, no pi
        assert pipe.vae.latent_shape == (16, 8) and pipe.vae.scale_factor == 1.0188137142395404
        assert (len(pipe.model.double_blocks), len(pipe.model.single_blocks)) == (1, 2)
        attn = [m for n, m in pipe.vae.named_modules() if n.endswith(("c_qkv", "c_q", "c_kv"))]
        assert len(attn) == 3 and all(m.bias is None for m in attn)
        assert pipe.vae.fourier_embedder.frequencies.tolist() == [1.0, 2.0, 4.0, 8.0]
    meshes = pipe(image=_image_for(flavour), num_inference_steps=4, octree_resolution=32,
                  generator=torch.manual_seed(0), enable_pbar=False)
    assert len(meshes) == 1 and isinstance(meshes[0], trimesh.Trimesh)
    mesh = meshes[0]
    # The builder shapes the decoder so the stock level cuts a closed blob inside the box.
    assert mesh.is_watertight
    assert 0.05 < mesh.volume < 0.5 * 2.02 ** 3
    assert np.all(np.abs(mesh.bounds) < 1.01)


def test_build_is_deterministic_and_cached(tmp_path):
    a = build_tiny_hunyuan("standard", root=tmp_path / "a")
    b = build_tiny_hunyuan("standard", root=tmp_path / "b")
    digest = lambda t: hashlib.sha256((t.folder / "model.fp16.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    mtime = os.path.getmtime(a.folder / "model.fp16.safetensors")
    assert build_tiny_hunyuan("standard", root=tmp_path / "a") == a
    assert os.path.getmtime(a.folder / "model.fp16.safetensors") == mtime
    c = build_tiny_hunyuan("standard", root=tmp_path / "a", seed=1)
    assert digest(c) != digest(a)


def test_config_matches_published_layout(tiny_root):
    tiny = build_tiny_hunyuan("standard", root=tiny_root)
    config = yaml.safe_load((tiny.folder / "config.yaml").read_text())
    assert set(config) == {"model", "vae", "conditioner", "scheduler", "image_processor"}
    assert config["model"]["target"] == "hy3dgen.shapegen.models.Hunyuan3DDiT"
    from safetensors import safe_open

    with safe_open(str(tiny.folder / "model.fp16.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
        assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:5])
    assert prefixes == {"model", "vae", "conditioner"}


def test_unknown_flavour_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="choose one of standard, fast, turbo, mv, mini"):
        build_tiny_hunyuan("large", root=tmp_path)


def test_load_helper_restores_environment(tiny_root, monkeypatch):
    monkeypatch.setenv("HY3DGEN_MODELS", "/somewhere/else")
    pipe = load_tiny_hunyuan_pipeline("fast", root=tiny_root)
    assert os.environ["HY3DGEN_MODELS"] == "/somewhere/else"
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
