"""Results encoding: :class:`~inference.findings.Findings` to DICOM SEG and SR (TID 1500).

Thin builders over highdicom. Every result UID is derived from the input series, the
pipeline and the model(s) that produced the findings (DESIGN decision 3), so encoding the
same findings again gives the same Series and SOP Instance UIDs and a PACS replaces rather
than duplicates them. Series numbers and equipment come from :class:`ResultsOptions`,
never from random numbers.

Objects built here:

* a BINARY Segmentation from ``findings.segmentation`` (one segment per label),
* a FRACTIONAL (probability) Segmentation from ``findings.probability_map``; both SEG
  instances share one series,
* a Comprehensive 3D SR following TID 1500 Measurement Report, with one measurement group
  per finding (probability as a measurement, present/absent as a qualitative evaluation)
  that references the source images and, when a SEG is given, its segments.

A worker calls ``write_results(encode(findings, sources, options=ResultsOptions.
from_settings(settings)), settings.storage.results)``; ``sources`` may be read with
``stop_before_pixels=True``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from spine_node.inference.findings import Finding, Findings, LabelMap, ModelInfo, ProbabilityMap
from spine_node.node import __version__, codes
from spine_node.node.errors import ResultsError
from spine_node.node.uids import derive_uid, validate_uid

log = logging.getLogger(__name__)

NOT_FOR_CLINICAL_USE = "DEMO WEIGHTS, NOT FOR CLINICAL USE"
# The segmentation pixel value that a fractional SEG stores for probability 1.0.
MAX_FRACTIONAL_VALUE = 255
# Probability maps may overshoot [0, 1] by float rounding; more than this is an error.
_PROBABILITY_TOLERANCE = 1e-4
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept(
    value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations"
)


@dataclass(frozen=True)
class ResultsOptions:
    """Equipment and numbering of result objects (IHE AIR "equipment" in one place).

    Parameters
    ----------
    manufacturer, manufacturer_model_name, software_versions, device_serial_number
        General / Enhanced General Equipment of every result object.
    institution_name
        Copied into the SR when given.
    seg_series_number, sr_series_number
        Series Number of the SEG series and of the SR series.
    image_library_max_images
        The SR's TID 1600 Image Library (optional in TID 1500) describes each source image
        (modality, geometry); it is left out above this many sources: for a 300-slice CT it
        took 8 of 10 s of encoding and 1.1 of 1.3 MB of the SR, and the measurement groups
        reference their images and segments without it.
    """

    manufacturer: str = "spine-node"
    manufacturer_model_name: str = "spine-node"
    software_versions: str = __version__
    device_serial_number: str = "SPINE_NODE"
    institution_name: str | None = None
    seg_series_number: int = 9001
    sr_series_number: int = 9002
    image_library_max_images: int = 16

    def __post_init__(self) -> None:
        for name in ("seg_series_number", "sr_series_number", "image_library_max_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
                raise ResultsError(f"{name} {value!r} out of range 0 to 2147483647")
        for name in ("manufacturer", "manufacturer_model_name", "device_serial_number"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                raise ResultsError(f"{name} {value!r}: expected 1-64 characters")

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> ResultsOptions:
        """Options for a node: the device serial number is the node's AE title."""
        values: dict[str, Any] = {"device_serial_number": settings.dicom.ae_title}
        values.update(overrides)
        return cls(**values)


# ---------------------------------------------------------------- UIDs and text


def result_uid(findings: Findings, kind: str) -> str:
    """Deterministic UID of one result object or series of ``findings``.

    Derived from the input series UIDs, the exact set of source instances, the pipeline,
    the model name and version (and every further model of a multi-stage pipeline) and
    ``kind`` (``"seg-series"``, ``"seg"``, ``"seg-fractional"``, ``"sr-series"``, ``"sr"``,
    ...). A re-run over the same inputs with the same models reproduces its UIDs; a run
    over a series that has grown, or with another model, gets new ones, so one UID never
    names two different contents.
    """
    parts = [*sorted(findings.series_uids), findings.pipeline]
    parts.append(source_set_digest(findings.source_sop_instance_uids))
    parts += [findings.model.name, findings.model.version]
    parts += [f"{m.name}@{m.version}" for m in findings.models]
    parts.append(kind)
    return derive_uid(*parts)


def source_set_digest(sop_instance_uids: Sequence[str]) -> str:
    """One value for a set of source instances (order and repeats do not matter)."""
    joined = "\n".join(sorted(set(sop_instance_uids)))
    return "sources:" + hashlib.sha256(joined.encode("ascii", "replace")).hexdigest()


def _all_models(findings: Findings) -> tuple[ModelInfo, ...]:
    """The model and every further stage model, each once."""
    return tuple(dict.fromkeys((findings.model, *findings.models)))


def _clinical(findings: Findings) -> bool:
    return all(m.clinical_use for m in _all_models(findings))


def _description(findings: Findings, what: str) -> str:
    """Series Description (LO, at most 64 characters); the demo note is never cut off."""
    suffix = "" if _clinical(findings) else " (demo, not clinical)"
    return f"{findings.pipeline} {what}"[: 64 - len(suffix)] + suffix


def _disclaimer(findings: Findings) -> str:
    parts = []
    for model in _all_models(findings):
        text = f"{model.name} {model.version}"
        if not model.clinical_use:
            trained = f", trained on {model.trained_on}" if model.trained_on else ""
            text += f" (demo weights{trained})"
        parts.append(text)
    text = f"Produced automatically by spine-node pipeline {findings.pipeline} with "
    text += ", ".join(parts) + "."
    if not _clinical(findings):
        text += " The weights are not validated for clinical use: NOT FOR CLINICAL USE."
    return text


def _model_parameters(model: ModelInfo) -> dict[str, str]:
    params = {"backend": model.backend or "unknown"}
    if model.weights:
        params["weights"] = model.weights
    if model.trained_on:
        params["trained_on"] = model.trained_on
    params["clinical_use"] = "true" if model.clinical_use else "false"
    return params


def _seg_algorithm(findings: Findings) -> hd.AlgorithmIdentificationSequence:
    model = findings.model
    params = _model_parameters(model)
    for index, extra in enumerate(_all_models(findings)[1:], start=1):
        params[f"model_{index}"] = f"{extra.name} {extra.version} backend={extra.backend}"
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ALGORITHM_FAMILY,
        version=model.version,
        source="spine-node",
        parameters=params,
    )


def _sr_algorithm(
    findings: Findings, finding: Finding | None = None
) -> hd.sr.AlgorithmIdentification:
    params = [f"{key}={value}" for key, value in _model_parameters(findings.model).items()]
    if finding is not None:
        params.append(f"threshold={finding.threshold:g}")
    return hd.sr.AlgorithmIdentification(
        name=findings.model.name,
        version=findings.model.version,
        parameters=params,
        family=codes.ALGORITHM_FAMILY,
        manufacturer="spine-node",
    )


def _declare_schemes(dataset: Dataset) -> None:
    if codes.uses_private_scheme(dataset):
        dataset.CodingSchemeIdentificationSequence = [codes.private_scheme_identification()]


# ---------------------------------------------------------------- sources


def _frames_sources(frame_uids: Sequence[str], sources: Sequence[Dataset]) -> list[Dataset]:
    """The source datasets for the label frames, in frame order.

    Single-frame sources: one dataset per frame (``frame_uids[i]`` is frame ``i``'s
    instance). One multi-frame source: every frame names it, in its frame order.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = sorted({uid for uid in frame_uids if uid not in by_uid})
    if missing:
        raise ResultsError(
            f"{len(missing)} source instance(s) named by the findings are not among the "
            f"{len(sources)} source datasets, e.g. {missing[0]}"
        )
    distinct = list(dict.fromkeys(frame_uids))
    if len(distinct) == 1 and int(by_uid[distinct[0]].get("NumberOfFrames", 1)) > 1:
        source = by_uid[distinct[0]]
        if int(source.NumberOfFrames) != len(frame_uids):
            raise ResultsError(
                f"{len(frame_uids)} label frames for multi-frame source "
                f"{distinct[0]} with {source.NumberOfFrames} frames"
            )
        return [source]
    if len(distinct) != len(frame_uids):
        raise ResultsError("label frames name the same single-frame source instance twice")
    return [by_uid[uid] for uid in frame_uids]


def _check_geometry(array: np.ndarray, sources: Sequence[Dataset]) -> None:
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if array.shape[1:] != (rows, columns):
        raise ResultsError(
            f"map of {array.shape[1]}x{array.shape[2]} pixels does not match source "
            f"images of {rows}x{columns}"
        )


def segment_numbers(labelmap: LabelMap) -> dict[int, int]:
    """Label value to SEG segment number: labels in ascending order numbered from 1."""
    labels = sorted(segment.label for segment in labelmap.segments)
    if len(set(labels)) != len(labels):
        raise ResultsError(f"label map segments repeat a label value: {labels}")
    if any(label <= 0 for label in labels):
        raise ResultsError(f"segment labels must be positive (0 is background): {labels}")
    return {label: number for number, label in enumerate(labels, start=1)}


# ---------------------------------------------------------------- SEG


def build_segmentation(
    findings: Findings,
    sources: Sequence[Dataset],
    *,
    series_number: int | None = None,
    instance_number: int = 1,
    options: ResultsOptions | None = None,
) -> hd.seg.Segmentation:
    """A BINARY Segmentation of ``findings.segmentation``, one segment per label.

    Frame ``i`` of the label map is encoded against the source instance
    ``findings.segmentation.source_sop_instance_uids[i]``, whatever the order of
    ``sources``. Frames without any foreground are omitted from the SEG (highdicom's
    ``omit_empty_frames``); each stored frame references its own source instance, so
    omission never shifts a mask onto another slice.

    Raises
    ------
    ResultsError
        No segmentation, a label value without a segment, a structure key without a
        code, or sources that do not match the label map.
    """
    labelmap = findings.segmentation
    if labelmap is None:
        raise ResultsError(f"findings of {findings.pipeline} have no segmentation")
    options = options or ResultsOptions()
    numbers = segment_numbers(labelmap)
    labels = np.asarray(labelmap.labels)
    present = {int(v) for v in np.unique(labels)} - {0}
    unknown = sorted(present - set(numbers))
    if unknown:
        raise ResultsError(f"label map has values without a segment: {unknown}")
    frame_sources = _frames_sources(labelmap.source_sop_instance_uids, sources)
    _check_geometry(labels, frame_sources)

    dtype = np.uint8 if len(numbers) < 256 else np.uint16
    pixel_array = np.zeros(labels.shape, dtype=dtype)
    for label, number in numbers.items():
        pixel_array[labels == label] = number

    algorithm = _seg_algorithm(findings)
    by_label = {segment.label: segment for segment in labelmap.segments}
    descriptions = []
    for label, number in numbers.items():
        key = by_label[label].name
        code = codes.structure(key)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=code.label,
                segmented_property_category=code.category,
                segmented_property_type=code.property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=result_uid(findings, f"segment-{label}-{key}"),
                tracking_id=key,
                display_color=hd.color.CIELabColor(*code.color_lab) if code.color_lab else None,
            )
        )
    return _segmentation(
        findings,
        frame_sources,
        pixel_array,
        descriptions,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        sop_kind="seg",
        series_number=series_number,
        instance_number=instance_number,
        options=options,
    )


def build_probability_segmentation(
    findings: Findings,
    sources: Sequence[Dataset],
    *,
    series_number: int | None = None,
    instance_number: int = 2,
    options: ResultsOptions | None = None,
) -> hd.seg.Segmentation:
    """A FRACTIONAL (PROBABILITY) Segmentation of ``findings.probability_map``.

    Values in [0, 1] are stored as 0..255. It shares the SEG series of
    :func:`build_segmentation` and has its own SOP Instance UID.
    """
    probability_map = findings.probability_map
    if probability_map is None:
        raise ResultsError(f"findings of {findings.pipeline} have no probability map")
    options = options or ResultsOptions()
    values = _probabilities(probability_map)
    frame_sources = _frames_sources(probability_map.source_sop_instance_uids, sources)
    _check_geometry(values, frame_sources)
    code = codes.structure(probability_map.name)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=code.label,
        segmented_property_category=code.category,
        segmented_property_type=code.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_seg_algorithm(findings),
        tracking_uid=result_uid(findings, f"map-{probability_map.name}"),
        tracking_id=probability_map.name,
    )
    return _segmentation(
        findings,
        frame_sources,
        values,
        [description],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        sop_kind="seg-fractional",
        series_number=series_number,
        instance_number=instance_number,
        options=options,
    )


def _probabilities(probability_map: ProbabilityMap) -> np.ndarray:
    values = np.asarray(probability_map.values, dtype=np.float32)
    if values.ndim != 3:
        raise ResultsError(
            f"probability map must be 3-D (frames, rows, columns), got {values.shape}"
        )
    if values.shape[0] != len(probability_map.source_sop_instance_uids):
        raise ResultsError(
            f"{values.shape[0]} probability frames but "
            f"{len(probability_map.source_sop_instance_uids)} source instances"
        )
    if not np.isfinite(values).all():
        raise ResultsError("probability map has NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < -_PROBABILITY_TOLERANCE or high > 1 + _PROBABILITY_TOLERANCE:
        raise ResultsError(f"probability map values span [{low:g}, {high:g}], expected [0, 1]")
    return np.clip(values, 0.0, 1.0)


def _segmentation(
    findings: Findings,
    frame_sources: list[Dataset],
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    *,
    segmentation_type: hd.seg.SegmentationTypeValues,
    sop_kind: str,
    series_number: int | None,
    instance_number: int,
    options: ResultsOptions,
) -> hd.seg.Segmentation:
    empty = not pixel_array.any()
    try:
        seg = hd.seg.Segmentation(
            source_images=frame_sources,
            pixel_array=pixel_array,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            series_instance_uid=result_uid(findings, "seg-series"),
            series_number=options.seg_series_number if series_number is None else series_number,
            sop_instance_uid=result_uid(findings, sop_kind),
            instance_number=instance_number,
            manufacturer=options.manufacturer,
            manufacturer_model_name=options.manufacturer_model_name,
            software_versions=options.software_versions,
            device_serial_number=options.device_serial_number,
            fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            max_fractional_value=MAX_FRACTIONAL_VALUE,
            content_description=(
                None if _clinical(findings) else NOT_FOR_CLINICAL_USE
            ),
            content_label="SPINE_NODE",
            series_description=_description(findings, "SEG"),
            # An all-empty result still needs one frame per source to be a valid SEG.
            omit_empty_frames=not empty,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot build SEG for {findings.pipeline}: {exc}") from exc
    _declare_schemes(seg)
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        # General Image: Type 2C when there is no patient coordinate system (e.g. CR).
        seg.PatientOrientation = frame_sources[0].get("PatientOrientation", "")
    log.info(
        "built %s SEG %s (%d frames, %d segments) for series %s",
        segmentation_type.value,
        seg.SOPInstanceUID,
        int(seg.NumberOfFrames),
        len(descriptions),
        ",".join(findings.series_uids),
    )
    return seg


# ---------------------------------------------------------------- SR


def build_report(
    findings: Findings,
    sources: Sequence[Dataset],
    *,
    segmentation: Dataset | None = None,
    series_number: int | None = None,
    instance_number: int = 1,
    options: ResultsOptions | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of ``findings`` as a Comprehensive 3D SR.

    One measurement group per finding: finding type (the finding kind's code), finding
    site (the vertebra or structure, else the spine), the probability as a measurement
    (DCM 122157 "Probability", UCUM "1"), present/absent at the finding's threshold as a
    qualitative evaluation, and the algorithm (model name, version, backend, weights).
    Groups of findings that have a segment in ``segmentation`` reference it
    (volumetric ROI for a series, planar ROI for a single radiograph); the others
    reference the source images. Demo weights are said so in a text item.
    """
    options = options or ResultsOptions()
    if not sources:
        raise ResultsError("build_report needs the source datasets")
    if not findings.findings:
        raise ResultsError(f"findings of {findings.pipeline} have no finding to report")
    modality = str(sources[0].get("Modality", ""))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("spine-node-device", findings.model.name, findings.model.version),
            name=findings.model.name,
            manufacturer_name="spine-node",
            model_name=f"{findings.model.name} {findings.model.version}"[:64],
            serial_number=options.device_serial_number,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:
        groups = [
            _measurement_group(findings, finding, sources, segmentation)
            for finding in findings.findings
        ]
        library = list(sources) if len(sources) <= options.image_library_max_images else []
        report = _measurement_report(context, codes.procedure_reported(modality), groups, library)
        _add_comment(report, _disclaimer(findings))
        evidence = list(sources) + ([segmentation] if segmentation is not None else [])
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=result_uid(findings, "sr-series"),
            series_number=options.sr_series_number if series_number is None else series_number,
            sop_instance_uid=result_uid(findings, "sr"),
            instance_number=instance_number,
            manufacturer=options.manufacturer,
            institution_name=options.institution_name,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=_description(findings, "SR"),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot build SR for {findings.pipeline}: {exc}") from exc
    _declare_schemes(sr)
    # Equipment the SOP class constructor does not take.
    sr.ManufacturerModelName = options.manufacturer_model_name
    sr.SoftwareVersions = options.software_versions
    sr.DeviceSerialNumber = options.device_serial_number
    log.info(
        "built SR %s (%d findings) for series %s",
        sr.SOPInstanceUID,
        len(groups),
        ",".join(findings.series_uids),
    )
    return sr


def _measurement_report(
    context: hd.sr.ObservationContext,
    procedure: hd.sr.CodedConcept,
    groups: list[Any],
    sources: Sequence[Dataset],
) -> hd.sr.MeasurementReport:
    """TID 1500 with a TID 1600 Image Library of ``sources`` where highdicom can build one.

    The library is optional; highdicom needs e.g. Imager Pixel Spacing to describe a
    projection radiograph, which some CR devices leave out, so it is dropped then (and
    when ``sources`` is empty: see ``ResultsOptions.image_library_max_images``).
    """
    if sources:
        try:
            return hd.sr.MeasurementReport(
                observation_context=context,
                procedure_reported=procedure,
                imaging_measurements=groups,
                referenced_images=list(sources),
            )
        except AttributeError as exc:
            log.info("SR without image library: a source lacks %s", exc.name)
    return hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=procedure, imaging_measurements=groups
    )


def _add_comment(report: hd.sr.MeasurementReport, text: str) -> None:
    """Append TID 1500's optional Qualitative Evaluations container with a text item."""
    comment = hd.sr.TextContentItem(
        name=codes.COMMENT,
        value=text[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence([comment])
    report[0].ContentSequence.append(container)


def _segment_for(findings: Findings, finding: Finding) -> tuple[int, str] | None:
    """(label, structure key) of the segment a finding is about, if any."""
    labelmap = findings.segmentation
    if labelmap is None:
        return None
    if finding.segment_label is not None:
        for segment in labelmap.segments:
            if segment.label == finding.segment_label:
                return segment.label, segment.name
        raise ResultsError(
            f"finding {finding.kind} names segment label {finding.segment_label}, "
            "which the label map does not have"
        )
    if finding.site is not None:
        matches = [s for s in labelmap.segments if s.name == finding.site]
        if len(matches) == 1:
            return matches[0].label, matches[0].name
    return None


def _measurement_group(
    findings: Findings,
    finding: Finding,
    sources: Sequence[Dataset],
    segmentation: Dataset | None,
) -> (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
):
    if not 0.0 <= finding.probability <= 1.0:
        raise ResultsError(f"finding {finding.kind} has probability {finding.probability}")
    finding_code = codes.finding(finding.kind)
    site = finding.site
    where = site or "image"
    common: dict[str, Any] = {
        "tracking_identifier": hd.sr.TrackingIdentifier(
            uid=result_uid(findings, f"finding-{finding.kind}-{where}"),
            identifier=f"{finding.kind} {where}",
        ),
        "finding_type": finding_code,
        "finding_sites": [hd.sr.FindingSite(anatomic_location=codes.finding_site(site))],
        "algorithm_id": _sr_algorithm(findings, finding),
        "measurements": [
            hd.sr.Measurement(
                name=codes.PROBABILITY,
                value=round(float(finding.probability), 6),
                unit=codes.UNIT_NO_UNITS,
            )
        ],
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(
                name=finding_code,
                value=codes.PRESENT if finding.present else codes.ABSENT,
            )
        ],
    }
    segment = _segment_for(findings, finding) if segmentation is not None else None
    if segment is not None:
        reference = _segment_reference(findings, segment, segmentation)  # type: ignore[arg-type]
        if isinstance(reference, hd.sr.ReferencedSegment):
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=reference, **common
            )
        if isinstance(reference, hd.sr.ReferencedSegmentationFrame):
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=reference, **common
            )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources
        ],
        **common,
    )


def _frame_segment_numbers(segmentation: Dataset) -> list[int]:
    """The segment number of every frame (per-frame, or shared when all frames agree)."""
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" in shared:
        number = int(shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        return [number] * int(segmentation.NumberOfFrames)
    return [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in segmentation.PerFrameFunctionalGroupsSequence
    ]


def _segment_reference(
    findings: Findings, segment: tuple[int, str], segmentation: Dataset
) -> hd.sr.ReferencedSegment | hd.sr.ReferencedSegmentationFrame | None:
    """A reference to the segment of ``segment``'s label, or None if it has no pixels.

    Built from the SEG's own per-frame Derivation Image references, so the SR names
    exactly the source images the segment's frames were derived from. highdicom's
    ``from_segmentation`` helpers are not used: they need per-frame segment numbers
    (absent from a single-segment SEG) and write attribute pairs that PS3.3 Table 10-3
    forbids together.
    """
    label, key = segment
    assert findings.segmentation is not None
    number = segment_numbers(findings.segmentation)[label]
    described = {
        int(item.SegmentNumber): str(item.get("TrackingID", ""))
        for item in segmentation.SegmentSequence
    }
    if described.get(number) != key:
        raise ResultsError(
            f"segmentation {segmentation.SOPInstanceUID} does not hold segment {number} "
            f"({key}) of these findings"
        )
    frames = [
        index
        for index, frame_number in enumerate(_frame_segment_numbers(segmentation), start=1)
        if frame_number == number
    ]
    if not frames:
        return None
    sources: dict[tuple[str, str], set[int]] = {}
    for index in frames:
        item = segmentation.PerFrameFunctionalGroupsSequence[index - 1]
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                frames_of_source = sources.setdefault(
                    (str(source.ReferencedSOPClassUID), str(source.ReferencedSOPInstanceUID)),
                    set(),
                )
                if "ReferencedFrameNumber" in source:
                    value = source.ReferencedFrameNumber
                    frames_of_source.update(
                        int(v) for v in (value if isinstance(value, list | tuple) else [value])
                    )
    source_images = [
        hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=sop_class,
            referenced_sop_instance_uid=sop_instance,
            referenced_frame_numbers=sorted(numbers_) or None,
        )
        for (sop_class, sop_instance), numbers_ in sources.items()
    ]
    if not source_images:
        raise ResultsError(
            f"segmentation {segmentation.SOPInstanceUID} does not name its source images"
        )
    if len(findings.segmentation.source_sop_instance_uids) == 1 and len(frames) == 1:
        # TID 1410 on a single-frame map (a radiograph): the SEG frame implies its segment,
        # and Table 10-3 allows Referenced Segment Number only where no frame is given.
        reference = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=str(segmentation.SOPClassUID),
            sop_instance_uid=str(segmentation.SOPInstanceUID),
            frame_number=frames[0],
            segment_number=number,
            source_image=source_images[0],
        )
        del reference[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
        return reference
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=number,
        source_images=source_images,
    )


# ---------------------------------------------------------------- encode and write


def encode(
    findings: Findings,
    sources: Sequence[Dataset],
    *,
    options: ResultsOptions | None = None,
) -> list[Dataset]:
    """Every result object of ``findings``: [binary SEG], [fractional SEG], SR.

    The SEGs are built when the findings carry a segmentation or a probability map; the
    SR is built when they carry at least one finding and references the binary SEG.
    """
    options = options or ResultsOptions()
    results: list[Dataset] = []
    seg: hd.seg.Segmentation | None = None
    if findings.segmentation is not None:
        seg = build_segmentation(findings, sources, instance_number=1, options=options)
        results.append(seg)
    if findings.probability_map is not None:
        results.append(
            build_probability_segmentation(findings, sources, instance_number=2, options=options)
        )
    if findings.findings:
        results.append(build_report(findings, sources, segmentation=seg, options=options))
    if not results:
        raise ResultsError(f"findings of {findings.pipeline} hold nothing to encode")
    return results


def result_path(results_dir: Path, dataset: Dataset) -> Path:
    """``<results>/<study>/<series>/<sop>.dcm`` with every component a validated UID."""
    return (
        Path(results_dir)
        / validate_uid(dataset.StudyInstanceUID, "Study Instance UID")
        / validate_uid(dataset.SeriesInstanceUID, "Series Instance UID")
        / (validate_uid(dataset.SOPInstanceUID, "SOP Instance UID") + ".dcm")
    )


def write_results(datasets: Sequence[Dataset], results_dir: Path | str) -> list[Path]:
    """Save ``datasets`` as DICOM files under ``results_dir``, each atomically.

    A file is written under a temporary name in its target folder, flushed, synced and
    renamed into place, so readers never see a partial file and a re-run replaces the
    previous file of the same (deterministic) UID.
    """
    paths = []
    for dataset in datasets:
        target = result_path(Path(results_dir), dataset)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".result-", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                pydicom.dcmwrite(out, dataset, enforce_file_format=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_name, target)
        except BaseException as exc:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            if isinstance(exc, OSError):
                reason = exc.strerror or str(exc)
                raise ResultsError(f"cannot write result {target.name}: {reason}") from exc
            raise
        log.info("wrote result %s", target.name)
        paths.append(target)
    return paths


__all__ = [
    "NOT_FOR_CLINICAL_USE",
    "ResultsOptions",
    "build_probability_segmentation",
    "build_report",
    "build_segmentation",
    "encode",
    "result_path",
    "result_uid",
    "segment_numbers",
    "write_results",
]
