"""Checks made before sampling, for settings that would silently switch guidance off.

hy3dgen picks its attention kernel when its modules are imported: ``USE_SAGEATTN=1`` replaces
``scaled_dot_product_attention`` by sageattention's ``sageattn`` in the VAE's attention blocks and
the DiT, ``CA_USE_SAGEATTN=1`` in the VAE's cross-attention processor (the ``geo_decoder``).
``sageattn`` has no backward, so every guided step would end "non-finite gradient" and the run
would quietly be unguided.
"""

from __future__ import annotations

import importlib
import sys

import torch

# module -> (the environment switch that changes it, whether it is on the "x0" gradient path)
ATTENTION_MODULES = {
    "hy3dgen.shapegen.models.autoencoders.attention_blocks": ("USE_SAGEATTN", True),
    "hy3dgen.shapegen.models.autoencoders.attention_processors": ("CA_USE_SAGEATTN", True),
    "hy3dgen.shapegen.models.denoisers.hunyuan3ddit": ("USE_SAGEATTN", False),
}


def replaced_attention(gradient: str = "x0") -> list:
    """``[(module name, switch name, function name)]`` of the hy3dgen modules on the gradient path
    (the VAE always; the DiT too for ``gradient="full"``) whose ``scaled_dot_product_attention`` is
    not torch's. Modules that are not imported yet are imported (as the pipeline would)."""
    found = []
    for name, (switch, on_x0_path) in ATTENTION_MODULES.items():
        if not on_x0_path and gradient != "full":
            continue
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue  # not hy3dgen 2.0 (e.g. hy3dshape): nothing to check here
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is not None and fn is not torch.nn.functional.scaled_dot_product_attention:
            found.append((name, switch, getattr(fn, "__name__", repr(fn))))
    return found


def check_attention_has_backward(gradient: str = "x0") -> None:
    """ValueError naming the switch when hy3dgen's attention on the gradient path is not torch's."""
    found = replaced_attention(gradient)
    if found:
        where = "; ".join(f"{name}.scaled_dot_product_attention is {fn} ({switch}=1)" for name, switch, fn in found)
        switches = " and ".join(sorted({switch for _, switch, _ in found}))
        raise ValueError(
            f"hy3dgen's attention has no backward here: {where}. Every guided step would end "
            f"'non-finite gradient' and the run would be unguided. Unset {switches} before Python "
            "imports hy3dgen (start a new process), or sample with lam=0")
