"""Stromal nuclei: one candidate per cell of a staggered grid, accepted or not by the tissue it falls in.

Each `NucleusLayer` (lymphocytes, fibroblast-like) has its own grid of square cells whose odd rows are shifted
by half a cell (a brick pattern, so the nuclei do not line up in columns).  A cell draws one candidate ellipse
from `hashing` and keeps it entirely inside the cell (a margin of ``MARGIN_PX`` level-0 pixels included), so:

- a pixel can only be covered by the candidate of its own cell: rendering and labelling cost one candidate per
  pixel and layer, at any level;
- nuclei of one layer never overlap, and a lymphocyte candidate that would touch a fibroblast-like candidate
  (accepted or not: its shape alone is known everywhere) is dropped, so no two stromal nuclei overlap; nor do
  they reach into the glands, whose nuclei are laid out separately (`epithelium`).

Whether a candidate exists depends on where its centre falls: in stroma (outside every gland, inside the tissue),
with probabilities set by the slide's fields (`TissueLayout.lymph_probability`, ...).  Smooth fields are evaluated
at the cell centres, the gland geometry exactly at the candidate centre.  Epithelial nuclei are laid out per
gland instead (`epithelium`).

Instance ids are ``1 + offset(layer) + row * n_cols(layer) + col``: unique over the slide, the same from every
chunk and level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import HrsegError
from .hashing import Stream, hash_uniform
from .layout import GlandTable, TissueLayout
from .noise import AxisGrid
from .params import NUCLEUS_LAYERS, NucleusLayer

__all__ = ["NucleusGrid", "Candidates", "nucleus_grids", "NucleiOnGrid", "render_nuclei", "label_nuclei"]

#: Nuclei keep this far (level-0 px) from their cell's edges, so their anti-aliased rim stays inside the cell at
#: every level where they are drawn explicitly (downsample <= 2 * MARGIN_PX).
MARGIN_PX = 2.0
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class NucleusGrid:
    """The staggered cell grid of one nucleus layer over a slide.

    Attributes
    ----------
    layer : NucleusLayer
    cell : float
        Cell size in level-0 pixels.
    n_cols : int
        Columns reserved per row for ids (covers the slide width plus the stagger).
    id_offset : int
        Ids of this layer start at ``id_offset + 1``.
    """

    layer: NucleusLayer
    cell: float
    n_rows: int
    n_cols: int
    id_offset: int

    def rows(self, y: np.ndarray) -> np.ndarray:
        return np.floor(y / self.cell).astype(np.int64)

    def shift(self, cy: np.ndarray) -> np.ndarray:
        """x offset of row ``cy`` (level-0 px): half a cell on odd rows."""
        return (cy & 1).astype(np.float64) * (self.cell / 2.0)

    def cols(self, cy: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.floor((x - self.shift(cy)) / self.cell).astype(np.int64)

    def ids(self, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
        return (1 + self.id_offset + cy * self.n_cols + (cx + 1)).astype(np.int64)


def nucleus_grids(layout: TissueLayout) -> tuple[NucleusGrid, ...]:
    """The grids of all layers, with disjoint id ranges; refuses slides whose ids would not fit in int32."""
    grids = []
    offset = 0
    for layer in NUCLEUS_LAYERS:
        cell = layout.px(layer.cell_um)
        n_rows = int(math.ceil(layout.height / cell)) + 1
        n_cols = int(math.ceil(layout.width / cell)) + 2
        grids.append(NucleusGrid(layer, cell, n_rows, n_cols, offset))
        offset += n_rows * n_cols
    if offset > _INT32_MAX:
        raise HrsegError(
            f"a {layout.height} x {layout.width} px slide at {layout.mpp} µm/px has {offset:,} nucleus slots, "
            "more than "
            "int32 instance ids can number",
            subject="virtual slide",
            hint="use a smaller size or a larger pixel size (mpp)",
        )
    return tuple(grids)


@dataclass
class Candidates:
    """Candidate nuclei (flat arrays, one per cell); geometry in level-0 pixels."""

    y: np.ndarray
    x: np.ndarray
    a: np.ndarray  # semi-axis along the orientation (float32)
    b: np.ndarray  # the other semi-axis
    cos: np.ndarray
    sin: np.ndarray
    darkness: np.ndarray
    accepted: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class CellFields:
    """Smooth fields at the candidates' cells (flat arrays aligned with the candidates)."""

    tissue: np.ndarray
    tumour: np.ndarray
    mucosa: np.ndarray
    aggregate: np.ndarray


def _draw(layout: TissueLayout, grid: NucleusGrid, cy: np.ndarray, cx: np.ndarray, k: int) -> np.ndarray:
    return hash_uniform(layout.seed, Stream.NUCLEUS + 100 * grid.layer.index + k, cy, cx).astype(np.float32)


def _lerp(lohi: tuple[float, float], u: np.ndarray) -> np.ndarray:
    return np.float32(lohi[0]) + np.float32(lohi[1] - lohi[0]) * u


@dataclass
class _Shapes:
    y: np.ndarray
    x: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    bound: np.ndarray


def _positions(layout: TissueLayout, grid: NucleusGrid, cy: np.ndarray, cx: np.ndarray):
    """Centre ``(y, x)``, long semi-axis ``a`` and bounding radius of the candidates of cells ``(cy, cx)``."""
    layer = grid.layer
    s = grid.cell
    a = layout.px(1.0) * _lerp(layer.long_um, _draw(layout, grid, cy, cx, 1))
    bound = a + np.float32(MARGIN_PX)
    room = np.maximum(np.float32(s) - 2.0 * bound, 0.0)
    y = cy * s + bound + room * _draw(layout, grid, cy, cx, 3)
    x = cx * s + grid.shift(cy) + bound + room * _draw(layout, grid, cy, cx, 4)
    return y, x, a, bound


def _shapes(layout: TissueLayout, grid: NucleusGrid, cy: np.ndarray, cx: np.ndarray) -> _Shapes:
    """Position, semi-axes and orientation of the candidates of cells ``(cy, cx)``: a function of the cell alone."""
    layer = grid.layer
    s = grid.cell
    y, x, a, bound = _positions(layout, grid, cy, cx)
    b = layout.px(1.0) * _lerp(layer.short_um, _draw(layout, grid, cy, cx, 2))
    turn = _draw(layout, grid, cy, cx, 5) - np.float32(0.5)
    if layer.kind == "stromal":  # along the collagen: the orientation field at the cell centre, give or take
        centre_y = (cy + 0.5) * s
        centre_x = (cx + 0.5) * s + grid.shift(cy)
        theta = np.where(layout.orientation_at(centre_y, centre_x) > 0, 0.0, 0.5 * math.pi) + 0.7 * turn
    else:
        theta = np.float32(2.0 * math.pi) * turn
    return _Shapes(y, x, a, b, theta.astype(np.float32), bound)


def _touches(
    layout: TissueLayout, blocker: NucleusGrid, y: np.ndarray, x: np.ndarray, radius: np.ndarray
) -> np.ndarray:
    """Whether discs ``(y, x, radius)`` touch any candidate ellipse of ``blocker`` (accepted or not)."""
    hit = np.zeros(y.shape, dtype=bool)
    for dy in (-1, 0, 1):
        cy = blocker.rows(y) + dy
        for dx in (-1, 0, 1):
            cx = blocker.cols(cy, x) + dx
            by, bx, ba, _ = _positions(layout, blocker, cy, cx)
            r = radius + np.float32(1.0)  # one pixel of clearance
            near = (np.abs(by - y) < ba + r) & (np.abs(bx - x) < ba + r) & ~hit
            idx = np.flatnonzero(near)
            if idx.size == 0:
                continue
            sh = _shapes(layout, blocker, cy[idx], cx[idx])
            ddy = (y[idx] - sh.y).astype(np.float32)
            ddx = (x[idx] - sh.x).astype(np.float32)
            co, si = np.cos(sh.theta), np.sin(sh.theta)
            # the disc touches the ellipse if its centre is inside the ellipse grown by the disc's radius (a
            # slightly generous test: the grown ellipse contains the true parallel curve)
            u = (ddx * co + ddy * si) / (sh.a + r[idx])
            v = (ddy * co - ddx * si) / (sh.b + r[idx])
            hit[idx] |= u * u + v * v < 1.0
    return hit


def draw_candidates(
    layout: TissueLayout,
    grid: NucleusGrid,
    table: GlandTable,
    cy: np.ndarray,
    cx: np.ndarray,
    fields: CellFields,
    blocker: NucleusGrid | None = None,
) -> Candidates:
    """Draw and accept the candidates of cells ``(cy, cx)`` (flat int arrays).

    Acceptance is staged from cheap to dear: the random draw against the fields' probability, then the blocker
    layer's shapes (lymphocytes give way to fibroblast-like nuclei), then the gland geometry at the centre (a
    stromal nucleus keeps clear of every gland by half its size again).
    """
    layer = grid.layer
    sh = _shapes(layout, grid, cy, cx)
    u_accept = _draw(layout, grid, cy, cx, 0)
    darkness = _lerp(layer.darkness, _draw(layout, grid, cy, cx, 6))
    if layer.kind == "lymphocyte":
        p = layout.lymph_probability(fields.tumour, fields.mucosa, fields.aggregate)
        p = p * np.float32(layer.acceptance_scale)
    else:
        p = layout.stromal_probability(fields.tumour, fields.aggregate) * np.float32(layer.acceptance_scale)
    accepted = (fields.tissue > 0) & (u_accept < p)
    if blocker is not None:
        todo = np.flatnonzero(accepted)
        accepted[todo] = ~_touches(layout, blocker, sh.y[todo], sh.x[todo], sh.a[todo])
    todo = np.flatnonzero(accepted)
    if todo.size:
        accepted[todo] = layout.glands_at_points(table, sh.y[todo], sh.x[todo]).s_out <= -1.5 * sh.bound[todo]
    return Candidates(
        y=sh.y, x=sh.x, a=sh.a.astype(np.float32), b=sh.b.astype(np.float32),
        cos=np.cos(sh.theta).astype(np.float32), sin=np.sin(sh.theta).astype(np.float32),
        darkness=darkness.astype(np.float32), accepted=accepted, ids=grid.ids(cy, cx),
    )


def _fields_on_cells(layout: TissueLayout, grid: NucleusGrid, cy0: int, ny: int, cx0: int, nx: int) -> CellFields:
    """Smooth fields on a block of cells, sampled on the unstaggered cell grid shifted by a quarter cell
    (the mean stagger); the fields vary over tens of cells, so the quarter-cell error is immaterial."""
    s = grid.cell
    gy = AxisGrid(cy0 * s, s, ny)
    gx = AxisGrid(cx0 * s + s / 4.0, s, nx)
    flat = lambda fs: fs.mean.reshape(-1)
    return CellFields(
        tissue=flat(layout.tissue(gy, gx, box=False)),
        tumour=flat(layout.tumour(gy, gx, box=False)),
        mucosa=flat(layout.mucosa(gy, gx, box=False)),
        aggregate=flat(layout.aggregates(gy, gx, box=False)),
    )


@dataclass
class NucleiOnGrid:
    """One layer's nuclei on a pixel grid: anti-aliased coverage, darkness, and the id at each pixel centre."""

    coverage: np.ndarray  # float32 (ny, nx)
    darkness: np.ndarray  # float32 (ny, nx), of the pixel's candidate
    ids: np.ndarray  # int64 (ny, nx), 0 where the centre is in no nucleus
    centre_d2: np.ndarray  # float32 (ny, nx), squared distance (px²) to its nucleus's centre (inf where none)


def _ellipse(c: Candidates, cell: np.ndarray, py: np.ndarray, px: np.ndarray):
    """Normalised radius ``rho`` (< 1 inside), an estimate of the signed distance to the outline (px), and the
    squared distance to the centre (px²)."""
    dy = (py - c.y[cell]).astype(np.float32)
    dx = (px - c.x[cell]).astype(np.float32)
    co, si = c.cos[cell], c.sin[cell]
    a, b = c.a[cell], c.b[cell]
    u = (dx * co + dy * si) / a
    v = (dy * co - dx * si) / b
    rho = np.sqrt(u * u + v * v) + np.float32(1e-6)
    # |grad rho| = sqrt((u/a)^2 + (v/b)^2) / rho; distance ~ (1 - rho) / |grad rho|
    grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) / rho + np.float32(1e-6)
    return rho, (np.float32(1.0) - rho) / grad, dx * dx + dy * dy


def render_nuclei(
    layout: TissueLayout, grid: NucleusGrid, table: GlandTable, gy: AxisGrid, gx: AxisGrid, ds: float,
    blocker: NucleusGrid | None = None,
) -> NucleiOnGrid:
    """Draw one layer explicitly on a pixel grid (levels whose downsample is at most ``2 * MARGIN_PX``).

    All candidates of the cells under the grid are drawn; each pixel looks up its own cell's candidate.
    """
    s = grid.cell
    yc, xc = gy.centres, gx.centres
    cy_pix = grid.rows(yc)  # (ny,)
    cy0, cy1 = int(cy_pix[0]), int(cy_pix[-1]) + 1
    cx0 = int(math.floor((xc[0] - s / 2.0) / s))
    cx1 = int(math.floor(xc[-1] / s)) + 1
    ny, nx = cy1 - cy0, cx1 - cx0
    cy = np.repeat(np.arange(cy0, cy1), nx)
    cx = np.tile(np.arange(cx0, cx1), ny)
    cand = draw_candidates(layout, grid, table, cy, cx, _fields_on_cells(layout, grid, cy0, ny, cx0, nx), blocker)
    cx_pix = grid.cols(cy_pix[:, None], xc[None, :])  # (ny_px, nx_px)
    cell = (cy_pix[:, None] - cy0) * nx + (cx_pix - cx0)
    rho, dist, d2 = _ellipse(cand, cell, yc[:, None], xc[None, :])
    on = cand.accepted[cell]
    coverage = np.where(on, np.clip(np.float32(0.5) + dist / np.float32(ds), 0.0, 1.0), 0.0).astype(np.float32)
    inside = on & (rho < 1.0)
    ids = np.where(inside, cand.ids[cell], 0)
    return NucleiOnGrid(coverage, cand.darkness[cell], ids, np.where(inside, d2, np.inf).astype(np.float32))


def label_nuclei(
    layout: TissueLayout,
    grid: NucleusGrid,
    table: GlandTable,
    gy: AxisGrid,
    gx: AxisGrid,
    pixel_fields: CellFields,
    pixel_s_out: np.ndarray,
    blocker: NucleusGrid | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids at the pixel centres of a grid, for any level (int64 ``(ny, nx)``, 0 = none), and the squared
    distance (px²) of each centre to its nucleus's centre (float32, inf where none).

    Only the pixel's own cell can hold a nucleus containing its centre.  Candidates are drawn per pixel; the
    largest shape a candidate can take is tested first, and only the survivors are placed in their glands.
    ``pixel_fields`` (flat, one value per pixel) stand in for the fields at the candidates' cell centres, which
    lie within a cell of the pixel centre.  ``pixel_s_out`` (the gland outline distance at the pixel centres, px)
    rules out pixels deep inside glands before any candidate is drawn.
    """
    yc, xc = gy.centres, gx.centres
    cy = np.broadcast_to(grid.rows(yc)[:, None], (gy.n, gx.n)).reshape(-1)
    py = np.broadcast_to(yc[:, None], (gy.n, gx.n)).reshape(-1)
    px = np.broadcast_to(xc[None, :], (gy.n, gx.n)).reshape(-1)
    layer = grid.layer
    s = grid.cell
    reach = np.float32(2.0 * s)  # a nucleus centre lies within a cell of the pixel centre
    s_out = pixel_s_out.reshape(-1)
    maybe = (pixel_fields.tissue > -0.2) & (s_out < reach)
    pre = np.flatnonzero(maybe)
    cy, py, px = cy[pre], py[pre], px[pre]
    cx = grid.cols(cy, px)
    y, x, _, bound = _positions(layout, grid, cy, cx)
    dy, dx = py - y, px - x
    near = dy * dy + dx * dx < bound * bound
    out = np.zeros(gy.n * gx.n, dtype=np.int64)
    out_rho = np.full(gy.n * gx.n, np.inf, dtype=np.float32)
    idx = np.flatnonzero(near)
    if idx.size:
        sub = CellFields(*(getattr(pixel_fields, f)[pre[idx]] for f in CellFields.__dataclass_fields__))
        cand = draw_candidates(layout, grid, table, cy[idx], cx[idx], sub, blocker)
        rho, _, d2 = _ellipse(cand, np.arange(idx.size), py[idx], px[idx])
        hit = cand.accepted & (rho < 1.0)
        out[pre[idx[hit]]] = cand.ids[hit]
        out_rho[pre[idx[hit]]] = d2[hit]
    return out.reshape(gy.n, gx.n), out_rho.reshape(gy.n, gx.n)
