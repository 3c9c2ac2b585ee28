"""``vlm3d-guide``: the command line of vlm3d_guidance."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm3d-guide",
        description="Generate a Hunyuan3D shape from a reference image with a VLM critic steering every sampling step.",
    )
    parser.add_argument("--version", action="version", version=f"vlm3d-guide {__version__}")
    return parser


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
