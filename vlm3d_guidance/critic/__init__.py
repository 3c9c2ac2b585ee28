"""The VLM critic: a Qwen-VL model's Yes/No log-odds as a reward, differentiable into rendered views.

- :class:`VLMCritic` -- ``reward(images [N, 3, H, W] in [0, 1], prompt) -> 0-d tensor``, ``score``,
  ``describe``; ``VLMCritic.from_pretrained(model_id_or_path, ...)``.
- :class:`CriticScore` -- reward, p_yes and per-query parts.
- Templates: ``DUAL_TEMPLATE`` (the paper's query, the default), ``CONTENT_TEMPLATE``,
  ``GEOMETRY_TEMPLATE``, ``TEMPLATES`` (name -> text), :func:`resolve_query`.
- :mod:`.vision` -- the differentiable Qwen-VL image inputs (smart-resize, normalise, patchify).
"""

from .critic import REWARD_MODES, SUPPORTED_FAMILIES, CriticScore, VLMCritic
from .templates import (
    CONTENT_TEMPLATE,
    DESCRIBE_PROMPT,
    DUAL_TEMPLATE,
    GEOMETRY_TEMPLATE,
    TEMPLATES,
    Query,
    resolve_query,
)
from .vision import VisionSpec, image_inputs, smart_resize

__all__ = [
    "VLMCritic",
    "CriticScore",
    "SUPPORTED_FAMILIES",
    "REWARD_MODES",
    "DUAL_TEMPLATE",
    "CONTENT_TEMPLATE",
    "GEOMETRY_TEMPLATE",
    "TEMPLATES",
    "DESCRIBE_PROMPT",
    "Query",
    "resolve_query",
    "VisionSpec",
    "image_inputs",
    "smart_resize",
]
