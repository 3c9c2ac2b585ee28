"""A trained toy world where VLM guidance can be watched repairing broken shapes on a CPU.

Everything here is the package's real code path at a small size: the generator is hy3dgen's own
``Hunyuan3DDiT`` / ``ShapeVAE`` / DINOv2 ``SingleImageEncoder`` / flow-matching scheduler, loaded by
hy3dgen's ``from_pretrained`` from the published layout; the critic is transformers'
``Qwen2_5_VLForConditionalGeneration`` loaded by :meth:`VLMCritic.from_pretrained`; both were
trained by :mod:`vlm3d_guidance.toy.train` (shipped weights, manifest with hashes). The generator
was trained on pairs where ~30 % of the targets are broken (a part floating or missing), so
unguided it produces broken shapes at a measurable rate; the critic was trained to answer the
default dual query, then fine-tuned by :mod:`vlm3d_guidance.toy.gradient_matching` so that its
reward's gradient points where the intact truth's does (the base critic is kept beside it:
``load_pipeline(critic="base")``). Whether guidance helps is judged by :func:`judge`, which looks
only at the exported mesh.

Public API::

    from vlm3d_guidance import toy
    pipe = toy.load_pipeline()                      # GuidedHunyuanPipeline, toy defaults as config
    refs = toy.references(split="test", count=16)   # .image (RGBA), .prompt, .mesh, .name
    mesh = pipe(image=refs[0].image, prompt=refs[0].prompt, **toy.TOY_SAMPLING)[0]
    toy.judge(mesh, refs[0])                        # {'failed': ..., 'reason': ..., 'iou': ...}
"""

from __future__ import annotations

from .config import TOY_GUIDANCE, TOY_SAMPLING
from .judge import judge
from .references import Reference, hidden_handle_references, references
from .world import CLASSES, DESCRIPTIONS

__all__ = ["TOY_GUIDANCE", "TOY_SAMPLING", "CLASSES", "DESCRIPTIONS", "Reference", "judge", "references",
           "hidden_handle_references", "load_pipeline"]


def load_pipeline(device: str = "cpu", weights=None, config=None, critic: str | None = None):
    """The toy generator and critic as a :class:`~vlm3d_guidance.GuidedHunyuanPipeline`.

    Args:
        device: torch device for both models (the toy is sized for a CPU).
        weights: folder of the weights (default: the ones shipped in the package); every file is
            checked against the manifest's sha256 before anything is built.
        config: guidance defaults (default :data:`TOY_GUIDANCE`).
        critic: ``"matched"`` (the critic fine-tuned by
            :mod:`~vlm3d_guidance.toy.gradient_matching` so its gradient points where the truth's
            does; the default when the weights have it) or ``"base"`` (the classifier
            :mod:`~vlm3d_guidance.toy.train` makes, which the matched one starts from).

    Call it with :data:`TOY_SAMPLING` (25 steps, a 64^3 export) for the toy's intended speed:
    ``pipe(image=..., prompt=..., **toy.TOY_SAMPLING)``.
    """
    from pathlib import Path

    from ..critic import VLMCritic
    from ..pipeline import GuidedHunyuanPipeline
    from .models import CRITIC_FOLDER, MATCHED_CRITIC_FOLDER, WEIGHTS_DIR, load_generator, verify_weights

    if critic not in (None, "matched", "base"):
        raise ValueError(f"critic={critic!r}: use 'matched' (the default when shipped) or 'base'")
    root = Path(weights) if weights is not None else WEIGHTS_DIR
    manifest = verify_weights(root)
    has_matched = any(rel.startswith(MATCHED_CRITIC_FOLDER + "/") for rel in manifest["files"])
    if critic == "matched" and not has_matched:
        raise FileNotFoundError(f"no matched critic in {root}; make it with "
                                "`python -m vlm3d_guidance.toy.gradient_matching --weights ...` or use critic='base'")
    folder = MATCHED_CRITIC_FOLDER if critic == "matched" or (critic is None and has_matched) else CRITIC_FOLDER
    generator = load_generator(root, device=device)
    vlm = VLMCritic.from_pretrained(str(root / folder), device=device, dtype="float32")
    return GuidedHunyuanPipeline(pipeline=generator, critic=vlm, config=config or TOY_GUIDANCE)
