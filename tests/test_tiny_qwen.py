"""Tiny Qwen-VL checkpoints: real classes, real on-disk layout, loadable by the Auto classes, offline."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlm3d_guidance.tiny.qwen import QWEN_FAMILIES, SPECIAL_TOKENS, build_tiny_qwen

CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def loaded(request, tiny_root):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_qwen(request.param, root=tiny_root)
    return request.param, path, AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def test_auto_classes_load_real_model_and_processor(loaded):
    family, path, model, processor = loaded
    assert type(model).__name__ == CLASSES[family]
    assert model.config.model_type == family
    assert (path / "model.safetensors").is_file() and (path / "preprocessor_config.json").is_file()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000  # tiny


def test_forward_on_processor_output(loaded):
    family, _, model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Is this a chair?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = processor(text=[text], images=images, return_tensors="pt")
    assert "mm_token_type_ids" in inputs
    n_pad = int((inputs["input_ids"] == model.config.image_token_id).sum())
    merge = processor.image_processor.merge_size
    assert n_pad == int(inputs["image_grid_thw"].prod(-1).sum()) // merge**2
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_tokenizer_yes_no_single_tokens_and_special_layout(loaded):
    family, _, model, processor = loaded
    tok = processor.tokenizer
    ids = {w: tok.encode(w, add_special_tokens=False) for w in ("Yes", "No", " Yes", " No")}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == 4  # " Yes" is a different token from "Yes"
    base = tok.convert_tokens_to_ids("<|endoftext|>")
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(base, base + len(SPECIAL_TOKENS)))
    cfg = model.config
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.decode(tok.encode("A red chair, 3D.")) == "A red chair, 3D."


def test_chat_template_behaviour(loaded):
    family, _, _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    system = "" if family == "qwen3_vl" else "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert text == system + body
    with_system = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    text = processor.apply_chat_template(with_system, add_generation_prompt=False, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_preprocessor_constants(loaded):
    family, path, model, processor = loaded
    cfg = json.loads((path / "preprocessor_config.json").read_text())
    patch = 16 if family == "qwen3_vl" else 14
    assert cfg["patch_size"] == patch == model.config.vision_config.patch_size
    assert cfg["merge_size"] == 2 == model.config.vision_config.spatial_merge_size
    if family == "qwen3_vl":
        assert cfg["image_mean"] == [0.5] * 3 and cfg["image_std"] == [0.5] * 3
    else:
        assert cfg["image_mean"][0] == pytest.approx(0.48145466) and cfg["image_std"][0] == pytest.approx(0.26862954)
        assert (cfg["min_pixels"], cfg["max_pixels"]) == (56 * 56, 28 * 28 * 1280)


def test_build_is_cached_and_deterministic(tiny_root, tmp_path):
    a = build_tiny_qwen("qwen2_5_vl", root=tiny_root)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_qwen("qwen2_5_vl", root=tiny_root) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    b = build_tiny_qwen("qwen2_5_vl", root=tmp_path)
    from safetensors.torch import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="qwen2_vl, qwen2_5_vl, qwen3_vl"):
        build_tiny_qwen("llava", root=tmp_path)
