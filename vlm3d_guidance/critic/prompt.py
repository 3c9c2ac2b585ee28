"""The critic's question as token ids, from the processor and the model config alone (no weights).

:class:`~vlm3d_guidance.critic.VLMCritic` builds every query through :func:`query_ids` and
:func:`check_length`; :func:`check_prompt_fits` runs the same count before any model is loaded, so
a description too long for the model's context is refused in a second, not after Hunyuan3D and
the critic have loaded and the first sampling step has run.

One query is one user turn: ``n_views`` image placeholders, then the query text, rendered with the
checkpoint's own chat template and its generation prompt. Each placeholder stands for
``per_image = gh * gw / merge_size**2`` image tokens (``gh x gw``: the view's patch grid after
Qwen-VL's smart-resize, :func:`~vlm3d_guidance.critic.vision.grid_hw`).
"""

from __future__ import annotations

from .templates import QuerySpec, resolve_query
from .vision import VisionSpec, tokens_per_image


def query_ids(processor, image_token_id: int, text: str, n_views: int, per_image: int) -> list:
    """The token ids of one query about ``n_views`` views, each image placeholder expanded to
    ``per_image`` copies of ``image_token_id`` (what the model's forward expects)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    messages = [{"role": "user", "content": [{"type": "image"}] * n_views + [{"type": "text", "text": text}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(rendered, add_special_tokens=False, verbose=False)  # the length is checked below
    n_found = sum(1 for i in ids if i == image_token_id)
    if n_found != n_views:
        raise ValueError(
            f"the chat template rendered {n_found} image placeholders for {n_views} views"
        )
    expanded = []
    for i in ids:
        expanded.extend([i] * per_image if i == image_token_id else [i])
    return expanded


def context_length(config) -> int | None:
    """The model's context (``max_position_embeddings`` of its text config), None when unknown."""
    text_cfg = getattr(config, "text_config", config)
    return int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None


def check_length(n_tokens: int, max_length: int | None, n_views: int, per_image: int) -> None:
    """ValueError when a query of ``n_tokens`` does not fit a context of ``max_length``."""
    if max_length is not None and n_tokens > max_length:
        raise ValueError(
            f"the prompt is {n_tokens} tokens ({n_views} views x {per_image} image tokens + text), "
            f"longer than the model's context of {max_length}; use fewer or smaller views or a shorter description"
        )


def prompt_length(processor, config, description: str, query: QuerySpec = "dual", num_views: int = 4,
                  size: int = 448) -> int:
    """Tokens of the longest query about ``num_views`` square views of ``size`` px with ``description``
    filled in; the ValueError of :func:`check_length` when it does not fit the model's context."""
    spec = VisionSpec.from_processor(processor.image_processor, getattr(config, "vision_config", None))
    per_image = tokens_per_image(size, size, spec)
    longest = 0
    for q in resolve_query(query):
        n = len(query_ids(processor, int(config.image_token_id), q.fill(description), num_views, per_image))
        check_length(n, context_length(config), num_views, per_image)
        longest = max(longest, n)
    return longest


def check_prompt_fits(model_id_or_path, description: str, query: QuerySpec = "dual", num_views: int = 4,
                      size: int = 448) -> int:
    """:func:`prompt_length` for a checkpoint (hub id or folder), loading only its config and processor."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_id_or_path)
    processor = AutoProcessor.from_pretrained(model_id_or_path)
    return prompt_length(processor, config, description, query, num_views, size)
