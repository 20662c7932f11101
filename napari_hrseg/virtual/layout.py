"""Where things are: tissue extent, the tumour focus, mucosa, and the glands, as pure functions of position.

`TissueLayout` is the slide's plan.  It holds only parameters (a few numbers derived from the seed); every
question "what is at this position?" is answered by evaluating band-limited fields (`noise`) or by drawing the
objects of the nearby spatial cells from `hashing`.  Nothing proportional to the slide is ever stored.

Glands
------
The plane is cut into square cells of ``GlandParams.cell_um``.  Each cell holds at most one gland, whose centre
lies inside the cell and whose outline (a circle deformed by harmonics ``k = 2..5``) never reaches further than
1.25 cells from its centre, so a position is covered only by glands of its own cell and the 8 around it.
The outline in polar coordinates about the centre is ``r_out(θ) = R (1 + Re Σ c_k e^{ikθ})``; the lumen is
``r_in(θ) = q r_out(θ) (1 + Re Σ d_k e^{ikθ})``.  The signed distances ``s = r_out - r`` and ``r_in - r`` (level-0
pixels, positive inside) are maximised over overlapping glands, which fuses crowded tumour glands into one
structure with several lumina.  A gland's depth coordinate ``t = (r - r_in) / (r_out - r_in)`` (0 at the lumen,
1 at the basement membrane) places its nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .hashing import Stream, hash_uniform
from .noise import AxisGrid, FieldSample, Octaves, octaves, sample_field
from .params import TissueParams

__all__ = ["TissueLayout", "GlandTable", "GlandSample"]

_TWO_PI = 2.0 * math.pi
_N_OUTER = 4  # harmonics k = 2..5 of the outline
_N_LUMEN = 3  # harmonics k = 2..4 of the lumen
# How far a gland may reach from its centre, in cells (checked by the table builder's bound).
MAX_REACH_CELLS = 1.2


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class GlandTable:
    """The glands of a rectangle of cells ``[cy0, cy0+ny) x [cx0, cx0+nx)``, as flat arrays (one entry per cell).

    Attributes
    ----------
    present : bool ``(n,)``
    centre_y, centre_x : float64 ``(n,)``, level-0 pixels
    radius : float32 ``(n,)``, base radius ``R`` (px)
    reach : float32 ``(n,)``, an upper bound of the outline's distance from the centre (px)
    outer, lumen : complex64 ``(n, 4)`` and ``(n, 3)``, harmonic coefficients
    lumen_ratio : float32 ``(n,)``
    tumour : bool ``(n,)``
    atypia : float32 ``(n,)`` in ``[0, 1]``
    cell_id : int64 ``(n,)``, the cell's number on the slide (stable; seeds the gland's rim objects)
    """

    cy0: int
    cx0: int
    ny: int
    nx: int
    present: np.ndarray
    centre_y: np.ndarray
    centre_x: np.ndarray
    radius: np.ndarray
    reach: np.ndarray
    outer: np.ndarray
    lumen: np.ndarray
    lumen_ratio: np.ndarray
    tumour: np.ndarray
    atypia: np.ndarray
    cell_id: np.ndarray

    def flat_index(self, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
        return (cy - self.cy0) * self.nx + (cx - self.cx0)


@dataclass
class GlandSample:
    """Glands evaluated at a set of positions (a grid or a list of points); all arrays share one shape.

    Attributes
    ----------
    s_out : float32, signed distance to the union of gland outlines (px, > 0 inside a gland; -inf far away)
    s_in : float32, signed distance to the union of lumina (px, > 0 inside a lumen)
    owner : int64, flat table index of the gland with the largest ``s_out`` (-1 where none is near)
    depth : float32, the owner's depth coordinate ``t`` (0 at the lumen, 1 at the outline)
    """

    s_out: np.ndarray
    s_in: np.ndarray
    owner: np.ndarray
    depth: np.ndarray


def _shape(dy, dx, radius, outer, lumen, lumen_ratio):
    """Outline and lumen radii of glands at offsets ``(dy, dx)`` from their centres (all broadcastable, float32).

    Returns ``(r, r_out, r_in)``.
    """
    r = np.sqrt(dy * dy + dx * dx) + np.float32(1e-3)
    z = (dx + 1j * dy) / r  # e^{iθ}, complex64
    z2 = z * z
    z3 = z2 * z
    z4 = z2 * z2
    h_out = (outer[..., 0] * z2 + outer[..., 1] * z3 + outer[..., 2] * z4 + outer[..., 3] * (z4 * z)).real
    h_in = (lumen[..., 0] * z2 + lumen[..., 1] * z3 + lumen[..., 2] * z4).real
    r_out = radius * (1.0 + h_out)
    r_in = r_out * lumen_ratio * (1.0 + h_in)
    return r, r_out.astype(np.float32), r_in.astype(np.float32)


@dataclass(frozen=True)
class TissueLayout:
    """The plan of one virtual slide: everything is a function of ``seed`` and position.

    Parameters
    ----------
    seed : int
    height, width : int
        Level-0 size in pixels.
    mpp : float
        Level-0 pixel size in µm.
    params : TissueParams
    """

    seed: int
    height: int
    width: int
    mpp: float
    params: TissueParams = field(default_factory=TissueParams)

    # ------------------------------------------------------------------ scale
    def px(self, um: float) -> float:
        """Micrometres to level-0 pixels."""
        return um / self.mpp

    @property
    def size(self) -> float:
        return float(max(self.height, self.width))

    @property
    def gland_cell(self) -> float:
        """Gland cell size in level-0 pixels."""
        return self.px(self.params.gland.cell_um)

    def _draw(self, stream: int, k: int = 0) -> float:
        return float(hash_uniform(self.seed, Stream.SLIDE + stream, k, 0))

    # ------------------------------------------------------------------ slide-scale placement
    @property
    def tissue_centre(self) -> tuple[float, float]:
        return (self.height * (0.5 + 0.06 * (self._draw(0) - 0.5)), self.width * (0.5 + 0.06 * (self._draw(1) - 0.5)))

    @property
    def tissue_radii(self) -> tuple[float, float]:
        r = self.params.tissue_radius
        return (self.height * r * (0.9 + 0.2 * self._draw(2)), self.width * r * (0.9 + 0.2 * self._draw(3)))

    @property
    def tumour_radius(self) -> float:
        lo, hi = self.params.tumour_radius_um
        return self.px(min(max(self.params.tumour_radius * self.size * self.mpp, lo), hi))

    @property
    def tumour_centre(self) -> tuple[float, float]:
        cy, cx = self.tissue_centre
        ry, rx = self.tissue_radii
        angle = _TWO_PI * self._draw(4)
        dist = 0.45 * self._draw(5) ** 0.5
        return (cy + ry * dist * math.sin(angle), cx + rx * dist * math.cos(angle))

    # ------------------------------------------------------------------ fields (octaves in level-0 px)
    @property
    def tissue_noise(self) -> Octaves:
        p = self.params
        return octaves(self.size / 3.0, self.px(p.tissue_smallest_um), gain=p.tissue_noise_gain, first=0.55)

    @property
    def tumour_noise(self) -> Octaves:
        r = self.tumour_radius
        return octaves(r / 1.5, r / 24.0, gain=0.6, first=0.45)

    @property
    def mucosa_noise(self) -> Octaves:
        return octaves(self.px(3000.0), self.px(400.0), gain=0.6, first=0.6)

    @property
    def aggregate_noise(self) -> Octaves:
        return octaves(self.px(250.0), self.px(30.0), gain=0.5, first=0.6)

    _ORIENTATION_WAVES = 6

    def _orientation_waves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wave vectors ``(ky, kx)`` (rad per level-0 px) and phases of the orientation field's plane waves."""
        k = np.arange(self._ORIENTATION_WAVES)
        u = lambda j: hash_uniform(self.seed, Stream.ORIENT, k, j)
        wavelength = self.px(250.0 + 350.0 * u(0))
        direction = np.pi * u(1)
        return (_TWO_PI / wavelength * np.sin(direction), _TWO_PI / wavelength * np.cos(direction), _TWO_PI * u(2))

    @property
    def roughness_noise(self) -> Octaves:
        g = self.params.gland
        return octaves(self.px(12.0), self.px(3.0), gain=0.6, first=1.0).scaled(amplitude=self.px(g.roughness_um) / 1.2)

    def _ellipse_terms(self, gy: AxisGrid, gx: AxisGrid, centre, radii):
        yy = ((gy.centres - centre[0]) / radii[0]) ** 2
        xx = ((gx.centres - centre[1]) / radii[1]) ** 2
        return yy.astype(np.float32)[:, None], xx.astype(np.float32)[None, :]

    def tissue(self, gy: AxisGrid, gx: AxisGrid, box: bool = True) -> FieldSample:
        """Tissue indicator field: tissue where > 0.  An elliptical prior plus noise, with irregular borders."""
        s = sample_field(self.seed, Stream.TISSUE, self.tissue_noise, gy, gx, box=box)
        yy, xx = self._ellipse_terms(gy, gx, self.tissue_centre, self.tissue_radii)
        # 1 - rho^2 is 1 at the centre and 0 on the ellipse; the noise carves fragments, holes and ragged edges.
        s.mean[...] += np.float32(0.9) * (np.float32(1.0) - yy - xx) - np.float32(0.05)
        return s

    def tumour(self, gy: AxisGrid, gx: AxisGrid, box: bool = True) -> FieldSample:
        """Tumour indicator field: tumour glands where > 0; its value also grades the desmoplastic stroma."""
        s = sample_field(self.seed, Stream.TUMOUR, self.tumour_noise, gy, gx, box=box)
        r = self.tumour_radius
        yy, xx = self._ellipse_terms(gy, gx, self.tumour_centre, (r, r))
        s.mean[...] += np.float32(1.0) - yy - xx
        return s

    def mucosa(self, gy: AxisGrid, gx: AxisGrid, box: bool = True) -> FieldSample:
        """Mucosa indicator: normal crypts where > 0 (about two thirds of the tissue)."""
        s = sample_field(self.seed, Stream.MUCOSA, self.mucosa_noise, gy, gx, box=box)
        s.mean[...] += np.float32(0.35)
        return s

    def aggregates(self, gy: AxisGrid, gx: AxisGrid, box: bool = True) -> FieldSample:
        """Lymphoid-aggregate field: aggregates where it exceeds about 0.65 (a few per cent of the tissue)."""
        return sample_field(self.seed, Stream.LYMPH, self.aggregate_noise, gy, gx, box=box)

    def orientation_at(self, py: np.ndarray, px: np.ndarray) -> np.ndarray:
        """Collagen orientation field at points (level-0 px): > 0 where fibres run along x, < 0 along y.

        A sum of six plane waves (wavelengths 250-600 µm, random directions): smooth, and exact at any point for
        the price of six cosines, so a fibroblast's orientation can be recomputed by anyone who needs its shape
        (the lymphocytes that must not overlap it).  Values are of order 1.
        """
        ky, kx, phase = self._orientation_waves()
        py = np.asarray(py, dtype=np.float64)[..., None]
        px = np.asarray(px, dtype=np.float64)[..., None]
        total = np.cos(py * ky + px * kx + phase).sum(axis=-1)
        return (total / math.sqrt(self._ORIENTATION_WAVES / 2)).astype(np.float32)

    def orientation(self, gy: AxisGrid, gx: AxisGrid) -> np.ndarray:
        """`orientation_at` on the centres of a grid, ``(ny, nx)`` float32 (separable: cos(a+b) expanded)."""
        ky, kx, phase = self._orientation_waves()
        a = gy.centres[:, None] * ky + phase  # (ny, K)
        b = gx.centres[:, None] * kx  # (nx, K)
        total = np.einsum("yk,xk->yx", np.cos(a), np.cos(b)) - np.einsum("yk,xk->yx", np.sin(a), np.sin(b))
        return (total / math.sqrt(self._ORIENTATION_WAVES / 2)).astype(np.float32)

    # ------------------------------------------------------------------ derived indicators (shared by the
    # nuclei's acceptance and the renderer's expected densities, so both regimes agree)
    @staticmethod
    def desmoplasia(tumour_value: np.ndarray) -> np.ndarray:
        """0 in ordinary stroma, 1 in the desmoplastic stroma around and inside the tumour."""
        return _smoothstep(tumour_value, -0.35, 0.1)

    def lymph_probability(self, tumour_value, mucosa_value, aggregate_value) -> np.ndarray:
        """Acceptance probability of a lymphocyte candidate in stroma (plain, lamina propria, aggregate)."""
        p = self.params
        lamina = _smoothstep(mucosa_value, -0.15, 0.15) * (1.0 - _smoothstep(tumour_value, -0.2, 0.1))
        agg = _smoothstep(aggregate_value, 0.55, 0.8)
        base = p.lymph_plain + (p.lymph_lamina - p.lymph_plain) * lamina
        return (base + (p.lymph_aggregate - base) * agg).astype(np.float32)

    def stromal_probability(self, tumour_value, aggregate_value) -> np.ndarray:
        """Acceptance probability of a fibroblast-like candidate in stroma (fewer inside lymphoid aggregates)."""
        p = self.params
        d = self.desmoplasia(tumour_value)
        base = p.stromal_plain + (p.stromal_desmoplastic - p.stromal_plain) * d
        return (base * (1.0 - 0.8 * _smoothstep(aggregate_value, 0.55, 0.8))).astype(np.float32)

    def nuclear_zone_start(self, atypia: np.ndarray) -> np.ndarray:
        """Depth where a gland's nuclei start (they end at ``nuclear_zone_end``): atypical glands stratify."""
        return (self.params.nuclear_zone_start_normal - 0.55 * atypia).astype(np.float32)

    # ------------------------------------------------------------------ glands
    def gland_table(self, cy0: int, cy1: int, cx0: int, cx1: int) -> GlandTable:
        """Draw the glands of cells ``[cy0, cy1) x [cx0, cx1)`` (gland-cell indices; may extend past the slide)."""
        g = self.params.gland
        cell = self.gland_cell
        ny, nx = cy1 - cy0, cx1 - cx0
        iy = np.arange(cy0, cy1)[:, None]
        ix = np.arange(cx0, cx1)[None, :]
        gy = AxisGrid(cy0 * cell, cell, ny)
        gx = AxisGrid(cx0 * cell, cell, nx)
        tissue = self.tissue(gy, gx, box=False).mean
        tumour_field = self.tumour(gy, gx, box=False).mean
        mucosa = self.mucosa(gy, gx, box=False).mean

        def u(k: int) -> np.ndarray:
            return hash_uniform(self.seed, Stream.GLAND + k, iy, ix).astype(np.float32)

        tumour = (tumour_field > 0) & (tissue > 0)
        p = np.where(tumour, g.presence_tumour, g.presence_normal * _smoothstep(mucosa, -0.15, 0.15))
        present = (u(0) < p) & (tissue > -0.1)

        jitter = np.where(tumour, g.jitter_tumour, g.jitter_normal)
        centre_y = (iy + jitter + (1.0 - 2.0 * jitter) * u(1)) * cell
        centre_x = (ix + jitter + (1.0 - 2.0 * jitter) * u(2)) * cell

        def between(lohi_normal, lohi_tumour, k):
            lo = np.where(tumour, lohi_tumour[0], lohi_normal[0])
            hi = np.where(tumour, lohi_tumour[1], lohi_normal[1])
            return (lo + (hi - lo) * u(k)).astype(np.float32)

        radius = between(g.radius_normal, g.radius_tumour, 3) * np.float32(cell)
        lumen_ratio = between(g.lumen_ratio_normal, g.lumen_ratio_tumour, 4)
        atypia = between(g.atypia_normal, g.atypia_tumour, 5)

        def harmonics(max_normal, max_tumour, k0):
            coeffs = []
            for j, (mn, mt) in enumerate(zip(max_normal, max_tumour)):
                amp = np.where(tumour, mt, mn) * u(k0 + 2 * j)
                phase = _TWO_PI * u(k0 + 2 * j + 1)
                coeffs.append(amp * np.exp(-1j * phase))
            return np.stack(coeffs, axis=-1).astype(np.complex64)

        outer = harmonics(g.harmonics_normal, g.harmonics_tumour, 10)
        lumen = harmonics(g.lumen_harmonics_normal, g.lumen_harmonics_tumour, 30)
        reach = radius * (1.0 + np.abs(outer).sum(axis=-1)) + np.float32(4.0 * self.px(g.roughness_um))
        if float(reach.max(initial=0.0)) > MAX_REACH_CELLS * cell:  # a parameter change broke the 3x3 rule
            raise AssertionError("gland parameters let a gland reach beyond its 3x3 cell neighbourhood")

        def flat(a: np.ndarray) -> np.ndarray:
            full = np.broadcast_to(a, (ny, nx) + a.shape[2:])
            return np.ascontiguousarray(full.reshape((ny * nx,) + a.shape[2:]))

        cell_id = (iy + 2) * self.gland_grid_cols + (ix + 2)
        return GlandTable(
            cy0, cx0, ny, nx,
            present=flat(present), centre_y=flat(centre_y), centre_x=flat(centre_x), radius=flat(radius),
            reach=flat(reach), outer=flat(outer), lumen=flat(lumen), lumen_ratio=flat(lumen_ratio),
            tumour=flat(tumour), atypia=flat(atypia), cell_id=flat(cell_id.astype(np.int64)),
        )

    @property
    def gland_grid_cols(self) -> int:
        """Gland cells per row of the slide, with two cells of margin each side (glands reach in from outside)."""
        return int(math.ceil(self.width / self.gland_cell)) + 4

    @property
    def gland_grid_rows(self) -> int:
        return int(math.ceil(self.height / self.gland_cell)) + 4

    @staticmethod
    def radii_at(table: GlandTable, g: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outline and lumen radii (px) of glands ``g`` in directions ``z = e^{iθ}`` (broadcastable arrays)."""
        _, r_out, r_in = _shape(z.imag.astype(np.float32), z.real.astype(np.float32), table.radius[g],
                                table.outer[g], table.lumen[g], table.lumen_ratio[g])
        return r_out, r_in

    def table_for(self, y0: float, y1: float, x0: float, x1: float, ring: int = 1) -> GlandTable:
        """The gland table covering level-0 box ``[y0, y1) x [x0, x1)`` plus ``ring`` cells around it."""
        cell = self.gland_cell
        return self.gland_table(
            int(math.floor(y0 / cell)) - ring, int(math.floor(y1 / cell)) + ring + 1,
            int(math.floor(x0 / cell)) - ring, int(math.floor(x1 / cell)) + ring + 1,
        )

    def glands_on_grid(self, table: GlandTable, gy: AxisGrid, gx: AxisGrid) -> GlandSample:
        """Evaluate the glands at the centres of a grid of pixels (the table must cover the grid plus one ring)."""
        yc = gy.centres
        xc = gx.centres
        shape = (gy.n, gx.n)
        s_out = np.full(shape, -np.inf, dtype=np.float32)
        s_in = np.full(shape, -np.inf, dtype=np.float32)
        owner = np.full(shape, -1, dtype=np.int64)
        depth = np.zeros(shape, dtype=np.float32)
        idx = np.flatnonzero(table.present)
        if idx.size == 0:
            return GlandSample(s_out, s_in, owner, depth)
        reach = table.reach[idx].astype(np.float64)
        r0 = np.searchsorted(yc, table.centre_y[idx] - reach)
        r1 = np.searchsorted(yc, table.centre_y[idx] + reach)
        c0 = np.searchsorted(xc, table.centre_x[idx] - reach)
        c1 = np.searchsorted(xc, table.centre_x[idx] + reach)
        keep = (r1 > r0) & (c1 > c0)
        idx, r0, r1, c0, c1 = idx[keep], r0[keep], r1[keep], c0[keep], c1[keep]
        area = (r1 - r0) * (c1 - c0)
        if idx.size > 48 and area.max() * idx.size < 3_000_000:
            kh, kw = int((r1 - r0).max()), int((c1 - c0).max())
            self._glands_vectorised(table, idx, r0, c0, kh, kw, yc, xc, s_out, s_in, owner, depth)
        else:
            for g, a, b, c, d in zip(idx, r0, r1, c0, c1):
                dy = (yc[a:b] - table.centre_y[g]).astype(np.float32)[:, None]
                dx = (xc[c:d] - table.centre_x[g]).astype(np.float32)[None, :]
                r, r_out, r_in = _shape(dy, dx, table.radius[g], table.outer[g], table.lumen[g], table.lumen_ratio[g])
                so = r_out - r
                win = (slice(a, b), slice(c, d))
                better = so > s_out[win]
                s_out[win] = np.where(better, so, s_out[win])
                owner[win] = np.where(better, g, owner[win])
                depth[win] = np.where(better, (r - r_in) / np.maximum(r_out - r_in, 1e-3), depth[win])
                np.maximum(s_in[win], r_in - r, out=s_in[win])
        return GlandSample(s_out, s_in, owner, depth)

    @staticmethod
    def _glands_vectorised(table, idx, r0, c0, kh, kw, yc, xc, s_out, s_in, owner, depth):
        """Many small glands at once: each gets a ``kh x kw`` window; windows are scattered with ``maximum.at``."""
        rows = r0[:, None] + np.arange(kh)[None, :]  # (g, kh)
        cols = c0[:, None] + np.arange(kw)[None, :]  # (g, kw)
        rows_ok = rows < yc.size
        cols_ok = cols < xc.size
        rows = np.minimum(rows, yc.size - 1)
        cols = np.minimum(cols, xc.size - 1)
        dy = (yc[rows] - table.centre_y[idx][:, None]).astype(np.float32)[:, :, None]
        dx = (xc[cols] - table.centre_x[idx][:, None]).astype(np.float32)[:, None, :]
        r, r_out, r_in = _shape(
            dy, dx, table.radius[idx][:, None, None], table.outer[idx][:, None, None, :],
            table.lumen[idx][:, None, None, :], table.lumen_ratio[idx][:, None, None],
        )
        valid = (rows_ok[:, :, None] & cols_ok[:, None, :]).ravel()
        flat = (rows[:, :, None] * xc.size + cols[:, None, :]).ravel()[valid]
        so = (r_out - r).ravel()[valid]
        si = (r_in - r).ravel()[valid]
        s_out_flat = s_out.reshape(-1)
        np.maximum.at(s_out_flat, flat, so)
        np.maximum.at(s_in.reshape(-1), flat, si)
        winner = so >= s_out_flat[flat]
        gl = np.broadcast_to(idx[:, None, None], r.shape).ravel()[valid]
        owner.reshape(-1)[flat[winner]] = gl[winner]
        t = ((r - r_in) / np.maximum(r_out - r_in, 1e-3)).ravel()[valid]
        depth.reshape(-1)[flat[winner]] = t[winner]

    def glands_at_points(self, table: GlandTable, py: np.ndarray, px: np.ndarray) -> GlandSample:
        """Evaluate the glands at arbitrary points ``(py, px)`` (level-0 px, 1-D arrays inside the table's interior)."""
        cell = self.gland_cell
        cy = np.floor(py / cell).astype(np.int64)
        cx = np.floor(px / cell).astype(np.int64)
        n = py.shape[0]
        s_out = np.full(n, -np.inf, dtype=np.float32)
        s_in = np.full(n, -np.inf, dtype=np.float32)
        owner = np.full(n, -1, dtype=np.int64)
        depth = np.zeros(n, dtype=np.float32)
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                g = table.flat_index(cy + oy, cx + ox)
                pres = table.present[g]
                dy = (py - table.centre_y[g]).astype(np.float32)
                dx = (px - table.centre_x[g]).astype(np.float32)
                r, r_out, r_in = _shape(dy, dx, table.radius[g], table.outer[g], table.lumen[g], table.lumen_ratio[g])
                so = np.where(pres, r_out - r, -np.inf).astype(np.float32)
                better = so > s_out
                s_out = np.where(better, so, s_out)
                owner = np.where(better, g, owner)
                depth = np.where(better, (r - r_in) / np.maximum(r_out - r_in, 1e-3), depth)
                s_in = np.maximum(s_in, np.where(pres, r_in - r, -np.inf).astype(np.float32))
        return GlandSample(s_out, s_in, owner, depth)
