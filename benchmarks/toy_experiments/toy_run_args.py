"""The command line the toy-evaluation experiment scripts share:
``WEIGHTS A B OUT.json [EXTRA ...] [NAME=VALUE ...]``.

WEIGHTS is "shipped" (the package's toy weights) or a weights folder; the run covers test references
``A .. B-1`` (reference i sampled with seed i); EXTRA are a script's own positional arguments; each
NAME=VALUE is a guidance option, VALUE a Python literal (``lam=0.05``, ``volume="'keep'"``).
"""
import ast
import sys
from types import SimpleNamespace

import torch

from vlm3d_guidance import toy


def toy_run_args(extra: int = 0, argv=None) -> SimpleNamespace:
    """Parse ``argv`` (default ``sys.argv``), pin torch to one thread, load the pipeline and the references.

    Returns ``pipe``, ``refs``, ``a``, ``b``, ``out``, ``extra`` (the ``extra`` positional strings),
    ``options`` (``{NAME: value}``) and ``option_args`` (the NAME=VALUE strings as given).
    """
    argv = sys.argv if argv is None else argv
    torch.set_num_threads(1)
    w, a, b, out = argv[1], int(argv[2]), int(argv[3]), argv[4]
    option_args = argv[5 + extra:]
    options = {k: ast.literal_eval(v) for k, v in (arg.split("=", 1) for arg in option_args)}
    pipe = toy.load_pipeline(weights=None if w == "shipped" else w)
    refs = toy.references("test", count=b - a, seed=0, start=a)
    return SimpleNamespace(pipe=pipe, refs=refs, a=a, b=b, out=out, extra=argv[5:5 + extra], options=options,
                           option_args=option_args)
