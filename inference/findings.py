"""What a pipeline returns: plain dataclasses, independent of DICOM encoding.

``spine_node.node.results`` turns :class:`Findings` into DICOM SEG and SR. Structures and finding
kinds are named by keys (``"C1"``, ``"fracture"``) that the encoder maps to codes, so
pipelines never deal with coding schemes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    threshold: float = 0.5
    segment_label: int | None = None

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class Findings:
    """Everything one pipeline run found in its input series."""

    pipeline: str
    model: ModelInfo
    study_uid: str
    series_uids: tuple[str, ...]
    source_sop_instance_uids: tuple[str, ...]
    findings: list[Finding] = field(default_factory=list)
    segmentation: LabelMap | None = None
    probability_map: ProbabilityMap | None = None
    models: tuple[ModelInfo, ...] = ()
