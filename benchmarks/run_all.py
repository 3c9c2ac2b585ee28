"""Run every benchmark in this folder (``bench_*.py``), passing ``--quick`` through.

Each benchmark prints its own table; this runner fails if any of them fails.
Torch is pinned to one thread (``OMP_NUM_THREADS=1``) unless the caller set it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        print(f"\n=== {script.name} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script), *argv], env=env)
        print(f"=== {script.name}: exit {rc} in {time.perf_counter() - start:.1f} s", flush=True)
        if rc != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
