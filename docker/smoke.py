"""Smoke test of the CPU image in the distributed topology, with plain ``docker run``.

The node container and ``--workers`` worker containers share one spool folder and the
PostgreSQL database and Redis broker you name, as compose.yaml wires them, but on the
host's network (so they reach servers already running on this host). It pushes
``--series`` CT series (512x512 slices from pydicom-data with fresh UIDs) with DCMTK
storescu, waits until every job has finished and prints which worker container ran what::

    docker build -f docker/Dockerfile.node -t spine-node:latest .
    python docker/smoke.py --database-url postgresql+psycopg2://postgres@127.0.0.1:5432/spine_smoke \\
        --broker-url redis://127.0.0.1:6379/5

Run it from the repository root in the project's virtual environment (it writes the series
with the benchmark helpers). The database named is dropped and created again, and the
Redis database emptied: name ones nothing else uses. Exits non-zero if a job failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port, push, write_ct_series  # noqa: E402
from spine_node.node.audit import Job  # noqa: E402

CONTAINER_UID = 10001  # the image's `spine` user


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], check=check, capture_output=True, text=True).stdout


def logs(name: str) -> str:
    return subprocess.run(["docker", "logs", name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True).stdout


def fresh_database(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}"'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


def empty_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True, help="PostgreSQL database to (re)create and use")
    parser.add_argument("--broker-url", required=True, help="Redis database to empty and use")
    parser.add_argument("--image", default="spine-node:latest")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=600)
    opts = parser.parse_args()

    fresh_database(opts.database_url)
    empty_redis(opts.broker_url)
    work = Path(tempfile.mkdtemp(prefix="spine-smoke-"))
    spool = work / "spool"
    spool.mkdir()
    shutil.chown(spool, CONTAINER_UID, CONTAINER_UID)
    port, metrics_port = free_port(), free_port()
    env = {
        "SPINE_NODE_DATABASE_URL": opts.database_url,
        "SPINE_NODE_BROKER_URL": opts.broker_url,
        "SPINE_NODE_WORKER__EMBEDDED": "false",
        "SPINE_NODE_WORKER__ENGINE_THREADS": "1",
        "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "2",
        "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "2",
    }
    common = ["--network", "host", "-v", f"{spool}:/data"] + [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    names = [f"spine-smoke-node-{port}"] + [f"spine-smoke-worker{i}-{port}" for i in range(opts.workers)]
    try:
        docker("run", "-d", "--name", names[0], *common, "-e", f"SPINE_NODE_DICOM__PORT={port}",
               "-e", f"SPINE_NODE_METRICS_PORT={metrics_port}", opts.image, "serve")
        deadline = time.monotonic() + 120
        while "listening as" not in logs(names[0]):
            if time.monotonic() > deadline:
                raise SystemExit("the node container did not start listening:\n" + logs(names[0]))
            time.sleep(1)
        for name in names[1:]:
            docker("run", "-d", "--name", name, "--no-healthcheck", *common, opts.image, "worker")
        folders = []
        for index in range(opts.series):
            files = write_ct_series(work / "data" / f"s{index}", opts.slices, f"smoke{port}-{index}")
            folders.append(files[0].parent)
        seconds = push(folders, port, "SPINE_NODE")
        print(f"pushed {opts.series} series of {opts.slices} slices in {seconds:.1f}s", flush=True)
        engine = create_engine(opts.database_url)
        deadline = time.monotonic() + opts.timeout
        while True:
            with Session(engine) as session:
                jobs = list(session.scalars(select(Job).order_by(Job.id)))
            if len(jobs) == opts.series and all(j.state in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"jobs not finished after {opts.timeout}s: {[(j.id, j.state) for j in jobs]}")
            time.sleep(1)
        engine.dispose()
        for job in jobs:
            print(f"job {job.id} {job.pipeline}: {job.state} on {job.worker} "
                  f"({(job.finished_at - job.started_at).total_seconds():.1f}s){' ' + job.error if job.error else ''}")
        ran_on = {(j.worker or "").rsplit(":", 1)[0] for j in jobs}  # host:pid of host:pid:thread
        print(f"{len(ran_on)} worker process(es) ran the {len(jobs)} jobs")
        if any(j.state != "succeeded" for j in jobs):
            raise SystemExit(1)
    finally:
        for name in names:
            docker("rm", "-f", name, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
