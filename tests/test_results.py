"""Results encoding: Findings to DICOM SEG and SR, validated by dciodvfy and read back.

Sources are real DICOM test files from pydicom-data: a CT slice (``CT_small.dcm``) copied
into a series of several slices with new UIDs and positions, and a CR radiograph
(``RG3_UNCR.dcm``). The label maps are computed here from the pixel data by plain
thresholds (CT Hounsfield units, CR pixel-value percentiles); they are test inputs that
exercise the encoder, not model outputs, and their structure keys are chosen to exercise
the code tables, not to claim anatomy. Probabilities are likewise statistics of those
masks.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from spine_node.inference.findings import (
    AssessmentValues,
    Finding,
    Findings,
    LabelMap,
    ModelInfo,
    ProbabilityMap,
    Segment,
    SiteStatus,
)
from spine_node.node import codes
from spine_node.node.errors import ResultsError
from spine_node.node.results import (
    NOT_FOR_CLINICAL_USE,
    SHORT_DISCLAIMER,
    ResultsOptions,
    build_not_performed_report,
    build_probability_segmentation,
    build_report,
    build_segmentation,
    encode,
    safe_error,
    sanitise_sources,
    segment_numbers,
    write_results,
)
from tests.peers import dcmtk, tool

get_testdata_file = pytest.importorskip("pydicom.data").get_testdata_file

DEMO_MODEL = ModelInfo(
    name="test-threshold",
    version="1.0.0",
    backend="numpy",
    weights="none: HU threshold in the test",
    trained_on="nothing",
    clinical_use=False,
)


# ---------------------------------------------------------------- sources and findings


def ct_series(slices: int = 6) -> list[Dataset]:
    """A CT series of ``slices`` instances made from one real CT slice."""
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = generate_uid(entropy_srcs=["spine-node test CT series"])
    spacing = float(base.SliceThickness)
    out: list[Dataset] = []
    for index in range(slices):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["spine-node test CT", str(index)])
        ds.SeriesInstanceUID = series_uid
        x, y, z = (float(v) for v in base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + index * spacing]
        ds.SliceLocation = z + index * spacing
        ds.InstanceNumber = index + 1
        ds.BodyPartExamined = "CSPINE"
        # The test file records a weight of 0 kg, which validators rightly flag.
        del ds.PatientWeight
        # Vary the pixels from slice to slice so a misplaced frame would show.
        ds.PixelData = np.roll(base.pixel_array, 4 * index, axis=1).tobytes()
        out.append(ds)
    return out


def hounsfield(ds: Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def ct_findings(
    sources: Sequence[Dataset],
    *,
    model: ModelInfo = DEMO_MODEL,
    empty_frames: Sequence[int] = (),
) -> Findings:
    """Bone (HU > 300) split by slice into C3 (first half) and C4 (second half).

    Frames listed in ``empty_frames`` are cleared. Each finding's probability is the
    fraction of its slab's pixels that are bone, a statistic of the mask.
    """
    hu = np.stack([hounsfield(ds) for ds in sources])
    bone = hu > 300
    labels = np.zeros(hu.shape, np.uint8)
    half = len(sources) // 2
    labels[:half][bone[:half]] = 3
    labels[half:][bone[half:]] = 4
    for index in empty_frames:
        labels[index] = 0
    uids = tuple(str(ds.SOPInstanceUID) for ds in sources)
    # Label 7 ("C5") is declared but has no pixels: the encoder must keep it valid.
    segments = (Segment(3, "C3"), Segment(4, "C4"), Segment(7, "C5"))
    fraction_c3 = float((labels == 3).mean())
    fraction_c4 = float((labels == 4).mean())
    saliency = np.clip((hu - hu.min()) / (hu.max() - hu.min()), 0.0, 1.0).astype(np.float32)
    for index in empty_frames:
        saliency[index] = 0.0
    return Findings(
        pipeline="ct-cspine-fracture",
        model=model,
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=(str(sources[0].SeriesInstanceUID),),
        source_sop_instance_uids=uids,
        findings=[
            # Thresholds put C3 above and C4 below, to see both evaluations.
            Finding("fracture", fraction_c3, site="C3", threshold=fraction_c3 / 2, segment_label=3),
            Finding("fracture", fraction_c4, site="C4", threshold=0.99, segment_label=4),
            Finding("fracture", 0.0, site="C5", segment_label=7),
            Finding("fracture", max(fraction_c3, fraction_c4)),
        ],
        segmentation=LabelMap(labels, uids, segments),
        probability_map=ProbabilityMap(saliency, uids, "saliency"),
    )


def cr_image() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))


def cr_findings(source: Dataset) -> Findings:
    """Three pixel-value classes of a MONOCHROME1 radiograph (low values are dense)."""
    pixels = source.pixel_array.astype(np.float32)
    low, high = np.percentile(pixels, [30, 70])
    labels = np.zeros((1, *pixels.shape), np.uint8)
    labels[0][pixels <= low] = 1
    labels[0][(pixels > low) & (pixels < high)] = 2
    labels[0][pixels >= high] = 3
    assert all((labels == label).any() for label in (1, 2, 3))
    uid = str(source.SOPInstanceUID)
    bone_fraction = float((labels == 1).mean())
    return Findings(
        pipeline="xray-tissue-seg",
        model=DEMO_MODEL,
        study_uid=str(source.StudyInstanceUID),
        series_uids=(str(source.SeriesInstanceUID),),
        source_sop_instance_uids=(uid,),
        findings=[
            Finding("damage", bone_fraction, site="bone", segment_label=1),
            Finding("normal", 1.0 - bone_fraction),
        ],
        segmentation=LabelMap(
            labels, (uid,), (Segment(1, "bone"), Segment(2, "soft_tissue"), Segment(3, "open_beam"))
        ),
        probability_map=ProbabilityMap(
            (1.0 - pixels / pixels.max())[None].astype(np.float32), (uid,), "saliency"
        ),
    )


# ---------------------------------------------------------------- helpers


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run ``dciodvfy -new``; assert exit 0; return (error lines, warning lines)."""
    binary = tool("dciodvfy", "dicom3tools")
    result = subprocess.run(
        [binary, "-new", str(path)], capture_output=True, text=True, timeout=120
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, "\n".join(lines)
    return [line for line in lines if "Error" in line], [
        line for line in lines if "Warning" in line
    ]


def assert_valid(paths: Sequence[Path], allowed_warnings: Sequence[str] = ()) -> None:
    """No error and no warning, except dciodvfy not knowing our private coding scheme
    (and warnings containing one of ``allowed_warnings``).

    SR documents are also read by DCMTK's dsrdump, which checks the content tree.
    """
    for path in paths:
        if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR":
            dump = subprocess.run(
                [dcmtk("dsrdump"), str(path)], capture_output=True, text=True, timeout=120
            )
            assert dump.returncode == 0 and dump.stderr == "", dump.stderr
        errors, warnings = dciodvfy(path)
        assert errors == [], f"{path.name}: {errors}"
        unexpected = [
            line
            for line in warnings
            if f"Unrecognized defined term = <{codes.PRIVATE_SCHEME}>" not in line
            and not any(allowed in line for allowed in allowed_warnings)
        ]
        assert unexpected == [], f"{path.name}: {unexpected}"
        if any(f"Unrecognized defined term = <{codes.PRIVATE_SCHEME}>" in line for line in warnings):
            declared = pydicom.dcmread(path, stop_before_pixels=True)
            (scheme,) = declared.CodingSchemeIdentificationSequence
            assert scheme.CodingSchemeDesignator == codes.PRIVATE_SCHEME


def frame_sources(seg: Dataset) -> list[str]:
    return [
        str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for item in seg.PerFrameFunctionalGroupsSequence
    ]


def seg_labels_per_source(seg: hd.seg.Segmentation, uids: Sequence[str]) -> np.ndarray:
    """Segment numbers per source instance, as a (frames, rows, columns) array."""
    return np.stack(
        [
            seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[uid], combine_segments=True
            )[0]
            for uid in uids
        ]
    )


def report_of(sr: Dataset) -> hd.sr.MeasurementReport:
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return cast(hd.sr.MeasurementReport, sr.content)


def qualitative(group: object, name: hd.sr.CodedConcept) -> str:
    values = [q.value for q in group.get_qualitative_evaluations() if q.name == name]  # type: ignore[attr-defined]
    assert len(values) == 1
    return str(values[0].meaning)


# ---------------------------------------------------------------- code tables


def test_standard_codes_agree_with_the_dicom_dictionary() -> None:
    by_value = {}
    for scheme in ("SCT", "DCM", "UCUM", "LN"):
        dictionary = getattr(pydicom_codes, scheme)
        for name in dir(dictionary):
            code = getattr(dictionary, name)
            if isinstance(code, Code):
                by_value[(scheme, code.value)] = code
    outside_dictionary = {"3572006", "360499006", "72704001", "87642003"}
    concepts = [codes.structure(key).property_type for key in codes.structure_keys()]
    concepts += [codes.structure(key).category for key in codes.structure_keys()]
    concepts += [codes.finding(kind) for kind in codes.finding_kinds()]
    concepts += [codes.PROBABILITY, codes.UNIT_NO_UNITS, codes.PRESENT, codes.ABSENT,
                 codes.INDETERMINATE]
    concepts += [codes.procedure_reported(m) for m in ("CT", "CR", "MR")]
    concepts += [codes.CENTER, codes.NOT_PERFORMED, codes.AI_ANALYSIS, codes.SITE_ASSESSMENT]
    concepts += [codes.assessment(value) for value in AssessmentValues]
    concepts += list(codes.VIEWS.values())
    for concept in concepts:
        if concept.scheme_designator == codes.PRIVATE_SCHEME:
            assert concept.value in (codes.__doc__ or "")
            continue
        if concept.value in outside_dictionary:
            assert concept.value in (codes.__doc__ or ""), concept.value
            continue
        assert (concept.scheme_designator, concept.value) in by_value, concept


def test_every_pipeline_key_has_a_code() -> None:
    keys = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)]
    keys += [f"L{i}" for i in range(1, 6)]
    keys += ["vertebral_body", "pedicle", "spinous_process", "posterior_elements"]
    keys += ["intervertebral_disc", "spinal_canal", "prevertebral_soft_tissue"]
    keys += ["bone", "soft_tissue", "open_beam", "saliency"]
    categories = {c.value for c in map(hd.sr.CodedConcept.from_code, (
        pydicom_codes.SCT.Tissue, pydicom_codes.SCT.AnatomicalStructure,
        pydicom_codes.SCT.Substance, pydicom_codes.SCT.SpatialAndRelationalConcept,
    ))}
    for key in keys:
        structure = codes.structure(key)
        assert structure.category.value in categories  # CID 7150
        assert structure.label
    assert codes.structure("C3").property_type.meaning == "C3 vertebra"
    for kind in ("fracture", "dislocation", "damage", "normal"):
        assert codes.finding(kind).scheme_designator == "SCT"
    with pytest.raises(codes.UnknownCodeError, match="'C8'"):
        codes.structure("C8")
    with pytest.raises(codes.UnknownCodeError, match="'osteoporosis'"):
        codes.finding("osteoporosis")


# ---------------------------------------------------------------- CT series


def test_ct_series_seg_and_sr_are_valid_and_round_trip(tmp_path: Path) -> None:
    sources = ct_series()
    findings = ct_findings(sources)
    # The encoder must follow the label map's frame order, not the order of `sources`.
    objects = encode(findings, list(reversed(sources)))
    assert [ds.Modality for ds in objects] == ["SEG", "SEG", "SR"]
    paths = write_results(objects, tmp_path)
    assert_valid(paths)

    uids = [str(ds.SOPInstanceUID) for ds in sources]
    labelmap = findings.segmentation
    assert labelmap is not None
    numbers = segment_numbers(labelmap)
    assert numbers == {3: 1, 4: 2, 7: 3}

    seg = hd.seg.segread(paths[0])
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.segment_numbers == [1, 2, 3]
    c3 = seg.get_segment_description(1)
    assert c3.segment_label == "C3 vertebra"
    assert c3.segmented_property_type == codes.structure("C3").property_type
    assert c3.segmented_property_category == codes.CATEGORY_ANATOMICAL_STRUCTURE
    assert c3.tracking_id == "C3"
    assert c3.algorithm_identification is not None
    algorithm = c3.algorithm_identification[0]
    assert algorithm.AlgorithmName == DEMO_MODEL.name
    assert algorithm.AlgorithmVersion == DEMO_MODEL.version
    assert "backend" in algorithm.AlgorithmParameters and "numpy" in algorithm.AlgorithmParameters
    assert seg.ContentDescription == NOT_FOR_CLINICAL_USE
    assert seg.SeriesNumber == ResultsOptions().seg_series_number
    expected = np.zeros(labelmap.labels.shape, np.uint16)
    for label, number in numbers.items():
        expected[labelmap.labels == label] = number
    np.testing.assert_array_equal(seg_labels_per_source(seg, uids), expected)

    fractional = hd.seg.segread(paths[1])
    assert fractional.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    assert fractional.SeriesInstanceUID == seg.SeriesInstanceUID
    assert fractional.SOPInstanceUID != seg.SOPInstanceUID
    saliency_code = fractional.get_segment_description(1).segmented_property_type
    assert saliency_code == hd.sr.CodedConcept.from_code(pydicom_codes.DCM.Saliency)
    assert findings.probability_map is not None
    read = np.stack(
        [fractional.get_pixels_by_source_instance(source_sop_instance_uids=[u])[0, ..., 0]
         for u in uids]
    )
    np.testing.assert_allclose(read, findings.probability_map.values, atol=0.5 / 255 + 1e-6)

    sr = hd.sr.srread(paths[2])
    assert sr.SeriesNumber == ResultsOptions().sr_series_number
    assert sr.VerificationFlag == "UNVERIFIED"
    volumetric = report_of(sr).get_volumetric_roi_measurement_groups()
    image_level = report_of(sr).get_image_measurement_groups()
    # C3 and C4 have pixels and reference their segments; C5 is empty and the
    # series-level finding has no site: both reference the source images instead.
    assert len(volumetric) == 2 and len(image_level) == 2
    fracture = codes.finding("fracture")
    for group, finding in zip(volumetric, findings.findings[:2], strict=True):
        assert group.finding_type == fracture
        assert group.finding_sites[0].value == codes.structure(str(finding.site)).property_type
        (measurement,) = group.get_measurements()
        assert measurement.name == codes.PROBABILITY
        assert measurement.unit == codes.UNIT_NO_UNITS
        assert measurement.value == pytest.approx(finding.probability, abs=1e-6)
        assert qualitative(group, fracture) == ("Present" if finding.present else "Absent")
        reference = group.referenced_segment
        assert reference is not None
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert finding.segment_label is not None
        assert reference.referenced_segment_numbers == [numbers[finding.segment_label]]
        referenced_sources = {
            image.referenced_sop_instance_uid
            for image in reference.source_images_for_segmentation
        }
        frames_with_label = {
            uid for uid, frame in zip(uids, labelmap.labels, strict=True)
            if (frame == finding.segment_label).any()
        }
        assert referenced_sources == frames_with_label
    assert findings.findings[0].present and not findings.findings[1].present
    site_less = image_level[1]
    assert site_less.finding_sites[0].value == codes.SPINE
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == set(uids) | {seg.SOPInstanceUID}
    observers = report_of(sr).get_observer_contexts()
    device = [o for o in observers if o.observer_type == codes.DEVICE]
    assert device and device[0].observer_identifying_attributes.name == DEMO_MODEL.name
    assert "NOT FOR CLINICAL USE" in text_of(sr)


def text_of(sr: Dataset) -> str:
    texts: list[str] = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                texts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return "\n".join(texts)


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_empty_middle_frames_keep_every_frame_on_its_source(tmp_path: Path, order: str) -> None:
    sources = ct_series(slices=6)
    if order == "descending":  # a pipeline may sort slices head first
        sources.reverse()
    findings = ct_findings(sources, empty_frames=(2, 3))
    labelmap = findings.segmentation
    assert labelmap is not None
    seg = build_segmentation(findings, list(reversed(sources)), series_number=77)
    (path,) = write_results([seg], tmp_path)
    assert_valid([path])
    read = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    # Empty frames are omitted, so the SEG has fewer frames than the series...
    stored = sum(
        int((frame == label).any()) for frame in labelmap.labels for label in (3, 4, 7)
    )
    assert stored == 4 and int(read.NumberOfFrames) == stored
    referenced = frame_sources(read)
    assert uids[2] not in referenced and uids[3] not in referenced
    # ...and every stored frame still carries exactly its own source's mask.
    numbers = segment_numbers(labelmap)
    per_frame_segments = [
        int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for item in read.PerFrameFunctionalGroupsSequence
    ]
    label_of = {number: label for label, number in numbers.items()}
    for index, (uid, number) in enumerate(zip(referenced, per_frame_segments, strict=True)):
        frame = read.pixel_array[index].astype(bool)
        expected = labelmap.labels[uids.index(uid)] == label_of[number]
        np.testing.assert_array_equal(frame, expected)
    expected_all = np.zeros(labelmap.labels.shape, np.uint16)
    for label, number in numbers.items():
        expected_all[labelmap.labels == label] = number
    np.testing.assert_array_equal(seg_labels_per_source(read, uids), expected_all)
    assert read.SeriesNumber == 77


def test_all_empty_segmentation_is_still_a_valid_seg(tmp_path: Path) -> None:
    sources = ct_series(slices=3)
    findings = ct_findings(sources, empty_frames=(0, 1, 2))
    seg = build_segmentation(findings, sources)
    (path,) = write_results([seg], tmp_path)
    assert_valid([path])
    read = hd.seg.segread(path)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    assert not seg_labels_per_source(read, uids).any()


# ---------------------------------------------------------------- CR radiograph


def test_cr_radiograph_seg_and_sr_are_valid_and_round_trip(tmp_path: Path) -> None:
    source = cr_image()
    findings = cr_findings(source)
    objects = encode(findings, [source])
    paths = write_results(objects, tmp_path)
    assert_valid(paths)
    labelmap = findings.segmentation
    assert labelmap is not None

    seg = hd.seg.segread(paths[0])
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == [
        "Bone", "Soft tissue", "Open beam",
    ]
    assert seg.get_segment_description(3).segmented_property_type.value == "15158005"  # air
    read = seg_labels_per_source(seg, [str(source.SOPInstanceUID)])
    np.testing.assert_array_equal(read, labelmap.labels)
    assert set(frame_sources(seg)) == {str(source.SOPInstanceUID)}

    sr = hd.sr.srread(paths[2])
    (planar,) = report_of(sr).get_planar_roi_measurement_groups()
    assert planar.finding_type == codes.finding("damage")
    reference = planar.referenced_segmentation_frame
    assert reference is not None
    assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
    # The frame implies the segment (PS3.3 Table 10-3 allows no segment number beside it).
    (frame_number,) = reference.referenced_frame_numbers or []
    item = seg.PerFrameFunctionalGroupsSequence[frame_number - 1]
    assert item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == 1
    assert reference.source_image_for_segmentation.referenced_sop_instance_uid == str(
        source.SOPInstanceUID
    )
    (image_level,) = report_of(sr).get_image_measurement_groups()
    assert image_level.finding_type == codes.finding("normal")
    (measurement,) = image_level.get_measurements()
    assert measurement.value == pytest.approx(findings.findings[1].probability, abs=1e-6)
    assert {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in image_level[0].ContentSequence
        if item.ValueType == "IMAGE"
    } == {str(source.SOPInstanceUID)}


def test_report_without_segmentation_references_source_images(tmp_path: Path) -> None:
    source = cr_image()
    findings = cr_findings(source)
    findings.segmentation = None
    findings.probability_map = None
    objects = encode(findings, [source])
    assert [ds.Modality for ds in objects] == ["SR"]
    assert_valid(write_results(objects, tmp_path))
    sr = hd.sr.srread(write_results(objects, tmp_path)[0])
    groups = report_of(sr).get_image_measurement_groups()
    assert [g.finding_type for g in groups] == [codes.finding("damage"), codes.finding("normal")]
    assert groups[0].finding_sites[0].value == codes.structure("bone").property_type


def test_a_finding_between_rule_out_and_rule_in_is_indeterminate(tmp_path: Path) -> None:
    """With a rule-out point, the SR's qualitative evaluation has three values: present at
    or above the threshold, indeterminate (SCT 82334004) from rule-out up to it, absent
    below; both points are in the algorithm's parameters. The SR stays valid."""
    sources = ct_series()
    findings = ct_findings(sources)
    findings.findings = [
        Finding("fracture", 0.95, site="C3", threshold=0.9, segment_label=3, rule_out=0.2),
        Finding("fracture", 0.5, site="C4", threshold=0.9, segment_label=4, rule_out=0.2),
        Finding("fracture", 0.1, site="C5", threshold=0.9, segment_label=7, rule_out=0.2),
        Finding("fracture", 0.95, threshold=0.9, rule_out=0.2),
    ]
    assert [f.call for f in findings.findings] == ["present", "indeterminate", "absent", "present"]
    assert Finding("fracture", 0.5, threshold=0.9).call == "absent"  # no rule-out: one cut
    paths = write_results(encode(findings, sources), tmp_path)
    assert_valid(paths)
    sr = hd.sr.srread(paths[-1])
    fracture = codes.finding("fracture")
    groups = {str(g.finding_sites[0].value.meaning): g
              for g in report_of(sr).get_volumetric_roi_measurement_groups()
              + report_of(sr).get_image_measurement_groups()}
    by_site = {site: qualitative(group, fracture) for site, group in groups.items()}
    assert sorted(by_site.values()) == ["Absent", "Indeterminate", "Present", "Present"]
    text = text_of(sr)
    assert "threshold=0.9" in text and "rule_out=0.2" in text


# ---------------------------------------------------------------- identity


def test_uids_are_deterministic_and_follow_the_model_version(tmp_path: Path) -> None:
    sources = ct_series(slices=3)
    first = encode(ct_findings(sources), sources)
    again = encode(ct_findings(sources), list(reversed(sources)))
    key = [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in first]
    assert key == [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in again]
    assert len({uid for pair in key for uid in pair}) == 5  # 2 series, 3 instances

    newer = ModelInfo(**{**DEMO_MODEL.__dict__, "version": "1.0.1"})
    # Retrained weights under the same version are another model too.
    retrained = ModelInfo(**{**DEMO_MODEL.__dict__, "weights": "0f" * 32})
    assert retrained.weights != DEMO_MODEL.weights
    for model in (newer, retrained):
        other = encode(ct_findings(sources, model=model), sources)
        assert not {uid for ds in other for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)} & {
            uid for pair in key for uid in pair
        }

    paths = write_results(first, tmp_path)
    assert write_results(again, tmp_path) == paths  # a re-run replaces, never duplicates
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(paths)
    for path, ds in zip(paths, first, strict=True):
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert path.parent.name == ds.SeriesInstanceUID
        assert path.parent.parent.name == ds.StudyInstanceUID


def test_uids_follow_the_exact_source_set() -> None:
    """A series that grew (35 of 100 slices, then all 100) gets other result UIDs: one
    UID never names two different contents; the same set in another order keeps them."""
    sources = ct_series(slices=6)
    part = encode(ct_findings(sources[:4]), sources[:4])
    whole = encode(ct_findings(sources), sources)
    uids = {uid for ds in part for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    assert not uids & {uid for ds in whole for uid in (ds.SeriesInstanceUID, ds.SOPInstanceUID)}
    shuffled = [sources[i] for i in (3, 1, 0, 2)]
    again = encode(ct_findings(shuffled), shuffled)
    assert [ds.SOPInstanceUID for ds in again] == [ds.SOPInstanceUID for ds in part]


def test_equipment_and_numbers_come_from_options() -> None:
    sources = ct_series(slices=3)
    options = ResultsOptions(
        manufacturer="Hospital IT",
        device_serial_number="NODE-7",
        software_versions="9.9",
        seg_series_number=1234,
        sr_series_number=1235,
    )
    seg, fractional, sr = encode(ct_findings(sources), sources, options=options)
    for ds in (seg, fractional, sr):
        assert ds.Manufacturer == "Hospital IT"
        assert ds.DeviceSerialNumber == "NODE-7"
        assert ds.SoftwareVersions == "9.9"
    assert (seg.SeriesNumber, fractional.SeriesNumber, sr.SeriesNumber) == (1234, 1234, 1235)
    assert (seg.InstanceNumber, fractional.InstanceNumber) == (1, 2)


def test_clinical_model_has_no_demo_text() -> None:
    sources = ct_series(slices=3)
    clinical = ModelInfo(**{**DEMO_MODEL.__dict__, "clinical_use": True})
    seg, _, sr = encode(ct_findings(sources, model=clinical), sources)
    assert not seg.get("ContentDescription")
    assert "NOT FOR CLINICAL USE" not in text_of(sr)
    assert "demo" not in sr.SeriesDescription


# ---------------------------------------------------------------- errors


def test_bad_inputs_raise_results_errors() -> None:
    sources = ct_series(slices=3)
    findings = ct_findings(sources)
    with pytest.raises(ResultsError, match="not among"):
        build_segmentation(findings, sources[:2])
    assert findings.segmentation is not None
    findings.segmentation.labels[0, 0, 0] = 9
    with pytest.raises(ResultsError, match=r"without a segment: \[9\]"):
        build_segmentation(findings, sources)
    findings = ct_findings(sources)
    assert findings.probability_map is not None
    findings.probability_map.values[0, 0, 0] = 1.5
    with pytest.raises(ResultsError, match="expected"):
        build_probability_segmentation(findings, sources)
    findings = ct_findings(sources)
    findings.findings.append(Finding("osteoporosis", 0.3))
    with pytest.raises(codes.UnknownCodeError):
        build_report(findings, sources)
    with pytest.raises(ResultsError, match="series_number"):
        ResultsOptions(sr_series_number=-1)


# ---------------------------------------------------------------- more shapes of input


def banded_findings(source: Dataset, keys: Sequence[str]) -> Findings:
    """Dense pixels (below the median of a MONOCHROME1 image) in one column strip per key."""
    pixels = source.pixel_array
    strips = np.arange(pixels.shape[1]) * len(keys) // pixels.shape[1]  # 0 .. len(keys) - 1
    labels = np.where(pixels < np.median(pixels), strips[None, :] + 1, 0).astype(np.uint8)[None]
    assert all((labels == index + 1).any() for index in range(len(keys)))
    uid = str(source.SOPInstanceUID)
    segments = tuple(Segment(index + 1, key) for index, key in enumerate(keys))
    return Findings(
        pipeline="xray-spine-seg",
        model=DEMO_MODEL,
        study_uid=str(source.StudyInstanceUID),
        series_uids=(str(source.SeriesInstanceUID),),
        source_sop_instance_uids=(uid,),
        findings=[
            Finding("fracture", float((labels == s.label).mean()), s.name, segment_label=s.label)
            for s in segments
        ],
        segmentation=LabelMap(labels, (uid,), segments),
    )


@pytest.mark.parametrize(
    "keys",
    [
        ("vertebral_body",),
        ("vertebral_body", "pedicle", "spinous_process"),
        (
            "vertebral_body",
            "posterior_elements",
            "intervertebral_disc",
            "spinal_canal",
            "prevertebral_soft_tissue",
        ),
    ],
    ids=["single-segment", "ap", "lat"],
)
def test_radiograph_structures_reference_their_segment_frames(
    tmp_path: Path, keys: Sequence[str]
) -> None:
    source = cr_image()
    findings = banded_findings(source, keys)
    paths = write_results(encode(findings, [source]), tmp_path)
    assert_valid(paths)
    seg = hd.seg.segread(paths[0])
    assert [seg.get_segment_description(n).tracking_id for n in seg.segment_numbers] == list(keys)
    assert findings.segmentation is not None
    np.testing.assert_array_equal(
        seg_labels_per_source(seg, [str(source.SOPInstanceUID)]), findings.segmentation.labels
    )
    sr = hd.sr.srread(paths[1])
    planar = report_of(sr).get_planar_roi_measurement_groups()
    assert len(planar) == len(keys)
    shared = seg.SharedFunctionalGroupsSequence[0]
    for group, key in zip(planar, keys, strict=True):
        assert group.finding_sites[0].value == codes.structure(key).property_type
        reference = group.referenced_segmentation_frame
        assert reference is not None
        (frame_number,) = reference.referenced_frame_numbers or []
        identification = (
            shared if len(keys) == 1 else seg.PerFrameFunctionalGroupsSequence[frame_number - 1]
        ).SegmentIdentificationSequence[0]
        assert identification.ReferencedSegmentNumber == keys.index(key) + 1


def test_multiframe_source_frames_map_to_its_frames(tmp_path: Path) -> None:
    source = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    pixels = source.pixel_array
    labels = (pixels > np.percentile(pixels, 80)).astype(np.uint8)
    labels[1] = 0  # second frame empty: omitted, and must not take the first's place
    uid = str(source.SOPInstanceUID)
    findings = Findings(
        pipeline="ct-cspine-fracture",
        model=DEMO_MODEL,
        study_uid=str(source.StudyInstanceUID),
        series_uids=(str(source.SeriesInstanceUID),),
        source_sop_instance_uids=(uid,),
        findings=[Finding("fracture", float(labels.mean()), site="C2", segment_label=1)],
        segmentation=LabelMap(labels, (uid, uid), (Segment(1, "C2"),)),
    )
    paths = write_results(encode(findings, [source]), tmp_path)
    assert_valid(paths)
    seg = hd.seg.segread(paths[0])
    assert int(seg.NumberOfFrames) == 1
    read = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid,
        source_frame_numbers=[1, 2],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(read, labels)
    (group,) = report_of(hd.sr.srread(paths[1])).get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is not None
    (image,) = group.referenced_segment.source_images_for_segmentation
    assert image.referenced_sop_instance_uid == uid
    assert image.referenced_frame_numbers == [1]


def test_options_from_settings_use_the_node_ae_title() -> None:
    from spine_node.node.config import load_settings

    options = ResultsOptions.from_settings(
        load_settings(dicom={"ae_title": "SPINE_TEST"}), sr_series_number=4242
    )
    assert options.device_serial_number == "SPINE_TEST"
    assert options.sr_series_number == 4242


@pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:A value of type")
def test_write_results_validates_uids_and_leaves_no_partial_file(tmp_path: Path) -> None:
    from spine_node.node.errors import InvalidUIDError

    sources = ct_series(slices=3)
    seg, _, sr = encode(ct_findings(sources), sources)
    bad = copy.deepcopy(sr)
    bad.SeriesInstanceUID = "1.2.3/../../etc"
    with pytest.raises(InvalidUIDError):
        write_results([bad], tmp_path)
    unwritable = copy.deepcopy(seg)
    unwritable.Rows = "not a number"  # fails half-way through encoding
    with pytest.raises(ResultsError, match="cannot write result"):
        write_results([unwritable], tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_headers_without_pixel_data_are_enough(tmp_path: Path) -> None:
    """A worker may read sources with ``stop_before_pixels=True`` to save memory."""
    sources = ct_series(slices=3)
    headers = []
    for ds in sources:
        path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        headers.append(pydicom.dcmread(path, stop_before_pixels=True))
    from_headers = encode(ct_findings(sources), headers)
    assert_valid(write_results(from_headers, tmp_path / "results"))
    full = encode(ct_findings(sources), sources)
    for a, b in zip(from_headers, full, strict=True):
        assert a.SOPInstanceUID == b.SOPInstanceUID
        if "PixelData" in b:
            assert a.PixelData == b.PixelData


def _image_library_entries(sr: Dataset) -> int:
    """Entries of the SR's TID 1600 Image Library (0 where it has none)."""
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "111028":  # Image Library
            return sum(len(group.get("ContentSequence", [])) for group in item.ContentSequence)
    return 0


def test_image_library_is_left_out_above_the_configured_number_of_sources(tmp_path: Path) -> None:
    """A few sources get an Image Library entry each; a long series gets none (it cost
    8 of 10 s of encoding a 300-slice CT) and the report stays valid and referenced."""
    sources = ct_series(slices=6)
    findings = ct_findings(sources)
    small = encode(findings, sources)
    assert _image_library_entries(small[-1]) == 6
    trimmed = encode(findings, sources, options=ResultsOptions(image_library_max_images=5))
    sr = trimmed[-1]
    assert sr.Modality == "SR" and _image_library_entries(sr) == 0
    paths = write_results(trimmed, tmp_path)
    assert_valid(paths)
    # The measurement groups still point at the SEG's segments.
    groups = report_of(hd.sr.srread(paths[-1])).get_volumetric_roi_measurement_groups()
    assert groups and all(g.referenced_segment is not None for g in groups)
    with pytest.raises(ResultsError, match="image_library_max_images"):
        ResultsOptions(image_library_max_images=-1)


# ---------------------------------------------------------------- not performed, sites, notes


def not_performed(sources: Sequence[Dataset], reason: str, model: ModelInfo = DEMO_MODEL) -> Findings:
    return Findings(
        pipeline="ct-cspine-fracture",
        model=model,
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=(str(sources[0].SeriesInstanceUID),),
        source_sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in sources),
        not_performed_reason=reason,
        notes=("Slices assumed contiguous",),
    )


def all_groups(sr: Dataset) -> list[object]:
    report = report_of(sr)
    return [
        *report.get_volumetric_roi_measurement_groups(),
        *report.get_planar_roi_measurement_groups(),
        *report.get_image_measurement_groups(),
    ]


def root_texts(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in sr.ContentSequence if item.ValueType == "TEXT"]


def test_not_performed_gives_only_an_sr_that_says_so_and_why(tmp_path: Path) -> None:
    sources = ct_series(slices=3)
    findings = not_performed(sources, "Cervical spine not in the field of view")
    objects = encode(findings, sources)
    assert [ds.Modality for ds in objects] == ["SR"]  # no SEG, even though nothing failed
    paths = write_results(objects, tmp_path)
    assert_valid(paths)

    sr = hd.sr.srread(paths[0])
    assert "not performed" in sr.SeriesDescription
    (group,) = all_groups(sr)
    assert group.tracking_identifier == "Analysis not performed"  # type: ignore[attr-defined]
    assert qualitative(group, codes.AI_ANALYSIS) == "Not performed"
    assert codes.NOT_PERFORMED.value == "262008008"
    text = text_of(sr)
    assert "Analysis not performed: Cervical spine not in the field of view" in text
    assert "Note: Slices assumed contiguous" in text
    assert "NOT FOR CLINICAL USE" in text  # the long disclaimer stays
    # The short disclaimer is the first text at the root, before any measurement.
    assert root_texts(sr)[-1] == SHORT_DISCLAIMER
    kinds = [item.ValueType for item in sr.ContentSequence]
    assert kinds.index("TEXT", kinds.index("CODE")) < kinds.index("CONTAINER")
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}


def test_not_performed_uids_follow_the_outcome_and_repeat_on_a_rerun() -> None:
    sources = ct_series(slices=3)
    (first,) = encode(not_performed(sources, "Slices thicker than 3 mm"), sources)
    (again,) = encode(not_performed(sources, "Slices thicker than 3 mm"), list(reversed(sources)))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    (other,) = encode(not_performed(sources, "Only 1 slice"), sources)
    (coded,) = encode(not_performed(sources, "Slices thicker than 3 mm"), sources, reason_code="thick")
    performed = encode(ct_findings(sources), sources)
    uids = {first.SOPInstanceUID, other.SOPInstanceUID, coded.SOPInstanceUID, performed[-1].SOPInstanceUID}
    assert len(uids) == 4
    with pytest.raises(ResultsError, match="were performed"):
        build_not_performed_report(ct_findings(sources), sources)


def test_every_site_appears_with_its_status(tmp_path: Path) -> None:
    sources = ct_series()
    findings = ct_findings(sources)
    findings.site_status = (
        SiteStatus("C1", AssessmentValues.NOT_ASSESSABLE, "Streak artefact from dental fillings"),
        SiteStatus("C2", AssessmentValues.NOT_ASSESSABLE, "Motion"),
        SiteStatus("C3", AssessmentValues.ASSESSED),
        SiteStatus("C4", AssessmentValues.ASSESSED),
        SiteStatus("C5", AssessmentValues.ASSESSED),
        SiteStatus("C6", AssessmentValues.NOT_IN_FIELD, "C6 is below the last slice"),
        SiteStatus("C7", AssessmentValues.NOT_IN_FIELD, "C7 is below the last slice"),
    )
    findings.notes = ("Pixel spacing assumed 0.5 mm",)
    paths = write_results(encode(findings, sources), tmp_path)
    assert_valid(paths)

    sr = hd.sr.srread(paths[-1])
    statuses: dict[str, str] = {}
    for group in all_groups(sr):
        evaluations = [q for q in group.get_qualitative_evaluations()  # type: ignore[attr-defined]
                       if q.name == codes.SITE_ASSESSMENT]
        if evaluations:
            site = group.finding_sites[0].value  # type: ignore[attr-defined]
            key = next(k for k in codes.VERTEBRAE if codes.VERTEBRAE[k] == site)
            assert key not in statuses, f"{key} listed twice"
            statuses[key] = str(evaluations[0].value.meaning)
    assert statuses == {
        "C1": "Not assessable", "C2": "Not assessable", "C3": "Assessed", "C4": "Assessed",
        "C5": "Assessed", "C6": "Not in field of view", "C7": "Not in field of view",
    }
    # Sites with a finding keep one group (the status joins it); the others get their own.
    assert len(all_groups(sr)) == len(findings.findings) + 4
    text = text_of(sr)
    assert "C7: not in field of view: C7 is below the last slice" in text
    assert "C1: not assessable: Streak artefact from dental fillings" in text
    assert "Note: Pixel spacing assumed 0.5 mm" in text


def test_a_site_without_a_code_is_still_listed(tmp_path: Path) -> None:
    sources = ct_series(slices=2)
    findings = not_performed(sources, "Only 2 slices")
    findings.site_status = (SiteStatus("C1-C2 joint", AssessmentValues.NOT_ASSESSABLE),)
    paths = write_results(encode(findings, sources), tmp_path)
    assert_valid(paths)
    assert "C1-C2 joint: not assessable" in text_of(pydicom.dcmread(paths[0]))


def test_view_sites_have_codes_and_unknown_statuses_fail() -> None:
    assert codes.finding_site("LAT") == hd.sr.CodedConcept.from_code(pydicom_codes.SCT.LateralProjection)
    assert codes.finding_site("AP").value == "399348003"
    with pytest.raises(codes.UnknownCodeError, match="probably"):
        codes.assessment("probably")


def test_clinical_model_has_no_short_disclaimer() -> None:
    sources = ct_series(slices=3)
    clinical = ModelInfo(**{**DEMO_MODEL.__dict__, "clinical_use": True})
    (sr,) = encode(not_performed(sources, "Only 1 slice", model=clinical), sources)
    assert SHORT_DISCLAIMER not in root_texts(sr)
    assert "demo" not in sr.SeriesDescription.lower()
    (demo,) = encode(not_performed(sources, "Only 1 slice"), sources)
    assert SHORT_DISCLAIMER in root_texts(demo)
    assert len(SHORT_DISCLAIMER) <= 64


def centroid_findings(sources: Sequence[Dataset]) -> Findings:
    findings = ct_findings(sources)
    findings.findings[0] = dataclasses.replace(findings.findings[0], centroid_mm=(1.5, -20.25, 30.0))
    findings.findings[2] = dataclasses.replace(findings.findings[2], centroid_mm=(-3.0, 4.0, 41.5))
    return findings


def test_centroids_become_scoord3d_points_in_the_source_frame_of_reference(tmp_path: Path) -> None:
    sources = ct_series(slices=4)
    paths = write_results(encode(centroid_findings(sources), sources), tmp_path)
    assert_valid(paths)
    sr = pydicom.dcmread(paths[-1])
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    points = {}
    for group in measurements.ContentSequence:
        tracking = next(i.TextValue for i in group.ContentSequence if i.ValueType == "TEXT")
        for item in group.ContentSequence:
            if item.ValueType == "SCOORD3D":
                assert item.GraphicType == "POINT"
                assert item.ReferencedFrameOfReferenceUID == sources[0].FrameOfReferenceUID
                assert item.ConceptNameCodeSequence[0].CodeMeaning == "Center"
                points[str(tracking)] = [float(v) for v in item.GraphicData]
    assert points == {"fracture C3": [1.5, -20.25, 30.0], "fracture C5": [-3.0, 4.0, 41.5]}


def test_radiograph_without_frame_of_reference_gets_no_point() -> None:
    source = cr_image()
    assert "FrameOfReferenceUID" not in source
    findings = cr_findings(source)
    findings.findings[0] = dataclasses.replace(findings.findings[0], centroid_mm=(1.0, 2.0, 3.0))
    sr = encode(findings, [source])[-1]
    assert not [e for e in sr.iterall() if e.keyword == "ValueType" and e.value == "SCOORD3D"]


# ---------------------------------------------------------------- hostile patient attributes

#: Values a broken modality writes; none is valid for its VR, each must stay out of every
#: result, error and log.
PHI_VALUES = {
    "PatientBirthDate": "1980-01-01",
    "StudyDate": "19800101XY",
    "StudyTime": "25:99:00",
    "PatientAge": "45 years",
    "ReferringPhysicianName": "Dr " + "Strangelove" * 7,  # a PN component over 64 characters
    "PatientSex": "female",
}


def phi_laden(sources: Sequence[Dataset]) -> list[Dataset]:
    """``sources`` saved with invalid patient and study values and read back (raw elements)."""
    import io
    import warnings

    out = []
    for ds in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pydicom.config.disable_value_validation():
                for keyword, value in PHI_VALUES.items():
                    setattr(ds, keyword, value)
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        buffer.seek(0)
        out.append(pydicom.dcmread(buffer))
    return out


def test_invalid_patient_values_are_blanked_or_dropped_never_quoted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = phi_laden(ct_series(slices=3))
    caplog.set_level("DEBUG")
    with warnings_as_errors():
        cleaned = sanitise_sources(sources)
        paths = write_results(encode(ct_findings(sources), sources), tmp_path)
    assert cleaned.blanked == ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyDate", "StudyTime")
    assert cleaned.dropped == ("PatientAge",)
    # Study Date and Time blanked (type 2): valid, but a DICOMDIR would want them.
    assert_valid(paths, allowed_warnings=["Missing attribute or value that would be needed to build DICOMDIR"])
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.PatientBirthDate == "" and ds.StudyDate == "" and "PatientAge" not in ds
        assert ds.PatientName == sources[0].PatientName  # valid values are kept
        assert ds.PatientID == sources[0].PatientID
    for value in PHI_VALUES.values():
        assert value not in caplog.text
        assert not any(value in path.read_bytes().decode("latin-1") for path in paths)
    # The sources themselves are untouched.
    assert sources[0].get_item("PatientBirthDate").value == b"1980-01-01"


def test_errors_from_pydicom_do_not_quote_values() -> None:
    message = ""
    try:
        pydicom.valuerep.DA("1980-01-01")
    except ValueError as exc:
        message = safe_error(exc)
    assert "1980" not in message and "ValueError" in message


class warnings_as_errors:
    """pydicom warns (and logs) with the value when it meets an invalid one: fail instead."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
