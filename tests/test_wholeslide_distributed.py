"""Whole slides on a real dask.distributed `LocalCluster` of two worker *processes*: two slides give the same labels
as one process, the model travels as config + safetensors bytes, and worker errors keep their message."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from napari_hrseg.errors import HrsegError, SlideError
from napari_hrseg.inference import distributed as dist
from napari_hrseg.inference import run_to_completion
from napari_hrseg.inference.distributed import ModelPayload, make_client
from napari_hrseg.inference.wholeslide import SegmentOptions, segment_slides

from test_inference_support import CMU1, CMU1_PYRAMID, one_torch_thread, trained_tissue_model  # noqa: F401
from test_wholeslide import read_ome_zarr_labels

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

TILE = 128
SLIDES = (CMU1, CMU1_PYRAMID)  # the same tissue in two containers (the pyramid is a lossy re-encode)


@pytest.fixture(scope="module")
def model():
    return trained_tissue_model()


@pytest.fixture(scope="module")
def client():
    client, cluster = make_client(workers=2)
    yield client
    client.close()
    cluster.close()


def test_two_workers_give_the_same_labels_as_one_process(tmp_path, model, client, realdata):
    options = SegmentOptions(tile_size=TILE, tiles_per_task=1)
    local_out = [tmp_path / "local" / f"{i}.ome.zarr" for i in range(2)]
    dist_out = [tmp_path / "dask" / f"{i}.ome.zarr" for i in range(2)]
    local = run_to_completion(segment_slides(SLIDES, model, local_out, options=options))
    remote = run_to_completion(segment_slides(SLIDES, model, dist_out, options=options, client=client))
    for a, b, ra, rb in zip(local_out, dist_out, local, remote):
        la, lb = read_ome_zarr_labels(a), read_ome_zarr_labels(b)
        assert (la == 1).any()
        np.testing.assert_array_equal(la, lb)
        assert ra.tiles_computed == rb.tiles_computed > 0
    # both worker processes computed tiles: each built the model from the broadcast payload
    built = client.run(lambda: len(dist._MODELS))
    pids = client.run(__import__("os").getpid)
    assert len(set(pids.values())) == 2 and all(n == 1 for n in built.values())


def test_workers_keep_glibcs_adaptive_malloc(client):
    """dask's default MALLOC_TRIM_THRESHOLD_ turns off glibc's adaptive mmap threshold (every large tensor a fresh,
    page-faulting mmap: 1.6x the CPU per tile); `make_client`'s workers start without it, on one torch thread."""
    import os

    env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
    assert len(env) == 2 and all(v == (os.environ.get("MALLOC_TRIM_THRESHOLD_"), "1") for v in env.values())


def test_the_model_travels_as_data_not_as_a_module(model):
    payload = ModelPayload.from_model(model)
    blob = pickle.dumps(payload)
    assert b"torch.nn" not in blob and b"FPNSegmenter" not in blob
    rebuilt = payload.build()
    for (k, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(rebuilt.state_dict().items())):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert ModelPayload.from_model(rebuilt).fingerprint == payload.fingerprint


def test_worker_errors_reach_the_client_with_their_message(tmp_path, model, client):
    """A slide that changed on disk after planning is refused by the worker, with the reason."""
    import shutil

    copy = tmp_path / "copy.svs"
    shutil.copy(CMU1, copy)
    gen = segment_slides([copy], model, [tmp_path / "x.ome.zarr"], options=SegmentOptions(tile_size=TILE), client=client)
    next(gen)  # planned (fingerprint taken); now replace the file with another slide
    shutil.copy(CMU1_PYRAMID, copy)
    with pytest.raises(SlideError, match="not the slide that was planned"):
        run_to_completion(gen)


def test_in_memory_slides_cannot_be_distributed(tmp_path, model, client):
    from napari_hrseg.slide import Slide, open_slide

    s = open_slide(CMU1)
    mem = Slide(s.levels, mpp_yx=s.mpp_yx, name="in-memory")
    with pytest.raises(HrsegError, match="in-memory slide"):
        run_to_completion(segment_slides([mem], model, [tmp_path / "m.ome.zarr"], client=client))


def test_cli_runs_on_an_existing_scheduler(tmp_path, model, client):
    from napari_hrseg.cli import main
    from napari_hrseg.models import save_model

    model_dir = save_model(model, tmp_path / "model")
    out = tmp_path / "results"
    argv = ["segment", str(CMU1), str(CMU1_PYRAMID), "--model", str(model_dir), "--out", str(out), "--tile-size", str(TILE),
            "--scheduler", client.scheduler.address, "--no-progress"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["CMU-1-Small-Region.labels.ome.zarr", "CMU-1-Small-Region.vips-pyramid.labels.ome.zarr"]
