"""The ``serve`` process: receive, assemble and route, plus the housekeeping loop.

One service owns the loop that completes series, routes them, sends queue messages,
reconciles lost jobs and dispatches results; receive runs on pynetdicom's threads.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from node.assemble import Assembler, CompletedStudy, recover_from_spool
from node.audit import Database
from node.config import Settings
from node.receive import Receiver
from node.retention import RetentionCleaner
from node.route import route_study

log = logging.getLogger(__name__)

TickHook = Callable[[Database, Settings], Any]


class NodeService:
    """Everything ``spine-node serve`` runs in-process."""

    def __init__(self, settings: Settings, db: Database | None = None,
                 tick_hooks: list[TickHook] | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.receiver = Receiver(settings, self.db)
        self.assembler = Assembler(self.db, settings.assembly, on_complete=self._route)
        if tick_hooks is None:
            from node.jobs import tick as jobs_tick

            # Send queue messages for new jobs, reconcile lost ones, dispatch results.
            tick_hooks = [jobs_tick]
        self.tick_hooks = list(tick_hooks)
        cleaner = RetentionCleaner(settings.storage)
        if cleaner.enabled:
            self.tick_hooks.append(cleaner)
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    def _route(self, session: Session, completed: CompletedStudy) -> None:
        route_study(session, self.settings.routes, completed)

    def start(self) -> None:
        repaired = recover_from_spool(self.db, self.settings.storage.spool)
        if repaired:
            log.info("recovered %d series from the spool", repaired)
        self.receiver.start()
        self._stop.clear()
        self._loop = threading.Thread(target=self._run, name="node-loop", daemon=True)
        self._loop.start()

    @property
    def port(self) -> int:
        return self.receiver.port

    def tick(self) -> None:
        """One pass of housekeeping: complete and route, then the hooks (jobs, dispatch)."""
        self.receiver.tracker.flush()
        self.assembler.poll()
        for hook in self.tick_hooks:
            hook(self.db, self.settings)

    def _run(self) -> None:
        interval = self.settings.assembly.poll_interval_s
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:
                # Keep serving: a database hiccup must not stop receive.
                log.exception("housekeeping pass failed; retrying in %.1fs", interval)

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=30)
        self.receiver.stop()
        self.db.dispose()

    def wait(self) -> None:
        self._stop.wait()


class EmbeddedWorker:
    """A local ``spine-node worker`` child process, restarted if it dies.

    The single-machine default: ``serve`` runs one worker beside itself so that nothing
    else has to be started. Many machines: set ``worker.embedded = false`` and run
    ``spine-node worker`` on the worker hosts.
    """

    def __init__(self, config_file: str | None = None, restart_delay_s: float = 5.0) -> None:
        self.config_file = config_file
        self.restart_delay_s = restart_delay_s
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _spawn(self) -> None:
        args = [sys.executable, "-m", "node.cli"]
        if self.config_file:
            args += ["--config", self.config_file]
        self.proc = subprocess.Popen([*args, "worker"], env=os.environ.copy())
        log.info("embedded worker started (pid %d)", self.proc.pid)

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="embedded-worker", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            if self.proc is not None and self.proc.poll() is not None:
                log.warning("embedded worker exited with %s; restarting in %.0fs",
                            self.proc.returncode, self.restart_delay_s)
                if self._stop.wait(self.restart_delay_s):
                    return
                self._spawn()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
