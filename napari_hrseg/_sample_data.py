"""npe2 sample-data commands (napari's File > Open Sample): the virtual gigapixel slide and a small real slide.

Both return napari layer-data tuples and render or read nothing: the virtual slide's pyramids are lazy and its
ground truth comes as hidden labels layers (showing one renders only what is on screen); the real slide is
opened through `open_slide`, which reads metadata only.  This module imports neither napari nor Qt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .errors import SlideError
from .slide import open_slide
from .virtual import virtual_slide
from .virtual.virtual_slide import VirtualSlide

__all__ = [
    "virtual_slide_sample", "small_real_slide_sample", "virtual_slide_layers", "sample_data_dir", "SMALL_REAL_SLIDE",
]

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict[str, Any], str]

#: File name of the small real slide in `sample_data_dir()`.
SMALL_REAL_SLIDE = "CMU-1-Small-Region.svs"


def sample_data_dir() -> Path:
    """``$HRSEG_SAMPLE_DATA`` if set, else ``sample_data/`` beside the package (a source checkout)."""
    env = os.environ.get("HRSEG_SAMPLE_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "sample_data"


def virtual_slide_layers(vs: VirtualSlide, *, ground_truth: bool = True) -> list[LayerData]:
    """Layer data for a virtual slide: the multiscale RGB image, then (hidden) class and nucleus labels.

    The labels layers are lazy pyramids like the image; napari computes nothing for a hidden layer, and only
    the visible tiles once the user shows it.
    """
    layers: list[LayerData] = [(vs.slide.as_layer_data(), vs.slide.layer_kwargs(), "image")]
    if ground_truth:
        colours = {i: c for i, c in enumerate(vs.class_colors) if i > 0}
        colours[0] = "transparent"
        colours[None] = "transparent"
        common = {"multiscale": True, "visible": False, "opacity": 0.5}
        layers.append(
            (
                list(vs.semantic),
                {**common, "name": f"{vs.slide.name} classes", "colormap": colours,
                 "metadata": {"class_names": list(vs.class_names), "ground_truth": "semantic"}},
                "labels",
            )
        )
        layers.append(
            (
                list(vs.instances),
                {**common, "name": f"{vs.slide.name} nuclei", "metadata": {"ground_truth": "instances"}},
                "labels",
            )
        )
    return layers


def virtual_slide_sample() -> list[LayerData]:
    """The default virtual slide (seed 0, 100,000 x 100,000 px, 9 levels, ``"he"`` palette) with its ground truth."""
    return virtual_slide_layers(virtual_slide(seed=0))


def small_real_slide_sample() -> list[LayerData]:
    """OpenSlide's CMU-1-Small-Region (Aperio SVS, 2220 x 2967 px, 0.499 µm/px), opened lazily.

    Raises
    ------
    SlideError
        If the file is not there (an installed wheel ships no ``sample_data/``; set ``HRSEG_SAMPLE_DATA``).
    """
    path = sample_data_dir() / SMALL_REAL_SLIDE
    if not path.is_file():
        raise SlideError(
            "the small real sample slide is not installed",
            subject=path,
            hint="run from a source checkout, or set HRSEG_SAMPLE_DATA to a folder holding " + SMALL_REAL_SLIDE,
        )
    slide = open_slide(path)
    data = slide.as_layer_data() if slide.level_count > 1 else slide.levels[0]
    log.info("sample slide %s: %d levels", path.name, slide.level_count)
    return [(data, slide.layer_kwargs(), "image")]
