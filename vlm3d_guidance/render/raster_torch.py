"""Pure-torch rasterizer with nvdiffrast's conventions (CPU or CUDA).

Conventions (shared by both backends):

- ``pos``: clip-space vertex positions ``[B, V, 4]`` (OpenGL: ``ndc = xyz / w``); ``tri``: ``[F, 3]``
  integer vertex indices shared by all ``B`` images.
- ``rast = rasterize(pos, tri, (H, W))``: ``[B, H, W, 4]`` (float32; float64 for float64 ``pos``) = ``(u, v, z/w, triangle_id + 1)``;
  ``triangle_id + 1 == 0`` marks background (then ``u = v = z/w = 0``). Row 0 is the BOTTOM of the
  image (ndc ``y = -1``), column 0 the left; pixel ``(row r, col c)`` samples its centre
  ``ndc = ((2c + 1) / W - 1, (2r + 1) / H - 1)``.
- Barycentrics: an attribute interpolates as ``u * a[tri[:, 0]] + v * a[tri[:, 1]] + (1 - u - v) *
  a[tri[:, 2]]``; ``(u, v)`` are perspective-correct (weights of the 3D surface point).
- Gradients: visibility (which triangle covers a pixel) comes from a z-buffer and has no gradient;
  ``u, v, z/w`` are recomputed differentiably from ``pos`` for covered pixels. Silhouette gradients
  come only from :func:`~vlm3d_guidance.render.antialias.antialias`.

Triangles with a vertex at ``w <= 0`` (behind the camera) are dropped, not clipped; fragments outside
``-1 <= z/w <= 1`` are discarded. Coverage includes pixel centres exactly on an edge; shared edges
are tested with bit-identical edge functions from both sides, so closed meshes have no pinholes.
"""

from __future__ import annotations

import torch

_INT64_MAX = torch.iinfo(torch.int64).max


def _as_batched(pos: torch.Tensor) -> torch.Tensor:
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    if pos.dim() != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be [B, V, 4] clip-space positions, got {tuple(pos.shape)}")
    return pos


@torch.no_grad()
def visibility(pos: torch.Tensor, tri: torch.Tensor, resolution) -> torch.Tensor:
    """Z-buffer: ``[B, H, W]`` long triangle id + 1 of the nearest fragment (0 = background).

    Each triangle's three edge functions are set up once (per triangle, not per fragment) in a
    canonical form: every undirected edge is evaluated from its lower vertex index, so the two
    triangles sharing an edge compute bit-identical values at a pixel centre and a closed mesh has
    no pinholes. Fragments (pixel centres inside a triangle's bounding box) then gather one row of
    that setup each.
    """
    pos = _as_batched(pos).detach()
    H, W = int(resolution[0]), int(resolution[1])
    B, F = pos.shape[0], tri.shape[0]
    dev = pos.device
    if F == 0:
        return torch.zeros(B, H, W, dtype=torch.long, device=dev)
    tri = tri.long()
    w = pos[..., 3]
    wsafe = torch.where(w.abs() > 1e-12, w, torch.ones_like(w))
    screen = torch.stack([(pos[..., 0] / wsafe + 1.0) * (0.5 * W),  # pixel units, centre of col c at c + 0.5
                          (pos[..., 1] / wsafe + 1.0) * (0.5 * H),
                          pos[..., 2] / wsafe, w], dim=-1).reshape(B * pos.shape[1], 4)
    corner = (torch.arange(B, device=dev)[:, None, None] * pos.shape[1] + tri[None]).reshape(-1)
    sv = screen.index_select(0, corner).reshape(B * F, 3, 4)  # [B*F, corner, (x, y, z/w, w)]
    tx, ty = sv[..., 0], sv[..., 1]
    ok = (sv[..., 3] > 1e-12).all(-1)
    cx0 = torch.ceil(tx.amin(-1) - 0.5).clamp_min(0).long()
    cx1 = torch.floor(tx.amax(-1) - 0.5).clamp_max(W - 1).long()
    cy0 = torch.ceil(ty.amin(-1) - 0.5).clamp_min(0).long()
    cy1 = torch.floor(ty.amax(-1) - 0.5).clamp_max(H - 1).long()
    bw = (cx1 - cx0 + 1).clamp_min(0)
    cnt = torch.where(ok, bw * (cy1 - cy0 + 1).clamp_min(0), torch.zeros_like(bw))
    sel = torch.nonzero(cnt > 0).squeeze(1)  # (b * F + f) of triangles that reach a pixel centre
    if sel.numel() == 0:
        return torch.zeros(B, H, W, dtype=torch.long, device=dev)
    # --- per-triangle setup: edge k = (v_k, v_k+1) as (x_lo, y_lo, x_hi - x_lo, y_hi - y_lo, sign)
    sv = sv.index_select(0, sel)
    tx, ty, tz = sv[..., 0], sv[..., 1], sv[..., 2]
    vi = tri.index_select(0, sel % F)

    def nxt(t):  # t[:, (1, 2, 0)]
        return torch.cat([t[:, 1:], t[:, :1]], dim=1)

    ascending = vi < nxt(vi)  # [S, 3]: edge k is stored from its lower vertex index
    tx1, ty1 = nxt(tx), nxt(ty)
    xa = torch.where(ascending, tx, tx1)
    ya = torch.where(ascending, ty, ty1)
    ex = torch.where(ascending, tx1, tx) - xa
    ey = torch.where(ascending, ty1, ty) - ya
    sign = ascending.to(tx.dtype) * 2.0 - 1.0
    setup = torch.cat([xa, ya, ex, ey, sign, tz], dim=1)  # [S, 18]
    cnt = cnt.index_select(0, sel)
    box = torch.stack([cx0.index_select(0, sel), cy0.index_select(0, sel), bw.index_select(0, sel)], dim=0)
    # --- fragments: one gather of the setup each
    total = int(cnt.sum())
    owner = torch.repeat_interleave(torch.arange(sel.numel(), device=dev), cnt, output_size=total)
    start = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(total, device=dev) - start.index_select(0, owner)
    bx = box.index_select(1, owner)
    px = bx[0] + local % bx[2]
    py = bx[1] + local // bx[2]
    fx = (px.to(tx.dtype) + 0.5)[:, None]
    fy = (py.to(tx.dtype) + 0.5)[:, None]
    xa, ya, ex, ey, sign, tz = setup.index_select(0, owner).split(3, dim=1)  # each [T, 3]
    e = (ex * (fy - ya) - ey * (fx - xa)) * sign  # [T, 3]; e_k: edge (v_k, v_k+1), opposite v_k+2
    e0, e1, e2 = e.unbind(1)
    area = e0 + e1 + e2  # = 2 * signed area, evaluated at the pixel (constant up to rounding)
    inside = ((e >= 0).all(1) | (e <= 0).all(1)) & (area != 0)
    # screen-space barycentric of v_k is e_{k+1} / area; z/w is affine in screen space
    zb = (e1 * tz[:, 0] + e2 * tz[:, 1] + e0 * tz[:, 2]) / torch.where(area != 0, area, torch.ones_like(area))
    inside &= (zb >= -1.0) & (zb <= 1.0)
    keep = torch.nonzero(inside).squeeze(1)
    g = sel.index_select(0, owner.index_select(0, keep))
    d01 = ((zb.index_select(0, keep).float() + 1.0) * 0.5).clamp(0.0, 1.0)
    key = (d01.view(torch.int32).long() << 32) | (g % F)
    pix = ((g // F) * H + py.index_select(0, keep)) * W + px.index_select(0, keep)
    out = torch.full((B * H * W,), _INT64_MAX, dtype=torch.int64, device=dev)
    out.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)
    hit = out != _INT64_MAX
    ids = torch.where(hit, (out & 0xFFFFFFFF) + 1, torch.zeros_like(out))
    return ids.reshape(B, H, W)


def barycentrics(pos: torch.Tensor, tri: torch.Tensor, b: torch.Tensor, f: torch.Tensor,
                 px: torch.Tensor, py: torch.Tensor, resolution):
    """Differentiable perspective-correct ``(u, v, z/w)`` of triangle ``f`` in image ``b`` at pixel
    centres ``(px, py)`` (integer column/row, row 0 at the bottom). All index tensors ``[P]``.

    Solves ``sum_i l_i (x_i - X w_i, y_i - Y w_i) = 0``, ``sum_i l_i = 1`` in clip space, where
    ``(X, Y)`` is the pixel centre in ndc: ``l`` are the 3D (perspective-correct) weights.
    """
    H, W = int(resolution[0]), int(resolution[1])
    c = pos[b[:, None], tri[f].long()]  # [P, 3, 4]
    X = ((2 * px + 1).to(c.dtype) / W - 1.0)[:, None]
    Y = ((2 * py + 1).to(c.dtype) / H - 1.0)[:, None]
    ax = c[..., 0] - X * c[..., 3]
    ay = c[..., 1] - Y * c[..., 3]
    m00, m01 = ax[:, 0] - ax[:, 2], ax[:, 1] - ax[:, 2]
    m10, m11 = ay[:, 0] - ay[:, 2], ay[:, 1] - ay[:, 2]
    det = m00 * m11 - m01 * m10
    det = torch.where(det.abs() > 0, det, torch.full_like(det, 1e-30))
    u = (-ax[:, 2] * m11 + ay[:, 2] * m01) / det
    v = (-m00 * ay[:, 2] + m10 * ax[:, 2]) / det
    wgt = torch.stack([u, v, 1.0 - u - v], dim=-1)
    zw = (wgt * c[..., 2]).sum(-1) / (wgt * c[..., 3]).sum(-1)
    return u, v, zw


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution) -> torch.Tensor:
    """``rast [B, H, W, 4] = (u, v, z/w, triangle_id + 1)``; see the module doc for conventions."""
    pos = _as_batched(pos)
    H, W = int(resolution[0]), int(resolution[1])
    B = pos.shape[0]
    ids = visibility(pos, tri, (H, W)).reshape(-1)
    cov = torch.nonzero(ids).squeeze(1)
    rdt = torch.promote_types(pos.dtype, torch.float32)
    rast = torch.zeros(B * H * W, 4, dtype=rdt, device=pos.device)
    if cov.numel() == 0:
        return rast.reshape(B, H, W, 4)
    f = ids[cov] - 1
    b, rem = cov // (H * W), cov % (H * W)
    py, px = rem // W, rem % W
    u, v, zw = barycentrics(pos, tri, b, f, px, py, (H, W))
    vals = torch.stack([u, v, zw, (f + 1).to(u.dtype)], dim=-1).to(rdt)
    rast = rast.index_put((cov,), vals)
    return rast.reshape(B, H, W, 4)


def interpolate_covered(attr: torch.Tensor, rast_flat: torch.Tensor, covered: torch.Tensor,
                        tri: torch.Tensor, pixels_per_image: int) -> torch.Tensor:
    """Vertex attributes interpolated at the covered pixels only (packed).

    Works on either backend's ``rast`` (it reads only the shared convention).

    Args:
        attr: ``[B, V, C]`` per-image attributes, or ``[1, V, C]`` shared by all images.
        rast_flat: ``rast.reshape(-1, 4)`` = ``(u, v, z/w, triangle_id + 1)`` per pixel.
        covered: ``[P]`` flat pixel indices ``(b * H + row) * W + col`` with ``triangle_id + 1 > 0``.
        tri: ``[F, 3]`` vertex indices.
        pixels_per_image: ``H * W``.

    Returns:
        ``[P, C]`` = ``u * a[t0] + v * a[t1] + (1 - u - v) * a[t2]`` in the promoted dtype of
        ``attr`` and ``rast``, differentiable w.r.t. ``attr`` and ``(u, v)``.
    """
    B, V, C = attr.shape
    rows = rast_flat.index_select(0, covered)  # [P, 4]
    f = rows[:, 3].detach().round().long() - 1
    b = covered // pixels_per_image if B > 1 else torch.zeros_like(covered)
    corner = (b[:, None] * V + tri.long().index_select(0, f)).reshape(-1)
    a = attr.reshape(B * V, C).index_select(0, corner).reshape(-1, 3, C)
    u, v = rows[:, 0:1], rows[:, 1:2]
    return u * a[:, 0] + v * a[:, 1] + (1.0 - u - v) * a[:, 2]


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """Interpolate vertex attributes ``[V, C]``, ``[1, V, C]`` or ``[B, V, C]`` -> ``[B, H, W, C]``
    (zeros on background). Differentiable w.r.t. ``attr`` and ``rast``'s ``(u, v)``."""
    if attr.dim() == 2:
        attr = attr.unsqueeze(0)
    B, H, W, _ = rast.shape
    C = attr.shape[-1]
    flat = rast.reshape(-1, 4)
    cov = torch.nonzero(flat[:, 3].detach().round().long()).squeeze(1)
    out_dtype = torch.promote_types(attr.dtype, rast.dtype)
    out = torch.zeros(B * H * W, C, dtype=out_dtype, device=rast.device)
    if cov.numel() == 0:
        return out.reshape(B, H, W, C)
    val = interpolate_covered(attr, flat, cov, tri, H * W)
    out = out.index_put((cov,), val.to(out_dtype))
    return out.reshape(B, H, W, C)
