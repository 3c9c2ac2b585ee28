"""vlm3d_guidance: VLM test-time guidance for Hunyuan3D shape sampling (VLM3D, sec. 4.3.2).

Public entry points (imported lazily so ``import vlm3d_guidance`` stays cheap):

- :class:`VLMCritic` -- the dual-query Yes/No reward ``r = z_yes - z_no``, differentiable
  into the rendered images.
- :class:`GuidanceConfig` -- every guidance knob, validated once.
- :class:`GuidedHunyuanPipeline` -- drop-in for hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline``.
"""

__version__ = "0.1.0"

_LAZY = {
    "VLMCritic": ("vlm3d_guidance.critic", "VLMCritic"),
    "CriticScore": ("vlm3d_guidance.critic", "CriticScore"),
    "GuidanceConfig": ("vlm3d_guidance.config", "GuidanceConfig"),
    "GuidedHunyuanPipeline": ("vlm3d_guidance.pipeline", "GuidedHunyuanPipeline"),
    "GuidedOutput": ("vlm3d_guidance.pipeline", "GuidedOutput"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vlm3d_guidance' has no attribute {name!r}")
