"""VLMCritic: parity with the HF processor path, gradients vs finite differences, frozen weights,
families, dtypes, checkpointing, caching, query templates and input validation."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vlm3d_guidance.critic import (
    CONTENT_TEMPLATE,
    DUAL_TEMPLATE,
    GEOMETRY_TEMPLATE,
    CriticScore,
    VLMCritic,
    image_inputs,
    smart_resize,
)
from vlm3d_guidance.tiny.qwen import build_tiny_qwen

PROMPT = "a red chair with four legs"

# DESIGN.md's text of the paper's dual query (section 4.2), parts joined by newlines.
PAPER_DUAL = (
    "Carefully evaluate the provided images, which show multiple views of a single 3D object. Does the "
    "underlying 3D object, considering all views together, meet all of the following criteria simultaneously?\n"
    "1. Content Match: The object corresponds to the description: {description}.\n"
    "2. Geometric Quality: Based on all views combined, the object appears geometrically sound and consistent. "
    "There are no visible signs of major flaws such as multiple faces on one part (Janus-faced issue), broken "
    "surfaces, intersecting geometry, or highly unrealistic polygonal facets when considering the object from "
    "these different perspectives.\n"
    "Strictly respond with only 'Yes' or 'No'."
)

_CRITICS = {}


def get_critic(tiny_root, family="qwen2_5_vl", dtype=None, **kw):
    key = (family, str(dtype), tuple(sorted(kw.items())))
    if key not in _CRITICS:
        _CRITICS[key] = VLMCritic.from_pretrained(build_tiny_qwen(family, root=tiny_root), dtype=dtype, **kw)
    return _CRITICS[key]


def uint8_views(n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def hf_reward(critic, u8, text):
    """Reference: the HF AutoProcessor on PIL uint8 images + the same model, r = z_yes - z_no."""
    proc = critic.processor
    messages = [{"role": "user", "content": [{"type": "image"}] * len(u8) + [{"type": "text", "text": text}]}]
    rendered = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    pil = [Image.fromarray(v.permute(1, 2, 0).numpy()) for v in u8]
    inputs = proc(text=[rendered], images=pil, return_tensors="pt")
    with torch.no_grad():
        logits = critic.model(**inputs, use_cache=False).logits[0, -1].float()
    return float(logits[critic.yes_id] - logits[critic.no_id]), inputs


# ----------------------------------------------------------------------------- parity with HF

@pytest.mark.parametrize("size", [(224, 224), (448, 448), (280, 504)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_reward_matches_hf_processor_path(tiny_root, n, size):
    critic = get_critic(tiny_root)
    u8 = uint8_views(n, *size, seed=n)
    ref, inputs = hf_reward(critic, u8, DUAL_TEMPLATE.replace("{description}", PROMPT))
    r = critic.reward(u8.float() / 255, PROMPT)
    assert r.shape == () and r.dtype == torch.float32
    assert abs(float(r) - ref) < 1e-5
    # and the inputs themselves agree
    pv, grid = image_inputs(u8.float() / 255, critic.vision)
    assert torch.equal(grid, inputs["image_grid_thw"])
    assert (pv - inputs["pixel_values"]).abs().max() < 1e-5
    gh, gw = int(grid[0, 1]), int(grid[0, 2])
    ids, mm = critic._prompt(DUAL_TEMPLATE.replace("{description}", PROMPT), n, (gh, gw))
    assert torch.equal(ids, inputs["input_ids"]) and torch.equal(mm, inputs["mm_token_type_ids"])


@pytest.mark.parametrize("family,size", [("qwen2_vl", (224, 224)), ("qwen2_vl", (280, 504)),
                                         ("qwen3_vl", (256, 256)), ("qwen3_vl", (448, 448))])
def test_other_families_match_hf(tiny_root, family, size):
    critic = get_critic(tiny_root, family)
    for n in (1, 2):
        u8 = uint8_views(n, *size, seed=10 + n)
        ref, _ = hf_reward(critic, u8, DUAL_TEMPLATE.replace("{description}", PROMPT))
        assert abs(float(critic.reward(u8.float() / 255, PROMPT)) - ref) < 1e-5


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for h, w in [(224, 224), (280, 504), (10, 1000), (3000, 2000), (57, 91)] + [tuple(rng.integers(8, 3000, 2)) for _ in range(50)]:
        for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 256 * 256, 4096 * 4096)]:
            assert smart_resize(int(h), int(w), factor, lo, hi) == hf_smart_resize(int(h), int(w), factor, lo, hi)


def test_resized_views_close_to_hf(tiny_root):
    """Sizes that are not multiples of 28 are resampled (bicubic, antialiased): same grid as HF, and
    pixel values agree up to uint8 rounding and kernel-edge differences."""
    critic = get_critic(tiny_root)
    u8 = uint8_views(2, 200, 300, seed=3)
    _, inputs = hf_reward(critic, u8, "x {description}".replace("{description}", PROMPT))
    pv, grid = image_inputs(u8.float() / 255, critic.vision)
    assert torch.equal(grid, inputs["image_grid_thw"])
    assert (pv - inputs["pixel_values"]).abs().mean() < 0.02


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_gradient_matches_finite_differences(tiny_root, family):
    critic = get_critic(tiny_root, family, dtype=torch.float64)
    side = 64 if family == "qwen3_vl" else 56
    g = torch.Generator().manual_seed(1)
    x = (0.3 + 0.4 * torch.rand(2, 3, side, side + side // 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    r = critic.reward(x, PROMPT)
    assert r.dtype == torch.float64
    r.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in critic.model.parameters())
    eps = 1e-3  # the model's RMSNorms run in float32 even in a float64 model: ~1e-3 relative floor
    with torch.no_grad():
        for _ in range(3):
            d = torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1
            fd = (critic.reward(x + eps * d, PROMPT) - critic.reward(x - eps * d, PROMPT)) / (2 * eps)
            an = (x.grad * d).sum()
            assert abs(float(fd - an)) <= 1e-2 * abs(float(an)) + 1e-6, (float(fd), float(an))


def test_no_parameter_gets_a_gradient_float32(tiny_root):
    critic = get_critic(tiny_root)
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    critic.reward(x, PROMPT).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert not any(p.requires_grad or p.grad is not None for p in critic.model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_gives_float32_image_grads(tiny_root, dtype):
    critic = get_critic(tiny_root, dtype=dtype)
    assert critic.dtype == dtype
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    r = critic.reward(x, PROMPT)
    assert r.dtype == torch.float32 and torch.isfinite(r)
    r.backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    ref = float(get_critic(tiny_root).reward(x.detach(), PROMPT))
    assert abs(float(r.detach()) - ref) < 0.05  # same model, lower precision


def _saved_bytes(critic, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = critic.reward(x, PROMPT)
    return r, total[0]


def test_activation_checkpointing_applies_and_is_exact(tiny_root):
    plain = get_critic(tiny_root)
    ckpt = get_critic(tiny_root, activation_checkpointing=True)
    assert not ckpt.model.training
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    r0, b0 = _saved_bytes(plain, x)
    (g0,) = torch.autograd.grad(r0, x)
    r1, b1 = _saved_bytes(ckpt, x)
    assert not ckpt.model.training  # mode restored after the call
    (g1,) = torch.autograd.grad(r1, x)
    assert b1 < 0.6 * b0, (b0, b1)  # activations really are not kept
    assert abs(float((r1 - r0).detach())) < 1e-6 and (g1 - g0).abs().max() < 1e-6
    ckpt.model.train()
    ckpt.reward(x.detach(), PROMPT)
    assert ckpt.model.training  # a caller's train mode is restored too
    ckpt.model.eval()


# ----------------------------------------------------------------------------- API behaviour

def test_reward_modes_and_score(tiny_root):
    logit = get_critic(tiny_root)
    prob = VLMCritic(logit.model, logit.processor, reward_mode="prob")
    x = torch.rand(2, 3, 224, 224)
    r = float(logit.reward(x, PROMPT))
    assert float(prob.reward(x, PROMPT)) == pytest.approx(math.tanh(r / 2), abs=1e-6)
    s = logit.score(x, PROMPT)
    assert isinstance(s, CriticScore) and float(s.reward) == pytest.approx(r, abs=1e-6)
    assert s.p_yes == pytest.approx(1 / (1 + math.exp(-r)), abs=1e-6)
    assert s.parts == {"dual": pytest.approx(r, abs=1e-6)}


def test_templates_and_weighted_queries(tiny_root):
    assert DUAL_TEMPLATE == PAPER_DUAL
    assert "{description}" in CONTENT_TEMPLATE and "Geometric" not in CONTENT_TEMPLATE
    assert "{description}" not in GEOMETRY_TEMPLATE and "Janus" in GEOMETRY_TEMPLATE
    base = get_critic(tiny_root)
    x = torch.rand(1, 3, 224, 224)
    parts = {}
    for name in ("content", "geometry"):
        parts[name] = float(VLMCritic(base.model, base.processor, query=name).reward(x, PROMPT))
    mixed = VLMCritic(base.model, base.processor, query={"content": 0.3, "geometry": 0.7})
    s = mixed.score(x, PROMPT)
    assert float(s.reward) == pytest.approx(0.3 * parts["content"] + 0.7 * parts["geometry"], abs=1e-5)
    assert s.parts == pytest.approx(parts, abs=1e-5)
    custom = VLMCritic(base.model, base.processor, query="Is this {description}? Answer Yes or No.")
    ref, _ = hf_reward(base, (x * 255).round().to(torch.uint8), f"Is this {PROMPT}? Answer Yes or No.")
    assert float(custom.reward((x * 255).round() / 255, PROMPT)) == pytest.approx(ref, abs=1e-5)
    with pytest.raises(ValueError, match="dual"):
        VLMCritic(base.model, base.processor, query="duel")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_several_queries_share_one_vision_pass(tiny_root, family):
    """Three queries about the same views run the vision tower once; reward, parts and image
    gradient equal those of running it once per query."""
    base = get_critic(tiny_root, family)
    query = {"dual": 1.0, "content": 0.5, "geometry": -0.25}
    shared = VLMCritic(base.model, base.processor, query=query)
    separate = VLMCritic(base.model, base.processor, query=query)
    assert shared._shares_image_features
    separate._shares_image_features = False
    calls = []
    hook = base.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    x0 = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    try:
        results = []
        for critic in (shared, separate):
            calls.clear()
            x = x0.clone().requires_grad_(True)
            score = critic.score(x, PROMPT)
            (g,) = torch.autograd.grad(score.reward, x)
            results.append((float(score.reward.detach()), score.parts, g, len(calls)))
    finally:
        hook.remove()
    (r1, p1, g1, n1), (r2, p2, g2, n2) = results
    assert (n1, n2) == (1, 3)
    assert r1 == pytest.approx(r2, abs=1e-6) and p1 == pytest.approx(p2, abs=1e-6)
    assert float((g1 - g2).abs().max()) <= 1e-5 * float(g2.abs().max())  # float32 summation order


def test_prompt_ids_cached_per_prompt_views_and_size(tiny_root):
    critic = VLMCritic(get_critic(tiny_root).model, get_critic(tiny_root).processor)
    x = torch.rand(2, 3, 224, 224)
    critic.reward(x, PROMPT)
    critic.reward(x, PROMPT)
    assert (critic.cache_misses, critic.cache_hits) == (1, 1)
    critic.reward(torch.rand(2, 3, 280, 504), PROMPT)
    critic.reward(torch.rand(1, 3, 224, 224), PROMPT)
    critic.reward(x, "a blue car")
    assert (critic.cache_misses, critic.cache_hits) == (4, 1)


def test_reward_returns_on_images_device_and_is_deterministic(tiny_root):
    critic = get_critic(tiny_root)
    x = torch.rand(3, 3, 224, 224)
    r1, r2 = critic.reward(x, PROMPT), critic.reward(x.clone(), PROMPT)
    assert r1.device == x.device and r1.ndim == 0 and float(r1) == float(r2)


def test_describe(tiny_root):
    critic = get_critic(tiny_root)
    text = critic.describe(torch.rand(3, 224, 224), max_new_tokens=8)
    assert isinstance(text, str) and text and text == text.strip()
    pil = Image.fromarray(np.zeros((100, 140, 3), dtype=np.uint8))
    assert isinstance(critic.describe(pil, max_new_tokens=4), str)
    im_end = critic.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.warns(UserWarning, match="empty description"):
        # force the model to answer with end-of-turn at once: nothing left after decoding
        assert critic.describe(pil, max_new_tokens=1, forced_eos_token_id=im_end) == "an object"


def test_describe_sees_transparent_images_on_white(tiny_root):
    """Alpha is the object mask: transparent pixels become white whatever colour they hold, so two
    RGBA images that differ only under alpha = 0 are described identically (and like the composite)."""
    from vlm3d_guidance.critic.describe import on_white

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    alpha = np.zeros((64, 96), dtype=np.uint8)
    alpha[16:48, 24:72] = 255
    alpha[16:48, 20:24] = 128  # a half-transparent rim
    garbage = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    a = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    b = Image.fromarray(np.dstack([np.where(alpha[..., None] > 0, rgb, garbage), alpha]), "RGBA")
    flat = np.asarray(on_white(a))
    assert (flat[alpha == 0] == 255).all() and (flat[alpha == 255] == rgb[alpha == 255]).all()
    rim = rgb[16:48, 20:24].astype(float) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(flat[16:48, 20:24] - rim).max() <= 1.0
    assert np.array_equal(np.asarray(on_white(Image.fromarray(rgb))), rgb)  # no alpha: unchanged
    critic = get_critic(tiny_root)
    text = critic.describe(a, max_new_tokens=6)
    assert text == critic.describe(b, max_new_tokens=6) == critic.describe(Image.fromarray(flat), max_new_tokens=6)


# ----------------------------------------------------------------------------- bad input

def _no_forward(critic):
    calls = []
    handle = critic.model.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("images,prompt,match", [
    (torch.rand(3, 224, 224), PROMPT, "rank 4"),
    (torch.rand(1, 4, 224, 224), PROMPT, "3 \\(RGB\\) channels"),
    (torch.rand(1, 3, 224, 224) * 255, PROMPT, "\\[0, 1\\].*divide by 255"),
    (-torch.rand(1, 3, 224, 224), PROMPT, "\\[0, 1\\]"),
    (torch.full((1, 3, 224, 224), float("nan")), PROMPT, "NaN"),
    (torch.randint(0, 2, (1, 3, 224, 224), dtype=torch.uint8), PROMPT, "float"),
    (torch.rand(0, 3, 224, 224), PROMPT, "at least one"),
    ([torch.rand(3, 224, 224)], PROMPT, "torch.Tensor"),
    (torch.rand(1, 3, 224, 224), "   ", "empty"),
    (torch.rand(1, 3, 224, 224), None, "str"),
    (torch.rand(1, 3, 224, 224), "chair " * 5000, "longer than the model's context of 4096"),
    (torch.rand(1, 3, 28, 28 * 250), PROMPT, "aspect ratio"),
])
def test_bad_inputs_raise_before_the_model_runs(tiny_root, images, prompt, match):
    critic = get_critic(tiny_root)
    calls, handle = _no_forward(critic)
    try:
        with pytest.raises(ValueError, match=match):
            critic.reward(images, prompt)
    finally:
        handle.remove()
    assert not calls


def test_nan_in_one_pixel_is_caught(tiny_root):
    x = torch.rand(2, 3, 224, 224)
    x[1, 2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_critic(tiny_root).reward(x, PROMPT)


def test_unsupported_family_names_supported_ones(tmp_path, tiny_root):
    bad = tmp_path / "llava"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        VLMCritic.from_pretrained(bad)
    with pytest.raises(ValueError, match="reward_mode"):
        VLMCritic(get_critic(tiny_root).model, get_critic(tiny_root).processor, reward_mode="odds")


def test_top_level_export():
    import vlm3d_guidance

    assert vlm3d_guidance.VLMCritic is VLMCritic and vlm3d_guidance.CriticScore is CriticScore
