"""Guided-step speed at a 128^3 guidance grid, before and after issue 14 (one CPU thread, one run).

"before" is the decoding as it was: the dense (R+1)^3 no-grad grid, scikit-image topology on a host
copy, the latents' k/v projected again for every chunk. "after" is this branch's: coarse-to-fine with
the band seeded from the previous step's surface (a full decode on the first step and whenever the
surface leaves the band), k/v once per step, grid points cached; marching-cubes topology from
scikit-image or the torch implementation (both timed; the faster one is the CPU default).

Printed, all measured in this one run on the tiny real models (so the DiT and the critic are nearly
free and the table shows what OUR stages cost at 4 views x 448 px):

1. marching-cubes topology alone, scikit-image vs torch, on the tiny model's field and a sphere;
2. a guided step stage by stage: before 64^3, before 128^3, after 128^3 (first step and tracked
   steps), with ratios; decoder queries per step; the final latents' difference;
3. render cost of an ugly intermediate mesh (a random-weight VAE's foam) against a clean one.

    python benchmarks/bench_step_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
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

STAGES = ("dit", "decode", "render", "critic_forward", "critic_backward", "render_backward", "decode_backward")


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def topology_table(vae, x0, repeats):
    from vlm3d_guidance.geometry import FieldGrid, decode_field, extract_topology

    print("\n| marching-cubes topology (no grad) | grid | faces | scikit-image s | torch s | torch / skimage |")
    print("|---|---|---|---|---|---|")
    ratios = []
    extract_topology(torch.randn(9, 9, 9), FieldGrid(8), backend="torch")  # builds the case table once
    for r in (64, 128):
        grid = FieldGrid(r)
        a = grid.axis()
        x, y, z = torch.meshgrid(a, a, a, indexing="ij")
        fields = {"tiny model field": decode_field(vae, x0, resolution=r, num_chunks=50000)[0],
                  "bumpy sphere": (x * x + y * y + z * z).sqrt() - 0.6 - 0.05 * torch.sin(6 * x) * torch.sin(5 * y)}
        for name, f in fields.items():
            ts = _best(lambda: extract_topology(f, grid, backend="skimage"), repeats)
            tt = _best(lambda: extract_topology(f, grid, backend="torch"), repeats)
            faces = extract_topology(f, grid, backend="torch").faces.shape[0]
            ratios.append(tt / ts)
            print(f"| {name} | {r + 1}^3 | {faces:,} | {ts:.4f} | {tt:.4f} | {tt / ts:.2f} |")
    return statistics.median(ratios)


def _run(pipe, image, prompt, call, **overrides):
    return pipe(image=image, prompt=prompt, generator=torch.manual_seed(0), output_type="latent",
                return_dict=True, **call, **overrides)


def step_table(pipe, image, prompt, steps, mc_backend_after):
    decode_mod = importlib.import_module("vlm3d_guidance.geometry.decode")
    mc_mod = importlib.import_module("vlm3d_guidance.geometry.marching_cubes")
    call = dict(num_inference_steps=steps, octree_resolution=64, enable_pbar=False)
    runs = {}
    saved = (decode_mod.SHARE_KV, mc_mod.CPU_BACKEND)
    try:
        decode_mod.SHARE_KV, mc_mod.CPU_BACKEND = False, "skimage"  # before
        for r in (64, 128):
            runs[f"before {r}^3"] = _run(pipe, image, prompt, call, grid_resolution=r, coarse_to_fine=False)
        decode_mod.SHARE_KV, mc_mod.CPU_BACKEND = True, mc_backend_after  # after
        runs["after 128^3"] = _run(pipe, image, prompt, call, grid_resolution=128, coarse_to_fine=True,
                                   track_surface=True)
    finally:
        decode_mod.SHARE_KV, mc_mod.CPU_BACKEND = saved

    def med(out, key, first=None):
        recs = [r for r in out.trace if r.guided]
        recs = recs[:1] if first else recs[1:] if first is False else recs
        return statistics.median(r.seconds.get(key, 0.0) for r in recs)

    cols = [("before 64^3", runs["before 64^3"], None), ("before 128^3", runs["before 128^3"], None),
            ("after 128^3, 1st step", runs["after 128^3"], True),
            ("after 128^3, later steps", runs["after 128^3"], False)]
    print(f"\n| stage (median s per guided step) | {' | '.join(c[0] for c in cols)} | later / before 128^3 | later / before 64^3 |")
    print("|---|" + "---|" * (len(cols) + 2))
    for key in (*STAGES, "step"):
        vals = [med(out, key, first) for _, out, first in cols]
        print(f"| {key} | " + " | ".join(f"{v:.4f}" for v in vals)
              + f" | {vals[3] / max(vals[1], 1e-12):.2f} | {vals[3] / max(vals[0], 1e-12):.2f} |")
    after = runs["after 128^3"]
    print("\n| after 128^3: step | decode mode | reason | no-grad queries | share of dense 129^3 |")
    print("|---|---|---|---|---|")
    for rec in after.trace:
        for d in rec.decoding:
            if d:
                print(f"| {rec.step} | {d['mode']} | {d['reason'] or ''} | {d['queries']:,} | {d['queries'] / d['dense']:.3f} |")
    diff = (after.latents.float() - runs["before 128^3"].latents.float()).abs().max().item()
    print(f"\nfinal latents, after 128^3 vs before 128^3: max |diff| = {diff:.3g} "
          f"(the shared k/v projection rounds the gradient differently, which compounds over the steps)")
    return med(after, "step", False), med(runs["before 64^3"], "step"), med(runs["before 128^3"], "step")


def ugly_table(clean_mesh, repeats):
    from hy3dgen.shapegen.models.autoencoders.model import ShapeVAE

    from vlm3d_guidance.geometry import decode_field, decode_surface
    from vlm3d_guidance.render import orbit_cameras, render_views

    torch.manual_seed(0)
    vae = ShapeVAE(num_latents=64, embed_dim=8, width=64, heads=2, num_decoder_layers=1).eval()  # random weights
    x0 = torch.randn(1, 64, 8)
    with torch.no_grad():
        vae.geo_decoder.output_proj.bias += decode_field(vae, x0, resolution=16).median()  # a level that cuts
        (v, f), = decode_surface(vae, x0, resolution=64)
    import trimesh

    cams = orbit_cameras(num_views=4, elevation=20, fov=40, bounds=1.01)
    print("\n| render 4 x 448 px, clay, fwd + bwd | faces | components | covered pixels | fragments / pixel | seconds |")
    print("|---|---|---|---|---|---|")
    for name, (vv, ff) in (("clean (tiny model, 128^3)", clean_mesh), ("foam (random-weight VAE, 64^3)", (v, f))):
        comps = len(trimesh.Trimesh(vv.detach().numpy(), ff.numpy(), process=False).split(only_watertight=False))
        pos = cams.to_clip(vv.detach())
        from vlm3d_guidance.render.raster_torch import visibility

        ids = visibility(pos, ff, (448, 448))
        w = pos[..., 3:4]
        s = (pos[..., :2] / w + 1) * 224
        sv = s[:, ff]
        span = (sv.amax(2) - sv.amin(2)).clamp_min(0)
        frags = float(((span[..., 0] + 1) * (span[..., 1] + 1)).sum()) / ids.numel()

        def fb():
            x = vv.detach().clone().requires_grad_(True)
            render_views(x, ff, cams, size=448, backend="torch").sum().backward()

        t = _best(fb, repeats)
        print(f"| {name} | {ff.shape[0]:,} | {comps:,} | {int((ids > 0).sum()):,} | ~{frags:.1f} (bbox) | {t:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, one repeat (CI)")
    args = parser.parse_args(argv)

    from vlm3d_guidance.geometry import decode_surface

    root = tempfile.mkdtemp(prefix="vlm3d-bench-")
    steps = 3 if args.quick else 5
    repeats = 1 if args.quick else 3
    pipe = tiny_guided_pipeline(root)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; tiny models; {steps} steps ({steps - 1} guided), 4 views x 448 px; "
          "no GPU lent to this task")
    vae = pipe.pipeline.vae
    x0 = torch.randn(1, 32, vae.post_kl.in_features, generator=torch.Generator().manual_seed(0))
    ratio = topology_table(vae, x0, repeats)
    backend = "torch" if ratio < 1.0 else "skimage"
    print(f"\nmedian torch / scikit-image topology time: {ratio:.2f} -> faster on this CPU: {backend}")
    new, old64, old128 = step_table(pipe, block_image(), "a red box", steps, backend)
    print(f"\nguided step: after 128^3 (tracked) {new:.4f} s; before 128^3 {old128:.4f} s "
          f"({new / old128:.2f}x); before 64^3 {old64:.4f} s ({new / old64:.2f}x; target <= 1.00)")
    with torch.no_grad():
        (v, f), = decode_surface(vae, x0, resolution=128)
    ugly_table((v, f), repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
