"""Phase-2 training features: crops drawn at several scales, per-phase crop sizes and batch sizes (MagNet's
multi-scale segmenter and wide refiner crops, GLNet's several-patch crops), DUpsampling keeping a fitted basis and
fitting on sparse labels, fine-tuning sources that know their pixel size, auto-labelling that skips glass, and
half-precision weight files that load as float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_hrseg.geometry import Region
from napari_hrseg.models import create_model, load_model, save_model
from napari_hrseg.models.config import IGNORE_INDEX
from napari_hrseg.training import ArraySource, CropSampler, TrainConfig, train
from napari_hrseg.training.autolabel import iter_coarse_labels
from napari_hrseg.training.recipes import recipe_for
from napari_hrseg.training.windows import slide_window

TINY = dict(widths=(8, 16, 16, 32), fpn_width=16, head_width=16)


def _striped(h: int = 256, w: int = 256) -> ArraySource:
    """An image whose stripes are 8 px wide, so the pixel size a crop was read at shows in its stripe width."""
    image = np.full((h, w, 3), 230, np.uint8)
    labels = np.zeros((h, w), np.uint8)
    stripes = (np.arange(w) // 8) % 2 == 1
    image[:, stripes] = (120, 40, 140)
    labels[:, stripes] = 1
    return ArraySource(image, labels, mpp=1.0, key="stripes")


def _stripe_width(labels: np.ndarray) -> float:
    row = labels[labels.shape[0] // 2]
    row = row[row != IGNORE_INDEX]
    edges = np.count_nonzero(np.diff(row.astype(int)))
    return len(row) / max(1, edges)


def test_crops_are_drawn_at_every_scale_and_each_is_crop_pixels_wide():
    sampler = CropSampler([_striped()], mpp=1.0, crop=32, seed=0, scales=(0.25, 1.0))
    widths = sorted(_stripe_width(sampler._one().labels) for _ in range(24))
    assert all(s.image.shape == (32, 32, 3) for s in sampler.batch(4))
    # at scale 1 the stripes are 8 px wide, at scale 0.25 (4x coarser pixels) 2 px; both scales are drawn
    assert widths[0] < 3 and widths[-1] > 6
    sampler.reconfigure(crop=48, scales=(1.0,))
    assert sampler._one().image.shape[:2] == (48, 48)
    assert all(_stripe_width(sampler._one().labels) > 6 for _ in range(6))


def test_single_scale_sampling_repeats_what_it_always_drew():
    a = CropSampler([_striped()], mpp=1.0, crop=32, seed=3)
    b = CropSampler([_striped()], mpp=1.0, crop=32, seed=3, scales=(1.0,))
    for _ in range(5):
        assert np.array_equal(a._one().image, b._one().image)


def test_phases_set_their_crop_scales_and_batch_size(tmp_path):
    torch.manual_seed(0)
    model = create_model("magnet", num_classes=2, mpp=1.0, scales=(0.5, 1.0), patch_size=32, **TINY)
    recipe = type(recipe_for(model))(refiner_crop=96, refiner_batch_size=1)
    log = tmp_path / "log.jsonl"
    list(train(model, [_striped()], (), TrainConfig(steps=4, batch_size=2, crop=64, log_path=log), recipe=recipe))
    phases = [json.loads(line) for line in log.read_text().splitlines() if '"event": "phase"' in line]
    assert [(p["phase"], p["crop"], p["scales"], p["batch_size"]) for p in phases] == [
        ("segmenter", 64, [0.5, 1.0], 2), ("refiner", 96, [1.0], 1)]


def test_glnet_crops_are_several_patches_wide(tmp_path):
    torch.manual_seed(0)
    model = create_model("glnet", num_classes=2, mpp=1.0, size_p=48, size_g=48, min_overlap=8, **TINY)
    log = tmp_path / "log.jsonl"
    list(train(model, [_striped()], (), TrainConfig(steps=3, batch_size=1, crop=32, log_path=log)))
    crops = [json.loads(line)["crop"] for line in log.read_text().splitlines() if '"event": "phase"' in line]
    assert crops == [144, 144, 144]  # 3 x size_p, not the 32 asked for


def test_dupsampling_fits_on_sparse_labels_and_keeps_a_fitted_basis():
    torch.manual_seed(0)
    model = create_model("dupsampling", num_classes=2, mpp=1.0, widths=(8, 16, 16, 32), ratio=8, n_components=8)
    src = _striped()
    sparse = src.base.labels.copy()
    sparse[::7, :] = IGNORE_INDEX  # every 8 x 8 block has an unknown pixel: the strict fit has nothing to fit
    sparse_src = ArraySource(src.base.image, sparse, mpp=1.0, key="sparse")
    list(train(model, [sparse_src], (), TrainConfig(steps=1, batch_size=2, crop=64, lr=1e-12)))
    fitted = model.basis.clone()
    assert torch.any(model.basis_mean != 0)
    list(train(model, [src], (), TrainConfig(steps=1, batch_size=2, crop=64, lr=1e-12)))
    assert torch.equal(model.basis, fitted)  # a second run (fine-tuning) keeps the basis its decoder knows


def test_half_precision_weights_load_as_float32(tmp_path):
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=3, mpp=1.0, **TINY).eval()
    with torch.no_grad():  # running statistics that float16 keeps only approximately
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    save_model(model, tmp_path / "full")
    save_model(model, tmp_path / "half", dtype=torch.float16)
    full, half = (tmp_path / "full" / "model.safetensors").stat().st_size, (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half < 0.6 * full
    loaded = load_model(tmp_path / "half")
    assert all(v.dtype == torch.float32 for v in loaded.state_dict().values() if v.is_floating_point())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x)["logits"], loaded(x)["logits"]
    assert torch.allclose(a, b, atol=2e-2, rtol=1e-2)
    assert torch.equal(a.argmax(1), b.argmax(1)) or (a.argmax(1) != b.argmax(1)).float().mean() < 1e-3


def test_autolabelling_a_slide_skips_glass_tiles(tmp_path):
    from napari_hrseg.virtual import virtual_slide

    v = virtual_slide(0, size=1024, mpp=16.0)  # 16 mm at 16 µm/px: tissue in the middle, glass at the corners
    src = slide_window(v.slide, v.semantic, Region(0, 0, 1024, 1024), levels=1)
    torch.manual_seed(0)
    model = create_model("fpn", num_classes=5, mpp=16.0, **TINY)
    events = []
    gen = iter_coarse_labels(model, src.slide, tmp_path / "coarse.zarr", tile=128, halo=32, threshold=0.0)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            coarse = stop.value
            break
    last = events[-1]
    assert last.done == last.total and 0 < last.skipped < last.total
    labels = coarse.labels[...]
    assert np.all(labels[:128, :128] == IGNORE_INDEX)  # a glass corner: never predicted
    assert np.count_nonzero(labels != IGNORE_INDEX) > 0.2 * labels.size  # the tissue was
