"""VLMCritic: the paper's Yes/No reward ``r = z_yes - z_no`` (VLM3D eqs. 6-8), differentiable into images.

The critic asks a Qwen-VL model one question about N views of an object, all in one user turn (the
N images in order, then the query text, rendered with the checkpoint's own chat template and the
generation prompt ``<|im_start|>assistant\\n``), and reads the next-token logits of "Yes" and "No" at
the first answer position. Gradients flow from the reward through the frozen model and the torch
re-implementation of the image processor (:mod:`vlm3d_guidance.critic.vision`) into the pixels.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .prompt import check_length, context_length, query_ids
from .describe import describe
from .templates import QuerySpec, resolve_query
from .vision import VisionSpec, grid_hw, image_inputs

#: ``config.model_type`` values the critic supports.
SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
REWARD_MODES = ("logit", "prob")
_RANGE_TOL = 1e-3  # how far outside [0, 1] a pixel may stray (renderer round-off) before it is an error
_PROMPT_CACHE_SIZE = 64


@dataclass
class CriticScore:
    """Result of :meth:`VLMCritic.score`.

    Attributes:
        reward: 0-d tensor, the (weighted) reward, differentiable into the images.
        p_yes: two-way probability of "Yes", ``sigmoid(z_yes - z_no)`` (paper eq. 7); for several
            queries the weight-averaged value (weights normalised by the sum of their magnitudes).
        parts: query name -> that query's own (unweighted) reward, as floats.
    """

    reward: torch.Tensor
    p_yes: float
    parts: dict = field(default_factory=dict)


def _check_family(config) -> str:
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported VLM family {family!r}: the critic supports {', '.join(SUPPORTED_FAMILIES)} "
            "(Qwen2-VL, Qwen2.5-VL, Qwen3-VL checkpoints)"
        )
    return family


def _resolve_dtype(dtype, device):
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return "auto"
        try:
            dtype = getattr(torch, dtype)
        except AttributeError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, a dtype name or 'auto', got {dtype!r}")
    return dtype


def log_odds_from_hidden(hidden: torch.Tensor, lm_head, yes_id: int, no_id: int) -> torch.Tensor:
    """``r = z_yes - z_no`` (0-d) from a final hidden state ``[D]`` and an ``nn.Linear`` ``lm_head``.

    Computed as ``(W[yes] - W[no]) @ h (+ b[yes] - b[no])`` in ``promote(dtype, float32)``: the two
    weight rows and the hidden state are cast up first (the difference of two bf16 rows is exact in
    float32), so a bf16 model's reward is resolved to float32 round-off of the product instead of
    being quantised like bf16 logits (a step of 0.125 at |z| in [16, 32)). Differentiable with
    respect to ``hidden``.
    """
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    w = lm_head.weight
    diff = w[yes_id].to(out_dtype) - w[no_id].to(out_dtype)  # [D]
    r = diff @ hidden.to(out_dtype)
    bias = getattr(lm_head, "bias", None)
    if bias is not None:
        r = r + (bias[yes_id].to(out_dtype) - bias[no_id].to(out_dtype))
    return r


_ANSWER_START = "<|im_start|>assistant\n"


def check_answer_position(processor, name_or_path: str = "") -> None:
    """Refuse checkpoints whose answer does not begin right after ``<|im_start|>assistant\n``.

    The reward is read at the first answer position, so the generation prompt must end there.
    Qwen3-VL "Thinking" checkpoints open their answer with a ``<think>`` block (their chat template
    appends ``<think>\n`` to the generation prompt, and even without it they first think), so their
    first token is not Yes/No. Raises ValueError naming the problem and the fix (an Instruct
    checkpoint).
    """
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is it? Answer Yes or No."}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tail = rendered.rsplit(_ANSWER_START, 1)
    thinking = "thinking" in str(name_or_path).replace("\\", "/").rstrip("/").split("/")[-1].lower()
    if len(tail) == 2 and tail[1].strip() == "" and not thinking:
        return
    if thinking or (len(tail) == 2 and "<think>" in tail[1]):
        raise ValueError(
            f"{name_or_path or 'this checkpoint'} is a 'Thinking' checkpoint: it begins its answer with a "
            "<think> block, so the first answer token is not Yes/No and the critic cannot read its reward; "
            "use the Instruct variant (e.g. Qwen/Qwen3-VL-8B-Instruct)")
    raise ValueError(
        f"the chat template's generation prompt does not end with {_ANSWER_START!r} (it ends with "
        f"{rendered[-40:]!r}); the critic reads Yes/No at the first answer position, so it needs a "
        "Qwen-VL Instruct template")


def _load_model(auto_cls, model_id_or_path, device, kwargs: dict):
    """Load the weights straight onto ``device`` (``device_map``), so a 7B checkpoint does not first
    fill host RAM; a caller's own ``device_map`` (e.g. "auto" over several GPUs) is kept."""
    kwargs = dict(kwargs)
    kwargs.setdefault("device_map", {"": str(torch.device(device))})
    return auto_cls.from_pretrained(model_id_or_path, **kwargs)


class VLMCritic:
    """A frozen Qwen-VL model used as a differentiable Yes/No critic.

    Args:
        model: a loaded ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` /
            ``Qwen3VLForConditionalGeneration`` (any dtype, any device). Its weights are frozen
            (``requires_grad_(False)``) and it is put in eval mode.
        processor: the matching HF processor (tokenizer with chat template + image processor).
        query: template name (``"dual"``, ``"content"``, ``"geometry"``), a custom template string
            containing ``{description}``, or a dict ``{template-or-name: weight}`` (weighted sum;
            the queries share one vision-tower pass over the views, then each runs the language
            model on its own text).
        reward_mode: ``"logit"`` -> ``z_yes - z_no`` (paper eq. 8); ``"prob"`` ->
            ``P(Yes) - P(No)`` with the two-way probabilities of eq. 7 (``= tanh((z_yes - z_no) / 2)``),
            a bounded reward.
        activation_checkpointing: recompute decoder and vision blocks in backward to save memory.
            transformers only checkpoints in train mode, so :meth:`reward` switches the model to
            train mode for the call and restores the previous mode afterwards (Qwen-VL has no active
            dropout, so results are identical).
    """

    def __init__(self, model, processor, query: QuerySpec = "dual", reward_mode: str = "logit",
                 activation_checkpointing: bool = False):
        self.family = _check_family(model.config)
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.model = model
        self.processor = processor
        self.queries = resolve_query(query)
        self.reward_mode = reward_mode
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(self.tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat template; the critic renders messages with the checkpoint's own")
        check_answer_position(processor, getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))

        model.requires_grad_(False)
        model.eval()
        self.activation_checkpointing = bool(activation_checkpointing)
        if self.activation_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            # transformers also hooks the text embeddings to require grad (for PEFT); the image
            # path already carries grad and non-reentrant checkpointing needs no such hook.
            if hasattr(model, "disable_input_require_grads"):
                with contextlib.suppress(Exception):
                    model.disable_input_require_grads()

        cfg = model.config
        self.vision = VisionSpec.from_processor(processor.image_processor, getattr(cfg, "vision_config", None))
        self.image_token_id = int(cfg.image_token_id)
        self.video_token_id = int(getattr(cfg, "video_token_id", -1))
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if pad != self.image_token_id:
            raise ValueError(
                f"tokenizer's <|image_pad|> id {pad} differs from the model's image_token_id {self.image_token_id}"
            )
        self.max_length = context_length(cfg)
        self.yes_id = self._single_token_id("Yes")
        self.no_id = self._single_token_id("No")
        self._prompt_cache: OrderedDict = OrderedDict()
        # Several queries about the same views share one vision-tower pass when the model's forward
        # takes precomputed image features (transformers >= 5.x: ``mm_encoder_outputs``).
        self._shares_image_features = ("mm_encoder_outputs" in inspect.signature(model.forward).parameters
                                       and hasattr(model, "get_image_features"))
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_id_or_path, device="cpu", dtype=None, attn_implementation=None,
                        activation_checkpointing: bool = False, query: QuerySpec = "dual",
                        reward_mode: str = "logit", **model_kwargs) -> "VLMCritic":
        """Load a Qwen-VL checkpoint (hub id or local folder) with the Auto classes.

        ``dtype=None`` means bfloat16 on CUDA and float32 elsewhere; a torch dtype, its name or
        ``"auto"`` (the checkpoint's) are also accepted. The family is checked from the config
        before any weight is loaded.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(model_id_or_path)
        _check_family(config)
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        resolve_query(query)  # fail early on a bad query
        kwargs = dict(model_kwargs)
        kwargs["dtype"] = _resolve_dtype(dtype, device)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        processor = AutoProcessor.from_pretrained(model_id_or_path)
        check_answer_position(processor, str(model_id_or_path))  # before any weight is loaded
        model = _load_model(AutoModelForImageTextToText, model_id_or_path, device, kwargs)
        return cls(model, processor, query=query, reward_mode=reward_mode,
                   activation_checkpointing=activation_checkpointing)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _single_token_id(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer encodes {word!r} as {len(ids)} tokens {ids}; the critic needs one")
        return int(ids[0])

    # ------------------------------------------------------------------ validation
    def _check_images(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"images must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}")
        if images.ndim != 4:
            hint = " (a single view: use images[None])" if images.ndim == 3 else ""
            raise ValueError(f"images must have rank 4 [N, 3, H, W], got shape {tuple(images.shape)}{hint}")
        n, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images must have 3 (RGB) channels in dim 1 [N, 3, H, W], got shape {tuple(images.shape)}")
        if n < 1 or h < 1 or w < 1:
            raise ValueError(f"images must hold at least one non-empty view, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor with values in [0, 1], got dtype {images.dtype}")
        with torch.no_grad():
            finite = torch.isfinite(images).all()
            lo, hi = images.min(), images.max()
        if not bool(finite):
            raise ValueError("images contain NaN or infinite values")
        lo, hi = float(lo), float(hi)
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(
                f"image values must lie in [0, 1], got min {lo:.4g}, max {hi:.4g}"
                + (" (uint8-style 0..255 values? divide by 255)" if hi > 1.5 else "")
            )
        return images

    # ------------------------------------------------------------------ prompt ids
    def _prompt(self, text: str, n_views: int, grid: tuple[int, int]):
        """``(input_ids [1, L], mm_token_type_ids [1, L])`` on the model device, cached per
        (query text, view count, patch grid)."""
        key = (text, n_views, grid)
        hit = self._prompt_cache.get(key)
        if hit is not None:
            self._prompt_cache.move_to_end(key)
            self.cache_hits += 1
            return hit
        self.cache_misses += 1
        per_image = grid[0] * grid[1] // (self.vision.merge_size ** 2)
        expanded = query_ids(self.processor, self.image_token_id, text, n_views, per_image)
        check_length(len(expanded), self.max_length, n_views, per_image)
        input_ids = torch.tensor([expanded], dtype=torch.long, device=self.device)
        mm = torch.zeros_like(input_ids)
        mm[input_ids == self.image_token_id] = 1
        mm[input_ids == self.video_token_id] = 2
        value = (input_ids, mm)
        self._prompt_cache[key] = value
        if len(self._prompt_cache) > _PROMPT_CACHE_SIZE:
            self._prompt_cache.popitem(last=False)
        return value

    def check_prompt(self, prompt: str, num_views: int, size: int) -> int:
        """Refuse, before any model runs, a description whose queries would not fit the model's context.

        Counts the tokens of every query for ``num_views`` square views of ``size`` px (what
        :meth:`reward` will be given during guidance) and raises the ValueError :meth:`reward` would;
        returns the longest query's token count. Tokenizer only: no model call.
        """
        grid = grid_hw(size, size, self.vision)
        return max(int(self._prompt(q.fill(prompt), num_views, grid)[0].shape[1]) for q in self.queries)

    # ------------------------------------------------------------------ model call
    @contextlib.contextmanager
    def _mode(self):
        """Train mode while checkpointing (transformers only checkpoints then); restore after."""
        was_training = self.model.training
        want_train = self.activation_checkpointing and torch.is_grad_enabled()
        self.model.train(want_train)
        try:
            yield
        finally:
            self.model.train(was_training)

    def _image_features(self, pixel_values, grid_thw):
        """The vision tower's output for the views, computed once and shared by every query
        (transformers' ``mm_encoder_outputs``), or None where the model cannot take it (then each
        query runs the vision tower itself: same values, more work)."""
        if len(self.queries) < 2 or not self._shares_image_features:
            return None
        with self._mode():
            return self.model.get_image_features(pixel_values, grid_thw, return_dict=True)

    def _log_odds(self, pixel_values, grid_thw, input_ids, mm_token_type_ids, image_features=None) -> torch.Tensor:
        """0-d ``z_yes - z_no`` at the last position, in float32 (float64 for float64 models).

        Computed from the language model's final hidden state ``[D]`` (after its last norm) and
        the two ``lm_head`` rows in float32 (:func:`log_odds_from_hidden`), not read off the
        full-vocabulary logits, which a bf16 model returns in bf16 (a step of 0.125 at |z| in
        [16, 32)); also two rows instead of the whole vocabulary.
        """
        images = (dict(mm_encoder_outputs={"image": image_features}) if image_features is not None
                  else dict(pixel_values=pixel_values))
        with self._mode():
            out = self.model.model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                image_grid_thw=grid_thw,
                mm_token_type_ids=mm_token_type_ids,
                use_cache=False,
                **images,
            )
        hidden = out.last_hidden_state[0, -1]  # [D], the model's dtype
        return log_odds_from_hidden(hidden, self.model.lm_head, self.yes_id, self.no_id)

    def _rewards(self, images: torch.Tensor, prompt: str):
        """Per-query ``(name, weight, reward 0-d, p_yes float)`` on the model device."""
        images = self._check_images(images)
        texts = [q.fill(prompt) for q in self.queries]  # validates the description before any work
        n, _, h, w = images.shape
        grid = grid_hw(h, w, self.vision)
        prompts = [self._prompt(t, n, grid) for t in texts]  # validates lengths before the model runs
        x = images.to(self.device)
        pixel_values, grid_thw = image_inputs(x, self.vision, dtype=self.dtype)
        features = self._image_features(pixel_values, grid_thw)
        out = []
        for q, (input_ids, mm) in zip(self.queries, prompts):
            logit = self._log_odds(pixel_values, grid_thw, input_ids, mm, features)
            r = logit if self.reward_mode == "logit" else torch.tanh(logit / 2)
            out.append((q.name, q.weight, r, float(torch.sigmoid(logit.detach()))))
        return out

    # ------------------------------------------------------------------ public API
    def reward(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """The critic's reward for N views of one object.

        Args:
            images: ``[N, 3, H, W]`` float tensor, RGB, values in [0, 1], any device; views in order.
            prompt: the object's text description (fills ``{description}``).

        Returns:
            0-d tensor on ``images.device`` (float32; float64 for a float64 model), the weighted sum
            of the queries' rewards, differentiable with respect to ``images``.
        """
        parts = self._rewards(images, prompt)
        total = sum(w * r for _, w, r, _ in parts)
        return total.to(images.device)

    def score(self, images: torch.Tensor, prompt: str) -> CriticScore:
        """Like :meth:`reward`, plus ``p_yes`` and each query's own reward (see :class:`CriticScore`)."""
        parts = self._rewards(images, prompt)
        total = sum(w * r for _, w, r, _ in parts).to(images.device)
        norm = sum(abs(w) for _, w, _, _ in parts) or 1.0
        p_yes = sum(abs(w) * p for _, w, _, p in parts) / norm
        return CriticScore(reward=total, p_yes=float(p_yes),
                           parts={name: float(r.detach()) for name, _, r, _ in parts})

    def describe(self, image, max_new_tokens: int = 32, **generate_kwargs) -> str:
        """A short description of a reference image (greedy decoding, no gradient): see
        :func:`vlm3d_guidance.critic.describe.describe`."""
        return describe(self, image, max_new_tokens, **generate_kwargs)

    def clear_cache(self) -> None:
        """Forget the cached prompt token ids."""
        self._prompt_cache.clear()

    def __repr__(self) -> str:
        names = ", ".join(f"{q.name}:{q.weight:g}" for q in self.queries)
        return (f"VLMCritic(family={self.family}, dtype={self.dtype}, device={self.device}, "
                f"queries=[{names}], reward_mode={self.reward_mode!r}, "
                f"activation_checkpointing={self.activation_checkpointing})")


__all__ = ["VLMCritic", "CriticScore", "SUPPORTED_FAMILIES", "REWARD_MODES", "log_odds_from_hidden"]
