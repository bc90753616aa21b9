"""Test data for the jobs and dispatch tests: a small CT series in a spool, SEG and SR.

The series is pydicom's ``CT_small.dcm`` (a real CT slice) repeated as slices of one
series with their own UIDs and positions; the SEG and SR are built with highdicom from
what the pixels hold (a bone threshold), not from made-up values.
"""

from __future__ import annotations

import copy
import socket
import subprocess
import time
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes

from spine_node.node.spool import Spool
from spine_node.node.uids import derive_uid
from tests.peers import dcmtk

BONE_HU = 300.0


def ct_series(spool_root: Path, slices: int = 3, tag: str = "a") -> tuple[str, str, list[Path]]:
    """Write a CT series of ``slices`` instances into the spool; return its UIDs and files."""
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str), "pydicom's test file CT_small.dcm is missing"
    template = dcmread(source)
    study_uid = derive_uid("test-study", tag)
    series_uid = derive_uid("test-series", tag)
    frame_uid = derive_uid("test-frame", tag)
    spool = Spool(spool_root)
    files = []
    for index in range(slices):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = derive_uid("test-instance", tag, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * index]
        ds.SliceLocation = z + 5.0 * index
        # Shift the slices' intensities a little so each slice differs.
        pixels = ds.pixel_array.astype(np.int32) + 40 * index
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        target = spool.instance_path(study_uid, series_uid, ds.SOPInstanceUID)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
    return study_uid, series_uid, files


def hounsfield(ds: Dataset) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1))
    intercept = float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.astype(np.float32) * slope + intercept


def bone_seg(sources: list[Dataset], *, series_uid: str | None = None) -> hd.seg.Segmentation:
    """A binary SEG of the voxels at or above ``BONE_HU``."""
    mask = np.stack([hounsfield(ds) >= BONE_HU for ds in sources]).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="bone threshold", version="1", family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="bone",
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    key = ",".join(ds.SOPInstanceUID for ds in sources)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid or derive_uid("test-seg-series", key),
        series_number=901, sop_instance_uid=derive_uid("test-seg", key), instance_number=1,
        manufacturer="spine-node tests", manufacturer_model_name="bone threshold",
        software_versions="1", device_serial_number="0")


def bone_sr(sources: list[Dataset], *, series_uid: str | None = None) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 report with the measured bone fraction of the series, in percent."""
    fraction = float(np.mean([np.mean(hounsfield(ds) >= BONE_HU) for ds in sources]))
    key = ",".join(ds.SOPInstanceUID for ds in sources)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("test-device"), name="bone threshold"))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derive_uid("test-track", key),
                                                     identifier="bone fraction"),
        measurements=[hd.sr.Measurement(
            name=codes.SCT.Bone, value=round(fraction * 100, 4), unit=codes.UCUM.Percent)])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=sources, content=report,
        series_instance_uid=series_uid or derive_uid("test-sr-series", key), series_number=902,
        sop_instance_uid=derive_uid("test-sr", key), instance_number=1,
        manufacturer="spine-node tests")


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"storescp did not listen on {port}")


class StoreSCP:
    """A DCMTK storescp process writing what it receives into a folder."""

    def __init__(self, port: int, out_dir: Path, *extra: str) -> None:
        self.port = port
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", "PACS", "-od", str(out_dir), *extra, str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())
