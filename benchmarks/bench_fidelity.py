"""What the critic sees against what is exported: silhouette IoU per critic view between the guidance
mesh and the exported mesh (hy3dgen's stock ``MCSurfaceExtractor`` at ``octree_resolution``).

Rows: analytic shapes with thin parts (vlm3d_guidance.tiny.shapes) at the old default (64^3 dense,
as decoded) and the new one (128^3 coarse-to-fine, placed like the stock export), against the 384^3
export; the critic's default views (4 x 448 px, 20 deg elevation, fitted to the guidance mesh).

    python benchmarks/bench_fidelity.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from vlm3d_guidance.fidelity import critic_view_iou, exported_mesh, guidance_mesh  # noqa: E402
from vlm3d_guidance.geometry import as_stock_export  # noqa: E402
from vlm3d_guidance.tiny.shapes import SHAPES  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="export at 128^3, two shapes")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    export_res = 128 if args.quick else 384
    names = ("sphere", "table") if args.quick else tuple(SHAPES)
    print(f"export {export_res}^3 (hy3dgen MCSurfaceExtractor); critic views 4 x 448 px, fill 0.9")
    print("| shape | guidance mesh | min IoU | IoU per view | guidance s |")
    print("|---|---|--:|---|--:|")
    for name in names:
        fn = SHAPES[name]
        export = exported_mesh(fn, export_res)
        for label, res, c2f, placed in (("64^3 dense, as decoded (old default)", 64, False, False),
                                        ("128^3 dense, as decoded", 128, False, False),
                                        ("128^3 coarse-to-fine, placed (default)", 128, True, True)):
            t = time.perf_counter()
            v, f = guidance_mesh(fn, res, coarse_to_fine=c2f)
            sec = time.perf_counter() - t
            if placed:
                v = as_stock_export(v, export_res)
            iou = critic_view_iou((v, f), export)
            per = ", ".join(f"{float(x):.4f}" for x in iou)
            print(f"| {name} | {label} | {float(iou.min()):.4f} | {per} | {sec:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
