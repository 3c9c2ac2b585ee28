"""The toy generator and critic: configurations, the shipped weights' layout, and loading.

The generator is hy3dgen's own classes at a small size, in the published on-disk layout::

    <weights>/generator/vlm3d-toy/Hunyuan3D-toy/hunyuan3d-dit-toy/config.yaml
                                                                /model.fp16.safetensors

so ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained("vlm3d-toy/Hunyuan3D-toy",
subfolder="hunyuan3d-dit-toy")`` loads it with ``HY3DGEN_MODELS=<weights>/generator``. The critic is
transformers' ``Qwen2_5_VLForConditionalGeneration`` at a small size, saved with
``save_pretrained`` plus the package's locally built Qwen-layout tokenizer, so
:meth:`VLMCritic.from_pretrained` loads it unchanged. Loading never trains and never uses the
network.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).with_name("weights")
GENERATOR_MODEL_PATH = "vlm3d-toy/Hunyuan3D-toy"
GENERATOR_SUBFOLDER = "hunyuan3d-dit-toy"
CRITIC_FOLDER = "critic"  # the base critic toy.train makes
MATCHED_CRITIC_FOLDER = "critic-matched"  # the same, fine-tuned by toy.gradient_matching (the one the toy guides with)
MANIFEST = "manifest.json"

DINO = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=2, intermediate_size=192,
            patch_size=14, image_size=112, layerscale_value=1.0)
VAE = dict(num_latents=64, embed_dim=8, width=96, heads=4, num_decoder_layers=2, num_freqs=6,
           qkv_bias=True, qk_norm=True, scale_factor=1.0)
DIT = dict(in_channels=VAE["embed_dim"], context_in_dim=DINO["hidden_size"], hidden_size=192, mlp_ratio=2.0,
           num_heads=6, depth=3, depth_single_blocks=4, axes_dim=[32], theta=10000, qkv_bias=True,
           guidance_embed=False)
IMAGE_PROCESSOR_SIZE = 128
CRITIC_TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
CRITIC_VISION = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                     fullatt_block_indexes=[2])


def generator_config(scale_factor: float = 1.0) -> dict:
    """The toy generator's ``config.yaml`` content (hy3dgen targets, as the published configs)."""
    vae = dict(VAE, scale_factor=float(scale_factor))
    return dict(
        model=dict(target="hy3dgen.shapegen.models.Hunyuan3DDiT", params=copy.deepcopy(DIT)),
        vae=dict(target="hy3dgen.shapegen.models.ShapeVAE", params=vae),
        conditioner=dict(
            target="hy3dgen.shapegen.models.SingleImageEncoder",
            params=dict(main_image_encoder=dict(type="DinoImageEncoder", kwargs=dict(
                config=dict(DINO), image_size=DINO["image_size"], use_cls_token=True))),
        ),
        scheduler=dict(target="hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
                       params=dict(num_train_timesteps=1000)),
        image_processor=dict(target="hy3dgen.shapegen.preprocessors.ImageProcessorV2",
                             params=dict(size=IMAGE_PROCESSOR_SIZE, border_ratio=0.15)),
    )


def instantiate_generator(config: dict):
    """``(dit, vae, conditioner, image_processor)`` built by hy3dgen's own ``instantiate_from_config``."""
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    return tuple(instantiate_from_config(config[k]) for k in ("model", "vae", "conditioner", "image_processor"))


def generator_folder(weights: str | os.PathLike | None = None) -> Path:
    return Path(weights or WEIGHTS_DIR) / "generator" / GENERATOR_MODEL_PATH / GENERATOR_SUBFOLDER


def save_generator(folder: str | os.PathLike, config: dict, dit, vae, conditioner) -> None:
    """Write ``config.yaml`` + ``model.fp16.safetensors`` (keys prefixed model./vae./conditioner.)."""
    import safetensors.torch
    import torch
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for prefix, module in (("model", dit), ("vae", vae), ("conditioner", conditioner)):
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous()
    with open(folder / "config.yaml", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    safetensors.torch.save_file(state, str(folder / "model.fp16.safetensors"))


def critic_config():
    """transformers ``Qwen2_5_VLConfig`` of the toy critic (the tiny builder's ids and tokenizer layout)."""
    from ..tiny.qwen import _config

    cfg = _config("qwen2_5_vl")
    for key, value in CRITIC_TEXT.items():
        setattr(cfg.text_config, key, value)
    head_dim = CRITIC_TEXT["hidden_size"] // CRITIC_TEXT["num_attention_heads"]
    rope = dict(cfg.text_config.rope_parameters)
    rope["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    cfg.text_config.rope_parameters = rope
    for key, value in CRITIC_VISION.items():
        setattr(cfg.vision_config, key, value)
    return cfg


def new_critic_model(seed: int = 0):
    """A randomly initialised toy critic model (float32, eval mode)."""
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(critic_config()).to(torch.float32)
    return model.eval()


def write_critic_files(folder: str | os.PathLike) -> None:
    """The tokenizer, chat template and image-processor config of the toy critic (Qwen layout)."""
    from ..tiny.qwen import _preprocessor_config, _write_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(folder, "qwen2_5_vl")
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor_config("qwen2_5_vl"), indent=2))


def critic_processor(folder: str | os.PathLike):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(folder))


def save_critic(folder: str | os.PathLike, model) -> None:
    """``save_pretrained`` the model and write the tokenizer/processor files beside it."""
    from ..tiny.qwen import _BPE_VOCAB, SPECIAL_TOKENS

    folder = Path(folder)
    model.generation_config.do_sample = False
    pad = _BPE_VOCAB + SPECIAL_TOKENS.index("<|endoftext|>")
    model.generation_config.eos_token_id = [model.config.text_config.eos_token_id, pad]
    model.generation_config.pad_token_id = pad
    model.save_pretrained(folder)
    write_critic_files(folder)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(weights: str | os.PathLike | None = None) -> dict:
    """Check every file listed in the manifest against its sha256; return the manifest.

    Raises FileNotFoundError when the weights or the manifest are missing and ValueError naming
    the file whose hash differs (a corrupt or partial copy), before any model is built.
    """
    root = Path(weights or WEIGHTS_DIR)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"toy weights not found at {root} (no {MANIFEST}); reinstall the package or rebuild them with "
            "`python -m vlm3d_guidance.toy.train`")
    manifest = json.loads(manifest_path.read_text())
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"toy weights incomplete: {path} is missing; rebuild with "
                                    "`python -m vlm3d_guidance.toy.train`")
        if sha256(path) != digest:
            raise ValueError(f"toy weights corrupt: sha256 of {path} differs from {MANIFEST}; reinstall or rebuild")
    return manifest


def load_generator(weights: str | os.PathLike | None = None, device: str = "cpu", dtype=None):
    """hy3dgen's ``Hunyuan3DDiTFlowMatchingPipeline`` loaded by its own ``from_pretrained``."""
    import torch
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    root = Path(weights or WEIGHTS_DIR) / "generator"
    previous = os.environ.get("HY3DGEN_MODELS")
    os.environ["HY3DGEN_MODELS"] = str(root)
    try:
        return Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
            GENERATOR_MODEL_PATH, subfolder=GENERATOR_SUBFOLDER, device=device,
            dtype=torch.float32 if dtype is None else dtype)
    finally:
        if previous is None:
            os.environ.pop("HY3DGEN_MODELS", None)
        else:
            os.environ["HY3DGEN_MODELS"] = previous
