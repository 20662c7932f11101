"""Writers of real slide files for the reader tests: the byte layouts scanners and converters produce.

Each writer puts real codestreams in a real container with the vendor's tags, so the file is what the reader
meets in the wild (checked during development against OpenSlide 4.0.1, which reads the SVS and NDPI files below
as ``aperio`` and ``hamamatsu`` slides with the same level sizes and pixels):

- `write_svs`: Aperio SVS: tiled baseline, a stripped thumbnail as the second page, tiled reduced levels, an
  LZW label (NewSubfileType 1) and a JPEG macro (NewSubfileType 9), each with an Aperio ImageDescription.  Tiles
  are JPEG (compression 7), or JPEG 2000 codestreams with compression 33003 (YCbCr components without the
  codestream colour transform, as Matrox-based scanners write) or 33005 (RGB with the irreversible colour
  transform, as Kakadu-based scanners write).
- `write_ndpi`: Hamamatsu NDPI: every level is one JPEG strip with restart markers, with the NDPI private tags
  (65420 file format, 65421 magnification, 65422-65424 offsets, 65426 McuStarts pointing at each restart
  interval, 65427/65442/65449 label, serial and properties), resolution in pixels per centimetre, and a macro
  image with magnification -1.
- `write_pyramid_tiff`: a generic tiled pyramid with reduced-resolution subfiles (libvips style).

The pixels are real tissue (a crop of OpenSlide's CMU-1 test slide in ``../shared/realdata``), except for
`coordinate_image`, whose pixels encode their own level-0 coordinates to test level geometry exactly.
"""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np

REALDATA_SVS = "aperio-svs/CMU-1-Small-Region.svs"

_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"


def tissue(realdata: Path, height: int, width: int, row: int = 400, col: int = 0) -> np.ndarray:
    """A real H&E crop ``(height, width, 3)`` uint8 from the CMU-1 region (2967 x 2220 px)."""
    import tifffile

    image = tifffile.imread(realdata / REALDATA_SVS)
    crop = image[row : row + height, col : col + width]
    if crop.shape[:2] != (height, width):
        raise ValueError(f"crop {height}x{width} at {row},{col} does not fit the {image.shape} source")
    return np.ascontiguousarray(crop)


def downsample_mean(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area average of ``image`` onto ``shape`` (any ratio, as scanners' pyramids are), same dtype."""
    from skimage.transform import resize

    out = resize(image.astype(np.float32), shape + image.shape[2:], order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, np.iinfo(image.dtype).max).astype(image.dtype)


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range BT.601 RGB -> YCbCr uint8 (what Aperio 33003 codestreams hold)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- Aperio SVS
def write_svs(
    path: Path,
    image: np.ndarray,
    *,
    compression: str | int = "jpeg",
    tile: int = 240,
    level_shapes: list[tuple[int, int]] | None = None,
    mpp: float = 0.499,
    appmag: int = 20,
) -> list[np.ndarray]:
    """Write an Aperio SVS; returns the pixel levels written (before lossy compression).

    Parameters
    ----------
    compression : "jpeg", 33003 or 33005
    level_shapes : list of (height, width), optional
        Reduced levels after the baseline (default: floor halves until < 256 px, like 4443 -> 2221).
    """
    import tifffile

    h, w = image.shape[:2]
    if level_shapes is None:
        level_shapes = []
        lh, lw = h // 2, w // 2
        while min(lh, lw) >= 256:
            level_shapes.append((lh, lw))
            lh, lw = lh // 2, lw // 2
    levels = [image] + [downsample_mean(image, s) for s in level_shapes]
    if compression == "jpeg":
        kind, codec, args = "JPEG/RGB Q=70", "jpeg", {"level": 70}
    elif compression == 33003:
        kind, codec, args = "J2K/YUV16 Q=70", 33003, {"level": 45, "mct": False}
    elif compression == 33005:
        kind, codec, args = "J2K/KDU Q=70", 33005, {"level": 45}
    else:
        raise ValueError(f"unknown compression {compression!r}")
    props = (
        f"|AppMag = {appmag}|StripeWidth = 2040|ScanScope ID = SS1234|Filename = test|Date = 01/02/26"
        f"|Time = 10:00:00|MPP = {mpp:.4f}|Left = 25.691574|Top = 23.449873"
    )

    def encode(pixels: np.ndarray) -> np.ndarray:
        return rgb_to_ycbcr(pixels) if compression == 33003 else pixels

    thumb_shape = (max(1, h * 256 // max(h, w)), max(1, w * 256 // max(h, w)))
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        base = f"{_APERIO_HEADER}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) {kind}{props}"
        tw.write(
            encode(levels[0]),
            tile=(tile, tile),
            compression=codec,
            compressionargs=args,
            photometric="rgb",
            description=base,
            metadata=None,
        )
        thumb = downsample_mean(image, thumb_shape)
        tw.write(
            thumb,
            compression="jpeg",
            compressionargs={"level": 80},
            photometric="rgb",
            metadata=None,
            description=f"{_APERIO_HEADER}{w}x{h} -> {thumb_shape[1]}x{thumb_shape[0]} - {props}",
            rowsperstrip=16,
        )
        for lev in levels[1:]:
            lh, lw = lev.shape[:2]
            desc = f"{_APERIO_HEADER}{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) -> {lw}x{lh} {kind}{props}"
            tw.write(
                encode(lev),
                tile=(tile, tile),
                compression=codec,
                compressionargs=args,
                photometric="rgb",
                description=desc,
                metadata=None,
            )
        label = np.full((120, 100, 3), 230, np.uint8)
        label[40:80, 20:80] = (30, 30, 160)
        tw.write(
            label,
            compression="lzw",
            photometric="rgb",
            subfiletype=1,
            metadata=None,
            description=f"{_APERIO_HEADER}label 100x120",
        )
        macro = downsample_mean(image, (100, max(1, 100 * w // h)))
        tw.write(
            macro,
            compression="jpeg",
            photometric="rgb",
            subfiletype=9,
            metadata=None,
            description=f"{_APERIO_HEADER}macro {macro.shape[1]}x{macro.shape[0]}",
        )
    return levels


# ---------------------------------------------------------------------- Hamamatsu NDPI
def _jpeg_with_restarts(pixels: np.ndarray, mcus_per_interval: int, quality: int = 90) -> tuple[bytes, list[int]]:
    """JPEG (YCbCr 4:2:2, 16 x 8 px MCUs) with a restart interval; returns the stream and the McuStarts offsets.

    4:2:2 like NDP.scan: OpenSlide decodes one restart interval as an image of one MCU row, which its libjpeg
    cannot do for 4:2:0 (vertical chroma upsampling needs the next row).
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, restart_marker_blocks=mcus_per_interval, subsampling=1)
    data = buf.getvalue()
    sos = data.index(b"\xff\xda")
    sos_len = struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    starts = [sos + 2 + sos_len]
    i = starts[0]
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            break
        marker = data[i + 1]
        if 0xD0 <= marker <= 0xD7:
            starts.append(i + 2)
        i += 2 if marker != 0xFF else 1
    return data, starts


def write_ndpi(
    path: Path, image: np.ndarray, *, magnification: float = 20.0, mpp: float = 0.4566, n_levels: int = 3
) -> list[np.ndarray]:
    """Write a Hamamatsu NDPI (see module docstring); levels are 1/4 per step like NDP.scan's.

    Every level must be a whole number of 8 x 128 px restart intervals (NDP.scan pads its scans the same way).
    """
    from PIL import Image

    levels = [image]
    for _ in range(n_levels - 1):
        ph, pw = levels[-1].shape[:2]
        levels.append(downsample_mean(levels[-1], (ph // 4, pw // 4)))
    interval = 8  # MCUs per restart interval; 4:2:2 MCUs are 16 x 8 -> 128 x 8 px virtual tiles
    for lev in levels:
        if lev.shape[1] % (16 * interval) or lev.shape[0] % 8:
            raise ValueError(f"level {lev.shape[:2]} is not a whole number of 8 x 128 restart intervals")
    props = "Objective.Lens.Magnificant=20\r\nNDP.S/N=000000\r\nNDP.ScanMode=Brightfield\r\n"
    pages = []
    for i, lev in enumerate(levels):
        data, starts = _jpeg_with_restarts(lev, interval)
        ppcm = 1e4 / (mpp * 4**i)
        pages.append((lev.shape, data, magnification / 4**i, ppcm, [(65426, 4, starts)]))
    macro = downsample_mean(image, (128, max(16, 128 * image.shape[1] // image.shape[0])))
    buf = io.BytesIO()
    Image.fromarray(macro).save(buf, "JPEG", quality=80)
    pages.append((macro.shape, buf.getvalue(), -1.0, 1e4 / (mpp * image.shape[0] / 128), []))
    _write_ndpi_layout(path, pages, props)
    return levels


def _write_ndpi_layout(path: Path, pages: list, props: str) -> None:
    """Write NDPI's TIFF variant: an 8-byte first-IFD offset in the header, and after each IFD's 12-byte
    entries an 8-byte next-IFD offset followed by one 4-byte high word per entry (all zero below 4 GiB)."""
    out = bytearray(b"II" + struct.pack("<H", 42) + struct.pack("<Q", 0))
    ifd_offsets: list[int] = []
    next_pointer_at: list[int] = []

    def ascii(text: str) -> bytes:
        return text.encode("ascii") + b"\0"

    for shape, data, lens, ppcm, extra in pages:
        height, width = shape[:2]
        strip_offset = len(out)
        out += data
        if len(out) % 2:
            out += b"\0"
        res = (int(round(ppcm * 1000)), 1000)
        tags: list[tuple[int, int, int, bytes]] = []  # code, type, count, value bytes

        def add(code: int, typ: int, values, tags=tags) -> None:
            """Append a tag: ``typ`` 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL (pairs), 9 SLONG, 11 FLOAT."""
            if typ == 2:
                raw = ascii(values)
                tags.append((code, typ, len(raw), raw))
                return
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            flat = [v for pair in values for v in pair] if typ == 5 else values
            code_char = {3: "H", 4: "I", 5: "I", 9: "i", 11: "f"}[typ]
            tags.append((code, typ, len(values), struct.pack("<" + code_char * len(flat), *flat)))

        add(256, 4, width)
        add(257, 4, height)
        add(258, 3, (8, 8, 8))
        add(259, 3, 7)
        add(262, 3, 6)
        add(271, 2, "Hamamatsu")
        add(272, 2, "C9600-12")
        add(273, 4, strip_offset)
        add(277, 3, 3)
        add(278, 4, height)
        add(279, 4, len(data))
        add(282, 5, [res])
        add(283, 5, [res])
        add(296, 3, 3)  # centimetre
        add(305, 2, "NDP.scan 2.5.86")
        add(306, 2, "2026:01:02 10:00:00")
        add(530, 3, (2, 1))  # 4:2:2
        add(65420, 4, 1)  # FileFormat
        add(65421, 11, lens)  # SourceLens: magnification of this page, -1 for the macro image
        add(65422, 9, -1_250_000)  # X offset from slide centre, nm
        add(65423, 9, 840_000)
        add(65424, 9, 0)  # focal plane, nm
        for code, typ, values in extra:
            add(code, typ, values)
        add(65427, 2, "hrseg test slide")
        add(65442, 2, "000000")
        add(65449, 2, props)
        tags.sort(key=lambda t: t[0])
        # external values first, then the IFD
        entries = []
        for code, typ, count, raw in tags:
            if len(raw) <= 4:
                entries.append((code, typ, count, raw.ljust(4, b"\0")))
            else:
                where = len(out)
                out += raw + (b"\0" if len(raw) % 2 else b"")
                entries.append((code, typ, count, struct.pack("<I", where)))
        ifd_offsets.append(len(out))
        out += struct.pack("<H", len(entries))
        for code, typ, count, field in entries:
            out += struct.pack("<HHI", code, typ, count) + field
        next_pointer_at.append(len(out))
        out += struct.pack("<Q", 0)
        out += b"\0" * (4 * len(entries))  # high 32 bits of each entry's value or offset
    struct.pack_into("<Q", out, 4, ifd_offsets[0])
    for at, nxt in zip(next_pointer_at, ifd_offsets[1:] + [0]):
        struct.pack_into("<Q", out, at, nxt)
    Path(path).write_bytes(bytes(out))


# ---------------------------------------------------------------------- generic pyramidal TIFF
def write_pyramid_tiff(
    path: Path,
    levels: list[np.ndarray],
    *,
    tile: int = 256,
    compression: str = "zlib",
    mpp: float | None = None,
    subifds: bool = False,
) -> None:
    """Tiled pyramid: levels as reduced-resolution subfiles (libvips style) or as SubIFDs of level 0."""
    import tifffile

    kwargs: dict = {"tile": (tile, tile), "compression": compression, "metadata": None}
    photometric = "rgb" if levels[0].ndim == 3 and levels[0].shape[2] == 3 else "minisblack"
    with tifffile.TiffWriter(path) as tw:
        for i, lev in enumerate(levels):
            res = {}
            if mpp is not None:
                f = levels[0].shape[1] / lev.shape[1]
                res = {"resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)), "resolutionunit": "CENTIMETER"}
            if subifds:
                extra = {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
            else:
                extra = {"subfiletype": 1} if i else {}
            tw.write(lev, photometric=photometric, **kwargs, **res, **extra)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """``(height, width, 3)`` uint16 whose pixel ``(r, c)`` holds ``(r, c, 7)``: its own level-0 coordinates."""
    rows, cols = np.meshgrid(np.arange(height, dtype=np.uint16), np.arange(width, dtype=np.uint16), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1)


def center_sampled(level0: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Level of ``shape`` whose pixel ``(i, j)`` is level-0 pixel ``(floor((i + .5) dy), floor((j + .5) dx))``."""
    dy, dx = level0.shape[0] / shape[0], level0.shape[1] / shape[1]
    rows = np.floor((np.arange(shape[0]) + 0.5) * dy).astype(int)
    cols = np.floor((np.arange(shape[1]) + 0.5) * dx).astype(int)
    return np.ascontiguousarray(level0[rows][:, cols])


# ---------------------------------------------------------------------- broken inputs
def truncated_copy(src: Path, dst: Path, keep: float = 0.6) -> Path:
    """The first ``keep`` fraction of ``src``'s bytes, like an interrupted copy."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep)])
    return Path(dst)


def zarr_without_a_chunk(src: Path, dst: Path) -> tuple[Path, str]:
    """Copy of a zarr store with one level-0 chunk file deleted; returns the store and the deleted key."""
    shutil.copytree(src, dst)
    level0 = sorted(p for p in (dst / "s0").rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr")))
    victim = level0[len(level0) // 2]
    victim.unlink()
    return dst, victim.relative_to(dst).as_posix()
