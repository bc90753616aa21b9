"""Every study gets an answer a radiologist can read.

* A pipeline that abstains, or a job that fails for good, sends an SR saying "Analysis
  not performed" and why (a sentence chosen by the error's class, never its text) to
  the destinations; here to a real Orthanc through a real worker.
* What OHIF reads from our SRs, checked with dcmjs (the parser OHIF uses): the SCOORD3D
  centre point of each finding that has one, the short disclaimer, the not-performed group.
* A source with patient/study values invalid for their VR (a birth date ``1980-01-01``)
  still gives valid results, and the values appear in no job error, audit row or log.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import dcmread
from sqlalchemy import select

from spine_node.inference.errors import PipelineError
from spine_node.node import notices
from spine_node.node.audit import AuditEvent, Database, Dispatch, Job, Result, utcnow
from spine_node.node.db_migrate import upgrade
from spine_node.node.errors import NodeError, ResultsError, SpoolError
from spine_node.node.jobs import claim_job, reconcile, retry_job, send_pending, tick
from spine_node.node.results import SHORT_DISCLAIMER, encode, write_results
from tests.jobs_samples import ct_series as spool_ct_series
from tests.orthanc import Orthanc
from tests.peers import require
from tests.pipelines_for_tests import ABSTAIN, ABSTAIN_REASON, BROKEN, REFUSE, REFUSE_MESSAGE_PREFIX
from tests.test_jobs import add_job, job_row, node_env, settings_from, wait_for, workers  # noqa: F401
from tests.test_results import (
    PHI_VALUES,
    assert_valid,
    centroid_findings,
    ct_series,
    not_performed,
    text_of,
)

JS_DIR = Path(__file__).resolve().parent / "js"
# The spool samples copy pydicom's CT_small.dcm, which records a weight of 0 kg; the
# PHI-laden one has its Study Date and Time blanked (a DICOMDIR would want them).
KNOWN_WARNINGS = ["</PatientWeight(0010,1030)[1]> - Value is zero",
                  "Missing attribute or value that would be needed to build DICOMDIR"]


# --- reasons -----------------------------------------------------------------------------


class NotAssessableError(PipelineError):
    """Stands in for inference's NotAssessableError: found by class name along the MRO."""


def test_failure_reasons_come_from_the_class_never_the_message() -> None:
    secret = "DOE^JANE 19800101"
    reason = notices.failure_reason(PipelineError(f"bad series of {secret}"))
    assert reason.code == "pipeline-error" and secret not in reason.text
    assert notices.failure_reason(SpoolError(secret)).code == "input-unreadable"
    # A subclass without an entry of its own gets its base's sentence.
    assert notices.failure_reason(type("OddResultsError", (ResultsError,), {})(secret)).code == "results-error"
    assert notices.failure_reason(NodeError(secret)).code == "node-error"
    assert notices.failure_reason(MemoryError()).code == "out-of-memory"
    unexpected = notices.failure_reason(ValueError(f"Unable to convert '{secret}' to 'DA'"))
    assert unexpected.code == "internal-error" and secret not in unexpected.text
    # A not-assessable error's message is written for the radiologist: it is the reason.
    one_slice = notices.failure_reason(NotAssessableError("Only 1 slice\n"))
    assert one_slice.text == "Only 1 slice" and one_slice.code == "not-assessable:Only 1 slice"
    assert notices.gave_up_reason(3).code != notices.gave_up_reason(3, worker_lost=True).code
    try:
        raise ValueError(f"Unable to convert '{secret}' to 'DA'")
    except ValueError as exc:
        trace = notices.safe_traceback(exc)
    assert "ValueError" in trace and "test_notices.py" in trace and secret not in trace


# --- what OHIF reads (dcmjs) -------------------------------------------------------------


def dcmjs_read(path: Path) -> dict[str, Any]:
    """``tests/js/sr_measurements.js``: the SR as OHIF's DICOM SR extension sees it."""
    node = shutil.which("node")
    require(node is not None, "node (Node.js) not installed (Debian package nodejs)")
    assert node is not None
    if not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        npm = shutil.which("npm")
        require(npm is not None, "npm not installed; run `npm ci` in tests/js")
        assert npm is not None
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                              capture_output=True, text=True, timeout=300)
        require(done.returncode == 0, f"`npm ci` in tests/js failed: {done.stderr[-500:]}")
    run = subprocess.run([node, str(JS_DIR / "sr_measurements.js"), str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return dict(json.loads(run.stdout))


def test_dcmjs_sees_a_scoord3d_point_for_every_finding_with_a_centroid(tmp_path: Path) -> None:
    sources = ct_series(slices=4)
    findings = centroid_findings(sources)
    paths = write_results(encode(findings, sources), tmp_path)
    sr = dcmjs_read(paths[-1])
    graphics = {g["trackingIdentifier"]: g["graphic"] for g in sr["groups"]}
    assert graphics["fracture C3"] == {
        "valueType": "SCOORD3D", "graphicType": "POINT", "graphicData": [1.5, -20.25, 30.0],
        "frameOfReferenceUID": str(sources[0].FrameOfReferenceUID), "conceptName": "Center",
    }
    assert graphics["fracture C5"]["graphicData"] == [-3.0, 4.0, 41.5]
    # Findings without a centroid have no place to show, as before.
    assert graphics["fracture C4"] is None and graphics["fracture image"] is None
    assert SHORT_DISCLAIMER in sr["rootTexts"]
    assert SHORT_DISCLAIMER in sr["seriesDescription"]


def test_dcmjs_reads_the_not_performed_report(tmp_path: Path) -> None:
    sources = ct_series(slices=2)
    (path,) = write_results(encode(not_performed(sources, "Only 1 slice"), sources), tmp_path)
    sr = dcmjs_read(path)
    (group,) = sr["groups"]
    assert group["trackingIdentifier"] == "Analysis not performed"
    assert "Analysis not performed: Only 1 slice" in group["texts"]
    assert sr["rootTexts"][-1] == SHORT_DISCLAIMER


# --- failing for good, in process --------------------------------------------------------


@pytest.fixture
def local_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    env = node_env(tmp_path, url, SPINE_NODE_WORKER__MAX_ATTEMPTS="2",
                   SPINE_NODE_DISPATCH__DESTINATIONS=json.dumps(
                       [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}]))
    settings = settings_from(env, monkeypatch)
    db = Database(url)
    yield settings, db
    db.dispose()


def notice_rows(db: Database, job_id: int) -> list[tuple[Result, list[Dispatch]]]:
    with db.session() as session:
        rows = session.scalars(select(Result).where(Result.job_id == job_id)).all()
        return [(r, list(session.scalars(select(Dispatch).where(Dispatch.result_id == r.id))))
                for r in rows]


def test_jobs_that_give_up_send_a_notice_with_stable_uids(local_node) -> None:  # type: ignore[no-untyped-def]
    settings, db = local_node
    study, series, files = spool_ct_series(settings.storage.spool)
    # The poison message: attempts used up before a worker could claim it again.
    spent = add_job(db, study, series)
    with db.session() as session:
        session.get(Job, spent).attempts = settings.worker.max_attempts
    assert claim_job(db, settings, spent) is None
    assert job_row(db, spent).state == "failed"
    ((result, dispatches),) = notice_rows(db, spent)
    assert result.kind == "SR" and [d.destination for d in dispatches] == ["pacs"]
    assert dispatches[0].state == "pending"
    sr = dcmread(result.path)
    assert "Analysis not performed: The analysis did not finish (stopped after 2 attempt(s))" in text_of(sr)
    assert {ref.ReferencedSOPInstanceUID for study_ in sr.CurrentRequestedProcedureEvidenceSequence
            for s in study_.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence} == {
        dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert_valid([Path(result.path)], allowed_warnings=KNOWN_WARNINGS)

    # The same job failing the same way again replaces its notice (same UIDs, one row).
    retry_job(db, settings, spent)
    with db.session() as session:
        session.get(Job, spent).attempts = settings.worker.max_attempts
    claim_job(db, settings, spent)
    ((again, _),) = notice_rows(db, spent)
    assert again.sop_instance_uid == result.sop_instance_uid

    # A worker lost on the last attempt: another reason, so another notice.
    with db.session() as session:
        job = session.get(Job, spent)
        job.state, job.worker = "running", "gone-host:1"
        job.heartbeat_at = job.started_at = utcnow() - timedelta(hours=1)
    assert spent in reconcile(db, settings).failed
    rows = notice_rows(db, spent)
    assert len(rows) == 2 and len({r.sop_instance_uid for r, _ in rows}) == 2
    lost = next(r for r, _ in rows if r.sop_instance_uid != result.sop_instance_uid)
    assert "the computer running it stopped" in text_of(dcmread(lost.path))
    with db.session() as session:
        kinds = [e.kind for e in session.scalars(select(AuditEvent).where(AuditEvent.job_id == spent))]
    assert kinds.count("notice.created") == 3


def test_failure_notices_can_be_turned_off(local_node) -> None:  # type: ignore[no-untyped-def]
    settings, db = local_node
    study, series, _ = spool_ct_series(settings.storage.spool)
    job_id = add_job(db, study, series)
    settings.dispatch.send_failure_notices = False
    notices.after_failure(db, settings, job_id, notices.failure_reason(PipelineError("x")))
    assert notice_rows(db, job_id) == []
    settings.dispatch.send_failure_notices = True
    notices.after_failure(db, settings, job_id, notices.failure_reason(PipelineError("x")))
    assert len(notice_rows(db, job_id)) == 1
    # A series gone from the spool gives no notice (nothing to say it about), and no error.
    gone = add_job(db, study, "1.2.826.0.1.3680043.99.2")
    notices.after_failure(db, settings, gone, notices.failure_reason(SpoolError("x")))
    assert notice_rows(db, gone) == []


# --- end to end: a real worker, a real Orthanc -------------------------------------------


def phi_spool_series(spool: Path) -> tuple[str, str, list[Path]]:
    """A CT series in the spool whose files carry patient/study values invalid for their VR."""
    study, series, files = spool_ct_series(spool, tag="phi")
    for path in files:
        ds = dcmread(path)
        with warnings.catch_warnings(), pydicom.config.disable_value_validation():
            warnings.simplefilter("ignore")
            for keyword, value in PHI_VALUES.items():
                setattr(ds, keyword, value)
            ds.save_as(path, enforce_file_format=True)
    return study, series, files


def test_abstaining_failing_and_phi_laden_jobs_all_reach_orthanc(
    tmp_path: Path, workers: Callable[..., Any], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    with Orthanc(tmp_path / "orthanc") as pacs:
        env = node_env(tmp_path, url, SPINE_NODE_WORKER__MAX_ATTEMPTS="1",
                       SPINE_NODE_DISPATCH__DESTINATIONS=json.dumps(
                           [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                             "port": pacs.dicom_port}]))
        settings = settings_from(env, monkeypatch)
        db = Database(url)
        study, series, _ = spool_ct_series(settings.storage.spool)
        phi_study, phi_series, phi_files = phi_spool_series(settings.storage.spool)
        jobs = {
            "abstain": add_job(db, study, series, pipeline=ABSTAIN),
            "refuse": add_job(db, study, series, pipeline=REFUSE),
            "broken": add_job(db, study, series, pipeline=BROKEN),
            "phi": add_job(db, phi_study, phi_series),
        }
        send_pending(db, settings)
        worker = workers(env)

        def settled() -> bool:
            tick(db, settings)
            with db.session() as session:
                pending = session.scalars(select(Dispatch).where(Dispatch.state != "sent")).all()
                done = all(session.get(Job, j).state in ("succeeded", "failed") for j in jobs.values())
                return done and not pending and bool(session.scalars(select(Dispatch)).all())

        wait_for(settled, "every job to finish and every result to reach Orthanc")
        states = {name: job_row(db, j).state for name, j in jobs.items()}
        assert states == {"abstain": "succeeded", "refuse": "failed", "broken": "failed",
                          "phi": "succeeded"}, worker.output()

        # Orthanc holds one not-performed SR per abstaining or failed job, each saying why.
        stored = {i["SOPInstanceUID"]: i for i in pacs.instances()}
        texts = {}
        for name in ("abstain", "refuse", "broken"):
            ((result, dispatches),) = notice_rows(db, jobs[name])
            assert result.kind == "SR" and [d.state for d in dispatches] == ["sent"]
            assert result.sop_instance_uid in stored
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(pacs.file(stored[result.sop_instance_uid]["ID"]))
            assert_valid([path], allowed_warnings=KNOWN_WARNINGS)
            sr = dcmread(path)
            assert sr.Modality == "SR" and "not performed" in sr.SeriesDescription
            texts[name] = text_of(sr)
        assert f"Analysis not performed: {ABSTAIN_REASON}" in texts["abstain"]
        assert "C7: not in field of view: no cervical spine in the series" in texts["abstain"]
        assert "Note: The series was checked for a cervical spine only" in texts["abstain"]
        assert "Analysis not performed: The analysis could not be completed on these images" in texts["refuse"]
        assert "Analysis not performed: The analysis stopped on an internal error" in texts["broken"]
        assert all(REFUSE_MESSAGE_PREFIX not in text for text in texts.values())
        assert "ZeroDivisionError" not in texts["broken"]

        # The PHI-laden series: results valid, stored, and the bad values nowhere.
        phi_results = notice_rows(db, jobs["phi"])
        assert sorted(r.kind for r, _ in phi_results) == ["SEG", "SR"]
        assert {r.sop_instance_uid for r, _ in phi_results} <= set(stored)
        assert_valid([Path(r.path) for r, _ in phi_results], allowed_warnings=KNOWN_WARNINGS)
        for result, _ in phi_results:
            ds = dcmread(result.path)
            assert ds.PatientBirthDate == "" and "PatientAge" not in ds
        with db.session() as session:
            events = session.scalars(select(AuditEvent)).all()
            job_errors = [j.error or "" for j in session.scalars(select(Job))]
            dispatch_errors = [d.last_error or "" for d in session.scalars(select(Dispatch))]
        (sanitised,) = [e for e in events if e.kind == "result.sanitised"]
        assert sanitised.job_id == jobs["phi"]
        assert sanitised.details == {
            "blanked": ["PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyDate", "StudyTime"],
            "dropped": ["PatientAge"],
        }
        audit_text = "\n".join(f"{e.message} {json.dumps(e.details)}" for e in events)
        haystacks = {"job errors": "\n".join(job_errors), "dispatch errors": "\n".join(dispatch_errors),
                     "audit": audit_text, "worker log": worker.output()}
        for where, text in haystacks.items():
            for keyword, value in PHI_VALUES.items():
                assert value not in text, f"{keyword} value found in the {where}"
        # The sources in the spool are as they came.
        assert dcmread(phi_files[0]).get_item("PatientBirthDate").value.startswith(b"1980-01-01")
        db.dispose()


def test_headers_read_back_from_bytes_keep_raw_values() -> None:
    """The PHI checks above rely on pydicom leaving read values unconverted until used."""
    ds = ct_series(slices=1)[0]
    with warnings.catch_warnings(), pydicom.config.disable_value_validation():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = "1980-01-01"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    read = dcmread(buffer)
    assert type(read.get_item("PatientBirthDate")).__name__ == "RawDataElement"


def test_a_peers_error_comment_is_not_kept() -> None:
    """A PACS may quote what it rejected; dispatch errors go to the audit and the log."""
    from pydicom import Dataset

    from spine_node.node.dispatch import _store_failure

    response = Dataset()
    response.Status = 0xA900
    response.ErrorComment = "PatientBirthDate '1980-01-01' invalid"
    text = _store_failure(response)
    assert "0xA900" in text and "Does Not Match SOP Class" in text
    assert "1980" not in text and "PatientBirthDate" not in text
