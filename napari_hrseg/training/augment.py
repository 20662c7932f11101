"""Augmentation for H&E crops: dihedral geometry, stain jitter in HED optical-density space, brightness/contrast.

Geometry (flips, 90-degree rotations) is applied identically to the image, labels, instance ids and weights;
colour changes touch the image only.  Stain jitter follows Tellez et al. (2018, "Whole-slide mitosis detection
in H&E breast histology using PHH3 as a reference to train distilled stain-invariant CNNs"): the image is
converted to optical density ``OD = -ln((I + 1) / 256)``, unmixed into haematoxylin, eosin and DAB
concentrations with the Ruifrok-Johnston stain matrix, each concentration is scaled by ``U(1 - a, 1 + a)`` and
shifted by ``U(-b, b)``, and the result is mixed back.  Slides differ mostly in stain amount and hue, which
this reproduces; a plain RGB jitter would also produce colours no stain makes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .samples import Sample

__all__ = ["Augment", "RGB_FROM_HED", "HED_FROM_RGB", "rgb_to_hed", "hed_to_rgb", "hed_jitter"]

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB (rows), normalised.
_M = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = (_M / np.linalg.norm(_M, axis=1, keepdims=True)).astype(np.float32)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED.astype(np.float64)).astype(np.float32)


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """Stain concentrations ``(H, W, 3)`` float32 (H, E, D) of a ``(H, W, 3)`` uint8 RGB image."""
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0)
    return od @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hed`: ``(H, W, 3)`` uint8 RGB, clipped to 0..255 (never wrapped)."""
    od = hed @ RGB_FROM_HED
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def hed_jitter(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Scale (``alpha``, 3 values) and shift (``beta``, 3 values) the H, E and D concentrations of an image."""
    hed = rgb_to_hed(image)
    hed = hed * np.asarray(alpha, np.float32) + np.asarray(beta, np.float32)
    return hed_to_rgb(hed)


def _dihedral(arr: np.ndarray | None, k: int, flip: bool) -> np.ndarray | None:
    if arr is None:
        return None
    if flip:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.rot90(arr, k, axes=(0, 1)))


@dataclass(frozen=True)
class Augment:
    """Random augmentation of a `Sample`; call it as ``augment(sample, rng)``.

    Parameters
    ----------
    flip : bool
        Random horizontal flip (with the rotations this gives all 8 dihedral orientations).
    rotate90 : bool
        Random rotation by a multiple of 90 degrees (square crops keep their shape; other crops are only
        rotated by 0 or 180 degrees).
    hed_alpha : float
        Stain-amount jitter: each of H, E, D is scaled by ``U(1 - hed_alpha, 1 + hed_alpha)``.
    hed_beta : float
        Stain-offset jitter in optical density: ``U(-hed_beta, hed_beta)`` added to each concentration.
    brightness : float
        Added ``U(-brightness, brightness) * 255`` to all channels.
    contrast : float
        Scales the deviation from the mean by ``U(1 - contrast, 1 + contrast)``.
    """

    flip: bool = True
    rotate90: bool = True
    hed_alpha: float = 0.08
    hed_beta: float = 0.02
    brightness: float = 0.06
    contrast: float = 0.1

    @classmethod
    def identity(cls) -> "Augment":
        """The setting that changes nothing (evaluation, or training without augmentation)."""
        return cls(flip=False, rotate90=False, hed_alpha=0.0, hed_beta=0.0, brightness=0.0, contrast=0.0)

    @property
    def is_identity(self) -> bool:
        return not (self.flip or self.rotate90 or self.hed_alpha or self.hed_beta or self.brightness or self.contrast)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if self.is_identity:
            return sample
        # Geometry: one draw shared by every per-pixel array so labels stay on their pixels.
        flip = bool(self.flip and rng.random() < 0.5)
        k = 0
        if self.rotate90:
            square = sample.shape[0] == sample.shape[1]
            k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        image = _dihedral(sample.image, k, flip)
        # Colour: image only.
        if self.hed_alpha or self.hed_beta:
            alpha = rng.uniform(1 - self.hed_alpha, 1 + self.hed_alpha, 3)
            beta = rng.uniform(-self.hed_beta, self.hed_beta, 3)
            image = hed_jitter(image, alpha, beta)
        if self.brightness or self.contrast:
            c = rng.uniform(1 - self.contrast, 1 + self.contrast)
            b = rng.uniform(-self.brightness, self.brightness) * 255.0
            f = image.astype(np.float32)
            mean = f.mean(axis=(0, 1), keepdims=True)
            image = np.clip(np.rint((f - mean) * c + mean + b), 0, 255).astype(np.uint8)
        return Sample(
            image,
            _dihedral(sample.labels, k, flip),
            _dihedral(sample.instances, k, flip),
            _dihedral(sample.weight, k, flip),
            key=sample.key,
            mpp=sample.mpp,
        )
