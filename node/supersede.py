"""What a newer result replaces: earlier SRs of the same job, named in the new SR.

A job that re-runs over a series that has grown, or with another model, produces objects
with new UIDs (``results.result_uid`` derives them from the exact source set and the
models). The PACS may already hold the earlier SR; the new SR names it in its
Predecessor Documents Sequence (SR Document General Module, required when a document
replaces others), so a reader can tell which report is current. ``jobs.record_success``
stops sending the earlier objects and audits the replacement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from spine_node.node.audit import Database, Result
from spine_node.node.jobs import Claim

_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


@dataclass(frozen=True)
class PriorReport:
    """An SR recorded by an earlier run of a job."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str


def prior_reports(db: Database, claim: Claim) -> list[PriorReport]:
    """The SRs earlier runs of the claimed job recorded."""
    with db.session() as session:
        rows = session.scalars(select(Result).where(Result.job_id == claim.job_id,
                                                    Result.kind == "SR").order_by(Result.id)).all()
        # Results are stored at <results>/<study>/<series>/<sop>.dcm.
        return [PriorReport(Path(r.path).parent.parent.name or claim.study_uid, r.series_uid,
                            r.sop_class_uid, r.sop_instance_uid) for r in rows]


def add_predecessors(datasets: Sequence[Dataset], prior: Sequence[PriorReport]) -> None:
    """Name in each SR of ``datasets`` the prior reports it replaces.

    A prior report with the SR's own UID (the same inputs and models, so the same
    content) is not its own predecessor.
    """
    for ds in datasets:
        if not str(ds.SOPClassUID).startswith(_SR_PREFIX):
            continue
        studies: dict[str, Dataset] = {}
        for report in prior:
            if report.sop_instance_uid == ds.SOPInstanceUID:
                continue
            study = studies.get(report.study_uid)
            if study is None:
                study = studies[report.study_uid] = Dataset()
                study.StudyInstanceUID = report.study_uid
                study.ReferencedSeriesSequence = []
            series = next((s for s in study.ReferencedSeriesSequence
                           if s.SeriesInstanceUID == report.series_uid), None)
            if series is None:
                series = Dataset()
                series.SeriesInstanceUID = report.series_uid
                series.ReferencedSOPSequence = []
                study.ReferencedSeriesSequence.append(series)
            item = Dataset()
            item.ReferencedSOPClassUID = report.sop_class_uid
            item.ReferencedSOPInstanceUID = report.sop_instance_uid
            series.ReferencedSOPSequence.append(item)
        if studies:
            ds.PredecessorDocumentsSequence = list(studies.values())
