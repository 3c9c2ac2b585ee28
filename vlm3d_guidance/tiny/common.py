"""Shared helpers for the tiny-model builders: cache folder and atomic, stamped folder writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

STAMP = ".complete"


def default_cache_dir() -> Path:
    """Where tiny models are cached: ``$VLM3D_TINY_CACHE`` or ``~/.cache/vlm3d_guidance/tiny``."""
    env = os.environ.get("VLM3D_TINY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vlm3d_guidance" / "tiny"


def is_complete(folder: Path, version: str) -> bool:
    """True when ``folder`` was fully written by a builder of this ``version``."""
    stamp = Path(folder) / STAMP
    return stamp.is_file() and stamp.read_text().strip() == version


@contextlib.contextmanager
def atomic_folder(folder: Path, version: str):
    """Yield a temporary sibling folder; on success stamp it and move it to ``folder``.

    A crash leaves no half-written ``folder`` behind; a concurrent builder that finished
    first wins and the second result is discarded.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        (tmp / STAMP).write_text(version)
        if folder.exists():
            if is_complete(folder, version):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def models_root(root):
    """Set ``HY3DGEN_MODELS`` (where hy3dgen's and hy3dshape's loaders look first) to ``root`` while
    active; the previous value (or its absence) is restored afterwards, also on error."""
    previous = os.environ.get("HY3DGEN_MODELS")
    os.environ["HY3DGEN_MODELS"] = str(root)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HY3DGEN_MODELS", None)
        else:
            os.environ["HY3DGEN_MODELS"] = previous
