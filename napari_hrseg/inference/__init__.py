"""The inference engine: region pipelines (generators of progress events ending in a `Prediction`), tiling,
devices, tissue detection, and whole-slide segmentation out of core, locally or on dask.distributed.

Headless: imports no Qt and no napari.  Typical use::

    from napari_hrseg.inference import InferenceOptions, InferenceRequest, run_request, run_to_completion
    request = InferenceRequest(slide, region, model, InferenceOptions(method="sliding_window"))
    prediction = run_to_completion(run_request(request))

    # multi-scale: "magnet", "magnet_fast", "hmsa", "glnet"; instance models: "instances" (see each module)
    request = InferenceRequest(slide, region, magnet_model, InferenceOptions(method="magnet"))
    for event in run_request(request):   # StageDone(stage=1) carries the coarse result at once
        ...

    # a whole slide, out of core, resumable (what `napari-hrseg segment` runs)
    result = run_to_completion(segment_slide("slide.svs", model, "slide.labels.ome.zarr"))
"""

from .device import InferenceDevice, available_devices, resolve_device
from .grid import MPP_TOLERANCE, PixelGrid
from .instances import ObjectTable
from .pipelines import get_pipeline, list_pipelines, register_pipeline, run_request
from .tissue import TissueMask, detect_tissue, tissue_mask_for
from .wholeslide import SegmentOptions, SlideDone, SlideFailed, WholeSlideResult, segment_slide, segment_slides
from .types import (
    CancelToken,
    Finished,
    InferenceOptions,
    InferenceRequest,
    Prediction,
    ProgressEvent,
    StageDone,
    Started,
    TileDone,
    next_request_id,
    run_to_completion,
)

__all__ = [
    "CancelToken",
    "Finished",
    "InferenceDevice",
    "InferenceOptions",
    "InferenceRequest",
    "MPP_TOLERANCE",
    "ObjectTable",
    "PixelGrid",
    "SegmentOptions",
    "SlideDone",
    "SlideFailed",
    "WholeSlideResult",
    "segment_slide",
    "segment_slides",
    "Prediction",
    "ProgressEvent",
    "StageDone",
    "Started",
    "TileDone",
    "TissueMask",
    "available_devices",
    "detect_tissue",
    "get_pipeline",
    "list_pipelines",
    "next_request_id",
    "register_pipeline",
    "resolve_device",
    "run_request",
    "run_to_completion",
    "tissue_mask_for",
]
