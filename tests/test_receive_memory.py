"""Receive streams to disk: a large instance never sits in the receiving process's memory."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from spine_node.node.uids import derive_uid
from tests.dicom_factory import real_ct
from tests.nodeproc import NodeProcess, wait_for
from tests.peers import dcmtk


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process (``VmHWM`` in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def write_multiframe_ct(path: Path, frames: int, rows: int = 512, columns: int = 512) -> None:
    """A multiframe CT-like instance of ``frames`` uint16 frames (``frames * rows * columns * 2`` bytes)."""
    ds = real_ct()
    study = derive_uid("memory-test", str(frames))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = derive_uid(study, "series")
    ds.SOPInstanceUID = derive_uid(study, "instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    # A ramp, different per frame, so a reordered or truncated transfer cannot go unnoticed.
    frame = (np.arange(rows * columns, dtype=np.uint32) % 4096).astype(np.uint16).reshape(rows, columns)
    pixels = np.empty((frames, rows, columns), dtype=np.uint16)
    for index in range(frames):
        pixels[index] = (frame + index) % 4096
    ds.PixelData = pixels.tobytes()
    del pixels
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)


def _pixel_digest(path: Path) -> str:
    ds = dcmread(path, defer_size=1024)
    digest = hashlib.sha256()
    view = memoryview(ds.PixelData)
    for start in range(0, len(view), 1 << 24):
        digest.update(view[start:start + (1 << 24)])
    return digest.hexdigest()


def test_200mb_multiframe_is_received_intact_without_holding_it_in_memory(tmp_path):
    source = tmp_path / "in" / "multiframe.dcm"
    source.parent.mkdir()
    write_multiframe_ct(source, frames=400)  # 400 x 512 x 512 x 2 bytes = 200 MiB of pixels
    size = source.stat().st_size
    assert size > 200 * 2**20
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with NodeProcess(tmp_path / "node", url) as node:
        assert node.proc is not None
        before = vm_hwm_bytes(node.proc.pid)
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                               "127.0.0.1", str(node.port), str(source)],
                              capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stderr
        after = vm_hwm_bytes(node.proc.pid)
        header = dcmread(source, stop_before_pixels=True)
        stored = (node.data_dir / "spool" / header.StudyInstanceUID / header.SeriesInstanceUID
                  / f"{header.SOPInstanceUID}.dcm")
        wait_for(stored.is_file)
    # The serve process's peak grew by a small fraction of the instance, not by the instance.
    assert after - before < size // 4, (before, after, size)
    assert after < size, (after, size)
    assert _pixel_digest(stored) == _pixel_digest(source)
    assert dcmread(stored, stop_before_pixels=True).NumberOfFrames == 400
