"""``vlm3d-guide serve``: a web page over the guided pipeline (gradio).

::

    vlm3d-guide serve --tiny                  # tiny random-weight models: try it offline in seconds
    vlm3d-guide serve --toy                   # the trained toy world (vlm3d_guidance.toy), any CPU
    vlm3d-guide serve --critic ... --device cuda   # the normal model options of a run
    vlm3d-guide serve --host 0.0.0.0 --port 8080 --concurrency 2

Modules: :mod:`.jobs` (input limits and checks, job folders, slots, cleanup; no gradio),
:mod:`.runner` (models, examples, one job through the CLI's ``run_job``), :mod:`.server` (the
page). The checks are the CLI's own (``cli.check_image``, ``cli.check_settings``, ...).
"""

from __future__ import annotations

import sys

from .jobs import InputProblem, JobManager, Limits, check_upload, job_settings  # noqa: F401


def build_serve_parser():
    """The parser of ``vlm3d-guide serve``: the run's model options plus the server's own."""
    from .. import cli

    parser = cli.common._Parser(
        prog=f"{cli.PROG} serve",
        description=("A web page to upload a picture, set the knobs and watch the critic steer the shape "
                     "(baseline and guided meshes side by side). Binds 127.0.0.1 unless --host is given."),
    )
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine "
                   "only; another address warns, since the page has no login)")
    g.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    g.add_argument("--concurrency", type=int, default=1, metavar="N",
                   help="jobs running at once on the device (default 1; others wait in the queue)")
    g.add_argument("--share", action="store_true", help="also open a public gradio share link (off by default)")
    g.add_argument("--max-upload-mb", dest="max_upload_mb", type=float, default=10.0, metavar="MB",
                   help="largest upload in megabytes (default 10)")
    g.add_argument("--max-pixels", dest="max_pixels", type=int, default=4096 * 4096, metavar="N",
                   help="largest upload in pixels, width x height (default 4096x4096)")
    g.add_argument("--keep-minutes", dest="keep_minutes", type=float, default=60.0, metavar="M",
                   help="remove a job's files this long after it finished, if its page never closed (default 60)")
    cli.options._add_run_options(parser)
    return parser


def serve_main(argv: list) -> int:
    """``vlm3d-guide serve ARGS``: check everything, load the models once, serve until Ctrl-C."""
    from .. import cli
    from . import runner, server

    args = build_serve_parser().parse_args(argv)
    if args.concurrency < 1:
        raise cli.UsageError(f"--concurrency must be >= 1 (got {args.concurrency}); 1 runs one job at a time")
    if not 0 <= args.port < 65536:
        raise cli.UsageError(f"--port must be 0..65535 (got {args.port})")
    if not args.max_upload_mb > 0 or args.max_pixels < 1 or not args.keep_minutes > 0:
        raise cli.UsageError("--max-upload-mb, --max-pixels and --keep-minutes must be positive")
    limits = Limits(max_bytes=int(args.max_upload_mb * 2 ** 20), max_pixels=args.max_pixels)
    models = runner.load_models(args)
    if models.settings["tiny"]:
        print(cli.TINY_NOTICE, file=sys.stderr, flush=True)
    app = server.create(models, concurrency=args.concurrency, limits=limits, keep_seconds=args.keep_minutes * 60)
    print(f"{cli.PROG} serve: {models.label} on {models.devices['device']}; open http://{args.host}:{args.port} "
          "(Ctrl-C stops)", file=sys.stderr, flush=True)
    server.launch(app, host=args.host, port=args.port, share=args.share, block=True, quiet=True)
    return 0
