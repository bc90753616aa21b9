"""The spool's free-space floor, held byte by byte while data sets arrive.

Checking free space once per instance, with a cached answer, let a fast sender (or many
at once) write far past the floor between two checks: the volume filled up and the next
job failed writing its result. Here every write of an incoming data set first takes its
bytes from a budget (free space at the last look, less the floor, less what was taken
since); the budget is looked at again every ``refresh_s`` or when it runs out. A transfer
that cannot take its next bytes stops writing and is answered 0xA700.

Two ways past the floor were closed (a flood on 8 associations once ended 64 KiB below
it): bytes are charged in whole filesystem blocks (a file's last partial block is
allocated whole), and a write taken but not yet made stays charged across a fresh look
(the kernel cannot have counted it yet), instead of being forgotten with the rest.
"""

from __future__ import annotations

import logging
import os
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
        self._taken = 0  # charged since the last look, in flight included
        self._in_flight = 0  # charged, not yet written
        self._checked_at = -1e9
        self.refused = 0
        try:
            self.block = max(1, os.statvfs(root).f_frsize)
        except OSError:
            self.block = 4096

    def _look(self, now: float) -> None:
        # Under the lock. A write made but not yet landed() is counted twice (safe side).
        self._free = shutil.disk_usage(self.root).free
        self._taken = self._in_flight
        self._checked_at = now

    def charge(self, size: int, offset: int = 0) -> int:
        """Bytes a write of ``size`` at ``offset`` of a file takes from the volume: whole blocks."""
        block = self.block
        return -(-(offset + size) // block) * block - -(-offset // block) * block

    def take(self, size: int, offset: int = 0) -> bool:
        """Reserve a write of ``size`` bytes at ``offset`` of its file; False if that would cross
        the floor. Call :meth:`landed` with the same numbers once the write is made."""
        if self.floor_bytes <= 0:
            return True
        need = self.charge(size, offset)
        now = time.monotonic()
        with self._lock:
            if now - self._checked_at > self.refresh_s:
                self._look(now)
            if self._free - self._taken - need < self.floor_bytes:
                if now - self._checked_at > 0.01:  # files may have been deleted meanwhile
                    self._look(now)
                if self._free - self._taken - need < self.floor_bytes:
                    self.refused += 1
                    return False
            self._taken += need
            self._in_flight += need
            return True

    def landed(self, size: int, offset: int = 0) -> None:
        """A write taken with :meth:`take` is made (or given up): the kernel counts it now."""
        if self.floor_bytes <= 0:
            return
        need = self.charge(size, offset)
        with self._lock:
            self._in_flight = max(0, self._in_flight - need)

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
