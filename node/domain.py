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


# Every kind of audit event, "<subject>.<what happened>" (``spine-node audit tail --kind``
# takes one of these or a prefix of one, e.g. ``job`` or ``job.``). Migration 0002 renamed
# the older ``job_started``-style kinds in stored rows.
EVENT_KINDS: tuple[str, ...] = (
    "association.rejected",
    "association.aborted",
    "instance.refused",
    "series.complete",
    "series.recovered",
    "series.skipped",
    "series.purged",
    "job.created",
    "job.requeued",
    "job.superseded",
    "job.started",
    "job.succeeded",
    "job.failed",
    "job.error",
    "job.resent",
    "job.retried",
    "job.cancelled",
    "result.superseded",
    "result.sanitised",
    "notice.created",
    "dispatch.sent",
    "dispatch.failed",
    "dispatch.dead",
    "dispatch.retried",
)


def kind_matches(prefix: str) -> list[str]:
    """The event kinds ``prefix`` selects in ``audit tail --kind`` (empty: none, a typo)."""
    return [kind for kind in EVENT_KINDS if kind.startswith(prefix)]
