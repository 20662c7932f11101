"""`virtual_slide()`: a procedural gigapixel H&E slide with its ground truth, rendered lazily chunk by chunk."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

import dask.array as da
import numpy as np

from ..errors import HrsegError, RegionError
from ..geometry import Region
from ..slide import Slide
from .layout import TissueLayout
from .params import CLASS_COLORS, CLASS_NAMES, TUMOUR_EPITHELIUM, NORMAL_EPITHELIUM, TissueParams
from .pyramid import default_level_count, lazy_level, level_shapes
from .render import RENDER_COUNTS, ChunkRenderer
from .stain import STAIN_PALETTES, get_palette

__all__ = ["VirtualSlide", "virtual_slide"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VirtualSlide:
    """A virtual slide and its ground truth, all lazy pyramids of the same shapes and chunks.

    Attributes
    ----------
    slide : Slide
        Format ``"virtual"``: RGB uint8 ``(Y, X, 3)`` levels, finest first, pixel size ``mpp``.
    semantic : tuple of dask.array.Array
        Class at each pixel centre, uint8 ``(Y, X)``, one per level (see ``class_names``).
    instances : tuple of dask.array.Array
        Nucleus instance id at each pixel centre, int32 ``(Y, X)``, 0 = none; ids are unique over the slide and
        the same at every level and from every chunk.
    class_names, class_colors : tuple of str
        Index 0 is glass (background); colours are ``'#rrggbb'``.
    seed : int
    stain : str
        Name of the stain palette (`napari_hrseg.virtual.STAIN_PALETTES`).
    layout : TissueLayout
        The slide's plan (tumour centre and radius, field definitions), for tools that need to know where
        things are.
    renderer : ChunkRenderer
        What the pyramids' chunks call; ``renderer.clear_cache()`` forgets the per-chunk geometry (benchmarks).
    """

    slide: Slide
    semantic: tuple[da.Array, ...]
    instances: tuple[da.Array, ...]
    class_names: tuple[str, ...]
    class_colors: tuple[str, ...]
    seed: int
    stain: str
    layout: TissueLayout = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    renderer: ChunkRenderer = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    @property
    def n_levels(self) -> int:
        return self.slide.level_count

    @property
    def tumour_class(self) -> int:
        return TUMOUR_EPITHELIUM

    def border_region(self, size: int = 2048) -> Region:
        """A level-0 square of ``size`` px on the tumour's border: tumour and normal epithelium both present.

        Searched on a coarse level of the semantic pyramid (a few chunks); for benchmarks that need context.

        Raises
        ------
        RegionError
            If the slide is too small to hold such a square.
        """
        H, W = self.slide.shape[:2]
        if size > min(H, W):
            raise RegionError(f"a {size}-px square does not fit in the {H} x {W} slide", subject=self.slide.name)
        # a level where the square is about 8 pixels: one or a few chunks for the whole slide
        level = max(0, min(self.n_levels - 1, int(math.log2(max(1, size // 8)))))
        ds = 2**level
        sem = np.asarray(self.semantic[level].compute(scheduler="threads"))
        k = max(1, size // ds)
        tum = _box_sum(sem == TUMOUR_EPITHELIUM, k)
        nor = _box_sum(sem == NORMAL_EPITHELIUM, k)
        score = np.minimum(tum, nor)
        if score.max() <= 0:
            raise RegionError(
                "no square holds both tumour and normal epithelium", subject=self.slide.name, hint="use a larger slide"
            )
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        row = int(min(max(0, r * ds), H - size))
        col = int(min(max(0, c * ds), W - size))
        return Region(row, col, size, size)


def _box_sum(mask: np.ndarray, k: int) -> np.ndarray:
    """Sum over every ``k x k`` window (top-left anchored), via an integral image."""
    ii = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = min(k, mask.shape[0], mask.shape[1])
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]


def virtual_slide(
    seed: int = 0,
    size: int | tuple[int, int] = 100_000,
    *,
    tile: int = 512,
    mpp: float = 0.5,
    stain: str = "he",
    n_levels: int | None = None,
) -> VirtualSlide:
    """A procedural H&E slide of colorectal mucosa with an adenocarcinoma focus, and its ground truth.

    Nothing is rendered here: the pyramids are lazy dask arrays whose chunks render on demand (about a tenth to
    a third of a second of CPU per 512 x 512 chunk at any level), from ``seed`` alone.

    Parameters
    ----------
    seed : int
        Everything (tissue layout, every gland and nucleus, textures) is a function of it.
    size : int or (int, int)
        Level-0 size in pixels, ``(rows, cols)`` or a square's side.
    tile : int
        Chunk size of every level (pixels).
    mpp : float
        Level-0 pixel size in µm; the tissue is physical, so a smaller ``mpp`` shows it at more pixels.
    stain : str
        Stain palette: ``"he"`` (GlaS-like), ``"he-tcga"`` (MICCAI 2015 TCGA-like), ``"he-faded"``.  The same seed
        under another palette is the same tissue, with identical ground truth.
    n_levels : int, optional
        Pyramid levels (halving each time); by default down to the first level that fits in one tile.

    Returns
    -------
    VirtualSlide

    Raises
    ------
    HrsegError
        For a non-positive size or pixel size, a tile under 16 px, too many levels, or an unknown palette.
    """
    palette = get_palette(stain)
    height, width = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))  # type: ignore[index]
    if height < 1 or width < 1:
        raise HrsegError(f"size {size!r} must be positive", subject="virtual slide")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise HrsegError(f"pixel size {mpp!r} must be a positive number of µm", subject="virtual slide")
    if tile < 16:
        raise HrsegError(f"tile {tile} is too small", subject="virtual slide", hint="use 256 or 512")
    most = default_level_count(height, width, 1)
    if n_levels is None:
        n_levels = default_level_count(height, width, tile)
    if not 1 <= n_levels <= most:
        raise HrsegError(
            f"{n_levels} levels do not fit a {height} x {width} slide", subject="virtual slide", hint=f"use 1 to {most}"
        )
    layout = TissueLayout(int(seed), height, width, float(mpp), TissueParams())
    renderer = ChunkRenderer(layout, palette)
    shapes = level_shapes(height, width, n_levels)
    downsamples = [(height / h, width / w) for h, w in shapes]
    token = hashlib.sha1(repr((seed, height, width, mpp, palette, tile, n_levels)).encode()).hexdigest()[:12]

    def rgb(level, row0, col0, h, w):
        RENDER_COUNTS.add("rgb", level)
        return renderer.rgb(downsamples[level], row0, col0, h, w)

    def semantic(level, row0, col0, h, w):
        RENDER_COUNTS.add("semantic", level)
        return renderer.semantic(downsamples[level], row0, col0, h, w)

    def instances(level, row0, col0, h, w):
        RENDER_COUNTS.add("instances", level)
        return renderer.instances(downsamples[level], row0, col0, h, w)

    # Labels do not depend on the stain: their keys leave it out, so palettes share computed label chunks.
    label_token = hashlib.sha1(repr((seed, height, width, mpp, tile, n_levels)).encode()).hexdigest()[:12]
    levels = tuple(lazy_level(rgb, k, s, tile, np.uint8, 3, f"virtual-rgb-{token}-{k}") for k, s in enumerate(shapes))
    sem = tuple(
        lazy_level(semantic, k, s, tile, np.uint8, None, f"virtual-sem-{label_token}-{k}") for k, s in enumerate(shapes)
    )
    ins = tuple(
        lazy_level(instances, k, s, tile, np.int32, None, f"virtual-ins-{label_token}-{k}")
        for k, s in enumerate(shapes)
    )
    slide = Slide(
        levels=levels,
        path=None,
        format="virtual",
        mpp_yx=(float(mpp), float(mpp)),
        vendor="napari-hrseg (procedural)",
        objective_power=round(10.0 / mpp, 2),
        channel_names=("R", "G", "B"),
        metadata={
            "seed": int(seed), "stain": palette.name, "classes": list(CLASS_NAMES), "palettes": list(STAIN_PALETTES)
        },
        name=f"virtual H&E (seed {seed}, {palette.name})",
    )
    log.debug("virtual slide %s: %d levels, %s", slide.name, n_levels, shapes)
    return VirtualSlide(slide, sem, ins, CLASS_NAMES, CLASS_COLORS, int(seed), palette.name, layout, renderer)
