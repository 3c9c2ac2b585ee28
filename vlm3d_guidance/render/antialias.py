"""Silhouette antialiasing by drawing the silhouette EDGES into the pixel pairs they cross.

Why not nvdiffrast's scheme: it only looks at the triangles sampled at the two pixels of a pair. On
dense marching-cubes meshes the rim triangles are thinner than a pixel, so the silhouette edge that
actually crosses a pair usually belongs to a triangle neither pixel sampled, and almost all of the
silhouette gradient is lost (DESIGN.md measured 1-3 % recovered). Here the edges are found on the
mesh and each one is walked through the pixel grid.

Algorithm, per image:

1. Silhouette edges: mesh edges whose two faces have opposite screen-space orientation (one front,
   one back facing), plus boundary edges (one face). Needs welded vertices.
2. Each silhouette edge, projected to pixels (differentiably), is intersected with the lines through
   pixel centres, both the rows and the columns. A crossing falls between two neighbouring pixel
   centres ``P_in`` (the side its faces project to) and ``P_out``. Each of the two scans alone would
   carry the whole silhouette gradient, so they are weighted ``dy^2 / len^2`` (rows) and
   ``dx^2 / len^2`` (columns): the weights sum to one and vary smoothly with the edge direction, so
   nothing jumps when an edge turns through 45 degrees.
3. Visibility (no gradient): the crossing counts if ``P_in`` is covered and what ``P_out`` shows is
   farther than the edge (background, or a surface behind it). If several edges cross the same pair,
   the nearest wins.
4. Blend, a 1-D box filter across the pair: with ``a`` the distance in pixels from ``P_in``'s centre
   to the crossing, ``P_in`` covers ``min(1, a + 0.5)`` and ``P_out`` covers ``max(0, a - 0.5)``::

       P_in  += w_scan * relu(0.5 - a) * (c_out - c_in)
       P_out += w_scan * relu(a - 0.5) * (c_in - c_out)

   The image is continuous in the edge position, so ``d image / d vertices`` matches finite
   differences, and summed over a silhouette it equals the analytic rate of change of the covered
   area (edge length x normal speed).

The four steps are the functions :func:`silhouette_edges`, :func:`scan_crossings`,
:func:`nearest_per_pixel_pair` and :func:`blend`; :func:`antialias` chains them.

Works on any ``rast`` in the shared convention (torch or nvdiffrast backend): it needs only the
triangle ids and ``z/w`` of ``rast`` plus the clip-space ``pos``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EdgeTopology:
    """Undirected edges of a triangle mesh. ``edges [E, 2]`` (sorted vertex pairs), ``faces [E, 2]``
    (adjacent faces, ``-1`` for a boundary edge), ``opp [E]`` (third vertex of ``faces[:, 0]``)."""

    edges: torch.Tensor
    faces: torch.Tensor
    opp: torch.Tensor


@torch.no_grad()
def edge_topology(tri: torch.Tensor) -> EdgeTopology:
    """Edge/face adjacency of ``tri [F, 3]`` (compute once per mesh, reuse for every view)."""
    tri = tri.long()
    F = tri.shape[0]
    dev = tri.device
    if F == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return EdgeTopology(torch.zeros(0, 2, dtype=torch.long, device=dev), torch.zeros(0, 2, dtype=torch.long, device=dev), z)
    a = torch.cat([tri[:, 0], tri[:, 1], tri[:, 2]])
    b = torch.cat([tri[:, 1], tri[:, 2], tri[:, 0]])
    o = torch.cat([tri[:, 2], tri[:, 0], tri[:, 1]])
    fid = torch.arange(F, device=dev).repeat(3)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    nv = int(tri.max()) + 1
    key = lo * nv + hi
    key, order = torch.sort(key, stable=True)
    fid, o, lo, hi = fid[order], o[order], lo[order], hi[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    start = torch.nonzero(first).squeeze(1)
    cnt = torch.diff(torch.cat([start, torch.tensor([key.numel()], device=dev)]))
    f0 = fid[start]
    f1 = torch.where(cnt >= 2, fid[(start + 1).clamp_max(key.numel() - 1)], torch.full_like(f0, -1))
    return EdgeTopology(torch.stack([lo[start], hi[start]], 1), torch.stack([f0, f1], 1), o[start])


def _screen(pos: torch.Tensor, H: int, W: int):
    w = pos[..., 3]
    wsafe = torch.where(w.abs() > 1e-12, w, torch.ones_like(w))
    return (pos[..., 0] / wsafe + 1.0) * (0.5 * W), (pos[..., 1] / wsafe + 1.0) * (0.5 * H), pos[..., 2] / wsafe


@dataclass
class Crossings:
    """One row per crossing of a silhouette edge with a scan line (all ``[K]``).

    ``b`` image, ``e`` edge (index into the :class:`EdgeTopology`), ``vt`` True for a row scan (the
    line is a pixel row ``y = line + 0.5``), False for a column scan; ``s`` the edge parameter of the
    crossing (0 at ``edges[e, 0]``, 1 at ``edges[e, 1]``); ``cross`` its coordinate across the line
    in pixels (x for rows, y for columns), differentiable in the vertex positions.
    """

    b: torch.Tensor
    e: torch.Tensor
    vt: torch.Tensor
    line: torch.Tensor
    lc: torch.Tensor
    s: torch.Tensor
    cross: torch.Tensor


@dataclass
class PixelPairs:
    """The winning crossing of each pixel pair: ``win [M]`` indexes :class:`Crossings`; per crossing
    (``[K]``): ``pix_in``/``pix_out`` flat pixel indices into ``[B * H * W]``, ``in_is_lo`` (P_in is
    the pixel before the crossing), ``lo_c`` that pixel's index across the line."""

    win: torch.Tensor
    pix_in: torch.Tensor
    pix_out: torch.Tensor
    in_is_lo: torch.Tensor
    lo_c: torch.Tensor


@torch.no_grad()
def silhouette_edges(dx: torch.Tensor, dy: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
                     topo: EdgeTopology) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: ``(image index [S], edge index [S])`` of every silhouette edge of every image.

    ``dx, dy [B, V]``: screen positions in pixels (detached). An edge is on the silhouette when its
    two faces have opposite screen orientation, or it has one face; faces with a vertex at or
    behind the eye (``w <= 1e-12``) do not count.
    """
    t = tri
    area = (dx[:, t[:, 1]] - dx[:, t[:, 0]]) * (dy[:, t[:, 2]] - dy[:, t[:, 0]]) - \
           (dy[:, t[:, 1]] - dy[:, t[:, 0]]) * (dx[:, t[:, 2]] - dx[:, t[:, 0]])  # [B, F]
    front = area > 0
    valid_f = (pos.detach()[..., 3][:, t] > 1e-12).all(-1)
    f0, f1 = topo.faces[:, 0], topo.faces[:, 1]
    boundary = f1 < 0
    f1c = f1.clamp_min(0)
    sil = (boundary[None] | (front[:, f0] != front[:, f1c])) & valid_f[:, f0] & (boundary[None] | valid_f[:, f1c])
    return torch.nonzero(sil, as_tuple=True)


def scan_crossings(sx: torch.Tensor, sy: torch.Tensor, bi: torch.Tensor, ei: torch.Tensor, topo: EdgeTopology,
                   H: int, W: int) -> Crossings | None:
    """Step 2: every crossing of the silhouette edges ``(bi, ei)`` with the pixel rows AND columns.

    ``sx, sy [B, V]``: screen positions in pixels (with grad). The lines counted are those whose
    centre lies in ``[min, max)`` of the edge's extent along the scan. None when there is none.
    """
    with torch.no_grad():
        dx, dy = sx.detach(), sy.detach()
        # every silhouette edge is scanned against pixel rows (vt = True) AND columns (vt = False)
        bi, ei = torch.cat([bi, bi]), torch.cat([ei, ei])
        vert = torch.arange(bi.numel(), device=sx.device) < bi.numel() // 2
        va, vb = topo.edges[ei, 0], topo.edges[ei, 1]
        xa, ya, xb, yb = dx[bi, va], dy[bi, va], dx[bi, vb], dy[bi, vb]
        # along = the coordinate the scan lines are spaced in (y for rows, x for columns)
        la = torch.where(vert, ya, xa)
        lb = torch.where(vert, yb, xb)
        lmin, lmax = torch.minimum(la, lb), torch.maximum(la, lb)
        first = torch.ceil(lmin - 0.5).long()
        last = torch.ceil(lmax - 0.5).long() - 1  # lines with centre in [lmin, lmax)
        lim = torch.where(vert, torch.full_like(first, H), torch.full_like(first, W))
        first = first.clamp_min(0)
        last = torch.minimum(last, lim - 1)
        cnt = (last - first + 1).clamp_min(0)
        keep = torch.nonzero(cnt > 0).squeeze(1)
        if keep.numel() == 0:
            return None
        cnt = cnt[keep]
        rep = torch.repeat_interleave(torch.arange(keep.numel(), device=sx.device), cnt)
        owner = keep[rep]  # one row per (edge, scan line) crossing
        start = torch.cumsum(cnt, 0) - cnt
        line = first[owner] + (torch.arange(int(cnt.sum()), device=sx.device) - start[rep])
    # --- differentiable crossing positions
    b, e = bi[owner], ei[owner]
    a_, b_ = topo.edges[e, 0], topo.edges[e, 1]
    vt = vert[owner]
    pa_along = torch.where(vt, sy[b, a_], sx[b, a_])
    pb_along = torch.where(vt, sy[b, b_], sx[b, b_])
    pa_across = torch.where(vt, sx[b, a_], sy[b, a_])
    pb_across = torch.where(vt, sx[b, b_], sy[b, b_])
    lc = line.to(sx.dtype) + 0.5
    s = (lc - pa_along) / (pb_along - pa_along)
    cross = pa_across + s * (pb_across - pa_across)  # crossing coordinate across the scan line
    return Crossings(b=b, e=e, vt=vt, line=line, lc=lc, s=s, cross=cross)


@torch.no_grad()
def nearest_per_pixel_pair(c: Crossings, dx: torch.Tensor, dy: torch.Tensor, sz: torch.Tensor,
                           rast: torch.Tensor, topo: EdgeTopology, B: int, H: int, W: int) -> PixelPairs:
    """Step 3: the visible crossings, and of those the nearest one per pixel pair.

    A crossing is visible when ``P_in`` (the side its faces project to) is covered and ``P_out``
    shows background or a surface farther than the edge (``z/w`` of ``rast``). No gradient.
    """
    b, a_, b_, vt, line, lc = c.b, topo.edges[c.e, 0], topo.edges[c.e, 1], c.vt, c.line, c.lc
    zc = sz.detach()[b, a_] + c.s.detach() * (sz.detach()[b, b_] - sz.detach()[b, a_])
    cd = c.cross.detach()
    lo_pix = torch.floor(cd - 0.5).long()  # pixel whose centre is just before the crossing
    n_across = torch.where(vt, torch.full_like(lo_pix, W), torch.full_like(lo_pix, H))
    ok = (lo_pix >= 0) & (lo_pix + 1 < n_across)
    # which side do the edge's faces project to? (the third vertex of its first face)
    o_ = topo.opp[c.e]
    ex, ey = dx[b, b_] - dx[b, a_], dy[b, b_] - dy[b, a_]
    ox, oy = dx[b, o_] - dx[b, a_], dy[b, o_] - dy[b, a_]
    side_o = ex * oy - ey * ox
    # a point just before the crossing across the line, in screen coords
    px_lo = torch.where(vt, lo_pix.to(cd.dtype) + 0.5, lc)
    py_lo = torch.where(vt, lc, lo_pix.to(cd.dtype) + 0.5)
    side_lo = ex * (py_lo - dy[b, a_]) - ey * (px_lo - dx[b, a_])
    in_is_lo = (side_o * side_lo) > 0
    lo_c = lo_pix.clamp(0, 10 ** 9)
    hi_c = lo_c + 1

    def flat_index(across):
        row = torch.where(vt, line, across)
        col = torch.where(vt, across, line)
        return (b * H + row.clamp(0, H - 1)) * W + col.clamp(0, W - 1)

    pix_lo, pix_hi = flat_index(lo_c), flat_index(hi_c)
    pix_in = torch.where(in_is_lo, pix_lo, pix_hi)
    pix_out = torch.where(in_is_lo, pix_hi, pix_lo)
    rf = rast.detach().reshape(-1, 4)
    id_in, id_out = rf[pix_in, 3], rf[pix_out, 3]
    z_out = rf[pix_out, 2]
    ok &= (id_in > 0) & ((id_out == 0) | (z_out > zc))
    # nearest crossing per pixel pair
    idx = torch.nonzero(ok).squeeze(1)
    pair = pix_lo[idx] * 2 + vt[idx].long()
    d01 = ((zc[idx].float() + 1.0) * 0.5).clamp(0.0, 1.0)
    key = (d01.view(torch.int32).long() << 32) | torch.arange(idx.numel(), device=cd.device)
    best = torch.full((B * H * W * 2,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=cd.device)
    best.scatter_reduce_(0, pair, key, reduce="amin", include_self=True)
    win = idx[(best[pair] & 0xFFFFFFFF) == torch.arange(idx.numel(), device=cd.device)]
    return PixelPairs(win=win, pix_in=pix_in, pix_out=pix_out, in_is_lo=in_is_lo, lo_c=lo_c)


def blend(color: torch.Tensor, c: Crossings, p: PixelPairs, sx: torch.Tensor, sy: torch.Tensor,
          topo: EdgeTopology) -> torch.Tensor:
    """Step 4: the 1-D box filter across each winning pixel pair, weighted by the scan direction.

    ``color [B, H, W, C]``; returns the blended ``[B, H, W, C]`` (gradients to ``color`` and, through
    ``c.cross`` and the scan weight, to ``sx, sy``).
    """
    B, H, W, C = color.shape
    win = p.win
    lo_f = p.lo_c[win].to(c.cross.dtype) + 0.5
    a_in = torch.where(p.in_is_lo[win], c.cross[win] - lo_f, lo_f + 1.0 - c.cross[win])  # dist P_in -> crossing
    cf = color.reshape(-1, C)
    pin, pout = p.pix_in[win], p.pix_out[win]
    c_in, c_out = cf[pin], cf[pout]
    # scan weight: rows get dy^2 / len^2, columns dx^2 / len^2 (sum 1; continuous in orientation)
    ew, eb = c.e[win], c.b[win]
    ea, eb_ = topo.edges[ew, 0], topo.edges[ew, 1]
    ddx, ddy = sx[eb, eb_] - sx[eb, ea], sy[eb, eb_] - sy[eb, ea]
    l2 = ddx * ddx + ddy * ddy
    wscan = torch.where(c.vt[win], ddy * ddy, ddx * ddx) / torch.where(l2 > 0, l2, torch.ones_like(l2))
    w_in = (wscan * torch.relu(0.5 - a_in))[:, None]
    w_out = (wscan * torch.relu(a_in - 0.5))[:, None]
    out = cf.index_add(0, pin, (w_in * (c_out - c_in)).to(cf.dtype))
    out = out.index_add(0, pout, (w_out * (c_in - c_out)).to(cf.dtype))
    return out.reshape(B, H, W, C)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              topology: EdgeTopology | None = None) -> torch.Tensor:
    """Antialias silhouettes of ``color [B, H, W, C]`` (row 0 at the bottom, background already
    composited) given ``rast [B, H, W, 4]``, clip-space ``pos [B, V, 4]`` and ``tri [F, 3]``.

    Returns ``[B, H, W, C]``; gradients reach ``color`` and, through the edge crossings, ``pos``.
    """
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    B, H, W, C = color.shape
    if tri.shape[0] == 0:
        return color
    topo = topology if topology is not None else edge_topology(tri)
    tri = tri.long().to(pos.device)
    sx, sy, sz = _screen(pos, H, W)  # [B, V], with grad
    dx, dy = sx.detach(), sy.detach()
    bi, ei = silhouette_edges(dx, dy, pos, tri, topo)
    if bi.numel() == 0:
        return color
    crossings = scan_crossings(sx, sy, bi, ei, topo, H, W)
    if crossings is None:
        return color
    pairs = nearest_per_pixel_pair(crossings, dx, dy, sz, rast, topo, B, H, W)
    if pairs.win.numel() == 0:
        return color
    return blend(color, crossings, pairs, sx, sy, topo)
