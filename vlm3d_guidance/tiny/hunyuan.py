"""Tiny Hunyuan3D 2.0 models of hy3dgen's REAL classes, saved the way the published ones are.

A published Hunyuan3D model folder is ``<HY3DGEN_MODELS>/<model_path>/<subfolder>/`` holding

- ``config.yaml``: ``target`` + ``params`` for ``model`` (``Hunyuan3DDiT``), ``vae`` (``ShapeVAE``),
  ``conditioner`` (``SingleImageEncoder`` around DINOv2), ``scheduler`` and ``image_processor``;
- ``model.fp16.safetensors``: one state dict whose keys are prefixed ``model.``, ``vae.`` and
  ``conditioner.``.

:func:`build_tiny_hunyuan` writes exactly that, with tiny widths, so that hy3dgen's own
``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(model_path, subfolder=..., device='cpu',
dtype=torch.float32)`` loads it when ``HY3DGEN_MODELS=<root>``. The weights are random (seeded, so
every build is bit-identical) except one deliberate choice: the geometry decoder's output bias is
shifted so that the stock iso-level 0 cuts a closed-ish surface for latents of the scale the sampler
produces (a random decoder otherwise often has no crossing at all, and guidance would never run).

Flavours (``HUNYUAN_FLAVOURS``):

========== ============================== =================================================
flavour    model_path / subfolder          what differs
========== ============================== =================================================
standard   vlm3d-tiny/Hunyuan3D-2          classifier-free guidance batch ``[cond, uncond]``
           hunyuan3d-dit-v2-0
fast       .../hunyuan3d-dit-v2-0-fast     ``guidance_embed=True`` (no CFG batch)
turbo      .../hunyuan3d-dit-v2-0-turbo    ``guidance_embed=True`` + ``ConsistencyFlowMatch...``
mv         vlm3d-tiny/Hunyuan3D-2mv        ``DinoImageEncoderMV`` + ``MVImageProcessorV2``:
           hunyuan3d-dit-v2-mv             dict images ``{'front', 'left', 'back', 'right'}``
mini       vlm3d-tiny/Hunyuan3D-2mini      2mini's choices: half the latents of standard (512
           hunyuan3d-dit-v2-mini           vs 3072 published), twice as many single-stream as
                                           double-stream blocks (8 + 16 published), VAE
                                           without qkv bias, ``include_pi: false`` and its
                                           ``scale_factor`` 1.0188...
========== ============================== =================================================

Hunyuan3D 2.1 (hy3dshape's classes) is in :mod:`.hunyuan21`.

The model_path is ``vlm3d-tiny/...`` rather than ``tencent/...`` so that a tiny folder can never be
mistaken for the real weights.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from .common import atomic_folder, default_cache_dir, is_complete, models_root

BUILDER_VERSION = "hunyuan-tiny-1"

# Tiny sizes. The DiT's hidden size must equal num_heads * sum(axes_dim); its in_channels equal the
# VAE's embed_dim; its context_in_dim equals the DINOv2 hidden size.
_DINO = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    patch_size=14,
    image_size=28,
    layerscale_value=1.0,
)
_VAE = dict(
    num_latents=32,
    embed_dim=8,
    width=32,
    heads=2,
    num_decoder_layers=1,
    num_freqs=4,
    qkv_bias=True,
    qk_norm=True,
    scale_factor=1.0,
)
_DIT = dict(
    in_channels=_VAE["embed_dim"],
    context_in_dim=_DINO["hidden_size"],
    hidden_size=32,
    mlp_ratio=2.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[16],
    theta=10000,
    qkv_bias=True,
    guidance_embed=False,
)
_IMAGE_SIZE = 28  # the conditioner's input size (the real models use 518 with DINOv2-giant)
_PROCESSOR_SIZE = 64  # the image processor's output size (real: 512)

# Fraction of the box volume that should lie inside the surface for latents ~ N(0, 1).
_INSIDE_FRACTION = 0.15

_FLAVOURS = {
    "standard": ("vlm3d-tiny/Hunyuan3D-2", "hunyuan3d-dit-v2-0"),
    "fast": ("vlm3d-tiny/Hunyuan3D-2", "hunyuan3d-dit-v2-0-fast"),
    "turbo": ("vlm3d-tiny/Hunyuan3D-2", "hunyuan3d-dit-v2-0-turbo"),
    "mv": ("vlm3d-tiny/Hunyuan3D-2mv", "hunyuan3d-dit-v2-mv"),
    "mini": ("vlm3d-tiny/Hunyuan3D-2mini", "hunyuan3d-dit-v2-mini"),
}
# 2mini's published config differs from 2.0's in these (besides its sizes)
_MINI_VAE = dict(num_latents=16, qkv_bias=False, include_pi=False, scale_factor=1.0188137142395404)
_MINI_DIT = dict(depth=1, depth_single_blocks=2)
HUNYUAN_FLAVOURS = tuple(_FLAVOURS)


@dataclass(frozen=True)
class TinyHunyuan:
    """Where a tiny Hunyuan model was written.

    ``HY3DGEN_MODELS=root`` + ``from_pretrained(model_path, subfolder=subfolder)`` loads it;
    ``folder`` is ``root / model_path / subfolder``.
    """

    root: Path
    model_path: str
    subfolder: str
    flavour: str

    @property
    def folder(self) -> Path:
        return self.root / self.model_path / self.subfolder


def hunyuan_config(flavour: str) -> dict:
    """The ``config.yaml`` content of a tiny model of ``flavour`` (same keys as the published)."""
    _check_flavour(flavour)
    dit = copy.deepcopy(_DIT)
    dit["guidance_embed"] = flavour in ("fast", "turbo")
    vae = dict(_VAE)
    if flavour == "mini":
        dit.update(_MINI_DIT)
        vae.update(_MINI_VAE)
    encoder_type = "DinoImageEncoderMV" if flavour == "mv" else "DinoImageEncoder"
    encoder_kwargs = dict(config=dict(_DINO), image_size=_IMAGE_SIZE, use_cls_token=True)
    if flavour == "mv":
        encoder_kwargs["view_num"] = 4
    if flavour == "turbo":
        scheduler = dict(
            target="hy3dgen.shapegen.schedulers.ConsistencyFlowMatchEulerDiscreteScheduler",
            params=dict(num_train_timesteps=1000, pcm_timesteps=100),
        )
    else:
        scheduler = dict(
            target="hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
            params=dict(num_train_timesteps=1000),
        )
    processor = "MVImageProcessorV2" if flavour == "mv" else "ImageProcessorV2"
    return dict(
        model=dict(target="hy3dgen.shapegen.models.Hunyuan3DDiT", params=dit),
        vae=dict(target="hy3dgen.shapegen.models.ShapeVAE", params=vae),
        conditioner=dict(
            target="hy3dgen.shapegen.models.SingleImageEncoder",
            params=dict(main_image_encoder=dict(type=encoder_type, kwargs=encoder_kwargs)),
        ),
        scheduler=scheduler,
        image_processor=dict(
            target=f"hy3dgen.shapegen.preprocessors.{processor}",
            params=dict(size=_PROCESSOR_SIZE, border_ratio=0.15),
        ),
    )


def build_tiny_hunyuan(flavour: str = "standard", root: str | os.PathLike | None = None,
                       seed: int = 0) -> TinyHunyuan:
    """Write (or reuse) a tiny Hunyuan3D model folder of ``flavour``; returns where it is.

    Args:
        flavour: one of :data:`HUNYUAN_FLAVOURS`.
        root: the ``HY3DGEN_MODELS`` folder; default :func:`default_cache_dir` ``/ "hunyuan"``.
        seed: weight seed; the same seed always gives bit-identical weights.

    Takes well under a second; cached by folder (a complete folder is reused).
    """
    _check_flavour(flavour)
    root = Path(root) if root is not None else default_cache_dir() / "hunyuan"
    model_path, subfolder = _FLAVOURS[flavour]
    if seed != 0:
        subfolder = f"{subfolder}-seed{seed}"
    out = TinyHunyuan(root=root, model_path=model_path, subfolder=subfolder, flavour=flavour)
    version = f"{BUILDER_VERSION}:{flavour}:{seed}"
    if is_complete(out.folder, version):
        return out

    import safetensors.torch
    import torch

    config = hunyuan_config(flavour)
    with atomic_folder(out.folder, version) as tmp:
        state = _random_state_dict(config, seed)
        with open(tmp / "config.yaml", "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        safetensors.torch.save_file(
            {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()},
            str(tmp / "model.fp16.safetensors"),
        )
    return out


def load_tiny_hunyuan_pipeline(flavour: str = "standard", root: str | os.PathLike | None = None,
                               seed: int = 0, device: str = "cpu", dtype=None):
    """Build (if needed) and load a tiny model through hy3dgen's real ``from_pretrained``.

    ``HY3DGEN_MODELS`` is set to ``root`` for the duration of the load only.
    """
    import torch
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    tiny = build_tiny_hunyuan(flavour, root=root, seed=seed)
    with models_root(tiny.root):
        return Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
            tiny.model_path, subfolder=tiny.subfolder, device=device,
            dtype=torch.float32 if dtype is None else dtype,
        )


def _check_flavour(flavour: str) -> None:
    if flavour not in _FLAVOURS:
        raise ValueError(f"unknown tiny Hunyuan flavour {flavour!r}; choose one of {', '.join(_FLAVOURS)}")


def _random_state_dict(config: dict, seed: int) -> dict:
    """Instantiate the real classes from ``config`` with seeded random weights; return one state dict."""
    import torch
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    state = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = instantiate_from_config(config["model"])
        vae = instantiate_from_config(config["vae"])
        conditioner = instantiate_from_config(config["conditioner"])
        _shape_geo_decoder(vae, num_latents=config["vae"]["params"]["num_latents"],
                           embed_dim=config["vae"]["params"]["embed_dim"])
    for prefix, module in (("model", model), ("vae", vae), ("conditioner", conditioner)):
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value
    return state


def _shape_geo_decoder(vae, num_latents: int, embed_dim: int, latent_std: float = 1.0) -> None:
    """Make the random geometry decoder's level-0 set a latent-dependent blob around the origin.

    A random decoder's field is noise in space: its level set is a foam that touches every wall. We
    keep all its random weights (so the field still depends on the latents everywhere) but add one
    designed channel to the query projection, ``cos(pi x) + cos(pi y) + cos(pi z)`` (largest at the
    origin; ``cos(x) + cos(y) + cos(z)`` for a VAE with ``include_pi: false``, still largest there),
    keep the other channels' bias large so ``ln_post`` leaves it roughly linear, read that channel out
    strongly, and finally shift the output bias so that ~15 % of the box lies inside
    (positive field) for latents ~ N(0, latent_std^2), the scale of the latents the tiny sampler
    produces (the 2.1 builder passes 2: its samples spread that much). Hunyuan's field is positive inside.
    """
    import torch

    dec = vae.geo_decoder
    freqs = vae.fourier_embedder.num_freqs
    width = dec.query_proj.out_features
    with torch.no_grad():
        dec.query_proj.weight.mul_(0.3)
        dec.query_proj.bias.copy_(3.0 * torch.tensor([(-1.0) ** i for i in range(width)]))
        dec.query_proj.bias[0] = 0.0
        dec.query_proj.weight[0].zero_()
        for axis in range(3):  # layout [xyz, sin(3 x F), cos(3 x F)]; cos([pi *] coord) is frequency 0
            dec.query_proj.weight[0, 3 + 3 * freqs + axis * freqs] = 1.0
        dec.output_proj.weight.mul_(0.5)
        dec.output_proj.weight[0, 0] = 4.0

        g = torch.Generator().manual_seed(1234)
        latents = latent_std * torch.randn(4, num_latents, embed_dim, generator=g)
        h = vae(latents / vae.scale_factor)
        axis = torch.linspace(-1.01, 1.01, 17)
        pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
        field = dec(queries=pts.expand(4, -1, -1), latents=h)
        dec.output_proj.bias -= torch.quantile(field.flatten(), 1.0 - _INSIDE_FRACTION)
