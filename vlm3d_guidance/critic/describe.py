"""The critic describes a reference image in words (the prompt when none is given): greedy decoding.

The picture is seen as Hunyuan3D sees it: transparent parts composited onto white (:func:`on_white`).
"""

from __future__ import annotations

import warnings

import torch

from .templates import DESCRIBE_PROMPT


def on_white(image):
    """A PIL image as RGB, its transparent parts composited onto white (alpha is the object mask, as
    in Hunyuan3D); an image without alpha is only converted."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


@torch.no_grad()
def describe(critic, image, max_new_tokens: int = 32, **generate_kwargs) -> str:
    """A short description of a reference image (greedy decoding, no gradient).

    Args:
        critic: the :class:`~vlm3d_guidance.critic.VLMCritic` whose model looks.
        image: a PIL image, or a ``[3, H, W]`` float tensor in [0, 1] (``[1, 3, H, W]`` also accepted).
            A transparent image (RGBA, LA, or palette with transparency) is composited onto white
            first, so the VLM sees the object on a plain background, not whatever colour the
            transparent pixels happen to hold.
        max_new_tokens: generation budget; ``generate_kwargs`` go to ``model.generate``.

    Returns:
        The first non-empty line of the generated text, stripped. A model that generates nothing useful (random tiny models
        often do) yields ``"an object"`` with a warning.
    """
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
        if t.ndim != 3:
            raise ValueError(f"describe() takes one image [3, H, W], got shape {tuple(image.shape)}")
        critic._check_images(t[None])
        arr = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        image = Image.fromarray(arr)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"describe() takes a PIL image or a [3, H, W] tensor, got {type(image).__name__}")
    image = on_white(image)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPT}]}]
    text = critic.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = critic.processor(text=[text], images=[image], return_tensors="pt").to(critic.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(critic.dtype)
    was_training = critic.model.training
    critic.model.eval()
    try:
        kwargs = {"do_sample": False, **generate_kwargs}
        out = critic.model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, **kwargs)
    finally:
        critic.model.train(was_training)
    new = out[0, inputs["input_ids"].shape[1]:]
    decoded = critic.tokenizer.decode(new, skip_special_tokens=True)
    result = next((line.strip() for line in decoded.splitlines() if line.strip()), "")
    if not result:
        warnings.warn("the VLM generated an empty description; using 'an object'", stacklevel=3)
        return "an object"
    return result
