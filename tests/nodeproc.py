"""Start a real ``spine-node serve`` process for tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.peers import free_port

REPO = Path(__file__).resolve().parents[1]


class NodeProcess:
    def __init__(self, data_dir: Path, database_url: str, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.database_url = database_url
        self.log_path = data_dir / "serve.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "SPINE_NODE_DICOM__HOST": "127.0.0.1",
            "SPINE_NODE_DICOM__PORT": str(self.port),
            "SPINE_NODE_STORAGE__DATA_DIR": str(data_dir),
            "SPINE_NODE_STORAGE__MIN_FREE_MB": "0",
            "SPINE_NODE_DATABASE_URL": database_url,
            "SPINE_NODE_ASSEMBLY__QUIET_PERIOD_S": "1",
            "SPINE_NODE_ASSEMBLY__STUDY_QUIET_PERIOD_S": "1",
            "SPINE_NODE_ASSEMBLY__POLL_INTERVAL_S": "0.2",
            "SPINE_NODE_WORKER__EMBEDDED": "false",
            **(env or {}),
        }
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def with_worker_dispatching_to(self, ae_title: str, port: int) -> NodeProcess:
        """Run the embedded worker and send results to one destination (call before start)."""
        self.env.update({
            "SPINE_NODE_WORKER__EMBEDDED": "true",
            "SPINE_NODE_DISPATCH__DESTINATIONS": json.dumps([{
                "name": "pacs", "ae_title": ae_title, "host": "127.0.0.1", "port": port}]),
        })
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spine_node.node.cli", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, check=check, timeout=timeout)

    def start(self, timeout: float = 60) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "spine_node.node.cli", "serve", *self.args],
                                     cwd=REPO, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"serve did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate, timeout: float = 30, interval: float = 0.2):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value (bounded); return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def table_rows(url: str, model):  # type: ignore[no-untyped-def]
    """Every row of ``model``'s table in the database at ``url`` (a fresh engine per call)."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(model)))
    finally:
        engine.dispose()
