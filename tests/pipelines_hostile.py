"""Test-only pipelines for hostile pixel data, loaded by workers through ``worker.pipeline_modules``.

- ``test-memory-hog`` decodes nothing: it allocates the volume the series' headers declare
  (Rows x Columns x slices of float32), as a loader does before filling it. For headers
  claiming 65535 x 65535 that allocation fails with :class:`MemoryError`, which must fail
  the job, not the worker.
- ``test-checked-decode`` is a loader done right: :func:`check_pixel_data` before
  ``pixel_array``, then a finding computed from the decoded pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import dcmread

from spine_node.inference.findings import Findings, ModelInfo
from spine_node.inference.pipelines import ModelProvider, register
from spine_node.inference.pixels import check_pixel_data
from spine_node.inference.series import SeriesRef

MEMORY_HOG = "test-memory-hog"
CHECKED_DECODE = "test-checked-decode"


def _findings(name: str, series: SeriesRef, sources: tuple[str, ...]) -> Findings:
    return Findings(pipeline=name, model=ModelInfo(name=name, version="1", backend="numpy",
                                                   weights="none", trained_on="nothing"),
                    study_uid=series.study_uid, series_uids=(series.series_uid,),
                    source_sop_instance_uids=sources)


class MemoryHog:
    name = MEMORY_HOG

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = inputs[0]
        headers = [dcmread(path, stop_before_pixels=True) for path in series.files()]
        shape = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
        volume = np.empty(shape, dtype=np.float32)  # MemoryError where the claim is absurd
        # Only where this machine overcommits memory without limit does that succeed.
        raise MemoryError(f"allocated {volume.nbytes} bytes lazily; no room to fill them")


class CheckedDecode:
    name = CHECKED_DECODE

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = inputs[0]
        datasets = [dcmread(path) for path in series.files()]
        check_pixel_data(datasets, CHECKED_DECODE)
        for ds in datasets:
            ds.pixel_array  # noqa: B018 - the decode this check guards
        return _findings(CHECKED_DECODE, series, tuple(str(ds.SOPInstanceUID) for ds in datasets))


@register(MEMORY_HOG)
def _hog() -> MemoryHog:
    return MemoryHog()


@register(CHECKED_DECODE)
def _checked() -> CheckedDecode:
    return CheckedDecode()
