"""Series completion rules, against a real migrated database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from spine_node.node.assemble import Assembler, InstanceInfo, SeriesTracker, recover_from_spool
from spine_node.node.audit import Database, Job, Series, utcnow
from spine_node.node.config import AssemblySettings, default_routes
from spine_node.node.route import route_study
from spine_node.node.spool import Spool
from tests.dicom_factory import write_ct_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def info(study: str, series: str, sop: str, body: str = "CSPINE") -> InstanceInfo:
    return InstanceInfo(study, series, sop, CT, "CT", body, "")


def states(db: Database) -> dict[str, str]:
    with db.session() as session:
        return {r.series_uid: r.state for r in session.scalars(select(Series))}


def test_study_waits_while_any_series_is_still_arriving(database_url):
    db = Database(database_url)
    tracker = SeriesTracker(db)
    settings = AssemblySettings(quiet_period_s=10, study_quiet_period_s=10, force_complete_s=3600)
    assembler = Assembler(db, settings)
    tracker.add(info("1.1", "1.1.1", "1.1.1.1"), 100)
    tracker.flush()
    start = utcnow()
    # Series 1 has been quiet for 12 s, but series 2 of the same study is still arriving.
    later = start + timedelta(seconds=12)
    tracker.add(info("1.1", "1.1.2", "1.1.2.1"), 100)
    tracker.flush()
    with db.session() as session:
        row = session.scalar(select(Series).where(Series.series_uid == "1.1.2"))
        row.last_received_at = later
    assert assembler.poll(now=later) == []
    assert states(db) == {"1.1.1": "receiving", "1.1.2": "receiving"}
    done = assembler.poll(now=later + timedelta(seconds=11))
    assert [d.series_uids for d in done] == [("1.1.1", "1.1.2")]
    assert states(db) == {"1.1.1": "complete", "1.1.2": "complete"}
    db.dispose()


def test_forced_completion_after_timeout(database_url):
    db = Database(database_url)
    tracker = SeriesTracker(db)
    assembler = Assembler(db, AssemblySettings(quiet_period_s=10, study_quiet_period_s=10,
                                               force_complete_s=60))
    tracker.add(info("2.1", "2.1.1", "2.1.1.1"), 10)
    tracker.flush()
    # Keeps trickling in: never quiet, but forced after 60 s.
    with db.session() as session:
        row = session.scalar(select(Series))
        row.last_received_at = utcnow() + timedelta(seconds=61)
    done = assembler.poll(now=utcnow() + timedelta(seconds=61))
    assert done and done[0].forced
    db.dispose()


def test_series_that_received_an_instance_meanwhile_is_not_reported_complete(database_url):
    """The guarded update loses for a series that got an instance after poll read it:
    that series stays receiving and is neither routed nor counted as complete."""
    db = Database(database_url)
    tracker = SeriesTracker(db)
    routed: list[tuple[str, ...]] = []
    assembler = Assembler(db, AssemblySettings(quiet_period_s=1, study_quiet_period_s=1, force_complete_s=3600),
                          on_complete=lambda _session, done: routed.append(done.series_uids))
    tracker.add(info("4.1", "4.1.1", "4.1.1.1"), 10)
    tracker.add(info("4.1", "4.1.2", "4.1.2.1"), 10)
    tracker.flush()
    with db.session() as session:
        rows = list(session.scalars(select(Series).order_by(Series.series_uid)))
        session.expunge_all()
    # A receive process counts one more instance of 4.1.2 after the rows were read.
    tracker.add(info("4.1", "4.1.2", "4.1.2.2"), 10)
    tracker.flush()
    now = utcnow() + timedelta(seconds=5)
    done = assembler._complete_study("4.1", rows, now, timedelta(seconds=1), timedelta(seconds=1),
                                     timedelta(hours=1))
    assert done is not None and done.series_uids == ("4.1.1",)
    assert routed == [("4.1.1",)]
    assert states(db) == {"4.1.1": "complete", "4.1.2": "receiving"}
    # Nothing left to complete from the stale view: no empty study is reported.
    assert assembler._complete_study("4.1", rows[1:], now, timedelta(seconds=1), timedelta(seconds=1),
                                     timedelta(hours=1)) is None
    db.dispose()


def test_tracker_counts_and_replacements(database_url):
    db = Database(database_url)
    tracker = SeriesTracker(db)
    for n in range(5):
        tracker.add(info("3.1", "3.1.1", f"3.1.1.{n}"), 10)
    tracker.flush()
    tracker.add(info("3.1", "3.1.1", "3.1.1.0"), 10, replaced=True)
    tracker.add(info("3.1", "3.1.1", "3.1.1.9"), 10)
    tracker.flush()
    with db.session() as session:
        row = session.scalar(select(Series))
        assert (row.instance_count, row.bytes_received) == (6, 70)
    db.dispose()


def test_routing_creates_jobs_and_rearms_finished_ones(database_url):
    db = Database(database_url)
    tracker = SeriesTracker(db)
    assembler = Assembler(db, AssemblySettings(quiet_period_s=0, study_quiet_period_s=0),
                          on_complete=lambda s, c: route_study(s, default_routes(), c))
    tracker.add(info("4.1", "4.1.1", "4.1.1.1"), 10)
    tracker.flush()
    assembler.poll(now=utcnow() + timedelta(seconds=1))
    with db.session() as session:
        job = session.scalar(select(Job))
        assert (job.pipeline, job.state, job.input_series_uids) == ("ct-cspine-fracture", "queued", ["4.1.1"])
        job.state = "succeeded"
    # A late instance: the series is received again and its job re-armed, not duplicated.
    tracker.add(info("4.1", "4.1.1", "4.1.1.2"), 10)
    tracker.flush()
    assert states(db) == {"4.1.1": "receiving"}
    assembler.poll(now=utcnow() + timedelta(seconds=2))
    with db.session() as session:
        jobs = list(session.scalars(select(Job)))
        assert [(j.state, j.enqueued_at) for j in jobs] == [("queued", None)]
    db.dispose()


def test_recover_counts_instances_the_database_missed(tmp_path, database_url):
    db = Database(database_url)
    files = write_ct_series(tmp_path / "in", "5.1", "5.1.1", 3)
    spool = Spool(tmp_path / "spool")
    for index, path in enumerate(files):
        spool.store("5.1", "5.1.1", f"5.1.1.{index}", path.read_bytes())
    assert recover_from_spool(db, spool.root) == 1
    with db.session() as session:
        row = session.scalar(select(Series))
        assert (row.instance_count, row.state, row.body_part) == (3, "receiving", "CSPINE")
    assert recover_from_spool(db, spool.root) == 0  # idempotent
    db.dispose()
