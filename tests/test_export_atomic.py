"""Atomic exports: an interrupted or failed export leaves no file that looks complete and never damages the
previous export.  The failures are real: a file-size limit (RLIMIT_FSIZE) in a child process, a child killed with
SIGKILL in the middle of writing, and a full disk (a 256 KiB tmpfs in a private mount namespace)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_hrseg.errors import ExportError
from napari_hrseg.export import LabelSource, export_geojson, export_labels
from napari_hrseg.export._atomic import PARTIAL_SUFFIX, atomic_output, os_error_to_export_error

REPO = Path(__file__).resolve().parents[1]

# Child-process preamble: 900 square objects: a GeoJSON of ~400 KB, a CSV of ~70 KB, an OME-TIFF of ~9 KB.
PREAMBLE = textwrap.dedent(
    """
    import sys, os, json, time, signal, resource
    import numpy as np
    from napari_hrseg.export import LabelSource, export_labels
    from napari_hrseg.errors import HrsegError
    ids = np.arange(1, 901, dtype=np.int32).reshape(30, 30)
    labels = np.kron(ids, np.ones((16, 16), np.int32))
    labels[::16, :] = 0
    source = LabelSource.from_array(labels, kind="instance", mpp=0.5)
    """
)


def _run(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PREAMBLE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        **kwargs,
    )


def _source() -> LabelSource:
    ids = np.arange(1, 901, dtype=np.int32).reshape(30, 30)
    labels = np.kron(ids, np.ones((16, 16), np.int32))
    labels[::16, :] = 0
    return LabelSource.from_array(labels, kind="instance", mpp=0.5)


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_file_size_limit_ends_in_export_error_and_keeps_the_previous_export(tmp_path):
    names = ("nuclei.geojson", "nuclei.ome.tif", "nuclei.csv")
    for name in names:
        (tmp_path / name).write_text("previous complete export")
    result = _run(
        f"""
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # each export is over 8 KiB
        results = {{}}
        for name in {names!r}:
            try:
                export_labels(source, os.path.join({str(tmp_path)!r}, name))
                results[name] = "written"
            except HrsegError as exc:
                results[name] = type(exc).__name__ + ": " + str(exc)
        print(json.dumps(results))
        """
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name in names:
        assert results[name].startswith("ExportError: "), results[name]
        assert "disk is full (or a file-size limit was reached)" in results[name] and name in results[name]
        assert (tmp_path / name).read_text() == "previous complete export"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary file left behind


@pytest.mark.parametrize("name", ["slide.ome.tif", "slide.ome.zarr"])
def test_killed_export_leaves_no_complete_looking_file_and_is_cleaned_up_next_time(tmp_path, name):
    target = tmp_path / name
    marker = tmp_path / ".started"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PREAMBLE
            + textwrap.dedent(
                f"""
                def progress(done, total):
                    if done == 1:  # the first chunk or tile is on disk, the rest is not
                        open({str(marker)!r}, "w").close()
                        time.sleep(60)  # killed here, in the middle of writing
                export_labels(source, {str(target)!r}, progress=progress)
                """
            ),
        ],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, "the export finished or failed before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    marker.unlink()
    assert not target.exists()
    assert _visible(tmp_path) == []  # nothing that looks like an export
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{name}.{child.pid}.")
    # The next export to the same target removes the dead writer's leftover and completes.
    export_labels(_source(), target)
    assert target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def _unshare_available() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare (user + mount namespaces) to mount a tiny tmpfs")
def test_full_disk_gives_a_clear_error_and_leaves_nothing(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    script = PREAMBLE + textwrap.dedent(
        f"""
        # Fill the disk, then free one 4 KiB page: room for a small file, not for any of the exports.
        filler = os.path.join({str(mount)!r}, "filler")
        with open(filler, "wb", buffering=0) as fh:
            try:
                while fh.write(b"x" * 4096):
                    pass
            except OSError:
                pass
        os.truncate(filler, max(0, os.path.getsize(filler) - 4096))
        results = {{}}
        for name in ("nuclei.geojson", "nuclei.ome.zarr", "nuclei.ome.tif"):
            try:
                export_labels(source, os.path.join({str(mount)!r}, name))
                results[name] = "written"
            except HrsegError as exc:
                results[name] = type(exc).__name__ + ": " + str(exc)
        results["left"] = sorted(os.listdir({str(mount)!r}))
        print(json.dumps(results))
        """
    )
    cmd = f'mount -t tmpfs -o size=256k tmpfs {mount} && {sys.executable} -c "$HRSEG_SCRIPT"'
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", cmd],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "HRSEG_SCRIPT": script},
    )
    if result.returncode != 0 and "mount" in result.stderr:
        pytest.skip(f"tmpfs cannot be mounted here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("nuclei.geojson", "nuclei.ome.zarr", "nuclei.ome.tif"):
        assert results[name].startswith("ExportError: ") and "disk is full" in results[name], results[name]
        assert name in results[name]
    assert results["left"] == ["filler"]


def test_real_enospc_maps_to_a_clear_export_error(tmp_path):
    # /dev/full answers every write with ENOSPC: the same error a full disk gives.
    with pytest.raises(OSError) as err:
        with open("/dev/full", "w") as fh:
            fh.write("x" * 10)
            fh.flush()
    exc = os_error_to_export_error(err.value, tmp_path / "out.geojson")
    assert isinstance(exc, ExportError)
    assert str(exc) == (
        f"{tmp_path / 'out.geojson'}: the disk is full (or a file-size limit was reached) while writing; "
        "nothing was written. free space on that disk or export to another one."
    )


def test_exception_inside_removes_the_temporary_path_and_keeps_the_old(tmp_path):
    target = tmp_path / "out.geojson"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "dir.zarr", directory=True) as tmp:
            (tmp / "chunk").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.geojson"]


def test_refusals_before_writing(tmp_path):
    source = _source()
    (tmp_path / "keep.geojson").write_text("keep")
    with pytest.raises(ExportError, match="already exists"):
        export_geojson(source, tmp_path / "keep.geojson", overwrite=False)
    with pytest.raises(ExportError, match="does not exist"):
        export_geojson(source, tmp_path / "missing" / "x.geojson")
    with pytest.raises(ExportError, match="cannot tell the export format"):
        export_labels(source, tmp_path / "labels.png")
    assert (tmp_path / "keep.geojson").read_text() == "keep" and _visible(tmp_path) == ["keep.geojson"]


def test_replacing_a_directory_export_swaps_whole_trees(tmp_path):
    target = tmp_path / "labels.ome.zarr"
    export_labels(_source(), target)
    first = json.loads((target / "labels" / "labels" / ".zattrs").read_text())
    small = LabelSource.from_array(np.ones((10, 10), np.uint8))
    export_labels(small, target)
    second = json.loads((target / "labels" / "labels" / ".zattrs").read_text())
    assert first["hrseg"]["kind"] == "instance" and second["hrseg"]["kind"] == "semantic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.zarr"]


def test_a_previous_directory_export_moved_aside_by_a_killed_writer_is_restored(tmp_path):
    from napari_hrseg.export._atomic import remove_stale_partials

    target = tmp_path / "labels.ome.zarr"
    export_labels(_source(), target)
    # What a writer killed between its two renames leaves: the old export aside, the new one as a partial.
    dead_pid = 2**22 + 12345  # above Linux's pid_max default range: no such process
    os.replace(target, tmp_path / f".labels.ome.zarr.{dead_pid}.old{PARTIAL_SUFFIX}")
    (tmp_path / f".labels.ome.zarr.{dead_pid}.abcd1234{PARTIAL_SUFFIX}").mkdir()
    remove_stale_partials(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.ome.zarr"]
    assert (target / "labels" / "labels" / ".zattrs").is_file()
