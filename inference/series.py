"""The series reference a pipeline reads: a plain dataclass shared by node and inference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SeriesRef:
    """Where a complete series lies in the spool, and what it is."""

    study_uid: str
    series_uid: str
    path: Path
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    sop_class_uid: str = ""
    instance_count: int = 0

    def files(self) -> list[Path]:
        """The instance files of the series, sorted by name."""
        return sorted(self.path.glob("*.dcm"))
