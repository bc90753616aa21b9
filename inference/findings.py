"""What a pipeline returns: plain dataclasses, independent of DICOM encoding.

``spine_node.node.results`` turns :class:`Findings` into DICOM SEG and SR. Structures and finding
kinds are named by keys (``"C1"``, ``"fracture"``) that the encoder maps to codes, so
pipelines never deal with coding schemes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class AssessmentValues(StrEnum):
    """What a pipeline could say about one site (a vertebra level, a view).

    Every site a pipeline is meant to cover ends in one of these; the SR states it, so a
    radiologist can tell "assessed, no fracture" from "not looked at".
    """

    ASSESSED = "assessed"
    #: the site is outside the imaged field (e.g. C7 below the last slice)
    NOT_IN_FIELD = "not in field"
    #: the site is in the field but the model cannot assess it (reason given)
    NOT_ASSESSABLE = "not assessable"


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a result, on which backend, from which weights."""

    name: str
    version: str
    backend: str = ""
    weights: str = ""
    trained_on: str = ""
    clinical_use: bool = False


@dataclass(frozen=True)
class Segment:
    """One labelled structure: ``label`` value in the label map and a structure key."""

    label: int
    name: str


@dataclass
class LabelMap:
    """Label masks aligned with source frames.

    ``labels`` has shape ``(frames, rows, columns)``; frame ``i`` was derived from the
    source instance ``source_sop_instance_uids[i]`` (for a CT series, one per slice in the
    order the pipeline sorted them). Value 0 is background.
    """

    labels: np.ndarray
    source_sop_instance_uids: tuple[str, ...]
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        if self.labels.ndim != 3:
            raise ValueError(f"labels must be 3-D (frames, rows, columns), got {self.labels.shape}")
        if self.labels.shape[0] != len(self.source_sop_instance_uids):
            raise ValueError(
                f"{self.labels.shape[0]} label frames but "
                f"{len(self.source_sop_instance_uids)} source instances"
            )


@dataclass
class ProbabilityMap:
    """A fractional map in [0, 1] (e.g. a saliency heat map), aligned like :class:`LabelMap`."""

    values: np.ndarray
    source_sop_instance_uids: tuple[str, ...]
    name: str


@dataclass(frozen=True)
class Finding:
    """A classification result: ``kind`` at ``site`` (None: image/patient level)."""

    kind: str
    probability: float
    site: str | None = None
    #: rule-in operating point: at or above it the finding is present
    threshold: float = 0.5
    segment_label: int | None = None
    #: where the finding is, in patient coordinates (mm, DICOM LPS) of the source frame of
    #: reference (e.g. a vertebra's centroid), for an SCOORD3D point a viewer can jump to
    centroid_mm: tuple[float, float, float] | None = None
    #: rule-out operating point (None: one cut at ``threshold``): below it the finding is
    #: absent, between it and ``threshold`` indeterminate (the model cannot tell; a reader
    #: should look)
    rule_out: float | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def indeterminate(self) -> bool:
        return self.rule_out is not None and self.rule_out <= self.probability < self.threshold

    @property
    def call(self) -> str:
        """``"present"``, ``"indeterminate"`` or ``"absent"``."""
        return "present" if self.present else "indeterminate" if self.indeterminate else "absent"


@dataclass(frozen=True)
class SiteStatus:
    """The assessment of one site (``"C1"`` .. ``"C7"``, a view) and, unless assessed, why.

    ``reason`` is written for a radiologist ("C7 is below the last slice"), never contains
    patient data, and is at most a sentence.
    """

    site: str
    assessment: AssessmentValues
    reason: str = ""


@dataclass
class Findings:
    """Everything one pipeline run found in its input series.

    A pipeline that cannot assess the input at all (no cervical spine in the field, slices
    too thick, not a spine radiograph) sets ``not_performed_reason``, leaves ``findings``
    and ``segmentation`` empty, and the node sends an SR saying the analysis was not
    performed and why. ``site_status`` lists every site the pipeline covers with its
    :class:`AssessmentValues`; ``notes`` are short statements for the report such as an
    assumption made ("no pixel spacing in the file; 0.15 mm assumed").
    """

    pipeline: str
    model: ModelInfo
    study_uid: str
    series_uids: tuple[str, ...]
    source_sop_instance_uids: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    segmentation: LabelMap | None = None
    probability_map: ProbabilityMap | None = None
    models: tuple[ModelInfo, ...] = ()
    site_status: tuple[SiteStatus, ...] = ()
    not_performed_reason: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def performed(self) -> bool:
        return self.not_performed_reason is None
