"""Test studies built from real DICOM files shipped with pydicom (no network needed)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from spine_node.node.uids import derive_uid


def local_test_files() -> list[Path]:
    """Every DICOM sample on disk: pydicom's own and pydicom-data's, never downloaded.

    (``get_testdata_files`` would try to download samples whose hash it does not know,
    which hangs on a machine without internet.)
    """
    from importlib import metadata

    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        dist = metadata.distribution("pydicom-data")
        roots += [Path(str(dist.locate_file(f))) for f in (dist.files or [])
                  if str(f).endswith("data_store/__init__.py")]
        roots = [r.parent / "data" if r.name == "__init__.py" else r for r in roots]
    except metadata.PackageNotFoundError:
        pass
    return sorted({p for root in roots if root.is_dir() for p in root.rglob("*.dcm")})


def real_ct() -> Dataset:
    """A real 128x128 CT slice (pydicom's CT_small.dcm)."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    ds = dcmread(path)
    # DCMTK drops trailing padding when sending; the test compares sent and stored bytes.
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def write_ct_series(folder: Path, study_uid: str, series_uid: str, count: int,
                    body_part: str = "CSPINE", series_number: int = 1) -> list[Path]:
    """``count`` slices of one series with new UIDs and positions, written as files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds = real_ct()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = derive_uid(series_uid, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = series_number
        ds.InstanceNumber = index + 1
        ds.BodyPartExamined = body_part
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.5 * index]
        ds.SliceLocation = z + 2.5 * index
        path = folder / f"s{series_number}_{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_study(folder: Path, seed: str = "study", series: int = 2, per_series: int = 4) -> dict[str, list[Path]]:
    """A multi-series CT study; returns {series UID: files}."""
    study_uid = derive_uid("test-study", seed)
    out = {}
    for number in range(1, series + 1):
        series_uid = derive_uid(study_uid, "series", str(number))
        body = "CSPINE" if number == 1 else "CHEST"
        out[series_uid] = write_ct_series(folder, study_uid, series_uid, per_series, body, number)
    return out


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, after its preamble and file meta group."""
    raw = path.read_bytes()
    ds = dcmread(path, stop_before_pixels=True)
    group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    # preamble (128) + 'DICM' (4) + group length element (12 bytes) + the group.
    return raw[128 + 4 + 12 + group_length:]
