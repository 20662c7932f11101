"""Render one chunk of the virtual slide at any level: RGB, semantic classes, nucleus instances.

A chunk is a rectangle of pixels of one level; pixel ``(i, j)`` of a level with per-axis downsample ``(dy, dx)``
covers the level-0 box ``[i*dy, (i+1)*dy) x [j*dx, (j+1)*dx)``.  Rendering draws only what lies under the chunk
(plus a ring of cells for objects that reach in), so any chunk renders on its own, in bounded memory, and an
object cut by a chunk border is drawn identically from both sides.

Level of detail
---------------
The pixel colour is the mean light of the level-0 pixels under it, obtained without rendering them:

- *fields* (tissue extent, textures) are box-filtered exactly and the detail they lose becomes a coverage or a
  Jensen correction (`noise`, `stain`);
- *glands* are drawn with an anti-aliased edge while they span several pixels; below
  ``SPLAT_GLANDS_FROM_DS`` each gland is splatted as its exact area (outline and lumen integrated over angle);
- *nuclei* are drawn one by one, anti-aliased, up to a downsample of ``EXPLICIT_NUCLEI_UP_TO_DS``; beyond, each
  layer becomes a density: its acceptance probability times its mean area per cell, in the compartment it
  lives in, coloured by the mean light of its darkness range.

Labels are point samples: the class and the nucleus at each pixel centre.  At level 0 the class is decided by the
very quantities that set the pixel's colour (tissue coverage above one half, gland and lumen edges at the pixel
centre), so ground truth and pixels agree exactly.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from .hashing import Stream
from .layout import GlandSample, GlandTable, TissueLayout, _smoothstep
from .noise import AxisGrid, FieldSample, Octaves, coverage_above, octaves, sample_field
from .nuclei import MARGIN_PX, CellFields, LABEL_PRIORITY, nucleus_grids, label_nuclei, render_nuclei
from .params import GLASS, LUMEN, NORMAL_EPITHELIUM, STROMA, TUMOUR_EPITHELIUM
from . import stain as st

__all__ = ["ChunkRenderer", "RENDER_COUNTS", "EXPLICIT_NUCLEI_UP_TO_DS", "SPLAT_GLANDS_FROM_DS"]

#: Nuclei are drawn individually up to this downsample (their rim must stay inside their cell).
EXPLICIT_NUCLEI_UP_TO_DS = 2.0 * MARGIN_PX
#: Glands are splatted by area from this downsample on (a crypt is then about 3-4 pixels across).
SPLAT_GLANDS_FROM_DS = 48.0
_QUADRATURE = 32  # angles for the glands' exact areas


class RenderCounts:
    """Thread-safe counters of rendered chunks per kind (``"rgb"``, ``"semantic"``, ``"instances"``).

    The lazy-viewer test reads them to prove that opening a slide computes nothing.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1

    def get(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(self._counts.values()) if kind is None else self._counts.get(kind, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


#: Every chunk rendered by any virtual slide in this process, by kind.
RENDER_COUNTS = RenderCounts()


@dataclass(frozen=True)
class _Chunk:
    gy: AxisGrid
    gx: AxisGrid
    level0: bool

    @property
    def ds(self) -> float:
        return math.sqrt(self.gy.step * self.gx.step)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.gy.start, self.gy.start + self.gy.step * self.gy.n, self.gx.start, self.gx.start + self.gx.step * self.gx.n)


@dataclass
class _Geometry:
    """What labels and colour share: the gland table, the glands at the pixel centres."""

    table: GlandTable
    glands: GlandSample


def _band(depth: np.ndarray, lo, hi, dt: np.ndarray) -> np.ndarray:
    """Fraction of a pixel (width ``dt`` in depth units) whose depth lies in ``[lo, hi]``."""
    upper = np.clip((hi - depth) / dt + 0.5, 0.0, 1.0)
    lower = np.clip((lo - depth) / dt + 0.5, 0.0, 1.0)
    return (upper - lower).astype(np.float32)


class ChunkRenderer:
    """Renders chunks of one virtual slide (a `TissueLayout` under a `StainPalette`).

    Thread-safe: dask renders chunks from several threads; the only shared state is a small LRU of per-chunk
    geometry (so the RGB, semantic and instance renders of one chunk share the gland evaluation).
    """

    CACHE_SIZE = 6

    def __init__(self, layout: TissueLayout, palette: st.StainPalette):
        self.layout = layout
        self.palette = palette
        self.grids = nucleus_grids(layout)
        px = layout.px
        self.tex = octaves(px(24.0), px(3.0), gain=0.7, first=1.0)
        self.fibre = octaves(px(5.0), px(2.5), gain=0.8, first=1.0)  # across the fibres; along them 5x longer
        self.goblet = octaves(px(8.0), px(2.0), gain=0.7, first=1.0)
        self.chromatin = octaves(px(2.5), px(1.25), gain=0.7, first=1.0)
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ chunk geometry
    @staticmethod
    def chunk(downsample: tuple[float, float], row0: int, col0: int, height: int, width: int) -> _Chunk:
        dy, dx = downsample
        return _Chunk(AxisGrid(row0 * dy, dy, height), AxisGrid(col0 * dx, dx, width), dy == 1.0 and dx == 1.0)

    def _geometry(self, c: _Chunk) -> _Geometry:
        key = (c.gy, c.gx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        y0, y1, x0, x1 = c.bounds
        table = self.layout.table_for(y0, y1, x0, x1, ring=2)
        geo = _Geometry(table, self.layout.glands_on_grid(table, c.gy, c.gx))
        with self._lock:
            self._cache[key] = geo
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return geo

    def _field(self, stream: int, field: Octaves, c: _Chunk, box: bool, stretch_x: float = 1.0) -> FieldSample:
        return sample_field(self.layout.seed, stream, field, c.gy, c.gx, box=box, stretch_x=stretch_x)

    def _edges(self, c: _Chunk, geo: _Geometry, box: bool) -> tuple[np.ndarray, np.ndarray]:
        """Signed distances to the gland outlines and lumina with their micrometre roughness (px)."""
        rough = self._field(Stream.ROUGH_OUT, self.layout.roughness_noise, c, box).mean
        return geo.glands.s_out + rough, geo.glands.s_in + rough

    # ------------------------------------------------------------------ labels
    def semantic(self, downsample, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """Class at each pixel centre (uint8 ``(height, width)``, see `params.CLASS_NAMES`)."""
        c = self.chunk(downsample, row0, col0, height, width)
        return self._semantic(c, self._geometry(c))

    def _semantic(self, c: _Chunk, geo: _Geometry) -> np.ndarray:
        # Level 0 decides with the box means that set the colour (exact agreement); coarser levels point-sample.
        tissue = self.layout.tissue(c.gy, c.gx, box=c.level0).mean
        s_out, s_in = self._edges(c, geo, box=c.level0)
        owner = geo.glands.owner
        tumour = geo.table.tumour[np.maximum(owner, 0)] & (owner >= 0)
        out = np.full(tissue.shape, STROMA, dtype=np.uint8)
        in_gland = s_out > 0
        out[in_gland] = np.where(tumour[in_gland], TUMOUR_EPITHELIUM, NORMAL_EPITHELIUM)
        out[in_gland & (s_in > 0)] = LUMEN
        out[tissue <= 0] = GLASS
        return out

    def instances(self, downsample, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """Nucleus instance id at each pixel centre (int32 ``(height, width)``, 0 = none)."""
        c = self.chunk(downsample, row0, col0, height, width)
        geo = self._geometry(c)
        out = np.zeros((c.gy.n, c.gx.n), dtype=np.int64)
        if c.ds <= EXPLICIT_NUCLEI_UP_TO_DS:
            layers = [render_nuclei(self.layout, g, geo.table, c.gy, c.gx, c.ds).ids for g in self.grids]
        else:
            pix = self._pixel_fields(c)
            layers = [label_nuclei(self.layout, g, geo.table, c.gy, c.gx, pix, geo.glands.s_out) for g in self.grids]
        for k in reversed(LABEL_PRIORITY):  # lowest priority first, so the highest overwrites
            ids = layers[k]
            out = np.where(ids > 0, ids, out)
        out[self._semantic(c, geo) == GLASS] = 0
        return out.astype(np.int32)

    def _pixel_fields(self, c: _Chunk) -> CellFields:
        L = self.layout
        flat = lambda fs: fs.mean.reshape(-1)
        return CellFields(
            tissue=flat(L.tissue(c.gy, c.gx, box=False)),
            tumour=flat(L.tumour(c.gy, c.gx, box=False)),
            mucosa=flat(L.mucosa(c.gy, c.gx, box=False)),
            aggregate=flat(L.aggregates(c.gy, c.gx, box=False)),
            orientation=flat(L.orientation(c.gy, c.gx, box=False)),
        )

    # ------------------------------------------------------------------ colour
    def rgb(self, downsample, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """The chunk's pixels (uint8 ``(height, width, 3)``)."""
        c = self.chunk(downsample, row0, col0, height, width)
        L, pal = self.layout, self.palette
        ds = c.ds
        tissue = coverage_above(L.tissue(c.gy, c.gx, box=True))
        tumour_value = L.tumour(c.gy, c.gx, box=True).mean
        desmo = L.desmoplasia(tumour_value)

        # --- compartments: lumen, epithelium (and its nuclear zone / apical goblet zone), stroma
        if ds < SPLAT_GLANDS_FROM_DS:
            geo = self._geometry(c)
            s_out, s_in = self._edges(c, geo, box=True)
            g_out = np.clip(0.5 + s_out / np.float32(ds), 0.0, 1.0)
            lumen = np.minimum(np.clip(0.5 + s_in / np.float32(ds), 0.0, 1.0), g_out)
            owner = np.maximum(geo.glands.owner, 0)
            has = geo.glands.owner >= 0
            atypia = np.where(has, geo.table.atypia[owner], 0.0).astype(np.float32)
            thickness = geo.table.radius[owner] * (1.0 - geo.table.lumen_ratio[owner])
            dt = np.float32(ds) / np.maximum(thickness, 1.0)
            start = L.nuclear_zone_start(atypia)
            zone = _band(geo.glands.depth, start, L.params.nuclear_zone_end, dt)
            apical = _band(geo.glands.depth, -1.0, start, dt)
        else:
            g_out, lumen, atypia, zone, apical = self._splat_glands(c)
        epi = (g_out - lumen).astype(np.float32)
        stroma = (1.0 - g_out).astype(np.float32)

        tex = self._field(Stream.TEX_STROMA, self.tex, c, True)
        t = tex.mean

        # --- epithelium: cytoplasm graded by atypia, goblet mucin in the apical zone of less atypical glands
        gob_field = self._field(Stream.GOBLET, self.goblet, c, True)
        gob_share = np.float32(0.6) * (1.0 - atypia) ** 2
        sd = math.sqrt(self.goblet.variance)
        threshold = np.float32(sd) * ndtri(np.clip(1.0 - gob_share, 1e-4, 1 - 1e-4)).astype(np.float32)
        goblet = coverage_above(gob_field, threshold) * apical
        cyto_h = st.CYTOPLASM.h + st.CYTOPLASM_ATYPIA_GAIN.h * atypia
        cyto_e = (st.CYTOPLASM.e + st.CYTOPLASM_ATYPIA_GAIN.e * atypia) * (1.0 + 0.12 * t)
        i_cyto = pal.intensity(cyto_h, cyto_e, 0.0, (0.12 * st.CYTOPLASM.e) ** 2 * tex.removed_var)
        i_goblet = pal.intensity(st.GOBLET.h, st.GOBLET.e)
        i_epi = i_cyto + goblet[..., None] * (i_goblet - i_cyto)

        # --- stroma: collagen fibres (streaks along x or y by the orientation field), paler in desmoplasia
        i_stroma = self._stroma(c, desmo, tex)
        i_lumen = pal.intensity(st.LUMEN.h, st.LUMEN.e * (1.0 + 0.6 * t), 0.0, (0.6 * st.LUMEN.e) ** 2 * tex.removed_var)
        i_glass = pal.intensity(st.GLASS.h, st.GLASS.e * (1.0 + 2.0 * t))

        # --- nuclei
        n_epi, n_stroma, n_any, i_nuc = self._nuclei(c, ds, epi, stroma, zone, atypia, tumour_value)
        epi_rest = np.maximum(epi - n_epi, 0.0)
        stroma_rest = np.maximum(stroma - n_stroma, 0.0)
        rest = lumen + epi_rest + stroma_rest
        scale = ((1.0 - n_any) / np.maximum(rest, 1e-6)).astype(np.float32)
        body = (lumen * scale)[..., None] * i_lumen + (epi_rest * scale)[..., None] * i_epi
        body += (stroma_rest * scale)[..., None] * i_stroma
        body += n_any[..., None] * i_nuc
        out = tissue[..., None] * body + (1.0 - tissue)[..., None] * i_glass
        return np.clip(out + 0.5, 0.0, 255.0).astype(np.uint8)

    def _stroma(self, c: _Chunk, desmo: np.ndarray, tex: FieldSample) -> np.ndarray:
        L = self.layout
        w = _smoothstep(L.orientation(c.gy, c.gx, box=True).mean, -0.25, 0.25)
        along_x = self._field(Stream.FIBRE, self.fibre, c, True, stretch_x=5.0)
        along_y = sample_field(L.seed, Stream.FIBRE + 1, self.fibre.scaled(length=5.0), c.gy, c.gx, box=True, stretch_x=0.2)
        fibre = w * along_x.mean + (1.0 - w) * along_y.mean
        fibre_var = w * w * along_x.removed_var + (1.0 - w) ** 2 * along_y.removed_var
        amp = np.float32(0.28) * (1.0 - 0.5 * desmo)
        c_h = (st.STROMA.h + (st.STROMA_DESMOPLASTIC.h - st.STROMA.h) * desmo) * (1.0 + 0.15 * tex.mean)
        c_e0 = st.STROMA.e + (st.STROMA_DESMOPLASTIC.e - st.STROMA.e) * desmo
        c_e = c_e0 * (1.0 + amp * fibre + 0.15 * tex.mean)
        var_e = c_e0 * c_e0 * (amp * amp * fibre_var + 0.0225 * tex.removed_var)
        var_h = (0.15 * st.STROMA_DESMOPLASTIC.h) ** 2 * tex.removed_var
        return self.palette.intensity(c_h, c_e, var_h, var_e)

    def _nuclei(self, c, ds, epi, stroma, zone, atypia, tumour_value):
        """Coverage of all nucleus layers united (as if placed independently), and the mean light of the nuclei.

        Explicit: each layer's anti-aliased ellipses; their darkness is mixed by coverage and shaded once, with
        chromatin texture.  Density: each layer's expected area fraction in its compartment, shaded with the exact
        mean light of its darkness range and the Jensen factor of the chromatin texture it hides.
        """
        L, pal = self.layout, self.palette
        if ds <= EXPLICIT_NUCLEI_UP_TO_DS:
            geo = self._geometry(c)
            drawn = [render_nuclei(L, g, geo.table, c.gy, c.gx, ds) for g in self.grids]
            covers = [d.coverage for d in drawn]
            total = np.zeros_like(epi)
            dark = np.zeros_like(epi)
            for d in drawn:
                total += d.coverage
                dark += d.coverage * d.darkness
            dark /= np.maximum(total, 1e-6)
            chrom = self._field(Stream.CHROMATIN, self.chromatin, c, True)
            light = pal.intensity(dark * (1.0 + 0.25 * chrom.mean), st.NUCLEUS_E, (0.25 * dark) ** 2 * chrom.removed_var)
        else:
            mucosa = L.mucosa(c.gy, c.gx, box=True).mean
            aggregate = L.aggregates(c.gy, c.gx, box=True).mean
            p_lymph = L.lymph_probability(tumour_value, mucosa, aggregate)
            p_stromal = L.stromal_probability(tumour_value, aggregate)
            h_od, _ = pal.od_per_unit()
            covers, lights = [], []
            for g in self.grids:
                lay = g.layer
                area = math.pi * L.px(sum(lay.long_um) / 2) * L.px(sum(lay.short_um) / 2) / (g.cell * g.cell)
                area *= lay.acceptance_scale
                if lay.kind == "epithelial":
                    n = epi * zone * np.float32(L.params.epithelial_acceptance * area) * (1.0 + lay.size_gain * atypia) ** 2
                    gain = 1.0 + lay.darkness_gain * atypia
                elif lay.kind == "lymphocyte":
                    n, gain = stroma * p_lymph * np.float32(area), np.float32(1.0)
                else:
                    n, gain = stroma * p_stromal * np.float32(area), np.float32(1.0)
                mean_dark = 0.5 * (lay.darkness[0] + lay.darkness[1])
                jensen = np.exp(0.5 * (math.log(10.0) * h_od) ** 2 * (0.25 * mean_dark) ** 2 * self.chromatin.variance)
                light = pal.mean_intensity_uniform_h(lay.darkness[0] * gain, lay.darkness[1] * gain, st.NUCLEUS_E)
                covers.append(n.astype(np.float32))
                lights.append(light * jensen.astype(np.float32))
            total = sum(covers)
            weight = 1.0 / np.maximum(total, 1e-6)
            light = sum((n * weight)[..., None] * li for n, li in zip(covers, lights))
        clear = np.ones_like(epi)
        for n in covers:
            clear *= 1.0 - n
        by_kind = {"epithelial": np.zeros_like(epi), "lymphocyte": np.zeros_like(epi), "stromal": np.zeros_like(epi)}
        for g, n in zip(self.grids, covers):
            by_kind[g.layer.kind] += n
        return by_kind["epithelial"], by_kind["lymphocyte"] + by_kind["stromal"], 1.0 - clear, light

    # ------------------------------------------------------------------ glands smaller than a few pixels
    def _splat_glands(self, c: _Chunk):
        """Glands as exact areas: each gland's outline, lumen, nuclear and apical zones are integrated over angle
        and spread over the pixels under a square of the same area centred on the gland."""
        L = self.layout
        y0, y1, x0, x1 = c.bounds
        table = L.table_for(y0, y1, x0, x1, ring=2)
        shape = (c.gy.n, c.gx.n)
        idx = np.flatnonzero(table.present)
        zeros = np.zeros(shape, dtype=np.float32)
        if idx.size == 0:
            return zeros, zeros, zeros, zeros, zeros
        theta = np.arange(_QUADRATURE) * (2.0 * math.pi / _QUADRATURE)
        z = np.exp(1j * theta).astype(np.complex64)
        zk = np.stack([z ** k for k in range(2, 6)], axis=0)  # (4, Q)
        h_out = (table.outer[idx] @ zk).real  # (g, Q)
        h_in = (table.lumen[idx] @ zk[:3]).real
        r_out = table.radius[idx][:, None] * (1.0 + h_out)
        r_in = r_out * table.lumen_ratio[idx][:, None] * (1.0 + h_in)
        atypia = table.atypia[idx]
        start = L.nuclear_zone_start(atypia)[:, None]
        end = np.float32(L.params.nuclear_zone_end)
        r_a = r_in + start * (r_out - r_in)
        r_b = r_in + end * (r_out - r_in)
        area = lambda r2: (math.pi / _QUADRATURE) * r2.sum(axis=1)
        a_out = area(r_out ** 2)
        a_in = area(r_in ** 2)
        a_epi = np.maximum(a_out - a_in, 1e-6)
        zone_frac = area(r_b ** 2 - r_a ** 2) / a_epi
        apical_frac = area(r_a ** 2 - r_in ** 2) / a_epi
        side = np.sqrt(a_out)

        def overlaps(grid: AxisGrid, centre: np.ndarray):
            lo, hi = centre - side / 2, centre + side / 2
            first = np.floor((lo - grid.start) / grid.step).astype(np.int64)
            k = int(np.ceil(side.max() / grid.step)) + 2
            cells = first[:, None] + np.arange(k)[None, :]
            left = grid.start + cells * grid.step
            length = np.clip(np.minimum(hi[:, None], left + grid.step) - np.maximum(lo[:, None], left), 0.0, None)
            ok = (cells >= 0) & (cells < grid.n)
            return cells, np.where(ok, length / grid.step, 0.0)

        ry, wy = overlaps(c.gy, table.centre_y[idx])
        rx, wx = overlaps(c.gx, table.centre_x[idx])
        # fraction of each pixel under the gland's square, times the gland's share of that square (1: same area)
        cover = (wy[:, :, None] * wx[:, None, :]).astype(np.float64) * (a_out / (side * side))[:, None, None]
        valid = cover > 0
        flat = (np.clip(ry, 0, c.gy.n - 1)[:, :, None] * c.gx.n + np.clip(rx, 0, c.gx.n - 1)[:, None, :])
        flat = flat[valid]
        sums = {}
        per_gland = {
            "gland": np.ones_like(a_out),
            "lumen": a_in / a_out,
            "epi": a_epi / a_out,
            "epi_atypia": a_epi / a_out * atypia,
            "epi_zone": a_epi / a_out * zone_frac,
            "epi_apical": a_epi / a_out * apical_frac,
        }
        for name, value in per_gland.items():
            acc = np.bincount(flat, weights=(cover * value[:, None, None])[valid], minlength=shape[0] * shape[1])
            sums[name] = acc.reshape(shape)
        squeeze = 1.0 / np.maximum(sums["gland"], 1.0)  # fused tumour glands overlap: never more than the pixel
        g_out = (sums["gland"] * squeeze).astype(np.float32)
        lumen = (sums["lumen"] * squeeze).astype(np.float32)
        epi = np.maximum(sums["epi"], 1e-9)
        atypia_px = (sums["epi_atypia"] / epi).astype(np.float32)
        zone = (sums["epi_zone"] / epi).astype(np.float32)
        apical = (sums["epi_apical"] / epi).astype(np.float32)
        return g_out, lumen, atypia_px, zone, apical
