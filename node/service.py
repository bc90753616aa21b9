"""The ``serve`` process: receive, assemble and route, plus the housekeeping loop.

One service owns the loop that completes series, routes them, sends queue messages,
reconciles lost jobs and dispatches results; receive runs on pynetdicom's threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from node.assemble import Assembler, CompletedStudy, recover_from_spool
from node.audit import Database
from node.config import Settings
from node.receive import Receiver
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
        self.tick_hooks = list(tick_hooks or [])
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
