"""What the tiny-model benchmarks share: their input picture and the guided pipeline they time.

Imported by ``bench_pipeline.py`` and ``bench_step_speed.py`` (run as scripts, so this folder is on
``sys.path``); ``run_all.py`` runs ``bench_*.py`` only, so this module is never run on its own.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def block_image(size: int = 64) -> Image.Image:
    """A ``size`` x ``size`` RGBA picture: an opaque red-brown block on transparency."""
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[12:52, 18:46] = (200, 60, 40, 255)
    return Image.fromarray(rgba)


def tiny_guided_pipeline(root: str, config=None):
    """``GuidedHunyuanPipeline`` over the tiny standard Hunyuan3D and the tiny Qwen2.5-VL critic,
    both built (or reused) under ``root`` and loaded through their real loaders; ``config``
    default: ``GuidanceConfig()``."""
    from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

    critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=root), device="cpu")
    return GuidedHunyuanPipeline(load_tiny_hunyuan_pipeline("standard", root=root), critic,
                                 config if config is not None else GuidanceConfig())
