"""Prometheus metrics: counters kept where things happen, states read from SQL on scrape.

Counters and histograms live in the process that observes them (a receive process, the
serve loop, a worker). ``spine-node serve`` runs several processes (``--processes``), so it
puts prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set before this
module is first imported) and its endpoint sums every process's files. Job, series and
dispatch counts by state are not counters: they are read from SQL, the source of truth, at
each scrape.

Workers on the same host that share ``PROMETHEUS_MULTIPROC_DIR`` with the node appear in
the node's endpoint; workers elsewhere can expose their own with :func:`start_metrics_server`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select

from spine_node.node.audit import Database, Dispatch, Job, Series
from spine_node.node.domain import DispatchState, JobState, SeriesState

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

INSTANCES_RECEIVED = Counter(
    "spine_node_instances_received", "Instances received, written to the spool and acknowledged.")
BYTES_RECEIVED = Counter(
    "spine_node_received_bytes", "Bytes of acknowledged instances (as written to the spool).")
INSTANCES_REFUSED = Counter(
    "spine_node_instances_refused", "Instances answered with a failure status, by DICOM status.", ["status"])
ASSOCIATIONS = Counter(
    "spine_node_associations", "Association requests by outcome.", ["outcome"])
SERIES_COMPLETED = Counter(
    "spine_node_series_completed", "Series marked complete by the assembler.", ["forced"])
DISPATCH_FAILURES = Counter(
    "spine_node_dispatch_failures", "Failed attempts to send a result to a destination.", ["destination"])
INFERENCE_SECONDS = Histogram(
    "spine_node_inference_seconds", "Wall time of one pipeline run on one engine.", ["model", "backend"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0))


def observe_inference(model: str, backend: str, seconds: float) -> None:
    """Record one inference run of ``model`` on ``backend`` (e.g. ``onnxruntime``)."""
    INFERENCE_SECONDS.labels(model=model, backend=backend).observe(seconds)


def observe_dispatch_failure(destination: str) -> None:
    """Record one failed attempt to send a result to the named destination."""
    DISPATCH_FAILURES.labels(destination=destination).inc()


def multiprocess_enabled() -> bool:
    """True if this process writes its metrics to ``PROMETHEUS_MULTIPROC_DIR`` files."""
    return _values.ValueClass is not _values.MutexValue


def prepare_multiprocess_dir(path: Path) -> None:
    """Create the multiprocess folder and drop files of processes that are gone.

    Files of live processes (for example workers on this host sharing the folder) are
    kept; a dead process's counters would otherwise be added to every later run.
    """
    path.mkdir(parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        pid_text = file.stem.rsplit("_", 1)[-1]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            try:
                file.unlink()
            except OSError:
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SqlStateCollector:
    """Gauges read from SQL at scrape time: jobs, series and dispatches by state."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def collect(self) -> Iterator[Metric]:
        try:
            with self.db.session() as session:
                jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                series = dict(session.execute(select(Series.state, func.count()).group_by(Series.state)).all())
                dispatches = dict(session.execute(
                    select(Dispatch.state, func.count()).group_by(Dispatch.state)).all())
        except Exception as exc:  # a scrape must not fail because the database is busy or down
            log.warning("metrics: cannot read states from SQL: %s", type(exc).__name__)
            up = GaugeMetricFamily("spine_node_database_up", "1 if the last scrape could read SQL.")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("spine_node_database_up", "1 if the last scrape could read SQL.")
        up.add_metric([], 1)
        yield up
        yield _by_state("spine_node_jobs", "Jobs by state (from SQL).", jobs, [s.value for s in JobState])
        yield _by_state("spine_node_series", "Series by state (from SQL).", series,
                        [s.value for s in SeriesState])
        yield _by_state("spine_node_dispatches", "Result dispatches by state (from SQL).", dispatches,
                        [s.value for s in DispatchState])


def _by_state(name: str, doc: str, counts: dict[Any, int], known: Iterable[str]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=["state"])
    states = list(known) + sorted(str(s) for s in counts if str(s) not in known)
    for state in states:
        gauge.add_metric([state], float(counts.get(state, 0)))
    return gauge


class _ProcessLocal:
    """This process's own metrics (single-process mode) as one collector."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def scrape_registry(db: Database | None) -> CollectorRegistry:
    """The registry the endpoint serves: every process's metrics plus SQL states."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_enabled():
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessLocal())  # type: ignore[arg-type]
    if db is not None:
        registry.register(SqlStateCollector(db))  # type: ignore[arg-type]
    return registry


def start_metrics_server(port: int, host: str = "0.0.0.0", db: Database | None = None) -> Any:
    """Serve ``/metrics`` over HTTP on a daemon thread; returns the HTTP server."""
    server, _thread = start_http_server(port, addr=host, registry=scrape_registry(db))
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server
