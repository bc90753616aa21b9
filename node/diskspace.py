"""The spool's free-space floor, held byte by byte while data sets arrive.

Checking free space once per instance, with a cached answer, let a fast sender (or many
at once) write far past the floor between two checks: the volume filled up and the next
job failed writing its result. Here every write of an incoming data set first takes its
bytes from a budget (free space at the last look, less the floor, less what was taken
since); the budget is looked at again every ``refresh_s`` or when it runs out. A transfer
that cannot take its next bytes stops writing and is answered 0xA700, so free space
never goes below the floor by more than what the kernel had not yet counted at the last
look (at most one write per association).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class SpaceGuard:
    """Free-space budget of one volume above ``floor_bytes``; thread-safe."""

    def __init__(self, root: Path, floor_bytes: int, refresh_s: float = 0.25) -> None:
        self.root = root
        self.floor_bytes = floor_bytes
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._free = 0
        self._taken = 0
        self._checked_at = -1e9
        self.refused = 0

    def _look(self, now: float) -> None:
        self._free = shutil.disk_usage(self.root).free
        self._taken = 0
        self._checked_at = now

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes about to be written; False if that would cross the floor."""
        if self.floor_bytes <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at > self.refresh_s:
                self._look(now)
            if self._free - self._taken - size < self.floor_bytes:
                if now - self._checked_at > 0.01:  # files may have been deleted meanwhile
                    self._look(now)
                if self._free - self._taken - size < self.floor_bytes:
                    self.refused += 1
                    return False
            self._taken += size
            return True

    def ok(self) -> bool:
        """True if a new data set may start (free space above the floor now)."""
        if self.floor_bytes <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at > self.refresh_s:
                self._look(now)
            return self._free - self._taken >= self.floor_bytes

    def full(self) -> None:
        """The volume said ENOSPC: look again before the next write."""
        with self._lock:
            self._checked_at = -1e9
