"""Where reading a tensor's value on the host is free, and where it stalls the device.

On the CPU a value read (``bool(t)``, ``float(t)``, ``t.item()``) costs nothing extra; on a GPU it
waits for every queued kernel (a host synchronisation). Code that can avoid a read off the CPU (at
the price of some unconditional work) asks :func:`host_reads_are_free` once, here, so a test can
make the CPU take the GPU's branches and count what is left.
"""

from __future__ import annotations

import torch


def host_reads_are_free(device) -> bool:
    """True on the CPU, where reading a tensor value needs no device synchronisation."""
    return torch.device(device).type == "cpu"


def read_host(t: torch.Tensor) -> list:
    """``t.tolist()``: THE place where a guided step reads device values on purpose (once per step;
    tests count the calls)."""
    return t.tolist()
