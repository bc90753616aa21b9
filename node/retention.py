"""Retention: delete old series from the spool, and make room when the disk runs low.

Off by default. Only series that are routed or skipped and whose jobs are all finished
(succeeded, failed or cancelled) are ever deleted, oldest first; a series still
receiving, complete but not yet routed, or an input of a queued or running job stays.
Each deletion is one rename out of the spool, then the ``series`` row is deleted and a
``series.purged`` audit event says why; job, result and audit rows are kept.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from spine_node.node.audit import Database, Job, Series, record_event, utcnow
from spine_node.node.config import Settings, StorageSettings
from spine_node.node.domain import JobState, SeriesState
from spine_node.node.errors import SpoolError
from spine_node.node.spool import Spool

log = logging.getLogger(__name__)

_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)
_DELETABLE = (SeriesState.ROUTED.value, SeriesState.SKIPPED.value)


@dataclass(frozen=True)
class Purged:
    """A series the cleaner deleted."""

    study_uid: str
    series_uid: str
    instances: int
    bytes: int
    reason: str


class RetentionCleaner:
    """A housekeeping hook: ``cleaner(db, settings)`` runs one pass when one is due.

    The free-space check is cheap and runs every pass; the age sweep runs at most every
    ``age_sweep_interval_s``.
    """

    def __init__(self, storage: StorageSettings, age_sweep_interval_s: float | None = None) -> None:
        self.storage = storage
        self.spool = Spool(storage.spool)
        # Sweep for age every 5 minutes, or more often for a retention shorter than 2 hours.
        retention_s = storage.retention_days * 86400
        self.age_sweep_interval_s = (age_sweep_interval_s if age_sweep_interval_s is not None
                                     else max(1.0, min(300.0, retention_s / 24)))
        self._last_age_sweep = -float("inf")
        self.spool.empty_trash()  # left by a crash between rename and delete

    @property
    def enabled(self) -> bool:
        return bool(self.storage.retention_days or self.storage.emergency_free_mb)

    def __call__(self, db: Database, settings: Settings) -> list[Purged]:
        return self.run(db)

    def run(self, db: Database, now: datetime | None = None) -> list[Purged]:
        """One pass: the age sweep when due, then the emergency cleaning when needed."""
        purged: list[Purged] = []
        now = now or utcnow()
        if self.storage.retention_days and time.monotonic() - self._last_age_sweep >= self.age_sweep_interval_s:
            self._last_age_sweep = time.monotonic()
            cutoff = now - timedelta(days=self.storage.retention_days)
            for row in self._candidates(db, older_than=cutoff):
                item = self._purge(db, row, f"older than {self.storage.retention_days:g} days")
                if item is not None:
                    purged.append(item)
        floor = self.storage.emergency_free_mb << 20
        if floor and self._free() < floor:
            for row in self._candidates(db):
                if self._free() >= floor:
                    break
                item = self._purge(db, row, f"spool volume below {self.storage.emergency_free_mb} MiB free")
                if item is not None:
                    purged.append(item)
            if self._free() < floor:
                log.warning("spool volume still below %d MiB free: nothing more may be deleted "
                            "(series still receiving, or jobs queued or running)",
                            self.storage.emergency_free_mb)
        if purged:
            self.spool.empty_trash()
        return purged

    def _free(self) -> int:
        return shutil.disk_usage(self.spool.root).free

    def _candidates(self, db: Database, older_than: datetime | None = None) -> list[Series]:
        """Deletable series, oldest first."""
        with db.session() as session:
            busy: set[str] = set()
            for series_uid, inputs in session.execute(
                    select(Job.series_uid, Job.input_series_uids).where(Job.state.in_(_UNFINISHED))):
                busy.add(series_uid)
                busy.update(inputs or ())
            query = select(Series).where(Series.state.in_(_DELETABLE)).order_by(Series.last_received_at)
            if older_than is not None:
                query = query.where(Series.last_received_at < older_than)
            return [row for row in session.scalars(query) if row.series_uid not in busy]

    def _purge(self, db: Database, row: Series, reason: str) -> Purged | None:
        try:
            discarded = self.spool.discard_series(row.study_uid, row.series_uid)
        except SpoolError as exc:
            log.warning("retention: %s", exc)
            return None
        with db.session() as session:
            # Only if nothing arrived since we looked: a series received again is kept.
            result = session.execute(
                delete(Series).where(Series.series_uid == row.series_uid, Series.state == row.state,
                                     Series.last_received_at == row.last_received_at))
            if not result.rowcount:  # type: ignore[attr-defined]
                if discarded is not None:
                    self.spool.restore_series(row.study_uid, row.series_uid, discarded)
                return None
            record_event(session, "series.purged", reason, study_uid=row.study_uid,
                         series_uid=row.series_uid,
                         details={"instances": row.instance_count, "bytes": row.bytes_received,
                                  "state": row.state})
        log.info("retention: deleted series %s (%d instances): %s", row.series_uid, row.instance_count, reason)
        return Purged(row.study_uid, row.series_uid, row.instance_count, row.bytes_received, reason)
