"""Audit rows written behind receive, so a slow or frozen database never holds up an answer.

Files are the truth for instances; association rows and refusal events are bookkeeping.
Receive threads put what they would write into a :class:`Backlog`; one thread writes it in
order, in small transactions, and keeps it while the database is unreachable or frozen
(a stopped PostgreSQL accepts TCP and answers nothing, so a call would hang the caller).
When the database returns, the rows are written with their original times.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from spine_node.node.audit import Database

log = logging.getLogger(__name__)

Write = Callable[[Session], None]


class Backlog:
    """An ordered queue of database writes with one writer thread.

    Each write is a function of a session; writes run in order, up to ``batch`` in one
    transaction. A batch that fails for a connection problem is kept and retried after
    ``retry_s``; a write that keeps failing for another reason (a bug, a value the
    database refuses) is dropped after ``max_tries`` with a warning, so it cannot block
    the rest. At most ``max_items`` wait; beyond that the oldest are dropped (counted).
    """

    def __init__(self, db: Database, *, name: str = "audit-backlog", max_items: int = 100_000,
                 batch: int = 200, retry_s: float = 1.0, max_tries: int = 5) -> None:
        self.db = db
        self.name = name
        self.max_items = max_items
        self.batch = batch
        self.retry_s = retry_s
        self.max_tries = max_tries
        self.dropped = 0
        self._items: deque[Write] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None

    def put(self, write: Write) -> None:
        """Queue ``write`` (never blocks, never touches the database)."""
        with self._lock:
            if len(self._items) >= self.max_items:
                self._items.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.warning("%s full (%d waiting): %d oldest audit write(s) dropped", self.name,
                                self.max_items, self.dropped)
            self._items.append(write)
            self._idle.clear()
        self._wake.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything queued so far is written; False after ``timeout``."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 2.0) -> None:
        """Write what can be written within ``timeout`` seconds, then stop."""
        self.wait_idle(timeout)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(0.5)
            self._thread = None
        left = len(self)
        if left:
            log.warning("%s: %d audit write(s) not written at stop (the database did not answer); "
                        "the instances themselves are in the spool", self.name, left)

    def _run(self) -> None:
        tries = 0
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not self._stop.is_set():
                with self._lock:
                    # After a failure, one write at a time: find the one that fails.
                    size = 1 if tries else self.batch
                    todo = [self._items[i] for i in range(min(size, len(self._items)))]
                    if not todo:
                        self._idle.set()
                        break
                try:
                    with self.db.session() as session:
                        for write in todo:
                            write(session)
                except Exception as exc:  # noqa: BLE001 - kept and retried; receive goes on
                    tries += 1
                    # A database that is down, unreachable or locked is worth waiting for.
                    connection = isinstance(exc, (OperationalError, InterfaceError, PoolTimeout, OSError))
                    if not connection and tries >= self.max_tries:
                        log.warning("%s: dropped an audit write that failed %d times (%s)", self.name,
                                    tries, type(exc).__name__)
                        with self._lock:
                            self._items.popleft()
                        tries = 0
                        continue
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                        log.warning("%s: cannot write to the database (%s); %d audit write(s) kept, "
                                    "retrying every %.0f s", self.name, type(exc).__name__, len(self),
                                    self.retry_s)
                    if self._stop.wait(self.retry_s):
                        return
                    continue
                with self._lock:
                    for _ in todo:
                        self._items.popleft()
                tries = 0
                if self._failing_since is not None:
                    log.warning("%s: database reachable again after %.0f s; audit rows written", self.name,
                                time.monotonic() - self._failing_since)
                    self._failing_since = None

