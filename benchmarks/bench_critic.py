"""Benchmark: VLMCritic reward + gradient time and peak memory vs view count and image size.

Runs the tiny Qwen2.5-VL (or a real checkpoint given with --model) on one thread. Two memory columns:

- "saved for backward": bytes of the tensors autograd keeps for the backward pass (counted with
  saved_tensors_hooks), the activation memory that activation checkpointing cuts;
- "peak": on CUDA, torch.cuda.max_memory_allocated above the level before the call; on CPU each
  configuration runs in a fresh subprocess and this is the peak RSS (ru_maxrss) above the RSS after the
  model was loaded (torch's CPU allocator is invisible to tracemalloc); with --quick all rows share
  one process, so a row's peak is the high-water mark so far.

    python benchmarks/bench_critic.py            # views 1,2,4,8 x sizes 224,448, tiny model
    python benchmarks/bench_critic.py --quick    # CI: views 1,2 x size 224, 1 repeat
    python benchmarks/bench_critic.py --model Qwen/Qwen2.5-VL-7B-Instruct --device cuda
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import resource
import subprocess

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(critic, n, size, repeats, device):
    """(median seconds for reward+backward, saved-for-backward bytes, peak bytes, reward)."""
    prompt = "a red chair with four legs"
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(n, 3, size, size, generator=gen).to(device)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    x = base.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = critic.reward(x, prompt)  # also warms the prompt cache
    r.backward()
    times = []
    for _ in range(repeats):
        x = base.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = critic.reward(x, prompt)
        r.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - start_mem
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - critic._bench_rss0
    return statistics.median(times), saved[0], peak, float(r.detach())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="views 1,2 at 224 px, one repeat (CI)")
    ap.add_argument("--model", default=None, help="checkpoint id/folder (default: tiny Qwen2.5-VL)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, else fp32)")
    ap.add_argument("--views", default=None, help="comma list, default 1,2,4,8")
    ap.add_argument("--sizes", default=None, help="comma list, default 224,448")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing on")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # "n,size": one row, in this process
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args._one is None and not args.quick:
        _run_rows_in_subprocesses(args, argv if argv is not None else sys.argv[1:])
        return shared_vision_table(args, device)

    torch.set_num_threads(1)
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.tiny.qwen import build_tiny_qwen

    views = [int(v) for v in (args.views or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    sizes = [int(s) for s in (args.sizes or ("224" if args.quick else "224,448")).split(",")]
    repeats = 1 if args.quick else args.repeats
    model = args.model or build_tiny_qwen("qwen2_5_vl")
    critic = VLMCritic.from_pretrained(model, device=device, dtype=args.dtype,
                                       activation_checkpointing=args.checkpointing)
    critic._bench_rss0 = _rss_bytes()
    if args._one is not None:
        views, sizes = [int(args._one.split(",")[0])], [int(args._one.split(",")[1])]
    else:
        _header(args, str(critic.dtype), repeats, "cuda max_memory_allocated" if device.type == "cuda"
                else "RSS high-water above post-load RSS, one process (--quick: rows in one process)")
    from vlm3d_guidance.critic.vision import tokens_per_image

    for size in sizes:
        for n in views:
            sec, saved, peak, r = measure(critic, n, size, repeats, device)
            toks = n * tokens_per_image(size, size, critic.vision)
            print(f"| {n:5d} | {size:4d} | {toks:12d} | {sec * 1e3:9.1f} | {saved / 2**20:24.1f} "
                  f"| {peak / 2**20:10.1f} | {r:+.4f} |")
            sys.stdout.flush()
    if args._one is None:
        shared_vision_table(args, device, critic)


def shared_vision_table(args, device, base=None):
    """Three queries (dual + content + geometry, as ``vlm3d-guide eval`` scores them) with one shared
    vision-tower pass against one pass per query: reward + backward time, median, in one run."""
    torch.set_num_threads(1)
    from vlm3d_guidance.critic import VLMCritic
    from vlm3d_guidance.tiny.qwen import build_tiny_qwen

    if base is None:  # the rows ran in subprocesses: load the model here once
        base = VLMCritic.from_pretrained(args.model or build_tiny_qwen("qwen2_5_vl"), device=device, dtype=args.dtype)
    query = {"dual": 1.0, "content": 1.0, "geometry": 1.0}
    shared = VLMCritic(base.model, base.processor, query=query)
    separate = VLMCritic(base.model, base.processor, query=query)
    separate._shares_image_features = False
    n, size = (2, 224) if args.quick else (4, 448)
    repeats = 1 if args.quick else args.repeats
    x0 = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    timings = {}
    for name, critic in (("one vision pass per query", separate), ("one shared vision pass", shared)):
        ts = []
        for _ in range(repeats + 1):  # the first call warms the prompt cache
            x = x0.clone().requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            critic.score(x, "a red chair with four legs").reward.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        timings[name] = statistics.median(ts[1:])
    ref = timings["one vision pass per query"]
    print(f"\n# three queries (dual + content + geometry), {n} views x {size} px, reward + backward, median of {repeats}")
    print("| vision tower | time (ms) | ratio |")
    print("|---|--:|--:|")
    for name, sec in timings.items():
        print(f"| {name} | {sec * 1e3:.1f} | {sec / ref:.2f} |")
    sys.stdout.flush()


def _header(args, dtype, repeats, mem_kind):
    print(f"# VLMCritic reward + backward | model {args.model or 'tiny Qwen2.5-VL'} | {dtype} | "
          f"{args.device} | threads 1 | checkpointing {args.checkpointing} | median of {repeats} | "
          f"peak: {mem_kind}")
    print("| views | size | image tokens | time (ms) | saved for backward (MiB) | peak (MiB) | reward |")
    print("|------:|-----:|-------------:|----------:|-------------------------:|-----------:|-------:|")
    sys.stdout.flush()


def _run_rows_in_subprocesses(args, argv):
    views = [int(v) for v in (args.views or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    sizes = [int(s) for s in (args.sizes or ("224" if args.quick else "224,448")).split(",")]
    repeats = 1 if args.quick else args.repeats
    _header(args, args.dtype or "torch.float32", repeats, "RSS high-water above post-load RSS, fresh process per row")
    if args.model is None:  # build the tiny model once, before the row processes race to build it
        from vlm3d_guidance.tiny.qwen import build_tiny_qwen

        build_tiny_qwen("qwen2_5_vl")
    for size in sizes:
        for n in views:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--_one", f"{n},{size}"],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])
            sys.stdout.flush()


if __name__ == "__main__":
    main()
