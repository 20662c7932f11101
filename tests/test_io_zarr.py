"""Zarr stores: OME-Zarr 0.4 / 0.5 from realdata, NGFF axes and units, plain arrays and groups, bioformats2raw,
and missing chunks (plain and sharded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_hrseg import Region, open_slide
from napari_hrseg.errors import CorruptSlideError

CMU = "derived-from-cmu1"


@pytest.mark.parametrize(
    "name,version", [("CMU-1-Small-Region.ome.zarr", "0.4"), ("CMU-1-Small-Region.ome-v05.zarr", "0.5")]
)
def test_realdata_ome_zarr(realdata, name, version):
    slide = open_slide(realdata / CMU / name)
    assert slide.format == f"ome-zarr-{version}" and slide.metadata["ngff.version"] == version
    assert slide.metadata["zarr_format"] == (2 if version == "0.4" else 3)
    assert slide.mpp_yx == pytest.approx((0.499, 0.499))
    assert slide.level_count == 4 and slide.is_rgb
    assert [c[0] for c in slide.levels[0].chunks[:2]] == [256, 256]  # the store's chunks
    assert any("channel-first" in c for c in slide.conversions)


def _ngff_5d(root: Path, *, zarr_format: int, unit: str = "nanometer") -> np.ndarray:
    """A t, c, z, y, x uint16 multiscale (NGFF 0.4 on zarr v2 or 0.5 on v3) with omero channel labels."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 4000, size=(2, 2, 3, 300, 200), dtype=np.uint16)
    group = zarr.open_group(root, mode="w", zarr_format=zarr_format)
    axes = [
        {"name": "t", "type": "time"},
        {"name": "c", "type": "channel"},
        {"name": "z", "type": "space", "unit": unit},
        {"name": "y", "type": "space", "unit": unit},
        {"name": "x", "type": "space", "unit": unit},
    ]
    datasets = []
    for i, f in enumerate((1, 2)):
        level = data[..., ::f, ::f]
        group.create_array(str(i), data=level, chunks=(1, 1, 1, 128, 128))
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 500, 250 * f, 250 * f]}]}
        )
    ms = {"axes": axes, "datasets": datasets, "name": "five-d"}
    omero = {"channels": [{"label": "DAPI", "color": "0000FF"}, {"label": "CD8", "color": "00FF00"}]}
    if zarr_format == 2:
        group.attrs.update({"multiscales": [{**ms, "version": "0.4"}], "omero": omero})
    else:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": [ms], "omero": omero}})
    return data


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ngff_axes_units_and_planes(tmp_path, zarr_format):
    data = _ngff_5d(tmp_path / "five.ome.zarr", zarr_format=zarr_format)
    slide = open_slide(tmp_path / "five.ome.zarr")
    assert slide.shape == (300, 200, 2) and slide.dtype == np.uint16
    assert slide.mpp_yx == pytest.approx((0.25, 0.25))  # 250 nanometre
    assert slide.channel_names == ("DAPI", "CD8") and not slide.is_rgb
    assert slide.layer_kwargs()["colormap"] == ["#0000ff", "#00ff00"]
    assert any("axis t has 2 planes" in c for c in slide.conversions)
    assert any("axis z has 3 planes" in c for c in slide.conversions)
    assert np.array_equal(slide.read(Region(0, 0, 300, 200)), np.moveaxis(data[0, :, 0], 0, -1))
    other = open_slide(tmp_path / "five.ome.zarr", planes={"z": 2, "t": 1})
    assert np.array_equal(
        other.read_level(1, Region(10, 20, 50, 60)), np.moveaxis(data[1, :, 2, ::2, ::2], 0, -1)[10:60, 20:80]
    )


def test_ngff_without_units_states_no_pixel_size(tmp_path):
    root = tmp_path / "nounit.ome.zarr"
    _ngff_5d(root, zarr_format=2, unit="")
    assert open_slide(root).mpp_yx is None


def test_plain_arrays_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (700, 500), dtype=np.uint8)
    zarr.create_array(tmp_path / "grey.zarr", data=grey, chunks=(128, 128))
    slide = open_slide(tmp_path / "grey.zarr")
    assert slide.shape == (700, 500, 1) and slide.format == "zarr-v3"
    assert np.array_equal(slide.read(Region(0, 0, 700, 500))[..., 0], grey)

    rgb = rng.integers(0, 255, (2100, 1300, 3), dtype=np.uint8)
    zarr.create_array(tmp_path / "rgb.zarr", data=rgb, chunks=(256, 256, 3), zarr_format=2)
    slide = open_slide(tmp_path / "rgb.zarr")
    assert slide.is_rgb and slide.level_count == 3  # coarse levels added for napari's overview
    assert np.array_equal(slide.read(Region(2000, 1200, 100, 100)), rgb[2000:, 1200:])

    five = rng.integers(0, 255, (5, 300, 400), dtype=np.uint8)
    zarr.create_array(tmp_path / "cyx.zarr", data=five, chunks=(1, 100, 100))
    slide = open_slide(tmp_path / "cyx.zarr")
    assert slide.shape == (300, 400, 5)
    assert np.array_equal(slide.levels[0].compute(), np.moveaxis(five, 0, -1))

    group = zarr.open_group(tmp_path / "plain-pyramid.zarr", mode="w")
    group.create_array("small", data=rgb[::4, ::4], chunks=(128, 128, 3))
    group.create_array("big", data=rgb, chunks=(128, 128, 3))
    slide = open_slide(tmp_path / "plain-pyramid.zarr")
    assert slide.format == "zarr-multiscale" and slide.level_shapes[:2] == ((2100, 1300), (525, 325))


def test_bioformats2raw_layout_opens_series(tmp_path, realdata):
    root = zarr.open_group(tmp_path / "b2r.zarr", mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    source = zarr.open_group(realdata / CMU / "CMU-1-Small-Region.ome.zarr", mode="r")
    series = root.create_group("0")
    series.attrs.update(dict(source.attrs))
    for name in ("s0", "s1", "s2", "s3"):
        series.create_array(name, data=source[name][:], chunks=(3, 256, 256))
    slide = open_slide(tmp_path / "b2r.zarr")
    assert slide.format == "ome-zarr-0.4" and slide.level_count == 4
    assert slide.mpp_yx == pytest.approx((0.499, 0.499))


def test_missing_shard_of_sharded_array_is_an_error(tmp_path):
    """With sharding, zarr reads byte ranges of a shard; a missing shard is caught there too."""
    rng = np.random.default_rng(2)
    data = rng.integers(1, 255, (512, 512, 3), dtype=np.uint8)
    zarr.create_array(tmp_path / "sharded.zarr", data=data, chunks=(64, 64, 3), shards=(256, 256, 3))
    shard = next(p for p in (tmp_path / "sharded.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")
    key = shard.relative_to(tmp_path / "sharded.zarr").as_posix()
    shard.unlink()
    slide = open_slide(tmp_path / "sharded.zarr")
    with pytest.raises(CorruptSlideError, match=key) as info:
        slide.levels[0].compute()
    assert "sharded.zarr" in str(info.value) and "missing_chunks='fill'" in str(info.value)
