"""GPU suite: 50 guided steps at the defaults with REAL-SIZE architectures and random weights.

Builds hy3dgen's Hunyuan3D 2.0 DiT (1.1B: depth 16 + 32 single blocks, width 1024), its ShapeVAE
decoder (3072 x 64 latents, width 1024, 16 layers) and a DINOv2-giant conditioner, plus a
Qwen2.5-VL-7B-sized critic (transformers' real class, the published configuration, random bf16
weights), then times a full guided run (50 steps, 4 views x 448 px, 64^3 guidance grid) and an
unguided run, with peak GPU memory. Random weights give real timings (the work per step does not
depend on the values) but meaningless shapes. The paper reports 60 s per asset on one A100.

    python benchmarks/bench_gpu.py            # needs CUDA; prints "skipped" and exits 0 without
    python benchmarks/bench_gpu.py --smoke    # same code path at tiny sizes on CPU (CI)

Results are appended to benchmarks/RESULTS.md with the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Published sizes (Hunyuan3D-2 hunyuan3d-dit-v2-0 config.yaml; Qwen2.5-VL-7B-Instruct config.json).
DIT_2_0 = dict(in_channels=64, context_in_dim=1536, hidden_size=1024, mlp_ratio=4.0, num_heads=16,
               depth=16, depth_single_blocks=32, axes_dim=[64], theta=10000, qkv_bias=True,
               guidance_embed=False)
VAE_2_0 = dict(num_latents=3072, embed_dim=64, width=1024, heads=16, num_decoder_layers=16,
               num_freqs=8, qkv_bias=True, qk_norm=True, scale_factor=0.9990943042622529)
DINO_GIANT = dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, intermediate_size=6144,
                  patch_size=14, image_size=518, use_swiglu_ffn=True, layerscale_value=1.0)
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                         max_position_embeddings=128000, rope_theta=1000000.0)
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])


def build_hunyuan(device, dtype, smoke: bool):
    """A Hunyuan3DDiTFlowMatchingPipeline of real (or, with smoke, tiny) size, random weights."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    from vlm3d_guidance.tiny.hunyuan import hunyuan_config

    config = hunyuan_config("standard")
    if not smoke:
        config["model"]["params"] = dict(DIT_2_0)
        config["vae"]["params"] = dict(VAE_2_0)
        enc = config["conditioner"]["params"]["main_image_encoder"]["kwargs"]
        enc["config"] = dict(DINO_GIANT)
        enc["image_size"] = 518
        config["image_processor"]["params"]["size"] = 512
    torch.manual_seed(0)
    with torch.device(device):
        parts = {k: instantiate_from_config(config[k]) for k in ("model", "vae", "conditioner", "scheduler",
                                                                 "image_processor")}
    for name in ("model", "vae", "conditioner"):
        for p in parts[name].parameters():
            p.data.normal_(0.0, 0.02)
    return Hunyuan3DDiTFlowMatchingPipeline(device=device, dtype=dtype, **parts)


def build_critic(device, dtype, smoke: bool, root: str):
    """A VLMCritic around a Qwen2.5-VL of the published 7B size (or the tiny one), random weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.tiny import build_tiny_qwen

    path = build_tiny_qwen("qwen2_5_vl", root=root)
    processor = AutoProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    if not smoke:  # keep the tokenizer's special-token ids, take every size from the 7B model
        for k, v in QWEN25_VL_7B_TEXT.items():
            setattr(config.text_config, k, v)
        for k, v in QWEN25_VL_7B_VISION.items():
            setattr(config.vision_config, k, v)
        config.text_config.head_dim = QWEN25_VL_7B_TEXT["hidden_size"] // QWEN25_VL_7B_TEXT["num_attention_heads"]
        config.text_config.layer_types = ["full_attention"] * QWEN25_VL_7B_TEXT["num_hidden_layers"]
        config.text_config.rope_parameters = dict(config.text_config.rope_parameters, mrope_section=[16, 24, 24])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return VLMCritic(model, processor)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="GPU suite: 50 guided steps at real size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the code path")
    parser.add_argument("--quick", action="store_true", help="same as --smoke when no CUDA (CI)")
    parser.add_argument("--count", action="store_true",
                        help="build the real-size models on the meta device and print parameter counts (no GPU)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args(argv)

    if args.count:
        meta = torch.device("meta")
        hy = build_hunyuan(meta, torch.float16, smoke=False)
        vlm = build_critic(meta, torch.bfloat16, smoke=False, root=tempfile.mkdtemp(prefix="vlm3d-gpu-bench-"))
        count = lambda m: sum(p.numel() for p in m.parameters()) / 1e9  # noqa: E731
        print(f"real-size parameters (billions): DiT {count(hy.model):.3f}, VAE {count(hy.vae):.3f}, "
              f"conditioner {count(hy.conditioner):.3f}, critic {count(vlm.model):.3f}")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and not (args.smoke or args.quick):
        print("bench_gpu: no CUDA device: GPU suite skipped (use --smoke to check the code path on CPU)")
        return 0
    smoke = args.smoke or not cuda
    if smoke:
        torch.set_num_threads(1)
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    critic_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps = 3 if smoke else args.steps

    from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline

    root = tempfile.mkdtemp(prefix="vlm3d-gpu-bench-")
    t0 = time.perf_counter()
    pipe = GuidedHunyuanPipeline(build_hunyuan(device, dtype, smoke), build_critic(device, critic_dtype, smoke, root),
                                 GuidanceConfig(grid_resolution=24, render_size=56, num_views=2) if smoke else GuidanceConfig())
    build_s = time.perf_counter() - t0
    n_dit = sum(p.numel() for p in pipe.pipeline.model.parameters())
    n_vae = sum(p.numel() for p in pipe.pipeline.vae.parameters())
    n_cond = sum(p.numel() for p in pipe.pipeline.conditioner.parameters())
    n_vlm = sum(p.numel() for p in pipe.critic.model.parameters())
    rgba = np.zeros((512, 512, 4), np.uint8)
    rgba[96:416, 160:352] = (200, 60, 40, 255)
    image = Image.fromarray(rgba)
    call = dict(image=image, prompt="a red box", num_inference_steps=steps, output_type="latent",
                enable_pbar=False, return_dict=True, octree_resolution=64 if smoke else 384)

    def run(**kw):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = pipe(generator=torch.manual_seed(0), **call, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return out, time.perf_counter() - start, peak

    _, unguided_s, unguided_peak = run(lam=0.0)
    out, guided_s, guided_peak = run()
    guided_steps = [r for r in out.trace if r.guided]
    stages = {}
    for rec in guided_steps:
        for k, v in rec.seconds.items():
            stages[k] = stages.get(k, 0.0) + v / max(len(guided_steps), 1)

    name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or platform.machine())
    lines = [
        f"## bench_gpu {'(smoke: tiny sizes, CPU)' if smoke else ''} {datetime.date.today()} on {name}",
        "",
        f"parameters: DiT {n_dit / 1e9:.3f}B, VAE {n_vae / 1e6:.0f}M, conditioner {n_cond / 1e9:.3f}B, "
        f"critic {n_vlm / 1e9:.3f}B; build {build_s:.1f} s; {steps} steps",
        "",
        "| run | seconds | per step | peak GiB |",
        "|---|---|---|---|",
        f"| unguided | {unguided_s:.2f} | {unguided_s / steps:.3f} | {unguided_peak:.1f} |",
        f"| guided (x0, defaults) | {guided_s:.2f} | {guided_s / steps:.3f} | {guided_peak:.1f} |",
        f"| ratio guided/unguided | {guided_s / unguided_s:.1f} | | |",
        "",
        "| stage (mean per guided step) | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.4f} |" for k, v in stages.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not smoke:
        with open(args.results, "a") as f:
            f.write(text + "\n")
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
