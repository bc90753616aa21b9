"""Receive: the C-STORE / C-ECHO SCP.

Fast and dumb (DESIGN decision 2): pynetdicom streams each dataset to a temporary file
on the spool volume (``STORE_RECV_CHUNKED_DATASET``), the handler reads only the header
(never pixel data), validates the UIDs, fsyncs and renames the file into
``spool/<study>/<series>/<sop>.dcm``, and only then answers. Counts are kept in memory
and flushed to SQL in batches by :class:`node.assemble.SeriesTracker`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.multival import MultiValue
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
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node import metrics
from node.assemble import InstanceInfo, SeriesTracker
from node.audit import Association, Database, record_event, utcnow
from node.config import Settings, TLSSettings
from node.errors import InvalidUIDError, OutOfSpaceError, SpoolError
from node.spool import Spool
from node.transport import FastRequestHandler
from node.uids import is_valid_uid, validate_uid

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

# C-STORE statuses (PS3.4 B.2.3 and the 0xA7xx/0xA9xx/0xCxxx ranges).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SPOOL_WRITE_FAILED = 0xA701
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC220
STATUS_INSTANCE_UID_MISMATCH = 0xC221

_HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
)


class StoreRejected(Exception):
    """An instance is refused with ``status``; ``reason`` is safe to log (no PHI)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def read_header(path: Path) -> InstanceInfo:
    """Read the identifying header of a DICOM file without touching pixel data.

    Raises only :class:`StoreRejected`: 0xC210 for bytes that do not parse, 0xC220 for
    UIDs that are missing or invalid (and so could not become path components).
    """
    try:
        # specific_tags already skips the values of every other element; defer_size would only
        # add seeks and re-opens (it doubled the cost of this call on the hot path).
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
        values = {keyword: _text(ds, keyword) for keyword in _HEADER_TAGS}
    except Exception as exc:  # noqa: BLE001 - hostile bytes can break the parser in any way
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from None
    try:
        study = validate_uid(values["StudyInstanceUID"], "Study Instance UID")
        series = validate_uid(values["SeriesInstanceUID"], "Series Instance UID")
        sop = validate_uid(values["SOPInstanceUID"], "SOP Instance UID")
        sop_class = validate_uid(values["SOPClassUID"], "SOP Class UID")
    except InvalidUIDError as exc:
        raise StoreRejected(STATUS_INVALID_UID, str(exc)) from None
    return InstanceInfo(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        modality=values["Modality"][:16],
        body_part=values["BodyPartExamined"][:64].upper(),
        view_position=values["ViewPosition"][:16].upper(),
    )


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, bytes):  # a value pydicom could not decode
        value = value.decode("ascii", "replace")
    elif isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    # Strip the NUL padding some devices put in UIDs and any stray control characters.
    return "".join(ch for ch in str(value) if ch >= " ").strip()


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


class _Malformed(Exception):
    """The data set encoding is broken; the message says where (no values)."""


class _StructureWalker:
    """Walks element headers (tag, VR, length) of a little-endian data set in memory."""

    def __init__(self, data: Any, start: int) -> None:
        self.data = data  # bytes or an mmap of the file
        self.pos = start
        self.end = len(data)

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

    def dataset(self, implicit: bool, depth: int, in_item: bool) -> set[tuple[int, int]]:
        """Walk a data set to its end (or item delimiter); return its top-level tags."""
        if depth > _MAX_NESTING:
            raise _Malformed(f"sequences nested deeper than {_MAX_NESTING} levels")
        tags: set[tuple[int, int]] = set()
        data, end, unpack_from = self.data, self.end, struct.unpack_from
        # The element header is parsed inline: this loop runs for every element received.
        while self.pos < end:
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
                    _check_deflated(data, start)
                    return None
                if data[start:start + 2] == b"\x02\x00":
                    raise _Malformed("data set carries File Meta Information (group 0002) elements")
                tags = _StructureWalker(data, start).dataset(syntax.is_implicit_VR, 0, in_item=False)
    except _Malformed as exc:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"malformed data set: {exc}") from None
    except (OSError, ValueError, struct.error) as exc:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}") from None
    return bool(tags & _PIXEL_TAGS)


# A deflated data set is inflated whole by the header parser: refuse streams that would
# inflate past this size, or past _MAX_INFLATE_RATIO times their size once above 64 MiB
# (real DICOM deflates a few times over; a "zip bomb" a thousand times).
_MAX_INFLATED = 1 << 30
_MAX_INFLATE_RATIO = 100


def _check_deflated(data: Any, start: int) -> None:
    """Inflate a deflated data set in bounded chunks, counting but not keeping the output."""
    compressed = len(data) - start
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    position = start
    try:
        while position < len(data) or inflater.unconsumed_tail:
            if inflater.unconsumed_tail:
                chunk = inflater.unconsumed_tail
            else:
                chunk = data[position:position + (1 << 20)]
                position += len(chunk)
            inflated += len(inflater.decompress(chunk, 1 << 22))
            if inflated > _MAX_INFLATED or (inflated > 64 << 20 and inflated > _MAX_INFLATE_RATIO * compressed):
                raise _Malformed(f"deflated data set of {compressed} bytes inflates past {inflated} bytes")
            if inflater.eof:
                break
        inflated += len(inflater.flush())
    except zlib.error as exc:
        raise _Malformed(f"deflated data set does not inflate: {exc}") from None
    if not inflater.eof:
        raise _Malformed("deflated data set ends before its deflate stream does")


def needs_pixel_data(sop_class_uid: str) -> bool:
    """True for the image storage SOP classes, whose IODs require Pixel Data."""
    return "Image Storage" in UID(sop_class_uid).name


class _IncomingFile:
    """Where pynetdicom streams one received data set: a temp file in the spool volume.

    Stands in for the ``NamedTemporaryFile`` pynetdicom opens per C-STORE request. A full
    disk while writing (ENOSPC, EDQUOT) does not raise into pynetdicom's network thread,
    which would kill the association without an answer: the file is emptied, later
    fragments are dropped, and the C-STORE handler answers 0xA700 instead.
    """

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="", suffix=".dcm", dir=folder)
        self._fp = os.fdopen(fd, "wb")
        self.name = name
        self.out_of_space = False

    @property
    def file(self) -> _IncomingFile:
        """pynetdicom flushes through ``.file`` (the NamedTemporaryFile wrapper API)."""
        return self

    def write(self, data: bytes) -> int:
        if self.out_of_space:
            return len(data)
        try:
            return self._fp.write(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.out_of_space = True
            with contextlib.suppress(OSError, ValueError):
                self._fp.truncate(0)
            return len(data)

    def flush(self) -> None:
        if self.out_of_space:
            return
        try:
            self._fp.flush()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.out_of_space = True
            with contextlib.suppress(OSError, ValueError):
                self._fp.truncate(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._fp.close()


class _IncomingFiles:
    """The factory pynetdicom calls instead of ``NamedTemporaryFile``; tracks open files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[str, _IncomingFile] = {}
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> _IncomingFile:
        incoming = _IncomingFile(self.folder)
        with self._lock:
            self._open[incoming.name] = incoming
        return incoming

    def pop(self, name: str) -> _IncomingFile | None:
        with self._lock:
            return self._open.pop(str(name), None)


@dataclass
class _AssocStats:
    row_id: int | None
    received: int = 0
    failed: int = 0
    bytes: int = 0


class _FilteringServer(ThreadedAssociationServer):
    """The threaded server, with the host allowlist checked before any PDU is read."""

    node_receiver: Receiver
    # Several receive processes may share one port (SO_REUSEPORT), see `serve --processes`.
    allow_reuse_port = True

    def server_bind(self) -> None:
        # pynetdicom's server_bind sets only SO_REUSEADDR and ignores allow_reuse_port.
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT") and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        if self.node_receiver.settings.dicom.host_allowed(host):
            return True
        self.node_receiver.record_refused_host(host, int(client_address[1]))
        return False


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
    """The SCP: owns the AE, the spool and the in-memory series tracker."""

    def __init__(self, settings: Settings, db: Database, tracker: SeriesTracker | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = Spool(settings.storage.spool, settings.storage.min_free_mb << 20)
        self.tracker = tracker or SeriesTracker(db)
        self.incoming_dir = self.spool.root / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.incoming_files = _IncomingFiles(self.incoming_dir)
        self._assocs: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_ok = True
        self._audit_warned_at = -1e9
        self.server: _FilteringServer | None = None
        self.ae = self._make_ae()

    # -- set-up -----------------------------------------------------------------------
    def _make_ae(self) -> AE:
        cfg = self.settings.dicom
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.maximum_pdu_size = 0  # no limit on what we receive
        if cfg.allowed_calling_ae_titles:
            ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_RELEASED, self.handle_ended),
            (evt.EVT_ABORTED, self.handle_ended),
            (evt.EVT_CONN_CLOSE, self.handle_ended),
        ]

    def start(self, clean_incoming: bool = True) -> _FilteringServer:
        """Start listening (non-blocking); returns the server.

        ``clean_incoming=False`` when several receive processes share the spool: the
        parent cleans once before starting them, so no process deletes another's
        in-flight temporary file.
        """
        # pynetdicom streams each data set to a NamedTemporaryFile: open it on the spool
        # volume instead (the final rename is then atomic and cheap), and make a full disk
        # a status rather than an exception in its network thread.
        dimse_messages.NamedTemporaryFile = self.incoming_files  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Never decode and log dataset contents (PHI) on errors.
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_REQUEST_IDENTIFIERS = False
        # Receive validates what it uses itself; pydicom's value warnings and pynetdicom's
        # UID conformance messages would echo peer-controlled values into the log.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        logging.getLogger("pynetdicom.utils").setLevel(logging.CRITICAL)
        # pynetdicom's standard handlers format every PDU and DIMSE message for DEBUG logs,
        # whether or not DEBUG is enabled: keep them only when it is.
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            _config.LOG_HANDLER_LEVEL = "none"
        if clean_incoming:
            self._clean_incoming()
        cfg = self.settings.dicom
        ssl_context = make_ssl_context(cfg.tls, server_side=True) if cfg.tls.enabled else None
        server = self.ae.make_server(
            (cfg.host, cfg.port),
            ssl_context=ssl_context,
            evt_handlers=self.handlers(),
            server_class=_FilteringServer,
            request_handler=FastRequestHandler,
        )
        server.node_receiver = self
        thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        thread.start()
        self.ae._servers.append(server)
        self.server = server
        self.tracker.start()
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
            self.server.server_close()
            self.server = None
        self.tracker.stop()

    def _clean_incoming(self) -> None:
        """Remove partial temp files left by a crash (they were never acknowledged)."""
        for leftover in self.incoming_dir.glob("*"):
            try:
                leftover.unlink()
            except OSError:
                pass

    # -- association audit ------------------------------------------------------------
    def _audit_failed(self, what: str, exc: Exception) -> None:
        """Receive goes on without the database; say so once per outage, not per PDU."""
        now = time.monotonic()
        if now - self._audit_warned_at > 60:
            self._audit_warned_at = now
            log.warning("database unavailable, %s not recorded (receive continues): %s",
                        what, type(exc).__name__)

    def handle_accepted(self, event: Any) -> None:
        assoc = event.assoc
        row_id: int | None = None
        try:
            with self.db.session() as session:
                row = Association(
                    calling_ae_title=assoc.requestor.ae_title.strip()[:16],
                    called_ae_title=assoc.acceptor.ae_title.strip()[:16],
                    peer_host=str(assoc.requestor.address)[:64],
                    peer_port=int(assoc.requestor.port or 0),
                    state="accepted",
                )
                session.add(row)
                session.flush()
                row_id = row.id
        except Exception as exc:  # noqa: BLE001 - the association proceeds without its row
            self._audit_failed("association", exc)
        with self._lock:
            self._assocs[id(assoc)] = _AssocStats(row_id)
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()

    def handle_rejected(self, event: Any) -> None:
        try:
            self._record_rejected(event.assoc)
        except Exception as exc:  # noqa: BLE001
            self._audit_failed("rejected association", exc)

    def _record_rejected(self, assoc: Any) -> None:
        calling = assoc.requestor.ae_title.strip()[:16]
        with self.db.session() as session:
            row = Association(
                calling_ae_title=calling,
                called_ae_title=assoc.acceptor.ae_title.strip()[:16],
                peer_host=str(assoc.requestor.address)[:64],
                peer_port=int(assoc.requestor.port or 0),
                state="rejected",
                reason="calling AE title not allowed"
                if not self.settings.dicom.calling_ae_allowed(calling)
                else "association limit reached",
                ended_at=utcnow(),
            )
            session.add(row)
            session.flush()
            record_event(session, "association.rejected", row.reason or "", association_id=row.id,
                         details={"calling_ae_title": calling, "peer": row.peer_host})
        metrics.ASSOCIATIONS.labels(outcome="rejected").inc()
        log.warning("rejected association from %s@%s", calling, assoc.requestor.address)

    def record_refused_host(self, host: str, port: int) -> None:
        try:
            with self.db.session() as session:
                row = Association(calling_ae_title="", called_ae_title=self.settings.dicom.ae_title,
                                  peer_host=host[:64], peer_port=port, state="rejected",
                                  reason="host not allowed", ended_at=utcnow())
                session.add(row)
                session.flush()
                record_event(session, "association.rejected", "host not allowed",
                             association_id=row.id, details={"peer": host})
        except Exception as exc:  # noqa: BLE001
            self._audit_failed("refused connection", exc)
        metrics.ASSOCIATIONS.labels(outcome="host_refused").inc()
        log.warning("refused connection from %s (host not allowed)", host)

    def handle_ended(self, event: Any) -> None:
        self._discard_partial(event.assoc)
        with self._lock:
            stats = self._assocs.pop(id(event.assoc), None)
        if stats is None:
            return
        # The first of these events decides: a release comes before the connection closes,
        # so a close seen first means the peer dropped the connection without releasing.
        name = event.event.name
        state = "released" if name == "EVT_RELEASED" else "aborted"
        reason = "peer or network aborted" if name == "EVT_ABORTED" else "connection closed without release"
        try:
            self._record_ended(stats, state, reason)
        except Exception as exc:  # noqa: BLE001
            self._audit_failed("end of association", exc)
        try:
            self.tracker.flush()
        except Exception as exc:  # noqa: BLE001 - counts stay in memory for the next flush
            self._audit_failed("series counts", exc)
        self.sweep_incoming()

    def _record_ended(self, stats: _AssocStats, state: str, reason: str) -> None:
        if stats.row_id is None:
            return
        with self.db.session() as session:
            row = session.get(Association, stats.row_id)
            if row is not None:
                row.state = state
                row.ended_at = utcnow()
                row.instances_received = stats.received
                row.instances_failed = stats.failed
                row.bytes_received = stats.bytes
                if state == "aborted":
                    row.reason = reason
                    record_event(session, "association.aborted", reason,
                                 association_id=row.id,
                                 details={"instances_received": stats.received})

    def _discard_partial(self, assoc: Any) -> None:
        """Delete the temp file of a data set cut off by an abort or a dropped connection.

        pynetdicom removes the file after the C-STORE handler ran, but not when the
        association ends before the last fragment arrived.
        """
        message = getattr(getattr(assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_file", None)
        if partial is None:
            return
        self.incoming_files.pop(partial.name)
        try:
            partial.close()
            os.unlink(partial.name)
            log.info("discarded a partial data set from an interrupted association")
        except OSError:
            pass

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

    # -- DIMSE ------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _space_ok(self) -> bool:
        # A good answer is cached for half a second; a bad one is checked again each
        # time, so receive resumes as soon as space returns.
        now = time.monotonic()
        if not self._free_ok or now - self._free_checked_at > 0.5:
            free = shutil.disk_usage(self.spool.root).free
            self._free_ok = free >= self.spool.min_free_bytes
            self._free_checked_at = now
        return self._free_ok

    def handle_store(self, event: Any) -> int:
        """Validate, write atomically, record, answer."""
        stats = self._assocs.get(id(event.assoc))
        try:
            temp_path = Path(event.dataset_path)
        except (TypeError, AttributeError):
            return self._refuse(event, stats, STATUS_CANNOT_UNDERSTAND, "C-STORE request without a data set")
        incoming = self.incoming_files.pop(str(temp_path))
        try:
            if incoming is not None and incoming.out_of_space:
                self._free_ok = False
                raise StoreRejected(STATUS_OUT_OF_RESOURCES, "spool volume full while receiving")
            if not self._space_ok():
                raise StoreRejected(STATUS_OUT_OF_RESOURCES, "spool below free-space floor")
            # Structure first: a truncated data set is "cannot understand", even where
            # the cut also took the UIDs with it.
            has_pixels = check_structure(temp_path, str(event.context.transfer_syntax))
            info = read_header(temp_path)
            if has_pixels is False and needs_pixel_data(info.sop_class_uid):
                raise StoreRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                    "image storage instance has no Pixel Data")
            requested_sop = str(event.request.AffectedSOPInstanceUID or "")
            if requested_sop != info.sop_instance_uid:
                raise StoreRejected(STATUS_INSTANCE_UID_MISMATCH,
                                    "SOP Instance UID in dataset differs from the request")
            if str(event.request.AffectedSOPClassUID or "") != info.sop_class_uid:
                raise StoreRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                    "SOP Class UID in dataset differs from the request")
            size = temp_path.stat().st_size
            _fsync_path(temp_path)
            _target, replaced = self.spool.adopt_instance(info.study_uid, info.series_uid,
                                                          info.sop_instance_uid, temp_path)
        except StoreRejected as exc:
            return self._refuse(event, stats, exc.status, exc.reason)
        except OutOfSpaceError as exc:
            return self._refuse(event, stats, STATUS_OUT_OF_RESOURCES, str(exc))
        except (SpoolError, OSError) as exc:
            return self._refuse(event, stats, STATUS_SPOOL_WRITE_FAILED,
                                f"spool write failed: {type(exc).__name__}")
        calling = event.assoc.requestor.ae_title.strip()[:16]
        self.tracker.add(info, size, calling_ae_title=calling, replaced=replaced)
        if stats is not None:
            stats.received += 1
            stats.bytes += size
        metrics.INSTANCES_RECEIVED.inc()
        metrics.BYTES_RECEIVED.inc(size)
        return STATUS_SUCCESS

    def _refuse(self, event: Any, stats: _AssocStats | None, status: int, reason: str) -> int:
        if stats is not None:
            stats.failed += 1
        metrics.INSTANCES_REFUSED.labels(status=f"0x{status:04X}").inc()
        sop = str(event.request.AffectedSOPInstanceUID or "")
        sop = sop if is_valid_uid(sop) else "(invalid UID)"
        log.warning("refused instance %s: 0x%04X %s", sop, status, reason)
        try:
            with self.db.session() as session:
                record_event(session, "instance.refused", reason,
                             association_id=stats.row_id if stats else None,
                             details={"status": f"0x{status:04X}", "sop_instance_uid": sop})
        except Exception as exc:  # noqa: BLE001 - the answer matters more than the audit row
            self._audit_failed("refused instance", exc)
        return status


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bind_check(host: str, port: int) -> None:
    """Raise OSError early, with a clear message, if the port cannot be bound."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
