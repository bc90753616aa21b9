"""A test-only pipeline, loaded by workers through ``worker.pipeline_modules``.

``test-bone-threshold`` needs no model: it thresholds the CT series at ``BONE_HU`` into a
bone mask and reports the bone fraction of the series as the "probability" of a finding
(coded as the generic "damage" kind, since the encoder only codes known kinds). It is a
statistic of the pixels, not a diagnosis; every output is computed from the input.

When ``SPINE_NODE_TEST_GATE_DIR`` is set, the pipeline writes ``started-<pid>`` there
and waits for a file named ``open`` before it finishes, so a test can act while a job
is running (kill the worker, restart the broker).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread

from spine_node.inference.errors import PipelineError
from spine_node.inference.findings import (
    AssessmentValues,
    Finding,
    Findings,
    LabelMap,
    ModelInfo,
    Segment,
    SiteStatus,
)
from spine_node.inference.pipelines import ModelProvider, register
from spine_node.inference.series import SeriesRef
from tests.jobs_samples import BONE_HU, hounsfield

NAME = "test-bone-threshold"
GATE_ENV = "SPINE_NODE_TEST_GATE_DIR"
GATE_WAIT_S = 120.0


class BoneThreshold:
    name = NAME

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = inputs[0]
        datasets = [dcmread(path) for path in series.files()]
        if not datasets:
            raise PipelineError(f"series {series.series_uid} has no instances")
        if any(str(ds.get("Modality", "")) != "CT" for ds in datasets):
            raise PipelineError(f"series {series.series_uid} is not CT")
        datasets.sort(key=lambda ds: int(ds.get("InstanceNumber", 0)))
        mask = np.stack([hounsfield(ds) >= BONE_HU for ds in datasets]).astype(np.uint8)
        _wait_for_gate()
        return Findings(
            pipeline=NAME,
            model=ModelInfo(name=NAME, version="1", backend="numpy",
                            weights="none (fixed threshold)", trained_on="nothing"),
            study_uid=series.study_uid,
            series_uids=(series.series_uid,),
            source_sop_instance_uids=tuple(ds.SOPInstanceUID for ds in datasets),
            findings=[Finding(kind="damage", probability=float(mask.mean()), threshold=0.05,
                              segment_label=1)],
            segmentation=LabelMap(labels=mask,
                                  source_sop_instance_uids=tuple(ds.SOPInstanceUID
                                                                 for ds in datasets),
                                  segments=(Segment(1, "bone"),)),
        )


def _wait_for_gate() -> None:
    folder = os.environ.get(GATE_ENV)
    if not folder:
        return
    gate = Path(folder)
    (gate / f"started-{os.getpid()}").touch()
    deadline = time.monotonic() + GATE_WAIT_S
    while not (gate / "open").exists():
        if time.monotonic() > deadline:
            raise PipelineError(f"test gate {gate} not opened within {GATE_WAIT_S:g} s")
        time.sleep(0.1)


@register(NAME)
def _factory() -> BoneThreshold:
    return BoneThreshold()


BROKEN = "test-broken"


class Broken:
    """A pipeline with a bug: it divides by the number of instances of an empty list."""

    name = BROKEN

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        empty: list[int] = []
        mean = sum(empty) / len(empty)  # ZeroDivisionError, not a NodeError
        raise AssertionError(f"unreachable {mean}")


@register(BROKEN)
def _broken_factory() -> Broken:
    return Broken()


ABSTAIN = "test-abstain"
ABSTAIN_REASON = "Cervical spine not in the field of view"


class Abstain:
    """A pipeline that looks at its input and declines it: the node sends "not performed".

    Every level C1..C7 is reported not in the field of view, with a note, as a pipeline
    does when the series shows no cervical spine.
    """

    name = ABSTAIN

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = inputs[0]
        uids = tuple(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                     for path in series.files())
        return Findings(
            pipeline=ABSTAIN,
            model=ModelInfo(name=ABSTAIN, version="1", backend="none", trained_on="nothing"),
            study_uid=series.study_uid,
            series_uids=(series.series_uid,),
            source_sop_instance_uids=uids,
            not_performed_reason=ABSTAIN_REASON,
            site_status=tuple(SiteStatus(f"C{n}", AssessmentValues.NOT_IN_FIELD,
                                         "no cervical spine in the series") for n in range(1, 8)),
            notes=("The series was checked for a cervical spine only",),
        )


@register(ABSTAIN)
def _abstain_factory() -> Abstain:
    return Abstain()


REFUSE = "test-refuse"
#: The refusing pipeline's error text: it quotes a value from the file, as careless code
#: might; it must never reach the SR, the job row, the audit or the log of the notice.
REFUSE_MESSAGE_PREFIX = "cannot use this series of patient "


class Refuse:
    """A pipeline that fails on purpose with a PipelineError quoting the patient's name."""

    name = REFUSE

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        first = dcmread(inputs[0].files()[0], stop_before_pixels=True)
        raise PipelineError(REFUSE_MESSAGE_PREFIX + str(first.get("PatientName", "")))


@register(REFUSE)
def _refuse_factory() -> Refuse:
    return Refuse()
