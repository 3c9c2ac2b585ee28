"""``vlm3d-guide serve``: the web app (:mod:`vlm3d_guidance.app`), a gradio page over the guided pipeline."""

from __future__ import annotations


def run_serve(argv: list) -> int:
    from ..app import serve_main

    return serve_main(argv)
