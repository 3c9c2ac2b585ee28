"""Where the models of a run come from (local folder, cache, the Hugging Face hub), checked before loading."""

from __future__ import annotations

import os
from pathlib import Path

from .common import UsageError


def _looks_local(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or os.sep in name.replace("/", "", 1) or name.count("/") != 1
            or os.path.isabs(name))


def _local_path(name: str) -> str:
    return os.path.abspath(os.path.expanduser(name))


def _offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set true)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_files(repo_id: str, what: str) -> list:
    """The repo's file names on the hub (a UsageError when the hub is unreachable or the repo unknown)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover
        raise UsageError("huggingface_hub is not installed; pip install huggingface_hub, or give a local "
                         "folder") from None
    try:
        info = HfApi().model_info(repo_id, timeout=15)
    except GatedRepoError:
        raise UsageError(f"{what} {repo_id} is gated on the Hugging Face hub; accept its licence on "
                         f"https://huggingface.co/{repo_id} and log in with 'hf auth login'") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{what} {repo_id} is not on the Hugging Face hub and not a local folder; check the "
                         "name or path") from None
    except Exception as exc:
        from huggingface_hub import constants

        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise UsageError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} to download {what} "
                         f"{repo_id} ({reason}); check the network or proxy, or download the weights on a "
                         "connected machine and pass a local folder") from None
    return [s.rfilename for s in (info.siblings or [])]


def _weights_file(config: Path) -> str:
    """The weights file the loader of ``config``'s package reads: hy3dshape's (2.1) defaults to
    ``model.fp16.ckpt``, hy3dgen's to ``model.fp16.safetensors``."""
    import yaml

    from ..model_routing import config_package

    try:
        package = config_package(yaml.safe_load(config.read_text()), where=str(config))
    except (ValueError, yaml.YAMLError) as exc:
        raise UsageError(str(exc).replace("\n", " ")) from None
    return "model.fp16.ckpt" if package == "hy3dshape" else "model.fp16.safetensors"


def check_hunyuan(model_path: str, subfolder: str) -> str:
    """Where hy3dgen (or hy3dshape) will find the model: a one-line description, or a UsageError."""
    base = os.environ.get("HY3DGEN_MODELS", "~/.cache/hy3dgen")
    if _looks_local(model_path):
        local = Path(_local_path(model_path)) / subfolder
    else:
        local = Path(os.path.expanduser(os.path.join(base, model_path, subfolder)))
    if local.exists():
        if not (local / "config.yaml").is_file():
            raise UsageError(f"model folder {local} lacks config.yaml; it needs config.yaml and "
                             "model.fp16.safetensors (Hunyuan3D 2.1: model.fp16.ckpt); delete the folder to "
                             "download it again")
        weights = _weights_file(local / "config.yaml")
        if not (local / weights).is_file():
            raise UsageError(f"model folder {local} lacks {weights}; it needs config.yaml and "
                             f"{weights} (delete the folder to download it again)")
        return f"local folder {local}"
    if _looks_local(model_path):
        raise UsageError(f"model folder not found: {local}; check --model-path and --subfolder (a local model "
                         "is <path>/<subfolder>/config.yaml + model.fp16.safetensors, or model.fp16.ckpt for "
                         "Hunyuan3D 2.1)")
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(repo_id=model_path, allow_patterns=[f"{subfolder}/*"],
                                        local_files_only=True)) / subfolder
        if (cached / "config.yaml").is_file() and (cached / _weights_file(cached / "config.yaml")).is_file():
            return f"Hugging Face cache {cached}"
    except UsageError:
        raise
    except Exception:
        pass
    if _offline():
        raise UsageError(f"Hunyuan3D model {model_path}/{subfolder} is not downloaded and HF_HUB_OFFLINE is "
                         f"set; run once with network (or 'hf download {model_path} --include "
                         f"\"{subfolder}/*\"'), or put it in $HY3DGEN_MODELS/{model_path}/{subfolder}")
    files = _hub_files(model_path, "Hunyuan3D model")
    if not any(f.startswith(subfolder + "/") for f in files):
        subs = sorted({f.split("/", 1)[0] for f in files if "/" in f and "dit" in f.split("/", 1)[0]})
        raise UsageError(f"the hub repo {model_path} has no subfolder {subfolder}; choose --subfolder from "
                         f"{', '.join(subs) or '(none found)'}")
    return f"download from the Hugging Face hub ({model_path}/{subfolder}, first use only)"


def check_hf_model(name: str, what: str, flag: str) -> str:
    """A transformers model (critic or CLIP): local folder, cached, or reachable on the hub."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{what} folder {name} has no config.json; point {flag} at a transformers "
                             "model folder")
        return f"local folder {path}"
    if _looks_local(name):
        raise UsageError(f"{what} folder not found: {name}; check {flag} (a hub id looks like Org/Name)")
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str) and any(
                isinstance(try_to_load_from_cache(name, w), str)
                for w in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")):
            return "Hugging Face cache"
    except Exception:
        pass
    if _offline():
        raise UsageError(f"{what} {name} is not downloaded and HF_HUB_OFFLINE is set; run once with network "
                         f"(or 'hf download {name}'), or pass a local folder to {flag}")
    _hub_files(name, what)
    return "download from the Hugging Face hub (first use only)"


def check_models(s: dict) -> dict:
    if s["tiny"]:
        return dict(hunyuan="built-in tiny model", critic="built-in tiny critic")
    if s.get("toy"):
        from ..toy.models import verify_weights

        try:
            verify_weights()
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return dict(hunyuan="built-in toy generator (trained)", critic="built-in toy critic (trained, then gradient-matched)")
    from ..model_routing import import_hy3dshape_pipeline, model_package

    hunyuan = check_hunyuan(s["model_path"], s["subfolder"])  # reports a missing model or network first
    model_path = _local_path(s["model_path"]) if _looks_local(s["model_path"]) else s["model_path"]
    try:  # routed by the targets its config.yaml names, as GuidedHunyuanPipeline.from_pretrained does
        package = model_package(model_path, s["subfolder"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if package == "hy3dshape":
        try:
            import_hy3dshape_pipeline()
        except ImportError as exc:
            raise UsageError(f"{exc}; or use --model-path tencent/Hunyuan3D-2") from None
    return dict(hunyuan=hunyuan,
                critic=check_hf_model(s["critic"], "critic", "--critic"))
