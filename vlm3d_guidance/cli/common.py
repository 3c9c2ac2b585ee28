"""What every subcommand of ``vlm3d-guide`` shares: the program name, the error types, messages."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

PROG = "vlm3d-guide"


class UsageError(Exception):
    """A user mistake: reported as one line ``vlm3d-guide: error: <problem>; <fix>``, exit code 2."""


class JobError(Exception):
    """A run that ran but could not produce its outputs (for example no surface was extracted)."""


class _RunFailed(Exception):
    """A run that could not finish (exit code 1, one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message}; see '{self.prog} --help'")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _silence_progress_bars() -> None:
    """--quiet: no tqdm bars from us, hy3dgen, transformers or huggingface_hub."""
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when it is first imported
    for module, name in (("transformers.utils.logging", "disable_progress_bar"),
                         ("huggingface_hub.utils", "disable_progress_bars")):
        if module.split(".")[0] in sys.modules:
            with contextlib.suppress(Exception):
                getattr(__import__(module, fromlist=[name]), name)()
