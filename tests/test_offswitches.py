"""Settings that would silently switch guidance off: hy3dgen's sageattention switches (attention
without backward), float16 underflow in the backward, and the trace's share of zero gradient entries."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.geometry import decode_surface
from vlm3d_guidance.guidance import reward_and_gradient
from vlm3d_guidance.guidance.checks import replaced_attention
from vlm3d_guidance.guidance.step import backward_scaled, zero_share
from vlm3d_guidance.render import orbit_cameras
from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

FAST = dict(num_views=2, render_size=56, grid_resolution=24, lam=0.05)
CALL = dict(num_inference_steps=4, octree_resolution=24, enable_pbar=False)


def forward_only_attention(q, k, v, **kwargs):
    """What USE_SAGEATTN=1 installs, as far as autograd sees it: attention without a backward."""
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=root), dtype=torch.float32)
    return load_tiny_hunyuan_pipeline("standard", root=root), critic


@pytest.mark.parametrize("module,switch,mode", [
    ("hy3dgen.shapegen.models.autoencoders.attention_processors", "CA_USE_SAGEATTN", "x0"),
    ("hy3dgen.shapegen.models.autoencoders.attention_blocks", "USE_SAGEATTN", "x0"),
    ("hy3dgen.shapegen.models.denoisers.hunyuan3ddit", "USE_SAGEATTN", "full"),
])
def test_attention_without_backward_is_refused_by_name(parts, monkeypatch, module, switch, mode):
    pipe, critic = parts
    x0 = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(0))

    def step():
        return reward_and_gradient(x0, pipe.vae, critic, "a box", orbit_cameras(2), box_v=1.01, mc_level=0.0,
                                   grid_resolution=24, render_size=56, shading="clay", backend="torch",
                                   num_chunks=8000, seconds={})

    true = step().gradient
    monkeypatch.setattr(importlib.import_module(module), "scaled_dot_product_attention", forward_only_attention)
    if mode == "x0":  # the fault itself: the VAE's backward is cut, so the step is unguided or wrong
        res = step()
        if switch == "CA_USE_SAGEATTN":  # the geo_decoder's cross-attention: no path to the latent left
            assert res.skipped == "non-finite gradient"
        else:  # the VAE's self-attention: residual paths remain, so the gradient is silently wrong
            cos = float((res.gradient * true).sum() / (res.gradient.norm() * true.norm()))
            assert res.skipped is None and cos < 0.99
    else:
        assert replaced_attention("x0") == []  # the DiT is off the x0 gradient path
    calls = []
    hook = pipe.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        guided = GuidedHunyuanPipeline(pipe, critic, GuidanceConfig(gradient=mode, **FAST))
        with pytest.raises(ValueError, match=f"{module}.scaled_dot_product_attention is forward_only_attention "
                                             f"\\({switch}=1\\).*Unset {switch}"):
            guided(image=Image.new("RGB", (64, 64)), prompt="a box", generator=torch.manual_seed(0), **CALL)
        assert not calls  # before sampling
        guided(image=Image.new("RGB", (64, 64)), prompt="a box", generator=torch.manual_seed(0), lam=0.0, **CALL)
    finally:
        hook.remove()


def test_float16_backward_is_scaled_not_underflowed(tmp_path):
    """A float16 VAE's backward of a small vertex gradient underflows to all zeros; scaled by a power
    of two it matches the float32 VAE (same weights) to float16 accuracy."""
    x0 = torch.randn((1, 64, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for dtype in (torch.float32, torch.float16):
        vae = load_tiny_hunyuan_pipeline("standard", root=tmp_path, dtype=dtype).vae
        x0 = torch.randn((1, *vae.latent_shape), generator=torch.Generator().manual_seed(0))
        leaf = x0.clone().requires_grad_(True)
        (v, _), = decode_surface(vae, leaf.to(dtype), resolution=24)
        gv = 1e-7 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
        (plain,) = torch.autograd.grad(v, leaf, gv, retain_graph=True)
        grads[dtype] = (plain, backward_scaled(v, leaf, gv, dtype))
    plain16, scaled16 = grads[torch.float16]
    ref = grads[torch.float32][1]
    assert torch.equal(grads[torch.float32][0], ref)  # float32: no scaling at all
    assert zero_share(plain16) > 0.99 and zero_share(scaled16) < 0.01
    assert float((scaled16 - ref).norm() / ref.norm()) < 0.05


def test_trace_records_the_share_of_zero_gradient_entries(parts):
    pipe, critic = parts
    guided = GuidedHunyuanPipeline(pipe, critic, GuidanceConfig(**FAST))
    out = guided(image=Image.new("RGB", (64, 64), (200, 30, 30)), prompt="a box", generator=torch.manual_seed(0),
                 return_dict=True, **CALL)
    rec = out.trace[0]
    assert rec.guided and len(rec.zero_share) == 1 and 0.0 <= rec.zero_share[0] < 0.5
    assert rec.to_dict()["zero_share"] == rec.zero_share
    assert out.trace[-1].zero_share == []  # the unguided last step records none
