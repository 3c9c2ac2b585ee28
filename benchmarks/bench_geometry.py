"""Benchmark of the field -> mesh -> images chain on one CPU thread.

    python benchmarks/bench_geometry.py [--quick]

Rows: marching cubes forward (+ backward) at 64/128/256 points per axis (sphere SDF); rendering 4 views
x 448 px of a ~100k-triangle mesh, forward + backward (clay shading, edge antialias); and the whole
chain (MC at 128^3 -> render 4 x 448 -> backward to the SDF grid), decoding excluded.
``--quick`` uses smaller sizes and one repeat (for CI).
"""

from __future__ import annotations

import argparse
import time

import torch

from vlm3d_guidance.geometry import marching_cubes
from vlm3d_guidance.render import fit_to_points, orbit_cameras, render_views


def sphere(n, r=0.7):
    a = torch.linspace(-1.01, 1.01, n)
    x, y, z = torch.meshgrid(a, a, a, indexing="ij")
    # a slightly bumpy sphere so the silhouette is not trivial
    return (x * x + y * y + z * z).sqrt() - r - 0.05 * torch.sin(5 * x) * torch.sin(5 * y) * torch.sin(5 * z)


def best_of(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return min(ts), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (CI)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    reps = 1 if args.quick else args.repeats
    sizes = (32, 64) if args.quick else (64, 128, 256)
    img = 112 if args.quick else 448
    rows = []

    for n in sizes:
        sdf = sphere(n)
        t_f, (v, f) = best_of(lambda: marching_cubes(sdf), reps)

        def fb():
            s = sdf.clone().requires_grad_(True)
            v, _ = marching_cubes(s)
            v.sum().backward()

        t_fb, _ = best_of(fb, reps)
        rows.append((f"marching cubes {n}^3", f"{f.shape[0]} tris", t_f, t_fb))

    box_cams = orbit_cameras(4)  # the old framing (whole box), for comparison
    cams = fit_to_points(box_cams, marching_cubes(sphere(64))[0].detach(), 0.9)  # the critic's default framing
    n_big = 96 if args.quick else 150  # ~100k triangles at 150^3 for this shape
    vb, fbig = marching_cubes(sphere(n_big))
    vb = vb.detach()

    def render_fb():
        x = vb.clone().requires_grad_(True)
        im = render_views(x, fbig, cams, size=img, shading="clay", backend="torch")
        im.sum().backward()
        return im

    t_rf, _ = best_of(lambda: render_views(vb, fbig, cams, size=img, shading="clay", backend="torch"), reps)
    t_rfb, _ = best_of(render_fb, reps)
    rows.append((f"render 4 x {img} px clay", f"{fbig.shape[0]} tris", t_rf, t_rfb))
    t_bf, _ = best_of(lambda: render_views(vb, fbig, box_cams, size=img, shading="clay", backend="torch"), reps)
    rows.append((f"  same, box-framed (old default)", f"{fbig.shape[0]} tris", t_bf, float("nan")))

    n_chain = 64 if args.quick else 128
    sdf = sphere(n_chain)

    def chain():
        s = sdf.clone().requires_grad_(True)
        v, f = marching_cubes(s)
        im = render_views(v, f, cams, size=img, shading="clay", backend="torch")
        im.mean().backward()
        return f.shape[0]

    def chain_fwd():
        v, f = marching_cubes(sdf)
        return render_views(v, f, cams, size=img, shading="clay", backend="torch")

    t_cf, _ = best_of(chain_fwd, reps)
    t_c, nf = best_of(chain, reps)
    rows.append((f"chain MC {n_chain}^3 + 4 x {img} px", f"{nf} tris", t_cf, t_c))

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, best of {reps}")
    print(f"{'stage':34s} {'size':>12s} {'forward s':>10s} {'fwd+bwd s':>10s}")
    for name, size, tf, tfb in rows:
        print(f"{name:34s} {size:>12s} {tf:10.3f} {tfb:10.3f}")
    if not args.quick:
        print(f"chain target < 0.3 s: {'met' if t_c < 0.3 else 'NOT met'} ({t_c:.3f} s)")


if __name__ == "__main__":
    main()
