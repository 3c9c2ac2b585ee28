"""Scores of a mesh's clay views: the VLM critic's reward per query template, CLIP similarity.

Both look at the same pictures: :func:`clay_views`, i.e. :func:`vlm3d_guidance.outputs.render_mesh_views`
(the one clay-render path of the package, also behind the CLI's ``views.png``) on the welded mesh,
with the cameras of the critic's orbit. Images are float tensors ``[N, 3, H, W]`` in ``[0, 1]``.
"""

from __future__ import annotations

from typing import Any, Iterable

from .geometry import _as_trimesh, _merged

#: Query templates scored by :func:`critic_rewards`, in report order.
QUERY_NAMES = ("dual", "content", "geometry")


def clay_views(mesh: Any, num_views: int = 4, elevation: float = 20.0, fov: float = 40.0, size: int = 224,
               device: Any = "cpu", backend: str = "auto"):
    """Clay views ``[N, 3, size, size]`` in [0, 1] (on the CPU) of ``mesh`` welded first (coincident
    vertices merged: smooth shading across split vertices), by :func:`~vlm3d_guidance.outputs.render_mesh_views`
    (the critic's orbit, in the mesh's own frame); None for an empty mesh."""
    from ..outputs import render_mesh_views

    welded, _ = _merged(_as_trimesh(mesh))
    return render_mesh_views(welded, num_views=num_views, elevation=elevation, fov=fov, size=size,
                             device=device, backend=backend)


def critic_rewards(
    mesh: Any,
    critic: Any,
    prompt: str,
    num_views: int = 4,
    elevation: float = 20.0,
    size: int = 224,
    queries: Iterable[str] = QUERY_NAMES,
    fov: float = 40.0,
    images: Any = None,
) -> dict:
    """The critic's reward ``r = z_yes - z_no`` of the mesh's clay views under each query template.

    Args:
        mesh: the mesh to score.
        critic: a :class:`vlm3d_guidance.critic.VLMCritic`. One critic per query is built sharing its
            ``model`` and ``processor`` (``VLMCritic(model, processor, query=name,
            reward_mode="logit")``); no weights are copied.
        prompt: the text description filled into the templates.
        num_views, elevation, fov, size: the orbit rendered by :func:`clay_views` (``size`` should
            be a multiple of 28 for Qwen-VL critics, see DESIGN.md).
        queries: template names, default ``("dual", "content", "geometry")``.
        images: already rendered views (a float tensor ``[N, 3, H, W]`` in [0, 1]) to score instead.

    Returns:
        ``{name: float}`` for each query; evaluated without gradients.
    """
    import torch

    from ..critic import VLMCritic

    if images is None:
        images = clay_views(mesh, num_views=num_views, elevation=elevation, fov=fov, size=size,
                            device=critic.device)
    out: dict[str, float] = {}
    for name in queries:
        scorer = VLMCritic(critic.model, critic.processor, query=name, reward_mode="logit")
        with torch.no_grad():
            out[name] = float(scorer.reward(images.to(critic.device), prompt))
    return out


# --------------------------------------------------------------------------------------------------
# CLIP text-to-image similarity
# --------------------------------------------------------------------------------------------------

#: Models loaded by name, per (name, device): ``(model, processor)``; open_clip entries hold
#: ``(model, (preprocess, tokenizer))`` under ``"open_clip:<spec>"``.
_CLIP_CACHE: dict[tuple[str, str], tuple[Any, Any]] = {}


def _load_clip(clip_model: Any, device: Any = "cpu"):
    """``(model, processor)`` from a local folder / hub id (cached per name and device) or a given pair."""
    if isinstance(clip_model, tuple):
        return clip_model
    key = (str(clip_model), str(device))
    if key not in _CLIP_CACHE:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(key[0]).to(device).eval()
        processor = CLIPProcessor.from_pretrained(key[0])
        _CLIP_CACHE[key] = (model, processor)
    return _CLIP_CACHE[key]


def _to_pil_list(images: Any) -> list:
    """PIL RGB images from a float tensor ``[N, 3, H, W]`` in [0, 1] (quantised to 8 bits, like a saved
    render) or a list of PIL images."""
    import torch
    from PIL import Image

    if isinstance(images, (list, tuple)) and all(isinstance(i, Image.Image) for i in images):
        return [i.convert("RGB") for i in images]
    if getattr(images, "ndim", None) != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W] in [0, 1] or a list of PIL images, got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    u8 = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [Image.fromarray(x) for x in u8.cpu().numpy()]


def clip_similarity(images: Any, text: str, clip_model: Any, device: Any = "cpu") -> float:
    """Mean cosine similarity between each image and ``text`` under a CLIP model.

    Args:
        images: a float tensor ``[N, 3, H, W]`` in [0, 1] (quantised to 8 bits like a saved render)
            or a list of PIL images.
        text: the description.
        clip_model: a local folder or hub id loadable by transformers' ``CLIPModel`` /
            ``CLIPProcessor``, an ``open_clip:<architecture>/<pretrained>`` spec when open_clip
            is installed, or a ready ``(model, processor)`` pair of transformers objects. Models
            loaded by name are cached for the process.
        device: where a model loaded by name runs.

    Returns:
        ``mean_i cos(f_img(x_i), f_txt(text))``. CLIP-D in the paper's spirit is ``1 - similarity``.
    """
    import torch

    pil = _to_pil_list(images)
    if isinstance(clip_model, str) and clip_model.startswith("open_clip:"):
        return _open_clip_similarity(pil, text, clip_model[len("open_clip:"):], device)
    model, processor = _load_clip(clip_model, device)
    device = next(model.parameters()).device
    # CLIP's text tower has a fixed number of positions (77 for the released models): truncate a
    # long description to it, as open_clip's tokenizer does, instead of failing inside the model.
    max_length = getattr(getattr(getattr(model, "config", None), "text_config", None), "max_position_embeddings", None)
    inputs = processor(text=[text], images=pil, return_tensors="pt", padding=True,
                       truncation=max_length is not None, max_length=max_length)
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        out = model(**inputs)
    img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
    return float((img @ txt[0]).mean().item())


def _open_clip_similarity(pil: list, text: str, spec: str, device: Any = "cpu") -> float:
    """The same number with open_clip (``spec`` = ``architecture/pretrained``, e.g. ``ViT-B-32/openai``)."""
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("open_clip is not installed: pip install 'vlm3d-guidance[clip]'") from exc
    import torch

    key = ("open_clip:" + spec, str(device))
    if key not in _CLIP_CACHE:
        arch, _, pretrained = spec.partition("/")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        _CLIP_CACHE[key] = (model.to(device).eval(), (preprocess, open_clip.get_tokenizer(arch)))
    model, (preprocess, tokenizer) = _CLIP_CACHE[key]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(p) for p in pil]).to(device))
        txt = model.encode_text(tokenizer([text]).to(device))
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    return float((img @ txt[0]).mean().item())
