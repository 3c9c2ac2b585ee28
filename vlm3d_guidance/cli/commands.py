"""The subcommands of ``vlm3d-guide`` (``vlm3d-guide NAME ...``); a plain run has no name.

To add one (say ``serve``): write ``vlm3d_guidance/cli/serve.py`` with ``run_serve(argv: list) -> int``
(parse with a :class:`~vlm3d_guidance.cli.common._Parser`, raise
:class:`~vlm3d_guidance.cli.common.UsageError` for user mistakes before loading anything), then add
its line below. ``vlm3d-guide serve ...`` then dispatches to it and the usage line of
``vlm3d-guide --help`` lists it.
"""

#: name -> (module of vlm3d_guidance.cli, its entry function ``f(argv) -> exit code``, usage synopsis)
SUBCOMMANDS = {
    "batch": ("batch", "run_batch", "INPUTS -o OUT [options]"),
    "eval": ("eval", "run_eval", "DIR [options]"),
    "toy-eval": ("toy_eval", "run_toy_eval", "-o OUT [--count N] [options]"),
    "serve": ("serve", "run_serve", "[--tiny | --toy] [--host H] [--port P] [options]"),
}
