"""Assemble: count instances per series and decide when a series is complete.

Receive reports each stored instance to a :class:`SeriesTracker`, which aggregates in
memory and upserts ``series`` rows in batches (one SQL write per series per flush, not
per instance). The :class:`Assembler` marks a series complete once it and the rest of
its study have been quiet for the configured periods (a study still streaming in is not
routed half-way), or once the forced-completion timeout has passed, then hands the
study to routing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from spine_node.node.audit import Database, Series, record_event, utcnow
from spine_node.node.config import AssemblySettings
from spine_node.node.domain import SeriesState
from spine_node.node.header import InstanceInfo, StoreRejected, read_header

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    info: InstanceInfo
    calling_ae_title: str
    new_instances: int = 0
    bytes: int = 0
    first: datetime = field(default_factory=utcnow)
    last: datetime = field(default_factory=utcnow)


class SeriesTracker:
    """Aggregates received instances and writes them to ``series`` rows in batches."""

    def __init__(self, db: Database, flush_interval_s: float = 0.5) -> None:
        self.db = db
        self.flush_interval_s = flush_interval_s
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        """Flush soon, on the tracker's thread (an association ended; never blocks)."""
        self._wake.set()

    def add(self, info: InstanceInfo, size: int, *, calling_ae_title: str = "",
            replaced: bool = False) -> None:
        now = utcnow()
        with self._lock:
            item = self._pending.get(info.series_uid)
            if item is None:
                item = self._pending[info.series_uid] = _Pending(info, calling_ae_title, first=now)
            item.new_instances += 0 if replaced else 1
            item.bytes += size
            item.last = now

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="series-tracker", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the flush thread and write what is pending, within about ``timeout_s``.

        A frozen database must not hold up the node's stop: counts not written by then
        are rebuilt from the spool at the next start (``recover_from_spool``).
        """
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s / 2)
            self._thread = None
        failed: list[str] = []

        def last_flush() -> None:
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - the files are safe in the spool
                failed.append(type(exc).__name__)

        final = threading.Thread(target=last_flush, name="series-tracker-stop", daemon=True)
        final.start()
        final.join(timeout_s / 2)
        if final.is_alive() or failed:
            log.warning("series counts of %d series not written at stop (%s); they are rebuilt from "
                        "the spool at the next start", self.pending_series,
                        failed[0] if failed else "database did not answer")

    def _run(self) -> None:
        failing_since: float | None = None
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - counts stay in memory; retried next time
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("cannot write series counts to the database (%s: %s); keeping them in "
                                "memory and retrying every %.1fs", type(exc).__name__,
                                str(exc).splitlines()[0][:200] if str(exc) else "", self.flush_interval_s)
                continue
            if failing_since is not None:
                log.warning("database reachable again after %.0fs; series counts written",
                            time.monotonic() - failing_since)
                failing_since = None

    @property
    def pending_series(self) -> int:
        """Series with counts not yet written to the database."""
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write pending counts; returns the number of series written."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return 0
            try:
                with self.db.session() as session:
                    for item in batch.values():
                        _upsert_series(session, item)
            except Exception:
                with self._lock:  # put the batch back so nothing is lost
                    for uid, item in batch.items():
                        newer = self._pending.get(uid)
                        if newer is not None:
                            item.new_instances += newer.new_instances
                            item.bytes += newer.bytes
                            item.last = max(item.last, newer.last)
                        self._pending[uid] = item
                raise
            return len(batch)


def _upsert_series(session: Session, item: _Pending) -> None:
    info = item.info
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Series).values(
        study_uid=info.study_uid,
        series_uid=info.series_uid,
        modality=info.modality,
        body_part=info.body_part,
        view_position=info.view_position,
        sop_class_uid=info.sop_class_uid,
        calling_ae_title=item.calling_ae_title,
        instance_count=item.new_instances,
        bytes_received=item.bytes,
        state=SeriesState.RECEIVING.value,
        first_received_at=item.first,
        last_received_at=item.last,
    )
    # A series that was already complete gets new instances: it is received again and
    # re-routed after the next quiet period (its jobs re-run with the full series).
    stmt = stmt.on_conflict_do_update(
        index_elements=[Series.series_uid],
        set_={
            "instance_count": Series.instance_count + item.new_instances,
            "bytes_received": Series.bytes_received + item.bytes,
            "last_received_at": item.last,
            "state": SeriesState.RECEIVING.value,
            "completed_at": None,
        },
    )
    session.execute(stmt)


@dataclass(frozen=True)
class CompletedStudy:
    """Series of one study that just became complete, and why."""

    study_uid: str
    series_uids: tuple[str, ...]
    forced: bool


class Assembler:
    """Decides completion; calls ``on_complete`` (routing) for each completed study."""

    def __init__(
        self,
        db: Database,
        settings: AssemblySettings,
        on_complete: Callable[[Session, CompletedStudy], None] | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_complete = on_complete

    def poll(self, now: datetime | None = None) -> list[CompletedStudy]:
        """Complete every series that is due; returns what was completed."""
        now = now or utcnow()
        quiet = timedelta(seconds=self.settings.quiet_period_s)
        study_quiet = timedelta(seconds=self.settings.study_quiet_period_s)
        force = timedelta(seconds=self.settings.force_complete_s)
        done: list[CompletedStudy] = []
        with self.db.session() as session:
            receiving = session.scalars(
                select(Series).where(Series.state == SeriesState.RECEIVING.value)
            ).all()
            studies: dict[str, list[Series]] = {}
            for row in receiving:
                studies.setdefault(row.study_uid, []).append(row)
        for study_uid, rows in studies.items():
            completed = self._complete_study(study_uid, rows, now, quiet, study_quiet, force)
            if completed is not None:
                done.append(completed)
        return done

    def _complete_study(self, study_uid: str, rows: Sequence[Series], now: datetime,
                        quiet: timedelta, study_quiet: timedelta,
                        force: timedelta) -> CompletedStudy | None:
        study_last = max(r.last_received_at for r in rows)
        study_quiet_ok = now - study_last >= study_quiet
        due: list[str] = []
        forced = False
        for row in rows:
            if now - row.first_received_at >= force:
                due.append(row.series_uid)
                forced = True
            elif study_quiet_ok and now - row.last_received_at >= quiet:
                due.append(row.series_uid)
        if not due:
            return None
        completed_uids: list[str] = []
        with self.db.session() as session:
            # Guard on state and last_received_at: an instance that arrived since we
            # looked keeps its series receiving (it completes after its own quiet period).
            for row in rows:
                if row.series_uid not in due:
                    continue
                result = session.execute(
                    update(Series)
                    .where(Series.series_uid == row.series_uid,
                           Series.state == SeriesState.RECEIVING.value,
                           Series.last_received_at == row.last_received_at)
                    .values(state=SeriesState.COMPLETE.value, completed_at=now)
                )
                if result.rowcount:  # type: ignore[attr-defined]
                    completed_uids.append(row.series_uid)
                    record_event(session, "series.complete",
                                 "forced after timeout" if forced else "quiet period passed",
                                 study_uid=study_uid, series_uid=row.series_uid,
                                 details={"instances": row.instance_count})
            if not completed_uids:
                return None
            session.flush()
            completed = CompletedStudy(study_uid, tuple(sorted(completed_uids)), forced)
            if self.on_complete is not None:
                self.on_complete(session, completed)
        log.info("study %s: %d series complete%s", study_uid, len(completed_uids), " (forced)" if forced else "")
        return completed


def restart_quiet_periods(db: Database, now: datetime | None = None) -> int:
    """Count the quiet period of every receiving series from ``now`` (the node's start).

    A node that was down cannot tell a quiet sender from one that was cut off with it:
    a peer whose association died with the node re-sends the whole series after the
    restart, and completing the part received before (by the files' old timestamps)
    would route and report a fraction of the series. Returns the series touched.
    """
    now = now or utcnow()
    with db.session() as session:
        result = session.execute(update(Series).where(
            Series.state == SeriesState.RECEIVING.value,
            Series.last_received_at < now).values(last_received_at=now))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def recover_from_spool(db: Database, spool_root: object) -> int:
    """Rebuild series rows for spool folders the database does not know fully.

    After a crash between the rename into the spool and the next tracker flush, the
    spool holds acknowledged instances the database has not counted: count them and
    mark those series receiving, so they complete and route as usual. Returns the
    number of series repaired.
    """
    from pathlib import Path

    from spine_node.node.spool import Spool

    spool = Spool(Path(str(spool_root)))
    repaired = 0
    for study_uid, series_uid, folder in spool.iter_series():
        files = sorted(folder.glob("*.dcm"))
        if not files:
            continue
        with db.session() as session:
            row = session.scalar(select(Series).where(Series.series_uid == series_uid))
            if row is not None and row.instance_count >= len(files):
                continue
            if row is None:
                try:
                    info = read_header(files[0])
                except StoreRejected:
                    log.warning("spool folder %s/%s holds an unreadable file", study_uid, series_uid)
                    continue
                newest = datetime.fromtimestamp(max(f.stat().st_mtime for f in files), UTC).replace(tzinfo=None)
                session.add(Series(
                    study_uid=study_uid, series_uid=series_uid, modality=info.modality,
                    body_part=info.body_part, view_position=info.view_position,
                    sop_class_uid=info.sop_class_uid, instance_count=len(files),
                    bytes_received=sum(f.stat().st_size for f in files),
                    state=SeriesState.RECEIVING.value, first_received_at=newest,
                    last_received_at=newest,
                ))
            else:
                row.instance_count = len(files)
                row.state = SeriesState.RECEIVING.value
                row.completed_at = None
            record_event(session, "series.recovered", "counted from spool after restart",
                         study_uid=study_uid, series_uid=series_uid,
                         details={"instances": len(files)})
            repaired += 1
    return repaired
