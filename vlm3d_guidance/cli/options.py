"""The options of a run (shared by ``vlm3d-guide`` and ``vlm3d-guide batch``) and the run's parser."""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import BACKENDS, GRADIENT_MODES, SCHEDULES, SHADINGS, VOLUME_MODES
from ..outputs import MESH_FORMATS
from .commands import SUBCOMMANDS
from .common import PROG, _Parser
from .settings import DEFAULTS, TINY_DEFAULTS


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Every knob of a run. Defaults are None here and resolved later (--config, --tiny, DEFAULTS)."""
    d = DEFAULTS
    t = TINY_DEFAULTS

    def dflt(key):
        text = f"default: {d[key]}"
        return text + (f"; --tiny: {t[key]}" if key in t and t[key] != d[key] else "")

    g = parser.add_argument_group("models")
    g.add_argument("--tiny", action="store_true", default=None,
                   help="use the built-in tiny random-weight models (offline, seconds on CPU; meaningless "
                        "shapes, for trying the tool)")
    g.add_argument("--toy", action="store_true", default=None,
                   help="use the trained toy world shipped in the package: a small generator that breaks parts "
                        "and a critic trained to see it (offline, ~15 s per asset on one CPU thread; without "
                        "--image a built-in test reference and its prompt)")
    g.add_argument("--model-path", dest="model_path", metavar="PATH",
                   help=f"Hunyuan3D hub repo or local folder ({dflt('model_path')}); looked up in "
                        "$HY3DGEN_MODELS/<path>/<subfolder> first (default ~/.cache/hy3dgen)")
    g.add_argument("--subfolder", metavar="NAME", help=f"model subfolder ({dflt('subfolder')}; also "
                   "hunyuan3d-dit-v2-0-fast, -turbo, or with --model-path tencent/Hunyuan3D-2mini "
                   "hunyuan3d-dit-v2-mini)")
    g.add_argument("--critic", metavar="MODEL", help=f"Qwen-VL critic: hub id or local folder ({dflt('critic')})")
    g.add_argument("--critic-query", dest="critic_query", choices=("dual", "content", "geometry"),
                   help=f"the critic's question ({dflt('critic_query')}: content match AND geometric quality)")

    g = parser.add_argument_group("sampling")
    g.add_argument("--steps", type=int, metavar="N", help=f"sampling steps ({dflt('steps')})")
    g.add_argument("--cfg", dest="guidance_scale", type=float, metavar="W",
                   help=f"classifier-free guidance scale ({dflt('guidance_scale')})")
    g.add_argument("--seed", type=int, metavar="N", help=f"random seed ({dflt('seed')})")
    g.add_argument("--octree-resolution", dest="octree_resolution", type=int, metavar="N",
                   help=f"grid of the exported mesh ({dflt('octree_resolution')})")
    g.add_argument("--mc-level", dest="mc_level", type=float, metavar="L",
                   help=f"iso-level of the exported surface ({dflt('mc_level')})")
    g.add_argument("--num-chunks", dest="num_chunks", type=int, metavar="N",
                   help=f"field queries per decoder call; lower it to save memory ({dflt('num_chunks')})")

    g = parser.add_argument_group("guidance")
    g.add_argument("--lam", type=float, metavar="L",
                   help=f"guidance strength lambda; 0 = unguided ({dflt('lam')})")
    g.add_argument("--schedule", choices=SCHEDULES,
                   help=f"how lambda varies over the guided window ({dflt('schedule')})")
    g.add_argument("--start", type=float, metavar="F", help=f"guided window start, fraction of steps ({dflt('start')})")
    g.add_argument("--end", type=float, metavar="F", help=f"guided window end, fraction of steps ({dflt('end')})")
    g.add_argument("--every", type=int, metavar="K", help=f"guide every K-th step in the window ({dflt('every')})")
    g.add_argument("--gradient", choices=GRADIENT_MODES,
                   help=f"x0: gradient w.r.t. the clean-latent estimate (cheap); full: through the DiT "
                        f"(~2-3x memory and time) ({dflt('gradient')})")
    g.add_argument("--dit-checkpointing", dest="dit_checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help="with --gradient full: recompute DiT blocks in backward (less memory)")
    g.add_argument("--normalize", choices=("rms", "none"),
                   help=f"rms: lambda is the RMS of each update; none: raw gradient ({dflt('normalize')})")
    g.add_argument("--clip", type=float, metavar="C", help="cap on the RMS of one update (default: off)")
    g.add_argument("--volume", choices=VOLUME_MODES,
                   help="free: the critic's gradient as it is; keep: without its component that changes the "
                        "guidance mesh's enclosed volume (no swelling, one more decoder backward per step); "
                        f"no_growth: that only when the step would grow the shape ({dflt('volume')})")
    g.add_argument("--volume-start", dest="volume_start", type=float, metavar="F",
                   help=f"--volume holds from this fraction of the steps on; earlier steps are free "
                        f"({dflt('volume_start')})")

    g = parser.add_argument_group("the critic's views")
    g.add_argument("--views", type=int, metavar="N", help=f"views per critic query ({dflt('views')})")
    g.add_argument("--elevation", type=float, metavar="DEG", help=f"camera elevation ({dflt('elevation')})")
    g.add_argument("--fov", type=float, metavar="DEG", help=f"camera field of view ({dflt('fov')})")
    g.add_argument("--render-size", dest="render_size", type=int, metavar="PX",
                   help=f"view size; multiples of 28 are exact for Qwen-VL ({dflt('render_size')})")
    g.add_argument("--shading", choices=SHADINGS, help=f"view shading ({dflt('shading')})")
    g.add_argument("--backend", choices=BACKENDS,
                   help=f"rasterizer; auto = nvdiffrast on CUDA when installed ({dflt('backend')})")
    g.add_argument("--grid-resolution", dest="grid_resolution", type=int, metavar="N",
                   help=f"field grid used for guidance at every step ({dflt('grid_resolution')})")
    g.add_argument("--coarse-to-fine", dest="coarse_to_fine", action=argparse.BooleanOptionalAction,
                   help="decode that grid only near the surface: same mesh wherever the surface touches "
                        "the coarse band, far fewer decoder queries (needs an even --grid-resolution; can "
                        f"miss a piece thinner than two cells) ({dflt('coarse_to_fine')})")
    g.add_argument("--rotate-views", dest="rotate_views", action=argparse.BooleanOptionalAction,
                   help="turn the critic's orbit by a new azimuth at every guided step (golden-ratio "
                        "sequence over one view spacing), so the gradient's view-specific part can average "
                        f"out over the run ({dflt('rotate_views')})")

    g = parser.add_argument_group("devices")
    g.add_argument("--device", metavar="DEV", help=f"device of the Hunyuan pipeline, e.g. cuda, cuda:1, cpu "
                   f"({dflt('device')}: cuda when available; under torchrun/accelerate cuda:$LOCAL_RANK)")
    g.add_argument("--dtype", metavar="T", help=f"float16 | bfloat16 | float32 for Hunyuan ({dflt('dtype')}: "
                   "float16 on CUDA, float32 on CPU)")
    g.add_argument("--critic-device", dest="critic_device", metavar="DEV",
                   help="device of the critic (default: --device); put it on a second GPU to split memory")
    g.add_argument("--critic-dtype", dest="critic_dtype", metavar="T",
                   help="critic dtype (default auto: bfloat16 on CUDA, float32 on CPU)")

    g = parser.add_argument_group("output")
    g.add_argument("--format", choices=MESH_FORMATS, help=f"mesh format ({dflt('format')})")
    g.add_argument("--compare", action=argparse.BooleanOptionalAction, default=None,
                   help="also sample the unguided baseline with the same seed (baseline.<fmt>, two rows in views.png)")
    g.add_argument("--sheet-size", dest="sheet_size", type=int, metavar="PX",
                   help=f"tile size of views.png ({dflt('sheet_size')})")
    g.add_argument("--config", dest="config_file", metavar="FILE",
                   help="take settings (and image, prompt, seed) from a run's config.json; options given "
                        "here win")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--quiet", action="store_true", help="no progress bars or messages (errors still print)")
    g.add_argument("--debug", action="store_true", help="show full tracebacks of unexpected errors")


def build_parser() -> argparse.ArgumentParser:
    """The parser of a single run (``vlm3d-guide --image ...``)."""
    parser = _Parser(
        prog=PROG,
        usage="\n       ".join([f"{PROG} --image IMAGE [--prompt TEXT] -o OUT [options]"] + [
            f"{PROG} {name} {synopsis}".ljust(46) + f"(see '{PROG} {name} --help')"
            for name, (_, _, synopsis) in SUBCOMMANDS.items()]),
        description=("Generate a Hunyuan3D shape from a reference image with a vision-language critic "
                     "steering every sampling step (VLM3D, sec. 4.3.2). Try it offline in seconds with "
                     "--tiny."),
        epilog=("outputs in OUT: mesh.<fmt>, baseline.<fmt> (--compare), views.png, trace.json, trace.png, "
                "config.json. Existing outputs are kept unless --overwrite."),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    g = parser.add_argument_group("input")
    g.add_argument("--image", metavar="IMAGE", help="reference image of one object (PNG with transparent "
                   "background is best; an RGB image is treated as all object); with --tiny it may be left out "
                   "(a built-in picture)")
    g.add_argument("--prompt", metavar="TEXT", help="what the object is, for the critic (default: the critic "
                   "describes the image)")
    g.add_argument("-o", "--output", metavar="OUT", help="output folder (created if missing)")
    _add_run_options(parser)
    return parser
