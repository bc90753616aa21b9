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
  that references the source images and, when a SEG is given, its segments, and a
  SCOORD3D point at the finding's centroid where the pipeline gives one;
* for findings that say the analysis was not performed (``Findings.not_performed_reason``),
  only an SR saying so and why (:func:`build_not_performed_report`, also used by
  :mod:`spine_node.node.notices` for jobs that failed for good).

Every site a pipeline covers (``Findings.site_status``) appears in the SR with its status,
and ``Findings.notes`` as text. Patient and study attributes reach the result objects only
through :func:`sanitise_sources`: a value that is not valid for its VR (a birth date
``1980-01-01``) is blanked or dropped, never copied and never quoted in an error.

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
from pydicom.charset import decode_bytes
from pydicom.config import RAISE
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

from spine_node.inference.findings import Finding, Findings, LabelMap, ModelInfo, ProbabilityMap
from spine_node.node import __version__, codes
from spine_node.node.errors import ResultsError
from spine_node.node.uids import derive_uid, validate_uid

log = logging.getLogger(__name__)

#: The short disclaimer (fits LO, 64 characters): SEG Content Description, the SR's first
#: text item and, where it fits, the Series Description of results of demo models.
SHORT_DISCLAIMER = "Demo model - not for clinical use"
NOT_FOR_CLINICAL_USE = SHORT_DISCLAIMER
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


def result_uid(findings: Findings, kind: str, reason_code: str | None = None) -> str:
    """Deterministic UID of one result object or series of ``findings``.

    Derived from the input series UIDs, the exact set of source instances, the pipeline,
    the model name, version and weights digest (the card's ``weights.sha256``; and the same
    of every further model of a multi-stage pipeline) and ``kind`` (``"seg-series"``,
    ``"seg"``, ``"seg-fractional"``, ``"sr-series"``, ``"sr"``, ...). A re-run over the same
    inputs with the same models reproduces its UIDs; a run over a series that has grown, or
    with another model (retrained weights under an unchanged version included), gets new
    ones, so one UID never names two different contents.

    Findings that were not performed add ``"not-performed"`` and ``reason_code`` (else the
    reason itself), so a re-run that abstains for the same reason reproduces the UIDs and
    another outcome of the same inputs gets its own.
    """
    parts = [*sorted(findings.series_uids), findings.pipeline]
    parts.append(source_set_digest(findings.source_sop_instance_uids))
    parts += [findings.model.name, findings.model.version]
    if findings.model.weights:
        parts.append(findings.model.weights)
    parts += [f"{m.name}@{m.version}" + (f"#{m.weights}" if m.weights else "")
              for m in findings.models]
    if findings.not_performed_reason is not None:
        parts += ["not-performed", reason_code or findings.not_performed_reason]
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
    """Series Description (LO, at most 64 characters); the demo note is never cut off.

    The short disclaimer where it fits whole, else a shorter note.
    """
    text = f"{findings.pipeline} {what}"
    if _clinical(findings):
        return text[:64]
    suffix = f" - {SHORT_DISCLAIMER}"
    if len(text) + len(suffix) > 64:
        suffix = " (demo, not clinical)"
    return text[: 64 - len(suffix)] + suffix


def _disclaimer(findings: Findings) -> str:
    parts = []
    for model in _all_models(findings):
        text = f"{model.name} {model.version}".strip()
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
        if finding.rule_out is not None:
            params.append(f"rule_out={finding.rule_out:g}")
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

# Root attributes of the modules highdicom copies from a source into every result object
# (Patient, General Study, Patient Study, Clinical Trial Subject and Study), with their type.
_COPIED_MODULES = (
    "patient", "general-study", "patient-study", "clinical-trial-subject", "clinical-trial-study",
)
_FALLBACK_COPIED = {
    "PatientName": "2", "PatientID": "2", "PatientBirthDate": "2", "PatientSex": "2",
    "PatientBirthTime": "3", "OtherPatientNames": "3", "PatientAge": "3", "PatientSize": "3",
    "PatientWeight": "3", "StudyDate": "2", "StudyTime": "2", "AccessionNumber": "2",
    "ReferringPhysicianName": "2", "StudyID": "2", "StudyDescription": "3",
    "StudyInstanceUID": "1",
}
# Text VRs whose bytes follow the Specific Character Set; the others are plain ASCII.
_TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_SINGLE_VALUED_VRS = {"LT", "ST", "UT", "UR"}
_PN_DELIMITERS = {0x5C, 0x3D, 0x5E}  # \ = ^


def _copied_attributes() -> dict[str, str]:
    try:
        from highdicom._standard_utils import get_module_attribute_map

        table = get_module_attribute_map()
        copied = {
            str(item["keyword"]): str(item["type"])
            for module in _COPIED_MODULES
            for item in table.get(module, [])
            if not item["path"]
        }
    except (ImportError, KeyError, TypeError):  # a highdicom without that table
        copied = {}
    return copied or dict(_FALLBACK_COPIED)


COPIED_ATTRIBUTES: dict[str, str] = _copied_attributes()
# The Study Instance UID was validated when the instance arrived; it is never touched.
_COPIED_TAGS: dict[Any, tuple[str, str]] = {
    Tag(tag): (keyword, type_)
    for keyword, type_ in COPIED_ATTRIBUTES.items()
    if (tag := tag_for_keyword(keyword)) is not None and keyword != "StudyInstanceUID"
}


@dataclass(frozen=True)
class SanitisedSources:
    """Sources fit to copy from, and the keywords (never values) that were not.

    ``blanked``: type 2 attributes whose value was invalid, now empty; ``dropped``: other
    attributes whose value was invalid, left out.
    """

    datasets: list[Dataset]
    blanked: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.blanked or self.dropped)


def _value_valid(vr: str, value: Any) -> bool:
    """True if ``value`` (one value, or a list of them) is valid for ``vr``.

    pydicom's validators are called in RAISE mode and their message (which quotes the
    value) is discarded: the value must never reach a log.
    """
    values = list(value) if isinstance(value, list | tuple) else [value]
    for item in values:
        if item is None or item == "":
            continue
        try:
            validate_value(vr, item if isinstance(item, str | bytes | int | float) else str(item), RAISE)
        except Exception:  # ValueError, or a validator choking on odd input
            return False
    return True


def _raw_valid(element: RawDataElement, encodings: Sequence[str]) -> bool:
    """Validate a not-yet-converted element from its bytes (converting it would log a
    warning quoting an invalid value)."""
    vr = element.VR or dictionary_VR(element.tag)
    raw = element.value
    if raw is None or vr not in _TEXT_VRS | {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI", "UR"}:
        return True
    try:
        if vr in _TEXT_VRS:
            delimiters = _PN_DELIMITERS if vr == "PN" else {0x5C}
            text = decode_bytes(raw, list(encodings), delimiters)
        else:
            text = raw.decode("ascii")
    except Exception:  # undecodable bytes, an unknown character set
        return False
    text = text.rstrip("\x00 " if vr != "UI" else "\x00")
    if vr in ("DA", "TM", "DT", "DS", "IS", "AS", "CS", "AE"):
        text = text.strip(" ")
    # Control characters: ESC (character set switching) anywhere, line breaks in text blocks.
    allowed = "\r\n\t\f\x1b" if vr in ("LT", "ST", "UT") else "\x1b"
    if any((ord(ch) < 0x20 or ord(ch) == 0x7F) and ch not in allowed for ch in text):
        return False
    values = [text] if vr in _SINGLE_VALUED_VRS else text.split("\\")
    if vr in ("DA", "TM", "DT", "DS", "IS", "AS", "CS", "AE"):
        values = [v.strip(" ") for v in values]
    return _value_valid(vr, values)


def _element_valid(dataset: Dataset, tag: Any, depth: int = 0) -> bool:
    element = dataset.get_item(tag)
    if element is None:
        return True
    vr = (element.VR if element.VR else None) or dictionary_VR(tag)
    if vr == "SQ":
        if depth > 8:
            return False
        items = dataset[tag].value or []
        return all(_element_valid(item, sub, depth + 1) for item in items for sub in item.keys())
    if isinstance(element, RawDataElement):
        encodings = dataset.get("SpecificCharacterSet") or ["ISO_IR 6"]
        return _raw_valid(element, [encodings] if isinstance(encodings, str) else list(encodings))
    value = element.value
    return _value_valid(vr, list(value) if not isinstance(value, str | bytes) else value)


def sanitise_sources(sources: Sequence[Dataset]) -> SanitisedSources:
    """Copies of ``sources`` fit to copy patient and study attributes from.

    Every root attribute of the modules highdicom copies into a result (Patient, General
    Study, Patient Study, Clinical Trial Subject and Study) is checked against its VR: a
    valid value is kept, an invalid type 2 attribute is blanked, any other invalid one is
    left out. A source with nothing invalid is passed through as is; the others are
    shallow copies (the caller's datasets are never changed). Only keywords are reported.
    The slices of a series share these values, so each distinct value is checked once.
    """
    blanked: set[str] = set()
    dropped: set[str] = set()
    cleaned: list[Dataset] = []
    verdicts: dict[tuple[Any, ...], bool] = {}
    blanks: dict[Any, DataElement] = {}  # one empty element per tag, shared by the copies
    for source in sources:
        bad = []
        for tag in _COPIED_TAGS.keys() & source.keys():
            keyword, type_ = _COPIED_TAGS[tag]
            element = source.get_item(tag)
            if element is None:
                continue
            value = element.value
            key = (tag, element.VR, value if isinstance(value, bytes | str) else repr(value))
            valid = verdicts.get(key)
            if valid is None:
                try:
                    valid = _element_valid(source, tag)
                except Exception:  # a sequence pydicom cannot parse
                    valid = False
                verdicts[key] = valid
            if not valid:
                bad.append((tag, keyword, type_))
        if not bad:
            cleaned.append(source)
            continue
        # items() is the raw (tag, element) mapping: no element is converted by the copy.
        copy_ = Dataset(dict(source.items()))
        for attribute in ("file_meta", "preamble"):
            if hasattr(source, attribute):
                setattr(copy_, attribute, getattr(source, attribute))
        for tag, keyword, type_ in bad:
            if type_ == "2":
                if tag not in blanks:
                    vr = dictionary_VR(tag)
                    blanks[tag] = DataElement(tag, vr, DicomSequence() if vr == "SQ" else None)
                copy_[tag] = blanks[tag]
                blanked.add(keyword)
            else:
                del copy_[tag]
                dropped.add(keyword)
        cleaned.append(copy_)
    if blanked or dropped:
        log.warning(
            "source attributes with values invalid for their VR left out of the results: "
            "blanked %s; dropped %s",
            ", ".join(sorted(blanked)) or "none",
            ", ".join(sorted(dropped)) or "none",
        )
    return SanitisedSources(cleaned, tuple(sorted(blanked)), tuple(sorted(dropped)))


def safe_error(exc: BaseException) -> str:
    """What to say about an exception from pydicom or highdicom: its class, never its text.

    Their messages quote data element values ("Unable to convert '1980-01-01' to 'DA'").
    """
    return f"{type(exc).__name__} (message withheld: it may quote a data element value)"


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
        raise ResultsError(f"cannot build SEG for {findings.pipeline}: {safe_error(exc)}") from exc
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
    reason_code: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report of ``findings`` as a Comprehensive 3D SR.

    One measurement group per finding: finding type (the finding kind's code), finding
    site (the vertebra or structure, else the spine), the probability as a measurement
    (DCM 122157 "Probability", UCUM "1"), present / absent at the finding's threshold as a
    qualitative evaluation (indeterminate, SCT 82334004, between a rule-out and that
    threshold where the model card gives a rule-out point), and the algorithm (model name,
    version, backend, weights, thresholds).
    Groups of findings that have a segment in ``segmentation`` reference it
    (volumetric ROI for a series, planar ROI for a single radiograph); the others
    reference the source images. A finding with ``centroid_mm`` also gets a SCOORD3D
    POINT (DCM 111010 "Center") in the sources' frame of reference, which viewers such
    as OHIF show and jump to.

    Each ``findings.site_status`` entry is a "Site assessment" qualitative evaluation
    (assessed / not in field of view / not assessable, with the reason as a comment) in
    the group of that site's finding, or in a group of its own when the site has no
    finding, so a level that was not assessed is listed, never silently absent. Findings
    that were not performed give one group saying "Analysis not performed" and why.
    Demo weights are said so in a short text item at the top and in a long one at the
    end, beside ``findings.notes``.
    """
    options = options or ResultsOptions()
    if not sources:
        raise ResultsError("build_report needs the source datasets")
    if findings.performed and not (findings.findings or findings.site_status):
        raise ResultsError(f"findings of {findings.pipeline} have no finding to report")
    sources = sanitise_sources(sources).datasets
    modality = str(sources[0].get("Modality", ""))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("spine-node-device", findings.model.name, findings.model.version),
            name=findings.model.name[:64] or findings.pipeline[:64],
            manufacturer_name="spine-node",
            model_name=f"{findings.model.name} {findings.model.version}"[:64],
            serial_number=options.device_serial_number,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    try:
        if findings.performed:
            groups = [
                _measurement_group(findings, finding, sources, segmentation)
                for finding in findings.findings
            ]
        else:
            groups = [_not_performed_group(findings, reason_code)]
        groups += _site_status_groups(findings, groups, reason_code)
        library = list(sources) if len(sources) <= options.image_library_max_images else []
        report = _measurement_report(context, codes.procedure_reported(modality), groups, library)
        _add_texts(report, findings)
        evidence = list(sources) + ([segmentation] if segmentation is not None else [])
        what = "SR" if findings.performed else "not performed"
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=result_uid(findings, "sr-series", reason_code),
            series_number=options.sr_series_number if series_number is None else series_number,
            sop_instance_uid=result_uid(findings, "sr", reason_code),
            instance_number=instance_number,
            manufacturer=options.manufacturer,
            institution_name=options.institution_name,
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=_description(findings, what),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ResultsError(f"cannot build SR for {findings.pipeline}: {safe_error(exc)}") from exc
    _declare_schemes(sr)
    # Equipment the SOP class constructor does not take.
    sr.ManufacturerModelName = options.manufacturer_model_name
    sr.SoftwareVersions = options.software_versions
    sr.DeviceSerialNumber = options.device_serial_number
    log.info(
        "built SR %s (%d groups%s) for series %s",
        sr.SOPInstanceUID,
        len(groups),
        "" if findings.performed else ", analysis not performed",
        ",".join(findings.series_uids),
    )
    return sr


def build_not_performed_report(
    findings: Findings,
    sources: Sequence[Dataset],
    *,
    reason_code: str | None = None,
    options: ResultsOptions | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR of findings whose analysis was not performed (``not_performed_reason`` set).

    ``reason_code`` (e.g. ``"pipeline-error"``) names the reason in the UIDs; without it
    the reason text does.
    """
    if findings.performed:
        raise ResultsError(f"findings of {findings.pipeline} were performed; use build_report")
    return build_report(findings, sources, options=options, reason_code=reason_code)


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


def _text(text: str, name: hd.sr.CodedConcept = codes.COMMENT) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _add_texts(report: hd.sr.MeasurementReport, findings: Findings) -> None:
    """The short disclaimer near the top; notes and the long disclaimer at the end.

    The short one (demo models only) follows Procedure Reported, before the image library
    and the measurements, so a viewer listing the content shows it first (TID 1500 is
    extensible). The others go in TID 1500's optional Qualitative Evaluations container.
    """
    root = report[0].ContentSequence
    if not _clinical(findings):
        after = max(
            (i for i, item in enumerate(root) if item.ValueType == "CODE"
             and item.ConceptNameCodeSequence[0].CodeValue == "121058"),
            default=len(root) - 1,
        )
        root.insert(after + 1, _text(SHORT_DISCLAIMER))
    texts = [_text(f"Note: {note}") for note in findings.notes if note.strip()]
    texts.append(_text(_disclaimer(findings)))
    container = hd.sr.ContainerContentItem(
        name=_QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(texts)
    root.append(container)


def _not_performed_group(
    findings: Findings, reason_code: str | None
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """"Analysis not performed" (SN-0101 AI analysis = SCT Not performed) and the reason."""
    reason = " ".join((findings.not_performed_reason or "").split()) or "No reason given"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid(findings, "not-performed", reason_code),
            identifier="Analysis not performed",
        ),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SPINE)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.AI_ANALYSIS, value=codes.NOT_PERFORMED)
        ],
        # No per-image references: the evidence lists every source (for a 300-slice CT the
        # references made the notice 20 times slower to encode: 4.2 s against 0.19 s).
    )
    group[0].ContentSequence.append(_text(f"Analysis not performed: {reason}"))
    return group


def _group_sources(sources: Sequence[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources]


def _site_status_groups(
    findings: Findings, groups: list[Any], reason_code: str | None
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Add each site's status to its finding's group; new groups for the other sites."""
    by_site: dict[str | None, Any] = {}
    if findings.performed:
        for finding, group in zip(findings.findings, groups, strict=True):
            by_site.setdefault(finding.site, group)
    extra = []
    for status in findings.site_status:
        value = codes.assessment(status.assessment)
        reason = " ".join(status.reason.split())
        # A QualitativeEvaluation is a template: its content items join the group.
        items: list[Any] = list(
            hd.sr.QualitativeEvaluation(name=codes.SITE_ASSESSMENT, value=value)
        )
        if reason:
            items.append(_text(f"{status.site}: {value.meaning.lower()}: {reason}"))
        group = by_site.get(status.site)
        if group is None:
            try:
                site_code = codes.finding_site(status.site)
            except codes.UnknownCodeError:
                # A site key without a code still gets listed: the spine, named in the text.
                log.info("site %r has no code; listed under the spine", status.site)
                site_code = codes.SPINE
                if not reason:
                    items.append(_text(f"{status.site}: {value.meaning.lower()}"))
            # No image references per site: the evidence lists the sources once, and 7
            # groups x 300 slices would cost what the image library cost (see options).
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=result_uid(findings, f"site-{status.site}", reason_code),
                    identifier=f"{status.site} {value.meaning.lower()}"[:64],
                ),
                finding_sites=[hd.sr.FindingSite(anatomic_location=site_code)],
            )
            by_site[status.site] = group
            extra.append(group)
        group[0].ContentSequence.extend(items)
    return extra


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
                value={"present": codes.PRESENT, "indeterminate": codes.INDETERMINATE,
                       "absent": codes.ABSENT}[finding.call],
            )
        ],
    }
    segment = _segment_for(findings, finding) if segmentation is not None else None
    group: (
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | None
    ) = None
    if segment is not None:
        reference = _segment_reference(findings, segment, segmentation)  # type: ignore[arg-type]
        if isinstance(reference, hd.sr.ReferencedSegment):
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=reference, **common
            )
        elif isinstance(reference, hd.sr.ReferencedSegmentationFrame):
            group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=reference, **common
            )
    if group is None:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            source_images=_group_sources(sources), **common
        )
    point = _centre_point(finding, sources)
    if point is not None:
        group[0].ContentSequence.append(point)
    return group


def _centre_point(finding: Finding, sources: Sequence[Dataset]) -> hd.sr.Scoord3DContentItem | None:
    """A SCOORD3D POINT (DCM 111010 "Center") at ``finding.centroid_mm``, if it has one.

    In the sources' Frame of Reference; OHIF's SR viewer takes the first SCOORD/SCOORD3D
    item of a measurement group as the place to show. Sources without a Frame of
    Reference (a radiograph) have no patient coordinates, so no point.
    """
    if finding.centroid_mm is None:
        return None
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "")) for ds in sources}
    if len(frames_of_reference) != 1 or "" in frames_of_reference:
        log.info("finding %s at %s: sources have no single Frame of Reference; no point",
                 finding.kind, finding.site or "image")
        return None
    xyz = np.asarray(finding.centroid_mm, dtype=np.float64)
    if xyz.shape != (3,) or not np.isfinite(xyz).all():
        raise ResultsError(f"finding {finding.kind} has centroid {finding.centroid_mm}: "
                           "expected three finite coordinates in mm")
    return hd.sr.Scoord3DContentItem(
        name=codes.CENTER,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=xyz.reshape(1, 3).astype(np.float32),
        frame_of_reference_uid=frames_of_reference.pop(),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
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
    reason_code: str | None = None,
) -> list[Dataset]:
    """Every result object of ``findings``: [binary SEG], [fractional SEG], SR.

    The SEGs are built when the findings carry a segmentation or a probability map; the
    SR is built when they carry at least one finding or site status and references the
    binary SEG. Findings not performed give only the SR saying so (``reason_code``, if
    given, names the reason in its UIDs). Sources go through :func:`sanitise_sources`.
    """
    options = options or ResultsOptions()
    sources = sanitise_sources(sources).datasets
    if not findings.performed:
        # No masks, no findings: only the report saying why the analysis was not done.
        return [build_not_performed_report(findings, sources, reason_code=reason_code,
                                           options=options)]
    results: list[Dataset] = []
    seg: hd.seg.Segmentation | None = None
    if findings.segmentation is not None:
        seg = build_segmentation(findings, sources, instance_number=1, options=options)
        results.append(seg)
    if findings.probability_map is not None:
        results.append(
            build_probability_segmentation(findings, sources, instance_number=2, options=options)
        )
    if findings.findings or findings.site_status:
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
    "SHORT_DISCLAIMER",
    "ResultsOptions",
    "SanitisedSources",
    "build_not_performed_report",
    "build_probability_segmentation",
    "build_report",
    "build_segmentation",
    "encode",
    "result_path",
    "result_uid",
    "safe_error",
    "sanitise_sources",
    "segment_numbers",
    "write_results",
]
