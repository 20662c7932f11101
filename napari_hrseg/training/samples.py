"""`Sample`: one labelled image at a model's pixel size, the unit every training path exchanges.

Training crops, validation tiles, user corrections and coarse auto-labels are all `Sample`s, so the trainer,
the fine-tuner and the auto-labeller agree on one simple input:

- ``image``: ``(H, W, 3)`` uint8 RGB;
- ``labels``: ``(H, W)`` uint8 class per pixel, `IGNORE_INDEX` (255) where unknown;
- ``instances``: optional ``(H, W)`` int32 instance id (0 = no object);
- ``weight``: optional ``(H, W)`` float32 loss weight (e.g. corrections above coarse auto-labels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import TrainingError
from ..models.config import IGNORE_INDEX

__all__ = ["Sample", "IGNORE_INDEX"]


@dataclass(frozen=True, eq=False)
class Sample:
    """One labelled image.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` uint8 RGB.
    labels : numpy.ndarray
        ``(H, W)`` uint8 classes; `IGNORE_INDEX` where unknown.
    instances : numpy.ndarray, optional
        ``(H, W)`` int32 instance ids, 0 for background.
    weight : numpy.ndarray, optional
        ``(H, W)`` float32 per-pixel loss weight (1 where absent).
    key : str
        Identity of the image this sample comes from (a file, a slide region); used to split by image, to
        pair corrections with coarse labels, and in data fingerprints.
    mpp : float, optional
        Pixel size in µm; ``None`` means "already at the model's pixel size".
    """

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray | None = None
    weight: np.ndarray | None = None
    key: str = ""
    mpp: float | None = None

    def __post_init__(self):
        image = np.asarray(self.image)
        labels = np.asarray(self.labels)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise TrainingError(f"image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8",
                                subject=self.key or "sample")
        if labels.shape != image.shape[:2]:
            raise TrainingError(f"labels of shape {labels.shape} do not match the image {image.shape[:2]}",
                                subject=self.key or "sample", hint="labels must be at the image's pixel size")
        if labels.dtype != np.uint8:
            if labels.size and (labels.min() < 0 or labels.max() > 255):
                raise TrainingError("labels hold values outside 0..255", subject=self.key or "sample",
                                    hint="semantic labels are small class indices; pass instance ids as instances")
            labels = labels.astype(np.uint8)
        object.__setattr__(self, "image", image)
        object.__setattr__(self, "labels", labels)
        for name, dtype in (("instances", np.int32), ("weight", np.float32)):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.shape != image.shape[:2]:
                raise TrainingError(f"{name} of shape {arr.shape} do not match the image {image.shape[:2]}",
                                    subject=self.key or "sample")
            object.__setattr__(self, name, arr.astype(dtype, copy=False))

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.labels.shape  # type: ignore[return-value]

    @property
    def labelled_fraction(self) -> float:
        """Fraction of pixels whose label is known (not `IGNORE_INDEX`)."""
        return float(np.mean(self.labels != IGNORE_INDEX)) if self.labels.size else 0.0

    def evolve(self, **changes) -> "Sample":
        """A copy with some fields replaced."""
        return replace(self, **changes)
