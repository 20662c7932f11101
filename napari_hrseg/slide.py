"""`Slide`: a whole-slide image as a lazy pyramid of dask arrays, and `open_slide`, which picks a reader.

A `Slide` never holds pixels: its levels are dask arrays whose chunks read (and decode) tiles from the file
when computed.  Opening a slide reads metadata only, so a 100,000-pixel-wide slide opens in milliseconds.

Conventions
-----------
- Levels are finest first, each ``(Y, X, C)`` (channels last, even for one channel).
- ``downsamples[i] = (dy, dx)`` are exact per-axis ratios ``level0_shape / level_shape`` (see `geometry`).
- ``mpp_yx`` is the physical pixel size of level 0 in micrometres, ``(y, x)``, or ``None`` when the file does
  not state it (the CLI's ``--mpp`` fills it in).
- Conversions done on open (channel-first to channel-last, RGBA to RGB, ...) are listed in ``conversions`` so a
  user can always find out what they are looking at.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import dask.array as da
import numpy as np

from .errors import CorruptSlideError, RegionError, SlideError, UnsupportedFormatError
from .geometry import Downsample, Region

__all__ = ["Slide", "open_slide", "register_reader", "SlideReader", "registered_readers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Slide:
    """A lazily read multi-resolution image.

    Parameters
    ----------
    levels : tuple of dask.array.Array
        Pyramid levels, finest first, each of shape ``(Y, X, C)``.  All levels share dtype and ``C``.
    path : Path or None
        Where the slide came from (``None`` for generated slides).
    format : str
        Short container name, e.g. ``"svs"``, ``"ome-tiff"``, ``"ome-zarr-0.5"``, ``"dicom"``, ``"virtual"``.
    mpp_yx : (float, float) or None
        Level-0 pixel size in micrometres per pixel, ``(y, x)``.
    vendor : str or None
        Scanner vendor or writer (``"aperio"``, ``"hamamatsu"``, ``"perkinelmer"``, ...).
    objective_power : float or None
        Nominal objective magnification of level 0 (e.g. 20.0, 40.0).
    channel_names : tuple of str
        One name per channel (``("R", "G", "B")`` for brightfield RGB).
    conversions : tuple of str
        Human-readable notes on every conversion applied when opening.
    metadata : Mapping
        Vendor properties as read from the file (strings and numbers only).
    name : str
        Display name (file stem by default).
    closers : tuple of callables
        Called by :meth:`close` to release file handles.
    region_readers : tuple
        Optional, one per level (or ``None``): an object with ``read_region(row0, row1, col0, col1) -> ndarray``
        giving exactly the pixels of the dask level, read without building a dask graph.  :meth:`read_level` uses
        it when present, because a graph per small read costs more than decoding the tiles (see
        ``benchmarks/bench_io.py``); a slide without one (e.g. a virtual slide) is read through its dask levels.
    """

    levels: tuple[da.Array, ...]
    path: Path | None = None
    format: str = "unknown"
    mpp_yx: tuple[float, float] | None = None
    vendor: str | None = None
    objective_power: float | None = None
    channel_names: tuple[str, ...] = ()
    conversions: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    closers: tuple[Callable[[], None], ...] = ()
    region_readers: tuple[Any, ...] = ()

    def __post_init__(self):
        if not self.levels:
            raise SlideError("the pyramid has no levels", subject=self.path or self.name)
        levels = tuple(self.levels)
        object.__setattr__(self, "levels", levels)
        first = levels[0]
        for i, lev in enumerate(levels):
            if lev.ndim != 3:
                raise SlideError(f"level {i} has shape {lev.shape}; expected (Y, X, C)", subject=self.path or self.name)
            if lev.shape[2] != first.shape[2] or lev.dtype != first.dtype:
                raise SlideError(
                    f"level {i} has {lev.shape[2]} channels of {lev.dtype}, level 0 has {first.shape[2]} of {first.dtype}",
                    subject=self.path or self.name,
                )
        if not self.channel_names:
            default = ("R", "G", "B") if first.shape[2] == 3 else tuple(f"C{i}" for i in range(first.shape[2]))
            object.__setattr__(self, "channel_names", default)
        if not self.name:
            object.__setattr__(self, "name", _display_name(self.path) if self.path else self.format)

    # ------------------------------------------------------------------ shape and scale
    @property
    def shape(self) -> tuple[int, int, int]:
        """Level-0 shape ``(Y, X, C)``."""
        return tuple(int(s) for s in self.levels[0].shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def n_channels(self) -> int:
        return self.shape[2]

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(Y, X)`` of every level, finest first."""
        return tuple((int(lev.shape[0]), int(lev.shape[1])) for lev in self.levels)

    @property
    def downsamples(self) -> tuple[Downsample, ...]:
        """Exact per-axis ``(dy, dx)`` of every level relative to level 0."""
        h0, w0 = self.level_shapes[0]
        return tuple((h0 / h, w0 / w) for h, w in self.level_shapes)

    @property
    def mpp(self) -> float | None:
        """Level-0 pixel size in µm (mean of the two axes), or ``None`` if unknown."""
        if self.mpp_yx is None:
            return None
        return float(sum(self.mpp_yx) / 2)

    def level_mpp(self, level: int) -> float | None:
        """Pixel size of ``level`` in µm (mean of both axes), or ``None`` if the slide's is unknown."""
        if self.mpp_yx is None:
            return None
        dy, dx = self.downsamples[level]
        return float((self.mpp_yx[0] * dy + self.mpp_yx[1] * dx) / 2)

    @property
    def is_rgb(self) -> bool:
        """True for 3-channel ``uint8`` brightfield images (what napari shows as RGB).

        A 3-channel multiplex image with named channels (QPTIFF ``DAPI, FITC, Cy3``) is not RGB: its channels are
        shown as separate layers.
        """
        names = tuple(n.strip().lower() for n in self.channel_names)
        return self.n_channels == 3 and self.dtype == np.uint8 and names in (("r", "g", "b"), ("red", "green", "blue"))

    @property
    def background_value(self) -> int | float:
        """Value used to pad reads outside the slide: white glass for brightfield RGB, 0 otherwise."""
        return 255 if self.is_rgb else 0

    def level_for_downsample(self, downsample: float) -> int:
        """Finest level whose (mean) downsample is <= ``downsample`` (within 1 %), like OpenSlide's best level."""
        best = 0
        for i, (dy, dx) in enumerate(self.downsamples):
            if (dy + dx) / 2 <= downsample * 1.01:
                best = i
        return best

    def level_for_mpp(self, mpp: float) -> int:
        """Finest level whose pixel size is <= ``mpp`` µm (within 1 %); needs a known pixel size."""
        if self.mpp is None:
            raise SlideError(
                "the slide's pixel size is unknown", subject=self.path or self.name, hint="pass --mpp (µm per pixel)"
            )
        return self.level_for_downsample(mpp / self.mpp)

    def with_mpp(self, mpp: float | tuple[float, float]) -> "Slide":
        """A copy that states a pixel size (for files that do not, e.g. PNG); ``mpp`` in µm per pixel."""
        mpp_yx = (float(mpp), float(mpp)) if np.isscalar(mpp) else (float(mpp[0]), float(mpp[1]))  # type: ignore[index]
        if not all(math.isfinite(v) and v > 0 for v in mpp_yx):
            raise SlideError(f"pixel size {mpp!r} must be a positive number of µm", subject=self.path or self.name)
        return replace(self, mpp_yx=mpp_yx)

    # ------------------------------------------------------------------ reading
    def read(self, region: Region, level: int = 0, *, pad: bool = False, fill: float | None = None) -> np.ndarray:
        """Read the pixels of ``level`` that cover a level-0 region.

        Parameters
        ----------
        region : Region
            Level-0 pixels.  It is mapped to ``level`` by :meth:`Region.to_level` (outward rounding).
        level : int
            Pyramid level to read from.
        pad : bool
            If False, the part outside the slide is clipped away (the result may be smaller than the region);
            if True, the result has exactly the level region's shape and the outside is ``fill``.
        fill : float, optional
            Padding value; default :attr:`background_value`.

        Returns
        -------
        numpy.ndarray
            ``(h, w, C)`` in the slide's dtype, where ``(h, w)`` is the level region's (clipped) size.

        Raises
        ------
        RegionError
            If the region does not overlap the slide at all and ``pad`` is False, or is empty.
        """
        return self.read_level(level, region.to_level(self.downsamples[self._check_level(level)]), pad=pad, fill=fill)

    def read_level(self, level: int, level_region: Region, *, pad: bool = False, fill: float | None = None) -> np.ndarray:
        """Like :meth:`read`, with ``level_region`` given in ``level``'s own pixels."""
        arr = self.levels[self._check_level(level)]
        if level_region.is_empty:
            raise RegionError(f"region {level_region} is empty", subject=self.name)
        inside = level_region.clip(arr.shape)
        if not pad:
            if inside.is_empty:
                raise RegionError(
                    f"region {level_region} (level {level} pixels) lies outside the level of shape {arr.shape[:2]}",
                    subject=self.name,
                    hint="choose a region that overlaps the slide",
                )
            return self._read_inside(level, inside)
        out = np.full(level_region.shape + (arr.shape[2],), self.background_value if fill is None else fill, dtype=arr.dtype)
        if not inside.is_empty:
            dst = inside.relative_to(level_region)
            out[dst.slices] = self._read_inside(level, inside)
        return out

    def _read_inside(self, level: int, inside: Region) -> np.ndarray:
        """Pixels of a region inside ``level``: the reader's direct path when it has one, else the dask level."""
        reader = self.region_readers[level] if level < len(self.region_readers) else None
        if reader is not None:
            return np.asarray(reader.read_region(inside.row, inside.end_row, inside.col, inside.end_col))
        # callbacks=(): dask's global callbacks are left alone.  napari switches on an opportunistic dask cache
        # (a global callback) while it loads tiles; a worker computing the same chunk at that moment made the
        # cache's post-task hook fail with KeyError, and taking the globals (dask's default) races with napari's
        # thread.  Reuse of decoded chunks comes from the readers' own chunk cache instead.
        return np.asarray(self.levels[level][inside.slices].compute(scheduler="threads", callbacks=()))

    def _check_level(self, level: int) -> int:
        if not 0 <= level < len(self.levels):
            raise RegionError(f"level {level} does not exist; the slide has levels 0..{len(self.levels) - 1}", subject=self.name)
        return level

    # ------------------------------------------------------------------ identity and napari
    def fingerprint(self) -> str:
        """A short hash that identifies this slide's content (shapes, dtype and the coarsest level's pixels).

        Used to refuse a label store or export made for another slide.  Reads only the coarsest level.
        """
        h = hashlib.sha256()
        h.update(repr((self.level_shapes[0], str(self.dtype), self.n_channels)).encode())
        coarse = self.levels[-1]
        # A coarsest level larger than 1024 px would make the fingerprint slow; hash a strided view instead.
        step = max(1, math.ceil(max(coarse.shape[:2]) / 1024))
        h.update(np.ascontiguousarray(coarse[::step, ::step].compute(scheduler="threads", callbacks=())).tobytes())
        return h.hexdigest()[:16]

    def as_layer_data(self) -> list[da.Array]:
        """The levels as napari's multiscale data (a list of arrays, finest first)."""
        return list(self.levels)

    def layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``viewer.add_image(self.as_layer_data(), **kwargs)``.

        The layer is in level-0 pixel units (no physical scale), so that every layer napari-hrseg creates aligns
        with it; the pixel size travels in the layer's metadata.
        """
        kwargs: dict[str, Any] = {
            "name": self.name,
            # always a list of levels (as_layer_data), so always multiscale: napari takes a one-level list as
            # a list unless told it is multiscale
            "multiscale": True,
            "rgb": self.is_rgb,
            "metadata": {"hrseg_slide": self, "mpp_yx": self.mpp_yx, "path": str(self.path) if self.path else None},
        }
        if not self.is_rgb:
            kwargs["channel_axis"] = 2
            kwargs["name"] = [f"{self.name} [{c}]" for c in self.channel_names]
            kwargs["blending"] = "additive"
            # readers store the file's display colours as "#rrggbb" (QPTIFF, OME); napari takes hex colormaps
            colors = self.metadata.get("channel_colors")
            if colors and len(colors) == self.n_channels:
                kwargs["colormap"] = list(colors)
        return kwargs

    def close(self) -> None:
        """Release file handles (reads after closing may reopen lazily or fail, depending on the reader)."""
        for closer in self.closers:
            try:
                closer()
            except Exception:  # closing must never raise into a viewer's shutdown
                log.debug("closing %s failed", self.name, exc_info=True)

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        """Multi-line human summary (what ``napari-hrseg info`` prints)."""
        lines = [
            f"path:        {self.path}" if self.path else f"name:        {self.name}",
            f"format:      {self.format}",
            f"vendor:      {self.vendor or 'unknown'}",
            f"objective:   {self.objective_power:g}x" if self.objective_power else "objective:   unknown",
            (f"pixel size:  {self.mpp_yx[0]:.4f} x {self.mpp_yx[1]:.4f} µm (y, x)" if self.mpp_yx else "pixel size:  unknown (pass --mpp)"),
            f"dtype:       {self.dtype}",
            f"channels:    {self.n_channels} ({', '.join(self.channel_names)})",
            f"levels:      {self.level_count}",
        ]
        for i, (lev, (dy, dx)) in enumerate(zip(self.levels, self.downsamples)):
            chunks = "x".join(str(c[0]) for c in lev.chunks[:2])
            grid = "x".join(str(len(c)) for c in lev.chunks[:2])
            mpp = self.level_mpp(i)
            size = f"  {mpp:.4g} µm/px" if mpp else ""
            lines.append(
                f"  {i}: {lev.shape[0]} x {lev.shape[1]} px  downsample {dy:.4f}, {dx:.4f}{size}  chunks {chunks} ({grid})"
            )
        for note in self.conversions:
            lines.append(f"conversion:  {note}")
        return "\n".join(lines)


def _display_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix else name


# ---------------------------------------------------------------------- reader registry
class SlideReader(Protocol):
    """A container family's reader (one module under ``napari_hrseg.io``).

    ``sniff`` must be cheap (an extension, a magic number, a small metadata file) and must not raise;
    ``open`` reads metadata only and raises a `SlideError` subclass for anything wrong with the file.
    """

    name: str

    def sniff(self, path: Path) -> bool: ...

    def open(self, path: Path, **options: Any) -> Slide: ...


_READERS: list[SlideReader] = []


def register_reader(reader: SlideReader) -> SlideReader:
    """Add a reader; readers are tried in registration order."""
    _READERS.append(reader)
    return reader


def registered_readers() -> tuple[SlideReader, ...]:
    _ensure_builtin_readers()
    return tuple(_READERS)


def _ensure_builtin_readers() -> None:
    # Importing the io package registers the built-in readers (kept lazy so `import napari_hrseg` stays fast).
    from . import io  # noqa: F401


def open_slide(path: str | Path, *, mpp: float | None = None, **options: Any) -> Slide:
    """Open a slide or image lazily; nothing but metadata is read.

    Parameters
    ----------
    path : str or Path
        A file (SVS, TIFF, OME-TIFF, NDPI, QPTIFF, DICOM, PNG, JPEG) or a directory (OME-Zarr, zarr, DICOM series).
    mpp : float, optional
        Level-0 pixel size in µm to use when the file does not state one (overrides nothing the file states
        unless the file's value is missing).
    **options
        Passed to the reader (e.g. ``series=`` for TIFF files holding several images).

    Returns
    -------
    Slide

    Raises
    ------
    SlideError
        With the path, the problem and what to do: missing path, empty file, unsupported format, corrupt data.
    """
    _ensure_builtin_readers()
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideError("no such file or directory", subject=p, hint="check the path and that the disk is mounted")
    if p.is_file() and p.stat().st_size == 0:
        raise CorruptSlideError("the file is empty (0 bytes)", subject=p, hint="copy or export the slide again")
    for reader in _READERS:
        try:
            claimed = reader.sniff(p)
        except Exception:  # a sniffer bug must not hide other readers
            log.debug("reader %s failed to sniff %s", reader.name, p, exc_info=True)
            claimed = False
        if claimed:
            slide = reader.open(p, **options)
            if mpp is not None and slide.mpp_yx is None:
                note = f"pixel size {mpp:g} µm given by the caller (the file states none)"
                slide = replace(slide.with_mpp(mpp), conversions=slide.conversions + (note,))
            return slide
    names = ", ".join(r.name for r in _READERS)
    raise UnsupportedFormatError(
        "not an image format napari-hrseg can read",
        subject=p,
        hint=f"supported: {names}; convert other formats to OME-TIFF or OME-Zarr (e.g. with bioformats2raw)",
    )

