"""Checks that a model, a slide, a region and a label store fit together, with errors that say what to do.

Run before any pixel is read, so a mismatch costs milliseconds, not a half-segmented slide.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import IncompatibleModelError, RegionError
from ..geometry import Region
from ..models.config import ModelConfig
from ..slide import Slide
from .grid import MPP_TOLERANCE, PixelGrid

__all__ = ["check_region", "check_model_for_slide", "check_classes", "model_grid"]


def check_region(slide: Slide, region: Region | None) -> Region:
    """The part of ``region`` (level-0 pixels) inside the slide; the whole slide for None.

    Raises
    ------
    RegionError
        For an empty region or one entirely outside the slide (with the slide's extent).
    """
    extent = Region.from_shape(slide.shape)
    if region is None:
        return extent
    if region.is_empty:
        raise RegionError(f"region {region} is empty", subject=slide.name, hint="give a positive height and width")
    inside = region.intersect(extent)
    if inside.is_empty:
        raise RegionError(
            f"region {region} (row,col,height,width in level-0 pixels) lies outside the slide, which is "
            f"{extent.height} rows x {extent.width} columns",
            subject=slide.path or slide.name,
            hint="choose a region that overlaps the slide",
        )
    return inside


def check_model_for_slide(config: ModelConfig, slide: Slide, *, task: str | None = "semantic") -> None:
    """Raise `IncompatibleModelError` if the model cannot read this slide (channels, task)."""
    if config.in_channels != slide.n_channels:
        names = ", ".join(slide.channel_names)
        raise IncompatibleModelError(
            f"model {config.label} takes {config.in_channels} input channels but the slide has {slide.n_channels} ({names})",
            subject=slide.path or slide.name,
            hint="use a model trained on this kind of image (brightfield RGB or this multiplex panel)",
        )
    if task is not None and config.task != task:
        raise IncompatibleModelError(
            f"model {config.label} is a {config.task} model; this pipeline needs a {task} model",
            subject=config.label,
            hint="pick a pipeline for its task (instances for instance models)",
        )


def check_classes(config: ModelConfig, class_names: Sequence[str], *, subject: str | None = None) -> None:
    """Raise `IncompatibleModelError` if a label store's classes differ from the model's.

    Parameters
    ----------
    config : ModelConfig
        The model.
    class_names : sequence of str
        Class names of the store the model's labels would be written into (index = label value).
    """
    if len(class_names) != config.num_classes:
        raise IncompatibleModelError(
            f"model {config.label} predicts {config.num_classes} classes ({', '.join(config.class_names)}) but the "
            f"label store has {len(class_names)} ({', '.join(class_names)})",
            subject=subject,
            hint="use a model trained for this store's classes, or a new store",
        )
    if tuple(class_names) != tuple(config.class_names):
        raise IncompatibleModelError(
            f"model {config.label} names its classes {list(config.class_names)} but the label store has {list(class_names)}",
            subject=subject,
            hint="use a model trained for this store's classes, or a new store",
        )


def model_grid(slide: Slide, config: ModelConfig, *, tolerance: float = MPP_TOLERANCE) -> PixelGrid:
    """The grid at the model's pixel size (``config.mpp``); see `PixelGrid.for_mpp` for the errors."""
    return PixelGrid.for_mpp(slide, config.mpp, tolerance=tolerance)
