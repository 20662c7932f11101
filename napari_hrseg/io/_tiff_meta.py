"""Vendor metadata of TIFF-family slides: pixel size, objective, vendor, channel names, and the raw properties.

One function per dialect, each reading only tags and descriptions that tifffile has already parsed (no pixel
data).  Pixel sizes are returned in micrometres per pixel as ``(y, x)``.

Where a file states its pixel size twice (QPTIFF: the TIFF resolution tags and the nominal ``PixelSizeMicrons``
of the scan profile) the calibrated TIFF tags win and the nominal value is kept in the metadata.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TiffInfo",
    "aperio_info",
    "ome_info",
    "ndpi_info",
    "qpi_info",
    "generic_info",
    "resolution_mpp",
    "rgb_to_hex",
    "to_um",
]

log = logging.getLogger(__name__)

# Micrometres per unit, for OME ``PhysicalSize*Unit`` and NGFF axis ``unit`` values.
_UM_PER_UNIT = {
    "pm": 1e-6,
    "picometer": 1e-6,
    "å": 1e-4,
    "Å": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}

# A TIFF resolution tag outside this range is not a microscope pixel size: 72 or 300 dpi (353 or 85 µm) are the
# defaults of image editors, and a real slide scanned below 0.01 µm/px does not exist.
PLAUSIBLE_MPP = (0.01, 50.0)


def to_um(value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` converted to micrometres; ``None`` for an unknown unit (default unit: µm)."""
    if unit is None or unit == "":
        return float(value)
    factor = _UM_PER_UNIT.get(unit) or _UM_PER_UNIT.get(unit.lower())
    return None if factor is None else float(value) * factor


@dataclass
class TiffInfo:
    """What a TIFF dialect states about its main image."""

    format: str
    vendor: str | None = None
    mpp_yx: tuple[float, float] | None = None
    objective_power: float | None = None
    channel_names: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def resolution_mpp(page: Any) -> tuple[tuple[float, float] | None, str | None]:
    """Pixel size from the XResolution / YResolution / ResolutionUnit tags, and a note when it is ignored.

    Returns ``((mpp_y, mpp_x) or None, note or None)``.  Unit 1 (none) states no physical size; values outside a
    plausible microscope range (e.g. the 72 dpi default) are ignored with a note.
    """
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None:
        return None, None
    try:
        xr = _rational(tags["XResolution"].value)
        yr = _rational(tags["YResolution"].value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None, None
    if xr <= 0 or yr <= 0:
        return None, None
    mpp = (um_per_unit / yr, um_per_unit / xr)
    if not all(PLAUSIBLE_MPP[0] <= v <= PLAUSIBLE_MPP[1] for v in mpp):
        return None, (
            f"resolution tags say {mpp[1]:.4g} µm/px, which is no microscope pixel size (an editor's dpi default); "
            "ignored"
        )
    return mpp, None


def _rational(value: Any) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1]
    return float(value)


def _number(text: Any) -> float | None:
    try:
        value = float(str(text).strip().rstrip("xX"))
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def rgb_to_hex(text: str) -> str | None:
    """``"0,0,255"`` (QPTIFF), ``"0000FF"`` (OME-Zarr omero) or a signed RGBA int (OME-XML) -> ``"#0000ff"``."""
    text = str(text).strip()
    try:
        if "," in text:
            r, g, b = (int(float(v)) for v in text.split(",")[:3])
        elif len(text) == 6 and all(ch in "0123456789abcdefABCDEF" for ch in text):
            r, g, b = int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)
        else:
            value = int(text) & 0xFFFFFFFF  # OME: RGBA packed in a signed 32-bit int
            r, g, b = (value >> 24) & 255, (value >> 16) & 255, (value >> 8) & 255
    except ValueError:
        return None
    if not all(0 <= v <= 255 for v in (r, g, b)):
        return None
    return f"#{r:02x}{g:02x}{b:02x}"


# ---------------------------------------------------------------------- Aperio SVS
def parse_aperio_description(description: str) -> dict[str, str]:
    """Split an Aperio ImageDescription into its properties.

    The format is ``"Aperio Image Library vX\\r\\n<geometry line>|Key = Value|Key = Value..."``; the first part is
    kept as ``"Header"``.
    """
    parts = description.split("|")
    props: dict[str, str] = {"Header": parts[0].strip()}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    return props


def aperio_info(page: Any) -> TiffInfo:
    props = parse_aperio_description(page.description)
    mpp = _number(props.get("MPP"))
    info = TiffInfo(
        format="svs",
        vendor="aperio",
        mpp_yx=(mpp, mpp) if mpp else None,
        objective_power=_number(props.get("AppMag")),
        metadata={f"aperio.{k}": v for k, v in props.items()},
    )
    if info.mpp_yx is None:
        info.mpp_yx, _ = resolution_mpp(page)
    return info


# ---------------------------------------------------------------------- OME-TIFF
def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ome_info(xml: str, image_index: int = 0) -> TiffInfo:
    """Pixel size (with units), channel names, objective and creator from OME-XML."""
    info = TiffInfo(format="ome-tiff")
    try:
        root = ET.fromstring(_drop_xml_declaration(xml))
    except ET.ParseError as exc:
        info.notes.append(f"OME-XML could not be parsed ({exc}); metadata ignored")
        return info
    images = [el for el in root if _strip_ns(el.tag) == "Image"]
    creator = root.get("Creator")
    if creator:
        info.metadata["ome.Creator"] = creator
    if not images:
        return info
    image = images[min(image_index, len(images) - 1)]
    info.metadata["ome.Image.Name"] = image.get("Name", "")
    pixels = next((el for el in image if _strip_ns(el.tag) == "Pixels"), None)
    if pixels is not None:
        sizes = []
        for axis in ("Y", "X"):
            value = pixels.get(f"PhysicalSize{axis}")
            if value is None:
                break
            um = to_um(float(value), pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            if um is None:
                info.notes.append(f"unknown unit {pixels.get(f'PhysicalSize{axis}Unit')!r}; pixel size ignored")
                break
            sizes.append(um)
        if len(sizes) == 2 and all(v > 0 for v in sizes):
            info.mpp_yx = (sizes[0], sizes[1])
        for key in ("DimensionOrder", "Type", "SizeC", "SizeZ", "SizeT"):
            if pixels.get(key) is not None:
                info.metadata[f"ome.Pixels.{key}"] = pixels.get(key)
        channels = [ch for ch in pixels if _strip_ns(ch.tag) == "Channel"]
        names = [ch.get("Name", "") for ch in channels]
        if names and all(names):
            info.channel_names = tuple(names)
        colors = [rgb_to_hex(ch.get("Color", "")) for ch in channels]
        if colors and all(colors):
            info.metadata["channel_colors"] = tuple(colors)
    # Objective: Image/ObjectiveSettings@ID -> Instrument/Objective@NominalMagnification
    settings = next((el for el in image if _strip_ns(el.tag) == "ObjectiveSettings"), None)
    objectives = {
        ob.get("ID"): ob
        for inst in root
        if _strip_ns(inst.tag) == "Instrument"
        for ob in inst
        if _strip_ns(ob.tag) == "Objective"
    }
    objective = objectives.get(settings.get("ID")) if settings is not None else None
    if objective is None and len(objectives) == 1:
        objective = next(iter(objectives.values()))
    if objective is not None:
        info.objective_power = _number(objective.get("NominalMagnification"))
        if objective.get("Manufacturer"):
            info.vendor = objective.get("Manufacturer")
    for inst in root:
        if _strip_ns(inst.tag) == "Instrument":
            for micro in inst:
                if _strip_ns(micro.tag) == "Microscope" and micro.get("Manufacturer"):
                    info.vendor = micro.get("Manufacturer")
    if info.vendor is None and creator:
        info.vendor = creator.split()[0]
    return info


def _drop_xml_declaration(xml: str) -> str:
    # ElementTree refuses a str that declares an encoding (QPTIFF declares utf-16 in an already decoded string).
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", xml, count=1)


# ---------------------------------------------------------------------- Hamamatsu NDPI
def ndpi_info(page: Any) -> TiffInfo:
    tags = page.ndpi_tags or {}
    info = TiffInfo(format="ndpi", vendor="hamamatsu")
    for key, value in tags.items():
        if key in ("McuStarts", "McuStartsHighBytes"):
            continue
        if isinstance(value, (str, int, float)):
            info.metadata[f"hamamatsu.{key}"] = value
    magnification = tags.get("Magnification")
    if isinstance(magnification, (int, float)) and magnification > 0:
        info.objective_power = float(magnification)
    info.mpp_yx, note = resolution_mpp(page)
    if note:
        info.notes.append(note)
    return info


# ---------------------------------------------------------------------- PerkinElmer / Akoya Vectra QPTIFF
def qpi_info(pages: list[Any]) -> TiffInfo:
    """Channel names (one per full-resolution page), magnification and properties from the QPI XML."""
    info = TiffInfo(format="qptiff", vendor="perkinelmer")
    names: list[str] = []
    colors: list[str] = []
    for i, page in enumerate(pages):
        try:
            root = ET.fromstring(_drop_xml_declaration(page.description))
        except ET.ParseError:
            names.append(f"C{i}")
            continue
        names.append((root.findtext("Name") or f"C{i}").strip())
        colors.append((root.findtext("Color") or "").strip())
        if i == 0:
            for child in root:
                if len(child) == 0 and child.text and child.text.strip():
                    info.metadata[f"qptiff.{child.tag}"] = child.text.strip()
            res = root.find(".//ScanProfile//ScanResolution")
            if res is not None:
                info.objective_power = _number(res.findtext("Magnification"))
                nominal = _number(res.findtext("PixelSizeMicrons"))
                if nominal:
                    info.metadata["qptiff.ScanResolution.PixelSizeMicrons"] = nominal
            if info.objective_power is None:
                info.objective_power = _number(root.findtext("Objective"))
    info.channel_names = tuple(names)
    hexes = [rgb_to_hex(c) for c in colors]
    if hexes and all(hexes) and len(hexes) == len(names):
        info.metadata["channel_colors"] = tuple(hexes)
    info.mpp_yx, note = resolution_mpp(pages[0])
    if info.mpp_yx is None and "qptiff.ScanResolution.PixelSizeMicrons" in info.metadata:
        nominal = info.metadata["qptiff.ScanResolution.PixelSizeMicrons"]
        info.mpp_yx = (nominal, nominal)
    if note:
        info.notes.append(note)
    return info


# ---------------------------------------------------------------------- anything else
def generic_info(page: Any, format: str = "tiff") -> TiffInfo:
    """Pixel size from the resolution tags; writer from the Software tag."""
    info = TiffInfo(format=format)
    info.mpp_yx, note = resolution_mpp(page)
    if note:
        info.notes.append(note)
    software = (page.software or "").strip()
    if software:
        info.metadata["tiff.Software"] = software
    for name in ("Make", "Model", "DateTime", "Artist"):
        if name in page.tags:
            info.metadata[f"tiff.{name}"] = str(page.tags[name].value).strip()
    if "tiff.Make" in info.metadata:
        info.vendor = info.metadata["tiff.Make"]
    elif software:
        info.vendor = software.split()[0]
    return info
