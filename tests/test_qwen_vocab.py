"""The critic on the REAL Qwen vocabulary (../shared/third_party/qwen_vocab/qwen.tiktoken), the
refusal of "Thinking" checkpoints, and loading with device_map.

The rank file is converted to a tokenizer the way its README says (transformers' TikTokenConverter
with Qwen2's pre-tokenizer regex, the Qwen special tokens from id 151643), and the expected token
sequence of a rendered prompt comes independently from ``tiktoken`` itself. These tests skip, with
the reason, when ../shared is absent (a user's own clone); CI always has it.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlm3d_guidance.critic import DUAL_TEMPLATE, VLMCritic
from vlm3d_guidance.critic.critic import check_answer_position
from vlm3d_guidance.tiny.qwen import EXTRA_TOKENS, SPECIAL_TOKENS, build_tiny_qwen

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VLM3D_SHARED_DIR", REPO.parent / "shared"))
VOCAB = SHARED / "third_party" / "qwen_vocab" / "qwen.tiktoken"
PROMPT = "a red chair with four legs"
needs_vocab = pytest.mark.skipif(not VOCAB.is_file(), reason=f"{VOCAB} not found (../shared is only in the "
                                 "project's checkout and CI; set VLM3D_SHARED_DIR to point at it)")
FIRST_SPECIAL = 151643


@pytest.fixture(scope="module")
def real_critic(tiny_root):
    """A VLMCritic whose processor carries the real Qwen vocabulary, over a tiny Qwen2.5-VL model
    (real class, embeddings sized for the real vocabulary and the real special-token ids)."""
    import transformers
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = TikTokenConverter(vocab_file=str(VOCAB), pattern=PRETOKENIZE_REGEX,
                                extra_special_tokens=list(SPECIAL_TOKENS + EXTRA_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tiny = build_tiny_qwen("qwen2_5_vl", root=tiny_root)
    tiny_proc = transformers.AutoProcessor.from_pretrained(tiny)
    processor = transformers.Qwen2_5_VLProcessor(image_processor=tiny_proc.image_processor, tokenizer=tokenizer,
                                                 video_processor=tiny_proc.video_processor,
                                                 chat_template=tiny_proc.chat_template)
    cfg = transformers.AutoConfig.from_pretrained(tiny)
    cfg.text_config.vocab_size = 151936
    ids = {name: FIRST_SPECIAL + SPECIAL_TOKENS.index(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    for name, value in ids.items():
        setattr(cfg, name, value)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    return VLMCritic(model, processor)


def _tiktoken_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = {t: FIRST_SPECIAL + i for i, t in enumerate(SPECIAL_TOKENS + EXTRA_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=load_tiktoken_bpe(str(VOCAB)),
                             special_tokens=specials)


@needs_vocab
def test_yes_and_no_are_the_real_single_tokens(real_critic):
    assert (real_critic.yes_id, real_critic.no_id) == (9454, 2753)
    assert real_critic.image_token_id == 151655
    enc = _tiktoken_encoding()
    assert enc.encode("Yes") == [9454] and enc.encode("No") == [2753]  # independently
    assert real_critic.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|vision_start|>"]) == [151644, 151652]


@needs_vocab
def test_dual_query_renders_to_the_tiktoken_sequence(real_critic):
    n, grid = 2, (16, 16)  # 224 px views: 8 x 8 = 64 image tokens each after the 2x2 merge
    ids, mm = real_critic._prompt(DUAL_TEMPLATE.replace("{description}", PROMPT), n, grid)
    view = "<|vision_start|>" + "<|image_pad|>" * 64 + "<|vision_end|>"
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + view * n
            + DUAL_TEMPLATE.replace("{description}", PROMPT) + "<|im_end|>\n<|im_start|>assistant\n")
    expected = _tiktoken_encoding().encode(text, allowed_special="all")
    assert ids[0].tolist() == expected
    assert len(expected) > 2 * 64 + 100  # the whole query, not only the placeholders
    assert expected[-3:] == [151644, 77091, 198]  # "<|im_start|>" "assistant" "\n": Yes/No comes next
    assert int(mm.sum()) == n * 64 and bool((mm[0] == 1).eq(ids[0] == 151655).all())


@needs_vocab
def test_real_vocabulary_critic_gives_a_reward_and_gradient(real_critic):
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    r = real_critic.reward(x, PROMPT)
    r.backward()
    w = real_critic.model.lm_head.weight
    assert torch.isfinite(r) and x.grad.abs().max() > 0 and float((w[9454] - w[2753]).abs().max()) > 0


def _copy_with(tiny_root, tmp_path, name, template_suffix=None):
    src = build_tiny_qwen("qwen3_vl", root=tiny_root)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if template_suffix is not None:
        path = dst / "chat_template.jinja"
        text = path.read_text()
        gen = "{{- '<|im_start|>assistant\\n' -}}"
        assert gen in text
        path.write_text(text.replace(gen, "{{- '<|im_start|>assistant\\n" + template_suffix + "' -}}"))
    return dst


def test_thinking_checkpoints_are_refused_before_loading(tiny_root, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForImageTextToText.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real(*a, **k))
    think_template = _copy_with(tiny_root, tmp_path, "Qwen3-VL-tiny-Instruct", "<think>\\n")
    with pytest.raises(ValueError, match="Thinking.*<think>.*Instruct"):
        VLMCritic.from_pretrained(think_template)
    named = _copy_with(tiny_root, tmp_path, "Qwen3-VL-8B-Thinking")
    with pytest.raises(ValueError, match="Qwen3-VL-8B-Thinking is a 'Thinking' checkpoint"):
        VLMCritic.from_pretrained(named)
    odd = _copy_with(tiny_root, tmp_path, "Qwen3-VL-odd", "Sure! ")
    with pytest.raises(ValueError, match="generation prompt does not end with"):
        VLMCritic.from_pretrained(odd)
    assert not loads  # refused before any weight was read
    ok = VLMCritic.from_pretrained(build_tiny_qwen("qwen3_vl", root=tiny_root))
    assert len(loads) == 1 and ok.family == "qwen3_vl"
    # a model already loaded is checked too
    processor = transformers.AutoProcessor.from_pretrained(think_template)
    with pytest.raises(ValueError, match="Thinking"):
        VLMCritic(ok.model, processor)
    check_answer_position(ok.processor, "Qwen/Qwen3-VL-8B-Instruct")  # passes


def test_critic_loads_with_device_map(tiny_root, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForImageTextToText.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: seen.append(k) or real(*a, **k))
    critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_vl", root=tiny_root), device="cpu")
    assert seen[-1]["device_map"] == {"": "cpu"} and critic.device.type == "cpu"
    VLMCritic.from_pretrained(build_tiny_qwen("qwen2_vl", root=tiny_root), device_map="cpu")
    assert seen[-1]["device_map"] == "cpu"  # the caller's own map is kept
