"""Which package loads a Hunyuan3D model folder: hy3dgen (2.0, 2mini, 2mv) or hy3dshape (2.1).

A Hunyuan3D model folder ``<model_path>/<subfolder>/`` holds a ``config.yaml`` whose sections
(``model``, ``vae``, ``conditioner``, ``scheduler``, ``image_processor``, and in 2.1 ``pipeline``)
each name a ``target`` class by its import path. Hunyuan3D 2.1's name ``hy3dshape.*`` classes
(``hy3dshape.models.denoisers.hunyuandit.HunYuanDiTPlain``, ...); 2.0, 2mini and 2mv name
``hy3dgen.shapegen.*`` classes. That file, not the folder's name, decides which package's
``Hunyuan3DDiTFlowMatchingPipeline`` loads the model: a fine-tuned 2.1 model in a folder called
"my-chairs" still needs hy3dshape, and a folder whose name happens to contain "2.1" may hold a
2.0 model.

The config is looked up where both packages' loaders look (``smart_load_model``):
``$HY3DGEN_MODELS/<model_path>/<subfolder>/config.yaml`` (default ``~/.cache/hy3dgen``; an
absolute ``model_path`` is used as is), else in the Hugging Face cache, else just that one file is
fetched from the hub into its cache (the loader then downloads the rest as usual). Where none of
these works (offline, a typo) hy3dgen's class is returned, so its loader reports the missing model as
it always has.
"""

from __future__ import annotations

import os
from pathlib import Path

HY3DSHAPE_FIX = (
    "put hy3dshape on PYTHONPATH: clone https://github.com/Tencent-Hunyuan/Hunyuan3D-2.1 and "
    "`export PYTHONPATH=<clone>/hy3dshape:$PYTHONPATH` (the folder that contains the hy3dshape "
    "package), then `pip install timm` (its MoE layers import it); see the README section "
    "'Hunyuan3D 2.1'")

_PACKAGES = ("hy3dgen", "hy3dshape")
_SECTIONS = ("model", "vae", "conditioner", "scheduler", "image_processor", "pipeline")


def local_config_path(model_path: str, subfolder: str) -> Path:
    """Where hy3dgen's and hy3dshape's ``smart_load_model`` look for ``config.yaml`` first."""
    base = os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")
    return Path(os.path.expanduser(os.path.join(base, str(model_path), subfolder, "config.yaml")))


def find_model_config(model_path: str, subfolder: str) -> Path | None:
    """The model folder's ``config.yaml``: local, else fetched alone from the hub; None if neither."""
    local = local_config_path(model_path, subfolder)
    if local.is_file():
        return local
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        filename = f"{subfolder}/config.yaml"
        cached = try_to_load_from_cache(str(model_path), filename)
        if isinstance(cached, str):
            return Path(cached)
        # into the hub cache, not into $HY3DGEN_MODELS: a folder holding only config.yaml there
        # would stop the loader from downloading the weights
        return Path(hf_hub_download(repo_id=str(model_path), filename=filename))
    except Exception:  # offline, unreachable, not a hub repo, no such subfolder: the loader will say so
        return None


def config_package(config: dict, where: str = "config.yaml") -> str:
    """``"hy3dshape"`` or ``"hy3dgen"``: the package the config's ``target`` classes belong to.

    Raises:
        ValueError: no section names a target, or the targets name another package (or both).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a Hunyuan3D model config (a mapping with model, vae, conditioner, ...)")
    targets = {section: config[section]["target"] for section in _SECTIONS
               if isinstance(config.get(section), dict) and isinstance(config[section].get("target"), str)}
    packages = {target.lstrip(".").split(".")[0] for target in targets.values()}
    if len(packages) == 1 and packages <= set(_PACKAGES):
        return packages.pop()
    raise ValueError(
        f"{where} names targets {targets or '(none)'}: a Hunyuan3D model config names either hy3dgen.* "
        "classes (Hunyuan3D 2.0, 2mini, 2mv) or hy3dshape.* classes (Hunyuan3D 2.1) in its model, vae, "
        "conditioner, scheduler and image_processor sections; check model_path and subfolder")


def model_package(model_path: str, subfolder: str) -> str:
    """The package that loads ``<model_path>/<subfolder>`` (``"hy3dgen"`` when its config is not found)."""
    import yaml

    path = find_model_config(model_path, subfolder)
    if path is None:
        return "hy3dgen"
    with open(path) as f:
        return config_package(yaml.safe_load(f), where=str(path))


def import_hy3dshape_pipeline():
    """hy3dshape's ``Hunyuan3DDiTFlowMatchingPipeline``, or an ImportError that names the fix."""
    try:
        from hy3dshape.pipelines import Hunyuan3DDiTFlowMatchingPipeline
    except ImportError as exc:
        missing = exc.name or ""
        what = ("the hy3dshape package, which is not on PyPI, is not importable"
                if missing == "hy3dshape" or missing.startswith("hy3dshape.") or not missing
                else f"hy3dshape is there but its dependency {missing!r} is missing")
        raise ImportError(f"this Hunyuan3D 2.1 model (hy3dshape targets in its config.yaml) needs hy3dshape: "
                          f"{what} ({exc}). Fix: {HY3DSHAPE_FIX}") from exc
    return Hunyuan3DDiTFlowMatchingPipeline


def hunyuan_pipeline_class(model_path: str, subfolder: str):
    """The ``Hunyuan3DDiTFlowMatchingPipeline`` class (hy3dgen's or hy3dshape's) for the model folder."""
    if model_package(model_path, subfolder) == "hy3dshape":
        return import_hy3dshape_pipeline()
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    return Hunyuan3DDiTFlowMatchingPipeline
