"""Windows of a slide held in memory with their label pyramids, as training sources.

Training reads thousands of random crops.  From a virtual slide every read renders its chunks again (it has no
chunk cache), and from a file it decodes them again; a window of a few millimetres, rendered or decoded once at
the few pyramid levels training needs, costs tens of megabytes and makes every later crop a memory copy.

`slide_window` reads a level-0 region of a slide and its label levels into numpy arrays and wraps them as an
in-memory `Slide` (same pixel size, levels at exact power-of-two downsamples) inside a `SlideSource`, so crops at
a coarser pixel size come from the *pyramid level*, as inference reads them, not from a resize of level 0.
`virtual_window` does this for a window of the procedural virtual slide; `edge_region` finds a window on the
tissue's edge (glass and tissue both present), `napari_hrseg.virtual.VirtualSlide.border_region` one on the
tumour's border.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import dask.array as da
import numpy as np

from ..errors import TrainingError
from ..geometry import Region
from ..slide import Slide
from .datasets import SlideSource

__all__ = ["slide_window", "virtual_window", "edge_region"]

log = logging.getLogger(__name__)


def slide_window(slide: Slide, semantic, region: Region, *, levels: int = 3, instances=None,
                 key: str | None = None) -> SlideSource:
    """A level-0 ``region`` of a slide and its labels, read once into memory, as a `SlideSource`.

    Parameters
    ----------
    slide : Slide
        RGB slide with a known pixel size and levels at downsamples ``2**k`` (as the virtual slide).
    semantic : sequence of array-like
        Label levels of the slide, finest first, same shapes as the slide's levels.
    region : Region
        Level-0 window; its corners are snapped outwards to a multiple of ``2**(levels - 1)`` so every level
        covers exactly the same area.
    levels : int
        Pyramid levels kept (1 = level 0 only).
    instances : sequence of array-like, optional
        Instance-id levels, same convention.
    key : str, optional
        The source's identity (default: the slide's name and the region).

    Returns
    -------
    SlideSource
        Over an in-memory slide of the window (level-0 pixel size unchanged, name = ``key``).
    """
    if slide.mpp is None:
        raise TrainingError("the slide's pixel size is unknown", subject=slide.name)
    levels = max(1, min(int(levels), slide.level_count, len(semantic)))
    step = 2 ** (levels - 1)
    for k in range(levels):
        dy, dx = slide.downsamples[k]
        if not (math.isclose(dy, 2 ** k, rel_tol=1e-3) and math.isclose(dx, 2 ** k, rel_tol=1e-3)):
            raise TrainingError(f"level {k} has downsample {(dy, dx)}, not {2 ** k}", subject=slide.name,
                                hint="pass levels=1, or a slide whose levels halve")
    r0, c0 = region.row // step * step, region.col // step * step
    r1 = -(-region.end_row // step) * step
    c1 = -(-region.end_col // step) * step
    r1, c1 = min(r1, slide.shape[0] // step * step), min(c1, slide.shape[1] // step * step)
    window = Region(r0, c0, r1 - r0, c1 - c0)
    if window.is_empty:
        raise TrainingError(f"window {region} is outside the slide", subject=slide.name)
    rgb, sem, ins = [], [], []
    for k in range(levels):
        f = 2 ** k
        lr = Region(window.row // f, window.col // f, window.height // f, window.width // f)
        rgb.append(da.from_array(slide.read_level(k, lr), chunks=(512, 512, 3)))
        sem.append(np.asarray(_compute(semantic[k][lr.slices]), dtype=np.uint8))
        if instances is not None:
            ins.append(np.asarray(_compute(instances[k][lr.slices]), dtype=np.int32))
    name = key or f"{slide.name}[{window}]"
    memory = Slide(levels=tuple(rgb), format="memory", mpp_yx=slide.mpp_yx, vendor=slide.vendor,
                   objective_power=slide.objective_power, channel_names=slide.channel_names,
                   metadata={"window": list(window.as_tuple()), "of": slide.name}, name=name)
    return SlideSource(memory, tuple(sem), tuple(ins) if ins else None, key=name)


def _compute(arr):
    return arr.compute(scheduler="threads") if hasattr(arr, "compute") else arr


def virtual_window(seed: int, region: Region | str = "border", *, window: int = 2048, size: int = 16384,
                   mpp: float = 1.0, stain: str = "he", levels: int = 3,
                   cache: str | Path | None = None) -> SlideSource:
    """A window of the virtual slide, rendered once (RGB and semantic classes at ``levels`` levels).

    Parameters
    ----------
    seed : int
        The virtual slide's seed.
    region : Region or {"border", "edge"}
        Level-0 window, or ``"border"`` (the tumour's border, `VirtualSlide.border_region`) or ``"edge"`` (the
        tissue's edge, `edge_region`), ``window`` px square.
    window : int
        Side of the named windows, level-0 px.
    size, mpp, stain
        The virtual slide (see `napari_hrseg.virtual.virtual_slide`).
    levels : int
        Pyramid levels rendered (3: 1, 2 and 4 times the level-0 pixel size).
    cache : path, optional
        Folder of rendered windows (``.npz``), keyed by the arguments and a hash of the virtual slide's source
        code, so a change to the renderer never serves stale pixels.  Rendering a 3072-px window at three levels
        takes tens of seconds; reading it back, a fraction of one.
    """
    from ..virtual import virtual_slide

    v = virtual_slide(seed, size=size, mpp=mpp, stain=stain)
    spec = repr((seed, region, window, size, mpp, v.stain, levels, _renderer_hash()))
    path = Path(cache) / f"virtual-window-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.npz" if cache else None
    if path is not None and path.is_file():
        try:
            return _load_window(path)
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache file is rendered again
            log.warning("ignoring damaged window cache %s (%s)", path, exc)
    if region == "border":
        region = v.border_region(window)
    elif region == "edge":
        region = edge_region(v, window)
    elif not isinstance(region, Region):
        raise TrainingError(f"window {region!r} is not a Region, 'border' or 'edge'", subject="virtual window")
    key = f"virtual-{seed}-{v.stain}@{mpp:g}um[{region}]"
    source = slide_window(v.slide, v.semantic, region, levels=levels, key=key)
    if path is not None:
        _save_window(path, source)
    return source


def _renderer_hash() -> str:
    """Hash of the virtual slide package's source files (what decides its pixels and classes)."""
    from .. import virtual

    h = hashlib.sha1()
    for f in sorted(Path(virtual.__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _save_window(path: Path, source: SlideSource) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    slide = source.slide
    arrays = {f"rgb{k}": np.asarray(lev) for k, lev in enumerate(slide.levels)}
    arrays.update({f"sem{k}": np.asarray(lev) for k, lev in enumerate(source.semantic)})
    meta = json.dumps({"key": source.key, "mpp": list(slide.mpp_yx), "name": slide.name,
                       "metadata": dict(slide.metadata)})
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, meta=np.array(meta), **arrays)
    os.replace(tmp, path)  # never a half-written cache file under the final name


def _load_window(path: Path) -> SlideSource:
    with np.load(path) as d:
        meta = json.loads(str(d["meta"]))
        n = sum(1 for f in d.files if f.startswith("rgb"))
        rgb = tuple(da.from_array(d[f"rgb{k}"], chunks=(512, 512, 3)) for k in range(n))
        sem = tuple(d[f"sem{k}"] for k in range(n))
    slide = Slide(levels=rgb, format="memory", mpp_yx=tuple(meta["mpp"]), metadata=meta["metadata"],
                  name=meta["name"])
    return SlideSource(slide, sem, key=meta["key"])


def edge_region(v, size: int = 2048, *, avoid: Region | None = None) -> Region:
    """A level-0 ``size`` square of a virtual slide on the tissue's edge, away from the tumour.

    Chosen on a coarse level of the semantic pyramid: the square whose glass and tissue fractions are most even,
    with no tumour epithelium, not overlapping ``avoid`` (default: the tumour-border square of the same size).
    """
    from ..virtual.params import GLASS, TUMOUR_EPITHELIUM

    H, W = v.slide.shape[:2]
    level = max(0, min(v.n_levels - 1, int(math.log2(max(1, size // 8)))))
    ds = 2 ** level
    sem = np.asarray(v.semantic[level].compute(scheduler="threads"))
    k = max(1, size // ds)
    avoid = avoid if avoid is not None else v.border_region(size)
    best, best_score = None, -1.0
    for r in range(0, sem.shape[0] - k + 1, max(1, k // 4)):
        for c in range(0, sem.shape[1] - k + 1, max(1, k // 4)):
            block = sem[r:r + k, c:c + k]
            if np.any(block == TUMOUR_EPITHELIUM):
                continue
            cand = Region(r * ds, c * ds, size, size)
            if not cand.intersect(avoid).is_empty:
                continue
            glass = float(np.mean(block == GLASS))
            score = min(glass, 1 - glass)
            if score > best_score:
                best, best_score = cand, score
    if best is None:
        raise TrainingError("no square on the tissue's edge away from the tumour", subject=v.slide.name,
                            hint="use a larger slide")
    return Region(min(best.row, H - size), min(best.col, W - size), size, size)
