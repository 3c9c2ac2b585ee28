"""Temporary surgery on a loaded DiT for the guided step's "full" gradient mode.

Everything here is undone on exit (also on error), instance by instance: a patched ``forward`` is
set on the module instance (the class is never touched) and removed again; each submodule's own
train/eval mode is restored.

- :func:`_dit_train_mode` -- the DiT in train mode while the gradient flows through it (hy3dshape's
  MoE blocks have no gradient in eval mode), with the MoE gates' auxiliary loss detached.
- :func:`_checkpointed` -- activation checkpointing of the DiT's transformer blocks.
- :func:`_patch_forward` / :func:`_unpatch_forward` -- the stackable instance-level patch both use.
"""

from __future__ import annotations

import contextlib

import torch


def _patch_forward(module, wrap) -> None:
    """Replace ``module.forward`` by ``wrap(module.forward)`` on the instance (undo with :func:`_unpatch_forward`)."""
    module.__dict__.setdefault("_vlm3d_saved_forward", [])
    module._vlm3d_saved_forward.append(module.__dict__.get("forward"))
    module.forward = wrap(module.forward)


def _unpatch_forward(module) -> None:
    saved = module._vlm3d_saved_forward.pop()
    if saved is None:
        del module.forward  # back to the class's forward
    else:
        module.forward = saved
    if not module._vlm3d_saved_forward:
        del module._vlm3d_saved_forward


def _detached_aux(forward):
    """A MoE gate forward whose load-balancing loss (3rd output) carries no gradient."""
    def gate_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 3 and isinstance(out[2], torch.Tensor):
            out = (out[0], out[1], out[2].detach())
        return out
    return gate_forward


@contextlib.contextmanager
def _dit_train_mode(model, enabled: bool):
    """Run the DiT in train mode while active (gradient="full"), then restore every module's own mode.

    Hunyuan3D 2.1's (hy3dshape) MoE blocks compute their eval-mode path (``moe_infer``) under
    ``torch.no_grad``, so with the DiT in ``.eval()`` the gradient through it is wrong. Their
    train-mode path is differentiable and has no active dropout (dropout 0.0), but it attaches the
    gate's load-balancing loss with an autograd trick (``AddAuxiliaryLoss``) whose backward adds
    ``d aux / d input`` to every gradient. So the aux loss of every ``MoEGate`` is detached while
    active: the gradient is then exactly that of the velocity. hy3dgen 2.0's DiT
    (``Hunyuan3DDiT``) has no dropout, no ``self.training`` branch and no MoE, so train mode
    changes nothing there (same values, same gradients).

    The previous mode of EACH submodule is restored (a model may mix modes), also on error.
    """
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    gates = [m for m in model.modules() if type(m).__name__ == "MoEGate"]
    for gate in gates:
        _patch_forward(gate, _detached_aux)
    model.train()
    try:
        yield
    finally:
        for gate in gates:
            _unpatch_forward(gate)
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _checkpointed(model, enabled: bool):
    """Recompute the DiT's transformer blocks in backward (activation checkpointing) while active.

    hy3dgen's DiT has no checkpointing switch; this wraps each block's forward with
    ``torch.utils.checkpoint`` for the duration and restores it afterwards. The recomputation
    happens in backward, so the DiT's train mode (:func:`_dit_train_mode`) must still be on then.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    blocks = [m for name in ("double_blocks", "single_blocks", "blocks") for m in getattr(model, name, [])]
    for block in blocks:
        _patch_forward(block, lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))
    try:
        yield
    finally:
        for block in blocks:
            _unpatch_forward(block)
