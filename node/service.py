"""The ``serve`` process: receive, assemble and route, plus the housekeeping loop.

One service owns the loop that completes and routes series, and two lanes (threads of
their own) that send queue messages and reconcile lost jobs, and dispatch results: a
broker or PACS that does not answer holds up only its own lane. Receive runs on pynetdicom's threads, either
in this process (``dicom.processes = 1``) or in N child processes that each bind the same
port with ``SO_REUSEPORT`` (the kernel spreads associations over them, and each has its
own interpreter lock). Children only receive: each counts its instances into SQL through
its own :class:`~node.assemble.SeriesTracker`; only this process assembles, routes and runs
the hooks.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy.orm import Session

from spine_node.node import metrics
from spine_node.node.assemble import Assembler, CompletedStudy, recover_from_spool, restart_quiet_periods
from spine_node.node.audit import Database
from spine_node.node.config import Settings
from spine_node.node.errors import NodeError
from spine_node.node.lifetime import die_with_parent, preexec_die_with_parent
from spine_node.node.receive import Receiver, salvage_incoming
from spine_node.node.retention import RetentionCleaner
from spine_node.node.route import route_study
from spine_node.node.spool import Spool

log = logging.getLogger(__name__)

TickHook = Callable[[Database, Settings], Any]


class NodeService:
    """Everything ``spine-node serve`` runs (in-process, plus receive children if configured)."""

    def __init__(self, settings: Settings, db: Database | None = None,
                 tick_hooks: list[TickHook] | None = None) -> None:
        self.settings = settings
        self.db = db or Database(settings.database_url)
        self.processes = settings.dicom.processes
        self.receiver: Receiver | None = Receiver(settings, self.db) if self.processes == 1 else None
        self.receive_processes: ReceiveProcesses | None = None
        self.assembler = Assembler(self.db, settings.assembly, on_complete=self._route)
        # Work that talks to the broker or a PACS runs in lanes of its own: a PACS that
        # accepts a connection and never answers holds up dispatch for acse_timeout_s, a
        # broker that is down holds up job messages, and neither may stall completion and
        # routing (or each other). Given tick_hooks replace them (all run in the loop).
        self.lanes: list[Lane] = []
        if tick_hooks is None:
            interval = settings.assembly.poll_interval_s
            self.lanes = [Lane("node-jobs", self._reconcile_jobs, interval),
                          Lane("node-dispatch", self._dispatch, interval)]
            tick_hooks = []
        self.tick_hooks = list(tick_hooks)
        self.metrics_server: Any = None
        cleaner = RetentionCleaner(settings.storage)
        if cleaner.enabled:
            self.tick_hooks.append(cleaner)
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    def _route(self, session: Session, completed: CompletedStudy) -> None:
        route_study(session, self.settings.routes, completed)

    def _reconcile_jobs(self) -> None:
        """Send queue messages for new jobs, reconcile lost ones."""
        from spine_node.node.jobs import reconcile

        reconcile(self.db, self.settings)

    def _dispatch(self) -> None:
        from spine_node.node.dispatch import dispatch_pending

        dispatch_pending(self.db, self.settings)

    def start(self) -> None:
        # Before the spool is reconciled with the database: placed files get counted there.
        salvage_incoming(Spool(self.settings.storage.spool))
        repaired = recover_from_spool(self.db, self.settings.storage.spool)
        if repaired:
            log.info("recovered %d series from the spool", repaired)
        waiting = restart_quiet_periods(self.db)
        if waiting:
            log.info("%d series were receiving when the node stopped; their quiet period counts "
                     "from now", waiting)
        # Metrics first: once the DICOM port answers, the endpoint does too.
        if self.settings.metrics_port is not None:
            self.metrics_server = metrics.start_metrics_server(
                self.settings.metrics_port, self.settings.dicom.host, self.db)
        try:
            self._start_receive()
        except BaseException:
            self._stop_metrics()
            raise
        self._stop.clear()
        self._loop = threading.Thread(target=self._run, name="node-loop", daemon=True)
        self._loop.start()
        for lane in self.lanes:
            lane.start()

    def _start_receive(self) -> None:
        if self.receiver is not None:
            self.receiver.start(clean_incoming=False)  # start() salvaged .incoming already
            return
        if self.settings.dicom.port == 0:
            # Children must share one port: pick it here.
            self.settings = self.settings.model_copy(deep=True)
            self.settings.dicom.port = _free_port(self.settings.dicom.host)
        self.receive_processes = ReceiveProcesses(self.settings, self.processes)
        self.receive_processes.start()

    def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None

    @property
    def port(self) -> int:
        if self.receiver is not None:
            return self.receiver.port
        return self.settings.dicom.port

    @property
    def metrics_port(self) -> int | None:
        if self.metrics_server is None:
            return None
        return int(self.metrics_server.server_address[1])

    def tick(self) -> None:
        """One pass of housekeeping: complete and route, then the hooks (jobs, dispatch)."""
        if self.receiver is not None:
            self.receiver.tracker.flush()
        if self.receive_processes is not None:
            self.receive_processes.supervise()
        completed_any = False
        for completed in self.assembler.poll():
            completed_any = True
            metrics.SERIES_COMPLETED.labels(forced=str(completed.forced).lower()).inc(
                len(completed.series_uids))
        if completed_any and self.lanes:
            self.lanes[0].wake()  # the new jobs' messages go out now, not a period later
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
        for lane in self.lanes:
            lane.stop()
        if self._loop is not None:
            self._loop.join(timeout=30)
        for lane in self.lanes:
            # A lane inside a network call (a PACS that never answers) is not waited for
            # to its timeout: its thread is a daemon and its rows are leased, not lost.
            lane.join(timeout=2)
        if any(lane.busy for lane in self.lanes):
            from spine_node.node.dispatch import abort_in_flight

            # pynetdicom's network thread is no daemon: it would hold the process.
            abort_in_flight()
        if self.receiver is not None:
            self.receiver.stop()
        if self.receive_processes is not None:
            self.receive_processes.stop()
        self._stop_metrics()
        self.db.dispose()

    def wait(self) -> None:
        self._stop.wait()


class Lane:
    """One kind of background work on its own thread and clock (see NodeService)."""

    def __init__(self, name: str, work: Callable[[], Any], interval_s: float) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    @property
    def busy(self) -> bool:
        """True if stopped but its thread is still inside a pass."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s still busy at stop (a peer not answering); leaving it", self.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.work()
            except Exception:
                # Keep going: a database or network hiccup is retried next pass.
                log.exception("%s pass failed; retrying in %.1fs", self.name, self.interval_s)
            self.passes += 1
            self._wake.wait(self.interval_s)
            self._wake.clear()


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
        args = [sys.executable, "-m", "spine_node.node.cli"]
        if self.config_file:
            args += ["--config", self.config_file]
        # Its own process group (a terminal's Ctrl-C reaches serve, which stops it; stop
        # signals the whole group), and killed with serve however serve ends: a job it
        # was running is taken over through its stale heartbeat.
        self.proc = subprocess.Popen([*args, "worker"], env=os.environ.copy(), start_new_session=True,
                                     preexec_fn=preexec_die_with_parent(signal.SIGKILL))  # noqa: PLW1509
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

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after ``timeout`` seconds.

        A worker still inside a job after ``timeout`` is killed rather than waited for:
        the job goes back to the queue through its stale heartbeat.
        """
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None:
                log.warning("embedded worker did not stop within %.0fs; killing it", timeout)
            _signal_group(proc.pid, signal.SIGKILL)  # also any pool child left behind
            proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ReceiveProcesses:
    """``count`` child processes, each running a :class:`Receiver` on the shared port.

    Children are started with ``spawn`` (no inherited threads or database connections) and
    restarted by :meth:`supervise` if one dies. A child gets SIGTERM when its parent dies
    (:func:`spine_node.node.lifetime.die_with_parent`), so a killed ``serve`` never leaves
    a receiver holding the port.

    Parent and children share no lock: a child says it listens through a pipe and is told
    to stop with SIGTERM. (A shared ``multiprocessing.Event`` was a lock that a child
    killed with SIGKILL inside ``wait`` held for ever: the parent then hung in ``set`` at
    stop.)
    """

    def __init__(self, settings: Settings, count: int, start_timeout_s: float = 60.0) -> None:
        self.settings = settings
        self.count = count
        self.start_timeout_s = start_timeout_s
        self._ctx = multiprocessing.get_context("spawn")
        self._stopping = False
        self._procs: list[BaseProcess | None] = [None] * count
        # Each child's "listening" pipe (read end).
        self._readies: list[Connection | None] = [None] * count

    def start(self) -> None:
        readies = [self._spawn(index) for index in range(self.count)]
        deadline = time.monotonic() + self.start_timeout_s
        for index, ready in enumerate(readies):
            while not _listening(ready):
                proc = self._procs[index]
                if proc is not None and not proc.is_alive():
                    self.stop()
                    raise NodeError(f"receive process {index} exited with {proc.exitcode} at start; see its log")
                if time.monotonic() > deadline:
                    self.stop()
                    raise NodeError(f"receive process {index} did not listen within {self.start_timeout_s}s")
        log.info("%d receive processes listening on %s:%d", self.count, self.settings.dicom.host,
                 self.settings.dicom.port)

    def _spawn(self, index: int) -> Connection:
        old = self._readies[index]
        if old is not None:
            old.close()
        ready, child_end = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=_receive_process_main, name=f"spine-node-receive-{index}",
                                 args=(self.settings, index, child_end, os.getpid()), daemon=True)
        proc.start()
        child_end.close()
        self._procs[index] = proc
        self._readies[index] = ready
        return ready

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def supervise(self) -> None:
        """Restart any child that died (crash, OOM kill); called from the serve loop."""
        if self._stopping:
            return
        for index, proc in enumerate(self._procs):
            if proc is not None and not proc.is_alive():
                log.warning("receive process %d (pid %s) exited with %s; restarting", index, proc.pid,
                            proc.exitcode)
                proc.close()
                self._spawn(index)

    def stop(self, timeout_s: float = 3.0) -> None:
        """SIGTERM every child at once; SIGKILL what still runs after ``timeout_s``."""
        self._stopping = True
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.join(max(0.05, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("receive process pid %s did not stop within %.0fs; killing it", proc.pid,
                            timeout_s)
                proc.kill()
                proc.join(2)
        for ready in self._readies:
            if ready is not None:
                ready.close()
        self._readies = [None] * self.count


def _listening(ready: Connection) -> bool:
    """True once the child behind ``ready`` said it listens (waits up to 0.2 s)."""
    try:
        if ready.poll(0.2):
            ready.recv()
            return True
    except (EOFError, OSError):
        time.sleep(0.2)  # the child is gone; the caller sees it exited
    return False


def _receive_process_main(settings: Settings, index: int, ready: Connection, parent: int) -> None:
    """Body of one receive child: receive until the parent says stop (SIGTERM) or dies."""
    from spine_node.node.logs import configure_logging

    local_stop = threading.Event()
    # Ctrl-C reaches the whole process group: the parent coordinates the shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: local_stop.set())
    die_with_parent(parent, signal.SIGTERM)
    # Whatever this process is doing when its parent goes (starting up, stopping, blocked
    # on a pipe to the dead parent), it leaves at most _ORPHAN_STOP_S later.
    _orphan_watchdog(parent, _ORPHAN_STOP_S, f"receive process {index}")
    configure_logging(settings.log_level)
    db = Database(settings.database_url)
    receiver = Receiver(settings, db)
    receiver.start(clean_incoming=False)
    ready.send(True)
    ready.close()
    log.debug("receive process %d (pid %d) listening", index, os.getpid())
    try:
        # The parent pid check covers systems without PR_SET_PDEATHSIG.
        while not local_stop.wait(0.5):
            if os.getppid() != parent:
                log.warning("receive process %d: parent exited; stopping", index)
                break
    finally:
        receiver.stop()
        db.dispose()


_ORPHAN_STOP_S = 4.0


def _orphan_watchdog(parent: int, after_s: float, what: str) -> None:
    """Leave the process ``after_s`` after its parent ``parent`` is gone, whatever the
    main thread is doing then: nobody coordinates its stop any more, and a stop that hangs
    (a database that does not answer, an association that does not close, a start-up
    that meets the dead parent's pipe and waits on its threads at exit) must not keep the
    DICOM port. Every thread's stack goes to the log when it has to cut a stop short."""
    import faulthandler

    def _watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.25)
        time.sleep(after_s)
        log.warning("%s: stop took over %.0f s after its parent exited; leaving now", what, after_s)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(1)

    threading.Thread(target=_watch, name="orphan-watchdog", daemon=True).start()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
