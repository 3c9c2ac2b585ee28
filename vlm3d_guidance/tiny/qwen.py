"""Tiny, randomly-initialised Qwen-VL checkpoints of the REAL transformers classes.

:func:`build_tiny_qwen` writes a folder laid out like a published Qwen-VL checkpoint
(``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``, ``preprocessor_config.json``), so that
``AutoModelForImageTextToText.from_pretrained(folder)`` and ``AutoProcessor.from_pretrained(folder)``
read it exactly as they read the real ones. Nothing is downloaded.

What is real:

- the model classes (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
  ``Qwen3VLForConditionalGeneration``), vision patch size (14; Qwen3-VL 16), spatial merge 2,
  temporal patch 2, M-RoPE, window attention (2.5) and deepstack (3);
- the special-token layout: the Qwen special tokens follow the ordinary vocabulary in the real
  order (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ..., ``<|vision_start|>``,
  ``<|vision_end|>``, ``<|vision_pad|>``, ``<|image_pad|>``, ``<|video_pad|>``, ...), and the
  config's ``image_token_id`` / ``vision_start_token_id`` etc. point at them;
- the tokenizer pipeline (NFC, Qwen2's split regex, byte-level BPE, byte-level decoder);
- the image processor constants (CLIP mean/std, ``min_pixels = 56*56``, ``max_pixels = 28*28*1280``;
  Qwen3-VL: mean = std = 0.5 and its own pixel limits).

What is tiny: a byte-level BPE vocabulary of a few hundred tokens trained on a small built-in corpus
("Yes", "No", " Yes" and " No" are single tokens), 2 text layers of width 64 and a 2-block vision
tower of width 32. The weights are random (seeded), so the outputs are meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

from .common import atomic_folder, default_cache_dir, is_complete

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

_VERSION = "tiny-qwen-1"

_FOLDER_NAMES = {
    "qwen2_vl": "Qwen2-VL-tiny",
    "qwen2_5_vl": "Qwen2.5-VL-tiny",
    "qwen3_vl": "Qwen3-VL-tiny",
}

# The Qwen2/2.5/3-VL special tokens, in the order (and so the relative id layout) of the real
# vocabularies: the real ids are 151643 + index.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (non-special) tokens that follow in the real vocabularies.
EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

_BPE_VOCAB = 640  # ordinary (byte-level BPE) tokens, before the special tokens
_MODEL_VOCAB = 704  # embedding rows: BPE + specials, padded to a multiple of 64 like the real ones

# Our own chat template with the behaviour of Qwen2-VL's: an optional default system turn,
# string or list content, image items as <|vision_start|><|image_pad|><|vision_end|>, video
# items as <|vision_start|><|video_pad|><|vision_end|>, optional "Picture k: " labels
# (add_vision_id), and the generation prompt "<|im_start|>assistant\n".
_CHAT_TEMPLATE = (
    "{%- set counts = namespace(image=0, video=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and default_system -%}"
    "{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{%- set counts.image = counts.image + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' + counts.image|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set counts.video = counts.video + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' + counts.video|string + ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A small corpus for the BPE merges: the critic's own query words plus answers, so prompts
# tokenise into a reasonable number of tokens and the answers are single tokens.
_CORPUS = [
    "Carefully evaluate the provided images, which show multiple views of a single 3D object. "
    "Does the underlying 3D object, considering all views together, meet all of the following "
    "criteria simultaneously?",
    "1. Content Match: The object corresponds to the description: a red chair with four legs.",
    "2. Geometric Quality: Based on all views combined, the object appears geometrically sound and "
    "consistent. There are no visible signs of major flaws such as multiple faces on one part "
    "(Janus-faced issue), broken surfaces, intersecting geometry, or highly unrealistic polygonal "
    "facets when considering the object from these different perspectives.",
    "Strictly respond with only 'Yes' or 'No'.",
    "Describe the object in this image in one short sentence.",
    "You are a helpful assistant.",
    "a wooden table, a blue car, a small dog, a white mug, a toy robot, an old lamp, a green plant",
] + ["Yes No Yes No\nYes\nNo\n'Yes' 'No' Yes. No."] * 40


def _vision_text_configs(family: str) -> tuple[dict, dict]:
    """Tiny (vision_config, text_config) dicts for ``family``: real patch/merge sizes, tiny widths."""
    head_dim = 16
    text = dict(
        vocab_size=_MODEL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=_BPE_VOCAB + SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=_BPE_VOCAB + SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=_BPE_VOCAB + SPECIAL_TOKENS.index("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    )
    if family == "qwen2_vl":
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, hidden_act="quick_gelu", mlp_ratio=2, num_heads=2,
            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        )
    elif family == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, hidden_act="silu", num_heads=2, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2,
        )
    elif family == "qwen3_vl":
        text.update(head_dim=head_dim, rope_parameters={
            "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        })
        text.pop("pad_token_id")
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, hidden_act="gelu_pytorch_tanh", num_heads=2,
            in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=64, num_position_embeddings=256, deepstack_visual_indexes=[0],
        )
    else:  # pragma: no cover - checked by the caller
        raise ValueError(family)
    return vision, text


def _model_class(family: str):
    import transformers

    return {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
    }[family]


def _config(family: str):
    import transformers

    vision, text = _vision_text_configs(family)
    cls = {
        "qwen2_vl": transformers.Qwen2VLConfig,
        "qwen2_5_vl": transformers.Qwen2_5_VLConfig,
        "qwen3_vl": transformers.Qwen3VLConfig,
    }[family]
    ids = {f"{name}_token_id": _BPE_VOCAB + SPECIAL_TOKENS.index(tok) for name, tok in (
        ("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
        ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"))}
    return cls(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def _train_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with Qwen2's pre-tokenizer and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    def pipeline(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        return tok

    tok = pipeline(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    n = tok.get_vocab_size()
    if n > _BPE_VOCAB:  # pragma: no cover - trainer contract
        raise RuntimeError(f"BPE trainer produced {n} tokens, more than {_BPE_VOCAB}")
    # Pad the ordinary vocabulary to exactly _BPE_VOCAB entries (fillers no merge can reach) so the
    # special tokens get fixed ids right after it, as in the real vocabularies.
    spec = json.loads(tok.to_str())["model"]
    vocab = dict(spec["vocab"])
    for i in range(_BPE_VOCAB - n):
        vocab[f"<|unused_{i}|>"] = n + i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = pipeline(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                              byte_fallback=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != _BPE_VOCAB + i:  # pragma: no cover
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {_BPE_VOCAB + i}")
    for word in ("Yes", "No", " Yes", " No"):
        if len(tok.encode(word, add_special_tokens=False).ids) != 1:  # pragma: no cover
            raise RuntimeError(f"tiny BPE does not encode {word!r} as one token")
    return tok


def _preprocessor_config(family: str) -> dict:
    if family == "qwen3_vl":
        mean = std = [0.5, 0.5, 0.5]
        patch, min_px, max_px = 16, 256 * 256, 4096 * 4096  # Qwen3-VL shortest/longest edge
    else:
        mean = [0.48145466, 0.4578275, 0.40821073]
        std = [0.26862954, 0.26130258, 0.27577711]
        patch, min_px, max_px = 14, 56 * 56, 28 * 28 * 1280
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor" if family == "qwen3_vl" else (
            "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"),
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
        "min_pixels": min_px,
        "max_pixels": max_px,
        "size": {"shortest_edge": min_px, "longest_edge": max_px},
        "patch_size": patch,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def _write_tokenizer(folder: Path, family: str) -> None:
    tok = _train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    added = {}
    for t in SPECIAL_TOKENS + EXTRA_TOKENS:
        added[str(tok.token_to_id(t))] = {
            "content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                      "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                      "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                                      "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                      "<|video_pad|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    system = None if family == "qwen3_vl" else "You are a helpful assistant."
    # Qwen3-VL's template emits no default system turn; Qwen2/2.5-VL's emits one.
    template = (
        "{%- set default_system = " + json.dumps(system if system else "") + " -%}" + _CHAT_TEMPLATE
    )
    (folder / "chat_template.jinja").write_text(template)


def build_tiny_qwen(family: str = "qwen2_5_vl", root=None, seed: int = 0) -> Path:
    """Write (or reuse) a tiny Qwen-VL checkpoint folder and return its path.

    Args:
        family: one of :data:`QWEN_FAMILIES` (``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``).
        root: parent folder; defaults to :func:`vlm3d_guidance.tiny.common.default_cache_dir`.
        seed: torch seed for the random weights (part of the folder name unless 0).

    Returns:
        ``<root>/<Qwen2-VL-tiny | Qwen2.5-VL-tiny | Qwen3-VL-tiny>[-seed<k>]``. Built atomically
        and cached: a complete folder of this builder's version is returned as is.
    """
    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown Qwen-VL family {family!r}; supported: {', '.join(QWEN_FAMILIES)}")
    root = Path(root) if root is not None else default_cache_dir()
    name = _FOLDER_NAMES[family] + (f"-seed{seed}" if seed else "")
    folder = root / name
    version = f"{_VERSION}:{family}:{seed}"
    if is_complete(folder, version):
        return folder

    import torch

    with atomic_folder(folder, version) as tmp:
        config = _config(family)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            model = _model_class(family)(config).to(torch.float32).eval()
        finally:
            torch.random.set_rng_state(state)
        model.generation_config.do_sample = False
        model.generation_config.eos_token_id = [config.text_config.eos_token_id,
                                                _BPE_VOCAB + SPECIAL_TOKENS.index("<|endoftext|>")]
        model.generation_config.pad_token_id = _BPE_VOCAB + SPECIAL_TOKENS.index("<|endoftext|>")
        model.save_pretrained(tmp)
        _write_tokenizer(tmp, family)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config(family), indent=2))
    return folder
