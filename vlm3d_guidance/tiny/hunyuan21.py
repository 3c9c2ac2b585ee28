"""Tiny Hunyuan3D 2.1 models of hy3dshape's REAL classes, saved the way the published one is.

The published 2.1 shape model is ``tencent/Hunyuan3D-2.1``, subfolder ``hunyuan3d-dit-v2-1``:

- ``config.yaml``: ``target`` + ``params`` for ``model`` (``HunYuanDiTPlain``, the MoE DiT), ``vae``
  (hy3dshape's ``ShapeVAE``, which also has an encoder), ``conditioner`` (``SingleImageEncoder``
  around DINOv2-large), ``scheduler`` (``FlowMatchEulerDiscreteScheduler``), ``image_processor``
  (``ImageProcessorV2``) and ``pipeline``;
- ``model.fp16.ckpt``: ``torch.save`` of ``{"model": ..., "vae": ..., "conditioner": ...}`` state
  dicts (hy3dshape's ``from_pretrained`` defaults to ``use_safetensors=False``, variant ``fp16``).

:func:`build_tiny_hunyuan21` writes exactly that under ``<root>/vlm3d-tiny/Hunyuan3D-2.1/
hunyuan3d-dit-v2-1``, so that hy3dshape's own ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained``
loads it with ``HY3DGEN_MODELS=<root>``. The structure is that of hy3dshape's published configs
(``configs/hunyuandit-*-4096.yaml``): every choice is theirs -- the U-Net skips of the DiT, MoE in
its last layers (top-2 routing, a shared expert), RMS QK-norm, no qkv bias, no positional
embedding, no attention pooling; the VAE's qk_norm without qkv bias, ``include_pi: false``, its
``scale_factor``, the post-LN geometry decoder; DINOv2 with the CLS token -- and only the sizes are
tiny (width 32, 3 DiT layers of which the last 2 are MoE with 4 experts, 32 latents x 8 channels,
a 1-layer DINOv2 of width 32 on 28 px, 4 Fourier frequencies). The weights are random and seeded
(every build is the same), except that the geometry decoder is shaped like the 2.0 tiny ones
(:func:`~vlm3d_guidance.tiny.hunyuan._shape_geo_decoder`) so that the stock level cuts a surface.

hy3dshape is not on PyPI: it must be importable (on ``PYTHONPATH``, with ``timm`` installed) both to
build and to load these models; otherwise an ImportError names that fix.
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .common import atomic_folder, default_cache_dir, is_complete, models_root

BUILDER_VERSION = "hunyuan21-tiny-2"
MODEL_PATH = "vlm3d-tiny/Hunyuan3D-2.1"
SUBFOLDER = "hunyuan3d-dit-v2-1"
CKPT_NAME = "model.fp16.ckpt"

# Tiny sizes. DiT: in_channels = the VAE's embed_dim, context_dim = the DINOv2 width, head_dim =
# hidden_size / num_heads must be a multiple of 8 (hy3dshape asserts it); text_len = DINOv2 tokens.
_NUM_LATENTS = 32
_EMBED_DIM = 8
_DINO_WIDTH = 32
_IMAGE_SIZE = 28  # the conditioner's input (published: 518)
_PROCESSOR_SIZE = 64  # the image processor's output (published: 512)


@dataclass(frozen=True)
class TinyHunyuan21:
    """Where a tiny 2.1 model was written: ``HY3DGEN_MODELS=root`` + ``from_pretrained(model_path,
    subfolder=subfolder)`` loads it; ``folder`` is ``root / model_path / subfolder``."""

    root: Path
    model_path: str
    subfolder: str

    @property
    def folder(self) -> Path:
        return self.root / self.model_path / self.subfolder


def hunyuan21_config() -> dict:
    """The ``config.yaml`` of the tiny 2.1 model: the published keys, targets and choices, tiny sizes."""
    dino = dict(
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, hidden_act="gelu", hidden_dropout_prob=0.0,
        hidden_size=_DINO_WIDTH, image_size=_IMAGE_SIZE, initializer_range=0.02, layer_norm_eps=1e-6,
        layerscale_value=1.0, mlp_ratio=4, model_type="dinov2", num_attention_heads=2, num_channels=3,
        num_hidden_layers=1, patch_size=14, qkv_bias=True, torch_dtype="float32", use_swiglu_ffn=False,
    )
    return dict(
        model=dict(target="hy3dshape.models.denoisers.hunyuandit.HunYuanDiTPlain", params=dict(
            input_size=_NUM_LATENTS, in_channels=_EMBED_DIM, hidden_size=32, context_dim=_DINO_WIDTH,
            depth=3, num_heads=2, qk_norm=True, text_len=(_IMAGE_SIZE // 14) ** 2 + 1,
            with_decoupled_ca=False, use_attention_pooling=False, qk_norm_type="rms", qkv_bias=False,
            use_pos_emb=False, num_moe_layers=2, num_experts=4, moe_top_k=2,
        )),
        vae=dict(target="hy3dshape.models.autoencoders.ShapeVAE", params=dict(
            num_latents=_NUM_LATENTS, embed_dim=_EMBED_DIM, num_freqs=4, include_pi=False, heads=2, width=32,
            num_encoder_layers=1, num_decoder_layers=1, qkv_bias=False, qk_norm=True,
            scale_factor=1.0039506158752403, geo_decoder_mlp_expand_ratio=4, geo_decoder_downsample_ratio=1,
            geo_decoder_ln_post=True, point_feats=4, pc_size=64, pc_sharpedge_size=0,
        )),
        conditioner=dict(target="hy3dshape.models.conditioner.SingleImageEncoder", params=dict(
            main_image_encoder=dict(type="DinoImageEncoder", kwargs=dict(
                config=dino, image_size=_IMAGE_SIZE, use_cls_token=True)),
        )),
        scheduler=dict(target="hy3dshape.schedulers.FlowMatchEulerDiscreteScheduler",
                       params=dict(num_train_timesteps=1000)),
        image_processor=dict(target="hy3dshape.preprocessors.ImageProcessorV2",
                             params=dict(size=_PROCESSOR_SIZE, border_ratio=0.15)),
        pipeline=dict(target="hy3dshape.pipelines.Hunyuan3DDiTFlowMatchingPipeline"),
    )


def build_tiny_hunyuan21(root: str | os.PathLike | None = None, seed: int = 0) -> TinyHunyuan21:
    """Write (or reuse) the tiny Hunyuan3D 2.1 model folder; returns where it is.

    Args:
        root: the ``HY3DGEN_MODELS`` folder; default :func:`default_cache_dir` ``/ "hunyuan"``.
        seed: weight seed; the same seed always gives the same weights.

    Needs hy3dshape importable (ImportError naming the fix otherwise). Takes about a second;
    cached by folder (a complete folder is reused).
    """
    from ..model_routing import import_hy3dshape_pipeline

    import_hy3dshape_pipeline()  # the clear error, before anything is written
    root = Path(root) if root is not None else default_cache_dir() / "hunyuan"
    subfolder = SUBFOLDER if seed == 0 else f"{SUBFOLDER}-seed{seed}"
    out = TinyHunyuan21(root=root, model_path=MODEL_PATH, subfolder=subfolder)
    version = f"{BUILDER_VERSION}:{seed}"
    if is_complete(out.folder, version):
        return out

    import torch

    config = hunyuan21_config()
    with atomic_folder(out.folder, version) as tmp:
        parts = _random_state_dicts(config, seed)
        with open(tmp / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        torch.save({name: {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}
                    for name, sd in parts.items()}, tmp / CKPT_NAME)
    return out


def load_tiny_hunyuan21_pipeline(root: str | os.PathLike | None = None, seed: int = 0, device: str = "cpu",
                                 dtype=None):
    """Build (if needed) and load the tiny 2.1 model through hy3dshape's real ``from_pretrained``.

    ``HY3DGEN_MODELS`` is set to ``root`` for the duration of the load only.
    """
    import torch

    from ..model_routing import import_hy3dshape_pipeline

    pipeline_cls = import_hy3dshape_pipeline()
    tiny = build_tiny_hunyuan21(root=root, seed=seed)
    with models_root(tiny.root):
        return pipeline_cls.from_pretrained(tiny.model_path, subfolder=tiny.subfolder, device=device,
                                            dtype=torch.float32 if dtype is None else dtype)


def _random_state_dicts(config: dict, seed: int) -> dict:
    """The real classes from ``config`` with seeded random weights: ``{"model", "vae", "conditioner"}``."""
    import torch
    from hy3dshape.pipelines import instantiate_from_config

    from .hunyuan import _shape_geo_decoder

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):  # hy3dshape prints
        torch.manual_seed(seed)
        model = instantiate_from_config(config["model"])
        vae = instantiate_from_config(config["vae"])
        conditioner = instantiate_from_config(config["conditioner"])
        params = config["vae"]["params"]
        # the tiny 2.1 DiT's samples have a standard deviation of about 2 (CFG scale 5)
        _shape_geo_decoder(vae, num_latents=params["num_latents"], embed_dim=params["embed_dim"], latent_std=2.0)
    return {"model": model.state_dict(), "vae": vae.state_dict(), "conditioner": conditioner.state_dict()}
