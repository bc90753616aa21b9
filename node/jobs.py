"""Jobs: the Celery app, a job row's claim and outcome, and the reconciler.

SQL is the source of truth for work (DESIGN decision 1). Routing commits a
:class:`spine_node.node.audit.Job` row first; :func:`send_pending` then puts a Celery message on
the job's queue, which only wakes a worker. The task claims the row with a
compare-and-set update, so duplicate messages are harmless, keeps ``heartbeat_at`` fresh
while the pipeline runs, and records the outcome, the result objects and their
dispatches in one commit. :func:`reconcile` re-sends messages the broker lost and puts
jobs whose worker died back on the queue, giving up after ``worker.max_attempts``.

``serve`` runs :func:`reconcile` and dispatch on two threads of their own (``service.Lane``), so a
broker or PACS that does not answer never holds up routing; :func:`tick` does both in one
call for callers without a service. The ``run_job`` task itself is
defined in :mod:`spine_node.node.worker` (the worker side imports this module, never
the other way round).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from celery import Celery, shared_task
from kombu import Queue
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from spine_node.node import audit
from spine_node.node.audit import Database, Job, WorkerHeartbeat, record_event, utcnow
from spine_node.node.config import Settings, redact_url
from spine_node.node.domain import DispatchState, JobState, SeriesState
from spine_node.node.errors import JobStateError

log = logging.getLogger(__name__)

TASK_NAME = "spine_node.run_job"
#: One queue per engine class; ``worker.queues`` may add more.
ENGINE_QUEUES = ("cpu", "gpu")
#: A worker liveness row older than this is shown as gone.
WORKER_LIVE_S = 30.0
#: Workers refresh their liveness row this often.
WORKER_HEARTBEAT_S = 10.0
_FINISHED = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)
_ERROR_MAX = 2000

F = TypeVar("F", bound=Callable[..., Any])


# --- the Celery app ----------------------------------------------------------------------


class NodeCelery(Celery):
    """A Celery app that carries the node settings and one database handle per process."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("spine_node", set_as_current=False)
        self.node_settings = settings
        self._db: Database | None = None
        self._db_pid = 0
        self.conf.update(celery_config(settings))

    def database(self) -> Database:
        """The database handle of this process (prefork children get their own)."""
        if self._db is None or self._db_pid != os.getpid():
            self._db = Database(self.node_settings.database_url)
            self._db_pid = os.getpid()
        return self._db


def queue_names(settings: Settings) -> list[str]:
    """The engine-class queues plus any extra ones the config names, in a stable order."""
    names = list(ENGINE_QUEUES)
    names += [q for q in settings.worker.queues if q not in names]
    return names


def broker_folders(settings: Settings) -> dict[str, Path]:
    """Folders of the filesystem broker (messages, exchange table, fetched messages)."""
    root = settings.broker_dir
    return {"queue": root / "queue", "control": root / "control", "processed": root / "processed"}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of the node (producer and worker share it)."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(q, routing_key=q) for q in queue_names(settings)],
        "task_default_queue": "cpu",
        "task_serializer": "json",
        "accept_content": ["json"],
        # SQL is the truth; no result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        # A send to a broker that is down must not stall the serve loop: fail fast,
        # the next tick tries again.
        "task_publish_retry_policy": {
            "max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1,
        },
        "broker_connection_timeout": 5,
    }
    if settings.broker_url.startswith("filesystem://"):
        folders = broker_folders(settings)
        # kombu pools connections by URL, not by transport options: name the folder in the
        # URL (as its virtual host) so two nodes in one process never share a pool.
        conf["broker_url"] = f"filesystem://localhost/{settings.broker_dir.resolve().as_posix()}"
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # Fetching renames the message into this folder (atomic on one volume, so
            # two workers never take the same file); reconcile prunes it.
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            "polling_interval": 0.5,
        }
    return conf


_APPS: dict[tuple[str, str, str], NodeCelery] = {}
_APPS_LOCK = threading.Lock()


def celery_app(settings: Settings) -> NodeCelery:
    """The Celery app for ``settings`` (one per broker and database, reused across ticks)."""
    key = (settings.broker_url, str(settings.broker_dir), settings.database_url)
    with _APPS_LOCK:
        app = _APPS.get(key)
        if app is None:
            app = _APPS[key] = NodeCelery(settings)
        # Timeouts and attempts may differ between settings objects of one broker.
        app.node_settings = settings
        return app


def node_task(*, queue: str = "cpu", **options: Any) -> Callable[[F], F]:
    """The house task decorator: acknowledged late, re-queued if the worker is lost.

    Tasks registered with it are added to every :class:`NodeCelery` app. The queue given
    here is the default; :func:`send_pending` sends each job to its row's queue.
    """
    return shared_task(  # type: ignore[no-any-return]
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        queue=queue,
        ignore_result=True,
        **options,
    )


def local_host_id() -> str:
    """This host as far as process ids go: its name plus its pid namespace.

    Processes with the same id can see each other's pids. The name alone is not enough:
    containers that share the host's network (``network_mode: host``) share its name, but
    each has its own pid namespace, where another container's pid means nothing.
    """
    name = socket.gethostname()
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return name
    return f"{name}-{namespace.removeprefix('pid:[').removesuffix(']')}"


def worker_id() -> str:
    """How this execution slot names itself on job rows: ``host:pid:thread``.

    ``host`` is :func:`local_host_id`. The thread part keeps two jobs of a threads-pool
    worker apart; a slot runs one job at a time, so a message for a job its own slot is
    marked running under is a re-delivery after that run ended.
    """
    return f"{local_host_id()}:{os.getpid()}:{threading.get_ident()}"


# --- sending -----------------------------------------------------------------------------


def send_pending(db: Database, settings: Settings, *, limit: int = 500) -> int:
    """Send a Celery message for every queued job that has none yet; return how many.

    Called after routing commits job rows. Each job is first marked enqueued (with the
    task id it will carry) by a compare-and-set, so two callers never send the same job
    and the row knows its message before any worker can see it; then the message goes
    out. If the broker is unreachable the mark is undone and the next call tries again.
    A process that dies between the two leaves a mark without a message, which
    :func:`reconcile` repairs (a message sent twice is harmless).
    """
    app = celery_app(settings)
    sent = 0
    with db.session() as session:
        pending = session.execute(
            select(Job.id, Job.queue)
            .where(Job.state == JobState.QUEUED.value, Job.enqueued_at.is_(None))
            .order_by(Job.id)
            .limit(limit)
        ).all()
    if not pending:
        return 0
    try:
        with app.producer_or_acquire() as producer:
            for job_id, queue_name in pending:
                task_id = str(uuid.uuid4())
                with db.session() as session:
                    marked = session.execute(
                        update(Job)
                        .where(Job.id == job_id, Job.state == JobState.QUEUED.value,
                               Job.enqueued_at.is_(None))
                        .values(enqueued_at=utcnow(), task_id=task_id)
                    )
                if marked.rowcount != 1:  # type: ignore[attr-defined]
                    continue  # sent by someone else, cancelled or claimed meanwhile
                try:
                    # No exchange: Celery then puts the message straight on the named
                    # queue, which needs no binding. Bindings live in broker state that a
                    # restarted Redis has forgotten while this process still believes them
                    # declared, and a message routed through a missing binding is dropped
                    # silently.
                    app.send_task(TASK_NAME, kwargs={"job_id": job_id}, queue=queue_name,
                                  task_id=task_id, producer=producer)
                except BaseException:
                    with db.session() as session:
                        session.execute(update(Job).where(
                            Job.id == job_id, Job.task_id == task_id,
                            Job.state == JobState.QUEUED.value).values(enqueued_at=None))
                    raise
                sent += 1
    except Exception as exc:  # kombu raises many kinds; the broker is down or refusing
        log.warning("cannot send job messages to broker %s (%d sent): %s",
                    redact_url(settings.broker_url), sent, exc)
    if sent:
        log.info("sent %d job message(s)", sent)
    return sent


# --- claiming and finishing (worker side) ------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A job this process now owns: the row's identity at claim time."""

    job_id: int
    attempt: int
    worker: str
    pipeline: str
    study_uid: str
    series_uid: str
    input_series_uids: tuple[str, ...]


def _pid_dead_here(worker: str | None) -> bool:
    """True if ``worker`` (``host:pid[:thread]``) names a process here that no longer exists."""
    parts = (worker or "").split(":")
    if len(parts) < 2 or parts[0] != local_host_id() or not parts[1].isdigit():
        return False
    pid_text = parts[1]
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _heartbeat_stale(job: Job, settings: Settings, now: datetime) -> bool:
    cutoff = now - timedelta(seconds=settings.worker.heartbeat_timeout_s)
    last = job.heartbeat_at or job.started_at
    return last is None or last < cutoff


def claim_job(db: Database, settings: Settings, job_id: int, *, worker: str | None = None,
              now: datetime | None = None) -> Claim | None:
    """Take ownership of job ``job_id`` for this process, or return None to skip it.

    Skips finished jobs and jobs running under another live worker. A job that has used
    all its attempts is failed here instead of being run again (a poison message that
    kills workers must not loop). The state change is a compare-and-set on
    ``(state, attempts)``, so of two workers racing for one job exactly one wins.
    """
    worker = worker or worker_id()
    now = now or utcnow()
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            log.warning("job %d does not exist; message dropped", job_id)
            return None
        if job.state in _FINISHED:
            log.info("job %d is %s; duplicate message skipped", job_id, job.state)
            return None
        if job.state == JobState.RUNNING.value and job.worker != worker:
            if not (_heartbeat_stale(job, settings, now) or _pid_dead_here(job.worker)):
                log.info("job %d is running on %s; duplicate message skipped", job_id, job.worker)
                return None
        guard = (Job.id == job_id, Job.state == job.state, Job.attempts == job.attempts)
        growing = receiving_inputs(session, job.input_series_uids or [job.series_uid])
        if growing:
            # Its series is being received again: a run now would see part of it. Routing
            # re-arms the job once the series is complete.
            done = session.execute(update(Job).where(*guard).values(
                state=JobState.CANCELLED.value, error=_superseded(growing), finished_at=now,
                worker=None, heartbeat_at=None))
            if done.rowcount == 1:  # type: ignore[attr-defined]
                record_event(session, "job.superseded", "input series is being received again",
                             job_id=job_id, study_uid=job.study_uid, series_uid=job.series_uid,
                             details={"receiving": growing})
            return None
        if job.attempts >= settings.worker.max_attempts:
            error = (f"gave up after {job.attempts} attempt(s) (worker.max_attempts="
                     f"{settings.worker.max_attempts}); last error: {job.error or 'worker lost'}")
            done = session.execute(update(Job).where(*guard).values(
                state=JobState.FAILED.value, error=error[:_ERROR_MAX], finished_at=now))
            if done.rowcount == 1:  # type: ignore[attr-defined]
                record_event(session, "job.failed", error[:_ERROR_MAX], job_id=job_id,
                             study_uid=job.study_uid, series_uid=job.series_uid)
                _failure_notice(session, settings, job, worker_lost=False)
            return None
        attempt = job.attempts + 1
        done = session.execute(update(Job).where(*guard).values(
            state=JobState.RUNNING.value, worker=worker, attempts=attempt, started_at=now,
            heartbeat_at=now, finished_at=None))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            log.info("job %d was taken by another worker", job_id)
            return None
        record_event(session, "job.started", f"attempt {attempt} on {worker}", job_id=job_id,
                     study_uid=job.study_uid, series_uid=job.series_uid,
                     details={"attempt": attempt, "worker": worker, "pipeline": job.pipeline})
        return Claim(
            job_id=job_id, attempt=attempt, worker=worker, pipeline=job.pipeline,
            study_uid=job.study_uid, series_uid=job.series_uid,
            input_series_uids=tuple(job.input_series_uids or [job.series_uid]),
        )


def receiving_inputs(session: Session, series_uids: Sequence[str]) -> list[str]:
    """Those of ``series_uids`` whose series is receiving instances (again)."""
    if not series_uids:
        return []
    return sorted(session.scalars(select(audit.Series.series_uid).where(
        audit.Series.series_uid.in_(list(series_uids)),
        audit.Series.state == SeriesState.RECEIVING.value)))


def _superseded(series_uids: Sequence[str]) -> str:
    return (f"superseded: input series {', '.join(series_uids)} received more instances; "
            "the job re-runs over the whole series once it is complete")


def _failure_notice(session: Session, settings: Settings, job: Job, *, worker_lost: bool) -> None:
    """A job that used up its attempts still sends an SR saying the analysis was not done."""
    from spine_node.node import notices  # loads highdicom only when a job gives up

    notices.record_not_performed(session, settings, job,
                                 notices.gave_up_reason(job.attempts, worker_lost=worker_lost))


def _owned(claim: Claim) -> tuple[Any, ...]:
    return (Job.id == claim.job_id, Job.state == JobState.RUNNING.value,
            Job.worker == claim.worker, Job.attempts == claim.attempt)


class JobHeartbeat:
    """Keeps ``heartbeat_at`` of a claimed job fresh from a background thread.

    ``lost`` turns true when the row no longer belongs to this claim (reconciled away
    or cancelled); the outcome is then discarded.
    """

    def __init__(self, db: Database, claim: Claim, interval_s: float) -> None:
        self.db = db
        self.claim = claim
        self.interval_s = interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{claim.job_id}",
                                        daemon=True)

    def __enter__(self) -> JobHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.db.session() as session:
                    done = session.execute(update(Job).where(*_owned(self.claim))
                                           .values(heartbeat_at=utcnow()))
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    log.warning("job %d no longer belongs to this worker", self.claim.job_id)
                    self.lost = True
                    return
            except Exception:  # a database hiccup must not kill the job; try again
                log.warning("heartbeat of job %d failed", self.claim.job_id, exc_info=True)


def heartbeat_interval(settings: Settings) -> float:
    """How often a running job refreshes its heartbeat: well inside the timeout."""
    return max(0.2, min(10.0, settings.worker.heartbeat_timeout_s / 4))


@dataclass(frozen=True)
class ResultFile:
    """A result object written to disk, ready to be recorded."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    path: Path


@dataclass
class Outcome:
    """What a successful run produced."""

    results: list[ResultFile]
    backend: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def record_success(db: Database, settings: Settings, claim: Claim, outcome: Outcome) -> bool:
    """Mark the job succeeded and add its results and dispatches, all in one commit.

    Returns False (and records nothing) if the job no longer belongs to this claim.
    """
    now = utcnow()
    destinations = [d.name for d in settings.dispatch.destinations]
    with db.session() as session:
        done = session.execute(update(Job).where(*_owned(claim)).values(
            state=JobState.SUCCEEDED.value, finished_at=now, heartbeat_at=now, error=None,
            backend=outcome.backend, model_name=outcome.model_name,
            model_version=outcome.model_version, timings=outcome.timings or None))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            log.warning("job %d was reconciled, superseded or cancelled while running; outcome "
                        "discarded", claim.job_id)
            return False
        growing = receiving_inputs(session, claim.input_series_uids)
        if growing:
            # The run saw part of a series that is still growing: its results would describe
            # a set of instances nobody will see again. Routing re-arms the job.
            session.execute(update(Job).where(Job.id == claim.job_id).values(
                state=JobState.CANCELLED.value, error=_superseded(growing)))
            record_event(session, "job.superseded", "input series received more instances while "
                         "the job ran; outcome discarded", job_id=claim.job_id,
                         study_uid=claim.study_uid, series_uid=claim.series_uid,
                         details={"receiving": growing, "attempt": claim.attempt})
            log.info("job %d: input series received more instances while it ran; outcome "
                     "discarded, it re-runs once the series is complete", claim.job_id)
            return False
        # A result with the same (derived) UID from an earlier run is the same content.
        uids = [r.sop_instance_uid for r in outcome.results]
        if uids:
            session.execute(delete(audit.Result).where(audit.Result.sop_instance_uid.in_(uids)))
        _supersede_results(session, claim, uids)
        for item in outcome.results:
            row = audit.Result(job_id=claim.job_id, kind=item.kind,
                               sop_class_uid=item.sop_class_uid,
                               sop_instance_uid=item.sop_instance_uid,
                               series_uid=item.series_uid, path=str(item.path))
            session.add(row)
            session.flush()
            for name in destinations:
                session.add(audit.Dispatch(result_id=row.id, destination=name,
                                           state=DispatchState.PENDING.value,
                                           next_attempt_at=now))
        record_event(session, "job.succeeded",
                     f"{len(outcome.results)} result object(s)", job_id=claim.job_id,
                     study_uid=claim.study_uid, series_uid=claim.series_uid,
                     details={"attempt": claim.attempt, "backend": outcome.backend,
                              "model": outcome.model_name, "version": outcome.model_version,
                              "timings": outcome.timings,
                              "results": [r.sop_instance_uid for r in outcome.results]})
    return True


def _supersede_results(session: Session, claim: Claim, new_uids: Sequence[str]) -> None:
    """Earlier results of the job (other inputs or model): stop sending them, say what replaces them.

    Their rows stay (what a PACS already holds stays traceable); dispatches not sent (pending
    or dead) are cancelled, so a destination never gets an outdated object after its successor.
    """
    older = session.scalars(select(audit.Result).where(
        audit.Result.job_id == claim.job_id,
        audit.Result.sop_instance_uid.not_in(list(new_uids)))).all()
    if not older:
        return
    ids = [r.id for r in older]
    session.execute(update(audit.Dispatch).where(
        audit.Dispatch.result_id.in_(ids),
        audit.Dispatch.state.in_([DispatchState.PENDING.value, DispatchState.DEAD.value])).values(
            state=DispatchState.CANCELLED.value, last_error="superseded by a newer result"))
    record_event(session, "result.superseded", f"{len(older)} earlier result object(s) superseded",
                 job_id=claim.job_id, study_uid=claim.study_uid, series_uid=claim.series_uid,
                 details={"superseded": [r.sop_instance_uid for r in older],
                          "by": list(new_uids)})


def record_failure(db: Database, claim: Claim, error: str,
                   on_failed: Callable[[Session], object] | None = None) -> bool:
    """Mark the job failed with a readable ``error`` (a :class:`NodeError` message).

    ``on_failed`` (the job's not-performed notice) adds its rows in the same commit.
    """
    error = error[:_ERROR_MAX] or "failed"
    with db.session() as session:
        done = session.execute(update(Job).where(*_owned(claim)).values(
            state=JobState.FAILED.value, error=error, finished_at=utcnow()))
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return False
        record_event(session, "job.failed", error, job_id=claim.job_id,
                     study_uid=claim.study_uid, series_uid=claim.series_uid,
                     details={"attempt": claim.attempt})
        if on_failed is not None:
            on_failed(session)
    return True


def release_after_error(db: Database, settings: Settings, claim: Claim, error: str,
                        on_failed: Callable[[Session], object] | None = None) -> str:
    """After an unexpected error: back to queued for another attempt, or failed when spent.

    Returns the new state. ``on_failed`` runs in the same commit when the job fails.
    """
    spent = claim.attempt >= settings.worker.max_attempts
    state = JobState.FAILED.value if spent else JobState.QUEUED.value
    text = f"attempt {claim.attempt} of {settings.worker.max_attempts}: {error}"[:_ERROR_MAX]
    with db.session() as session:
        values: dict[str, Any] = {"state": state, "error": text}
        if spent:
            values["finished_at"] = utcnow()
        else:
            values.update(enqueued_at=None, worker=None, heartbeat_at=None)
        done = session.execute(update(Job).where(*_owned(claim)).values(**values))
        if done.rowcount == 1:  # type: ignore[attr-defined]
            record_event(session, "job.failed" if spent else "job.error", text,
                         job_id=claim.job_id, study_uid=claim.study_uid,
                         series_uid=claim.series_uid, details={"attempt": claim.attempt})
            if spent and on_failed is not None:
                on_failed(session)
    return state


# --- reconciling (serve side) -----------------------------------------------------------


@dataclass
class ReconcileReport:
    """What one :func:`reconcile` pass did."""

    requeued: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    resent: list[int] = field(default_factory=list)
    sent: int = 0


def _requeue_lost(session: Session, settings: Settings, now: datetime,
                  report: ReconcileReport) -> None:
    cutoff = now - timedelta(seconds=settings.worker.heartbeat_timeout_s)
    stale = session.scalars(select(Job).where(
        Job.state == JobState.RUNNING.value,
        func.coalesce(Job.heartbeat_at, Job.started_at, Job.created_at) < cutoff,
    )).all()
    for job in stale:
        guard = (Job.id == job.id, Job.state == JobState.RUNNING.value,
                 Job.attempts == job.attempts, Job.worker == job.worker)
        lost = f"worker {job.worker or '?'} lost during attempt {job.attempts}"
        if job.attempts >= settings.worker.max_attempts:
            error = (f"{lost}; gave up after {job.attempts} attempt(s) "
                     f"(worker.max_attempts={settings.worker.max_attempts})")
            values: dict[str, Any] = {"state": JobState.FAILED.value, "error": error,
                                      "finished_at": now}
            kind, bucket = "job.failed", report.failed
        else:
            error = f"{lost}; re-queued"
            values = {"state": JobState.QUEUED.value, "error": error, "enqueued_at": None,
                      "worker": None, "heartbeat_at": None}
            kind, bucket = "job.requeued", report.requeued
        done = session.execute(update(Job).where(*guard).values(**values))
        if done.rowcount == 1:  # type: ignore[attr-defined]
            bucket.append(job.id)
            log.warning("job %d: %s", job.id, error)
            record_event(session, kind, error, job_id=job.id, study_uid=job.study_uid,
                         series_uid=job.series_uid, details={"attempt": job.attempts})
            if kind == "job.failed":
                _failure_notice(session, settings, job, worker_lost=True)


def _resend_stale(session: Session, settings: Settings, now: datetime,
                  report: ReconcileReport) -> None:
    cutoff = now - timedelta(seconds=settings.worker.requeue_after_s)
    stale = session.scalars(select(Job).where(
        Job.state == JobState.QUEUED.value, Job.enqueued_at.is_not(None),
        Job.enqueued_at < cutoff,
    ).order_by(Job.id)).all()
    if not stale:
        return
    depths = broker_depths(settings)
    for queue in sorted({job.queue for job in stale}):
        depth = depths.get(queue)
        if depth is not None:
            waiting = session.scalar(select(func.count()).select_from(Job).where(
                Job.state == JobState.QUEUED.value, Job.queue == queue,
                Job.enqueued_at.is_not(None))) or 0
            # Every queued job still has its message: it is only waiting for a worker.
            if depth >= waiting:
                continue
        for job in (j for j in stale if j.queue == queue):
            done = session.execute(update(Job).where(
                Job.id == job.id, Job.state == JobState.QUEUED.value,
                Job.enqueued_at == job.enqueued_at).values(enqueued_at=None))
            if done.rowcount == 1:  # type: ignore[attr-defined]
                report.resent.append(job.id)
                record_event(session, "job.resent",
                             f"message older than {settings.worker.requeue_after_s:g} s and "
                             f"the {queue!r} queue holds {depth if depth is not None else '?'} "
                             "message(s): re-sent", job_id=job.id, study_uid=job.study_uid,
                             series_uid=job.series_uid)


def reconcile(db: Database, settings: Settings, now: datetime | None = None) -> ReconcileReport:
    """Repair work whose message or worker was lost, then send pending messages.

    * a running job whose heartbeat is older than ``worker.heartbeat_timeout_s`` goes back
      to queued (or fails once it has used ``worker.max_attempts``);
    * a queued job whose message is older than ``worker.requeue_after_s`` is re-sent when
      its broker queue holds fewer messages than there are queued jobs for it (the broker
      lost some: restarted, flushed) or when the depth cannot be read.
    Safe to call at any time and from several processes.
    """
    now = now or utcnow()
    report = ReconcileReport()
    with db.session() as session:
        _requeue_lost(session, settings, now, report)
    with db.session() as session:
        _resend_stale(session, settings, now, report)
    report.sent = send_pending(db, settings)
    _prune(db, settings, now)
    return report


def _prune(db: Database, settings: Settings, now: datetime) -> None:
    """Forget worker rows gone for a day and fetched filesystem-broker messages."""
    with db.session() as session:
        session.execute(delete(WorkerHeartbeat).where(
            WorkerHeartbeat.last_seen < now - timedelta(days=1)))
    if settings.broker_url.startswith("filesystem://"):
        processed = broker_folders(settings)["processed"]
        limit = time.time() - 3600
        for path in processed.glob("*.msg") if processed.is_dir() else ():
            try:
                if path.stat().st_mtime < limit:
                    path.unlink()
            except OSError:
                pass


@dataclass
class TickReport:
    """What one :func:`tick` did."""

    reconcile: ReconcileReport | None = None
    dispatch: Any = None
    errors: list[str] = field(default_factory=list)


def tick(db: Database, settings: Settings, now: datetime | None = None) -> TickReport:
    """One pass of job housekeeping: reconcile, send, dispatch (``serve`` runs them on lanes).

    Never raises for a broker or network problem (it is logged and the next tick tries
    again), so it is safe to call every few seconds.
    """
    from spine_node.node.dispatch import dispatch_pending

    report = TickReport()
    try:
        report.reconcile = reconcile(db, settings, now)
    except Exception as exc:
        log.exception("reconcile failed")
        report.errors.append(f"reconcile: {exc}")
    try:
        report.dispatch = dispatch_pending(db, settings, now)
    except Exception as exc:
        log.exception("dispatch failed")
        report.errors.append(f"dispatch: {exc}")
    return report


# --- admin actions -----------------------------------------------------------------------


def retry_job(db: Database, settings: Settings, job_id: int) -> Job:
    """Put a failed, cancelled or stuck queued job back on the queue with fresh attempts."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobStateError(f"job {job_id} does not exist")
        if job.state not in (JobState.FAILED.value, JobState.CANCELLED.value,
                             JobState.QUEUED.value):
            raise JobStateError(f"job {job_id} is {job.state}; only failed, cancelled or "
                                "queued jobs can be retried")
        job.state = JobState.QUEUED.value
        job.attempts = 0
        job.error = None
        job.worker = None
        job.enqueued_at = None
        job.heartbeat_at = None
        job.finished_at = None
        record_event(session, "job.retried", "retried by an admin", job_id=job_id,
                     study_uid=job.study_uid, series_uid=job.series_uid)
    send_pending(db, settings)
    return job


def cancel_job(db: Database, job_id: int) -> Job:
    """Cancel a queued or running job (a running worker's outcome is then discarded)."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobStateError(f"job {job_id} does not exist")
        if job.state not in (JobState.QUEUED.value, JobState.RUNNING.value):
            raise JobStateError(f"job {job_id} is {job.state}; only queued or running jobs "
                                "can be cancelled")
        job.state = JobState.CANCELLED.value
        job.finished_at = utcnow()
        record_event(session, "job.cancelled", "cancelled by an admin", job_id=job_id,
                     study_uid=job.study_uid, series_uid=job.series_uid)
    return job


# --- queue depths and live workers -------------------------------------------------------


def broker_depths(settings: Settings, queues: Sequence[str] | None = None) -> dict[str, int | None]:
    """Messages waiting per queue; None where the broker cannot say (or is unreachable)."""
    queues = list(queues or queue_names(settings))
    url = settings.broker_url
    if url.startswith("filesystem://"):
        folder = broker_folders(settings)["queue"]
        try:
            names = os.listdir(folder)
        except OSError:
            return dict.fromkeys(queues, 0)
        return {q: sum(1 for n in names if n.partition(".")[2] == f"{q}.msg") for q in queues}
    if url.startswith(("redis://", "rediss://")):
        import redis

        try:
            client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
            try:
                return {q: int(client.llen(q)) for q in queues}
            finally:
                client.close()
        except redis.RedisError as exc:
            log.warning("cannot read queue depths from %s: %s", redact_url(url), exc)
            return dict.fromkeys(queues, None)
    return dict.fromkeys(queues, None)


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as its liveness row describes it."""

    hostname: str
    queues: tuple[str, ...]
    backends: tuple[str, ...]
    pid: int
    started_at: datetime
    last_seen: datetime
    alive: bool


@dataclass(frozen=True)
class QueueStatus:
    """Broker depth and SQL job counts per queue, plus the workers."""

    depths: dict[str, int | None]
    queued: dict[str, int]
    running: dict[str, int]
    workers: tuple[WorkerInfo, ...]


def live_workers(db: Database, now: datetime | None = None,
                 include_gone: bool = False) -> list[WorkerInfo]:
    """Workers from their liveness rows; ``alive`` if seen in the last ``WORKER_LIVE_S``."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=WORKER_LIVE_S)
    with db.session() as session:
        rows = session.scalars(select(WorkerHeartbeat).order_by(WorkerHeartbeat.hostname)).all()
        infos = [WorkerInfo(r.hostname, tuple(r.queues or ()), tuple(r.backends or ()), r.pid,
                            r.started_at, r.last_seen, r.last_seen >= cutoff) for r in rows]
    return [w for w in infos if include_gone or w.alive]


def queue_depths(settings: Settings, db: Database | None = None) -> QueueStatus:
    """Queue depth per queue (redis and filesystem brokers) and live workers, for status."""
    own = db is None
    database = db or Database(settings.database_url)
    try:
        queues = queue_names(settings)
        with database.session() as session:
            counts = session.execute(
                select(Job.queue, Job.state, func.count()).where(
                    Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))
                .group_by(Job.queue, Job.state)).all()
        queued = dict.fromkeys(queues, 0)
        running = dict.fromkeys(queues, 0)
        for queue, state, count in counts:
            target = queued if state == JobState.QUEUED.value else running
            target[queue] = target.get(queue, 0) + int(count)
        return QueueStatus(depths=broker_depths(settings, list(queued)), queued=queued,
                           running=running, workers=tuple(live_workers(database)))
    finally:
        if own:
            database.dispose()


# --- worker liveness rows ----------------------------------------------------------------


class WorkerLiveness:
    """Upserts this worker's :class:`WorkerHeartbeat` row every few seconds."""

    def __init__(self, db: Database, hostname: str, queues: Iterable[str],
                 backends: Iterable[str], interval_s: float = WORKER_HEARTBEAT_S) -> None:
        self.db = db
        self.hostname = hostname
        self.queues = list(queues)
        self.backends = list(backends)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-liveness", daemon=True)

    def beat(self) -> None:
        now = utcnow()
        with self.db.session() as session:
            row = session.get(WorkerHeartbeat, self.hostname)
            if row is None:
                session.add(WorkerHeartbeat(hostname=self.hostname, queues=self.queues,
                                            backends=self.backends, pid=os.getpid(),
                                            started_at=now, last_seen=now))
            else:
                row.queues = self.queues
                row.backends = self.backends
                row.pid = os.getpid()
                row.last_seen = now

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            with self.db.session() as session:
                session.execute(delete(WorkerHeartbeat).where(
                    WorkerHeartbeat.hostname == self.hostname))
        except Exception:
            log.warning("cannot remove the liveness row of %s", self.hostname, exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:
                log.warning("worker liveness update failed", exc_info=True)
