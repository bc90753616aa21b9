"""Plain dataclasses that cross boundaries (node <-> inference <-> workers).

No Celery, SQLAlchemy or pynetdicom imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from spine_node.inference.series import SeriesRef

__all__ = ["DispatchState", "Job", "JobState", "SeriesRef", "SeriesState"]


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
