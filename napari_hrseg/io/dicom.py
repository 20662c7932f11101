"""DICOM whole-slide images (VL Whole Slide Microscopy) through wsidicom: the optional extra
``pip install 'napari-hrseg[dicom]'``.

Opens a directory of instances, or one ``.dcm`` file (with the other instances of its series beside it, when
there are any).  wsidicom finds the pyramid and reads frames; this module decodes JPEG frames itself.

Why decode here
---------------
A JPEG frame carries its own colour space: a JFIF (APP0) marker means YCbCr, an Adobe (APP14) marker states
the transform, component ids ``R G B`` mean RGB.  Converters often write JFIF YCbCr frames into an instance whose
header says ``RGB`` (the lower levels of ``derived-from-cmu1/dicom`` do); a decoder that trusts the header shows
them green and pink.  `jpeg_colorspace` follows the frame's markers and falls back to the header only when the
frame states nothing; imagecodecs' libjpeg-turbo decoder then converts to RGB.  Other transfer syntaxes (JPEG 2000,
JPEG-LS, RLE, uncompressed) are decoded by wsidicom.

Non-conforming files
--------------------
A file wsidicom cannot place on a pyramid (no Image Type, no Dimension Organization, no frame positions; e.g.
``dicom-wsi/pathml_small_dicom.dcm``) is refused with one `UnsupportedFormatError` saying what is missing: a
reader that guessed the frame layout could show tissue in the wrong place.

Options
-------
``z`` : float, focal plane (default: wsidicom's default plane); ``optical_path`` : str (default: the first).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import CorruptSlideError, SlideError, UnsupportedFormatError
from ..slide import Slide
from ._source import ChunkSource, build_levels, file_token

__all__ = ["DicomReader", "DicomLevelSource", "jpeg_colorspace", "decode_jpeg_frame"]

log = logging.getLogger(__name__)

_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}  # baseline 8-bit, extended
_INSTALL_HINT = "install the DICOM extra: pip install 'napari-hrseg[dicom]'"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's and wsidicom's warnings about non-conforming values while we read headers.

    They are logged at INFO/WARNING for every over-long UID of a converter's output; the reader reports what
    matters (a refusal) in one error instead, so the CLI's "one line" promise holds.
    """
    loggers = [logging.getLogger(name) for name in ("pydicom", "wsidicom")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import_wsidicom() -> Any:
    try:
        import wsidicom
    except ImportError as exc:
        raise UnsupportedFormatError(
            "reading DICOM whole-slide images needs the optional package wsidicom, which is not installed",
            subject="DICOM",
            hint=_INSTALL_HINT,
        ) from exc
    return wsidicom


# ---------------------------------------------------------------------- JPEG colour space from the frame's markers
def jpeg_colorspace(frame: bytes, header_photometric: str) -> str:
    """``"RGB"`` or ``"YCBCR"``: what a 3-component JPEG frame's own markers say, else the DICOM header.

    Parameters
    ----------
    frame : bytes
        One encoded frame (SOI ... EOI).
    header_photometric : str
        The instance's PhotometricInterpretation (``RGB``, ``YBR_FULL_422``, ``YBR_FULL``, ...).
    """
    i, n = 2, len(frame)
    adobe_transform: int | None = None
    jfif = False
    component_ids: tuple[int, ...] = ()
    while i + 4 <= n and frame[i] == 0xFF:
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        body = frame[i + 4 : i + 2 + length]
        if marker == 0xE0 and body[:5] == b"JFIF\x00":
            jfif = True
        elif marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker in (0xC0, 0xC1, 0xC2):
            ncomp = body[5] if len(body) > 5 else 0
            component_ids = tuple(body[6 + 3 * k] for k in range(ncomp) if 6 + 3 * k < len(body))
        elif marker == 0xDA:  # start of scan: no more header markers
            break
        i += 2 + length
    if adobe_transform is not None:
        return "YCBCR" if adobe_transform == 1 else "RGB"
    if jfif:
        return "YCBCR"
    if component_ids == (ord("R"), ord("G"), ord("B")):
        return "RGB"
    return "YCBCR" if header_photometric.upper().startswith("YBR") else "RGB"


def decode_jpeg_frame(frame: bytes, header_photometric: str, samples: int) -> np.ndarray:
    """Decode one JPEG frame to ``(h, w, samples)`` uint8, honouring its colour markers (see module docstring)."""
    import imagecodecs

    if samples == 1:
        return imagecodecs.jpeg8_decode(frame)[..., None]
    space = jpeg_colorspace(frame, header_photometric)
    return imagecodecs.jpeg8_decode(frame, colorspace=space, outcolorspace="RGB")


# ---------------------------------------------------------------------- level source
class DicomLevelSource(ChunkSource):
    """One pyramid level of a DICOM WSI; a chunk is one frame (tile)."""

    def __init__(
        self, wsi: Any, level_index: int, *, z: float | None, optical_path: str | None, subject: str, reopen: tuple
    ):
        from wsidicom.geometry import Point

        self._Point = Point
        self._wsi = wsi
        self._level = wsi.levels[level_index]
        self.level = level_index
        self.subject = subject
        self._z = z
        self._path = optical_path
        self._reopen = reopen
        size = self._level.size
        tile = self._level.tile_size
        image_data = self._level.default_instance.image_data
        self._syntax = str(getattr(image_data, "transfer_syntax", ""))
        self._photometric = str(getattr(image_data, "photometric_interpretation", "RGB"))
        self._samples = int(getattr(image_data, "samples_per_pixel", 3))
        self.dtype = np.dtype(np.uint8) if int(getattr(image_data, "bits", 8)) <= 8 else np.dtype(np.uint16)
        self.shape = (int(size.height), int(size.width), self._samples)
        self.chunk_shape = (min(int(tile.height), self.shape[0]), min(int(tile.width), self.shape[1]))
        self._warned = False

    def _decode_chunk(self, iy: int, ix: int) -> np.ndarray:
        r0, r1, c0, c1 = self.chunk_bounds(iy, ix)
        point = self._Point(ix, iy)
        if self._syntax in _JPEG_SYNTAXES and self.dtype == np.uint8:
            frame = self._level.get_encoded_tile(point, self._z, self._path, crop_to_image_boundary=False)
            pixels = decode_jpeg_frame(frame, self._photometric, self._samples)
        else:
            pixels = np.asarray(self._level.get_tile(point, self._z, self._path, crop_to_image_boundary=False))
            if pixels.ndim == 2:
                pixels = pixels[..., None]
        h, w = r1 - r0, c1 - c0
        if pixels.shape[0] < h or pixels.shape[1] < w:
            # A frame smaller than the tile it fills (seen at the coarsest level of converted files): pad with
            # background rather than fail, and say so once.
            if not self._warned:
                log.warning("%s: level %d frames are smaller than the declared tile; padded", self.subject, self.level)
                self._warned = True
            padded = np.full((h, w, pixels.shape[2]), 255 if self._samples == 3 else 0, dtype=pixels.dtype)
            padded[: min(h, pixels.shape[0]), : min(w, pixels.shape[1])] = pixels[:h, :w]
            pixels = padded
        return np.ascontiguousarray(pixels[:h, :w], dtype=self.dtype)

    def __reduce__(self):
        return (_reopen_level, self._reopen)


_REOPENED: dict[tuple, Any] = {}
_REOPENED_LOCK = threading.Lock()


def _reopen_level(files: tuple[str, ...], level: int, z: float | None, optical_path: str | None) -> DicomLevelSource:
    key = (files, z, optical_path)
    with _REOPENED_LOCK:
        wsi = _REOPENED.get(key)
        if wsi is None:
            wsi = _open_wsi([Path(f) for f in files], Path(files[0]))
            _REOPENED[key] = wsi
    return DicomLevelSource(
        wsi,
        level,
        z=z,
        optical_path=optical_path,
        subject=str(Path(files[0]).parent),
        reopen=(files, level, z, optical_path),
    )


# ---------------------------------------------------------------------- the reader
def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _dicom_files(directory: Path, limit: int | None = None) -> list[Path]:
    out = []
    for p in sorted(directory.iterdir()):
        if p.is_file() and (p.suffix.lower() == ".dcm" or _is_dicom_file(p)):
            out.append(p)
            if limit is not None and len(out) >= limit:
                break
    return out


class DicomReader:
    """Reader for DICOM WSI (see the module docstring)."""

    name = "dicom"
    extensions = (".dcm",)

    def sniff(self, path: Path) -> bool:
        try:
            if path.is_file():
                return _is_dicom_file(path)
            if path.is_dir():
                first = _dicom_files(path, limit=1)
                return bool(first) and _is_dicom_file(first[0])
        except OSError:
            return False
        return False

    def open(self, path: Path, *, z: float | None = None, optical_path: str | None = None, **options: Any) -> Slide:
        if options:
            raise SlideError(
                f"unknown option(s) {', '.join(sorted(options))} for DICOM",
                subject=path,
                hint="DICOM slides take z= and optical_path=",
            )
        files = _series_files(path)
        wsi = _open_wsi(files, path)
        reopen_files = tuple(str(f) for f in files)
        sources = [
            DicomLevelSource(
                wsi, i, z=z, optical_path=optical_path, subject=str(path), reopen=(reopen_files, i, z, optical_path)
            )
            for i in range(len(wsi.levels))
        ]
        # keep levels consistent with level 0 (channels, dtype) and strictly shrinking
        kept = [sources[0]]
        for src in sources[1:]:
            if src.shape[2] == kept[0].shape[2] and src.dtype == kept[0].dtype and src.shape[0] <= kept[-1].shape[0]:
                kept.append(src)
        token = file_token(files[0], reopen_files, z, optical_path)
        levels, readers, note = build_levels(kept, f"hrseg-dicom-{token}")
        conversions = []
        if any(s._syntax in _JPEG_SYNTAXES for s in kept):
            conversions.append("JPEG frames decoded in the colour space their own markers state (JFIF/Adobe)")
        if note:
            conversions.append(note)
        meta, objective = _metadata(files[0])
        mpp = kept[0]._level.mpp
        mpp_yx = (float(mpp.height), float(mpp.width)) if mpp is not None and mpp.width > 0 else None
        return Slide(
            levels=tuple(levels),
            path=path,
            format="dicom",
            mpp_yx=mpp_yx,
            vendor=meta.get("dicom.Manufacturer") or None,
            objective_power=objective,
            conversions=tuple(conversions),
            metadata=meta,
            closers=(wsi.close,),
            region_readers=tuple(readers),
        )


def _series_files(path: Path) -> list[Path]:
    """The instance files to open: a directory's DICOM files, or one file plus the instances of its series."""
    if path.is_dir():
        files = _dicom_files(path)
        if not files:
            raise UnsupportedFormatError("the directory holds no DICOM files", subject=path)
        return files
    try:
        import pydicom
    except ImportError as exc:
        raise UnsupportedFormatError("reading DICOM needs pydicom", subject=path, hint=_INSTALL_HINT) from exc
    try:
        with _quiet():
            series_uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
                "SeriesInstanceUID"
            )
            siblings = [path]
            for other in _dicom_files(path.parent):
                if other == path:
                    continue
                ds = pydicom.dcmread(other, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                if series_uid and ds.get("SeriesInstanceUID") == series_uid:
                    siblings.append(other)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken headers
        raise CorruptSlideError(f"the DICOM header cannot be read ({type(exc).__name__}: {exc})", subject=path) from exc
    return siblings


def _open_wsi(files: Sequence[Path], subject: Path) -> Any:
    wsidicom = _import_wsidicom()
    try:
        with _quiet():
            wsi = wsidicom.WsiDicom.open([str(f) for f in files])
    except Exception as exc:  # noqa: BLE001 - wsidicom raises its own and pydicom's errors
        raise UnsupportedFormatError(
            _nonconforming_reason(files[0], exc),
            subject=subject,
            hint="convert the slide with a conforming DICOM WSI converter (e.g. wsidicomizer) or export it as OME-TIFF",
        ) from exc
    if not wsi.levels:
        raise UnsupportedFormatError("no pyramid (VOLUME) image found in the DICOM instances", subject=subject)
    return wsi


def _nonconforming_reason(file: Path, exc: BaseException) -> str:
    """Say which required WSI attributes the instance lacks, so the message explains the refusal."""
    try:
        import pydicom

        with _quiet():
            ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        return f"not a readable DICOM whole-slide image ({type(exc).__name__}: {exc})"
    missing = []
    image_type = ds.get("ImageType")
    if not image_type or "VOLUME" not in [str(v) for v in image_type]:
        missing.append("Image Type VOLUME")
    if not ds.get("DimensionOrganizationType"):
        missing.append("Dimension Organization Type")
    if "PerFrameFunctionalGroupsSequence" not in ds and ds.get("DimensionOrganizationType") != "TILED_FULL":
        missing.append("per-frame positions")
    if "SharedFunctionalGroupsSequence" not in ds:
        missing.append("Pixel Spacing")
    frames = ds.get("NumberOfFrames")
    matrix = (ds.get("TotalPixelMatrixColumns"), ds.get("TotalPixelMatrixRows"))
    if missing:
        listed = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        where = f"its {frames} frames" if frames else "its frames"
        size = f" on the {matrix[0]} x {matrix[1]} pixel matrix" if all(matrix) else ""
        return f"not a conforming DICOM whole-slide image: it lacks {listed}, so {where} cannot be placed{size}"
    return f"not a readable DICOM whole-slide image ({type(exc).__name__}: {str(exc)[:200]})"


# Only these header fields become slide metadata: patient and study identifiers stay out of napari layers.
_METADATA_KEYWORDS = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "ContainerIdentifier",
    "SeriesDescription",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "PhotometricInterpretation",
    "DimensionOrganizationType",
)


def _metadata(file: Path) -> tuple[dict[str, Any], float | None]:
    import pydicom

    with _quiet():
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    meta: dict[str, Any] = {}
    for kw in _METADATA_KEYWORDS:
        value = ds.get(kw)
        if value not in (None, "") and str(value) != "Unknown":
            meta[f"dicom.{kw}"] = str(value) if not isinstance(value, (int, float)) else value
    meta["dicom.TransferSyntaxUID"] = str(ds.file_meta.get("TransferSyntaxUID", ""))
    objective = None
    for item in ds.get("OpticalPathSequence", []) or []:
        power = item.get("ObjectiveLensPower")
        if power:
            try:
                objective = float(power)
            except (TypeError, ValueError):
                pass
            break
    return meta, objective
