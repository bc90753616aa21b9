"""Pixel data checked before decoding (inference/pixels.py), and a pipeline's memory failure.

A JPEG 2000 codestream whose SIZ marker declares 16384 x 16384 in a slice whose Rows and
Columns say 128, headers claiming 65535 x 65535 pixels, pixel data shorter than declared:
each fails the job with a reason that names the sizes, before anything is decoded. A
pipeline that runs out of memory fails its job; the worker process lives on and runs the
next job (a real ``spine-node worker`` subprocess, filesystem broker, SQLite).
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from spine_node.inference.errors import PipelineError
from spine_node.inference.pixels import check_pixel_data, declared, pixel_budget
from spine_node.node.audit import Database
from spine_node.node.db_migrate import upgrade
from spine_node.node.jobs import send_pending, tick
from spine_node.node.uids import derive_uid
from tests.dicom_factory import real_ct
from tests.jobs_samples import ct_series
from tests.pipelines_hostile import CHECKED_DECODE, MEMORY_HOG
from tests.test_jobs import Worker, add_job, job_row, node_env, settings_from, wait_for


def _j2k_bomb(ds: Dataset, size: int = 16384) -> Dataset:
    """``ds`` JPEG 2000 encoded, its SIZ marker then edited to declare ``size`` x ``size``."""
    ds = copy.deepcopy(ds)
    ds.compress(JPEG2000Lossless)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.find(b"\xff\x4f\xff\x51")
    assert at >= 0
    struct.pack_into(">LL", frame, at + 8, size, size)  # Xsiz, Ysiz
    struct.pack_into(">LL", frame, at + 24, size, size)  # XTsiz, YTsiz: one tile
    ds.PixelData = encapsulate([bytes(frame)])
    return ds


def _reason(datasets: list[Dataset]) -> str:
    with pytest.raises(PipelineError) as caught:
        check_pixel_data(datasets, "test")
    return str(caught.value)


# -- the checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("syntax", [None, JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_sound_pixel_data_passes_and_decodes(syntax: str | None) -> None:
    ds = real_ct()
    if syntax:
        ds.compress(syntax)
    check_pixel_data([ds], "test")
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_jpeg2000_codestream_larger_than_rows_and_columns_is_refused_before_decoding() -> None:
    bomb = _j2k_bomb(real_ct())
    assert len(bomb.PixelData) < 20000  # a few KB that would decode to 512 MiB
    assert "declares 16384x16384" in _reason([bomb]) and "128x128" in _reason([bomb])


def test_jpeg_ls_frame_header_that_disagrees_is_refused() -> None:
    ds = real_ct()
    ds.compress(JPEGLSLossless)
    ds.Rows = 64
    assert "JPEG codestream declares 128x128" in _reason([ds])


def test_rle_header_with_the_wrong_segment_count_is_refused() -> None:
    ds = real_ct()
    ds.compress(RLELossless)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    assert "RLE header declares 2 segment(s)" in _reason([ds])


def test_fewer_frames_than_declared_are_refused() -> None:
    ds = real_ct()
    ds.compress(JPEG2000Lossless)
    ds.NumberOfFrames = 3
    assert "Number of Frames is 3" in _reason([ds])


def test_native_pixel_data_shorter_than_declared_is_refused() -> None:
    ds = real_ct()
    ds.PixelData = ds.PixelData[:1000]
    assert "holds 1000 bytes" in _reason([ds]) and "need 32768" in _reason([ds])


@pytest.mark.parametrize("keyword, value, expected", [
    ("Rows", 0, "Rows 0 is outside 1..65535"),
    ("BitsAllocated", 12, "BitsAllocated 12 is not"),
    ("SamplesPerPixel", 9, "SamplesPerPixel 9 is outside"),
])
def test_declared_values_outside_dicom_ranges_are_refused(keyword: str, value: object, expected: str) -> None:
    ds = real_ct()
    setattr(ds, keyword, value)
    assert expected in _reason([ds])


def test_a_frame_count_that_is_not_a_number_is_refused(tmp_path: Path) -> None:
    ds = real_ct()
    ds.NumberOfFrames = "1"
    path = tmp_path / "frames.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    element = b"\x28\x00\x08\x00IS\x02\x001 "
    assert raw.count(element) == 1
    path.write_bytes(raw.replace(element, b"\x28\x00\x08\x00IS\x04\x00many"))
    assert "NumberOfFrames is not a number" in _reason([dcmread(path)])


def test_the_budget_is_per_job_and_counts_every_input() -> None:
    slices = [real_ct() for _ in range(4)]  # 4 x 128 x 128 = 65536 samples
    with pixel_budget(3 * 128 * 128):
        check_pixel_data(slices[:3], "job")
        with pytest.raises(PipelineError, match="over its budget of 49152"):
            check_pixel_data(slices[3:], "job")
    with pixel_budget(4 * 128 * 128):  # a new job starts from zero
        check_pixel_data(slices, "job")
    huge = real_ct()
    huge.Rows = huge.Columns = 65535
    huge.NumberOfFrames = 40
    assert declared(huge).pixels == 40 * 65535 * 65535
    with pixel_budget(1 << 29), pytest.raises(PipelineError, match="worker.max_pixels_per_job"):
        check_pixel_data([huge], "job")


# -- the pipelines' loaders ------------------------------------------------------------------------

def test_xray_loader_refuses_a_jpeg2000_bomb(tmp_path: Path) -> None:
    from spine_node.inference.pipelines.xray import read_radiograph

    path = tmp_path / "bomb.dcm"
    _j2k_bomb(real_ct()).save_as(path, enforce_file_format=True)
    with pytest.raises(PipelineError, match="declares 16384x16384"):
        read_radiograph(path)


def test_ct_loader_refuses_a_jpeg2000_bomb_before_allocating(tmp_path: Path) -> None:
    from spine_node.inference.pipelines import ct_cspine

    template = real_ct()
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    files = []
    for index in range(16):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = derive_uid("pixels", "ct", str(index))
        ds.ImagePositionPatient = [x, y, z + 2.5 * index]
        if index == 7:
            ds = _j2k_bomb(ds)
        files.append(tmp_path / f"{index}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    permissive = replace(ct_cspine.GATES, max_pixel_mm=10.0, max_slice_spacing_mm=10.0, min_coverage_mm=1.0)
    with pytest.raises(PipelineError, match="frame 1: the JPEG 2000 codestream declares 16384x16384"):
        ct_cspine.load_ct_series(files, permissive)


# -- a real worker ---------------------------------------------------------------------------------

@pytest.fixture
def worker_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[dict[str, str], Database]]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    env = node_env(tmp_path, url, SPINE_NODE_WORKER__PIPELINE_MODULES=json.dumps(
        ["tests.pipelines_for_tests", "tests.pipelines_hostile"]))
    db = Database(url)
    yield env, db
    db.dispose()


def _rewrite(files: list[Path], change: object) -> None:
    for path in files:
        ds = dcmread(path)
        ds = change(ds)  # type: ignore[operator]
        ds.save_as(path, enforce_file_format=True)


def test_memory_failures_fail_the_job_and_the_worker_runs_on(worker_node: tuple[dict[str, str], Database],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    env, db = worker_node
    settings = settings_from(env, monkeypatch)
    spool = settings.storage.spool
    # 40 slices whose headers claim 65535 x 65535 pixels (their pixel data is 128 x 128).
    study, absurd, absurd_files = ct_series(spool, slices=40, tag="absurd")

    def claim_huge(ds: Dataset) -> Dataset:
        ds.Rows = ds.Columns = 65535
        return ds
    _rewrite(absurd_files, claim_huge)
    _, bombed, bombed_files = ct_series(spool, slices=3, tag="bomb")
    _rewrite(bombed_files, _j2k_bomb)
    _, good, _ = ct_series(spool, slices=3, tag="good")
    jobs = {
        "hog": add_job(db, study, absurd, pipeline=MEMORY_HOG),
        "budget": add_job(db, study, absurd, pipeline=CHECKED_DECODE),
        "bomb": add_job(db, derive_uid("test-study", "bomb"), bombed, pipeline=CHECKED_DECODE),
    }
    assert send_pending(db, settings) == 3
    worker = Worker(env, tmp_path / "worker.log")
    try:
        def finished(names: list[str]) -> bool:
            tick(db, settings)
            return all(job_row(db, jobs[name]).state in ("succeeded", "failed") for name in names)

        wait_for(lambda: finished(["hog", "budget", "bomb"]), "the hostile jobs to finish")
        hog = job_row(db, jobs["hog"])
        assert hog.state == "failed" and "MemoryError" in (hog.error or ""), worker.output()[-3000:]
        assert hog.attempts == 1
        budget = job_row(db, jobs["budget"])
        assert budget.state == "failed" and "worker.max_pixels_per_job" in (budget.error or "")
        bomb = job_row(db, jobs["bomb"])
        assert bomb.state == "failed" and "declares 16384x16384" in (bomb.error or "")
        # The same worker process then runs a sound job.
        assert worker.proc.poll() is None, worker.output()[-3000:]
        jobs["good"] = add_job(db, derive_uid("test-study", "good"), good)
        send_pending(db, settings)
        wait_for(lambda: finished(["good"]), "the sound job to finish")
        after = job_row(db, jobs["good"])
        assert after.state == "succeeded", f"{after.error}\n{worker.output()[-3000:]}"
        assert worker.proc.poll() is None and "Unrecoverable error" not in worker.output()
    finally:
        worker.stop()
