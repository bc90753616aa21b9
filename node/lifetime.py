"""Child processes that die with their parent (Linux), whatever way the parent goes.

``serve`` starts receive processes and an embedded worker. If ``serve`` is killed with
SIGKILL it runs no clean-up, and a child that lives on keeps the DICOM port or a job.
Linux can signal a child when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the signal
comes when the *thread* that started the child exits, so children are started from
threads that live as long as the service. Elsewhere the children fall back on watching
their parent pid.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


# Looked up once, before any fork: a child between fork and exec must not load libraries.
_PRCTL = _prctl()


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have this process get ``sig`` when its parent dies; exit now if it already has.

    ``parent_pid`` is the pid the parent had when it started this process: a parent that
    died before this call left the process with another parent, and no signal would come.
    Returns False where the platform cannot do it (the caller then polls its parent).
    """
    if _PRCTL is None:
        return False
    if _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)
    return True


def preexec_die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the child die with this process.

    Runs in the child between fork and exec, so it only calls the prctl looked up at
    import time (no imports, no logging, no locks).
    """
    parent = os.getpid()
    prctl = _PRCTL

    def _set() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    return _set


def wait_for_database(check: Callable[[], bool], where: str, *, retry_s: float = 5.0,
                      repeat_s: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> bool:
    """Call ``check`` until it answers instead of raising; return its answer.

    A process started while its database is down (a host booting, PostgreSQL restarting)
    waits for it: one line says so, another every ``repeat_s`` while it lasts, and one
    when it is back; never a traceback. ``where`` names the database without a password.
    """
    started = time.monotonic()
    said = 0.0
    while True:
        try:
            answer = check()
        except Exception as exc:  # noqa: BLE001 - any driver error means "not yet"
            now = time.monotonic()
            if not said or now - said >= repeat_s:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                log.warning("database %s not reachable (%s%s); waiting, retrying every %.0f s",
                            where, type(exc).__name__, f": {first}" if first else "", retry_s)
                said = now
            sleep(retry_s)
            continue
        if said:
            log.warning("database %s reachable after %.0f s", where, time.monotonic() - started)
        return answer
