"""Differentiable Qwen-VL image inputs in torch.

transformers' ``Qwen2VLImageProcessor`` works on uint8/PIL images and is not differentiable. This
module does the same steps on float tensors, with autograd, reading every constant from the
checkpoint's image processor (``preprocessor_config.json``) and vision config:

1. smart-resize: the output side lengths are multiples of ``factor = patch_size * merge_size``
   (28 for Qwen2/2.5-VL, 32 for Qwen3-VL), the pixel count lies in ``[min_pixels, max_pixels]``
   and the aspect ratio is kept as closely as possible; bicubic with antialiasing, clamped to the
   valid pixel range like the uint8 path. When the input side lengths already satisfy this, nothing
   is resampled, and the result equals the HF processor's exactly (render at such sizes).
2. rescale: ``v = x * 255 * rescale_factor`` (``x`` in [0, 1] stands for the uint8 value ``255 x``).
3. normalise: ``(v - mean[c]) / std[c]``.
4. patchify in the model's order: grid ``gh = H' / P``, ``gw = W' / P``; patches grouped by
   ``merge x merge`` blocks (row-major over blocks, then row-major inside a block), each patch
   flattened as ``[C, T, P, P]`` with the still image repeated ``T = temporal_patch_size`` times.

Conventions: images are ``[N, 3, H, W]``, channels RGB, values in [0, 1]. Outputs are
``pixel_values [N * gh * gw, C * T * P * P]`` and ``image_grid_thw [N, 3] = [[1, gh, gw]] * N``
(int64); each image becomes ``gh * gw / merge**2`` ``<|image_pad|>`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VisionSpec:
    """The image-input constants of one Qwen-VL checkpoint (all read from its configs)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor(cls, image_processor, vision_config=None) -> "VisionSpec":
        """Read the constants from a loaded HF image processor (and check them against the
        model's ``vision_config`` when given: patch, merge and temporal sizes must agree)."""
        ip = image_processor

        def get(name, default=None):
            value = getattr(ip, name, None)
            return default if value is None else value

        size = get("size", {}) or {}
        if not isinstance(size, dict):
            size = {k: getattr(size, k, None) for k in ("shortest_edge", "longest_edge")}
        min_pixels = size.get("shortest_edge") or get("min_pixels")
        max_pixels = size.get("longest_edge") or get("max_pixels")
        if not min_pixels or not max_pixels:
            raise ValueError(
                f"the image processor {type(ip).__name__} gives no min/max pixels "
                f"(size={size!r}); expected a Qwen2VLImageProcessor config"
            )
        mean, std = get("image_mean"), get("image_std")
        if mean is None or std is None:
            raise ValueError(f"the image processor {type(ip).__name__} gives no image_mean/image_std")
        mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
        std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
        spec = cls(
            patch_size=int(get("patch_size")),
            merge_size=int(get("merge_size")),
            temporal_patch_size=int(get("temporal_patch_size")),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=mean,
            image_std=std,
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_resize=bool(get("do_resize", True)),
            do_rescale=bool(get("do_rescale", True)),
            do_normalize=bool(get("do_normalize", True)),
        )
        if vision_config is not None:
            for ours, theirs in (("patch_size", "patch_size"), ("merge_size", "spatial_merge_size"),
                                 ("temporal_patch_size", "temporal_patch_size")):
                model_value = getattr(vision_config, theirs, None)
                if model_value is not None and int(model_value) != getattr(spec, ours):
                    raise ValueError(
                        f"the image processor's {ours}={getattr(spec, ours)} disagrees with the model's "
                        f"vision_config.{theirs}={model_value}"
                    )
        return spec


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target ``(height, width)``: multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible (the rule of Qwen-VL's image processor).

    Raises ``ValueError`` when the aspect ratio exceeds 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width}")
    h = round(height / factor) * factor  # may be 0 for a tiny side: then the min_pixels branch rescales
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def grid_hw(height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    """Patch grid ``(gh, gw)`` of an ``height x width`` input after smart-resize."""
    if spec.do_resize:
        height, width = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
    elif height % spec.factor or width % spec.factor:
        raise ValueError(
            f"do_resize is off in this checkpoint, so image sides must be multiples of {spec.factor}; got {height}x{width}"
        )
    return height // spec.patch_size, width // spec.patch_size


def tokens_per_image(height: int, width: int, spec: VisionSpec) -> int:
    """Number of ``<|image_pad|>`` tokens one ``height x width`` image becomes."""
    gh, gw = grid_hw(height, width, spec)
    return gh * gw // (spec.merge_size ** 2)


def image_inputs(images: torch.Tensor, spec: VisionSpec, dtype: torch.dtype | None = None):
    """Differentiable Qwen-VL image inputs.

    Args:
        images: ``[N, C, H, W]`` float tensor, values in [0, 1] (``C = len(spec.image_mean)``).
        spec: the checkpoint's :class:`VisionSpec`.
        dtype: dtype of the returned ``pixel_values`` (the vision tower's); computation runs in
            float32 (float64 if ``images`` is float64) and is cast at the end.

    Returns:
        ``(pixel_values [N * gh * gw, C * T * P * P], image_grid_thw [N, 3] int64)``, both on
        ``images.device``; ``pixel_values`` is differentiable with respect to ``images``.
    """
    n, c, height, width = images.shape
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work)
    gh, gw = grid_hw(height, width, spec)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    new_h, new_w = gh * p, gw * p
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)  # the uint8 path saturates overshoot the same way
    if spec.do_rescale:
        x = x * (255.0 * spec.rescale_factor)
    else:
        x = x * 255.0
    if spec.do_normalize:
        mean = torch.tensor(spec.image_mean, dtype=work, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(spec.image_std, dtype=work, device=x.device).view(1, c, 1, 1)
        x = (x - mean) / std
    # [N, C, gh/m, m, P, gw/m, m, P] -> [N, gh/m, gw/m, m, m, C, P, P]
    x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    # repeat the still image along time: [..., C, T, P, P]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    pixel_values = x.reshape(n * gh * gw, c * t * p * p)
    if dtype is not None:
        pixel_values = pixel_values.to(dtype)
    grid = torch.tensor([[1, gh, gw]] * n, dtype=torch.long, device=images.device)
    return pixel_values, grid
