"""The virtual tissue's biology in numbers: sizes in micrometres, probabilities, and the semantic classes.

Everything here is physical (µm), so a slide rendered at 0.25 µm/px shows the same tissue at twice the pixels.
The values are chosen to resemble colorectal mucosa with an adenocarcinoma focus at 20x (0.5 µm/px): crypts of
about 100-135 µm diameter 160 µm apart, nuclei of 4-12 µm, a tumour a few millimetres across.

Why the tumour needs context
----------------------------
Every *local* property of a tumour gland is drawn from a range that overlaps the normal one: nuclear size,
stratification, goblet-cell density and darkness follow a per-gland "atypia" in ``[0, 1]`` that is
``U(0, 0.75)`` for normal crypts (reactive crypts look atypical too) and ``U(0.3, 1)`` for tumour glands.
What separates tumour from normal is
*architecture*, visible only over a field of a millimetre or so: tumour glands are larger, irregular, crowded
and fused (they overlap their neighbours), and sit in pale, cell-rich desmoplastic stroma.  A 256-pixel tile at
level 0 holds part of one gland and cannot tell; a 2048-pixel field seen at 1/8 resolution can.  Fine boundaries
(epithelium edges with micrometre roughness, nuclei) are visible only at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASS_NAMES", "CLASS_COLORS", "GlandParams", "NucleusLayer", "NUCLEUS_LAYERS", "TissueParams"]

#: Semantic classes of the ground truth, index = label value.
CLASS_NAMES: tuple[str, ...] = ("background", "stroma", "normal epithelium", "lumen", "tumour epithelium")
#: Display colours of the classes (``#rrggbb``), index 0 = glass.
CLASS_COLORS: tuple[str, ...] = ("#000000", "#f2a7c3", "#3f9b4a", "#f5e663", "#d7301f")

GLASS, STROMA, NORMAL_EPITHELIUM, LUMEN, TUMOUR_EPITHELIUM = range(5)


@dataclass(frozen=True)
class GlandParams:
    """Gland (crypt) shapes.  Radii are fractions of the cell size ``cell_um``; harmonics are relative amplitudes."""

    cell_um: float = 160.0
    # centres are uniform in [jitter, 1 - jitter] of their cell (tumour: more irregular spacing)
    jitter_normal: float = 0.25
    jitter_tumour: float = 0.2
    radius_normal: tuple[float, float] = (0.34, 0.48)
    radius_tumour: tuple[float, float] = (0.44, 0.62)
    # maximum amplitude of the outer-boundary harmonics k = 2, 3, 4, 5 (each uniform in [0, max])
    harmonics_normal: tuple[float, ...] = (0.18, 0.06, 0.03, 0.02)
    harmonics_tumour: tuple[float, ...] = (0.30, 0.15, 0.10, 0.07)
    lumen_ratio_normal: tuple[float, float] = (0.20, 0.45)
    lumen_ratio_tumour: tuple[float, float] = (0.25, 0.50)
    lumen_harmonics_normal: tuple[float, ...] = (0.20, 0.10, 0.0)
    lumen_harmonics_tumour: tuple[float, ...] = (0.35, 0.20, 0.15)
    atypia_normal: tuple[float, float] = (0.0, 0.75)
    atypia_tumour: tuple[float, float] = (0.3, 1.0)
    presence_normal: float = 0.92  # times the mucosa indicator
    presence_tumour: float = 0.97
    roughness_um: float = 1.2  # std of the boundary roughness (µm), lattice 3-12 µm: visible at full resolution only


@dataclass(frozen=True)
class NucleusLayer:
    """One family of stromal nuclei on its own grid of cells (one candidate per cell, never leaving its cell).

    Semi-axes in µm; ``darkness`` is the haematoxylin concentration relative to the palette's nuclear reference,
    uniform in the range; ``acceptance_scale`` multiplies the stroma's acceptance probability.
    """

    name: str
    index: int
    kind: str  # "lymphocyte" or "stromal": how it is accepted
    cell_um: float
    long_um: tuple[float, float]
    short_um: tuple[float, float]
    darkness: tuple[float, float]
    acceptance_scale: float = 1.0


# Stromal nuclei on grids (epithelial nuclei are laid out per gland, see `epithelium`).  Lymphocytes sit on a fine
# brick grid (densely packed infiltrates look like that); a lymphocyte that would touch a fibroblast-like
# candidate is not drawn, so that no two nuclei overlap.
NUCLEUS_LAYERS: tuple[NucleusLayer, ...] = (
    NucleusLayer("lymphocyte", 0, "lymphocyte", 7.0, (2.0, 2.5), (1.8, 2.3), (1.05, 1.25)),
    NucleusLayer("stromal", 1, "stromal", 14.0, (3.5, 5.5), (1.0, 1.5), (0.75, 1.0)),
)


@dataclass(frozen=True)
class TissueParams:
    """Slide-scale layout: tissue extent, tumour focus, mucosa and inflammation, and the textures."""

    gland: GlandParams = GlandParams()
    # tissue: an ellipse of this relative size plus noise; the noise's largest lattice is this fraction of the slide
    tissue_radius: float = 0.36
    tissue_noise_gain: float = 0.55
    tissue_smallest_um: float = 8.0
    # tumour focus: radius relative to the slide, clamped (µm)
    tumour_radius: float = 0.06
    tumour_radius_um: tuple[float, float] = (400.0, 3000.0)
    # epithelial nuclei: zone of the epithelium (depth t: 0 at the lumen, 1 at the basement membrane)
    nuclear_zone_end: float = 0.95
    nuclear_zone_start_normal: float = 0.72  # minus 0.55 * atypia: atypical glands stratify their nuclei
    # stromal nuclei: probability that a lymphocyte candidate is accepted in plain stroma, in the lamina propria
    # between normal crypts, and in a lymphoid aggregate; fibroblast-like nuclei in plain and desmoplastic stroma
    lymph_plain: float = 0.03
    lymph_lamina: float = 0.30
    lymph_aggregate: float = 0.85
    stromal_plain: float = 0.35
    stromal_desmoplastic: float = 0.65
