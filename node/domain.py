"""Plain dataclasses that cross boundaries (node <-> inference <-> workers).

No Celery, SQLAlchemy or pynetdicom imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"
    SKIPPED = "skipped"


class DispatchState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    CANCELLED = "cancelled"


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


@dataclass(frozen=True)
class Job:
    """One (series, pipeline) unit of work, as a worker sees it."""

    id: int
    pipeline: str
    inputs: tuple[SeriesRef, ...]
    attempts: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def primary(self) -> SeriesRef:
        return self.inputs[0]
