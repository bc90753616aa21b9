"""Dispatch against a real DCMTK storescp: delivery, backoff, dead letter, retry, rejection."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from spine_node.node.audit import AuditEvent, Database, Dispatch, Job, Result, Series, utcnow
from spine_node.node.config import Destination, Settings
from spine_node.node.dispatch import backoff_s, dispatch_pending
from spine_node.node.worker import write_results
from tests.jobs_samples import StoreSCP, bone_seg, bone_sr, ct_series
from tests.peers import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(free_port(), tmp_path / "pacs")
    yield scp
    scp.stop()


def _settings(tmp_path: Path, database_url: str, port: int, **dispatch: object) -> Settings:
    values = {"destinations": [Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                           port=port)],
              "max_attempts": 3, "backoff_initial_s": 10.0, "backoff_max_s": 15.0}
    values.update(dispatch)
    return Settings(database_url=database_url,
                    storage={"data_dir": tmp_path / "data"},  # type: ignore[arg-type]
                    dispatch=values,  # type: ignore[arg-type]
                    dicom={"acse_timeout_s": 5, "dimse_timeout_s": 10,  # type: ignore[arg-type]
                           "network_timeout_s": 10})


def _results_with_dispatches(db: Database, settings: Settings) -> list[Path]:
    """A succeeded job with a SEG and an SR result, each with a dispatch to ``pacs``."""
    study, series, files = ct_series(settings.storage.spool)
    sources = [dcmread(f) for f in files]
    written = write_results([bone_seg(sources), bone_sr(sources)], settings.storage.results)
    with db.session() as session:
        job = Job(study_uid=study, series_uid=series, input_series_uids=[series],
                  pipeline="test-bone-threshold", queue="cpu", state="succeeded")
        session.add(job)
        session.flush()
        for item in written:
            result = Result(job_id=job.id, kind=item.kind, sop_class_uid=item.sop_class_uid,
                            sop_instance_uid=item.sop_instance_uid, series_uid=item.series_uid,
                            path=str(item.path))
            session.add(result)
            session.flush()
            session.add(Dispatch(result_id=result.id, destination="pacs"))
    return [w.path for w in written]


def _dispatches(db: Database) -> list[Dispatch]:
    with db.session() as session:
        return list(session.scalars(select(Dispatch).order_by(Dispatch.id)).all())


def test_results_arrive_with_equal_content(tmp_path, database_url, storescp):
    settings = _settings(tmp_path, database_url, storescp.port)
    db = Database(database_url)
    paths = _results_with_dispatches(db, settings)

    report = dispatch_pending(db, settings)

    assert len(report.sent) == 2 and not report.failed and not report.dead
    assert all(d.state == "sent" and d.attempts == 1 and d.last_status == "0x0000"
               for d in _dispatches(db))
    received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in storescp.received()}
    for path in paths:
        original = dcmread(path)
        copy = received[original.SOPInstanceUID]
        assert copy.SOPClassUID == original.SOPClassUID
        # Same dataset content (the file meta is the receiver's own).
        assert copy == original
    # Nothing is due any more: a second pass sends nothing.
    assert not dispatch_pending(db, settings).sent
    with db.session() as session:
        kinds = [e.kind for e in session.scalars(select(AuditEvent)).all()]
    assert kinds.count("dispatch.sent") == 2
    db.dispose()


def test_down_destination_backs_off_goes_dead_and_retry_recovers(tmp_path, database_url):
    port = free_port()  # nothing listens here yet
    settings = _settings(tmp_path, database_url, port)
    db = Database(database_url)
    _results_with_dispatches(db, settings)
    start = utcnow()

    first = dispatch_pending(db, settings, now=start)
    assert len(first.failed) == 2
    rows = _dispatches(db)
    assert all(d.state == "pending" and d.attempts == 1 for d in rows)
    assert all(abs((d.next_attempt_at - start).total_seconds() - 10.0) < 0.01 for d in rows)
    assert "cannot associate" in (rows[0].last_error or "")
    # Not due before the backoff elapses.
    assert not dispatch_pending(db, settings, now=start + timedelta(seconds=9)).failed

    second = dispatch_pending(db, settings, now=start + timedelta(seconds=10))
    assert len(second.failed) == 2
    assert backoff_s(settings, 2) == 15.0  # 10 doubled to 20, capped at backoff_max_s
    third = dispatch_pending(db, settings, now=start + timedelta(seconds=26))
    assert len(third.dead) == 2
    assert all(d.state == "dead" and d.attempts == 3 for d in _dispatches(db))
    # Dead stays dead: no more attempts, however long we wait.
    later = dispatch_pending(db, settings, now=start + timedelta(days=1))
    assert not (later.sent or later.failed or later.dead)

    scp = StoreSCP(port, tmp_path / "pacs")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "SPINE_NODE_DATABASE_URL": database_url}
        for row in _dispatches(db):
            out = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "dispatch", "retry",
                                  str(row.id)], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "pending again" in out.stdout
        assert all(d.state == "pending" and d.attempts == 0 for d in _dispatches(db))
        recovered = dispatch_pending(db, settings)
        assert len(recovered.sent) == 2
        assert len(scp.received()) == 2
    finally:
        scp.stop()
    with db.session() as session:
        kinds = [e.kind for e in session.scalars(select(AuditEvent)).all()]
    assert kinds.count("dispatch.failed") == 4
    assert kinds.count("dispatch.dead") == 2
    assert kinds.count("dispatch.retried") == 2
    db.dispose()


def test_rejected_association_counts_attempts_and_stops(tmp_path, database_url):
    scp = StoreSCP(free_port(), tmp_path / "pacs", "--refuse")
    try:
        settings = _settings(tmp_path, database_url, scp.port, backoff_initial_s=0.0,
                             backoff_max_s=0.0)
        db = Database(database_url)
        _results_with_dispatches(db, settings)
        passes = 0
        # With zero backoff every pass is an attempt; it must end by itself.
        while any(d.state == "pending" for d in _dispatches(db)):
            passes += 1
            assert passes <= settings.dispatch.max_attempts, "dispatch keeps retrying"
            dispatch_pending(db, settings)
        rows = _dispatches(db)
        assert passes == 3
        assert all(d.state == "dead" and d.attempts == 3 for d in rows)
        with db.session() as session:
            errors = [e.message for e in session.scalars(
                select(AuditEvent).where(AuditEvent.kind.like("dispatch.%"))).all()]
        assert len(errors) == 6  # two dispatches, three attempts each
        # storescp answers A-ASSOCIATE-RJ and closes at once; on a loaded machine the close
        # can win the race, which is then an attempt without an answer.
        assert any("rejected" in e for e in errors)
        assert all("rejected" in e or "cannot associate" in e for e in errors)
        assert scp.received() == []
        db.dispose()
    finally:
        scp.stop()


class SilentPACS:
    """A PACS that accepts TCP connections and never says a word."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_pacs_that_never_answers_does_not_hold_up_routing(tmp_path, database_url):
    """Dispatch waits acse_timeout_s on a PACS that accepts and never answers; meanwhile
    the node still completes and routes what it receives (dispatch has its own thread)."""
    import threading

    from pynetdicom.dul import DULServiceProvider

    from spine_node.node.service import NodeService
    from tests.dicom_factory import write_study
    from tests.scu import association, store

    pacs = SilentPACS()
    settings = _settings(tmp_path, database_url, pacs.port)
    settings = settings.model_copy(update={
        "dicom": settings.dicom.model_copy(update={"acse_timeout_s": 300, "host": "127.0.0.1", "port": 0}),
        "assembly": settings.assembly.model_copy(update={
            "quiet_period_s": 0.5, "study_quiet_period_s": 0.5, "poll_interval_s": 0.2}),
        "worker": settings.worker.model_copy(update={"embedded": False}),
    })
    settings.storage.min_free_mb = 0
    db = Database(database_url)
    _results_with_dispatches(db, settings)
    service = NodeService(settings, db)
    service.start()
    try:
        deadline = time.monotonic() + 60
        while not pacs.accepted:  # the dispatch lane is inside its A-ASSOCIATE now
            assert time.monotonic() < deadline, "dispatch never connected"
            time.sleep(0.1)
        study = write_study(tmp_path / "in", seed="silent-pacs", series=1, per_series=2)
        (series_uid, files), = study.items()
        with association(service.port) as assoc:
            for path in files:
                assert store(assoc, path) == 0
        # Far less than acse_timeout_s: routing does not wait for the PACS.
        while True:
            with db.session() as session:
                state = session.scalar(select(Series.state).where(Series.series_uid == series_uid))
            if state in ("routed", "skipped"):
                break
            assert time.monotonic() < deadline + 30, f"series still {state}: routing waits for the PACS"
            time.sleep(0.2)
        assert len(pacs.accepted) == 1 and all(d.attempts == 0 for d in _dispatches(db))
        # Stopping does not wait for the silent PACS either: pynetdicom's network thread
        # (not a daemon, so it would keep the process alive) is cut short.
        service.stop()
        stopped = time.monotonic()
        while [t for t in threading.enumerate() if isinstance(t, DULServiceProvider) and t.is_alive()]:
            assert time.monotonic() - stopped < 30, "dispatch's network thread outlives the stop"
            time.sleep(0.1)
    finally:
        service.stop()
        pacs.close()
        db.dispose()
