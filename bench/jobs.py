"""Jobs benchmark: queue overhead and job throughput of one worker, per broker.

Run from the repository root::

    python -m bench.jobs                                   # filesystem broker, 20 jobs
    python -m bench.jobs --broker redis://127.0.0.1:6379/12 --jobs 20

It builds a throw-away node (SQLite, spool, results under a temporary folder), writes one
small CT series per job (pydicom's ``CT_small.dcm`` slices), queues one job per series
for the model-free ``test-bone-threshold`` pipeline from ``tests/pipelines_for_tests.py``
(a HU threshold into a SEG plus a TID 1500 SR), starts one ``spine-node worker``
subprocess and times: worker start (process start to its liveness row), queue wait
(message sent to job claimed), job run (claimed to recorded: pipeline, encoding, writes,
the SQL commit) and jobs per second over the whole batch. Figures come from the job
rows' own timestamps. The table replaces this benchmark's section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from bench.harness import replace_section
from spine_node.node.audit import Database, Job, WorkerHeartbeat
from spine_node.node.config import load_settings, redact_url
from spine_node.node.db_migrate import upgrade
from spine_node.node.jobs import send_pending

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- bench/jobs.py: begin -->"
END = "<!-- bench/jobs.py: end -->"
PIPELINE = "test-bone-threshold"
TIMEOUT_S = 600.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(broker: str, jobs: int, slices: int, sequential: int) -> dict[str, object]:
    """Run one batch; return the measured figures."""
    from tests.jobs_samples import ct_series

    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as folder:
        root = Path(folder)
        url = f"sqlite:///{root / 'node.db'}"
        upgrade(url)
        env = {
            "SPINE_NODE_STORAGE__DATA_DIR": str(root / "data"),
            "SPINE_NODE_DATABASE_URL": url,
            "SPINE_NODE_WORKER__PIPELINE_MODULES": json.dumps(["tests.pipelines_for_tests"]),
            "SPINE_NODE_LOG_LEVEL": "WARNING",
        }
        if broker != "filesystem":
            env["SPINE_NODE_BROKER_URL"] = broker
        os.environ.update(env)
        settings = load_settings()
        if broker != "filesystem":
            import redis

            redis.Redis.from_url(broker).flushdb()
        db = Database(url)

        def add_job(tag: str) -> int:
            study, series, _ = ct_series(settings.storage.spool, slices=slices, tag=tag)
            with db.session() as session:
                job = Job(study_uid=study, series_uid=series, input_series_uids=[series],
                          pipeline=PIPELINE, queue="cpu")
                session.add(job)
                session.flush()
                return job.id

        def wait_done(count: int) -> None:
            while True:
                with db.session() as session:
                    done = session.scalar(select(func.count()).select_from(Job).where(
                        Job.state.in_(["succeeded", "failed"])))
                if done == count:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError("the jobs did not finish in time")
                time.sleep(0.02)

        ids = [add_job(f"bench-{index}") for index in range(jobs)]
        started = time.monotonic()
        worker = subprocess.Popen(
            [sys.executable, "-m", "spine_node.node.cli", "worker", "--queues", "cpu"], cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while True:
                with db.session() as session:
                    if session.scalar(select(func.count()).select_from(WorkerHeartbeat)):
                        break
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise RuntimeError("the worker did not start")
                time.sleep(0.05)
            worker_start_s = time.monotonic() - started
            batch_start = time.monotonic()
            send_pending(db, settings)
            wait_done(jobs)
            batch_s = time.monotonic() - batch_start
            # One job at a time on an idle worker: the wait is the broker's pick-up latency.
            single = []
            for index in range(sequential):
                single.append(add_job(f"bench-single-{index}"))
                send_pending(db, settings)
                wait_done(jobs + index + 1)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        with db.session() as session:
            rows = session.scalars(select(Job).where(Job.id.in_(ids))).all()
            failed = [r.id for r in rows if r.state != "succeeded"]
            waits = [(r.started_at - r.enqueued_at).total_seconds() for r in rows
                     if r.started_at and r.enqueued_at]
            runs = [(r.finished_at - r.started_at).total_seconds() for r in rows
                    if r.finished_at and r.started_at]
            encode = [float(r.timings["encode_s"]) for r in rows if r.timings]
            singles = session.scalars(select(Job).where(Job.id.in_(single))).all()
            failed += [r.id for r in singles if r.state != "succeeded"]
            pickups = [(r.started_at - r.enqueued_at).total_seconds() for r in singles
                       if r.started_at and r.enqueued_at]
        db.dispose()
    if failed:
        raise RuntimeError(f"jobs {failed} did not succeed")
    return {
        "broker": "filesystem (embedded)" if broker == "filesystem" else redact_url(broker),
        "jobs": jobs, "slices": slices, "worker_start_s": worker_start_s,
        "pickup_median_ms": statistics.median(pickups) * 1000 if pickups else float("nan"),
        "pickup_max_ms": max(pickups) * 1000 if pickups else float("nan"),
        "wait_median_ms": statistics.median(waits) * 1000,
        "run_median_ms": statistics.median(runs) * 1000,
        "run_p90_ms": _percentile(runs, 0.9) * 1000,
        "encode_median_ms": statistics.median(encode) * 1000,
        "jobs_per_s": jobs / batch_s,
    }


def _table(rows: list[dict[str, object]], command: str, note: str) -> str:
    lines = [
        BEGIN,
        "## Jobs: queue overhead and throughput (`bench/jobs.py`)",
        "",
        f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M')} UTC on "
        f"{platform.platform()}, {os.cpu_count()} CPU(s), with:",
        "",
        "```",
        command,
        "```",
        "",
        "One `spine-node worker` (solo pool) and SQLite; each job is the model-free "
        "`test-bone-threshold` pipeline on a small CT series, encoded as a SEG and an SR. "
        "Pick-up is message sent to job claimed for jobs sent one at a time to an idle "
        "worker (the broker's latency; the filesystem broker polls every 0.5 s). Batch wait "
        "is the same for a batch sent at once (it grows with the position in the queue); "
        "run is claimed to recorded; encode is "
        "`spine_node.node.results` building the SEG and SR (the first job also pays highdicom's "
        "imports).",
        "",
        "| broker | jobs | slices | worker start s | pick-up median ms | pick-up max ms "
        "| batch wait median ms | run median ms | run p90 ms | encode median ms | jobs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['broker']} | {r['jobs']} | {r['slices']} | {r['worker_start_s']:.1f} "
            f"| {r['pickup_median_ms']:.0f} | {r['pickup_max_ms']:.0f} "
            f"| {r['wait_median_ms']:.0f} | {r['run_median_ms']:.0f} "
            f"| {r['run_p90_ms']:.0f} | {r['encode_median_ms']:.0f} | {r['jobs_per_s']:.2f} |")
    if note:
        lines += ["", note]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", action="append", default=None,
                        help="'filesystem' or a redis:// URL (repeatable; default filesystem)")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=5,
                        help="Jobs then sent one at a time to time the pick-up latency.")
    parser.add_argument("--note", default="", help="A line about the conditions.")
    parser.add_argument("--no-write", action="store_true", help="Print only.")
    args = parser.parse_args(argv)
    rows = [run(broker, args.jobs, args.slices, args.sequential)
            for broker in args.broker or ["filesystem"]]
    command = "python -m bench.jobs " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    section = _table(rows, command.strip(), args.note)
    print(section)
    if not args.no_write:
        replace_section(RESULTS, BEGIN, END, section)


if __name__ == "__main__":
    main()
