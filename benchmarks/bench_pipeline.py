"""CPU benchmark of the guided sampler on the tiny real models (one thread).

Measured in one run, reported as ratios:
  1. hy3dgen's stock ``__call__`` against our loop with guidance off (lam = 0): the price of
     re-implementing the loop (should be ~1.0x; the outputs are bit-identical, checked here too);
  2. a guided step against an unguided step, with the guided step split per stage
     (DiT, decode+mesh, render, critic forward, critic backward, render backward, decode backward).

The tiny models make the DiT and the VLM nearly free, so the split shows what OUR stages cost at
the default guidance settings (128^3 coarse-to-fine guidance grid, views fitted to the mesh, 4 views x
448 px). The real-size numbers come
from ``bench_gpu.py`` when a GPU is lent.

    python benchmarks/bench_pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tiny_setup import block_image, tiny_guided_pipeline  # noqa: E402

torch.set_num_threads(1)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings for CI (seconds)")
    args = parser.parse_args(argv)

    from vlm3d_guidance import GuidanceConfig
    from vlm3d_guidance.guidance import STAGES
    from vlm3d_guidance.tiny import load_tiny_hunyuan_pipeline

    root = tempfile.mkdtemp(prefix="vlm3d-bench-")
    steps = 6 if args.quick else 20
    repeats = 1 if args.quick else 3
    cfg = GuidanceConfig(grid_resolution=32, render_size=112, num_views=2) if args.quick else GuidanceConfig()
    call = dict(num_inference_steps=steps, octree_resolution=32 if args.quick else 64, enable_pbar=False)

    stock = load_tiny_hunyuan_pipeline("standard", root=root)
    pipe = tiny_guided_pipeline(root, cfg)
    image, prompt = block_image(), "a red box"

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; tiny models; {steps} steps; guidance grid "
          f"{cfg.grid_resolution}^3, {cfg.num_views} views x {cfg.render_size} px")

    # 1. stock vs ours, guidance off (same generator -> bit-identical latents).
    want = stock(image=image, generator=torch.manual_seed(0), output_type="latent", **call)
    got = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent", lam=0.0, **call)
    assert torch.equal(want, got), "guidance-off loop is not bit-identical to hy3dgen"
    t_stock = _median_time(lambda: stock(image=image, generator=torch.manual_seed(0), output_type="latent", **call), repeats)
    t_ours = _median_time(lambda: pipe(image=image, prompt=prompt, generator=torch.manual_seed(0),
                                       output_type="latent", lam=0.0, **call), repeats)
    print("\n| sampler (guidance off, latents only) | seconds | ratio |")
    print("|---|---|---|")
    print(f"| hy3dgen stock __call__ | {t_stock:.4f} | 1.00 |")
    print(f"| GuidedHunyuanPipeline, lam=0 (bit-identical) | {t_ours:.4f} | {t_ours / t_stock:.2f} |")

    # 2. guided vs unguided steps, per stage.
    out = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
               return_dict=True, **call)
    guided = [r for r in out.trace if r.guided]
    off = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
               return_dict=True, lam=0.0, **call)
    unguided_step = statistics.median(r.seconds["step"] for r in off.trace)
    guided_step = statistics.median(r.seconds["step"] for r in guided)
    print(f"\n| step | median seconds | ratio to unguided |")
    print("|---|---|---|")
    print(f"| unguided | {unguided_step:.4f} | 1.0 |")
    print(f"| guided (x0 mode) | {guided_step:.4f} | {guided_step / unguided_step:.1f} |")
    print("\n| stage of a guided step | median seconds | share |")
    print("|---|---|---|")
    for stage in STAGES:
        values = [r.seconds.get(stage, 0.0) for r in guided]
        if any(values):
            med = statistics.median(values)
            print(f"| {stage} | {med:.4f} | {100 * med / guided_step:.0f} % |")
    print(f"\nguided steps: {len(guided)}/{steps}; rewards {out.rewards(0)[0]:+.4f} -> "
          f"{[x for x in out.rewards(0) if x is not None][-1]:+.4f}")

    # 3. "full" mode step (gradient through the DiT), for the ratio.
    full = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
                return_dict=True, gradient="full", **call)
    full_step = statistics.median(r.seconds["step"] for r in full.trace if r.guided)
    print(f"\n| guided step, gradient mode | median seconds | ratio to x0 |")
    print("|---|---|---|")
    print(f"| x0 | {guided_step:.4f} | 1.00 |")
    print(f"| full (through the DiT) | {full_step:.4f} | {full_step / guided_step:.2f} |")

    # 4. the default coarse-to-fine guidance grid against the dense one, and the old default
    #    (64^3 dense, box-framed views): same meshes for dense vs coarse-to-fine, fewer queries.
    dense = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
                 return_dict=True, coarse_to_fine=False, **call)
    old = pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
               return_dict=True, coarse_to_fine=False, grid_resolution=64, fill=None, **call)
    same = torch.equal(dense.latents, out.latents)
    rows = [(f"dense {cfg.grid_resolution + 1}^3", dense), (f"coarse_to_fine {cfg.grid_resolution + 1}^3 (default; "
            f"latents {'bit-identical' if same else 'DIFFER'} to dense)", out),
            ("old default: dense 65^3, box-framed views", old)]
    base_step = statistics.median(r.seconds["step"] for r in dense.trace if r.guided)
    print("\n| guidance grid decoding (x0 mode) | decode s | step s | step ratio |")
    print("|---|---|---|---|")
    for label, run in rows:
        g = [r for r in run.trace if r.guided]
        dec, step = statistics.median(r.seconds["decode"] for r in g), statistics.median(r.seconds["step"] for r in g)
        print(f"| {label} | {dec:.4f} | {step:.4f} | {step / base_step:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
