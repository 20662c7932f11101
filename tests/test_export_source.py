"""`LabelSource`: defaults, lazy chunking, and refusal of labels that cannot be exported."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_hrseg.errors import ExportError
from napari_hrseg.export import LabelSource


def test_defaults_from_a_plain_array():
    s = LabelSource.from_array(np.array([[0, 1], [3, 0]], np.uint8), mpp=0.5)
    assert s.class_names == ("background", "class 1", "class 2", "class 3")
    assert s.class_colors[:2] == ("#000000", "#e69f00") and len(s.class_colors) == 4
    assert s.kind == "semantic" and s.slide_shape == (2, 2) and s.level_mpp_yx == (0.5, 0.5)
    inst = LabelSource.from_array(np.zeros((4, 4), np.uint32), instance_classes={5: 2})
    assert inst.kind == "instance" and inst.class_names == ("background", "class 1", "class 2")
    assert inst.class_of(5) == 2 and inst.class_of(6) == 1  # unmapped objects are class 1
    mask = LabelSource.from_array(np.eye(3, dtype=bool))
    assert mask.dtype == np.uint8 and mask.class_names == ("background", "class 1")
    many = LabelSource.from_array(np.arange(20, dtype=np.uint8).reshape(4, 5))
    assert len(set(many.class_colors)) == 20  # past the palette, still distinct colours


def test_zarr_and_dask_sources_stay_lazy_with_their_chunks():
    z = zarr.create_array(store={}, shape=(5000, 3000), chunks=(512, 256), dtype="uint16")
    s = LabelSource.from_array(z, downsample=4, class_names=["bg", "t"], slide_shape=(20001, 12000))
    assert s.labels is z and s.chunks == (512, 256) and s.as_dask().chunksize == (512, 256)
    assert s.slide_shape == (20001, 12000) and s.level_mpp_yx is None
    d = da.zeros((100, 100), dtype=np.int32, chunks=(30, 40))
    assert LabelSource.from_array(d, class_names=["bg", "x"]).chunks == (30, 40)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": np.zeros((2, 2, 2), np.uint8)}, "expected \\(H, W\\)"),
        ({"labels": np.zeros((2, 2), np.float32)}, "must be integers"),
        ({"labels": np.zeros((0, 2), np.uint8)}, "empty"),
        (
            {"labels": np.zeros((2, 2), np.uint8), "class_names": ["a", "b"], "class_colors": ["#000000"]},
            "2 class names but 1 class colours",
        ),
        ({"labels": np.zeros((2, 2), np.uint8), "class_names": ["a", "A"]}, "not unique"),
        ({"labels": np.zeros((2, 2), np.uint8), "downsample": 0}, "positive"),
        ({"labels": np.zeros((100, 100), np.uint8), "downsample": 2, "slide_shape": (100, 100)}, "do not cover"),
        (
            {
                "labels": np.zeros((2, 2), np.uint32),
                "kind": "instance",
                "class_names": ["bg", "cell"],
                "instance_classes": {3: 4},
            },
            "class index 4",
        ),
        ({"labels": np.zeros((2, 2), np.uint8), "mpp": -1}, "positive numbers of µm"),
    ],
)
def test_unexportable_labels_are_refused(kwargs, message):
    labels = kwargs.pop("labels")
    with pytest.raises(ExportError, match=message):
        LabelSource.from_array(labels, **kwargs)
