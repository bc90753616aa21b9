"""Dispatch: send result objects back to the PACS with C-STORE, with backoff and a dead letter.

Each :class:`spine_node.node.audit.Dispatch` row is one (result, destination) pair. Due rows are
grouped per destination and sent over one association, proposing exactly the SOP classes
of the files with explicit and implicit VR little endian. Anything short of a success or
warning status counts as an attempt: a refused connection, a rejected association, an
abort, a failure status. After an attempt the row waits ``backoff_initial_s`` doubling up
to ``backoff_max_s``; after ``max_attempts`` it is dead until an admin retries it. So a
PACS that refuses forever costs a bounded number of attempts, never a loop.

Not-performed notices (:mod:`spine_node.node.notices`) are result rows like any other and
go the same way. Error texts name statuses and classes, never a peer's free-text comment.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from sqlalchemy import select, update

from spine_node.node import metrics
from spine_node.node.audit import Database, Dispatch, Result, record_event, utcnow
from spine_node.node.config import Destination, Settings
from spine_node.node.domain import DispatchState
from spine_node.node.errors import DispatchError

log = logging.getLogger(__name__)

#: A claimed row is held back this long while its association runs (another dispatcher
#: will not pick it up meanwhile).
CLAIM_LEASE_S = 600.0
#: pynetdicom allows 128 presentation contexts; batches stay far below.
MAX_BATCH = 200
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# C-STORE warning statuses (PS3.4 B.2.3): the object was stored.
_WARNINGS = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass
class DispatchReport:
    """What one :func:`dispatch_pending` pass did (dispatch ids)."""

    sent: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)


@dataclass
class _Item:
    dispatch_id: int
    attempts: int
    result_id: int
    job_id: int
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class _Attempt:
    ok: bool
    status: str | None
    error: str | None


def backoff_s(settings: Settings, attempts: int) -> float:
    """Wait after the ``attempts``-th failed attempt: initial, doubling, capped."""
    cfg = settings.dispatch
    return float(min(cfg.backoff_initial_s * 2 ** max(attempts - 1, 0), cfg.backoff_max_s))


def dispatch_pending(db: Database, settings: Settings, now: datetime | None = None,
                     *, limit: int = 1000) -> DispatchReport:
    """Send every due pending dispatch; return what was sent, failed and went dead."""
    now = now or utcnow()
    report = DispatchReport()
    items = _claim_due(db, now, limit)
    if not items:
        return report
    by_destination: dict[str, list[_Item]] = defaultdict(list)
    for item in items:
        by_destination[item[0]].append(item[1])
    destinations = {d.name: d for d in settings.dispatch.destinations}
    for name, group in by_destination.items():
        destination = destinations.get(name)
        for start in range(0, len(group), MAX_BATCH):
            batch = group[start:start + MAX_BATCH]
            if destination is None:
                outcomes = {i.dispatch_id: _Attempt(False, None,
                            f"destination {name!r} is not configured") for i in batch}
            else:
                outcomes = send_batch(destination, batch, settings)
            _record(db, settings, name, batch, outcomes, report, now)
    return report


def _claim_due(db: Database, now: datetime, limit: int) -> list[tuple[str, _Item]]:
    """Due rows, each pushed ``CLAIM_LEASE_S`` ahead with a compare-and-set."""
    claimed = []
    with db.session() as session:
        rows = session.execute(
            select(Dispatch, Result)
            .join(Result, Result.id == Dispatch.result_id)
            .where(Dispatch.state == DispatchState.PENDING.value, Dispatch.next_attempt_at <= now)
            .order_by(Dispatch.next_attempt_at, Dispatch.id)
            .limit(limit)
        ).all()
        for dispatch, result in rows:
            done = session.execute(update(Dispatch).where(
                Dispatch.id == dispatch.id, Dispatch.state == DispatchState.PENDING.value,
                Dispatch.attempts == dispatch.attempts,
                Dispatch.next_attempt_at == dispatch.next_attempt_at,
            ).values(next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S)))
            if done.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append((dispatch.destination, _Item(
                    dispatch.id, dispatch.attempts, result.id, result.job_id, result.series_uid,
                    result.sop_class_uid, result.sop_instance_uid, Path(result.path))))
    return claimed


def _tls_args(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    tls = destination.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context, destination.host


def _association_failure(assoc: Association, destination: Destination) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result_str", None) or getattr(primitive, "result", "")
        source = getattr(primitive, "source_str", None) or getattr(primitive, "result_source", "")
        reason = getattr(primitive, "reason_str", None) or getattr(primitive, "diagnostic", "")
        return f"association rejected by {where} ({result}; {source}; {reason})"
    if assoc.is_aborted and assoc.acceptor.primitive is not None:
        return f"association aborted by {where}"
    # pynetdicom reports a refused, closed or timed-out connection as an abort with no
    # answer from the peer.
    return (f"cannot associate with {where} (connection refused or closed, unreachable, "
            "or no answer in time)")


# AEs with an association in progress, so a stopping node can cut them short.
_IN_FLIGHT: set[AE] = set()
_IN_FLIGHT_LOCK = threading.Lock()


def abort_in_flight() -> int:
    """Stop the network threads of every association dispatch has in progress.

    pynetdicom's DUL thread is not a daemon: a PACS that accepted TCP and never answers
    would keep a stopping process alive for ``acse_timeout_s``. Returns how many were cut.
    """
    from pynetdicom.dul import DULServiceProvider

    with _IN_FLIGHT_LOCK:
        aes = set(_IN_FLIGHT)
    cut = 0
    for thread in threading.enumerate():
        if isinstance(thread, DULServiceProvider) and getattr(thread.assoc, "ae", None) in aes:
            thread.kill_dul()
            cut += 1
    return cut


def send_batch(destination: Destination, batch: list[_Item],
               settings: Settings) -> dict[int, _Attempt]:
    """C-STORE ``batch`` to ``destination`` over one association; outcome per dispatch id."""
    outcomes: dict[int, _Attempt] = {}
    datasets: dict[int, Dataset] = {}
    for item in batch:
        try:
            datasets[item.dispatch_id] = dcmread(item.path)
        except Exception as exc:  # missing or unreadable result file
            outcomes[item.dispatch_id] = _Attempt(
                False, None, f"cannot read result file {item.path.name}: {type(exc).__name__}")
    if not datasets:
        return outcomes
    ae = AE(ae_title=destination.calling_ae_title or settings.dispatch.calling_ae_title)
    ae.acse_timeout = settings.dicom.acse_timeout_s
    ae.dimse_timeout = settings.dicom.dimse_timeout_s
    ae.network_timeout = settings.dicom.network_timeout_s
    syntaxes: dict[str, list[str]] = {}
    for ds in datasets.values():
        own = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
        wanted = syntaxes.setdefault(str(ds.SOPClassUID), list(_UNCOMPRESSED))
        if own not in wanted:
            wanted.insert(0, own)
    for sop_class, transfer_syntaxes in syntaxes.items():
        ae.add_requested_context(sop_class, transfer_syntaxes)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(ae)
    try:
        return _send(ae, destination, datasets, outcomes)
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(ae)


def _send(ae: AE, destination: Destination, datasets: dict[int, Dataset],
          outcomes: dict[int, _Attempt]) -> dict[int, _Attempt]:
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=_tls_args(destination))
    except (OSError, ssl.SSLError, ValueError) as exc:
        failure = f"cannot associate with {destination.ae_title}@{destination.host}:" \
                  f"{destination.port}: {exc}"
        outcomes.update({i: _Attempt(False, None, failure) for i in datasets})
        return outcomes
    if not assoc.is_established:
        failure = _association_failure(assoc, destination)
        outcomes.update({i: _Attempt(False, None, failure) for i in datasets})
        return outcomes
    try:
        for dispatch_id, ds in datasets.items():
            if not assoc.is_established:
                outcomes[dispatch_id] = _Attempt(False, None, "association ended early")
                continue
            try:
                response = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context for the class
                outcomes[dispatch_id] = _Attempt(False, None, f"not sent: {exc}")
                continue
            status = response.get("Status") if response else None
            if status is None:
                outcomes[dispatch_id] = _Attempt(False, None,
                                                 "no response (timeout or association aborted)")
            elif status == 0x0000 or status in _WARNINGS:
                outcomes[dispatch_id] = _Attempt(True, f"0x{status:04X}", None)
            else:
                outcomes[dispatch_id] = _Attempt(False, f"0x{status:04X}", _store_failure(response))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _store_failure(response: Dataset) -> str:
    """A failed C-STORE by its status and the standard's meaning of it.

    The peer's Error Comment is not kept: a PACS may quote the data element it rejected
    ("invalid PatientBirthDate '1980-01-01'"), and this text goes to the audit and the log.
    """
    status = int(response.Status)
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    text = f"C-STORE failed with status 0x{status:04X}"
    if meaning:
        text += f" ({meaning[1]})"
    comment = str(response.get("ErrorComment", "") or "")
    if comment:
        text += f"; the peer's error comment ({len(comment)} characters) is not kept"
    return text


def _record(db: Database, settings: Settings, destination: str, batch: list[_Item],
            outcomes: dict[int, _Attempt], report: DispatchReport, now: datetime) -> None:
    # Backoff counts from the pass's clock, so a caller-supplied ``now`` is honoured.
    with db.session() as session:
        for item in batch:
            outcome = outcomes.get(item.dispatch_id) or _Attempt(False, None, "not attempted")
            attempts = item.attempts + 1
            details = {"dispatch_id": item.dispatch_id, "destination": destination,
                       "attempt": attempts, "status": outcome.status,
                       "sop_instance_uid": item.sop_instance_uid}
            if outcome.ok:
                values = {"state": DispatchState.SENT.value, "attempts": attempts,
                          "last_status": outcome.status, "last_error": None, "sent_at": now}
                kind, message, bucket = "dispatch.sent", f"sent to {destination}", report.sent
            elif attempts >= settings.dispatch.max_attempts:
                values = {"state": DispatchState.DEAD.value, "attempts": attempts,
                          "last_status": outcome.status, "last_error": outcome.error}
                kind, bucket = "dispatch.dead", report.dead
                message = (f"gave up on {destination} after {attempts} attempt(s): "
                           f"{outcome.error}")
            else:
                wait = backoff_s(settings, attempts)
                values = {"attempts": attempts, "last_status": outcome.status,
                          "last_error": outcome.error,
                          "next_attempt_at": now + timedelta(seconds=wait)}
                kind, bucket = "dispatch.failed", report.failed
                message = f"attempt {attempts} to {destination} failed: {outcome.error}; " \
                          f"next in {wait:g} s"
                details["retry_in_s"] = wait
            done = session.execute(update(Dispatch).where(
                Dispatch.id == item.dispatch_id, Dispatch.attempts == item.attempts,
                Dispatch.state == DispatchState.PENDING.value).values(**values))
            if done.rowcount != 1:  # type: ignore[attr-defined]
                continue  # cancelled or retried by an admin meanwhile
            bucket.append(item.dispatch_id)
            if not outcome.ok:
                metrics.observe_dispatch_failure(destination)
                log.warning("dispatch %d: %s", item.dispatch_id, message)
            record_event(session, kind, message, series_uid=item.series_uid, job_id=item.job_id,
                         details=details)


def retry_dispatch(db: Database, dispatch_id: int) -> Dispatch:
    """Bring a dead (or cancelled) dispatch back to pending with fresh attempts, due now."""
    with db.session() as session:
        row = session.get(Dispatch, dispatch_id)
        if row is None:
            raise DispatchError(f"dispatch {dispatch_id} does not exist")
        if row.state not in (DispatchState.DEAD.value, DispatchState.CANCELLED.value,
                             DispatchState.PENDING.value):
            raise DispatchError(f"dispatch {dispatch_id} is {row.state}; only dead, cancelled "
                                "or pending dispatches can be retried")
        row.state = DispatchState.PENDING.value
        row.attempts = 0
        row.next_attempt_at = utcnow()
        row.last_error = None
        result = session.get(Result, row.result_id)
        record_event(session, "dispatch.retried", f"retried by an admin ({row.destination})",
                     series_uid=result.series_uid if result else None,
                     job_id=result.job_id if result else None,
                     details={"dispatch_id": dispatch_id, "destination": row.destination})
    return row
