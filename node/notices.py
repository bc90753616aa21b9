"""Failure notices: a job that fails for good still ends at the destinations.

When a job gives up (an input the pipeline cannot assess, a model or node error, a worker
lost on its last attempt, ``worker.max_attempts`` used up) the radiologist would otherwise
see nothing and could take silence for "no findings". :func:`record_not_performed` builds
the same TID 1500 SR a pipeline that abstains gets (``Analysis not performed`` and the
reason, see :func:`spine_node.node.results.build_not_performed_report`), writes it under
``storage.results`` and adds its result row and one pending dispatch per destination in
the transaction that marks the job failed, so :mod:`spine_node.node.dispatch` sends it
like any result and nobody sees a failed job without its notice.

The reason is a plain sentence chosen by the exception's class (:func:`failure_reason`),
never the exception's text, which may quote data element values; only
:class:`~spine_node.inference.errors.NotAssessableError`, whose message is written for a
radiologist, is passed on (trimmed to one line). UIDs derive from the exact source
instance set, the pipeline, the model (when the job knows it), ``"not-performed"`` and
the reason code, so a re-run that fails the same way replaces its notice and another
outcome gets its own. ``dispatch.send_failure_notices = false`` turns notices off.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from spine_node.inference.findings import Findings, ModelInfo
from spine_node.node import results
from spine_node.node.audit import Database, Dispatch, Job, Result, Series, record_event, utcnow
from spine_node.node.config import Settings
from spine_node.node.domain import DispatchState
from spine_node.node.spool import Spool
from spine_node.node.uids import is_valid_uid

log = logging.getLogger(__name__)

#: Result kind of a notice in the ``results`` table (its object is an SR).
NOTICE_KIND = "SR"
#: Longest reason passed on from a NotAssessableError message.
_REASON_MAX = 200

# Exception class name -> (reason code, sentence for the radiologist). Looked up along the
# class's MRO, so a subclass without an entry gets its base's sentence.
_REASONS: dict[str, tuple[str, str]] = {
    "NotAssessableError": ("not-assessable", "The images cannot be assessed by this analysis"),
    "ModelNotFoundError": ("model-missing", "The AI model for this analysis is not installed"),
    "RepositoryError": ("model-unavailable", "The AI model for this analysis could not be loaded"),
    "PipelineError": ("pipeline-error", "The analysis could not be completed on these images"),
    "InferenceError": ("inference-error", "The AI model could not be run on these images"),
    "InvalidUIDError": ("invalid-uid", "The images carry an invalid identifier (UID)"),
    "SpoolError": ("input-unreadable", "The images could not be read"),
    "ResultsError": ("results-error", "The results could not be encoded as DICOM"),
    "NodeError": ("node-error", "The analysis could not be completed"),
    "MemoryError": ("out-of-memory", "The images are too large for this analysis on this node"),
}
_UNEXPECTED = ("internal-error", "The analysis stopped on an internal error")
_GAVE_UP = ("gave-up", "The analysis did not finish (stopped after {attempts} attempt(s))")
_WORKER_LOST = ("worker-lost", "The analysis did not finish: the computer running it stopped "
                               "(gave up after {attempts} attempt(s))")


@dataclass(frozen=True)
class Reason:
    """Why the analysis was not performed: a stable code (in the UIDs) and a sentence."""

    code: str
    text: str


def failure_reason(exc: BaseException) -> Reason:
    """The sanitised reason for an exception: by its class, never by its message.

    A ``NotAssessableError`` carries a message written for a radiologist ("Only 1 slice"),
    which is kept (one line, at most 200 characters) and is part of the code.
    """
    for klass in type(exc).__mro__:
        entry = _REASONS.get(klass.__name__)
        if entry is None:
            continue
        code, text = entry
        if klass.__name__ == "NotAssessableError":
            message = " ".join(str(exc).split())[:_REASON_MAX]
            if message:
                return Reason(f"{code}:{message}", message)
        return Reason(code, text)
    return Reason(*_UNEXPECTED)


def gave_up_reason(attempts: int, worker_lost: bool = False) -> Reason:
    code, text = _WORKER_LOST if worker_lost else _GAVE_UP
    return Reason(code, text.format(attempts=attempts))


def safe_traceback(exc: BaseException) -> str:
    """Where an exception came from (file, line, function) and its class, not its message.

    For logs of unexpected errors: a traceback's last line quotes the message, and
    pydicom's and highdicom's messages quote data element values.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = "".join(f"\n  {f.filename}:{f.lineno} in {f.name}" for f in frames[-12:])
    return f"{type(exc).__module__}.{type(exc).__name__} (message withheld){where}"


def _sources(settings: Settings, session: Session, study_uid: str,
             series_uids: Sequence[str]) -> list[Dataset]:
    """Headers of the job's spooled instances (unreadable files are skipped)."""
    spool = Spool(Path(settings.storage.spool))
    studies: dict[str, str] = {
        series: study for series, study in session.execute(
            select(Series.series_uid, Series.study_uid).where(
                Series.series_uid.in_(list(series_uids))))}
    sources: list[Dataset] = []
    for uid in series_uids:
        study = studies.get(uid, study_uid)
        if not (is_valid_uid(study) and is_valid_uid(uid)):
            continue
        for path in sorted(spool.series_dir(study, uid).glob("*.dcm")):
            try:
                sources.append(dcmread(path, stop_before_pixels=True))
            except Exception as exc:  # a file the failure may be about
                log.info("notice: spooled file %s unreadable (%s)", path.name, type(exc).__name__)
    return sources


def _clinical_node(settings: Settings) -> bool:
    """Whether every installed model is cleared for clinical use (else notices say demo)."""
    try:
        from spine_node.inference.repository import ModelRepository

        cards = ModelRepository(settings.worker.engines_dir).cards()
    except Exception:
        return False
    return bool(cards) and all(bool(card.clinical_use) for card in cards)


@dataclass
class PreparedNotice:
    """A notice whose SR is written; :meth:`record` adds its rows to a session."""

    job_id: int
    study_uid: str
    series_uid: str
    reason: Reason
    sop_class_uid: str
    sop_instance_uid: str
    sr_series_uid: str
    path: Path

    def record(self, session: Session, settings: Settings) -> Result:
        """The result row (reused if a same-UID notice exists) and a pending dispatch per
        destination, plus a ``notice.created`` audit event, in ``session``."""
        row = session.scalar(select(Result).where(Result.sop_instance_uid == self.sop_instance_uid))
        if row is None:
            row = Result(job_id=self.job_id, kind=NOTICE_KIND, sop_class_uid=self.sop_class_uid,
                         sop_instance_uid=self.sop_instance_uid, series_uid=self.sr_series_uid,
                         path=str(self.path))
            session.add(row)
            session.flush()
        now = utcnow()
        for destination in settings.dispatch.destinations:
            dispatch = session.scalar(select(Dispatch).where(
                Dispatch.result_id == row.id, Dispatch.destination == destination.name))
            if dispatch is None:
                session.add(Dispatch(result_id=row.id, destination=destination.name,
                                     state=DispatchState.PENDING.value, next_attempt_at=now))
            elif dispatch.state != DispatchState.SENT.value:
                # The same failure again (a retried job): try to send it once more.
                dispatch.state, dispatch.attempts, dispatch.next_attempt_at = (
                    DispatchState.PENDING.value, 0, now)
        record_event(session, "notice.created", f"analysis not performed: {self.reason.text}",
                     job_id=self.job_id, study_uid=self.study_uid, series_uid=self.series_uid,
                     details={"reason": self.reason.code.split(":")[0],
                              "sop_instance_uid": self.sop_instance_uid,
                              "destinations": [d.name for d in settings.dispatch.destinations]})
        log.info("job %d: not-performed notice %s queued for %d destination(s)", self.job_id,
                 self.sop_instance_uid, len(settings.dispatch.destinations))
        return row


def prepare(session: Session, settings: Settings, job: Job | Any,
            reason: Reason) -> PreparedNotice | None:
    """Build and write the "not performed" SR of ``job`` (no rows yet).

    ``job`` is the job row or anything with its ``id``, ``study_uid``, ``series_uid``,
    ``input_series_uids`` and ``pipeline`` (``model_name``/``model_version`` when known);
    ``session`` is only read. Returns None when notices are off or the job's instances
    are gone. Never raises: a notice that cannot be built is logged by class name.
    """
    if not settings.dispatch.send_failure_notices:
        return None
    job_id = int(getattr(job, "id", None) or job.job_id)
    series_uids = list(getattr(job, "input_series_uids", None) or [job.series_uid])
    try:
        sources = _sources(settings, session, job.study_uid, series_uids)
        if not sources:
            log.warning("job %d failed; no spooled instance left to build its notice", job_id)
            return None
        model = ModelInfo(name=str(getattr(job, "model_name", None) or job.pipeline)[:64],
                          version=str(getattr(job, "model_version", None) or ""),
                          clinical_use=_clinical_node(settings))
        findings = Findings(
            pipeline=job.pipeline,
            model=model,
            study_uid=job.study_uid,
            series_uids=tuple(series_uids),
            source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in sources),
            not_performed_reason=reason.text,
        )
        options = results.ResultsOptions.from_settings(settings)
        sr = results.build_not_performed_report(findings, sources, reason_code=reason.code,
                                                options=options)
        (path,) = results.write_results([sr], settings.storage.results)
    except Exception as exc:
        log.warning("job %d: cannot build its not-performed notice: %s", job_id, safe_traceback(exc))
        return None
    return PreparedNotice(job_id, job.study_uid, job.series_uid, reason, str(sr.SOPClassUID),
                          str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), path)


def record_not_performed(session: Session, settings: Settings, job: Job | Any,
                         reason: Reason) -> Result | None:
    """:func:`prepare` and :meth:`PreparedNotice.record` in ``session`` (committed with
    the failure it belongs to)."""
    notice = prepare(session, settings, job, reason)
    return notice.record(session, settings) if notice is not None else None


def for_claim(db: Database, settings: Settings, claim: Any,
              reason: Reason) -> Callable[[Session], object] | None:
    """The notice of a claimed job that is about to fail, as a callback that records its
    rows in the failing transaction (``jobs.record_failure(..., on_failed=...)``)."""
    if not settings.dispatch.send_failure_notices:
        return None
    try:
        with db.session() as session:
            notice = prepare(session, settings, claim, reason)
    except Exception as exc:  # the failure itself must still be recorded
        log.warning("job %d: not-performed notice not built: %s", claim.job_id, safe_traceback(exc))
        return None
    if notice is None:
        return None
    return lambda session: notice.record(session, settings)


def after_failure(db: Database, settings: Settings, job_id: int, reason: Reason) -> None:
    """:func:`record_not_performed` for a job already marked failed (own transaction)."""
    if not settings.dispatch.send_failure_notices:
        return
    try:
        with db.session() as session:
            job = session.get(Job, job_id)
            if job is not None:
                record_not_performed(session, settings, job, reason)
    except Exception as exc:  # the failure itself is recorded; the notice is best effort
        log.warning("job %d: not-performed notice not recorded: %s", job_id, safe_traceback(exc))


__all__ = [
    "NOTICE_KIND",
    "PreparedNotice",
    "Reason",
    "after_failure",
    "failure_reason",
    "for_claim",
    "gave_up_reason",
    "prepare",
    "record_not_performed",
    "safe_traceback",
]
