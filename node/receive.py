"""Receive: the C-STORE / C-ECHO SCP.

Fast and dumb (DESIGN decision 2): pynetdicom streams each dataset to a temporary file
on the spool volume (``STORE_RECV_CHUNKED_DATASET``), the handler reads only the header
(never pixel data), validates the UIDs, fsyncs and renames the file into
``spool/<study>/<series>/<sop>.dcm``, and only then answers. Counts are kept in memory
and flushed to SQL in batches by :class:`node.assemble.SeriesTracker`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
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
from pynetdicom import AE, _config, evt
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
from node.uids import validate_uid

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
    """Read the identifying header of a DICOM file without touching pixel data."""
    try:
        # specific_tags already skips the values of every other element; defer_size would only
        # add seeks and re-opens (it doubled the cost of this call on the hot path).
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError) as exc:
        raise StoreRejected(STATUS_CANNOT_UNDERSTAND, f"unreadable dataset: {type(exc).__name__}") from None

    def text(keyword: str) -> str:
        value = ds.get(keyword, "")
        return str(value).strip() if value is not None else ""

    try:
        study = validate_uid(text("StudyInstanceUID"), "Study Instance UID")
        series = validate_uid(text("SeriesInstanceUID"), "Series Instance UID")
        sop = validate_uid(text("SOPInstanceUID"), "SOP Instance UID")
        sop_class = validate_uid(text("SOPClassUID"), "SOP Class UID")
    except InvalidUIDError as exc:
        raise StoreRejected(STATUS_INVALID_UID, str(exc)) from None
    return InstanceInfo(
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        modality=text("Modality")[:16],
        body_part=text("BodyPartExamined")[:64].upper(),
        view_position=text("ViewPosition")[:16].upper(),
    )


@dataclass
class _AssocStats:
    row_id: int
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


class Receiver:
    """The SCP: owns the AE, the spool and the in-memory series tracker."""

    def __init__(self, settings: Settings, db: Database, tracker: SeriesTracker | None = None) -> None:
        self.settings = settings
        self.db = db
        self.spool = Spool(settings.storage.spool, settings.storage.min_free_mb << 20)
        self.tracker = tracker or SeriesTracker(db)
        self.incoming_dir = self.spool.root / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._assocs: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_ok = True
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
        # pynetdicom streams datasets to NamedTemporaryFile in the default temp dir:
        # point it at the spool volume so the final rename is atomic and cheap.
        tempfile.tempdir = str(self.incoming_dir)
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Never decode and log dataset contents (PHI) on errors.
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.LOG_REQUEST_IDENTIFIERS = False
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
    def handle_accepted(self, event: Any) -> None:
        assoc = event.assoc
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
        with self._lock:
            self._assocs[id(assoc)] = _AssocStats(row_id)
        metrics.ASSOCIATIONS.labels(outcome="accepted").inc()

    def handle_rejected(self, event: Any) -> None:
        assoc = event.assoc
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
        with self.db.session() as session:
            row = Association(calling_ae_title="", called_ae_title=self.settings.dicom.ae_title,
                              peer_host=host[:64], peer_port=port, state="rejected",
                              reason="host not allowed", ended_at=utcnow())
            session.add(row)
            session.flush()
            record_event(session, "association.rejected", "host not allowed",
                         association_id=row.id, details={"peer": host})
        metrics.ASSOCIATIONS.labels(outcome="host_refused").inc()
        log.warning("refused connection from %s (host not allowed)", host)

    def handle_ended(self, event: Any) -> None:
        with self._lock:
            stats = self._assocs.pop(id(event.assoc), None)
        if stats is None:
            return
        state = "aborted" if event.event.name == "EVT_ABORTED" else "released"
        with self.db.session() as session:
            row = session.get(Association, stats.row_id)
            if row is not None:
                row.state = state
                row.ended_at = utcnow()
                row.instances_received = stats.received
                row.instances_failed = stats.failed
                row.bytes_received = stats.bytes
                if state == "aborted":
                    record_event(session, "association.aborted", "peer or network aborted",
                                 association_id=row.id,
                                 details={"instances_received": stats.received})
        self.tracker.flush()

    # -- DIMSE ------------------------------------------------------------------------
    def handle_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _space_ok(self) -> bool:
        now = time.monotonic()
        if now - self._free_checked_at > 0.5:
            free = shutil.disk_usage(self.spool.root).free
            self._free_ok = free >= self.spool.min_free_bytes
            self._free_checked_at = now
        return self._free_ok

    def handle_store(self, event: Any) -> int:
        """Validate, write atomically, record, answer."""
        stats = self._assocs.get(id(event.assoc))
        temp_path = Path(event.dataset_path)
        try:
            if not self._space_ok():
                raise StoreRejected(STATUS_OUT_OF_RESOURCES, "spool below free-space floor")
            info = read_header(temp_path)
            requested_sop = str(event.request.AffectedSOPInstanceUID or "")
            if requested_sop != info.sop_instance_uid:
                raise StoreRejected(STATUS_INSTANCE_UID_MISMATCH,
                                    "SOP Instance UID in dataset differs from the request")
            if str(event.request.AffectedSOPClassUID or "") != info.sop_class_uid:
                raise StoreRejected(STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                    "SOP Class UID in dataset differs from the request")
            size = temp_path.stat().st_size
            target = self.spool.instance_path(info.study_uid, info.series_uid, info.sop_instance_uid)
            replaced = target.exists()
            _fsync_path(temp_path)
            self.spool.adopt(info.study_uid, info.series_uid, info.sop_instance_uid, temp_path)
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
        log.warning("refused instance %s: 0x%04X %s", sop[:64], status, reason)
        try:
            with self.db.session() as session:
                record_event(session, "instance.refused", reason,
                             association_id=stats.row_id if stats else None,
                             details={"status": f"0x{status:04X}", "sop_instance_uid": sop[:64]})
        except Exception:  # the answer matters more than the audit row
            log.exception("could not record refused instance")
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
