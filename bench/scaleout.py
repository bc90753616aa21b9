"""Scale-out benchmark: job throughput with 2 workers against 1, on a queue of series.

Everything runs as separate processes sharing PostgreSQL (the source of truth), Redis
(the broker) and one spool folder, as on several hosts:

1. a fresh PostgreSQL database; ``spine-node serve`` (which routes complete series to
   jobs and sends their messages) with no worker running;
2. ``--series`` CT series (512x512 slices from pydicom-data with fresh UIDs) pushed with
   DCMTK storescu; the benchmark waits until every series has its queued job;
3. ``N`` ``spine-node worker --queues cpu`` processes started at once; the figure is the
   span from the first job starting to the last job finishing (from the job rows, so
   worker start-up is not counted), as jobs per minute.

The pipeline is the one routed for CT (``--pipeline``, default ``ct-cspine-fracture``)
when it is registered; ``--pipeline test-bone-threshold`` uses the test suite's bone
threshold pipeline (a pixel statistic computed from the input, no model), which measures
the job system rather than a model. Run from the repository root (needs PostgreSQL and
Redis; ``--redis-url`` should name a Redis database nothing else uses)::

    python -m bench.scaleout --series 20 --slices 20 --workers 1 2 --rounds 2 \\
        --pipeline test-bone-threshold

Figures go to bench/RESULTS.md, section "Scale-out".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

from bench.harness import (
    REPO,
    cpu_scaling,
    machine,
    median,
    node_env,
    node_serve,
    push,
    stop_process,
    write_ct_series,
    write_section,
)
from spine_node.node.audit import Job
from spine_node.node.domain import JobState

FINISHED = (JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value)


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"spine_bench_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :name AND pid <> pg_backend_pid()"), {"name": name})
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        engine.dispose()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def job_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())  # type: ignore[arg-type]
    finally:
        engine.dispose()


def job_errors(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return [str(e) for e in session.scalars(select(Job.error).where(Job.error.is_not(None)))]
    finally:
        engine.dispose()


def job_stats(url: str) -> tuple[float, float, int]:
    """(span from first start to last finish, median job seconds, distinct worker processes)."""
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            rows = session.execute(select(Job.started_at, Job.finished_at, Job.worker)).all()
    finally:
        engine.dispose()
    span = (max(r.finished_at for r in rows) - min(r.started_at for r in rows)).total_seconds()
    durations = [(r.finished_at - r.started_at).total_seconds() for r in rows]
    # worker ids are host:pid:thread; count processes.
    processes = {":".join(str(r.worker).split(":")[:2]) for r in rows}
    return float(span), median(durations), len(processes)


def run_once(work: Path, data: Path, series: int, workers: int, opts: argparse.Namespace) -> tuple[float, float]:
    """(jobs per minute, median seconds per job) for one fresh set-up with ``workers`` workers."""
    with postgres_database(opts.postgres_url) as url:
        shared = work / "shared"
        shutil.rmtree(shared, ignore_errors=True)
        env = {
            "SPINE_NODE_DATABASE_URL": url,
            "SPINE_NODE_BROKER_URL": opts.redis_url,
            "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "2",
            "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "2",
            "SPINE_NODE_ROUTES": json.dumps([{"name": "bench-ct", "match": {"modality": ["CT"]},
                                              "pipelines": [opts.pipeline]}]),
            "SPINE_NODE_WORKER__PIPELINE_MODULES": json.dumps(opts.pipeline_modules),
            "SPINE_NODE_WORKER__CONCURRENCY": "1",
            "SPINE_NODE_WORKER__ENGINE_THREADS": str(opts.engine_threads),
        }
        with node_serve(shared, env=env) as node:
            push([data], node.port, "SPINE_NODE", timeout=1800)
            wait_until(lambda: job_counts(url).get(JobState.QUEUED.value, 0) >= series, 300,
                       f"{series} queued jobs")
            # Give the serve loop a tick to send their messages before workers start.
            time.sleep(3)
            procs = []
            logs = []
            worker_env = {**node_env(shared, 0, env), "SPINE_NODE_LOG_LEVEL": "WARNING"}
            for index in range(workers):
                log = (shared / f"worker{index}.log").open("ab")
                logs.append(log)
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "spine_node.node.cli", "worker", "--queues", "cpu", "--concurrency", "1"],
                    cwd=REPO, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
            try:
                counts = wait_until(lambda: (c := job_counts(url)) and sum(c.get(s, 0) for s in FINISHED) >= series
                                    and c, opts.timeout, f"{series} finished jobs")
            finally:
                for proc in procs:
                    stop_process(proc, timeout=60)
                for log in logs:
                    log.close()
            if counts.get(JobState.SUCCEEDED.value, 0) != series:
                raise RuntimeError(f"jobs did not all succeed: {counts}: {job_errors(url)[:3]}")
            span, job_s, processes = job_stats(url)
    print(f"  {workers} worker(s): {series} jobs in {span:.1f}s, median job {job_s:.1f}s, "
          f"run by {processes} worker process(es)", flush=True)
    if processes != workers:
        raise RuntimeError(f"{workers} workers started but {processes} ran jobs")
    return series / span * 60.0, job_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=20, help="instances per series")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pipeline", default="ct-cspine-fracture")
    parser.add_argument("--pipeline-modules", nargs="*", default=None,
                        help="modules workers import to register pipelines "
                             "(default: tests.pipelines_for_tests for test-bone-threshold)")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "SPINE_NODE_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--engine-threads", type=int, default=1,
                        help="worker.engine_threads: intra-op threads per worker (1: a worker is one core)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true")
    opts = parser.parse_args()
    if opts.pipeline_modules is None:
        opts.pipeline_modules = ["tests.pipelines_for_tests"] if opts.pipeline == "test-bone-threshold" else []

    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="spine-bench-scaleout-"))
    rates: dict[int, list[float]] = {n: [] for n in opts.workers}
    job_seconds: dict[int, list[float]] = {n: [] for n in opts.workers}
    scaling = [cpu_scaling(2)]
    print(f"CPU calibration: 2 busy processes do {scaling[0]:.2f}x the work of one", flush=True)
    try:
        data = work / "data"
        for index in range(opts.series):
            write_ct_series(data / f"series{index:02d}", opts.slices, f"scaleout-{index}")
        for round_ in range(opts.rounds):
            order = list(opts.workers) if round_ % 2 == 0 else list(reversed(opts.workers))
            for workers in order:
                rate, job_s = run_once(work, data, opts.series, workers, opts)
                rates[workers].append(rate)
                job_seconds[workers].append(job_s)
                print(f"round {round_ + 1}: {workers} worker(s): {rates[workers][-1]:.1f} jobs/min", flush=True)
    finally:
        if opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    scaling.append(cpu_scaling(2))
    base = median(rates[opts.workers[0]])
    lines = ["| workers | jobs/min (median) | each round | vs first row | seconds per job (median) |",
             "| --- | --- | --- | --- | --- |"]
    for workers in opts.workers:
        lines.append(f"| {workers} | {median(rates[workers]):.1f} | "
                     f"{', '.join(f'{r:.1f}' for r in rates[workers])} | {median(rates[workers]) / base:.2f}x "
                     f"| {median(job_seconds[workers]):.1f} |")
    table = "\n".join(lines)
    table += (f"\n\nCPU calibration in the same session: 2 busy processes did {scaling[0]:.2f}x (before) and "
              f"{scaling[1]:.2f}x (after) the work of one (2.0x = two free cores).")
    print(table)
    if not opts.no_write:
        write_section("Scale-out", (
            f"Command: `python -m bench.scaleout --series {opts.series} --slices {opts.slices} "
            f"--workers {' '.join(map(str, opts.workers))} --rounds {opts.rounds} --pipeline {opts.pipeline} "
            f"--engine-threads {opts.engine_threads}`\n\n"
            f"Machine: {machine()}.\n\n"
            f"`spine-node serve` and the workers as separate processes sharing PostgreSQL, Redis and one "
            f"spool folder; {opts.series} series of {opts.slices} 512x512 CT slices routed to "
            f"`{opts.pipeline}`, all queued before the workers start; each worker runs one job at a "
            f"time (`--concurrency 1`) with `worker.engine_threads = {opts.engine_threads}` (each worker stands for "
            "a host of that many cores; on a 2-core machine, 2 workers with all cores each would only "
            "oversubscribe them). Rate = jobs / (last job finished - first job started), from "
            f"the job rows. Target: 2 workers >= 1.7x one worker.\n\n{table}\n"))


if __name__ == "__main__":
    main()
