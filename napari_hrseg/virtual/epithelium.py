"""Epithelial nuclei and goblet cells, laid out in each gland's own polar frame.

A crypt's epithelium is a ring of columnar cells: nuclei sit in a row near the basement membrane (several rows
when atypical), goblet cells' mucin fills the apical part between them.  Both are placed per gland: the ring is
cut into ``N`` angular sectors (one cell each, ``N`` from the ring's circumference and the cell pitch) and the
nuclear zone into ``rows`` bands; sector ``s`` and row ``k`` hold at most one nucleus, drawn from a hash of
``(seed, gland cell, s, k)`` and kept inside its sector and band.  Goblets sit between the nuclei (sectors shifted
by half), in the apical zone.  So:

- a pixel of epithelium looks up one nucleus and one goblet candidate (its own sector and row), at any level;
- nuclei of one gland never overlap, and a nucleus is the same object from every chunk and level;
- instance ids are ``1 + offset + cell * 512 + s * 4 + k``: unique on the slide.

Depths are the gland's ``t`` coordinate (0 at the lumen, 1 at the outline, see `layout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import HrsegError
from .hashing import Stream, hash_uniform
from .layout import GlandSample, GlandTable, TissueLayout
from .noise import AxisGrid

__all__ = ["RimParams", "RimOnGrid", "rim_on_grid", "rim_expectations", "rim_id_offset_check"]

_TWO_PI = 2.0 * math.pi
MARGIN_PX = 2.0
MAX_SECTORS = 127
MAX_ROWS = 3
_STREAM = Stream.NUCLEUS + 90


@dataclass(frozen=True)
class RimParams:
    """Epithelial cells (µm; darkness relative to the palette's nuclear reference)."""

    pitch_normal_um: float = 5.5  # width of a columnar cell along the ring
    pitch_tumour_um: float = 4.6  # crowded
    long_um: tuple[float, float] = (2.8, 3.6)  # nucleus semi-axis along the cell (radial)
    short_um: tuple[float, float] = (1.4, 1.9)
    darkness: tuple[float, float] = (0.70, 0.95)
    size_gain: float = 0.30  # times atypia
    darkness_gain: float = 0.15
    acceptance: float = 0.92
    tilt: float = 0.25  # radians of random tilt, plus 1.2 * atypia
    goblet_share: float = 0.9  # probability of a goblet in a slot, times (1 - atypia)^2
    goblet_fill_radial: float = 0.85  # goblet length / apical zone depth
    goblet_fill_tangential: float = 0.85  # goblet width / the three cells' width


RIM = RimParams()


def _u(layout: TissueLayout, k: int, cell: np.ndarray, slot: np.ndarray) -> np.ndarray:
    return hash_uniform(layout.seed, _STREAM + k, cell, slot).astype(np.float32)


@dataclass(frozen=True)
class _Rings:
    """Per-gland ring layout for gland indices ``g`` (aligned arrays)."""

    sectors: np.ndarray  # int64
    rows: np.ndarray  # int64
    phase: np.ndarray  # float32, angle of sector 0's start
    start: np.ndarray  # float32, nuclear zone [start, end] in depth
    end: np.ndarray


def _rings(layout: TissueLayout, table: GlandTable, g: np.ndarray) -> _Rings:
    atypia = table.atypia[g]
    q = table.lumen_ratio[g]
    start = layout.nuclear_zone_start(atypia)
    end = np.full_like(start, layout.params.nuclear_zone_end)
    r_mid = table.radius[g] * (q + 0.5 * (start + end) * (1.0 - q))
    pitch = layout.px(1.0) * np.where(table.tumour[g], RIM.pitch_tumour_um, RIM.pitch_normal_um)
    sectors = np.clip(np.round(_TWO_PI * r_mid / pitch), 8, MAX_SECTORS).astype(np.int64)
    rows = np.clip(1 + np.floor(3.0 * np.maximum(atypia - 0.4, 0.0) / 0.6), 1, MAX_ROWS).astype(np.int64)
    phase = (_TWO_PI * hash_uniform(layout.seed, _STREAM + 50, table.cell_id[g], 0)).astype(np.float32)
    return _Rings(sectors, rows, phase, start.astype(np.float32), end.astype(np.float32))


def rim_id_offset_check(layout: TissueLayout, offset: int) -> None:
    """Refuse slides whose epithelial ids would not fit in int32 (after ``offset`` ids of other nuclei)."""
    top = offset + layout.gland_grid_rows * layout.gland_grid_cols * 512
    if top > 2**31 - 1:
        raise HrsegError(
            f"a {layout.height} x {layout.width} px slide needs {top:,} nucleus ids, more than int32 holds",
            subject="virtual slide",
            hint="use a smaller size or a larger pixel size (mpp)",
        )


@dataclass
class RimOnGrid:
    """Epithelial nuclei and goblets on a pixel grid."""

    nucleus: np.ndarray  # float32 coverage
    darkness: np.ndarray  # float32, of the pixel's nucleus
    ids: np.ndarray  # int64, nucleus id at the pixel centre (0 = none)
    centre_d2: np.ndarray  # float32, squared distance (px²) to its nucleus's centre (inf where none)
    goblet: np.ndarray  # float32 coverage


def rim_on_grid(
    layout: TissueLayout, table: GlandTable, glands: GlandSample, gy: AxisGrid, gx: AxisGrid, ds: float, id_offset: int
) -> RimOnGrid:
    """Draw the epithelial nuclei and goblets of the pixels' owner glands (anti-aliased over ``ds`` level-0 px)."""
    shape = (gy.n, gx.n)
    out = RimOnGrid(
        np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.int64),
        np.full(shape, np.inf, np.float32), np.zeros(shape, np.float32),
    )
    owner = glands.owner
    inside = (owner >= 0) & (glands.s_out > -ds) & (glands.s_in < ds)
    pix = np.flatnonzero(inside)
    if pix.size == 0:
        return out
    g = owner.reshape(-1)[pix]
    py = gy.centres[pix // gx.n]
    px = gx.centres[pix % gx.n]
    depth = glands.depth.reshape(-1)[pix]
    rings = _rings(layout, table, g)
    dy = (py - table.centre_y[g]).astype(np.float32)
    dx = (px - table.centre_x[g]).astype(np.float32)
    theta = np.mod(np.arctan2(dy, dx) - rings.phase, _TWO_PI)
    width = (_TWO_PI / rings.sectors).astype(np.float32)
    cell = table.cell_id[g]
    atypia = table.atypia[g]

    # --- nuclei: the pixel's own sector and row
    band = (rings.end - rings.start) / rings.rows
    row = np.floor((depth - rings.start) / band).astype(np.int64)
    sector = np.floor(theta / width).astype(np.int64)
    ok = (row >= 0) & (row < rings.rows)
    row = np.clip(row, 0, MAX_ROWS - 1)
    slot = sector * 4 + row
    u = lambda k: _u(layout, k, cell, slot)
    theta_c = rings.phase + (sector + 0.5 + 0.3 * (u(1) - 0.5)) * width
    z_c = np.exp(1j * theta_c).astype(np.complex64)
    r_out, r_in = layout.radii_at(table, g, z_c)
    thick = np.maximum(r_out - r_in, 1.0)
    grow = 1.0 + RIM.size_gain * atypia
    a = layout.px(1.0) * (RIM.long_um[0] + (RIM.long_um[1] - RIM.long_um[0]) * u(2)) * grow
    a = np.minimum(a, 0.5 * band * thick - MARGIN_PX)
    t_c = rings.start + (row + 0.5) * band + (u(3) - 0.5) * np.maximum(band - 2.0 * (a + MARGIN_PX) / thick, 0.0)
    r_c = r_in + t_c * thick
    b = layout.px(1.0) * (RIM.short_um[0] + (RIM.short_um[1] - RIM.short_um[0]) * u(4)) * grow
    b = np.minimum(b, 0.5 * np.maximum(r_c - a, 1.0) * width - MARGIN_PX)
    a = np.maximum(a, 1.0)
    b = np.maximum(b, 0.8)
    tilt = (u(5) - 0.5) * 2.0 * (RIM.tilt + 1.2 * atypia)
    cy = table.centre_y[g] + r_c * z_c.imag
    cx = table.centre_x[g] + r_c * z_c.real
    ndy = (py - cy).astype(np.float32)
    ndx = (px - cx).astype(np.float32)
    co = np.cos(theta_c + tilt).astype(np.float32)
    si = np.sin(theta_c + tilt).astype(np.float32)
    uu = (ndx * co + ndy * si) / a  # along the cell (radial)
    vv = (ndy * co - ndx * si) / b
    rho = np.sqrt(uu * uu + vv * vv) + np.float32(1e-6)
    grad = np.sqrt((uu / a) ** 2 + (vv / b) ** 2) / rho + np.float32(1e-6)
    dist = (1.0 - rho) / grad
    on = ok & (u(0) < RIM.acceptance)
    cover = np.where(on, np.clip(0.5 + dist / np.float32(ds), 0.0, 1.0), 0.0)
    darkness = (RIM.darkness[0] + (RIM.darkness[1] - RIM.darkness[0]) * u(6)) * (1.0 + RIM.darkness_gain * atypia)
    hit = on & (rho < 1.0)
    ids = np.where(hit, 1 + id_offset + cell * 512 + slot, 0)
    out.centre_d2.reshape(-1)[pix] = np.where(hit, ndx * ndx + ndy * ndy, np.inf)
    out.nucleus.reshape(-1)[pix] = cover
    out.darkness.reshape(-1)[pix] = darkness
    out.ids.reshape(-1)[pix] = ids

    # --- goblets: plump mucin cups three cells wide, in the apical zone [0, start)
    gwidth = 3.0 * width
    gsector = np.floor(theta / gwidth + 0.5).astype(np.int64)
    gslot = 512 + gsector  # distinct from the nuclei's slots
    gu = lambda k: _u(layout, k, cell, gslot)
    share = RIM.goblet_share * (1.0 - atypia) ** 2
    theta_g = rings.phase + gsector * gwidth
    z_g = np.exp(1j * theta_g).astype(np.complex64)
    r_out_g, r_in_g = layout.radii_at(table, g, z_g)
    thick_g = np.maximum(r_out_g - r_in_g, 1.0)
    ag = 0.5 * RIM.goblet_fill_radial * rings.start * thick_g * (0.85 + 0.15 * gu(1))
    r_cg = r_in_g + 0.5 * rings.start * thick_g
    bg = 0.5 * RIM.goblet_fill_tangential * r_cg * gwidth * (0.8 + 0.2 * gu(2))
    gdy = (py - (table.centre_y[g] + r_cg * z_g.imag)).astype(np.float32)
    gdx = (px - (table.centre_x[g] + r_cg * z_g.real)).astype(np.float32)
    gco = z_g.real.astype(np.float32)
    gsi = z_g.imag.astype(np.float32)
    gu_ = (gdx * gco + gdy * gsi) / np.maximum(ag, 1.0)
    gv_ = (gdy * gco - gdx * gsi) / np.maximum(bg, 0.8)
    grho = np.sqrt(gu_ * gu_ + gv_ * gv_) + np.float32(1e-6)
    ggrad = np.sqrt((gu_ / np.maximum(ag, 1.0)) ** 2 + (gv_ / np.maximum(bg, 0.8)) ** 2) / grho + np.float32(1e-6)
    gcover = np.clip(0.5 + (1.0 - grho) / ggrad / np.float32(ds), 0.0, 1.0)
    out.goblet.reshape(-1)[pix] = np.where(gu(0) < share, gcover, 0.0)
    return out


def rim_expectations(
    layout: TissueLayout, table: GlandTable, g: np.ndarray, zone_area: np.ndarray, apical_area: np.ndarray
):
    """Expected nuclear share of the nuclear zone, goblet share of the apical zone, and mean nuclear darkness.

    For levels where the objects are below a pixel: the mean sizes, clipped to their sector and band as
    `rim_on_grid` clips them, on the gland's mean ring (harmonics ignored).  ``zone_area``, ``apical_area``: the
    glands' exact zone areas (px², from `render`'s quadrature).
    """
    rings = _rings(layout, table, g)
    atypia = table.atypia[g]
    q = table.lumen_ratio[g]
    thick = table.radius[g] * (1.0 - q)
    width = _TWO_PI / rings.sectors
    band = (rings.end - rings.start) / rings.rows
    grow = 1.0 + RIM.size_gain * atypia
    a = np.minimum(layout.px(0.5 * sum(RIM.long_um)) * grow, 0.5 * band * thick - MARGIN_PX)
    a = np.maximum(a, 1.0)
    t_mid = 0.5 * (rings.start + rings.end)
    r_c = table.radius[g] * (q + t_mid * (1.0 - q))
    b = np.minimum(layout.px(0.5 * sum(RIM.short_um)) * grow, 0.5 * np.maximum(r_c - a, 1.0) * width - MARGIN_PX)
    b = np.maximum(b, 0.8)
    nuclei = RIM.acceptance * rings.sectors * rings.rows * math.pi * a * b
    nuclear_share = np.clip(nuclei / np.maximum(zone_area, 1.0), 0.0, 0.9).astype(np.float32)
    # A goblet fills pi/4 of its box; the box is (0.925 on average) fill_radial of the apical depth by (0.9 on
    # average) fill_tangential of its three cells' width at mid-depth, which together tile the apical zone.
    box = RIM.goblet_fill_radial * 0.925 * RIM.goblet_fill_tangential * 0.9
    goblet_share = RIM.goblet_share * (1.0 - atypia) ** 2 * (math.pi / 4.0) * box
    darkness = (0.5 * sum(RIM.darkness) * (1.0 + RIM.darkness_gain * atypia)).astype(np.float32)
    del apical_area
    return nuclear_share, goblet_share.astype(np.float32), darkness
