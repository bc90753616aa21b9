"""Retention in process, on a real SQLite database and spool: the rules and the race guard."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from spine_node.node.audit import AuditEvent, Database, Job, Series, utcnow
from spine_node.node.config import StorageSettings
from spine_node.node.db_migrate import upgrade
from spine_node.node.retention import RetentionCleaner
from spine_node.node.spool import Spool
from spine_node.node.uids import derive_uid


def _setup(tmp_path: Path) -> tuple[Database, Spool, StorageSettings]:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    storage = StorageSettings(data_dir=tmp_path, min_free_mb=0, retention_days=1)
    return Database(url), Spool(storage.spool), storage


def _series(db: Database, spool: Spool, name: str, state: str, age_days: float, files: int = 2) -> Series:
    study, series = derive_uid("retention", name, "study"), derive_uid("retention", name)
    for index in range(files):
        spool.store(study, series, derive_uid(series, str(index)), b"DICM" * 10)
    when = utcnow() - timedelta(days=age_days)
    with db.session() as session:
        row = Series(study_uid=study, series_uid=series, state=state, instance_count=files, bytes_received=80 * files,
                     first_received_at=when, last_received_at=when)
        session.add(row)
    return row


def test_age_rule_keeps_young_busy_and_unrouted_series(tmp_path: Path) -> None:
    db, spool, storage = _setup(tmp_path)
    old_skipped = _series(db, spool, "old-skipped", "skipped", 3)
    old_done = _series(db, spool, "old-done", "routed", 2)
    old_busy = _series(db, spool, "old-busy", "routed", 2)
    other_input = _series(db, spool, "old-pair-input", "routed", 2)
    old_complete = _series(db, spool, "old-complete", "complete", 2)
    young = _series(db, spool, "young", "skipped", 0.5)
    with db.session() as session:
        session.add(Job(study_uid=old_done.study_uid, series_uid=old_done.series_uid, pipeline="p",
                        state="succeeded", input_series_uids=[old_done.series_uid]))
        session.add(Job(study_uid=old_busy.study_uid, series_uid=old_busy.series_uid, pipeline="p",
                        state="running", input_series_uids=[old_busy.series_uid, other_input.series_uid]))
    purged = RetentionCleaner(storage).run(db)
    assert [p.series_uid for p in purged] == [old_skipped.series_uid, old_done.series_uid]
    with db.session() as session:
        left = {r.series_uid for r in session.scalars(select(Series))}
        events = list(session.scalars(select(AuditEvent).where(AuditEvent.kind == "series.purged")))
    assert left == {old_busy.series_uid, other_input.series_uid, old_complete.series_uid, young.series_uid}
    assert all(e.message == "older than 1 days" and e.details["instances"] == 2 for e in events)
    assert {s for _, s, _ in spool.iter_series()} == left
    assert not any(spool.trash.iterdir())


def test_series_received_again_while_being_purged_is_restored(tmp_path: Path) -> None:
    db, spool, storage = _setup(tmp_path)
    row = _series(db, spool, "racing", "skipped", 3)
    cleaner = RetentionCleaner(storage)
    stale = cleaner._candidates(db)[0]
    # An instance arrives between the cleaner's look and its delete.
    spool.store(row.study_uid, row.series_uid, derive_uid(row.series_uid, "late"), b"DICM")
    with db.session() as session:
        fresh = session.scalar(select(Series).where(Series.series_uid == row.series_uid))
        assert fresh is not None
        fresh.state, fresh.instance_count, fresh.last_received_at = "receiving", 3, utcnow()
    assert cleaner._purge(db, stale, "test") is None
    folder = spool.series_dir(row.study_uid, row.series_uid)
    assert len(list(folder.glob("*.dcm"))) == 3
    with db.session() as session:
        assert session.scalar(select(Series.instance_count).where(Series.series_uid == row.series_uid)) == 3
