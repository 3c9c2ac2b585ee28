"""Enclosed volume of a triangle mesh, differentiable in its vertices."""

from __future__ import annotations

import torch


def mesh_volume(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Signed volume enclosed by a triangle mesh (divergence theorem).

    ``V = sum_f  v0 . (v1 x v2) / 6`` over faces ``f = (v0, v1, v2)``: positive when the faces wind
    counter-clockwise seen from outside, negative for the opposite winding. Exact for a closed mesh;
    for a mesh cut open (e.g. by the field's box) it depends on the origin, but its gradient at a
    vertex whose ring of faces is closed does not: ``dV / dv`` is a third of the area-weighted normal
    summed over the faces around ``v``.

    Args:
        verts: ``[V, 3]`` float vertex positions (gradients flow through them).
        faces: ``[F, 3]`` long vertex indices.

    Returns:
        0-dim tensor in ``verts.dtype`` (0 for no faces).
    """
    if faces.shape[0] == 0:
        return verts.sum() * 0.0
    v0, v1, v2 = (verts[faces[:, k]] for k in range(3))
    return (v0 * torch.linalg.cross(v1, v2)).sum() / 6.0
