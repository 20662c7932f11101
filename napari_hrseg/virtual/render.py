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
  layer becomes a density (its expected area share of the compartment it lives in, from the same parameters
  the explicit nuclei are drawn with), coloured by the mean light of its darkness range.

Measured against the 2 x 2 mean of the finer level (``tests/test_virtual_slide.py``): level 1 differs from
level 0 by 0.6 grey levels on average, with no colour bias; coarser levels stay within about a grey level of
bias, their pixel-wise differences (2-9 grey levels) being the arrangement of nuclei and glands the finer level
resolves and the coarser one spreads.

Labels are point samples: the class and the nucleus at each pixel centre.  At level 0 the class is decided by the
very quantities that set the pixel's colour (tissue coverage above one half, gland and lumen edges at the pixel
centre), so ground truth and pixels agree exactly.  Gland and nucleus geometry is exact at every level; the tissue
border and the glands' micrometre roughness are the level's band-limited fields (detail finer than a pixel of
that level is not in its labels, as it is not in its pixels).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .hashing import Stream
from .layout import GlandSample, GlandTable, TissueLayout, _smoothstep
from .noise import AxisGrid, FieldSample, Octaves, coverage_above, octaves, sample_field
from .epithelium import rim_expectations, rim_id_offset_check, rim_on_grid
from .nuclei import MARGIN_PX, CellFields, nucleus_grids, label_nuclei, render_nuclei
from .params import GLASS, LUMEN, NORMAL_EPITHELIUM, STROMA, TUMOUR_EPITHELIUM
from . import stain as st

__all__ = ["ChunkRenderer", "RENDER_COUNTS", "EXPLICIT_NUCLEI_UP_TO_DS", "SPLAT_GLANDS_FROM_DS"]

#: Nuclei are drawn individually up to this downsample (their rim must stay inside their cell).
EXPLICIT_NUCLEI_UP_TO_DS = 2.0 * MARGIN_PX
#: Glands are splatted by area from this downsample on (a crypt is then about 2-3 pixels across; at 64 the
#: anti-aliased outline is still the closer match to the mean of the finer level, measured).
SPLAT_GLANDS_FROM_DS = 96.0
_QUADRATURE = 32  # angles for the glands' exact areas


class RenderCounts:
    """Process-wide, thread-safe counters of rendered chunks per kind (``"rgb"``, ``"semantic"``, ``"instances"``) and level.

    The lazy-viewer test reads them to prove that opening a slide computes nothing, and which levels napari asks
    for once a layer is shown.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._levels: dict[tuple[str, int], int] = {}

    def add(self, kind: str, level: int = -1) -> None:
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            self._levels[(kind, level)] = self._levels.get((kind, level), 0) + 1

    def by_level(self) -> dict[tuple[str, int], int]:
        """Rendered chunks per ``(kind, level)``."""
        with self._lock:
            return dict(self._levels)

    def get(self, kind: str | None = None) -> int:
        with self._lock:
            return sum(self._counts.values()) if kind is None else self._counts.get(kind, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def __reduce__(self):
        # A pickled render function refers to the process's counter: workers count in their own process.
        return (_render_counts, ())


#: Every chunk rendered by any virtual slide in this process, by kind.
RENDER_COUNTS = RenderCounts()


def _render_counts() -> RenderCounts:
    return RENDER_COUNTS


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
        gy, gx = self.gy, self.gx
        return (gy.start, gy.start + gy.step * gy.n, gx.start, gx.start + gx.step * gx.n)


@dataclass
class _Geometry:
    """What labels and colour share: the gland table, the glands at the pixel centres, and fields by name."""

    table: GlandTable
    glands: GlandSample
    fields: dict = field(default_factory=dict)


def _lens_area(r1: np.ndarray, r2: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Area of the intersection of two discs of radii ``r1, r2`` whose centres are ``d`` apart."""
    d = np.maximum(d, 1e-9)
    r1 = np.maximum(r1, 1e-9)
    r2 = np.maximum(r2, 1e-9)
    c1 = np.clip((d * d + r1 * r1 - r2 * r2) / (2 * d * r1), -1.0, 1.0)
    c2 = np.clip((d * d + r2 * r2 - r1 * r1) / (2 * d * r2), -1.0, 1.0)
    k = np.clip((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2), 0.0, None)
    lens = r1 * r1 * np.arccos(c1) + r2 * r2 * np.arccos(c2) - 0.5 * np.sqrt(k)
    inside = d <= np.abs(r1 - r2)
    lens = np.where(inside, math.pi * np.minimum(r1, r2) ** 2, lens)
    return np.where(d >= r1 + r2, 0.0, lens)


def _neighbour_overlap(table: GlandTable, idx: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Summed overlap (px²) of each gland ``idx`` with the glands of the 8 cells around it (equal-area discs)."""
    radius = np.zeros(table.present.size)
    radius[idx] = np.sqrt(area / math.pi)
    row, col = np.divmod(idx, table.nx)
    total = np.zeros(idx.size)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if oy == 0 and ox == 0:
                continue
            r2, c2 = row + oy, col + ox
            ok = (r2 >= 0) & (r2 < table.ny) & (c2 >= 0) & (c2 < table.nx)
            j = np.where(ok, r2 * table.nx + c2, 0)
            ok &= table.present[j]
            d = np.hypot(table.centre_y[idx] - table.centre_y[j], table.centre_x[idx] - table.centre_x[j])
            total += np.where(ok, _lens_area(radius[idx], radius[j], d), 0.0)
    return total


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
        self.rim_offset = sum(g.n_rows * g.n_cols for g in self.grids)  # epithelial ids follow the stromal ones
        rim_id_offset_check(layout, self.rim_offset)
        px = layout.px
        self.tex = octaves(px(24.0), px(3.0), gain=0.7, first=1.0)
        self.fibre = octaves(px(5.0), px(2.5), gain=0.8, first=1.0)  # across the fibres; along them 5x longer
        self.goblet = octaves(px(5.0), px(2.5), gain=0.5, first=1.0)
        self.chromatin = octaves(px(2.5), px(1.25), gain=0.7, first=1.0)
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()

    def __getstate__(self) -> dict:
        # Picklable for dask's distributed workers: the lock and the cache stay behind (a worker builds its own).
        state = self.__dict__.copy()
        del state["_lock"], state["_cache"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = OrderedDict()

    def _blocker(self, grid):
        """The layer whose candidates ``grid``'s must not touch (lymphocytes give way to fibroblast-like nuclei)."""
        if grid.layer.kind != "lymphocyte":
            return None
        return next((g for g in self.grids if g.layer.kind == "stromal"), None)

    def clear_cache(self) -> None:
        """Forget the per-chunk geometry (so that a timing measures a cold render)."""
        with self._lock:
            self._cache.clear()

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

    def _field(self, stream: int, octs: Octaves, c: _Chunk, box: bool, stretch_x: float = 1.0) -> FieldSample:
        return sample_field(self.layout.seed, stream, octs, c.gy, c.gx, box=box, stretch_x=stretch_x)

    def _layout_field(self, c: _Chunk, name: str, box: bool) -> FieldSample:
        """``layout.<name>(gy, gx, box)`` for this chunk, computed once and shared by its three renders."""
        geo = self._geometry(c)
        key = (name, box)
        got = geo.fields.get(key)
        if got is None:
            got = geo.fields[key] = getattr(self.layout, name)(c.gy, c.gx, box=box)
        return got

    def _edges(self, c: _Chunk, geo: _Geometry, box: bool) -> tuple[np.ndarray, np.ndarray]:
        """Signed distances to the gland outlines and lumina with their micrometre roughness (px)."""
        key = ("roughness", box)
        rough = geo.fields.get(key)
        if rough is None:
            rough = geo.fields[key] = self._field(Stream.ROUGH_OUT, self.layout.roughness_noise, c, box).mean
        return geo.glands.s_out + rough, geo.glands.s_in + rough

    # ------------------------------------------------------------------ labels
    def semantic(self, downsample, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """Class at each pixel centre (uint8 ``(height, width)``, see `params.CLASS_NAMES`)."""
        c = self.chunk(downsample, row0, col0, height, width)
        return self._semantic(c, self._geometry(c))

    def _semantic(self, c: _Chunk, geo: _Geometry) -> np.ndarray:
        # Level 0 decides with the box means that set the colour (exact agreement); coarser levels point-sample.
        tissue = self._layout_field(c, "tissue", c.level0).mean
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
        if c.ds <= EXPLICIT_NUCLEI_UP_TO_DS:
            drawn = [render_nuclei(self.layout, g, geo.table, c.gy, c.gx, c.ds, self._blocker(g)) for g in self.grids]
            layers = [(d.ids, d.centre_d2) for d in drawn]
        else:
            pix = self._pixel_fields(c)
            layers = [
                label_nuclei(self.layout, g, geo.table, c.gy, c.gx, pix, geo.glands.s_out, self._blocker(g))
                for g in self.grids
            ]
        rim = rim_on_grid(self.layout, geo.table, geo.glands, c.gy, c.gx, c.ds, self.rim_offset)
        layers.append((rim.ids, rim.centre_d2))
        # Where nuclei overlap, the pixel goes to the nearest centre: a straight split, each keeps one piece.
        out = np.zeros((c.gy.n, c.gx.n), dtype=np.int64)
        best = np.full((c.gy.n, c.gx.n), np.inf, dtype=np.float32)
        for ids, d2 in layers:
            better = d2 < best
            out = np.where(better, ids, out)
            best = np.where(better, d2, best)
        out[self._semantic(c, geo) == GLASS] = 0
        return out.astype(np.int32)

    def _pixel_fields(self, c: _Chunk) -> CellFields:
        flat = lambda name: self._layout_field(c, name, False).mean.reshape(-1)
        return CellFields(
            tissue=flat("tissue"), tumour=flat("tumour"), mucosa=flat("mucosa"), aggregate=flat("aggregates")
        )

    # ------------------------------------------------------------------ colour
    def rgb(self, downsample, row0: int, col0: int, height: int, width: int) -> np.ndarray:
        """The chunk's pixels (uint8 ``(height, width, 3)``)."""
        c = self.chunk(downsample, row0, col0, height, width)
        L, pal = self.layout, self.palette
        ds = c.ds
        tissue = coverage_above(self._layout_field(c, "tissue", True))
        tumour_value = self._layout_field(c, "tumour", True).mean
        desmo = L.desmoplasia(tumour_value)
        explicit = ds <= EXPLICIT_NUCLEI_UP_TO_DS

        # --- compartments (fractions of the pixel's tissue): lumen, epithelium with its goblets and nuclei, stroma
        if ds < SPLAT_GLANDS_FROM_DS:
            geo = self._geometry(c)
            s_out, s_in = self._edges(c, geo, box=True)
            g_out = np.clip(0.5 + s_out / np.float32(ds), 0.0, 1.0)
            lumen = np.minimum(np.clip(0.5 + s_in / np.float32(ds), 0.0, 1.0), g_out)
            epi = g_out - lumen
            owner = np.maximum(geo.glands.owner, 0)
            has = geo.glands.owner >= 0
            atypia = np.where(has, geo.table.atypia[owner], 0.0).astype(np.float32)
            if explicit:
                rim = rim_on_grid(L, geo.table, geo.glands, c.gy, c.gx, ds, self.rim_offset)
                n_epi, dark_epi = np.minimum(rim.nucleus, epi), rim.darkness
                goblet = np.minimum(rim.goblet, epi - n_epi)
            else:
                per_gland = self._gland_expectations(geo.table)
                thickness = geo.table.radius[owner] * (1.0 - geo.table.lumen_ratio[owner])
                dt = np.float32(ds) / np.maximum(thickness, 1.0)
                start = L.nuclear_zone_start(atypia)
                zone = _band(geo.glands.depth, start, L.params.nuclear_zone_end, dt)
                apical = _band(geo.glands.depth, -1.0, start, dt)
                share = np.where(has, per_gland["nuclear_share"][owner], 0.0)
                n_epi = epi * zone * share
                goblet = epi * apical * np.where(has, per_gland["goblet_share"][owner], 0.0)
                dark_epi = np.where(has, per_gland["darkness"][owner], 1.0)
        else:
            g_out, lumen, epi, n_epi, goblet, atypia, dark_epi = self._splat_glands(c)
        stroma = (1.0 - g_out).astype(np.float32)

        tex = self._field(Stream.TEX_STROMA, self.tex, c, True)
        t = tex.mean
        cyto_h = st.CYTOPLASM.h + st.CYTOPLASM_ATYPIA_GAIN.h * atypia
        cyto_e = (st.CYTOPLASM.e + st.CYTOPLASM_ATYPIA_GAIN.e * atypia) * (1.0 + 0.12 * t)
        i_cyto = pal.intensity(cyto_h, cyto_e, 0.0, (0.12 * st.CYTOPLASM.e) ** 2 * tex.removed_var)
        i_goblet = pal.intensity(st.GOBLET.h * (1.0 + 0.5 * t), st.GOBLET.e, (0.5 * st.GOBLET.h) ** 2 * tex.removed_var)
        i_stroma = self._stroma(c, desmo, tex)
        lumen_var = (0.4 * st.LUMEN.e) ** 2 * tex.removed_var
        i_lumen = pal.intensity(st.LUMEN.h, st.LUMEN.e * (1.0 + 0.4 * t), 0.0, lumen_var)
        i_glass = pal.intensity(st.GLASS.h, st.GLASS.e * (1.0 + 2.0 * t))

        # --- nuclei: epithelial (from the glands) and stromal (grids); they replace the compartment they sit in
        n_str, dark_str, light_str = self._stromal_nuclei(c, ds, stroma, tumour_value)
        n_str = np.minimum(n_str, stroma)
        if explicit:
            chrom = self._field(Stream.CHROMATIN, self.chromatin, c, True)
            n_all = n_epi + n_str
            dark = (n_epi * dark_epi + n_str * dark_str) / np.maximum(n_all, 1e-6)
            chrom_var = (0.25 * dark) ** 2 * chrom.removed_var
            i_nuc = n_all[..., None] * pal.intensity(dark * (1.0 + 0.25 * chrom.mean), st.NUCLEUS_E, chrom_var)
        else:
            i_nuc = n_epi[..., None] * self._mean_nucleus_light(dark_epi) + light_str
        cyto = np.maximum(epi - n_epi - goblet, 0.0)
        body = lumen[..., None] * i_lumen + cyto[..., None] * i_cyto + goblet[..., None] * i_goblet
        body += (stroma - n_str)[..., None] * i_stroma + i_nuc
        out = tissue[..., None] * body + (1.0 - tissue)[..., None] * i_glass
        return np.clip(out + 0.5, 0.0, 255.0).astype(np.uint8)

    def _mean_nucleus_light(self, darkness: np.ndarray, spread: float = 0.15) -> np.ndarray:
        """Mean light of nuclei whose darkness is uniform in ``darkness * (1 -+ spread)``, with the Jensen factor of
        the chromatin texture they hide (``(..., 3)``)."""
        pal = self.palette
        h_od, _ = pal.od_per_unit()
        light = pal.mean_intensity_uniform_h(darkness * (1.0 - spread), darkness * (1.0 + spread), st.NUCLEUS_E)
        hidden = (0.25 * darkness[..., None]) ** 2 * self.chromatin.variance
        jensen = np.exp(0.5 * (math.log(10.0) * h_od) ** 2 * hidden)
        return (light * jensen).astype(np.float32)

    def _stroma(self, c: _Chunk, desmo: np.ndarray, tex: FieldSample) -> np.ndarray:
        L = self.layout
        w = _smoothstep(L.orientation(c.gy, c.gx), -0.25, 0.25)
        along_x = self._field(Stream.FIBRE, self.fibre, c, True, stretch_x=5.0)
        along_y = sample_field(
            L.seed, Stream.FIBRE + 1, self.fibre.scaled(length=5.0), c.gy, c.gx, box=True, stretch_x=0.2
        )
        fibre = w * along_x.mean + (1.0 - w) * along_y.mean
        fibre_var = w * w * along_x.removed_var + (1.0 - w) ** 2 * along_y.removed_var
        amp = np.float32(0.18) * (1.0 - 0.4 * desmo)
        c_h = (st.STROMA.h + (st.STROMA_DESMOPLASTIC.h - st.STROMA.h) * desmo) * (1.0 + 0.15 * tex.mean)
        c_e0 = st.STROMA.e + (st.STROMA_DESMOPLASTIC.e - st.STROMA.e) * desmo
        c_e = c_e0 * (1.0 + amp * fibre + 0.15 * tex.mean)
        var_e = c_e0 * c_e0 * (amp * amp * fibre_var + 0.0225 * tex.removed_var)
        var_h = (0.15 * st.STROMA_DESMOPLASTIC.h) ** 2 * tex.removed_var
        return self.palette.intensity(c_h, c_e, var_h, var_e)

    def _stromal_nuclei(self, c: _Chunk, ds: float, stroma: np.ndarray, tumour_value: np.ndarray):
        """Stromal nuclei as coverage (explicit: drawn; else: expected), their darkness, and (density regime) their
        summed light ``coverage * mean light`` ``(..., 3)``.

        Layers are placed independently, so their union covers ``1 - prod(1 - n_k)``.
        """
        L, pal = self.layout, self.palette
        if ds <= EXPLICIT_NUCLEI_UP_TO_DS:
            geo = self._geometry(c)
            drawn = [render_nuclei(L, g, geo.table, c.gy, c.gx, ds, self._blocker(g)) for g in self.grids]
            clear = np.ones_like(stroma)
            weighted = np.zeros_like(stroma)
            total = np.zeros_like(stroma)
            for d in drawn:
                clear *= 1.0 - d.coverage
                weighted += d.coverage * d.darkness
                total += d.coverage
            return 1.0 - clear, weighted / np.maximum(total, 1e-6), None
        mucosa = L.mucosa(c.gy, c.gx, box=True).mean
        aggregate = L.aggregates(c.gy, c.gx, box=True).mean
        p = {
            "lymphocyte": L.lymph_probability(tumour_value, mucosa, aggregate),
            "stromal": L.stromal_probability(tumour_value, aggregate),
        }
        clear = np.ones_like(stroma)
        covers, lights = [], []
        for g in self.grids:
            lay = g.layer
            area = math.pi * L.px(sum(lay.long_um) / 2) * L.px(sum(lay.short_um) / 2) / (g.cell * g.cell)
            n = stroma * p[lay.kind] * np.float32(area * lay.acceptance_scale)
            clear *= 1.0 - n
            covers.append(n)
            lights.append(self._mean_nucleus_light(np.full((), 0.5 * sum(lay.darkness), np.float32), spread=0.1))
        union = 1.0 - clear
        total = sum(covers)
        light = sum((n * union / np.maximum(total, 1e-6))[..., None] * li for n, li in zip(covers, lights))
        return union, None, light

    # ------------------------------------------------------------------ per-gland expectations
    def _gland_areas(self, table: GlandTable, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Exact areas (px²) of glands ``idx``: outline, lumen, nuclear and apical zones (32-angle quadrature)."""
        L = self.layout
        theta = np.arange(_QUADRATURE) * (2.0 * math.pi / _QUADRATURE)
        z = np.exp(1j * theta).astype(np.complex64)
        zk = np.stack([z ** k for k in range(2, 6)], axis=0)  # (4, Q)
        h_out = (table.outer[idx] @ zk).real  # (g, Q)
        h_in = (table.lumen[idx] @ zk[:3]).real
        r_out = table.radius[idx][:, None] * (1.0 + h_out)
        r_in = r_out * table.lumen_ratio[idx][:, None] * (1.0 + h_in)
        start = L.nuclear_zone_start(table.atypia[idx])[:, None]
        r_a = r_in + start * (r_out - r_in)
        r_b = r_in + np.float32(L.params.nuclear_zone_end) * (r_out - r_in)
        area = lambda r2: ((math.pi / _QUADRATURE) * r2.sum(axis=1)).astype(np.float64)
        return {
            "outline": area(r_out ** 2),
            "lumen": area(r_in ** 2),
            "zone": area(r_b ** 2 - r_a ** 2),
            "apical": area(r_a ** 2 - r_in ** 2),
        }

    def _gland_expectations(self, table: GlandTable) -> dict[str, np.ndarray]:
        """Per table entry: nuclear share of the nuclear zone, goblet share of the apical zone, nuclear darkness."""
        n = table.present.size
        out = {k: np.zeros(n, np.float32) for k in ("nuclear_share", "goblet_share")}
        out["darkness"] = np.ones(n, np.float32)
        idx = np.flatnonzero(table.present)
        if idx.size:
            areas = self._gland_areas(table, idx)
            nuc, gob, dark = rim_expectations(self.layout, table, idx, areas["zone"], areas["apical"])
            out["nuclear_share"][idx], out["goblet_share"][idx], out["darkness"][idx] = nuc, gob, dark
        return out

    # ------------------------------------------------------------------ glands smaller than a few pixels
    def _splat_glands(self, c: _Chunk):
        """Glands as exact areas: each gland's outline and lumen are integrated over angle and spread over the pixels
        under two concentric squares of the same areas (a four-pixel crypt keeps its pale centre); its nuclei and
        goblets as their expected shares of the epithelium.

        Returns fractions of each pixel: gland, lumen, epithelium, epithelial nuclei, goblets; and the epithelium's
        mean atypia and nuclear darkness.
        """
        L = self.layout
        y0, y1, x0, x1 = c.bounds
        table = L.table_for(y0, y1, x0, x1, ring=2)
        shape = (c.gy.n, c.gx.n)
        idx = np.flatnonzero(table.present)
        zeros = np.zeros(shape, dtype=np.float32)
        if idx.size == 0:
            return zeros, zeros, zeros, zeros, zeros, zeros, np.ones(shape, np.float32)
        areas = self._gland_areas(table, idx)
        a_in = areas["lumen"]
        # Crowded tumour glands overlap (fuse): the union has less epithelium than the sum.  Each gland gives up
        # half of its overlap with each neighbour (discs of equal area), taken from its epithelium.
        shared = 0.5 * _neighbour_overlap(table, idx, areas["outline"])
        a_epi = np.maximum(areas["outline"] - a_in - shared, 1e-6)
        a_out = a_in + a_epi
        nuc_share, gob_share, darkness = rim_expectations(L, table, idx, areas["zone"], areas["apical"])
        nuclei_per_epi = nuc_share * areas["zone"] / a_epi
        goblets_per_epi = gob_share * areas["apical"] / a_epi
        atypia = table.atypia[idx].astype(np.float64)
        side_out = np.sqrt(a_out)
        side_in = np.sqrt(a_in)

        def overlaps(grid: AxisGrid, centre: np.ndarray, side: np.ndarray, k: int):
            lo, hi = centre - side / 2, centre + side / 2
            first = np.floor((centre - side_out / 2 - grid.start) / grid.step).astype(np.int64)
            cells = first[:, None] + np.arange(k)[None, :]
            left = grid.start + cells * grid.step
            length = np.clip(np.minimum(hi[:, None], left + grid.step) - np.maximum(lo[:, None], left), 0.0, None)
            ok = (cells >= 0) & (cells < grid.n)
            return np.clip(cells, 0, grid.n - 1), np.where(ok, length / grid.step, 0.0)

        ky = int(np.ceil(side_out.max() / c.gy.step)) + 2
        kx = int(np.ceil(side_out.max() / c.gx.step)) + 2
        ry, wy_out = overlaps(c.gy, table.centre_y[idx], side_out, ky)
        rx, wx_out = overlaps(c.gx, table.centre_x[idx], side_out, kx)
        _, wy_in = overlaps(c.gy, table.centre_y[idx], side_in, ky)
        _, wx_in = overlaps(c.gx, table.centre_x[idx], side_in, kx)
        cover_out = wy_out[:, :, None] * wx_out[:, None, :]  # fraction of each pixel under the gland's square
        cover_in = wy_in[:, :, None] * wx_in[:, None, :]
        cover_epi = cover_out - cover_in
        valid = cover_out > 0
        flat = (ry[:, :, None] * c.gx.n + rx[:, None, :])[valid]
        n_px = shape[0] * shape[1]

        def accumulate(cover, per_gland):
            w = (cover * per_gland[:, None, None])[valid]
            return np.bincount(flat, weights=w, minlength=n_px).reshape(shape)

        ones = np.ones_like(a_out)
        gland = accumulate(cover_out, ones)
        lumen = accumulate(cover_in, ones)
        epi = accumulate(cover_epi, ones)
        nuclei = accumulate(cover_epi, nuclei_per_epi)
        goblets = accumulate(cover_epi, goblets_per_epi)
        epi_atypia = accumulate(cover_epi, atypia)
        epi_dark = accumulate(cover_epi * nuclei_per_epi[:, None, None], darkness.astype(np.float64))
        squeeze = 1.0 / np.maximum(gland, 1.0)  # fused tumour glands overlap: never more than the pixel
        f = lambda a: (a * squeeze).astype(np.float32)
        safe_epi = np.maximum(epi, 1e-9)
        return (
            f(gland), f(lumen), f(epi), f(nuclei), f(goblets),
            (epi_atypia / safe_epi).astype(np.float32),
            np.where(nuclei > 0, epi_dark / np.maximum(nuclei, 1e-9), 1.0).astype(np.float32),
        )
