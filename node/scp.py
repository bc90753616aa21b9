"""The DICOM upper layer for receive: a lean C-STORE / C-ECHO SCP, one thread per association.

Why not pynetdicom's own SCP loop: it runs two threads per association that hand PDUs and
DIMSE messages to each other through queues polled every millisecond, decodes each PDU
into objects and every command set with pydicom. That cost about 6 ms of CPU and several
polling hand-offs per 0.5 MB CT instance (see bench/RESULTS.md), several times what DCMTK's
storescp needs. Here the association thread reads the socket itself, streams data set
fragments straight into the temporary file, and answers on the same thread.

pynetdicom still does the association negotiation: its PDU classes decode the
A-ASSOCIATE-RQ and encode the A-ASSOCIATE-AC, and ``negotiate_as_acceptor`` applies its
presentation context and role selection rules. What this module hand-codes is small and
fixed by PS3.8 (PDU and PDV headers, A-RELEASE, A-ABORT, A-ASSOCIATE-RJ) and PS3.7 (the
group 0000 command sets of C-STORE and C-ECHO, implicit VR little endian).

Every length a peer sends is a claim, never an allocation: PDUs and PDVs are streamed
through one fixed buffer per association; only a command set is collected (at most
``MAX_COMMAND_BYTES``) and only an A-ASSOCIATE-RQ (at most ``MAX_ASSOCIATE_RQ_BYTES``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from spine_node.node import __version__
from spine_node.node.config import Settings
from spine_node.node.header import STATUS_CANNOT_UNDERSTAND
from spine_node.node.uids import derive_uid, is_valid_uid

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = derive_uid("spine-node", "implementation class")
IMPLEMENTATION_VERSION_NAME = f"SPINE_NODE_{__version__}"[:16]
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# The largest P-DATA-TF PDU we say we receive. Data is streamed whatever the PDU size, so
# this bounds nothing in memory; large PDUs mean fewer headers for both sides to handle.
MAX_PDU_RECEIVED = 1 << 20
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
MAX_COMMAND_BYTES = 1 << 16
READ_BUFFER_BYTES = 1 << 20
# Until a connection has associated, its reader holds only this much (a flood of
# half-open connections costs little); the A-ASSOCIATE-RQ streams through it.
PENDING_BUFFER_BYTES = 16 << 10
# The beginning of each received file is also kept in memory: the header check reads it
# there, and maps the file only for data sets with elements beyond it.
HEAD_BYTES = 64 << 10

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_PDU = 0x01
A_ASSOCIATE_AC_PDU = 0x02
A_ASSOCIATE_RJ_PDU = 0x03
P_DATA_TF_PDU = 0x04
A_RELEASE_RQ_PDU = 0x05
A_RELEASE_RP_PDU = 0x06
A_ABORT_PDU = 0x07

# A-ABORT provider reasons (PS3.8 9.3.8)
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06

# DIMSE command fields (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
NO_DATA_SET = 0x0101
STATUS_SUCCESS = 0x0000
STATUS_UNRECOGNIZED_OPERATION = 0x0211


class PeerGone(Exception):
    """The connection closed, timed out or broke."""


class PeerTimedOut(PeerGone):
    """The peer did not finish a phase (association request, DIMSE message) in time."""


_UNSAFE = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """A peer-supplied string made safe for a log line or an audit row: control characters,
    escape sequences, backslashes and anything outside ASCII become hex escapes."""
    return _UNSAFE.sub(_escape, text)


def printable_clipped(text: str, limit: int) -> str:
    """:func:`printable`, at most ``limit`` characters, never ending inside an escape."""
    out, size = [], 0
    for character in text:
        piece = printable(character)
        if size + len(piece) > limit:
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


class ProtocolViolation(Exception):
    """The peer broke PS3.8: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = ABORT_UNEXPECTED_PDU) -> None:
        super().__init__(message)
        self.reason = reason


# -- encoding helpers -----------------------------------------------------------------

def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A group 0000 command set, implicit VR little endian, with its group length first."""
    body = b"".join(struct.pack("<HHL", 0x0000, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def decode_command(data: bytes) -> dict[int, bytes]:
    """Element number -> raw value of a command set (group 0000, implicit VR little endian)."""
    values: dict[int, bytes] = {}
    position, end = 0, len(data)
    while position < end:
        if position + 8 > end:
            raise ProtocolViolation("command set ends inside an element header", ABORT_INVALID_PARAMETER)
        group, element, length = struct.unpack_from("<HHL", data, position)
        position += 8
        if group != 0x0000 or length > end - position:
            raise ProtocolViolation("command set is not a group 0000 data set", ABORT_INVALID_PARAMETER)
        values[element] = data[position:position + length]
        position += length
    return values


def _us(values: dict[int, bytes], element: int) -> int | None:
    raw = values.get(element)
    return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None


def _uid_text(raw: bytes | None) -> str:
    """A UID from a command set, or '' when it is absent or not a valid UID."""
    if not raw:
        return ""
    text = raw.rstrip(b"\0 ").decode("ascii", "replace")
    return text if is_valid_uid(text) else ""


def _ui(uid: str) -> bytes:
    return _pad(uid.encode("ascii"), b"\0")


def response_command(command_field: int, message_id: int, status: int, sop_class: str = "",
                     sop_instance: str = "", comment: str = "") -> bytes:
    """A DIMSE response command set (C-STORE-RSP, C-ECHO-RSP, ...) with no data set."""
    elements: list[tuple[int, bytes]] = []
    if sop_class:
        elements.append((0x0002, _ui(sop_class)))
    elements += [(0x0100, struct.pack("<H", command_field)), (0x0120, struct.pack("<H", message_id)),
                 (0x0800, struct.pack("<H", NO_DATA_SET)), (0x0900, struct.pack("<H", status))]
    if comment and status != STATUS_SUCCESS:
        text = "".join(ch for ch in comment if " " <= ch < "\x7f")[:64]
        elements.append((0x0902, _pad(text.encode("ascii"), b" ")))
    if sop_instance:
        elements.append((0x1000, _ui(sop_instance)))
    return encode_command(elements)


def pdata_command_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU holding a whole command set (last fragment)."""
    return (struct.pack(">BBL", P_DATA_TF_PDU, 0, 6 + len(command))
            + struct.pack(">LBB", 2 + len(command), context_id, 0x03) + command)


def abort_pdu(source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", A_ABORT_PDU, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ_PDU, 0, 4, 0, result, source, diagnostic)


RELEASE_RP_PDU = struct.pack(">BBLL", A_RELEASE_RP_PDU, 0, 4, 0)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (explicit VR little endian)."""
    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHL", 0x0002, number, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value

    ae = "".join(ch for ch in source_ae if " " <= ch < "\x7f" and ch != "\\")[:16]
    body = b"".join([
        element(0x0001, b"OB", b"\x00\x01"),
        element(0x0002, b"UI", _ui(sop_class)),
        element(0x0003, b"UI", _ui(sop_instance)),
        element(0x0010, b"UI", _ui(transfer_syntax)),
        element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        element(0x0013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        element(0x0016, b"AE", _pad(ae.encode("ascii"), b" ")),
    ])
    return b"\0" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<L", len(body))) + body


# -- the incoming file -------------------------------------------------------------------

def make_temp_file(folder: Path) -> tuple[int, str]:
    """A new empty temporary file in ``folder``: (open descriptor, path)."""
    return tempfile.mkstemp(prefix="", suffix=".dcm", dir=folder)


def drop_temp_file(made: tuple[int, str]) -> None:
    fd, name = made
    with contextlib.suppress(OSError):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


class IncomingFile:
    """One received data set on its way into the spool: a temporary file on the spool volume.

    Bytes go to the file as they arrive, straight from the socket's read buffer; only the
    first ``HEAD_BYTES`` are also kept in memory, for the header check (which maps the file
    when it needs more: only the pages holding element headers are then read). A full
    disk (ENOSPC, EDQUOT) while writing empties the file and drops what follows, so the
    C-STORE can be answered 0xA700 once the data set has been read off the wire.
    """

    def __init__(self, folder: Path, meta: bytes, made: tuple[int, str] | None = None,
                 walk: Any = None, space: Any = None) -> None:
        # ``made``: a temporary file created ahead (see AssociationHandler._make_spare).
        # ``walk``: the header check (receive.HeaderWalk), begun once the head is complete.
        # ``space``: the free-space floor (diskspace.SpaceGuard): each write takes its bytes
        # first, and a write that would cross the floor is handled like a full disk.
        self.fd, self.name = made if made is not None else make_temp_file(folder)
        self.walk = walk
        self.space = space
        self.meta_length = len(meta)
        self.size = 0  # bytes written to the file
        self.out_of_space = False
        self._closed = False
        self.head = bytearray()  # the file's first HEAD_BYTES, for the header check
        # Placed into the spool by a hard link: the temporary name is removed after the answer.
        self.name_left = False
        self.write(meta)

    def write(self, data: memoryview | bytes) -> None:
        if self.out_of_space:
            return
        length = len(data)
        offset = self.size
        if self.space is not None and not self.space.take(length, offset):
            self.out_of_space = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            return
        head_done = False
        if len(self.head) < HEAD_BYTES:
            self.head += data[:HEAD_BYTES - len(self.head)]
            head_done = len(self.head) == HEAD_BYTES
        try:
            written = os.write(self.fd, data)
            if written < length:
                with memoryview(data) as view:
                    while written < length:
                        written += os.write(self.fd, view[written:])
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.out_of_space = True
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            return
        finally:
            if self.space is not None:
                self.space.landed(length, offset)
        self.size += length
        if head_done and self.walk is not None:
            # While the peer still sends the rest (typically the pixel data).
            self.walk.begin(self.head)

    def mapped(self) -> mmap.mmap:
        """The whole file, read-only, in memory (page cache): close it after use."""
        return mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)

    def sync(self) -> None:
        """Data (and the size needed to read it back) on disk before the answer goes out."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)

    def remove_name(self) -> None:
        """Remove the temporary name of a file now linked into the spool."""
        if self.name_left:
            self.name_left = False
            with contextlib.suppress(OSError):
                os.unlink(self.name)


# -- reading ----------------------------------------------------------------------------

class _Reader:
    """Reads a socket through one fixed buffer; never sizes anything from a peer's claim.

    Every read runs against the deadline of a whole phase, never a per-read timeout (which
    a peer sending one byte a second resets forever): a phase (the association request,
    one DIMSE message) must end within ``budget`` seconds of its start plus one second per
    ``min_rate`` bytes received. :meth:`idle` waits for a phase's first byte instead.
    """

    def __init__(self, sock: socket.socket, size: int = READ_BUFFER_BYTES) -> None:
        self.sock = sock
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = 0
        self.end = 0
        self.phase_start: float | None = None  # None: idle, waiting for the next phase
        self.idle_until = float("inf")
        self.budget = float("inf")
        self.min_rate = 1.0
        self.phase_bytes = 0

    def begin_phase(self, budget: float, min_rate: float, started: float | None = None) -> None:
        """A phase that began at ``started`` (monotonic; now by default)."""
        self.phase_start = time.monotonic() if started is None else started
        self.budget, self.min_rate, self.phase_bytes = budget, min_rate, 0

    def idle(self, timeout: float, budget: float, min_rate: float) -> None:
        """Wait up to ``timeout`` for a first byte; the phase it starts gets ``budget``."""
        if self.end > self.start:  # the peer already sent more: the phase runs from now
            self.begin_phase(budget, min_rate)
            return
        self.phase_start = None
        self.idle_until = time.monotonic() + timeout
        self.budget, self.min_rate, self.phase_bytes = budget, min_rate, 0

    def time_left(self) -> float:
        if self.phase_start is None:
            return self.idle_until - time.monotonic()
        return self.phase_start + self.budget + self.phase_bytes / self.min_rate - time.monotonic()

    def grow(self, size: int) -> None:
        """A larger buffer (after association), keeping what is unread."""
        if size > len(self.buffer):
            left = bytes(self.view[self.start:self.end])
            self.view.release()
            self.buffer = bytearray(size)
            self.buffer[:len(left)] = left
            self.view = memoryview(self.buffer)
            self.start, self.end = 0, len(left)

    def _recv(self) -> None:
        left = self.time_left()
        if left <= 0:
            raise PeerTimedOut("idle timeout" if self.phase_start is None else "phase deadline passed")
        try:
            self.sock.settimeout(left if left < 1e9 else None)
            count = self.sock.recv_into(self.view[self.end:])
        except TimeoutError as exc:
            raise PeerTimedOut("idle timeout" if self.phase_start is None else "phase deadline passed") from exc
        except (OSError, ssl.SSLError) as exc:
            raise PeerGone(type(exc).__name__) from exc
        if not count:
            raise PeerGone("connection closed")
        if self.phase_start is None:
            self.phase_start = time.monotonic()
        self.phase_bytes += count
        self.end += count

    def read(self, count: int) -> bytes:
        """``count`` bytes (at most the buffer size)."""
        if self.end - self.start < count:
            if len(self.buffer) - self.start < count:  # move what is left to the front
                left = self.end - self.start
                self.buffer[:left] = self.buffer[self.start:self.end]
                self.start, self.end = 0, left
            while self.end - self.start < count:
                self._recv()
        data = bytes(self.view[self.start:self.start + count])
        self.start += count
        return data

    def stream(self, count: int, sink: Callable[[memoryview], Any] | None) -> None:
        """Pass ``count`` bytes to ``sink`` piece by piece (``None`` drops them)."""
        while count > 0:
            if self.start == self.end:
                self.start = self.end = 0
                self._recv()
            take = min(count, self.end - self.start)
            if sink is not None:
                sink(self.view[self.start:self.start + take])
            self.start += take
            count -= take


# -- one association -------------------------------------------------------------------

@dataclass
class _Message:
    """The DIMSE message being received on an association."""

    context_id: int
    command: dict[int, bytes]
    incoming: IncomingFile | None = None  # a C-STORE's data set
    discard: bool = False  # a data set we read off the wire and drop
    # The request's Affected SOP Class / Instance UIDs ('' if absent or invalid), read once.
    sop_class: str = ""
    sop_instance: str = ""


@dataclass
class AssociationInfo:
    calling_ae_title: str
    called_ae_title: str
    peer_host: str
    peer_port: int
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract, transfer)


class StoreHandler(Protocol):
    """What the wire side calls on the node side (``receive.Receiver``), owned here so
    that scp never imports receive. ``stats`` is the handler's opaque per-association
    token (from :meth:`association_accepted`); ``header_walk`` gives the incremental
    header check an :class:`IncomingFile` begins once the head is complete."""

    settings: Settings
    incoming_dir: Path

    def association_accepted(self, peer: AssociationInfo) -> Any: ...

    def association_rejected(self, peer: AssociationInfo, reason: str) -> None: ...

    def association_ended(self, stats: Any, state: str, reason: str) -> None: ...

    def record_refused_host(self, host: str, port: int, reason: str = "host not allowed") -> None: ...

    def header_walk(self, meta_length: int, transfer_syntax: str) -> Any: ...

    def store(self, stats: Any, incoming: IncomingFile, request_sop_class: str,
              request_sop_instance: str, transfer_syntax: str, calling_ae_title: str) -> tuple[int, str]: ...

    def refuse(self, stats: Any, status: int, reason: str, sop_instance: str) -> tuple[int, str]: ...


def supported_contexts(storage_classes: list[str], transfer_syntaxes: list[str]) -> list[PresentationContext]:
    """What the node accepts: Verification, and every storage class in ``transfer_syntaxes``."""
    contexts = []
    verification = PresentationContext()
    verification.abstract_syntax = UID(VERIFICATION_SOP_CLASS)
    verification.transfer_syntax = [UID("1.2.840.10008.1.2"), UID("1.2.840.10008.1.2.1")]
    contexts.append(verification)
    for uid in storage_classes:
        context = PresentationContext()
        context.abstract_syntax = UID(uid)
        context.transfer_syntax = [UID(ts) for ts in transfer_syntaxes]
        contexts.append(context)
    return contexts


class AssociationHandler:
    """Runs one association from the A-ASSOCIATE-RQ to its end on the calling thread."""

    def __init__(self, server: DicomServer, sock: socket.socket, address: tuple[Any, ...],
                 connected_at: float | None = None) -> None:
        self.server = server
        self.receiver = server.receiver
        self.sock = sock
        self.host = str(address[0])
        self.port = int(address[1]) if len(address) > 1 else 0
        self.connected_at = time.monotonic() if connected_at is None else connected_at
        # Small until associated: see PENDING_BUFFER_BYTES.
        self.reader = _Reader(sock, PENDING_BUFFER_BYTES)
        self.associated = False
        self.pending = False  # counted among the server's connections not yet associated
        self.message: _Message | None = None
        self.command_fragments = bytearray()
        self.info: AssociationInfo | None = None
        self.stats: Any = None
        # The temporary file for the next C-STORE, made while the peer prepares it.
        self.spare: tuple[int, str] | None = None

    # -- association set-up ----------------------------------------------------------
    def run(self) -> None:
        cfg = self.receiver.settings.dicom
        state, reason = "aborted", "connection closed without release"
        try:
            # The whole A-ASSOCIATE-RQ within acse_timeout_s of connecting (TLS handshake included).
            self.reader.begin_phase(cfg.acse_timeout_s, cfg.min_transfer_rate, self.connected_at)
            if not self._associate():
                return
            state, reason = self._serve()
        except PeerTimedOut as exc:
            self._send_quietly(abort_pdu(0x02, 0x00))
            reason = "timed out"
            if self.associated:
                log.warning("aborting association from %s: timed out (%s)", self.host, exc)
            else:  # counted and logged per host and interval: a flood of these is one line
                self.receiver.record_refused_host(self.host, self.port, "association request timed out")
        except PeerGone:
            pass
        except ProtocolViolation as exc:
            self._send_quietly(abort_pdu(0x02, exc.reason))
            reason = "peer or network aborted"
            if self.info is None:  # no association request at all (HTTP, TLS on a plain port, ...)
                self.receiver.record_refused_host(self.host, self.port, "no valid A-ASSOCIATE-RQ")
            else:
                log.warning("aborting association from %s: %s", self.host, printable(str(exc)))
        except Exception:  # noqa: BLE001 - one broken association never takes the listener down
            log.exception("association from %s failed", self.host)
            self._send_quietly(abort_pdu(0x02, 0x00))
        finally:
            self.server.leave_pending(self)
            self._discard_partial()
            self._drop_spare()
            if self.stats is not None:
                self.receiver.association_ended(self.stats, state, reason)
            with contextlib.suppress(OSError):
                self.sock.close()

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.sock.settimeout(5)  # a peer that reads nothing does not hold the thread
            self.sock.sendall(data)

    def _associate(self) -> bool:
        header = self.reader.read(6)
        pdu_type, length = header[0], struct.unpack(">L", header[2:6])[0]
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise ProtocolViolation(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                                    ABORT_UNRECOGNIZED_PDU if pdu_type > 7 else ABORT_UNEXPECTED_PDU)
        if length > MAX_ASSOCIATE_RQ_BYTES or length < 68:
            raise ProtocolViolation(f"A-ASSOCIATE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
        body = bytearray()
        self.reader.stream(length, body.extend)
        # The AE titles from the raw bytes (PS3.8 9.3.2), as they came: a title the decoder
        # chokes on is still audited, escaped (printable), never raw.
        called_raw = bytes(body[4:20]).decode("latin-1").strip(" \0")
        calling_raw = bytes(body[20:36]).decode("latin-1").strip(" \0")
        self.info = AssociationInfo(printable_clipped(calling_raw, 16), printable_clipped(called_raw, 16),
                                    self.host, self.port)
        # PS3.5 AE: the default repertoire without control characters or backslash. Refused
        # here, before the decoder (whose own log would echo them raw).
        for raw, why, diagnostic in ((calling_raw, "calling AE title not valid", 0x03),
                                     (called_raw, "called AE title not valid", 0x07)):
            if raw != printable(raw) or not raw.strip():
                self._send_quietly(reject_pdu(0x01, 0x01, diagnostic))
                self.receiver.association_rejected(self.info, why)
                return False
        try:
            pdu = A_ASSOCIATE_RQ()
            pdu.decode(header + bytes(body))
            request = pdu.to_primitive()
        except Exception as exc:  # noqa: BLE001 - hostile bytes break the decoder in any way
            self.receiver.association_rejected(self.info, f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})")
            raise ProtocolViolation(f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})",
                                    ABORT_INVALID_PARAMETER) from None
        rejection = self._rejection(pdu, request, calling_raw, called_raw)
        if rejection is not None:
            (result, source, diagnostic), why = rejection
            self._send_quietly(reject_pdu(result, source, diagnostic))
            self.receiver.association_rejected(self.info, why)
            return False
        limit = self.server.claim_slot(self.host)
        if limit:
            self._send_quietly(reject_pdu(0x02, 0x03, 0x02))  # transient, local limit exceeded
            self.receiver.association_rejected(self.info, limit)
            return False
        self._slot = True
        try:
            self._accept(request)
        except BaseException:
            self.server.release_slot(self.host)
            self._slot = False
            raise
        self.associated = True
        self.server.leave_pending(self)
        self.reader.grow(READ_BUFFER_BYTES)
        return True

    def _rejection(self, pdu: A_ASSOCIATE_RQ, request: A_ASSOCIATE, calling: str,
                   called: str) -> tuple[tuple[int, int, int], str] | None:
        cfg = self.receiver.settings.dicom
        if not (pdu.protocol_version & 0x0001):
            return (0x01, 0x02, 0x02), "protocol version not supported"
        if str(request.application_context_name or "") != APPLICATION_CONTEXT_NAME:
            return (0x01, 0x01, 0x02), "application context not supported"
        if cfg.check_called_ae_title and called != cfg.ae_title:
            return (0x01, 0x01, 0x07), "called AE title not recognized"
        if not cfg.calling_ae_allowed(calling):
            return (0x01, 0x01, 0x03), "calling AE title not allowed"
        ids = [context.context_id for context in request.presentation_context_definition_list]
        if len(ids) != len(set(ids)):
            return (0x01, 0x01, 0x01), "duplicate presentation context IDs"
        return None

    def _accept(self, request: A_ASSOCIATE) -> None:
        assert self.info is not None
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in request.user_information
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None}
        results, role_replies = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.server.contexts, roles)
        for context in results:
            if context.result == 0x00 and context.context_id is not None:
                self.info.contexts[int(context.context_id)] = (str(context.abstract_syntax),
                                                               str(context.transfer_syntax[0]))
        primitive = A_ASSOCIATE()
        primitive.application_context_name = UID(APPLICATION_CONTEXT_NAME)
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result = 0x00
        primitive.result_source = 0x01
        primitive.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = MAX_PDU_RECEIVED
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        primitive.user_information = [maximum, implementation, version, *role_replies]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(primitive)
        try:
            self.sock.sendall(pdu.encode())
        except (OSError, ssl.SSLError) as exc:
            raise PeerGone(type(exc).__name__) from exc
        self.stats = self.receiver.association_accepted(self.info)

    # -- the data phase ----------------------------------------------------------------
    def _serve(self) -> tuple[str, str]:
        cfg = self.receiver.settings.dicom
        try:
            while True:
                # Between messages the peer may think for network_timeout_s; a message (and
                # an A-RELEASE-RQ) must then arrive whole by its deadline (see _Reader).
                if self.message is None and not self.command_fragments:
                    self.reader.idle(cfg.network_timeout_s, cfg.dimse_timeout_s, cfg.min_transfer_rate)
                header = self.reader.read(6)
                pdu_type, length = header[0], struct.unpack(">L", header[2:6])[0]
                if pdu_type == P_DATA_TF_PDU:
                    self._p_data(length)
                elif pdu_type == A_RELEASE_RQ_PDU:
                    self.reader.stream(min(length, 4), None)
                    self._drop_spare()  # before the peer hears the association is over
                    self.sock.settimeout(cfg.dimse_timeout_s)
                    self.sock.sendall(RELEASE_RP_PDU)
                    return "released", ""
                elif pdu_type == A_ABORT_PDU:
                    return "aborted", "peer or network aborted"
                else:
                    raise ProtocolViolation(f"unexpected PDU type 0x{pdu_type:02X}",
                                            ABORT_UNRECOGNIZED_PDU if pdu_type > 7 else ABORT_UNEXPECTED_PDU)
        finally:
            if getattr(self, "_slot", False):
                self.server.release_slot(self.host)
                self._slot = False

    def _p_data(self, length: int) -> None:
        assert self.info is not None
        left = length
        while left > 0:
            if left < 6:
                raise ProtocolViolation("P-DATA-TF ends inside a PDV header", ABORT_INVALID_PARAMETER)
            item = self.reader.read(6)
            item_length, context_id, control = struct.unpack(">LBB", item)
            if item_length < 2 or item_length + 4 > left:
                raise ProtocolViolation("PDV length does not fit its PDU", ABORT_INVALID_PARAMETER)
            left -= 4 + item_length
            value_length = item_length - 2
            if context_id not in self.info.contexts:
                raise ProtocolViolation(f"PDV on presentation context {context_id}, which was not accepted",
                                        ABORT_INVALID_PARAMETER)
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, value_length, last)
            else:
                self._data_fragment(context_id, value_length, last)

    def _command_fragment(self, context_id: int, value_length: int, last: bool) -> None:
        if self.message is not None:
            raise ProtocolViolation("command fragment while a data set was expected")
        if len(self.command_fragments) + value_length > MAX_COMMAND_BYTES:
            raise ProtocolViolation("command set larger than any DIMSE command", ABORT_INVALID_PARAMETER)
        self.reader.stream(value_length, self.command_fragments.extend)
        if last:
            command = decode_command(bytes(self.command_fragments))
            self.command_fragments.clear()
            self._command(context_id, command)

    def _data_fragment(self, context_id: int, value_length: int, last: bool) -> None:
        message = self.message
        if message is None or self.command_fragments:
            raise ProtocolViolation("data set fragment without a command")
        if context_id != message.context_id:
            raise ProtocolViolation("data set on another presentation context than its command",
                                    ABORT_INVALID_PARAMETER)
        if message.incoming is not None:
            self.reader.stream(value_length, message.incoming.write)
        else:
            self.reader.stream(value_length, None)
        if last:
            self.message = None
            if message.incoming is not None:
                self._store(message)
            else:
                self._answer_unsupported(message)

    def _command(self, context_id: int, command: dict[int, bytes]) -> None:
        assert self.info is not None
        field_ = _us(command, 0x0100)
        has_data = _us(command, 0x0800) != NO_DATA_SET
        message = _Message(context_id, command)
        if field_ == C_ECHO_RQ and not has_data:
            self._respond(context_id, 0x8030, command, STATUS_SUCCESS)
        elif field_ == C_STORE_RQ:
            if not has_data:
                status, reason = self.receiver.refuse(self.stats, STATUS_CANNOT_UNDERSTAND,
                                                      "C-STORE request without a data set",
                                                      _uid_text(command.get(0x1000)))
                self._respond(context_id, 0x8001, command, status, reason)
                return
            transfer_syntax = self.info.contexts[context_id][1]
            message.sop_class = _uid_text(command.get(0x0002))
            message.sop_instance = _uid_text(command.get(0x1000))
            meta = file_meta(message.sop_class, message.sop_instance, transfer_syntax, self.info.calling_ae_title)
            spare, self.spare = self.spare, None
            message.incoming = IncomingFile(self.receiver.incoming_dir, meta, spare,
                                            self.receiver.header_walk(len(meta), transfer_syntax),
                                            getattr(self.receiver, "space", None))
            self.message = message
        elif has_data:
            message.discard = True
            self.message = message
        else:
            self._answer_unsupported(message)

    def _store(self, message: _Message) -> None:
        assert self.info is not None and message.incoming is not None
        command = message.command
        status, reason = self.receiver.store(
            self.stats, message.incoming, message.sop_class, message.sop_instance,
            self.info.contexts[message.context_id][1], self.info.calling_ae_title)
        try:
            self._respond(message.context_id, 0x8001, command, status, reason,
                          uids=(message.sop_class, message.sop_instance))
        finally:
            # File-system work that the answer need not wait for.
            message.incoming.remove_name()
        self._make_spare()

    def _drop_spare(self) -> None:
        if self.spare is not None:
            drop_temp_file(self.spare)
            self.spare = None

    def _make_spare(self) -> None:
        """Create the next C-STORE's temporary file now, while the peer reads its next file.

        Creating a file is the costliest file-system step per instance (an inode
        allocation; much more on some volumes); done here it leaves the path from a
        request's arrival to its answer. A failure here is left for that request to meet.
        """
        if self.spare is None:
            with contextlib.suppress(OSError):
                self.spare = make_temp_file(self.receiver.incoming_dir)

    def _answer_unsupported(self, message: _Message) -> None:
        field_ = _us(message.command, 0x0100) or 0
        log.warning("unsupported DIMSE command 0x%04X from %s", field_, self.host)
        self._respond(message.context_id, (field_ | 0x8000) & 0xFFFF, message.command,
                      STATUS_UNRECOGNIZED_OPERATION, "operation not supported by this node")

    def _respond(self, context_id: int, command_field: int, request: dict[int, bytes], status: int,
                 comment: str = "", uids: tuple[str, str] | None = None) -> None:
        """Answer ``request``; ``uids``: its SOP Class and Instance UIDs where already read."""
        message_id = _us(request, 0x0110) or 0
        sop_class, sop_instance = uids or (_uid_text(request.get(0x0002)), _uid_text(request.get(0x1000)))
        response = response_command(command_field, message_id, status, sop_class, sop_instance, comment)
        try:
            # A whole answer within dimse_timeout_s, whatever the read deadline had left.
            self.sock.settimeout(self.receiver.settings.dicom.dimse_timeout_s)
            self.sock.sendall(pdata_command_pdu(context_id, response))
        except (OSError, ssl.SSLError) as exc:
            raise PeerGone(type(exc).__name__) from exc

    def _discard_partial(self) -> None:
        """Delete the temp file of a data set cut off by an abort or a dropped connection."""
        message, self.message = self.message, None
        if message is not None and message.incoming is not None:
            message.incoming.discard()
            log.info("discarded a partial data set from an interrupted association")


# -- the listener ------------------------------------------------------------------------

class DicomServer:
    """Listens on one TCP port; runs each accepted association on its own thread.

    ``SO_REUSEPORT`` is set, so several receive processes can share the port
    (``serve --processes``): the kernel spreads new connections over them.
    """

    def __init__(self, receiver: StoreHandler, host: str, port: int, contexts: list[PresentationContext],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.receiver = receiver
        self.contexts = contexts
        self.ssl_context = ssl_context
        cfg = receiver.settings.dicom
        self.max_associations = cfg.max_associations
        self._active = 0
        self._active_by_host: dict[str, int] = {}
        # Connections not yet associated, by host: capped before a thread is started.
        self._pending = 0
        self._pending_by_host: dict[str, int] = {}
        self._lock = threading.Lock()
        self._accept_errors = 0
        self._accept_logged_at = -1e9
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.settimeout(0.5)
        self.server_address = self.socket.getsockname()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-scp", daemon=True)
        self._thread.start()

    def claim_slot(self, host: str = "") -> str:
        """Take an association slot for ``host``: '' on success, else why not."""
        per_host = self.receiver.settings.dicom.max_associations_per_host
        with self._lock:
            if self._active >= self.max_associations:
                return "association limit reached"
            if self._active_by_host.get(host, 0) >= per_host:
                return "association limit per host reached"
            self._active += 1
            self._active_by_host[host] = self._active_by_host.get(host, 0) + 1
            return ""

    def release_slot(self, host: str = "") -> None:
        with self._lock:
            self._active -= 1
            left = self._active_by_host.get(host, 0) - 1
            if left > 0:
                self._active_by_host[host] = left
            else:
                self._active_by_host.pop(host, None)

    def _enter_pending(self, host: str) -> str:
        """Count a new connection as pending: '' when it may go on, else why not."""
        cfg = self.receiver.settings.dicom
        with self._lock:
            if self._pending >= cfg.max_pending_connections:
                return "too many connections not yet associated"
            if self._pending_by_host.get(host, 0) >= cfg.max_pending_per_host:
                return "too many connections not yet associated from this host"
            self._pending += 1
            self._pending_by_host[host] = self._pending_by_host.get(host, 0) + 1
            return ""

    def leave_pending(self, handler: AssociationHandler) -> None:
        """The connection associated or ended (safe to call more than once)."""
        with self._lock:
            if handler.pending:
                handler.pending = False
                self._release_pending_host(handler.host)

    def _release_pending_host(self, host: str) -> None:
        self._pending -= 1
        left = self._pending_by_host.get(host, 0) - 1
        if left > 0:
            self._pending_by_host[host] = left
        else:
            self._pending_by_host.pop(host, None)

    def _accept_failed(self, exc: OSError) -> None:
        """Back off on accept errors (EMFILE: out of descriptors) and log at most every 10 s."""
        self._accept_errors += 1
        now = time.monotonic()
        if now - self._accept_logged_at >= 10:
            log.warning("accept failed %d time(s) in the last interval (latest: %s); backing off",
                        self._accept_errors, errno.errorcode.get(exc.errno or 0, type(exc).__name__))
            self._accept_logged_at = now
            self._accept_errors = 0
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self._stopping.wait(0.1)  # until a descriptor is free; the backlog keeps the rest
        else:
            self._stopping.wait(0.01)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self.socket.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                self._accept_failed(exc)
                continue
            connected_at = time.monotonic()
            host = str(address[0])
            if not self.receiver.settings.dicom.host_allowed(host):
                with contextlib.suppress(OSError):
                    conn.close()
                self.receiver.record_refused_host(host, int(address[1]))
                continue
            why = self._enter_pending(host)
            if why:
                with contextlib.suppress(OSError):
                    conn.close()
                self.receiver.record_refused_host(host, int(address[1]), why)
                continue
            try:
                threading.Thread(target=self._run_association, args=(conn, address, connected_at),
                                 name=f"assoc-{host}:{address[1]}", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: like EMFILE
                with self._lock:
                    self._release_pending_host(host)
                with contextlib.suppress(OSError):
                    conn.close()
                self._accept_failed(OSError(errno.EAGAIN, str(exc)))

    def _run_association(self, conn: socket.socket, address: tuple[Any, ...], connected_at: float) -> None:
        handler: AssociationHandler | None = None
        try:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                # The handshake is one timed operation: it ends by the association deadline.
                conn.settimeout(self.receiver.settings.dicom.acse_timeout_s)
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS handshake with %s failed: %s", address[0], type(exc).__name__)
                    with contextlib.suppress(OSError):
                        conn.close()
                    return
            handler = AssociationHandler(self, conn, address, connected_at)
            handler.pending = True  # counted at accept; given back by leave_pending
            handler.run()
        finally:
            if handler is None:  # never became a handler: give its pending place back
                with self._lock:
                    self._release_pending_host(str(address[0]))

    def shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self.socket.close()
