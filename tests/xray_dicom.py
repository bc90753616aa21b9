"""A minimal DX radiograph writer for tests that need a DICOM file but no phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from spine_node.node.uids import derive_uid

DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def write_test_radiograph(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                          view: str = "AP", key: str = "test") -> Path:
    """Write ``pixels`` (uint8 or uint16) as a DX image; UIDs derive from ``key``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = derive_uid(key, str(path))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = derive_uid(key, "study")
    ds.SeriesInstanceUID = derive_uid(key, "series", view)
    ds.Modality = "DX"
    ds.ViewPosition = view
    ds.InstanceNumber = 1
    data = np.ascontiguousarray(pixels.astype(np.uint16))
    ds.Rows, ds.Columns = data.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = data.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
