"""The identifying header of a received instance, below both receive and assemble.

:class:`InstanceInfo` (what a series is counted and routed by), :func:`read_header` (read
it from a file with pydicom) and :class:`StoreRejected` (why an instance is refused, as a
C-STORE status) are shared by ``receive`` (the hot path), ``assemble`` (recovery from the
spool after a restart) and the CLI (``routes test``); keeping them here lets those modules
import one way only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.multival import MultiValue

from spine_node.node.errors import InvalidUIDError
from spine_node.node.uids import validate_uid

# C-STORE statuses (PS3.4 B.2.3 and the 0xA7xx/0xA9xx/0xCxxx ranges).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SPOOL_WRITE_FAILED = 0xA701
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC220
STATUS_INSTANCE_UID_MISMATCH = 0xC221

HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)
HEADER_TAG_NUMBERS = {
    (0x0008, 0x0016): "SOPClassUID",
    (0x0008, 0x0018): "SOPInstanceUID",
    (0x0020, 0x000D): "StudyInstanceUID",
    (0x0020, 0x000E): "SeriesInstanceUID",
    (0x0008, 0x0060): "Modality",
    (0x0018, 0x0015): "BodyPartExamined",
    (0x0018, 0x5101): "ViewPosition",
}


@dataclass(frozen=True)
class InstanceInfo:
    """The identifying header of one received instance (no PHI)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""


class StoreRejected(Exception):
    """An instance is refused with ``status``; ``reason`` is safe to log (no PHI)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_header(path: Path) -> InstanceInfo:
    """Read the identifying header of a DICOM file without touching pixel data.

    Raises only :class:`StoreRejected`: 0xC210 for bytes that do not parse, 0xC220 for
    UIDs that are missing or invalid (and so could not become path components).
    """
    try:
        # specific_tags already skips the values of every other element; defer_size would only
        # add seeks and re-opens (it doubled the cost of this call on the hot path).
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        values = {keyword: _text(ds, keyword) for keyword in HEADER_TAGS}
    except Exception as exc:  # noqa: BLE001 - hostile bytes can break the parser in any way
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from None
    return instance_info(values)


def instance_info(values: dict[str, str]) -> InstanceInfo:
    """Validate the identifying values of an instance (keyword -> text) into an InstanceInfo."""
    try:
        study = validate_uid(values["StudyInstanceUID"], "Study Instance UID")
        series = validate_uid(values["SeriesInstanceUID"], "Series Instance UID")
        sop = validate_uid(values["SOPInstanceUID"], "SOP Instance UID")
        sop_class = validate_uid(values["SOPClassUID"], "SOP Class UID")
    except InvalidUIDError as exc:
        raise StoreRejected(STATUS_INVALID_UID, str(exc)) from None
    return InstanceInfo(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        modality=values["Modality"][:16],
        body_part=values["BodyPartExamined"][:64].upper(),
        view_position=values["ViewPosition"][:16].upper(),
    )


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, bytes):  # a value pydicom could not decode
        value = value.decode("ascii", "replace")
    elif isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    return clean_text(str(value))


_CONTROL_CHARACTERS = dict.fromkeys(range(0x20))


def clean_text(value: str) -> str:
    """Strip the NUL padding some devices put in UIDs and any stray control characters."""
    return value.translate(_CONTROL_CHARACTERS).strip()
