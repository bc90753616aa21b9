"""SQL models (declared once, here) and the database handle.

The schema is created only by the Alembic migrations in ``migrations/``; this module
declares the mapping and offers small helpers to record audit events. Never store or
log patient names, birth dates, IDs or accession numbers: rows hold UIDs, AE titles,
counts and states.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Association(Base):
    """One DICOM association with the node (accepted or rejected)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))  # accepted, rejected, released, aborted
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    instances_received: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Series(Base):
    """A series in the spool, counted (not one row per instance, for ingest speed)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default="receiving", index=True)
    state_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Job(Base):
    """One (series, pipeline) unit of work. The row exists before its queue message."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("series_uid", "pipeline", name="uq_jobs_series_pipeline"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    # Every input series (a study-scoped route may have several).
    input_series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    pipeline: Mapped[str] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(64), default="")
    queue: Mapped[str] = mapped_column(String(32), default="cpu")
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    backend: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)


class Result(Base):
    """A DICOM object a job produced (SEG or SR), kept under results_dir."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # SEG, SR
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Dispatch(Base):
    """Sending one result to one destination, with retries then dead letter."""

    __tablename__ = "dispatches"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_dispatch_result_dest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class WorkerHeartbeat(Base):
    """A live worker, as it reports itself (broker-independent liveness)."""

    __tablename__ = "workers"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    backends: Mapped[list[str]] = mapped_column(JSON, default=list)
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """An append-only log of what happened, keyed by UIDs and ids (never PHI)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(48), index=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    association_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets the receiver, the assembler and workers read and write concurrently.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


#: Seconds a new PostgreSQL connection may take (a server that accepts TCP and never
#: answers, e.g. stopped, would otherwise hold the caller for ever).
CONNECT_TIMEOUT_S = 10


def _postgres_timeouts(url: str) -> dict[str, Any]:
    """libpq options bounding every call: connecting, a statement, waiting for a lock,
    and noticing a peer host that is gone (TCP keepalives)."""
    if not url.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S,
            "options": "-c statement_timeout=60000 -c lock_timeout=30000",
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


class Database:
    """One engine and session factory per process (never one per request)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_timeout=10,
                                        connect_args=_postgres_timeouts(url))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def is_current(self) -> bool:
        """True if the schema exists (migrations have been applied)."""
        return inspect(self.engine).has_table("alembic_version")

    def dispose(self) -> None:
        self.engine.dispose()


def record_event(
    session: Session,
    kind: str,
    message: str = "",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    association_id: int | None = None,
    job_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add an audit event to ``session`` (committed with it)."""
    row = AuditEvent(
        kind=kind,
        message=message,
        study_uid=study_uid,
        series_uid=series_uid,
        association_id=association_id,
        job_id=job_id,
        details=details,
    )
    session.add(row)
    return row
