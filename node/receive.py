"""Receive: what the C-STORE / C-ECHO SCP does with what arrives.

Fast and dumb (DESIGN decision 2): :mod:`spine_node.node.scp` streams each data set into a temporary
file on the spool volume; :meth:`Receiver.store` walks the element headers once (never
decoding pixel data) to check the structure and pick out the identifying UIDs, validates
them, syncs the file to disk and links it into ``spool/<study>/<series>/<sop>.dcm``, and
only then is the C-STORE answered. Counts are kept in memory and flushed to SQL in batches
by :class:`spine_node.node.assemble.SeriesTracker`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy.orm import Session

from spine_node.node import metrics
from spine_node.node.assemble import SeriesTracker
from spine_node.node.audit import Association, Database, record_event, utcnow
from spine_node.node.bookkeeping import Backlog
from spine_node.node.config import Settings, TLSSettings
from spine_node.node.deflated import DeflateMalformed, inspect_deflated
from spine_node.node.diskspace import SpaceGuard
from spine_node.node.errors import OutOfSpaceError, SpoolError
from spine_node.node.header import (
    HEADER_TAG_NUMBERS,
    HEADER_TAGS,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
    STATUS_INSTANCE_UID_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SPOOL_WRITE_FAILED,
    STATUS_SUCCESS,
    InstanceInfo,
    StoreRejected,
    clean_text,
    instance_info,
    read_header,
)
from spine_node.node.scp import AssociationInfo, DicomServer, IncomingFile, supported_contexts
from spine_node.node.spool import Spool
from spine_node.node.uids import is_valid_uid

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]

def inspect_dataset(data: Any, start: int, transfer_syntax: str,
                    size: int | None = None) -> tuple[bool, InstanceInfo] | None:
    """Structure check and identifying header of a received file held in memory, in one walk.

    ``data`` is the whole file (preamble, meta, data set), the data set starting at
    ``start``; or only its beginning, with ``size`` the length of the whole file: then
    :class:`PastHead` is raised if the walk needs a byte beyond it (for a typical image the
    header and the pixel data element's own header are in the first few KB, and its value
    runs to the end of the file, so nothing past the beginning is needed). Gives what
    :func:`check_structure` and :func:`read_header` give together, without pydicom;
    ``None`` where only those can judge (deflated or big-endian syntaxes). Raises
    :class:`StoreRejected` like they do.
    """
    return HeaderWalk(start, transfer_syntax).finish(data, len(data) if size is None else size)


class HeaderWalk:
    """The one-walk header check of a file being received, begun before its end arrives.

    :meth:`begin` walks the top-level elements of the file's first bytes while the rest is
    still on its way (for an image: every header element, then past the pixel data to the
    end it claims); :meth:`finish` checks that against the file's real length and walks
    whatever the beginning did not cover. Any doubt in :meth:`begin` (an element it cannot
    read there) leaves the whole walk to :meth:`finish`, so the verdict is always the one
    a single walk over the whole file gives (``tests/test_fuzz.py``).
    """

    def __init__(self, start: int, transfer_syntax: str) -> None:
        syntax = UID(transfer_syntax)
        self.start = start
        self.walkable = syntax.is_little_endian and syntax != DeflatedExplicitVRLittleEndian
        self.implicit = syntax.is_implicit_VR
        self._walker: _StructureWalker | None = None
        self._tags: set[tuple[int, int]] = set()

    def begin(self, head: Any) -> None:
        """Walk the top-level elements whose headers lie wholly in ``head`` (the file's start)."""
        if not self.walkable or head[self.start:self.start + 2] == b"\x02\x00":
            return
        walker = _StructureWalker(head, self.start, _UNBOUNDED)
        try:
            tags = walker.dataset(self.implicit, 0, in_item=False, limit=len(head))
        except (_Malformed, ValueError, struct.error):
            return  # finish walks it all again and says what is wrong
        self._walker, self._tags = walker, tags

    def finish(self, data: Any, size: int,
               mapped: Callable[[], AbstractContextManager[Any]] | None = None) -> tuple[bool, InstanceInfo] | None:
        """Complete the check: ``data`` is the file or its first bytes, ``size`` its length,
        ``mapped`` opens the whole file when the beginning is not enough (else
        :class:`PastHead` is raised). ``None`` where only pydicom can judge."""
        if not self.walkable:
            return None
        try:
            return self._finish(data, size)
        except PastHead:
            if mapped is None:
                raise
            self._walker = None  # start over on the whole file
            with mapped() as whole:
                return self._finish(whole, size)

    def _finish(self, data: Any, size: int) -> tuple[bool, InstanceInfo]:
        partial = size > len(data)
        walker = self._walker
        try:
            if walker is not None:
                walker.data, walker.end = data, size
                if walker.pos > size:
                    raise _Malformed(f"an element claims more bytes than the data set has ({size})")
                tags = self._tags | walker.dataset(self.implicit, 0, in_item=False)
            else:
                if data[self.start:self.start + 2] == b"\x02\x00":
                    raise _Malformed("data set carries File Meta Information (group 0002) elements")
                walker = _StructureWalker(data, self.start, size)
                tags = walker.dataset(self.implicit, 0, in_item=False)
        except _Malformed as exc:
            raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"malformed data set: {exc}") from None
        except (ValueError, struct.error) as exc:
            if partial:  # a read past the part in memory
                raise PastHead from None
            raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from None
        values = dict.fromkeys(HEADER_TAGS, "")
        for tag, (position, length) in walker.captured.items():
            if position + length > len(data):
                raise PastHead
            raw = bytes(data[position:position + length])
            values[HEADER_TAG_NUMBERS[tag]] = clean_text(raw.decode("latin-1"))  # as pydicom reads CS and UI values
        return bool(tags & _PIXEL_TAGS), instance_info(values)


class PastHead(Exception):
    """The header walk needs more of the file than the part held in memory."""


# -- structure check --------------------------------------------------------------------
# Receive never decodes pixel data, but it does walk the element headers of the data set
# (a few reads and seeks per instance) so that a truncated or corrupt stream, an element
# whose length runs past the end of the data, or File Meta elements smuggled into the
# data set are refused with a status instead of being filed for a pipeline to trip on.

_LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_END = (0xFFFE, 0xE00D)
_SEQUENCE_END = (0xFFFE, 0xE0DD)
_PIXEL_TAGS = frozenset({(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)})
_MAX_NESTING = 32
_UNBOUNDED = 1 << 62  # the end while the file's length is not known yet (HeaderWalk.begin)


class _Malformed(Exception):
    """The data set encoding is broken; the message says where (no values)."""


class _StructureWalker:
    """Walks element headers (tag, VR, length) of a little-endian data set in memory."""

    def __init__(self, data: Any, start: int, end: int | None = None) -> None:
        self.data = data  # bytes or an mmap of the file, or its beginning (``end``: its length)
        self.pos = start
        self.end = len(data) if end is None else end
        # (position, length) of the top-level identifying elements (HEADER_TAG_NUMBERS).
        self.captured: dict[tuple[int, int], tuple[int, int]] = {}

    def _unpack(self, fmt: str, size: int) -> tuple[Any, ...]:
        if self.pos + size > self.end:
            raise _Malformed(f"data set ends inside an element header at byte {self.pos}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def _skip(self, length: int, what: str) -> None:
        if length > self.end - self.pos:
            raise _Malformed(f"{what} claims {length} bytes at byte {self.pos} "
                             f"but only {self.end - self.pos} remain")
        self.pos += length

    def _item_header(self) -> tuple[tuple[int, int], int]:
        group, element, length = self._unpack("<HHL", 8)
        return (group, element), length

    def dataset(self, implicit: bool, depth: int, in_item: bool, limit: int | None = None) -> set[tuple[int, int]]:
        """Walk a data set to its end (or item delimiter); return its top-level tags.

        ``limit``: stop before the first element whose header does not lie wholly below
        it (for a walk over the beginning of a file; ``self.pos`` says where it stopped).
        """
        if depth > _MAX_NESTING:
            raise _Malformed(f"sequences nested deeper than {_MAX_NESTING} levels")
        tags: set[tuple[int, int]] = set()
        data, end, unpack_from = self.data, self.end, struct.unpack_from
        stop = end if limit is None else min(end, limit - 11)
        # The element header is parsed inline: this loop runs for every element received.
        while self.pos < stop:
            pos = self.pos
            if pos + 8 > end:
                raise _Malformed(f"data set ends inside an element header at byte {pos}")
            group, element, vr = unpack_from("<HH2s", data, pos)
            if implicit or group == 0xFFFE:
                vr = b""
                length = unpack_from("<L", data, pos + 4)[0]
                pos += 8
            elif vr in _LONG_LENGTH_VRS:
                if pos + 12 > end:
                    raise _Malformed(f"data set ends inside an element header at byte {pos}")
                length = unpack_from("<L", data, pos + 8)[0]
                pos += 12
            elif vr.isalpha() and vr.isupper():
                length = unpack_from("<H", data, pos + 6)[0]
                pos += 8
            else:
                raise _Malformed(f"element ({group:04X},{element:04X}) has no valid VR")
            self.pos = pos
            tag = (group, element)
            if tag == _ITEM_END and in_item:
                return tags
            if group == 0xFFFE:
                raise _Malformed(f"unexpected delimiter ({group:04X},{element:04X})")
            tags.add(tag)
            if length != _UNDEFINED:
                if length > end - pos:
                    raise _Malformed(f"element ({group:04X},{element:04X}) claims {length} bytes at byte "
                                     f"{pos} but only {end - pos} remain")
                if depth == 0 and tag in HEADER_TAG_NUMBERS:
                    self.captured[tag] = (pos, length)
                self.pos = pos + length
            elif tag in _PIXEL_TAGS and vr in (b"OB", b"OW"):
                self._fragments()
            elif implicit or vr in (b"SQ", b"UN"):
                # An undefined-length UN is a sequence encoded as implicit VR (PS3.5 6.2.2).
                self._sequence(implicit or vr == b"UN", depth)
            else:
                raise _Malformed(f"element ({group:04X},{element:04X}) VR {vr.decode()} cannot have "
                                 "undefined length")
        if in_item:
            raise _Malformed("data set ends inside a sequence item")
        return tags

    def _sequence(self, implicit: bool, depth: int) -> None:
        while True:
            tag, length = self._item_header()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise _Malformed(f"expected a sequence item, found ({tag[0]:04X},{tag[1]:04X})")
            if length == _UNDEFINED:
                self.dataset(implicit, depth + 1, in_item=True)
            else:
                self._skip(length, "sequence item")

    def _fragments(self) -> None:
        while True:
            tag, length = self._item_header()
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise _Malformed("encapsulated pixel data holds something other than fragments")
            self._skip(length, "pixel data fragment")


def check_structure(path: Path, transfer_syntax: str) -> bool | None:
    """Check the encoding of the data set in a received file (never decoding pixel data).

    Returns whether the data set has a top-level pixel data element, or ``None`` where
    the structure cannot be walked without inflating it (deflated syntax). Raises
    :class:`StoreRejected` (0xC210) for a broken encoding.
    """
    syntax = UID(transfer_syntax)
    if not syntax.is_little_endian:
        return None
    try:
        with path.open("rb") as fp:
            if os.fstat(fp.fileno()).st_size < 144:
                raise _Malformed("file too short for a preamble and file meta")
            # Mapped, not read: only the pages holding element headers are touched.
            with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if data[128:132] != b"DICM":
                    raise _Malformed("no DICM prefix")
                # File Meta: (0002,0000) UL group length comes first, explicit VR.
                if data[132:138] != b"\x02\x00\x00\x00UL":
                    raise _Malformed("file meta has no group length")
                start = 144 + struct.unpack_from("<L", data, 140)[0]
                if syntax == DeflatedExplicitVRLittleEndian:
                    return inspect_deflated(_pread(fp.fileno()), start, len(data))[0]
                if data[start:start + 2] == b"\x02\x00":
                    raise _Malformed("data set carries File Meta Information (group 0002) elements")
                tags = _StructureWalker(data, start).dataset(syntax.is_implicit_VR, 0, in_item=False)
    except (_Malformed, DeflateMalformed) as exc:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"malformed data set: {exc}") from None
    except (OSError, ValueError, struct.error) as exc:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from None
    return bool(tags & _PIXEL_TAGS)


def _pread(fd: int) -> Callable[[int, int], bytes]:
    """Reads of an open file by offset: no file position shared, nothing mapped."""
    return lambda offset, count: os.pread(fd, count, offset)


def needs_pixel_data(sop_class_uid: str) -> bool:
    """True for the image storage SOP classes, whose IODs require Pixel Data."""
    return "Image Storage" in UID(sop_class_uid).name


@dataclass
class _AssocStats:
    row_id: int | None
    received: int = 0
    failed: int = 0
    bytes: int = 0


def make_ssl_context(tls: TLSSettings, server_side: bool) -> ssl.SSLContext:
    """An SSL context for DICOM TLS from configured PEM files."""
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cafile=str(tls.ca_file) if tls.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if server_side:
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    else:
        # DICOM peers are addressed by IP in most sites; trust comes from the CA file.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED if tls.ca_file else ssl.CERT_NONE
    return context


def probe_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A client context for probing the node's own TLS port (``spine-node status``).

    It presents the node's own certificate (accepted where the site CA in ``ca_file``
    signed it) and does not verify the listener: it checks liveness, it sends no data.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


class Receiver:
    """The SCP's node side: the spool, the series tracker and the audit rows.

    The wire protocol lives in :mod:`spine_node.node.scp`; it calls :meth:`store` for each received
    data set and the ``association_*`` methods as associations come and go.
    """

    def __init__(self, settings: Settings, db: Database, tracker: SeriesTracker | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = Spool(settings.storage.spool, settings.storage.min_free_mb << 20)
        self.tracker = tracker or SeriesTracker(db)
        # Association rows and refusal events: written behind, never on an association
        # thread (a frozen database would stall C-ECHO and C-STORE answers).
        self.backlog = Backlog(db)
        self.incoming_dir = self.spool.root / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        # The free-space floor, held per write of every incoming data set.
        self.space = SpaceGuard(self.spool.root, self.spool.min_free_bytes)
        self._audit_warned_at = -1e9
        self.server: DicomServer | None = None
        # Refused connections, (host, reason) -> (count, last port): written by a flusher
        # thread, never by the accept loop (a flood of them must not slow accepting).
        self._refusals: dict[tuple[str, str], tuple[int, int]] = {}
        self._refusals_announced: set[tuple[str, str]] = set()
        self._refusals_lock = threading.Lock()
        self._refusals_wake = threading.Event()
        self._refusals_stop = threading.Event()
        self._refusals_thread: threading.Thread | None = None

    # -- set-up -----------------------------------------------------------------------
    def start(self, clean_incoming: bool = True) -> DicomServer:
        """Start listening (non-blocking); returns the server.

        ``clean_incoming=False`` when the caller has already done it
        (:func:`salvage_incoming`), as :class:`~node.service.NodeService` does once for
        all its receive processes, so no process deletes another's in-flight file.
        """
        # Receive validates what it uses itself; pydicom's value warnings would echo
        # peer-controlled values into the log.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        if clean_incoming:
            self._clean_incoming()
        cfg = self.settings.dicom
        ssl_context = make_ssl_context(cfg.tls, server_side=True) if cfg.tls.enabled else None
        storage = [str(context.abstract_syntax) for context in AllStoragePresentationContexts]
        server = DicomServer(self, cfg.host, cfg.port, supported_contexts(storage, TRANSFER_SYNTAXES),
                             ssl_context=ssl_context)
        server.start()
        self.server = server
        self.tracker.start()
        self.backlog.start()
        self._refusals_stop.clear()
        self._refusals_thread = threading.Thread(target=self._refusal_flusher, name="refusal-audit", daemon=True)
        self._refusals_thread.start()
        log.info("listening as %s on %s:%d%s", cfg.ae_title, cfg.host, self.port,
                 " (TLS)" if ssl_context else "")
        return server

    @property
    def port(self) -> int:
        if self.server is None:
            return self.settings.dicom.port
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self._refusals_thread is not None:
            self._refusals_stop.set()
            self._refusals_wake.set()
            self._refusals_thread.join(2)  # its rows wait in memory if the database hangs
            self._refusals_thread = None
        self.backlog.stop()
        self.tracker.stop()

    def _clean_incoming(self) -> None:
        """Place complete files a crash left in the temporary folder, delete the rest."""
        salvage_incoming(self.spool)

    # -- association audit ------------------------------------------------------------
    def _audit_failed(self, what: str, exc: Exception) -> None:
        """Receive goes on without the database; say so once per outage, not per PDU."""
        now = time.monotonic()
        if now - self._audit_warned_at > 60:
            self._audit_warned_at = now
            log.warning("database unavailable, %s not recorded (receive continues): %s",
                        what, type(exc).__name__)

    @staticmethod
    def _association_row(peer: AssociationInfo, **state: Any) -> Association:
        return Association(calling_ae_title=peer.calling_ae_title, called_ae_title=peer.called_ae_title,
                           peer_host=peer.peer_host[:64], peer_port=peer.peer_port, **state)

    def association_accepted(self, peer: AssociationInfo) -> _AssocStats:
        stats = _AssocStats(None)
        started = utcnow()

        def write(session: Session) -> None:
            row = self._association_row(peer, state="accepted", started_at=started)
            session.add(row)
            session.flush()
            stats.row_id = row.id

        self.backlog.put(write)
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()
        return stats

    def association_rejected(self, peer: AssociationInfo, reason: str) -> None:
        ended = utcnow()

        def write(session: Session) -> None:
            row = self._association_row(peer, state="rejected", reason=reason, started_at=ended, ended_at=ended)
            session.add(row)
            session.flush()
            record_event(session, "association.rejected", reason, association_id=row.id,
                         details={"calling_ae_title": peer.calling_ae_title, "peer": row.peer_host})

        self.backlog.put(write)
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
        log.warning("rejected association from %s@%s: %s", peer.calling_ae_title, peer.peer_host, reason)

    def record_refused_host(self, host: str, port: int, reason: str = "host not allowed") -> None:
        """Count a connection closed before association (called on the accept thread: no I/O
        but one log line for the first refusal of a host and reason per interval)."""
        key = (host[:64], reason)
        with self._refusals_lock:
            count, _ = self._refusals.get(key, (0, 0))
            self._refusals[key] = (count + 1, port)
            new = key not in self._refusals_announced
            if new:
                self._refusals_announced.add(key)
        metrics.ASSOCIATIONS.labels(outcome="host_refused").inc()
        if new:  # the first of this interval is written at once, the rest as one count
            log.warning("refused connection from %s (%s); further ones are counted, audited every %.0f s",
                        host, reason, self.settings.dicom.refusal_audit_interval_s)
            self._refusals_wake.set()

    def _refusal_flusher(self) -> None:
        interval = self.settings.dicom.refusal_audit_interval_s
        boundary = time.monotonic() + interval
        while True:
            self._refusals_wake.wait(max(boundary - time.monotonic(), 0.0))
            self._refusals_wake.clear()
            stopping = self._refusals_stop.is_set()
            if time.monotonic() >= boundary:
                with self._refusals_lock:
                    self._refusals_announced.clear()
                boundary = time.monotonic() + interval
            self.flush_refusals()
            if stopping:
                return

    def flush_refusals(self) -> None:
        """Write the refused connections counted so far: one row and event per host and reason."""
        with self._refusals_lock:
            refusals, self._refusals = self._refusals, {}
        if not refusals:
            return
        try:
            with self.db.session() as session:
                for (host, reason), (count, port) in refusals.items():
                    row = Association(calling_ae_title="", called_ae_title=self.settings.dicom.ae_title,
                                      peer_host=host, peer_port=port, state="rejected",
                                      reason=reason, ended_at=utcnow())
                    session.add(row)
                    session.flush()
                    record_event(session, "association.rejected", reason, association_id=row.id,
                                 details={"peer": host, "connections": count})
        except Exception as exc:  # noqa: BLE001
            self._audit_failed("refused connections", exc)
        for (host, reason), (count, _port) in refusals.items():
            if count > 1:
                log.warning("refused %d connection(s) from %s (%s)", count, host, reason)

    def association_ended(self, stats: _AssocStats, state: str, reason: str) -> None:
        """``state`` is "released" or "aborted" (then ``reason`` says how)."""
        ended = utcnow()
        received, failed, size = stats.received, stats.failed, stats.bytes

        def write(session: Session) -> None:
            # The accepted row was written before (the backlog keeps order).
            row = session.get(Association, stats.row_id) if stats.row_id is not None else None
            if row is None:
                return
            row.state = state
            row.ended_at = ended
            row.instances_received = received
            row.instances_failed = failed
            row.bytes_received = size
            if state == "aborted":
                row.reason = reason
                record_event(session, "association.aborted", reason, association_id=row.id,
                             details={"instances_received": received})

        self.backlog.put(write)
        self.tracker.wake()  # counts written now, by the tracker's thread
        self.sweep_incoming()

    def sweep_incoming(self, max_age_s: float | None = None) -> int:
        """Remove temp files no live transfer can still be writing; return how many."""
        cfg = self.settings.dicom
        max_age_s = max_age_s if max_age_s is not None else 2 * (cfg.network_timeout_s + cfg.dimse_timeout_s)
        cutoff = time.time() - max_age_s
        removed = 0
        for leftover in self.incoming_dir.glob("*"):
            try:
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    # -- C-STORE ----------------------------------------------------------------------
    @staticmethod
    def header_walk(meta_length: int, transfer_syntax: str) -> HeaderWalk:
        """The header check of one incoming file (begun by the file once its head is in)."""
        return HeaderWalk(meta_length, transfer_syntax)

    def _space_ok(self) -> bool:
        return self.space.ok()

    def store(self, stats: _AssocStats | None, incoming: IncomingFile, request_sop_class: str,
              request_sop_instance: str, transfer_syntax: str, calling_ae_title: str) -> tuple[int, str]:
        """Validate, make durable, place into the spool, count: (status, reason) for the answer.

        The request UIDs are '' where the peer sent none or invalid ones. The temporary
        file is either placed into the spool or deleted, never left behind.
        """
        placed = False
        try:
            if incoming.out_of_space:
                self.space.full()
                raise StoreRejected(STATUS_OUT_OF_RESOURCES, "spool volume full (or at its floor) while receiving")
            if not self._space_ok():
                raise StoreRejected(STATUS_OUT_OF_RESOURCES, "spool below free-space floor")
            # Structure first: a truncated data set is "cannot understand", even where
            # the cut also took the UIDs with it.
            has_pixels, info = _inspect_incoming(incoming, transfer_syntax)
            _require_pixel_data(has_pixels, info)
            if request_sop_instance != info.sop_instance_uid:
                raise StoreRejected(STATUS_INSTANCE_UID_MISMATCH,
                                    "SOP Instance UID in dataset differs from the request")
            if request_sop_class != info.sop_class_uid:
                raise StoreRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                    "SOP Class UID in dataset differs from the request")
            size = incoming.size
            if self.settings.storage.sync_before_answer:
                incoming.sync()
            incoming.close()
            _target, replaced = self.spool.adopt_instance(info.study_uid, info.series_uid,
                                                          info.sop_instance_uid, incoming.name, keep_temp_name=True)
            placed = True
            incoming.name_left = not replaced
        except StoreRejected as exc:
            return self.refuse(stats, exc.status, exc.reason, request_sop_instance)
        except OutOfSpaceError as exc:
            return self.refuse(stats, STATUS_OUT_OF_RESOURCES, str(exc), request_sop_instance)
        except (SpoolError, OSError) as exc:
            if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                self.space.full()
                return self.refuse(stats, STATUS_OUT_OF_RESOURCES, "spool volume full", request_sop_instance)
            return self.refuse(stats, STATUS_SPOOL_WRITE_FAILED, f"spool write failed: {type(exc).__name__}",
                               request_sop_instance)
        finally:
            if not placed:
                incoming.discard()
        self.tracker.add(info, size, calling_ae_title=calling_ae_title, replaced=replaced)
        if stats is not None:
            stats.received += 1
            stats.bytes += size
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(size)
        return STATUS_SUCCESS, ""

    def refuse(self, stats: _AssocStats | None, status: int, reason: str, sop_instance: str) -> tuple[int, str]:
        """Count, log and audit a refused instance; (status, reason) for the answer."""
        if stats is not None:
            stats.failed += 1
        metrics.INSTANCES_REFUSED.labels(status=f"0x{status:04X}").inc()
        sop = sop_instance if is_valid_uid(sop_instance) else "(invalid UID)"
        log.warning("refused instance %s: 0x%04X %s", sop, status, reason)

        def write(session: Session) -> None:
            record_event(session, "instance.refused", reason,
                         association_id=stats.row_id if stats else None,
                         details={"status": f"0x{status:04X}", "sop_instance_uid": sop})

        self.backlog.put(write)  # the answer never waits for the audit row
        return status, reason


def _inspect_incoming(incoming: IncomingFile, transfer_syntax: str) -> tuple[bool | None, InstanceInfo]:
    """Structure check and header of a received file: the walk begun over its first bytes
    while it arrived, finished (over a memory map of the file where those are not enough),
    or, for the syntaxes that walk does not read, pydicom."""
    walk = incoming.walk if isinstance(incoming.walk, HeaderWalk) else HeaderWalk(incoming.meta_length,
                                                                                   transfer_syntax)
    inspected = walk.finish(incoming.head, incoming.size, incoming.mapped)
    if inspected is not None:
        return inspected
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Walked while inflating through a bounded window, never inflated whole.
        try:
            return inspect_deflated(_pread(incoming.fd), incoming.meta_length, incoming.size)
        except DeflateMalformed as exc:
            raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"malformed data set: {exc}") from None
    path = Path(incoming.name)
    return check_structure(path, transfer_syntax), read_header(path)


def salvage_incoming(spool: Spool) -> int:
    """Place into the spool the complete instances a crash left in ``.incoming``; delete the rest.

    A C-STORE is answered once its file is synced (``storage.sync_before_answer``) and
    hard-linked into the spool; after a power cut, a journaling file system may have kept
    the synced file under its temporary name but not yet the link. Such a file is whole and
    checked again here like a received one (structure, UIDs, pixel data), then placed; a
    partial transfer, an empty file made ahead, or anything that fails the check is
    deleted (its sender was never told it was stored). Run before the receivers start and
    before the database is reconciled with the spool. Returns how many were placed.
    """
    incoming = spool.root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    placed = 0
    for leftover in sorted(incoming.iterdir()):
        try:
            if leftover.is_file():
                info = _leftover_instance(leftover)
                spool.adopt_instance(info.study_uid, info.series_uid, info.sop_instance_uid, leftover)
                placed += 1
                continue
        except Exception as exc:  # noqa: BLE001 - whatever a leftover holds, start goes on
            log.info("not placing leftover %s: %s", leftover.name, type(exc).__name__)
        with contextlib.suppress(OSError):
            leftover.unlink()
    if placed:
        log.warning("placed %d complete instance(s) left in %s by an unclean stop", placed, incoming)
    return placed


def _require_pixel_data(has_pixels: bool | None, info: InstanceInfo) -> None:
    if has_pixels is False and needs_pixel_data(info.sop_class_uid):
        raise StoreRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS, "image storage instance has no Pixel Data")


def _leftover_instance(path: Path) -> InstanceInfo:
    """The identity of a received file left in ``.incoming``, checked as :meth:`Receiver.store`
    checks one (structure, UIDs, pixel data); raises where it is not whole and sound."""
    transfer_syntax = str(read_file_meta_info(path).TransferSyntaxUID)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # never inflated whole (node/deflated.py)
        with path.open("rb") as fp:
            start = 144 + struct.unpack("<L", os.pread(fp.fileno(), 4, 140))[0]
            has_pixels, info = inspect_deflated(_pread(fp.fileno()), start, os.fstat(fp.fileno()).st_size)
    else:
        has_pixels = check_structure(path, transfer_syntax)
        info = read_header(path)
    _require_pixel_data(has_pixels, info)
    return info


def bind_check(host: str, port: int) -> None:
    """Raise OSError early, with a clear message, if the port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
