"""Tiler geometry, Stitcher blending (memory and zarr), and exactness of tiled inference with a real FPN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from napari_hrseg.errors import RegionError
from napari_hrseg.geometry import Region
from napari_hrseg.models import create_model, to_input_tensor
from napari_hrseg.tiling import Stitcher, Tiler, blend_window, estimate_halo

from test_inference_support import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------- geometry
@pytest.mark.parametrize(
    "region, tile, halo, stride, anchor",
    [
        (Region(0, 0, 301, 427), 96, 64, 32, (0, 0)),
        (Region(17, -5, 200, 131), 50, 10, 8, (0, 0)),  # tile and halo rounded up to the stride
        (Region(1000, 2000, 64, 64), 64, 0, 1, (1000, 2000)),
        (Region(3, 7, 1, 1), 512, 96, 32, (0, 0)),
        (Region(5, 5, 333, 77), (40, 24), (16, 8), 4, (1, 3)),
    ],
)
def test_cores_partition_the_region_and_windows_align(region, tile, halo, stride, anchor):
    tiler = Tiler(region, tile, halo, stride=stride, anchor=anchor)
    count = np.zeros(region.shape, dtype=np.int32)
    th, tw = tiler.tile_size
    assert th % stride == 0 and tw % stride == 0
    assert tiler.halo[0] % stride == 0 and tiler.halo[1] % stride == 0
    for t in tiler:
        assert region.contains(t.core) and not t.core.is_empty
        assert t.write == t.core
        assert t.window.shape == tiler.window_shape
        # every window starts on the model's feature lattice (anchored), so features match a whole pass
        assert (t.window.row - anchor[0]) % stride == 0 and (t.window.col - anchor[1]) % stride == 0
        # the core has at least the halo of context on every side
        assert t.window.expand((-tiler.halo[0], -tiler.halo[1])).contains(t.core)
        rel = t.core.relative_to(region)
        count[rel.slices] += 1
    assert (count == 1).all()
    assert len(list(tiler)) == len(tiler) == tiler.grid_shape[0] * tiler.grid_shape[1]


def test_overlap_writes_stay_in_region_and_need_halo():
    region = Region(0, 0, 250, 190)
    tiler = Tiler(region, 64, 32, stride=16, overlap=16)
    for t in tiler:
        assert t.write.contains(t.core) and region.contains(t.write)
        assert t.window.contains(t.write)
    with pytest.raises(RegionError):
        Tiler(region, 64, 16, stride=16, overlap=32)
    with pytest.raises(RegionError):
        Tiler(Region(0, 0, 0, 10), 64)


def test_lattice_is_shared_between_overlapping_regions():
    """Two viewports that overlap cut the shared pixels into the same tiles (same labels on pan)."""
    a = {t.window for t in Tiler(Region(0, 0, 700, 700), 256, 64, stride=32)}
    b = {t.window for t in Tiler(Region(300, 300, 700, 700), 256, 64, stride=32)}
    shared = [w for w in b if w in a]
    assert len(shared) == 4


# ---------------------------------------------------------------------- stitching
def test_crop_stitcher_writes_each_pixel_from_its_owner():
    region = Region(10, 20, 130, 170)
    tiler = Tiler(region, 48, 16, stride=16)
    st = Stitcher.in_memory(region, None, np.int32)
    for t in tiler:
        st.add(t, np.full(t.window.shape, t.index + 1, dtype=np.int32))
    out = st.finalize(require_complete=True)
    for t in tiler:
        assert (out[t.core.relative_to(region).slices] == t.index + 1).all()


@pytest.mark.parametrize("backend", ["memory", "zarr"])
def test_cosine_blending_preserves_smooth_fields(tmp_path, backend):
    region = Region(0, 0, 150, 203)
    tiler = Tiler(region, 40, 24, stride=8, overlap=12)
    yy, xx = np.mgrid[-24:240, -24:300].astype(np.float32)
    field = np.stack([np.ones_like(yy), 0.5 * yy + 0.25 * xx])  # (2, H, W): a constant and a linear ramp
    if backend == "memory":
        st = Stitcher.in_memory(region, 2, np.float32, mode="cosine")
    else:
        root = zarr.open_group(tmp_path / "blend.zarr", mode="w")
        out = root.create_array("sum", shape=(2,) + region.shape, chunks=(2, 64, 64), dtype="float32", fill_value=0)
        weights = root.create_array("w", shape=region.shape, chunks=(64, 64), dtype="float32", fill_value=0)
        st = Stitcher(region, out, mode="cosine", weights=weights)
    for t in tiler:
        w = t.window
        st.add(t, field[:, w.row + 24 : w.end_row + 24, w.col + 24 : w.end_col + 24])
    result = np.asarray(st.finalize(require_complete=True)[...])
    np.testing.assert_allclose(result, field[:, 24 : 24 + 150, 24 : 24 + 203], rtol=1e-5, atol=1e-4)


def test_blend_window_cross_fades_to_one():
    ramp = 8
    a = blend_window(64, ramp, start_edge=True)
    b = blend_window(64, ramp, end_edge=True)
    # a's last 2*ramp pixels overlap b's first 2*ramp pixels
    np.testing.assert_allclose(a[-2 * ramp :] + b[: 2 * ramp], 1.0, atol=1e-6)
    assert a[0] == 1.0 and b[-1] == 1.0 and a.min() > 0


def test_stitcher_refuses_labels_for_blending_and_incomplete_results():
    region = Region(0, 0, 64, 64)
    with pytest.raises(ValueError):
        Stitcher.in_memory(region, None, np.uint8, mode="cosine")
    st = Stitcher.in_memory(region, None, np.uint8)
    tiler = Tiler(region, 32, 0)
    st.add(tiler[0], np.ones((32, 32), np.uint8))
    assert st.coverage == pytest.approx(0.25)
    with pytest.raises(RegionError):
        st.finalize(require_complete=True)


# ---------------------------------------------------------------------- exactness with a real model
@pytest.fixture(scope="module")
def fpn():
    torch.manual_seed(0)
    model = create_model(
        "fpn", num_classes=3, widths=(8, 16, 24, 32), depths=(1, 1, 1, 1), stem_width=8, fpn_width=16, head_width=16
    )
    # Non-trivial batch-norm statistics, as after training (fresh ones are 0/1).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def he_image(realdata):
    """A real H&E image (GlaS), cropped to odd sizes below."""
    path = sorted((realdata / "glas-test-subset" / "images").glob("*.png"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


def _tiled_vs_whole(model, image, tile, halo, overlap=0, mode="crop"):
    """Tiled logits over the whole image vs one pass over the same surroundings (white beyond the image)."""
    region = Region.from_shape(image.shape)
    tiler = Tiler.for_model(model, region, tile, halo=halo, overlap=overlap)
    hy, hx = tiler.halo
    # The surroundings every window can reach: the image, white glass around it.
    rows, cols = tiler.grid_shape
    canvas_shape = (rows * tiler.tile_size[0] + 2 * hy, cols * tiler.tile_size[1] + 2 * hx, 3)
    canvas = np.full(canvas_shape, 255, np.uint8)
    canvas[hy : hy + image.shape[0], hx : hx + image.shape[1]] = image
    with torch.inference_mode():
        whole = model(to_input_tensor(canvas, model.config))["logits"][0, :, hy : hy + image.shape[0], hx : hx + image.shape[1]]
        st = Stitcher.in_memory(region, model.config.num_classes, np.float32, mode=mode)
        windows = [t.window for t in tiler]
        batch = np.stack([canvas[w.row + hy : w.end_row + hy, w.col + hx : w.end_col + hx] for w in windows])
        logits = model(to_input_tensor(batch, model.config))["logits"]
        for t, values in zip(tiler, logits):
            st.add(t, values)
    return st.finalize(require_complete=True), whole.numpy(), len(tiler)


@pytest.fixture(scope="module")
def strict_halo(fpn):
    return estimate_halo(fpn)


def test_estimated_halo_covers_the_receptive_field(fpn, strict_halo):
    assert strict_halo % fpn.stride == 0 and 64 <= strict_halo <= 512


@pytest.mark.parametrize(
    "size, tile, overlap, mode",
    [
        ((301, 427), 96, 0, "crop"),
        ((257, 199), 64, 0, "crop"),
        ((129, 333), 160, 0, "crop"),
        ((301, 227), 96, 32, "cosine"),
    ],
)
def test_tiled_inference_equals_whole_image_pass(fpn, he_image, strict_halo, size, tile, overlap, mode):
    image = he_image[13 : 13 + size[0], 29 : 29 + size[1]]
    tiled, whole, n = _tiled_vs_whole(fpn, image, tile, strict_halo, overlap, mode)
    assert n > 1
    scale = float(np.abs(whole).max())
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5 * scale)


def test_model_declared_halo_is_close_and_no_halo_is_not(fpn, he_image):
    """With the architecture's declared ``halo`` tiles agree closely; without context they visibly do not."""
    image = he_image[:217, :301]
    tiled, whole, _ = _tiled_vs_whole(fpn, image, 96, fpn.halo)
    scale = float(np.abs(whole).max())
    assert np.abs(tiled - whole).max() <= 1e-2 * scale
    assert (tiled.argmax(0) == whole.argmax(0)).mean() > 0.999
    bare, whole, _ = _tiled_vs_whole(fpn, image, 96, 0)
    assert np.abs(bare - whole).max() > 1e-2 * scale
