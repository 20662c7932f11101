"""Single-level images: PNG, JPEG, and what Pillow reads (BMP, GIF, WebP).

Opening reads the header only (PNG chunk headers up to the image data; Pillow's lazy open for the others).  These
formats have no random access, so the first read decodes the whole image once and keeps it (a thread-safe
memo); level 0 is then served in 512-px chunks, and coarser levels are box averages computed on demand
(`extend_pyramid`), never at open.

Conversions (see `_convert`): RGBA and grey+alpha are composited over white, palette images expanded to RGB,
single-channel images become ``(Y, X, 1)``, 16-bit PNGs stay ``uint16``.  A PNG ``pHYs`` chunk in metres gives
the pixel size when it is a plausible microscope value.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CorruptSlideError, UnsupportedFormatError
from ..slide import Slide
from . import _convert
from ._source import ChunkSource, build_levels, call_once, file_token
from ._tiff_meta import PLAUSIBLE_MPP

__all__ = ["ImageReader", "WholeImageSource"]

log = logging.getLogger(__name__)

_PNG = b"\x89PNG\r\n\x1a\n"
_MAGIC = {
    "png": (_PNG,),
    "jpeg": (b"\xff\xd8\xff",),
    "bmp": (b"BM",),
    "gif": (b"GIF87a", b"GIF89a"),
}
_CHUNK = 512


def _kind(head: bytes) -> str | None:
    for kind, magics in _MAGIC.items():
        if any(head.startswith(m) for m in magics):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


class WholeImageSource(ChunkSource):
    """A whole-file image decoded once on first use, then served in chunks."""

    cacheable = False  # the decoded image is kept whole; caching its slices would hold it twice

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: np.dtype, decode: Callable[[], np.ndarray]):
        self.subject = str(path)
        self.path = path
        self.level = 0
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.chunk_shape = (min(_CHUNK, shape[0]), min(_CHUNK, shape[1]))
        self._decode_all = decode
        self._pixels = call_once(self._checked_decode)

    def _checked_decode(self) -> np.ndarray:
        pixels = self._decode_all()
        if pixels.shape != self.shape or pixels.dtype != self.dtype:
            raise CorruptSlideError(
                f"decoded image is {pixels.shape} {pixels.dtype} but its header says {self.shape} {self.dtype}",
                subject=self.path,
            )
        return pixels

    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        r0, r1, c0, c1 = self.chunk_bounds(iy, ix)
        return self._pixels()[r0:r1, c0:c1]

    def read_region(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        if not (0 <= row0 <= row1 <= self.shape[0] and 0 <= col0 <= col1 <= self.shape[1]):
            raise ValueError(f"region rows {row0}:{row1}, cols {col0}:{col1} outside image of shape {self.shape}")
        try:
            return self._pixels()[row0:row1, col0:col1].copy()
        except CorruptSlideError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(self.path, exc) from exc

    def __reduce__(self):
        return (_reopen, (str(self.path),))


def _reopen(path: str) -> WholeImageSource:
    return _plan(Path(path))[0]


def _corrupt(path: Path, exc: BaseException) -> CorruptSlideError:
    return CorruptSlideError(
        f"the image cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})",
        subject=path,
        hint="the file is damaged or incompletely copied; copy or export it again",
    )


class ImageReader:
    """Reader for single-level image files (see the module docstring)."""

    name = "image"
    extensions = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

    def sniff(self, path: Path) -> bool:
        try:
            if not path.is_file():
                return False
            with open(path, "rb") as fh:
                return _kind(fh.read(16)) is not None
        except OSError:
            return False

    def open(self, path: Path, **options: Any) -> Slide:
        if options:
            raise UnsupportedFormatError(
                f"unknown option(s) {', '.join(sorted(options))} for a {path.suffix or 'plain'} image", subject=path
            )
        source, kind, conversions, mpp = _plan(path)
        token = file_token(path)
        levels, readers, note = build_levels([source], f"hrseg-{kind}-{token}")
        if note:
            conversions.append(note)
        return Slide(
            levels=tuple(levels),
            path=path,
            format=kind,
            mpp_yx=mpp,
            conversions=tuple(conversions),
            metadata={"image.format": kind},
            region_readers=tuple(readers),
        )


def _plan(path: Path) -> tuple[WholeImageSource, str, list[str], tuple[float, float] | None]:
    """Header-only: shape, dtype, the conversions decoding will apply, and the pixel size."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    kind = _kind(head)
    if kind is None:
        raise UnsupportedFormatError("not a PNG, JPEG, BMP, GIF or WebP image", subject=path)
    if kind == "png":
        return _plan_png(path)
    return _plan_pillow(path, kind)


def _png_header(path: Path) -> tuple[int, int, int, int, bool, tuple[float, float] | None]:
    """``(height, width, bit_depth, colour_type, has_trns, mpp)`` from the chunks before the image data."""
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG:
            raise UnsupportedFormatError("not a PNG file", subject=path)
        ihdr = None
        trns = False
        mpp = None
        for _ in range(10_000):
            header = fh.read(8)
            if len(header) < 8:
                break
            length, ctype = struct.unpack(">I4s", header)
            if ctype == b"IDAT" or ctype == b"IEND":
                break
            body = fh.read(length)
            fh.seek(4, 1)  # CRC
            if ctype == b"IHDR":
                ihdr = struct.unpack(">IIBBBBB", body[:13])
            elif ctype == b"tRNS":
                trns = True
            elif ctype == b"pHYs" and len(body) >= 9:
                ppx, ppy, unit = struct.unpack(">IIB", body[:9])
                if unit == 1 and ppx and ppy:  # pixels per metre
                    cand = (1e6 / ppy, 1e6 / ppx)
                    if all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in cand):
                        mpp = cand
    if ihdr is None:
        raise CorruptSlideError("the PNG has no IHDR header", subject=path, hint="the file is damaged; export it again")
    width, height, depth, colour = ihdr[0], ihdr[1], ihdr[2], ihdr[3]
    return height, width, depth, colour, trns, mpp


def _plan_png(path: Path) -> tuple[WholeImageSource, str, list[str], tuple[float, float] | None]:
    height, width, depth, colour, trns, mpp = _png_header(path)
    if height == 0 or width == 0:
        raise CorruptSlideError("the PNG has zero width or height", subject=path)
    dtype = np.dtype(np.uint16 if depth == 16 else np.uint8)
    channels = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}.get(colour)
    if channels is None:
        raise CorruptSlideError(f"unknown PNG colour type {colour}", subject=path)
    conversions: list[str] = []
    if colour in (4, 6) or (trns and colour in (0, 2, 3)):
        conversions.append(_convert.NOTES["rgba"])
    if colour == 3:
        conversions.append(_convert.NOTES["palette"])
    if channels == 1:
        conversions.append(_convert.NOTES["single"])
    if dtype == np.uint16:
        conversions.append("16-bit PNG kept as uint16 (no rescaling)")

    def decode() -> np.ndarray:
        import imagecodecs

        try:
            pixels = imagecodecs.png_decode(path.read_bytes())
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(path, exc) from exc
        return _finish(pixels)

    return WholeImageSource(path, (height, width, channels), dtype, decode), "png", conversions, mpp


def _finish(pixels: np.ndarray) -> np.ndarray:
    """Decoded pixels -> ``(Y, X, C)`` with alpha composited over white."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] in (2, 4):
        grey = pixels.shape[2] == 2
        rgba = np.concatenate([pixels[..., :1]] * 3 + [pixels[..., 1:]], axis=2) if grey else pixels
        rgb = _convert.rgba_to_rgb(rgba)
        pixels = rgb[..., :1] if grey else rgb
    return np.ascontiguousarray(pixels)


def _plan_pillow(path: Path, kind: str) -> tuple[WholeImageSource, str, list[str], tuple[float, float] | None]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
            info = dict(im.info)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptSlideError(
            f"the {kind.upper()} header cannot be read ({type(exc).__name__}: {str(exc)[:160]})",
            subject=path,
            hint="the file is damaged or not really an image; export it again",
        ) from exc
    conversions: list[str] = []
    if mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F"):
        target = {"1": "L"}.get(mode, mode)
        channels = 1
        conversions.append(_convert.NOTES["single"])
    elif mode in ("LA", "La"):
        target, channels = "LA", 1
        conversions += [_convert.NOTES["rgba"], _convert.NOTES["single"]]
    elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in info):
        target, channels = "RGBA", 3
        conversions.append(_convert.NOTES["rgba"])
    else:  # RGB, P, CMYK, YCbCr, ...
        target, channels = "RGB", 3
        if mode not in ("RGB",):
            conversions.append(f"{mode} -> RGB")
    dtype = {"I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": np.float32}.get(
        target, np.uint8
    )
    if np.dtype(dtype) != np.uint8:
        conversions.append(f"{np.dtype(dtype)} data kept as {np.dtype(dtype)} (no rescaling)")

    def decode() -> np.ndarray:
        try:
            if kind == "jpeg" and target in ("RGB", "L") and mode == target:
                import imagecodecs

                return _finish(imagecodecs.jpeg8_decode(path.read_bytes()))
            with Image.open(path) as im:
                im = im.convert(target) if im.mode != target else im
                return _finish(np.asarray(im).astype(dtype, copy=False))
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(path, exc) from exc

    mpp = None
    dpi = info.get("dpi")
    if isinstance(dpi, tuple) and len(dpi) == 2 and all(dpi):
        cand = (25400.0 / float(dpi[1]), 25400.0 / float(dpi[0]))
        if all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in cand):
            mpp = cand
    return WholeImageSource(path, (height, width, channels), np.dtype(dtype), decode), kind, conversions, mpp
