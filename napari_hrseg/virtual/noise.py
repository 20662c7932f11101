"""Band-limited gradient noise, sampled exactly as a pixel of any pyramid level sees it.

A noise *field* is a sum of octaves.  Each octave is gradient noise on an integer lattice of spacing ``wavelength``
(level-0 pixels): every node carries a random gradient ``(a, b)``, drawn from `hashing` so that no lattice is ever
stored, and contributes ``(a*u + b*v) * B(u) * B(v)``, with ``(u, v)`` the offset from the node in lattice units
and ``B`` the cubic B-spline.  Gradient rather than value noise because the kernel ``t*B(t)`` integrates to zero:
an octave has little energy at low frequencies, so averaging it over a pixel much larger than its wavelength
gives (almost) zero, and a coarse level that drops it stays consistent with the mean of the finer level.

*Exact pixel means.*  A pixel of level ``l`` covers a box of ``step`` level-0 pixels, and its value is the mean of
the field over that box, not a point sample: the per-axis weights are differences of the kernels'
antiderivatives across the box, so a level-``l`` pixel is exactly the mean of the level-0 pixels under it for
every octave that both levels keep.  Octaves finer than the box are dropped; what the box hides is summarised
as ``removed_var`` (the variance of the field inside a pixel, averaged over positions), which the non-linear uses
need: a soft threshold becomes a coverage (`coverage_above`) and an exponential (Beer-Lambert) its Jensen
correction (`stain`).

*Cost.*  The kernel is a sum of two separable terms, so sampling a grid is two banded one-dimensional passes per
term: a gather and an ``einsum`` contraction in float32 each, never BLAS, whose threads thrash on a loaded
two-core machine.

Units: positions and wavelengths in level-0 pixels; amplitudes are standard deviations of the octave.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.special import ndtr

from .hashing import hash_uniform_pair

__all__ = ["AxisGrid", "Octaves", "FieldSample", "sample_field", "coverage_above", "octaves", "retained_fraction"]

#: Phase-averaged sum of squared cubic B-spline weights, ``∫ B(t)^2 dt = 151/315`` (one axis).
BSPLINE_SQ_MEAN = 151.0 / 315.0
#: Phase-averaged sum of squared gradient-kernel weights, ``∫ (t B(t))^2 dt`` (one axis).
GRADIENT_SQ_MEAN = 0.08659611992945326
#: Gradient components are uniform in ``[-h, h]`` with this ``h``, so that an octave has unit variance on average
#: over positions: ``var(a) * 2 * BSPLINE_SQ_MEAN * GRADIENT_SQ_MEAN = 1``.
LATTICE_HALF_RANGE = math.sqrt(3.0 / (2.0 * BSPLINE_SQ_MEAN * GRADIENT_SQ_MEAN))
#: An octave whose lattice spacing is below this multiple of the pixel footprint is dropped (its pixel mean keeps
#: about a quarter of its variance at 0.5, 4 % at 0.25; see `retained_fraction`).
MIN_WAVELENGTH_PER_STEP = 0.5


@dataclass(frozen=True)
class AxisGrid:
    """Sample footprints along one axis: sample ``k`` covers ``[start + k*step, start + (k+1)*step)`` (level-0 px)."""

    start: float
    step: float
    n: int

    @property
    def centres(self) -> np.ndarray:
        """Footprint centres, float64 ``(n,)``."""
        return self.start + (np.arange(self.n, dtype=np.float64) + 0.5) * self.step


@dataclass(frozen=True)
class Octaves:
    """A multi-octave field: ``wavelengths`` (lattice spacings, level-0 px) and ``amplitudes`` (standard deviations)."""

    wavelengths: tuple[float, ...]
    amplitudes: tuple[float, ...]

    def __post_init__(self):
        if len(self.wavelengths) != len(self.amplitudes):
            raise ValueError("one amplitude per wavelength")

    @property
    def variance(self) -> float:
        """Total variance of the field (sum of the octaves' variances)."""
        return float(sum(a * a for a in self.amplitudes))

    def scaled(self, length: float = 1.0, amplitude: float = 1.0) -> "Octaves":
        """The same field with wavelengths times ``length`` (e.g. µm -> px) and amplitudes times ``amplitude``."""
        return Octaves(tuple(w * length for w in self.wavelengths), tuple(a * amplitude for a in self.amplitudes))


def octaves(longest: float, shortest: float, *, gain: float = 0.5, first: float = 1.0) -> Octaves:
    """Octaves from ``longest`` down to ``shortest`` lattice spacing, halving each time; amplitude ``first*gain**k``."""
    wl, amp = [], []
    w, a = float(longest), float(first)
    while w >= shortest * 0.999:
        wl.append(w)
        amp.append(a)
        w /= 2.0
        a *= gain
    return Octaves(tuple(wl), tuple(amp))


@dataclass(frozen=True)
class FieldSample:
    """A field sampled on a grid.

    Attributes
    ----------
    mean : ndarray, float32 ``(ny, nx)``
        Mean of the field over each footprint (box mode) or its band-limited value at the centre (point mode).
    removed_var : float
        Variance of the field inside a footprint, averaged over positions: the detail a pixel cannot show.
    """

    mean: np.ndarray
    removed_var: float


# ---------------------------------------------------------------------- kernels and their antiderivatives
def _bspline(t: np.ndarray) -> np.ndarray:
    a = np.minimum(np.abs(t), 2.0)
    s = 2.0 - a
    return np.where(a < 1.0, (4.0 - a * a * (6.0 - 3.0 * a)) / 6.0, s * s * s / 6.0)


def _bspline_cdf(t: np.ndarray) -> np.ndarray:
    """``∫_{-2}^{t} B(u) du``: 0 below -2, 1 above 2, symmetric about ``(0, 1/2)``."""
    a = np.minimum(np.abs(t), 2.0)
    s = 2.0 - a
    s2 = s * s
    right = np.where(a < 1.0, 0.5 + a * (4.0 - a * a * (2.0 - 0.75 * a)) / 6.0, 1.0 - s2 * s2 / 24.0)
    return np.where(t >= 0, right, 1.0 - right)


def _gradient_kernel(t: np.ndarray) -> np.ndarray:
    return t * _bspline(t)


def _gradient_kernel_cdf(t: np.ndarray) -> np.ndarray:
    """``∫_{-2}^{t} u B(u) du``: even, zero outside ``(-2, 2)``, ``-7/30`` at 0."""
    a = np.minimum(np.abs(t), 2.0)
    s = 2.0 - a
    a2 = a * a
    inner = (2.0 * a2 - a2 * a2 * (1.5 - 0.6 * a)) / 6.0 - (0.05 + 1.1 / 6.0)
    outer = -(s * s * s * s) * (0.5 - 0.2 * s) / 6.0
    return np.where(a < 1.0, inner, outer)


@dataclass(frozen=True)
class _AxisWeights:
    """Banded weights along one axis: sample ``k`` uses lattice nodes ``i0 + cols[k]`` with weights ``wb``/``wg``."""

    i0: int
    m: int  # lattice nodes spanned, i0 .. i0 + m - 1
    cols: np.ndarray  # (n, support) int64, relative to i0, < m
    wb: np.ndarray  # (n, support) float32, B-spline kernel
    wg: np.ndarray  # (n, support) float32, gradient kernel


def _axis_weights(grid: AxisGrid, wavelength: float, box: bool) -> _AxisWeights:
    u0 = (grid.start + np.arange(grid.n, dtype=np.float64) * grid.step) / wavelength
    du = grid.step / wavelength
    first = np.floor(u0).astype(np.int64) - 1  # the first node whose kernel reaches into the footprint
    support = int(math.ceil(du)) + 3
    i0 = int(first[0])
    cols = (first - i0)[:, None] + np.arange(support)[None, :]
    t = u0[:, None] - (cols + i0)
    if box:  # exact footprint means: differences of the antiderivatives across the footprint
        wb = (_bspline_cdf(t + du) - _bspline_cdf(t)) / du
        wg = (_gradient_kernel_cdf(t + du) - _gradient_kernel_cdf(t)) / du
    else:
        wb = _bspline(t + du / 2)
        wg = _gradient_kernel(t + du / 2)
    return _AxisWeights(i0, int(cols.max()) + 1, cols, wb.astype(np.float32), wg.astype(np.float32))


def _along_columns(lattice: np.ndarray, w: _AxisWeights, kernel: np.ndarray) -> np.ndarray:
    """``lattice (my, mx) -> (my, nx)``: interpolate every lattice row at the column samples."""
    # One gather and one contraction (einsum without BLAS): several times faster than a loop over the support.
    return np.einsum("mxs,xs->mx", lattice[:, w.cols], kernel)


def _along_rows(rows: np.ndarray, w: _AxisWeights, kernel: np.ndarray) -> np.ndarray:
    """``rows (my, nx) -> (ny, nx)``: interpolate at the row samples."""
    return np.einsum("ns,nsx->nx", kernel, rows[w.cols])


@lru_cache(maxsize=4096)
def retained_fraction(step_per_wavelength: float) -> float:
    """Fraction of an octave's variance that survives averaging over a square pixel ``step`` wide.

    Averaged over the pixel's position relative to the lattice (64 phases per axis); ``1 - retained`` is the
    variance inside the pixel.  Equal to 1 for a point and tends to 0 for pixels much larger than the lattice.
    """
    du = float(step_per_wavelength)
    if du < 1e-3:  # a pixel this small against the lattice keeps everything (the deficit is O(du^2))
        return 1.0
    phases = np.arange(64) / 64.0
    w = _axis_weights(AxisGrid(0.0, du, 1), 1.0, True)  # one footprint; shift it through one lattice cell
    kb = kg = 0.0
    for p in phases:
        w = _axis_weights(AxisGrid(p, du, 1), 1.0, True)
        kb += float((w.wb.astype(np.float64) ** 2).sum())
        kg += float((w.wg.astype(np.float64) ** 2).sum())
    kb /= len(phases)
    kg /= len(phases)
    return float(min(1.0, kb * kg / (BSPLINE_SQ_MEAN * GRADIENT_SQ_MEAN)))


def sample_field(
    seed: int, stream: int, field: Octaves, gy: AxisGrid, gx: AxisGrid, *, box: bool = True, stretch_x: float = 1.0
) -> FieldSample:
    """Sample a multi-octave noise field on a grid of footprints.

    Parameters
    ----------
    seed, stream : int
        Randomness: the field is a pure function of them (octave ``k`` uses stream ``stream*64 + k``).
    field : Octaves
        Lattice spacings in level-0 pixels and amplitudes.
    gy, gx : AxisGrid
        Footprints along rows and columns.
    box : bool
        True: footprint means (what a pixel shows).  False: values at the footprint centres (what a label at the
        pixel centre sees).  Octaves finer than the footprint are dropped in both modes, so the point field is
        the band-limited one.
    stretch_x : float
        Lattice spacing along x is ``stretch_x`` times the wavelength: > 1 gives streaks along x, < 1 along y
        (collagen fibres).

    Returns
    -------
    FieldSample
    """
    step = max(gy.step, gx.step)
    total = np.zeros((gy.n, gx.n), dtype=np.float32)
    removed = 0.0
    for k, (wl, amp) in enumerate(zip(field.wavelengths, field.amplitudes)):
        if amp == 0.0:
            continue
        if min(wl, wl * stretch_x) < MIN_WAVELENGTH_PER_STEP * step:
            removed += amp * amp
            continue
        if box:  # the shorter lattice axis governs what a square pixel averages away
            removed += amp * amp * (1.0 - retained_fraction(float(f"{step / min(wl, wl * stretch_x):.3g}")))
        wy = _axis_weights(gy, wl, box)
        wx = _axis_weights(gx, wl * stretch_x, box)
        rows = np.arange(wy.i0, wy.i0 + wy.m)[:, None]
        cols = np.arange(wx.i0, wx.i0 + wx.m)[None, :]
        scale = np.float32(2.0 * LATTICE_HALF_RANGE * amp)
        grad_x, grad_y = hash_uniform_pair(seed, stream * 64 + k, rows, cols)
        grad_x -= np.float32(0.5)
        grad_x *= scale
        grad_y -= np.float32(0.5)
        grad_y *= scale
        # term 1: a * G(u) B(v); term 2: b * B(u) G(v)   (u along columns/x, v along rows/y)
        total += _along_rows(_along_columns(grad_x, wx, wx.wg), wy, wy.wb)
        total += _along_rows(_along_columns(grad_y, wx, wx.wb), wy, wy.wg)
    return FieldSample(total, float(removed))


def coverage_above(sample: FieldSample, threshold: float | np.ndarray = 0.0, *, floor_std: float = 1e-3) -> np.ndarray:
    """Fraction of each footprint where the field exceeds ``threshold``.

    Inside a footprint the field is modelled as Gaussian with the footprint's mean and ``removed_var``, so the
    fraction is ``Φ((mean - threshold) / std)``.  This makes a thresholded field (tissue, goblet cells)
    anti-aliased at level 0 and consistent with the mean of level 0 at coarser levels.

    Returns
    -------
    ndarray float32, same shape as ``sample.mean``; exactly 0.5 where the mean equals the threshold.
    """
    std = math.sqrt(sample.removed_var + floor_std * floor_std)
    return ndtr((sample.mean - threshold) * (1.0 / std)).astype(np.float32)
