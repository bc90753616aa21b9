"""Jobs: claiming, reconciling and retrying on SQLite and PostgreSQL, and real workers.

The worker tests start ``python -m spine_node.node.cli worker`` subprocesses against the embedded
filesystem broker and against Redis, kill them with ``kill -9`` mid-job and restart a
Redis server with messages in it; the reconciler must bring every job to ``succeeded``
with exactly one set of results.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from spine_node.node.audit import AuditEvent, Database, Dispatch, Job, Result, WorkerHeartbeat, utcnow
from spine_node.node.config import Settings, load_settings
from spine_node.node.errors import JobStateError
from spine_node.node.jobs import (
    Outcome,
    broker_depths,
    broker_folders,
    cancel_job,
    claim_job,
    queue_depths,
    reconcile,
    record_success,
    retry_job,
    send_pending,
    tick,
)
from tests.jobs_samples import BONE_HU, StoreSCP, ct_series, hounsfield
from tests.peers import free_port, redis_url, require, tool
from tests.pipelines_for_tests import BROKEN

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "test-bone-threshold"
WAIT_S = 120.0


# --- helpers -----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def node_env(tmp_path: Path, database_url: str, broker_url: str = "",
             **extra: str) -> dict[str, str]:
    """Environment configuring a node (and its worker subprocesses) under ``tmp_path``."""
    env = {
        "SPINE_NODE_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "SPINE_NODE_DATABASE_URL": database_url,
        "SPINE_NODE_WORKER__PIPELINE_MODULES": json.dumps(["tests.pipelines_for_tests"]),
        "SPINE_NODE_WORKER__HEARTBEAT_TIMEOUT_S": "3",
        "SPINE_NODE_WORKER__REQUEUE_AFTER_S": "2",
        "SPINE_NODE_WORKER__MAX_ATTEMPTS": "3",
        "SPINE_NODE_LOG_LEVEL": "INFO",
    }
    if broker_url:
        env["SPINE_NODE_BROKER_URL"] = broker_url
    env.update(extra)
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SPINE_NODE_CONFIG", raising=False)
    return load_settings()


class Worker:
    """A ``python -m spine_node.node.cli worker`` subprocess in its own process group."""

    def __init__(self, env: dict[str, str], log_file: Path, concurrency: int = 1) -> None:
        self.log_file = log_file
        self._log = log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spine_node.node.cli", "worker", "--queues", "cpu",
             "--concurrency", str(concurrency)],
            cwd=REPO, env={**os.environ, **env, "PYTHONPATH": str(REPO)},
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill_host(self) -> None:
        """``kill -9`` the whole process group: the worker host dies mid-job."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill_host()
        self._log.close()

    def output(self) -> str:
        return self.log_file.read_text(errors="replace")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(env: dict[str, str], concurrency: int = 1) -> Worker:
        worker = Worker(env, tmp_path / f"worker-{len(started)}.log", concurrency)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def add_job(db: Database, study_uid: str, series_uid: str, queue: str = "cpu",
            pipeline: str = PIPELINE) -> int:
    with db.session() as session:
        job = Job(study_uid=study_uid, series_uid=series_uid, input_series_uids=[series_uid],
                  pipeline=pipeline, route="test", queue=queue, state="queued")
        session.add(job)
        session.flush()
        return job.id


def job_row(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def job_state(db: Database, job_id: int) -> str:
    return job_row(db, job_id).state


def results_of(db: Database, job_id: int) -> list[Result]:
    with db.session() as session:
        return list(session.scalars(select(Result).where(Result.job_id == job_id)).all())


def check_results_match_pixels(db: Database, job_id: int, files: list[Path]) -> None:
    """The SEG holds exactly the bone voxels of the source slices."""
    results = results_of(db, job_id)
    assert results, "job recorded no results"
    segs = [r for r in results if r.kind == "SEG"]
    assert len(segs) == 1
    seg = dcmread(segs[0].path)
    sources = sorted((dcmread(f) for f in files), key=lambda ds: int(ds.InstanceNumber))
    expected = {ds.SOPInstanceUID: hounsfield(ds) >= BONE_HU for ds in sources}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        np.testing.assert_array_equal(frames[index] > 0, expected[source.ReferencedSOPInstanceUID])
    # Slices with no bone have no frame in a sparse SEG; all others do.
    assert len(frames) == sum(1 for m in expected.values() if m.any())
    # The SR's finding points at the SEG's bone segment.
    reports = [r for r in results if r.kind == "SR"]
    assert len(reports) == 1
    referenced = {str(e.value) for e in dcmread(reports[0].path).iterall()
                  if e.keyword == "ReferencedSOPInstanceUID"}
    assert seg.SOPInstanceUID in referenced


# --- DB logic, both engines -------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
         ) -> Iterator[tuple[Settings, Database]]:
    settings = settings_from(node_env(tmp_path, database_url), monkeypatch)
    db = Database(database_url)
    yield settings, db
    db.dispose()


def test_send_pending_sends_each_job_once(node):
    settings, db = node
    first = add_job(db, "1.2.3", "1.2.3.4")
    second = add_job(db, "1.2.3", "1.2.3.5", queue="gpu")
    assert send_pending(db, settings) == 2
    assert send_pending(db, settings) == 0
    assert broker_depths(settings) == {"cpu": 1, "gpu": 1}
    for job_id in (first, second):
        job = job_row(db, job_id)
        assert job.enqueued_at is not None and job.task_id
        assert job.state == "queued" and job.attempts == 0
    status = queue_depths(settings, db)
    assert status.depths == {"cpu": 1, "gpu": 1}
    assert status.queued == {"cpu": 1, "gpu": 1}
    assert status.workers == ()


def test_claim_is_exclusive_and_takes_over_a_stale_job(node):
    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    now = utcnow()
    claim = claim_job(db, settings, job_id, worker="host-a:1", now=now)
    assert claim is not None and claim.attempt == 1
    # Another worker with a duplicate message skips a job whose heartbeat is fresh.
    assert claim_job(db, settings, job_id, worker="host-b:2", now=now) is None
    # Once the heartbeat is stale, the job can be taken over (attempt 2)...
    later = now + timedelta(seconds=settings.worker.heartbeat_timeout_s + 1)
    takeover = claim_job(db, settings, job_id, worker="host-b:2", now=later)
    assert takeover is not None and takeover.attempt == 2
    # ...and the first worker's outcome is then discarded.
    assert not record_success(db, settings, claim, Outcome(results=[]))
    assert record_success(db, settings, takeover, Outcome(results=[], backend="numpy"))
    job = job_row(db, job_id)
    assert job.state == "succeeded" and job.worker == "host-b:2" and job.backend == "numpy"
    # A duplicate message for a finished job is skipped.
    assert claim_job(db, settings, job_id, worker="host-c:3") is None


def test_a_dead_pid_frees_a_job_only_in_the_same_pid_namespace(node):
    """A running job whose worker process is gone here is taken over at once; one whose pid
    is from a container sharing this host's name (another pid namespace) is not."""
    import socket

    from spine_node.node.jobs import local_host_id, worker_id

    settings, db = node
    assert worker_id().startswith(local_host_id() + ":")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = utcnow()
    for index, (owner, taken_over) in enumerate((
            (f"{local_host_id()}:{dead.pid}:1", True),
            (f"{socket.gethostname()}-4026599999:{dead.pid}:1", False),
            (f"{socket.gethostname()}:{dead.pid}:1", False))):
        job_id = add_job(db, "1.2.3", f"1.2.3.{index + 1}")
        assert claim_job(db, settings, job_id, worker=owner, now=now) is not None
        claim = claim_job(db, settings, job_id, worker="host-b:2", now=now)
        assert (claim is not None) is taken_over, owner


def test_reconcile_requeues_lost_jobs_then_gives_up(node):
    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    now = utcnow()
    stale = timedelta(seconds=settings.worker.heartbeat_timeout_s + 1)
    for attempt in range(1, settings.worker.max_attempts + 1):
        claim = claim_job(db, settings, job_id, worker=f"host:{attempt}", now=now)
        assert claim is not None and claim.attempt == attempt
        now += stale
        report = reconcile(db, settings, now=now)
        if attempt < settings.worker.max_attempts:
            assert report.requeued == [job_id]
            job = job_row(db, job_id)
            assert job.state == "queued" and job.worker is None
            assert "lost during attempt" in (job.error or "")
            assert report.sent == 1  # re-sent at once
    job = job_row(db, job_id)
    assert job.state == "failed"
    assert job.error and "gave up after 3 attempt(s)" in job.error
    with db.session() as session:
        kinds = [e.kind for e in session.scalars(select(AuditEvent)
                                                 .where(AuditEvent.job_id == job_id)).all()]
    assert kinds.count("job.requeued") == 2 and kinds.count("job.failed") == 1


def test_claim_fails_a_job_that_used_its_attempts(node):
    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    with db.session() as session:
        session.get(Job, job_id).attempts = settings.worker.max_attempts  # type: ignore[union-attr]
    assert claim_job(db, settings, job_id, worker="host:1") is None
    job = job_row(db, job_id)
    assert job.state == "failed" and "gave up" in (job.error or "")


def test_reconcile_resends_only_lost_messages(node):
    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    send_pending(db, settings)
    sent_at = job_row(db, job_id).enqueued_at
    later = utcnow() + timedelta(seconds=settings.worker.requeue_after_s + 1)
    # The message is still on the broker: the job is only waiting for a worker.
    assert reconcile(db, settings, now=later).resent == []
    assert broker_depths(settings)["cpu"] == 1
    # The broker lost it: re-sent.
    for message in broker_folders(settings)["queue"].glob("*.msg"):
        message.unlink()
    report = reconcile(db, settings, now=later)
    assert report.resent == [job_id] and report.sent == 1
    assert broker_depths(settings)["cpu"] == 1
    assert job_row(db, job_id).enqueued_at != sent_at


def test_retry_and_cancel(node, tmp_path, database_url):
    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    with pytest.raises(JobStateError, match="only failed, cancelled or queued"):
        claim = claim_job(db, settings, job_id, worker="host:1")
        assert claim is not None
        retry_job(db, settings, job_id)
    cancel_job(db, job_id)
    assert job_state(db, job_id) == "cancelled"
    with pytest.raises(JobStateError, match="only queued or running"):
        cancel_job(db, job_id)
    # The CLI retries it: queued again with fresh attempts and a message.
    env = {**os.environ, **node_env(tmp_path, database_url), "PYTHONPATH": str(REPO),
           "COLUMNS": "200"}
    cli = [sys.executable, "-m", "spine_node.node.cli"]
    out = subprocess.run([*cli, "jobs", "retry", str(job_id)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = job_row(db, job_id)
    assert job.state == "queued" and job.attempts == 0 and job.enqueued_at is not None
    listing = subprocess.run([*cli, "jobs", "list", "--state", "queued"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and PIPELINE in listing.stdout
    shown = subprocess.run([*cli, "jobs", "show", str(job_id)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "1.2.3.4" in shown.stdout
    missing = subprocess.run([*cli, "jobs", "cancel", "999"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --- real workers ------------------------------------------------------------------------


def test_filesystem_broker_worker_runs_job(tmp_path, database_url, monkeypatch, workers):
    """The embedded set-up end to end: broker without a server, worker, tick, PACS."""
    pacs = StoreSCP(free_port(), tmp_path / "pacs")
    try:
        env = node_env(tmp_path, database_url,
                       SPINE_NODE_WORKER__MAX_ATTEMPTS="2",
                       SPINE_NODE_DISPATCH__DESTINATIONS=json.dumps(
                           [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                             "port": pacs.port}]))
        settings = settings_from(env, monkeypatch)
        assert settings.broker_url == "filesystem://"
        db = Database(database_url)
        study, series, files = ct_series(settings.storage.spool)
        good = add_job(db, study, series)
        missing = add_job(db, study, "1.2.826.0.1.3680043.99.1")  # not in the spool
        broken = add_job(db, study, series, pipeline=BROKEN)
        assert send_pending(db, settings) == 3

        worker = workers(env)

        def finished() -> bool:
            tick(db, settings)  # what the serve loop does: re-send, reconcile, dispatch
            return all(job_state(db, j) in ("succeeded", "failed")
                       for j in (good, missing, broken))

        wait_for(finished, "the jobs to finish")
        job = job_row(db, good)
        assert job.state == "succeeded", f"{job.error}\n{worker.output()}"
        assert job.attempts == 1 and job.backend == "numpy" and job.model_name == PIPELINE
        assert job.timings and job.timings["total_s"] >= 0
        check_results_match_pixels(db, good, files)
        # A node error fails the job at once, with the reason.
        job = job_row(db, missing)
        assert job.state == "failed" and job.attempts == 1
        assert "SpoolError" in (job.error or "") and "no instances" in (job.error or "")
        # A bug is retried, then failed after worker.max_attempts.
        job = job_row(db, broken)
        assert job.state == "failed" and job.attempts == 2
        assert "ZeroDivisionError" in (job.error or "") and "attempt 2 of 2" in (job.error or "")

        # tick() dispatched the results to the PACS.
        wait_for(lambda: tick(db, settings) and all(
            d.state == "sent" for d in dispatches(db)), "the results to be sent")
        sent = dispatches(db)
        # The job that gave up sends its "analysis not performed" SR too (node/notices.py);
        # the one whose series is not in the spool has nothing to say it about.
        notice = results_of(db, broken)
        assert [r.kind for r in notice] == ["SR"] and results_of(db, missing) == []
        assert len(sent) == len(results_of(db, good)) + len(notice) == 3
        received = {dcmread(p).SOPInstanceUID for p in pacs.received()}
        assert received == {r.sop_instance_uid for r in results_of(db, good) + notice}

        # The worker reports itself alive while it runs, to the library and the CLI.
        status = queue_depths(settings, db)
        assert len(status.workers) == 1 and status.workers[0].queues == ("cpu",)
        assert status.depths == {"cpu": 0, "gpu": 0}
        cli_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
        out = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "jobs", "queues"], cwd=REPO,
                             env=cli_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and status.workers[0].hostname in out.stdout
        assert "backends found" in worker.output()
        worker.stop()
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(WorkerHeartbeat)) == 0
        db.dispose()
    finally:
        pacs.stop()


def dispatches(db: Database) -> list[Dispatch]:
    with db.session() as session:
        return list(session.scalars(select(Dispatch).order_by(Dispatch.id)).all())


def _redis_db_url(number: int) -> str:
    import redis

    url = f"{redis_url().rstrip('/')}/{number}"
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        require(False, f"Redis not reachable at {redis_url()}: {exc}")
    client.flushdb()
    client.close()
    return url


@pytest.mark.redis
def test_worker_killed_mid_job_is_reconciled(tmp_path, database_url, monkeypatch, workers):
    gate = tmp_path / "gate"
    gate.mkdir()
    env = node_env(tmp_path, database_url, _redis_db_url(13),
                   SPINE_NODE_TEST_GATE_DIR=str(gate))
    settings = settings_from(env, monkeypatch)
    db = Database(database_url)
    study, series, files = ct_series(settings.storage.spool)
    job_id = add_job(db, study, series)
    send_pending(db, settings)

    first = workers(env)
    wait_for(lambda: list(gate.glob("started-*")), "the pipeline to start")
    assert job_state(db, job_id) == "running"
    first_owner = job_row(db, job_id).worker
    first.kill_host()
    (gate / "open").touch()

    second = workers(env)
    # The dead worker's heartbeat goes stale; reconcile puts the job back on the queue.
    def reconciled() -> bool:
        reconcile(db, settings)
        return job_state(db, job_id) in ("succeeded", "failed")

    wait_for(reconciled, "the job to be reconciled and finish")
    job = job_row(db, job_id)
    assert job.state == "succeeded", f"{job.error}\n{second.output()}"
    assert job.attempts == 2 and job.worker != first_owner
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 2  # SEG + SR
        kinds = [e.kind for e in session.scalars(select(AuditEvent)
                                                 .where(AuditEvent.job_id == job_id)).all()]
    assert kinds.count("job.requeued") == 1 and kinds.count("job.succeeded") == 1
    check_results_match_pixels(db, job_id, files)
    db.dispose()


@pytest.mark.redis
def test_prefork_child_killed_is_taken_over_at_once(tmp_path, database_url, monkeypatch,
                                                    workers):
    """Only the pool child dies: Celery re-queues the message (reject on worker lost) and
    another child takes the job over at once, since its owner's pid is gone on this host,
    without waiting for the heartbeat timeout (set far out of reach here)."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = node_env(tmp_path, database_url, _redis_db_url(14),
                   SPINE_NODE_TEST_GATE_DIR=str(gate),
                   SPINE_NODE_WORKER__HEARTBEAT_TIMEOUT_S="3600")
    settings = settings_from(env, monkeypatch)
    db = Database(database_url)
    study, series, files = ct_series(settings.storage.spool)
    job_id = add_job(db, study, series)
    send_pending(db, settings)

    worker = workers(env, concurrency=2)
    started = wait_for(lambda: list(gate.glob("started-*")), "the pipeline to start")
    child = int(started[0].name.removeprefix("started-"))
    assert job_row(db, job_id).worker.split(":")[1] == str(child)  # type: ignore[union-attr]
    assert child != worker.proc.pid
    os.kill(child, signal.SIGKILL)
    (gate / "open").touch()

    wait_for(lambda: job_state(db, job_id) in ("succeeded", "failed"), "the take-over")
    job = job_row(db, job_id)
    assert job.state == "succeeded", f"{job.error}\n{worker.output()}"
    assert job.attempts == 2 and job.worker.split(":")[1] != str(child)  # type: ignore[union-attr]
    check_results_match_pixels(db, job_id, files)
    db.dispose()


class RedisServer:
    """A private ``redis-server`` without persistence, restartable on the same port."""

    def __init__(self, folder: Path) -> None:
        self.binary = tool("redis-server", "redis-server")
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_for(up, "redis-server to start", timeout=30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.mark.redis
def test_redis_restart_loses_messages_and_reconcile_resends(tmp_path, database_url,
                                                            monkeypatch, workers):
    server = RedisServer(tmp_path)
    server.start()
    try:
        env = node_env(tmp_path, database_url, server.url)
        settings = settings_from(env, monkeypatch)
        db = Database(database_url)
        study, series, files = ct_series(settings.storage.spool)
        job_id = add_job(db, study, series)
        send_pending(db, settings)
        assert broker_depths(settings)["cpu"] == 1

        server.kill()  # no persistence: the message is gone with it
        assert broker_depths(settings)["cpu"] is None  # unreachable, and says so
        assert reconcile(db, settings).resent == []  # nothing to decide while it is down
        # A job routed while the broker is down stays unsent, not lost.
        study2, series2, files2 = ct_series(settings.storage.spool, tag="b")
        second = add_job(db, study2, series2)
        assert send_pending(db, settings) == 0
        assert job_row(db, second).enqueued_at is None
        server.start()
        assert broker_depths(settings)["cpu"] == 0

        later = utcnow() + timedelta(seconds=settings.worker.requeue_after_s + 1)
        report = reconcile(db, settings, now=later)
        assert report.resent == [job_id] and report.sent == 2
        assert broker_depths(settings)["cpu"] == 2
        worker = workers(env)
        wait_for(lambda: all(job_state(db, j) in ("succeeded", "failed")
                             for j in (job_id, second)), "the jobs to finish")
        for each, sources in ((job_id, files), (second, files2)):
            job = job_row(db, each)
            assert job.state == "succeeded", f"{job.error}\n{worker.output()}"
            assert job.attempts == 1
            check_results_match_pixels(db, each, sources)
        db.dispose()
    finally:
        server.kill()


# --- a series that grows after routing ---------------------------------------------------


def _growing_series(settings: Settings, db: Database, slices: int, tag: str
                    ) -> tuple[str, str, list[Path], Callable[[Path], None], Any]:
    """A CT series in the spool, all but its last slice counted, completed and routed.

    Returns its UIDs, every file, a function that counts one more file (a late arrival),
    and the assembler (which routes ``PIPELINE`` for CT).
    """
    from spine_node.node.assemble import Assembler, SeriesTracker
    from spine_node.node.config import AssemblySettings, Route, RouteMatch
    from spine_node.node.header import InstanceInfo
    from spine_node.node.route import route_study

    study, series, files = ct_series(settings.storage.spool, slices=slices, tag=tag)
    late = files[-1].with_name(files[-1].name + ".later")
    files[-1].rename(late)  # not arrived yet
    tracker = SeriesTracker(db)
    routes = [Route(name="ct", pipelines=[PIPELINE], match=RouteMatch(modality=["CT"]))]
    assembler = Assembler(db, AssemblySettings(quiet_period_s=0, study_quiet_period_s=0),
                          on_complete=lambda session, done: route_study(session, routes, done))

    def arrive(path: Path) -> None:
        tracker.add(InstanceInfo(study, series, dcmread(path, stop_before_pixels=True).SOPInstanceUID,
                                 "1.2.840.10008.5.1.4.1.1.2", "CT"), path.stat().st_size)
        tracker.flush()

    for path in files[:-1]:
        arrive(path)
    assert assembler.poll(now=utcnow() + timedelta(seconds=1))

    def arrive_late(_: Path) -> None:
        late.rename(files[-1])
        arrive(files[-1])

    return study, series, files, arrive_late, assembler


def _events(db: Database, job_id: int) -> list[str]:
    with db.session() as session:
        return [e.kind for e in session.scalars(select(AuditEvent).where(AuditEvent.job_id == job_id)
                                                .order_by(AuditEvent.id)).all()]


def test_a_run_over_a_series_that_grew_meanwhile_is_discarded_and_rearmed(node):
    """The series gets an instance while its job runs and the run ends before the series
    is complete again: the run's outcome is discarded (its results would cover part of
    the series), and the job re-runs once the series is complete."""
    settings, db = node
    study, series, files, arrive_late, assembler = _growing_series(settings, db, 4, "grow-a")
    with db.session() as session:
        job_id = session.scalar(select(Job.id))
    claim = claim_job(db, settings, job_id, worker="w1")
    assert claim is not None
    arrive_late(files[-1])
    assert not record_success(db, settings, claim, Outcome(results=[]))
    job = job_row(db, job_id)
    assert job.state == "cancelled" and "superseded" in (job.error or "")
    # A message for it while the series is still receiving does not start a partial run.
    assert claim_job(db, settings, job_id, worker="w2") is None
    assert assembler.poll(now=utcnow() + timedelta(seconds=1))
    job = job_row(db, job_id)
    assert (job.state, job.attempts, job.enqueued_at) == ("queued", 0, None)
    assert _events(db, job_id).count("job.superseded") == 1
    db.dispose()


def test_a_growing_series_ends_with_results_over_all_its_instances(tmp_path, database_url,
                                                                   monkeypatch, workers):
    """The issue's case: late slices arrive and the series completes again while its job
    still runs over the first ones. The running job is superseded (its outcome discarded)
    and re-run over the whole series; only results over every slice are recorded."""
    gate = tmp_path / "gate"
    gate.mkdir()
    env = node_env(tmp_path, database_url, SPINE_NODE_TEST_GATE_DIR=str(gate))
    settings = settings_from(env, monkeypatch)
    db = Database(database_url)
    study, series, files, arrive_late, assembler = _growing_series(settings, db, 4, "grow-b")
    with db.session() as session:
        job_id = session.scalar(select(Job.id))
    assert send_pending(db, settings) == 1
    worker = workers(env)
    # The pipeline has read the 3 slices there are and waits at the gate.
    wait_for(lambda: list(gate.glob("started-*")) or worker.proc.poll() is not None,
             "the pipeline to start")
    assert job_state(db, job_id) == "running", f"{job_row(db, job_id).error}\n{worker.output()}"
    arrive_late(files[-1])
    assert assembler.poll(now=utcnow() + timedelta(seconds=1))
    assert job_state(db, job_id) == "queued"
    (gate / "open").touch()

    def finished() -> bool:
        tick(db, settings)
        return job_state(db, job_id) in ("succeeded", "failed")

    wait_for(finished, "the re-run to finish")
    job = job_row(db, job_id)
    assert job.state == "succeeded", f"{job.error}\n{worker.output()}"
    check_results_match_pixels(db, job_id, files)  # every slice, once
    kinds = _events(db, job_id)
    assert kinds.count("job.superseded") == 1 and kinds.count("job.succeeded") == 1
    with db.session() as session:  # the superseded run recorded nothing
        assert session.scalar(select(func.count()).select_from(Result)) == 2
        recorded = {Path(p) for p in session.scalars(select(Result.path))}
    # ...and left no files behind: what is under results_dir is what was recorded.
    assert {p for p in settings.storage.results.rglob("*") if p.is_file()} == recorded
    db.dispose()


def test_a_discarded_runs_files_go_unless_a_recorded_result_owns_them(node, tmp_path):
    from spine_node.node.jobs import ResultFile
    from spine_node.node.worker import discard_files

    settings, db = node
    job_id = add_job(db, "1.2.3", "1.2.3.4")
    kept, stray = tmp_path / "kept.dcm", tmp_path / "stray.dcm"
    for path in (kept, stray):
        path.write_bytes(b"result")
    with db.session() as session:
        session.add(Result(job_id=job_id, kind="SEG", sop_class_uid="1.2", sop_instance_uid="1.2.9",
                           series_uid="1.2.8", path=str(kept)))
    outcome = Outcome(results=[ResultFile("SEG", "1.2", "1.2.9", "1.2.8", kept),
                               ResultFile("SR", "1.2", "1.2.7", "1.2.6", stray),
                               ResultFile("SR", "1.2", "1.2.5", "1.2.6", tmp_path / "gone.dcm")])
    assert discard_files(db, outcome) == 1
    assert kept.exists() and not stray.exists()


def test_a_rerun_over_a_grown_series_supersedes_the_earlier_results(tmp_path, database_url,
                                                                    monkeypatch, workers):
    """The job succeeded over 3 slices; a 4th arrives later. The re-run's SEG and SR get
    new UIDs (other content), the new SR names the earlier one as its predecessor, and
    the earlier objects are no longer sent (their dispatches are cancelled)."""
    down = free_port()  # nothing listens: dispatches stay pending
    env = node_env(tmp_path, database_url, SPINE_NODE_DISPATCH__DESTINATIONS=json.dumps(
        [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": down}]))
    settings = settings_from(env, monkeypatch)
    db = Database(database_url)
    study, series, files, arrive_late, assembler = _growing_series(settings, db, 4, "grow-c")
    with db.session() as session:
        job_id = session.scalar(select(Job.id))
    send_pending(db, settings)
    worker = workers(env)
    wait_for(lambda: job_state(db, job_id) in ("succeeded", "failed"), "the first run")
    assert job_state(db, job_id) == "succeeded", worker.output()
    first = {r.kind: r for r in results_of(db, job_id)}
    arrive_late(files[-1])
    assert assembler.poll(now=utcnow() + timedelta(seconds=1))
    send_pending(db, settings)
    wait_for(lambda: job_state(db, job_id) in ("succeeded", "failed")
             and len(results_of(db, job_id)) == 4, "the re-run")
    second = {r.kind: r for r in results_of(db, job_id) if r.id not in {x.id for x in first.values()}}
    assert set(second) == {"SEG", "SR"}
    assert not {r.sop_instance_uid for r in first.values()} & {r.sop_instance_uid for r in second.values()}
    check_results_match_pixels_of(second["SEG"], files)
    sr = dcmread(second["SR"].path)
    (study_item,) = sr.PredecessorDocumentsSequence
    (series_item,) = study_item.ReferencedSeriesSequence
    (sop_item,) = series_item.ReferencedSOPSequence
    assert (study_item.StudyInstanceUID, series_item.SeriesInstanceUID, sop_item.ReferencedSOPInstanceUID) == (
        study, first["SR"].series_uid, first["SR"].sop_instance_uid)
    errors, _ = _dciodvfy(Path(second["SR"].path))
    assert not errors, errors
    states = {d.result_id: d.state for d in dispatches(db)}
    assert {states[r.id] for r in first.values()} == {"cancelled"}
    assert {states[r.id] for r in second.values()} == {"pending"}
    assert "result.superseded" in _events(db, job_id)
    db.dispose()


def check_results_match_pixels_of(seg_row: Result, files: list[Path]) -> None:
    """The SEG row's object has one frame per source slice with bone, over ``files``."""
    seg = dcmread(seg_row.path)
    sources = {dcmread(f).SOPInstanceUID: hounsfield(dcmread(f)) >= BONE_HU for f in files}
    referenced = {frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for frame in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {uid for uid, mask in sources.items() if mask.any()}


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    out = subprocess.run([tool("dciodvfy", "dicom3tools"), "-new", str(path)], capture_output=True, text=True,
                         timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def test_orthanc_holds_one_content_per_uid_after_a_series_grew(tmp_path, database_url, monkeypatch, workers):
    """Results over 3 slices reach Orthanc; a 4th slice arrives and the re-run's results
    follow. Orthanc (which keeps the first copy of a UID) holds 4 objects, each identical
    to the node's file of that UID, and the newer SR names the older one."""
    import io

    from tests.orthanc import Orthanc

    with Orthanc(tmp_path / "orthanc") as pacs:
        env = node_env(tmp_path, database_url, SPINE_NODE_DISPATCH__DESTINATIONS=json.dumps(
            [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]))
        settings = settings_from(env, monkeypatch)
        db = Database(database_url)
        _study, _series, files, arrive_late, assembler = _growing_series(settings, db, 4, "grow-o")
        with db.session() as session:
            job_id = session.scalar(select(Job.id))
        send_pending(db, settings)
        worker = workers(env)

        def all_sent(count: int) -> bool:
            tick(db, settings)
            sent = [d for d in dispatches(db) if d.state == "sent"]
            return len(sent) >= count

        wait_for(lambda: all_sent(2), "the first results in Orthanc")
        first_sr = next(r for r in results_of(db, job_id) if r.kind == "SR")
        arrive_late(files[-1])
        assert assembler.poll(now=utcnow() + timedelta(seconds=1))
        send_pending(db, settings)
        wait_for(lambda: all_sent(4), "the re-run's results in Orthanc")
        assert job_state(db, job_id) == "succeeded", worker.output()
        ours = {r.sop_instance_uid: dcmread(r.path) for r in results_of(db, job_id)}
        held = {}
        for instance in pacs.instances():
            ds = dcmread(io.BytesIO(pacs.file(instance["ID"])))
            held[ds.SOPInstanceUID] = ds
        assert set(held) == set(ours) and len(held) == 4
        for uid, ds in held.items():
            assert ds == ours[uid], uid  # same content under each UID
        newer = next(ds for uid, ds in held.items() if ds.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.88.")
                     and uid != first_sr.sop_instance_uid)
        referenced = newer.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == first_sr.sop_instance_uid
        db.dispose()
