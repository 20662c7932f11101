"""Counter-based random numbers: a value is a pure function of ``(seed, stream, iy, ix)``.

The virtual slide never keeps a list of objects.  Every random quantity (a lattice value of a noise octave, the
centre of a gland, the size of a nucleus) is drawn from a hash of the seed, a *stream* number naming the
quantity, and the integer coordinates of the spatial cell it belongs to.  Any chunk can therefore be rendered on
its own, and an object that straddles two chunks is drawn identically from both.

The mixer is SplitMix64's finaliser (Steele, Lea & Flood, OOPSLA 2014), applied to a linear combination of the
inputs with large odd multipliers.  It is vectorised over numpy arrays; unsigned 64-bit arithmetic wraps, which is
exactly what the hash wants.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hash_u64", "hash_uniform", "hash_uniform_pair", "Stream"]

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0x165667B19E3779F9)
_M4 = np.uint64(0xD6E8FEB86659FD93)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / float(1 << 53)


class Stream:
    """Named stream numbers, so that two quantities never share random numbers by accident."""

    # noise lattices (one stream per field; octaves are folded into the stream by the noise module)
    TISSUE = 1
    MUCOSA = 2
    TUMOUR = 3
    LYMPH = 4
    ORIENT = 5
    ROUGH_OUT = 6
    ROUGH_IN = 7
    TEX_STROMA = 8
    TEX_EPI = 9
    GOBLET = 10
    TEX_LUMEN = 11
    TEX_GLASS = 12
    CHROMATIN = 13
    DESMO = 14
    # per-object draws
    SLIDE = 100
    GLAND = 200  # 200..299: one stream per gland parameter
    NUCLEUS = 400  # 400..699: 100 per nucleus layer
    FIBRE = 800


def _mix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


def hash_u64(seed: int, stream: int, iy, ix) -> np.ndarray:
    """64-bit hash of ``(seed, stream, iy, ix)``, broadcast over ``iy`` and ``ix`` (integer arrays, any sign).

    Returns
    -------
    numpy.ndarray of uint64, the broadcast shape of ``iy`` and ``ix``.
    """
    iy = np.asarray(iy).astype(np.int64).view(np.uint64)
    ix = np.asarray(ix).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):  # wrapping is the point; numpy warns only for scalars
        base = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _M1 + np.uint64(stream & 0xFFFFFFFF) * _M2)
        return _mix(_mix(base ^ (iy * _M3)) ^ (ix * _M4))


def hash_uniform(seed: int, stream: int, iy, ix) -> np.ndarray:
    """Uniform floats in ``[0, 1)`` (float64), one per broadcast element of ``iy`` and ``ix``."""
    return (hash_u64(seed, stream, iy, ix) >> np.uint64(11)).astype(np.float64) * _TO_UNIT


_TO_UNIT32 = np.float32(1.0 / float(1 << 32))


def hash_uniform_pair(seed: int, stream: int, iy, ix) -> tuple[np.ndarray, np.ndarray]:
    """Two independent float32 uniforms in ``[0, 1)`` per element, from the two halves of one 64-bit hash.

    Half the cost of two `hash_uniform` calls; 32 bits of resolution is plenty for noise lattices.
    """
    h = hash_u64(seed, stream, iy, ix)
    hi = (h >> np.uint64(32)).astype(np.float32) * _TO_UNIT32
    lo = (h & np.uint64(0xFFFFFFFF)).astype(np.float32) * _TO_UNIT32
    return hi, lo
