"""Resource attacks on a live ``spine-node serve``: deflate bombs, slow peers, floods.

Each attack comes from 127.0.0.1 while a good peer on another address (127.0.0.2, also
loopback) keeps asking C-ECHO: it must be answered throughout. Memory is measured on the
serve process itself (``/proc/<pid>/status``: VmRSS idle, VmHWM, the peak, reset with
``clear_refs`` before the attack). Latencies are printed (``-s``) for docs/hardening.md,
and asserted only against generous bounds.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from spine_node.node.audit import Association, AuditEvent
from spine_node.node.uids import derive_uid
from tests.dicom_factory import real_ct
from tests.nodeproc import NodeProcess, wait_for
from tests.scu import CT_IMAGE_STORAGE, pdata_pdu, raw_associate, raw_store, release, store_command

GOOD_HOST = "127.0.0.2"  # loopback too: the good peer is another host to the node
# Generous: the target is 1 s (docs/hardening.md has the measured figures).
ECHO_BOUND_S = 10.0


def _good_echo(port: int) -> float:
    """Seconds for a whole C-ECHO association from GOOD_HOST; raises if it is refused."""
    ae = AE(ae_title="GOODPEER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINE_NODE", bind_address=(GOOD_HOST, 0))
    assert assoc.is_established, "the good peer was refused"
    try:
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    return time.monotonic() - started


class EchoWatch:
    """C-ECHO from the good peer every 0.2 s in a thread, for the length of an attack."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.latencies.append(_good_echo(self.port))
            except (AssertionError, OSError, RuntimeError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(0.2)

    def __enter__(self) -> EchoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def check(self, what: str) -> None:
        assert not self.failures, f"{what}: good peer refused: {self.failures[:3]}"
        assert self.latencies, f"{what}: no C-ECHO completed"
        worst, median = max(self.latencies), sorted(self.latencies)[len(self.latencies) // 2]
        print(f"\n{what}: {len(self.latencies)} C-ECHO, median {median:.3f} s, max {worst:.3f} s")
        assert worst < ECHO_BOUND_S, f"{what}: a C-ECHO took {worst:.1f} s"


def _status(pid: int, field: str) -> int:
    """A kB figure from /proc/<pid>/status (VmRSS, VmHWM, Threads)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    assert match, field
    return int(match.group(1))


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _settle_rss(pid: int) -> int:
    """VmRSS once the node is idle (a few steady readings)."""
    readings = []
    for _ in range(5):
        readings.append(_status(pid, "VmRSS"))
        time.sleep(0.3)
    return max(readings)


def _rows(url: str, model: type) -> list:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(model)))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("attacks")
    url = f"sqlite:///{root / 'node' / 'node.db'}"
    env = {"SPINE_NODE_DICOM__ACSE_TIMEOUT_S": "3", "SPINE_NODE_DICOM__DIMSE_TIMEOUT_S": "4",
           "SPINE_NODE_DICOM__NETWORK_TIMEOUT_S": "30", "SPINE_NODE_DICOM__REFUSAL_AUDIT_INTERVAL_S": "2"}
    with NodeProcess(root / "node", url, env=env) as proc:
        _good_echo(proc.port)  # warm: the first association loads pynetdicom's negotiation code
        yield proc


# -- 1. deflate bombs --------------------------------------------------------------------------

def _deflated_zeros(inflated: int) -> bytes:
    """Raw deflate blocks (the last one final) of ``inflated`` bytes, at a ratio of about 90:
    64 KiB units of zeros with 420 random bytes each, as the reported bomb."""
    deflater = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    unit = bytes((64 << 10) - 420) + os.urandom(420)
    parts = [deflater.compress(unit) for _ in range(inflated // len(unit))]
    parts.append(deflater.compress(bytes(inflated % len(unit))))
    parts.append(deflater.flush())
    return b"".join(parts)


def _deflate_bomb(study: str, index: int, body: bytes, inflated: int) -> tuple[str, bytes]:
    """A deflated CT data set whose pixel data is ``body`` (``inflated`` bytes once inflated)."""
    from pynetdicom.dsutils import encode

    ds = real_ct()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = derive_uid(study, "series")
    ds.SOPInstanceUID = derive_uid(study, "bomb", str(index))
    del ds.PixelData
    header = encode(ds, False, True)
    assert header is not None
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    # A full flush ends on a byte boundary with no back-references: the body's blocks follow.
    start = deflater.compress(header + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<L", inflated))
    return ds.SOPInstanceUID, start + deflater.flush(zlib.Z_FULL_FLUSH) + body


def test_parallel_deflate_bombs_keep_memory_bounded(node: NodeProcess) -> None:
    """8 deflated data sets of ~4 MiB, each inflating to 360 MiB, at once."""
    pid = node.proc.pid  # type: ignore[union-attr]
    study = derive_uid("attacks", "deflate")
    body = _deflated_zeros(360 << 20)
    bombs = [_deflate_bomb(study, index, body, 360 << 20) for index in range(8)]
    ratio = (360 << 20) / len(bombs[0][1])
    assert 80 < ratio < 100, ratio
    idle = _settle_rss(pid)
    _reset_peak(pid)
    statuses: list[int] = []

    def send(sop: str, data: bytes) -> None:
        sock = raw_associate(node.port, CT_IMAGE_STORAGE, DeflatedExplicitVRLittleEndian, timeout=120)
        try:
            statuses.append(raw_store(sock, CT_IMAGE_STORAGE, sop, data, fragment=1 << 16))
        finally:
            release(sock)

    with EchoWatch(node.port) as watch:
        senders = [threading.Thread(target=send, args=bomb) for bomb in bombs]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(300)
    peak = _status(pid, "VmHWM")
    print(f"\ndeflate bombs: idle RSS {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    assert statuses == [0] * 8  # walked and stored: sound data sets, only large
    assert peak <= 2 * idle, f"peak RSS {peak} kB over twice the idle {idle} kB"
    watch.check("8 deflate bombs")


# -- 2. slow peers -------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, trickle: bytes, interval: float, bound: float) -> tuple[float, bytes]:
    """Send ``trickle`` a byte at a time until the node closes; (seconds, what it sent)."""
    started = time.monotonic()
    received = b""
    sock.settimeout(interval)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        try:
            chunk = sock.recv(64)
            if not chunk:
                break
            received += chunk
        except TimeoutError:
            pass
        except OSError:
            break
        if time.monotonic() - started > bound:
            break
    return time.monotonic() - started, received


def _associate_rq(calling: str = "SLOWPEER") -> bytes:
    """The bytes of an A-ASSOCIATE-RQ for CT storage (as tests.scu.raw_associate sends)."""
    def item(kind: int, payload: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(payload)) + payload
    context = bytes([1, 0, 0, 0]) + item(0x30, CT_IMAGE_STORAGE.encode()) + item(0x40, ExplicitVRLittleEndian.encode())
    variable = (item(0x10, b"1.2.840.10008.3.1.1.1") + item(0x20, context)
                + item(0x50, item(0x51, struct.pack(">L", 16384))))
    body = struct.pack(">HH", 1, 0) + b"SPINE_NODE".ljust(16) + calling.encode().ljust(16) + bytes(32) + variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def test_trickled_association_request_is_cut_off_at_the_acse_deadline(node: NodeProcess) -> None:
    """1 byte every 0.5 s (200 bytes: 100 s); acse_timeout_s is 3."""
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        elapsed, received = _closed_within(sock, _associate_rq(), 0.5, 60)
    print(f"\ntrickled A-ASSOCIATE-RQ closed after {elapsed:.1f} s")
    assert elapsed < 20, f"still open after {elapsed:.0f} s"
    assert received[:1] in (b"", b"\x07"), received  # closed, or an A-ABORT first


def test_trickled_data_set_is_aborted_at_the_dimse_deadline(node: NodeProcess) -> None:
    """A C-STORE whose data set comes 1 byte every 0.2 s; dimse_timeout_s is 4."""
    ds = real_ct()
    sock = raw_associate(node.port, calling="TRICKLE")
    try:
        sock.sendall(pdata_pdu(1, store_command(CT_IMAGE_STORAGE, ds.SOPInstanceUID), command=True, last=True))
        # One PDU of 16 KiB announced, its bytes then trickled.
        sock.sendall(struct.pack(">BBL", 0x04, 0, 16390) + struct.pack(">LBB", 16386, 1, 0x00))
        elapsed, received = _closed_within(sock, bytes(16384), 0.2, 60)
    finally:
        sock.close()
    print(f"\ntrickled data set aborted after {elapsed:.1f} s")
    assert elapsed < 20, f"still open after {elapsed:.0f} s"
    assert received[:1] == b"\x07", f"no A-ABORT: {received!r}"  # PS3.8: abort on ARTIM/timeout
    wait_for(lambda: not any((node.data_dir / "spool" / ".incoming").iterdir()), timeout=30)


def test_associations_held_by_one_host_leave_room_for_others(node: NodeProcess) -> None:
    """16 associations from one host (max_associations 16), all idle: others still associate."""
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(16):
            try:
                held.append(raw_associate(node.port, calling="HOG"))
            except ConnectionError:
                refused += 1
        assert len(held) == 8 and refused == 8  # max_associations_per_host
        with EchoWatch(node.port) as watch:
            time.sleep(2)
        watch.check("16 idle associations from one host")
    finally:
        for sock in held:
            sock.close()
    rejected = wait_for(lambda: [a for a in _rows(node.database_url, Association)
                                 if a.reason == "association limit per host reached"], timeout=30)
    assert rejected and rejected[0].calling_ae_title == "HOG"


# -- 5. connections that never associate ------------------------------------------------------------

def test_half_open_connections_are_capped(node: NodeProcess) -> None:
    """300 connections that send nothing: few threads, little memory, good peers served."""
    pid = node.proc.pid  # type: ignore[union-attr]
    idle = _settle_rss(pid)
    threads_before = _status(pid, "Threads")
    _reset_peak(pid)
    socks = []
    try:
        with EchoWatch(node.port) as watch:
            for _ in range(300):
                socks.append(socket.create_connection(("127.0.0.1", node.port), timeout=10))
            time.sleep(1)
            threads = _status(pid, "Threads")
        peak = _status(pid, "VmHWM")
    finally:
        for sock in socks:
            sock.close()
    print(f"\n300 half-open: idle RSS {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
          f"threads {threads_before} -> {threads}")
    assert threads - threads_before <= 8 + 4  # max_pending_per_host, plus the echo's own
    assert peak <= 2 * idle
    watch.check("300 half-open connections")


def test_accept_backs_off_when_out_of_descriptors(tmp_path: Path) -> None:
    """Under a 256-descriptor limit, 300 connections: no busy loop, a few log lines, recovery."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_DICOM__MAX_PENDING_CONNECTIONS": "1000", "SPINE_NODE_DICOM__MAX_PENDING_PER_HOST": "1000",
           "SPINE_NODE_DICOM__ACSE_TIMEOUT_S": "5"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        pid = node.proc.pid  # type: ignore[union-attr]
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
        before = node.log().count("\n")
        socks = []
        try:
            for _ in range(300):
                socks.append(socket.create_connection(("127.0.0.1", node.port), timeout=10))
            time.sleep(3)
            cpu = sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
            time.sleep(3)
            cpu = sum(int(v) for v in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]) - cpu
        finally:
            for sock in socks:
                sock.close()
        log_text = node.log()
        lines = log_text.count("\n") - before
        accept_lines = log_text.count("accept failed")
        print(f"\nEMFILE: {lines} log lines ({accept_lines} from accept), {cpu} clock ticks of CPU in 3 s")
        # Once per 10 s at most (a spinning loop logged ~26,000 lines a second); the rest of
        # the log is other components meeting EMFILE, with their own retry pace.
        assert 1 <= accept_lines <= 2, log_text[-2000:]
        assert lines < 2000
        assert cpu < 150  # a spinning accept loop burns all 300 ticks of one core
        wait_for(lambda: _try_echo(node.port), timeout=30)


def _try_echo(port: int) -> bool:
    try:
        _good_echo(port)
    except (AssertionError, OSError, RuntimeError):
        return False
    return True


# -- 8. refused hosts ------------------------------------------------------------------------------

def test_refused_host_flood_is_counted_not_written_per_connection(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_DICOM__ALLOWED_HOSTS": f'["{GOOD_HOST}/32"]',
           "SPINE_NODE_DICOM__REFUSAL_AUDIT_INTERVAL_S": "2"}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        _good_echo(node.port)
        connected = 0
        with EchoWatch(node.port) as watch:
            for _ in range(3000):
                try:
                    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
                        connected += 1
                        sock.recv(1)
                except OSError:
                    pass
        watch.check("3000 refused connections")
        assert connected > 2900

        def audited() -> list[AuditEvent]:
            return [e for e in _rows(url, AuditEvent)
                    if e.kind == "association.rejected" and e.details.get("peer") == "127.0.0.1"]
        try:
            # (plus the connection NodeProcess makes to see that the port is open)
            events = wait_for(lambda: connected <= sum(e.details["connections"] for e in audited()) <= connected + 2
                              and audited(), timeout=30)
        except AssertionError:
            raise AssertionError(f"{sum(e.details['connections'] for e in audited())} audited, "
                                 f"{connected} refused") from None
        assert len(events) < 40, len(events)  # one row per host and interval, not 3000
        assert all(e.message == "host not allowed" for e in events)
