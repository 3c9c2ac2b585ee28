"""Marching-cubes case tables, derived here from one rule (no table is copied from anywhere).

Cube conventions (shared with :mod:`.mc_torch`):

- corner ``c`` in 0..7 sits at offset ``(c >> 2 & 1, c >> 1 & 1, c & 1)`` (x, y, z) from the cube's
  lowest grid point; bit ``c`` of the 8-bit sign code is 1 when that corner is INSIDE (field < 0);
- the 12 edges are :data:`CUBE_EDGES` ``(axis, start offset)``: edges 0-3 run along x, 4-7 along y,
  8-11 along z, each from its start corner one step along its axis;
- the 6 faces are ``(axis a, side s)`` with index ``2 a + s``: the corners whose coordinate ``a`` is
  ``s``. A face's own 2-D coordinates ``(u, v)`` are the other two axes in increasing order; its
  corners in cyclic order are ``(u, v) = (0, 0), (1, 0), (1, 1), (0, 1)`` (:data:`FACE_CORNERS`).

The rule that makes a table entry (a "configuration" = 8 sign bits + 6 face bits):

1. On every face the crossing edges (2 or 4 of them) are paired into segments. With 2 crossings
   the pairing is forced. With 4 (an ambiguous face: the two diagonals have opposite signs) the face
   bit says whether the INSIDE diagonal is connected across the face (bit 1: the segments cut off the
   two outside corners) or not (bit 0: they cut off the two inside corners). The face bit depends
   only on the face's four values (the asymptotic decider, :func:`.mc_torch.face_bits`), so the two
   cubes that share a face make the same choice and the surface is closed across every face.
2. Every segment is oriented so that, looking at the face from outside the cube, the inside corners
   are on its right. Each crossing edge then starts exactly one segment and ends exactly one, so
   the segments chain into closed loops.
3. Every loop is triangulated without adding vertices, by the first triangulation (in a fixed
   search order, fans first) none of whose diagonals joins two cube edges of a common cube face.
   Such a diagonal could also be drawn by the neighbouring cube across that face (an edge of four
   triangles); interior diagonals belong to one cube only, so the surface stays a manifold. Rule 2
   winds the triangles counter-clockwise seen from outside the object (outward normals; checked by
   the tests through the signed volume).

Vertices are the crossing edges (the vertex set fixed by the signs), plus a cube-centre vertex in
the rare configurations whose loop has no such triangulation (see :func:`triangle_table`). Where a cube's loops could also be joined by a tunnel through its interior (the interior
ambiguity), this rule never joins them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# the 12 cube edges as (axis, offset of the start corner); marching_cubes.py imports this list
CUBE_EDGES: list = []
for _a in range(3):
    _o = [b for b in range(3) if b != _a]
    for _d1 in (0, 1):
        for _d2 in (0, 1):
            _off = [0, 0, 0]
            _off[_o[0]] = _d1
            _off[_o[1]] = _d2
            CUBE_EDGES.append((_a, tuple(_off)))


def corner_offset(c: int) -> tuple:
    """Offset ``(dx, dy, dz)`` of cube corner ``c``."""
    return (c >> 2 & 1, c >> 1 & 1, c & 1)


def corner_index(off) -> int:
    return (int(off[0]) << 2) | (int(off[1]) << 1) | int(off[2])


def _face_corners(a: int, s: int) -> list:
    u, v = [b for b in range(3) if b != a]
    out = []
    for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
        off = [0, 0, 0]
        off[a], off[u], off[v] = s, du, dv
        out.append(corner_index(off))
    return out


FACE_CORNERS = [_face_corners(a, s) for a in range(3) for s in (0, 1)]  # [6][4] corner ids, cyclic


def _edge_between(c0: int, c1: int) -> int:
    o0, o1 = np.array(corner_offset(c0)), np.array(corner_offset(c1))
    axis = int(np.nonzero(o0 != o1)[0][0])
    start = tuple(np.minimum(o0, o1))
    return CUBE_EDGES.index((axis, start))


def _edge_midpoint(e: int) -> np.ndarray:
    axis, start = CUBE_EDGES[e]
    p = np.array(start, dtype=np.float64)
    p[axis] += 0.5
    return p


def _face_segments(code: int, bit: int, f: int) -> list:
    """Oriented segments ``(edge_from, edge_to)`` of face ``f`` for sign code ``code``."""
    a, s = divmod(f, 2)
    normal = np.zeros(3)
    normal[a] = 1.0 if s else -1.0
    q = FACE_CORNERS[f]
    ins = [bool(code >> c & 1) for c in q]
    edges = [_edge_between(q[k], q[(k + 1) % 4]) for k in range(4)]  # edge k joins q[k], q[k+1]
    crossing = [k for k in range(4) if ins[k] != ins[(k + 1) % 4]]
    pairs = []  # (edge, edge, corner cut off by the segment or None, cut-off corner is inside)
    if len(crossing) == 2:
        k0, k1 = crossing
        inside = [corner_offset(q[k]) for k in range(4) if ins[k]]
        pairs.append((edges[k0], edges[k1], np.mean(np.array(inside, dtype=np.float64), 0), True))
    elif len(crossing) == 4:
        # bit 1: inside diagonal connected -> cut off the outside corners; bit 0: the inside ones
        cut = [k for k in range(4) if ins[k] != bool(bit)]
        for k in cut:
            pairs.append((edges[(k - 1) % 4], edges[k], np.array(corner_offset(q[k]), np.float64), ins[k]))
    out = []
    for e0, e1, ref, ref_inside in pairs:
        p0, p1 = _edge_midpoint(e0), _edge_midpoint(e1)
        right = np.cross(p1 - p0, normal)  # right of the direction, looking at the face from outside
        side = float(np.dot(ref - p0, right))
        if (side > 0) != ref_inside:
            e0, e1 = e1, e0
        out.append((e0, e1))
    return out


def configuration_loops(code: int, fbits: int) -> list:
    """The closed vertex loops (lists of cube edge ids) of one configuration."""
    nxt = {}
    for f in range(6):
        for e0, e1 in _face_segments(code, fbits >> f & 1, f):
            if e0 in nxt:
                raise AssertionError(f"edge {e0} starts two segments (code {code}, bits {fbits})")
            nxt[e0] = e1
    if sorted(nxt) != sorted(nxt.values()):
        raise AssertionError(f"open chain in code {code}, bits {fbits}")
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, e = [], start
        while e not in seen:
            seen.add(e)
            loop.append(e)
            e = nxt[e]
        loops.append(loop)
    return loops


def _edge_faces(e: int) -> set:
    axis, start = CUBE_EDGES[e]
    return {2 * b + start[b] for b in range(3) if b != axis}


def _diagonal_ok(e0: int, e1: int, relaxed: bool) -> bool:
    """A diagonal is private to its cube unless its two edges lie on a common cube face; with
    ``relaxed`` a diagonal on the cube's HIGH face (side 1) is allowed too: the neighbour across it
    sees that face as its low face, where it never draws one, so no edge gets four triangles."""
    common = _edge_faces(e0) & _edge_faces(e1)
    return not common or (relaxed and all(f % 2 == 1 for f in common))


def triangulate_loop(loop: list):
    """Triangles ``[(a, b, c)]`` of a closed loop of cube edges (orientation kept), or None.
    Tries private diagonals only, then (for the few loops that need it) high-face ones."""
    got = _triangulate(loop, False)
    return got if got is not None else _triangulate(loop, True)


def _triangulate(loop: list, relaxed: bool):
    ok = lambda a, b: _diagonal_ok(a, b, relaxed)  # noqa: E731
    k = len(loop)
    if k == 3:
        return [tuple(loop)]
    for start in range(k):  # fans first: cheap and usually valid
        p = loop[start:] + loop[:start]
        if all(ok(p[0], p[i]) for i in range(2, k - 1)):
            return [(p[0], p[i], p[i + 1]) for i in range(1, k - 1)]
    # general search: the triangle on side (p0, p1) with apex pm, then both sub-polygons
    for m in range(2, k):
        if (m != k - 1 and not ok(loop[m], loop[0])) or (m != 2 and not ok(loop[1], loop[m])):
            continue
        left = _triangulate(loop[1:m + 1], relaxed) if m > 2 else []
        right = _triangulate(loop[m:] + loop[:1], relaxed) if m < k - 1 else []
        if left is not None and right is not None:
            return [(loop[0], loop[1], loop[m])] + left + right
    return None


CENTER = 12  # local vertex id of a cube's centre vertex in the table


@lru_cache(maxsize=1)
def triangle_table() -> tuple:
    """``(tris [16384, T, 3] int64, centre [16384] int64)``, indexed by ``code + 256 * face_bits``.

    ``tris[cfg]`` are the configuration's triangles as local vertex ids, padded with -1 rows: 0-11
    are the cube's edge vertices, :data:`CENTER` its centre vertex (the mean of the edge vertices in
    the 12-bit mask ``centre[cfg]``; 0 = no centre vertex). A centre vertex is used only for a loop
    that no triangulation by rule 3 covers (a few 9- and 12-edge loops): it is fanned around the
    loop, so every new edge is private to the cube. Face bits of non-ambiguous faces are ignored
    (those entries repeat)."""
    rows = [None] * (256 * 64)
    masks = np.zeros(256 * 64, dtype=np.int64)
    for code in range(256):
        amb = [f for f in range(6) if len({code >> c & 1 for c in FACE_CORNERS[f][::2]}) == 1
               and (code >> FACE_CORNERS[f][0] & 1) != (code >> FACE_CORNERS[f][1] & 1)]
        for sub in range(1 << len(amb)):
            fbits = sum(1 << f for i, f in enumerate(amb) if sub >> i & 1)
            tris, mask = [], 0
            for loop in configuration_loops(code, fbits):
                got = triangulate_loop(loop)
                if got is None:
                    if mask:
                        raise AssertionError(f"two loops need a centre vertex (code {code}, bits {fbits})")
                    mask = sum(1 << e for e in loop)
                    got = [(CENTER, loop[i], loop[(i + 1) % len(loop)]) for i in range(len(loop))]
                tris += got
            # every setting of the other (non-ambiguous) faces' bits gives the same entry
            for other in range(64):
                if all(not (other >> f & 1) for f in amb):
                    rows[code + 256 * (fbits | other)] = tris
                    masks[code + 256 * (fbits | other)] = mask
    t = max(len(r) for r in rows)
    table = np.full((len(rows), t, 3), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            table[i, : len(r)] = r
    return table, masks
