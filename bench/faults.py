"""Faults, timed: how long ``serve`` takes to stop, and routing beside a PACS that never answers.

* stop: ``serve --processes 4`` after one receive child was killed with SIGKILL and
  replaced, then SIGTERM (or SIGINT to its process group, as a terminal's Ctrl-C): seconds
  until serve and every process it started are gone; an idle single-process ``serve``
  with its embedded worker, Ctrl-C; SIGKILL of ``serve --processes 2`` with its embedded
  worker: seconds until nothing listens on the port and every child is gone.
* silent PACS: dispatch is inside a C-STORE association with a peer that accepted TCP and
  never answers (``dicom.acse_timeout_s`` 300) while a series arrives; routing latency is
  the series' ``completed_at`` less its last instance, less the quiet period (the node's
  own clock, from the ``series`` row).

    python -m bench.faults --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from bench.harness import (
    REPO,
    descendants,
    machine,
    node_env,
    push,
    wait_listening,
    write_ct_series,
    write_section,
)

QUIET_S = 2.0


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _serve(data_dir: Path, port: int, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    log = (data_dir / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "spine_node.node.cli", "serve", *args], cwd=REPO,
                            env=node_env(data_dir, port, env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_listening(port, proc, timeout=120)
    return proc


def _wait_log(data_dir: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in (data_dir / "serve.log").read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not in the serve log after {timeout} s")
        time.sleep(0.1)


def _gone_after(pids: set[int], port: int, start: float, timeout: float = 60) -> float:
    while [p for p in pids if _alive(p)] or _listening(port):
        if time.monotonic() - start > timeout:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - start


def stop_round(work: Path, how: str) -> float:
    from bench.harness import free_port

    port = free_port()
    data = work / f"stop-{how}"
    worker = how in ("ctrl-c-idle", "sigkill")
    args = {"sigterm": ["--processes", "4"], "sigint": ["--processes", "4"], "ctrl-c-idle": [],
            "sigkill": ["--processes", "2"]}[how]
    env = {"SPINE_NODE_WORKER__EMBEDDED": "true" if worker else "false", "SPINE_NODE_LOG_LEVEL": "INFO"}
    proc = _serve(data, port, args, env)
    try:
        if worker:
            _wait_log(data, "worker: queues")
        if how in ("sigterm", "sigint"):
            _wait_log(data, "(4 receive processes)")
            victim = min(descendants(proc.pid) & {p for p in descendants(proc.pid)
                                                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()})
            os.kill(victim, signal.SIGKILL)
            _wait_log(data, "restarting")
            time.sleep(1.0)  # the replacement is listening
        pids = descendants(proc.pid) | {proc.pid}
        start = time.monotonic()
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "sigkill":
            proc.send_signal(signal.SIGKILL)
            pids.discard(proc.pid)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        return _gone_after(pids, port, start)
    finally:
        for pid in descendants(proc.pid):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def silent_pacs_round(work: Path, instances: int) -> float:
    """Routing latency beyond the quiet period while dispatch waits on a silent PACS."""
    from bench.harness import free_port
    from spine_node.node.audit import Dispatch, Job, Result, Series
    from spine_node.node.db_migrate import upgrade

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in iter(int, 1)],
                     daemon=True).start()
    port = free_port()
    data = work / "silent"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    url = f"sqlite:///{data / 'node.db'}"
    upgrade(url)
    result = data / "result.dcm"
    files = write_ct_series(work / "silent-in", instances, "silent")
    shutil.copy(files[0], result)
    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        job = Job(study_uid="1.2.3", series_uid="1.2.3.4", input_series_uids=["1.2.3.4"],
                  pipeline="none", queue="cpu", state="succeeded")
        session.add(job)
        session.flush()
        row = Result(job_id=job.id, kind="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                     sop_instance_uid="1.2.3.4.5", series_uid="1.2.3.4.6", path=str(result))
        session.add(row)
        session.flush()
        session.add(Dispatch(result_id=row.id, destination="pacs"))
    env = {"SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": str(QUIET_S),
           "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": str(QUIET_S),
           "SPINE_NODE_ASSEMBLY__POLL_INTERVAL_S": "0.2", "SPINE_NODE_DICOM__ACSE_TIMEOUT_S": "300",
           "SPINE_NODE_DISPATCH__DESTINATIONS": json.dumps(
               [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": listener.getsockname()[1]}])}
    proc = subprocess.Popen([sys.executable, "-m", "spine_node.node.cli", "serve"], cwd=REPO,
                            env=node_env(data, port, env), stdout=(data / "serve.log").open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(port, proc, timeout=120)
        deadline = time.monotonic() + 60
        while not held:
            if time.monotonic() > deadline:
                raise RuntimeError("dispatch never connected to the silent PACS")
            time.sleep(0.05)
        push([files[0].parent], port, "SPINE_NODE")
        while True:
            with Session(engine) as session:
                series = session.scalars(select(Series)).all()
            if series and all(s.completed_at is not None for s in series):
                break
            if time.monotonic() > deadline + 120:
                raise RuntimeError("series not completed")
            time.sleep(0.1)
        return max((s.completed_at - s.last_received_at).total_seconds() - QUIET_S for s in series)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        engine.dispose()
        listener.close()
        for conn in held:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print, do not update bench/RESULTS.md")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="spine-bench-faults-"))
    rows = []
    try:
        for how in ("sigterm", "sigint", "ctrl-c-idle", "sigkill"):
            times = [stop_round(work, how) for _ in range(options.rounds)]
            rows.append((how, times))
            print(how, [round(t, 2) for t in times], flush=True)
        latency = [silent_pacs_round(work, options.instances) for _ in range(options.rounds)]
        print("silent PACS routing latency beyond quiet period", [round(t, 2) for t in latency], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    label = {"sigterm": "`serve --processes 4`, a child SIGKILLed and replaced, then SIGTERM: all gone",
             "sigint": "same, SIGINT to the process group (Ctrl-C): all gone",
             "ctrl-c-idle": "idle `serve` with its embedded worker, Ctrl-C: all gone",
             "sigkill": "SIGKILL of `serve --processes 2` with embedded worker: no listener, no child"}
    body = [f"`python -m bench.faults --rounds {options.rounds}` on {machine()}.", "",
            "| case | median s | max s |", "| --- | --- | --- |"]
    body += [f"| {label[how]} | {statistics.median(t):.2f} | {max(t):.2f} |" for how, t in rows]
    body += [f"| routing latency beyond the {QUIET_S:g} s quiet period, dispatch stuck on a PACS that "
             f"never answers ({options.instances} instances) | {statistics.median(latency):.2f} | "
             f"{max(latency):.2f} |"]
    text = "\n".join(body)
    print(text)
    if not options.no_write:
        write_section("faults", text)


if __name__ == "__main__":
    main()
