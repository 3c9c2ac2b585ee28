"""Tiny, deterministic, randomly-initialised models of the REAL classes, saved in the real layouts.

They exist so that tests, examples and ``vlm3d-guide --tiny`` run the real loading and sampling code
offline in seconds. Their outputs are meaningless shapes and words.

- :func:`build_tiny_hunyuan` writes a Hunyuan3D-2.x model folder (``config.yaml`` +
  ``model.fp16.safetensors``) under ``<root>/<model_path>/<subfolder>`` for hy3dgen's
  ``Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`` with ``HY3DGEN_MODELS=<root>``.
- :func:`build_tiny_hunyuan21` writes a Hunyuan3D 2.1 model folder (``config.yaml`` + ``model.fp16.ckpt``)
  of hy3dshape's classes for hy3dshape's ``from_pretrained`` (hy3dshape must be importable).
- :func:`build_tiny_qwen` writes a Qwen-VL checkpoint folder for
  ``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained``.

Every builder is cached: a folder that is complete (its ``.complete`` stamp matches the builder's
version) is reused, and building writes to a temporary folder renamed into place at the end.
"""

from .common import default_cache_dir  # noqa: F401
from .hunyuan import HUNYUAN_FLAVOURS, TinyHunyuan, build_tiny_hunyuan, load_tiny_hunyuan_pipeline  # noqa: F401
from .hunyuan21 import TinyHunyuan21, build_tiny_hunyuan21, load_tiny_hunyuan21_pipeline  # noqa: F401
from .qwen import QWEN_FAMILIES, build_tiny_qwen  # noqa: F401
