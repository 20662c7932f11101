"""Colour by Beer-Lambert: stain concentrations -> optical density -> transmitted light.

The tissue model knows only *concentrations*: how much haematoxylin (``H``, binds chromatin: nuclei, and a little
mucin) and eosin (``E``, binds proteins: cytoplasm, collagen) each compartment holds, in relative units (1 = a
typical nucleus's H or dense collagen's E).  A `StainPalette` turns them into colour, as a given lab's staining and
scanner would: per channel ``I_c = I0_c * 10 ** -(h_c * sH * c_H + e_c * sE * c_E)`` with unit stain vectors
``h, e`` (optical density per unit concentration), strengths ``sH, sE`` and the glass brightness ``I0``.  The
same tissue under another palette is the same slide stained elsewhere: the project's domain-shift experiments use
that, and the ground truth does not change.

Palettes
--------
``"he"``
    Fitted to the GlaS colon-gland images (``../shared/realdata/glas-test-subset``, Macenko et al. 2009 stain
    vectors of all 20 images together; strengths set so the virtual tissue's optical-density percentiles match).
``"he-tcga"``
    Fitted the same way to the 20x TCGA tiles of the MICCAI 2015 nuclei set: pinker eosin with more blue
    absorption, a weaker, redder haematoxylin and a warmer glass.
``"he-faded"``
    A pale, under-stained slide (haematoxylin at 60 %, eosin at 70 %), on the ``"he"`` vectors.

Averaging and the Jensen correction
-----------------------------------
A pixel of a coarse level shows the *mean transmitted light* of the level-0 pixels under it, not the light of the
mean concentration; mixing is therefore done in intensity, and concentration texture the pixel cannot resolve
(variance ``v`` of a Gaussian field in concentration) multiplies the intensity by ``exp((ln10 * k)^2 v / 2)``,
the mean of a log-normal, with ``k`` the channel's optical density per unit concentration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import HrsegError

__all__ = ["StainPalette", "STAIN_PALETTES", "get_palette", "Concentration"]

_LN10 = math.log(10.0)


def _unit(v) -> tuple[float, float, float]:
    a = np.asarray(v, dtype=np.float64)
    a = a / np.linalg.norm(a)
    return (float(a[0]), float(a[1]), float(a[2]))


@dataclass(frozen=True)
class StainPalette:
    """One lab's stains and scanner.

    Attributes
    ----------
    name : str
    haematoxylin, eosin : (float, float, float)
        Unit optical-density vectors (R, G, B).
    strength_h, strength_e : float
        Optical density of unit concentration along the vector.
    background : (float, float, float)
        Glass brightness ``I0`` (0-255) per channel.
    """

    name: str
    haematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    strength_h: float
    strength_e: float
    background: tuple[float, float, float]

    def od_per_unit(self) -> tuple[np.ndarray, np.ndarray]:
        """Optical density per unit H and E concentration, per channel: two float32 ``(3,)`` arrays."""
        h = np.asarray(self.haematoxylin, dtype=np.float32) * np.float32(self.strength_h)
        e = np.asarray(self.eosin, dtype=np.float32) * np.float32(self.strength_e)
        return h, e

    def intensity(self, c_h, c_e, var_h=0.0, var_e=0.0) -> np.ndarray:
        """Transmitted light for concentrations ``c_h, c_e`` (arrays or scalars, broadcastable).

        ``var_h, var_e`` are the variances of concentration texture inside a pixel (Jensen correction).

        Returns
        -------
        ndarray float32 ``(..., 3)``, 0-255 scale (not clipped, not rounded).
        """
        h, e = self.od_per_unit()
        c_h = np.asarray(c_h, dtype=np.float32)
        c_e = np.asarray(c_e, dtype=np.float32)
        var_h = np.asarray(var_h, dtype=np.float32)
        var_e = np.asarray(var_e, dtype=np.float32)
        shape = np.broadcast_shapes(c_h.shape, c_e.shape, var_h.shape, var_e.shape)
        out = np.empty(shape + (3,), dtype=np.float32)
        ln10 = np.float32(_LN10)
        half = np.float32(0.5 * _LN10 ** 2)
        # Channel by channel on 2-D arrays: three times cheaper than broadcasting a trailing axis of 3.
        for ch in range(3):
            x = c_h * (-ln10 * h[ch]) + c_e * (-ln10 * e[ch])
            if var_h.any() or var_e.any():
                x = x + half * (h[ch] * h[ch] * var_h + e[ch] * e[ch] * var_e)
            x = np.exp(x)
            out[..., ch] = x * np.float32(self.background[ch])
        return out

    def mean_intensity_uniform_h(self, lo, hi, c_e: float) -> np.ndarray:
        """Mean light of nuclei whose H concentration is uniform in ``[lo, hi]`` (arrays ok): exact, ``(..., 3)``."""
        h, e = self.od_per_unit()
        lo = np.asarray(lo, dtype=np.float32)[..., None]
        hi = np.asarray(hi, dtype=np.float32)[..., None]
        k = np.float32(_LN10) * h
        span = np.maximum(hi - lo, np.float32(1e-6))
        mean_exp = (np.exp(-k * lo) - np.exp(-k * hi)) / (k * span)
        eosin = np.exp(-np.float32(_LN10) * e * np.float32(c_e))
        return mean_exp * eosin * np.asarray(self.background, dtype=np.float32)


STAIN_PALETTES: dict[str, StainPalette] = {
    "he": StainPalette(
        "he", _unit((0.533, 0.787, 0.313)), _unit((0.242, 0.941, 0.238)), 0.62, 0.48, (246.0, 243.0, 247.0)
    ),
    "he-tcga": StainPalette(
        "he-tcga", _unit((0.575, 0.740, 0.349)), _unit((0.220, 0.868, 0.445)), 0.75, 0.50, (244.0, 238.0, 240.0)
    ),
    "he-faded": StainPalette(
        "he-faded", _unit((0.533, 0.787, 0.313)), _unit((0.242, 0.941, 0.238)), 0.37, 0.29, (247.0, 246.0, 248.0)
    ),
}


def get_palette(name: str | StainPalette) -> StainPalette:
    """A palette by name (or the palette itself); unknown names raise and list the known ones."""
    if isinstance(name, StainPalette):
        return name
    try:
        return STAIN_PALETTES[name]
    except KeyError:
        raise HrsegError(
            f"unknown stain palette {name!r}",
            subject="virtual slide",
            hint=f"known palettes: {', '.join(STAIN_PALETTES)}",
        ) from None


@dataclass(frozen=True)
class Concentration:
    """Stain concentrations of a tissue compartment (relative units)."""

    h: float
    e: float


# Compartment concentrations (palette-independent).  Epithelial cytoplasm and nuclei are graded by atypia in the
# renderer: cytoplasm + (0.06, 0.16) * atypia (denser, more eosinophilic), nuclei darker.
GLASS = Concentration(0.0, 0.005)
LUMEN = Concentration(0.02, 0.05)
STROMA = Concentration(0.05, 0.72)
STROMA_DESMOPLASTIC = Concentration(0.12, 0.42)
CYTOPLASM = Concentration(0.10, 0.55)
CYTOPLASM_ATYPIA_GAIN = Concentration(0.06, 0.18)
GOBLET = Concentration(0.09, 0.05)
NUCLEUS_E = 0.22  # eosin in nuclei (the cytoplasm around and above them in the section)
