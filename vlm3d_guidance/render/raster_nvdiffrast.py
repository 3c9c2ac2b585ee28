"""nvdiffrast backend (CUDA only, optional): same conventions as :mod:`.raster_torch`.

nvdiffrast is imported lazily; it is not on PyPI. Install with::

    pip install git+https://github.com/NVlabs/nvdiffrast --no-build-isolation
"""

from __future__ import annotations

import torch

INSTALL_HINT = "pip install git+https://github.com/NVlabs/nvdiffrast --no-build-isolation"

_CONTEXTS = {}


def available() -> bool:
    """True when ``nvdiffrast.torch`` imports and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    try:
        import nvdiffrast.torch  # noqa: F401
    except Exception:
        return False
    return True


def _dr():
    try:
        import nvdiffrast.torch as dr
    except Exception as exc:  # ImportError, or a broken build
        raise ImportError(f"the nvdiffrast backend needs nvdiffrast (not on PyPI): {INSTALL_HINT}") from exc
    return dr


def _context(device: torch.device):
    dr = _dr()
    key = str(device)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = dr.RasterizeCudaContext(device=device)
    return _CONTEXTS[key]


def _check(pos: torch.Tensor):
    if pos.device.type != "cuda":
        raise ValueError("the nvdiffrast backend needs CUDA tensors; use backend='torch' on CPU")


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution) -> torch.Tensor:
    """``rast [B, H, W, 4] = (u, v, z/w, triangle_id + 1)``, row 0 at the bottom (float32)."""
    _check(pos)
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    dr = _dr()
    rast, _ = dr.rasterize(_context(pos.device), pos.float().contiguous(), tri.int().contiguous(),
                           resolution=[int(resolution[0]), int(resolution[1])])
    return rast


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Vertex attributes ``[V, C]``/``[1, V, C]``/``[B, V, C]`` -> ``[B, H, W, C]``."""
    dr = _dr()
    if attr.dim() == 2:
        attr = attr.unsqueeze(0)
    out, _ = dr.interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
    return out


def antialias_native(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """nvdiffrast's own per-triangle antialias (for comparison; weak on dense meshes, see DESIGN.md)."""
    dr = _dr()
    return dr.antialias(color.contiguous(), rast, pos.float().contiguous(), tri.int().contiguous())
