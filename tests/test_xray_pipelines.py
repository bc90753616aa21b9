"""X-ray pipelines end to end: phantom radiographs written as DICOM, committed demo
weights through ONNX Runtime, Findings checked against the phantoms' ground truth.

The phantom seeds here are never used in training (training uses 20260523 + i and
evaluates on 90000000 + i).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("scipy")  # the phantoms need it

from spine_node.inference import phantoms  # noqa: E402
from spine_node.inference.errors import PipelineError  # noqa: E402
from spine_node.inference.pipelines import get as get_pipeline  # noqa: E402
from spine_node.inference.pipelines.xray import (  # noqa: E402
    AP_STRUCTURES,
    LAT_STRUCTURES,
    TISSUES,
    prepare_radiograph,
    read_radiograph,
    resize_bilinear,
)
from spine_node.inference.series import SeriesRef  # noqa: E402
from tests.xray_engines import OrtModels  # noqa: E402

SEED = 97000001


@pytest.fixture(scope="module")
def models() -> OrtModels:
    return OrtModels()


def _series(path: Path) -> SeriesRef:
    ds = pydicom.dcmread(next(path.glob("*.dcm")), stop_before_pixels=True)
    return SeriesRef(study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                     path=path, modality=str(ds.Modality), body_part=str(ds.BodyPartExamined),
                     view_position=str(ds.ViewPosition), sop_class_uid=str(ds.SOPClassUID),
                     instance_count=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One held-out phantom with a C5 dislocation, written as a DX AP and a CR LAT image."""
    root = tmp_path_factory.mktemp("xray-study")
    phantom = phantoms.generate(SEED, region="cervical", fractures={}, dislocation="C5")
    ap = phantom.radiograph("AP", photons=1e4, rng=np.random.default_rng(1))
    lat = phantom.radiograph("LAT", photons=1e4, rng=np.random.default_rng(2))
    phantoms.write_radiograph(ap, root / "ap", view="AP", modality="DX", seed=SEED)
    phantoms.write_radiograph(lat, root / "lat", view="LAT", modality="CR", seed=SEED)
    return {"phantom": phantom, "AP": ap, "LAT": lat,
            "ap": _series(root / "ap"), "lat": _series(root / "lat"), "root": root}


@pytest.fixture(scope="module")
def cohort_studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, SeriesRef]]:
    """Held-out studies like the classifiers' training phantoms (1 mm, findings that show
    on a radiograph), each written as a DX AP and a CR LAT image: no finding, a C5
    compression with a C3 crack, a C4 dislocation."""
    root = tmp_path_factory.mktemp("xray-cohort")
    cases = {"normal": {"fractures": {}, "p_dislocation": 0.0},
             "fracture": {"fractures": {"C5": "wedge", "C3": "crack"}, "p_dislocation": 0.0},
             "dislocation": {"fractures": {}, "dislocation": "C4"}}
    studies: dict[str, dict[str, SeriesRef]] = {}
    for offset, (case, findings) in enumerate(cases.items()):
        seed = SEED + 10 + offset
        phantom = phantoms.generate(seed, shape=(160, 128, 128), spacing=1.0,
                                    radiographic_findings=True, **findings)
        studies[case] = {}
        for view, modality in (("AP", "DX"), ("LAT", "CR")):
            image = phantom.radiograph(view, photons=3e4, rng=np.random.default_rng(seed))
            phantoms.write_radiograph(image, root / case / view, view=view, modality=modality,
                                      seed=seed)
            studies[case][view] = _series(root / case / view)
    return studies


def test_classifier_pipelines_tell_findings_from_a_normal_study(cohort_studies: dict,
                                                                models: OrtModels) -> None:
    def probability(pipeline: str, case: str, kind: str, views: tuple[str, ...]) -> float:
        series = [cohort_studies[case][view] for view in views]
        result = get_pipeline(pipeline).run(series, models)
        return {f.kind: f.probability for f in result.findings}[kind]

    for view in ("AP", "LAT"):
        fracture = probability("xray-fracture", "fracture", "fracture", (view,))
        assert fracture > probability("xray-fracture", "normal", "fracture", (view,)), view
    for case, kind in (("fracture", "fracture"), ("dislocation", "dislocation")):
        assert (probability("xray-cspine-classify", case, kind, ("LAT",))
                > probability("xray-cspine-classify", "normal", kind, ("LAT",))), case
        assert (probability("xray-pair-classify", case, "damage", ("AP", "LAT"))
                > probability("xray-pair-classify", "normal", "damage", ("AP", "LAT"))), case


def _dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2 * float((predicted & truth).sum()) / total


def _uid(series: SeriesRef) -> str:
    return str(pydicom.dcmread(series.files()[0], stop_before_pixels=True).SOPInstanceUID)


def test_pipelines_registered() -> None:
    from spine_node.inference.pipelines import names

    assert {"xray-fracture", "xray-cspine-classify", "xray-spine-seg", "xray-tissue-seg",
            "xray-pair-classify"} <= set(names())


def test_fracture_pipeline(study: dict, models: OrtModels) -> None:
    lat: SeriesRef = study["lat"]
    result = get_pipeline("xray-fracture").run([lat], models)
    assert result.pipeline == "xray-fracture"
    assert result.model.name == "xray-fracture-mobilenet"
    assert result.model.clinical_use is False
    assert result.model.trained_on.startswith("synthetic phantoms")
    assert result.study_uid == lat.study_uid and result.series_uids == (lat.series_uid,)
    assert result.source_sop_instance_uids == (_uid(lat),)
    [finding] = result.findings
    assert finding.kind == "fracture" and 0.0 <= finding.probability <= 1.0


def test_cspine_pipeline_findings_and_saliency_map(study: dict, models: OrtModels) -> None:
    lat: SeriesRef = study["lat"]
    result = get_pipeline("xray-cspine-classify").run([lat], models)
    kinds = {f.kind: f for f in result.findings}
    assert set(kinds) == {"fracture", "dislocation"}
    assert all(0.0 <= f.probability <= 1.0 for f in result.findings)
    assert result.model.name == "xray-cspine-classifier"
    heat = result.probability_map
    assert heat is not None and heat.source_sop_instance_uids == (_uid(lat),)
    projection = study["LAT"]
    assert heat.values.shape == (1, *projection.image.shape)
    assert 0.0 <= heat.values.min() and heat.values.max() <= 1.0
    # The map comes from the model: on the spine, not spread over the open beam.
    open_beam = projection.tissue == 3
    assert heat.values[0][~open_beam].mean() > heat.values[0][open_beam].mean()


def test_cspine_saliency_is_the_models(study: dict, models: OrtModels) -> None:
    """The pipeline's map is the ONNX graph's saliency output resized to the image."""
    lat: SeriesRef = study["lat"]
    engine = models("xray-cspine-classifier")
    size = tuple(engine.card.preprocessing["size"])
    image = read_radiograph(lat.files()[0])
    outputs = engine.infer({"image": prepare_radiograph(image.pixels, size)[None, None]})
    result = get_pipeline("xray-cspine-classify").run([lat], models)
    expected = np.clip(resize_bilinear(outputs["saliency"][:, 0], image.shape), 0, 1)
    np.testing.assert_allclose(result.probability_map.values, expected, atol=1e-5)
    dislocation = result.findings[1]
    assert dislocation.probability == pytest.approx(float(outputs["probabilities"][0, 2]))


@pytest.mark.parametrize("view", ["AP", "LAT"])
def test_spine_seg_picks_the_model_from_view_position(study: dict, models: OrtModels,
                                                       view: str) -> None:
    series: SeriesRef = study[view.lower()]
    result = get_pipeline("xray-spine-seg").run([series], models)
    expected = AP_STRUCTURES if view == "AP" else LAT_STRUCTURES
    assert result.model.name == f"xray-spine-unet-{view.lower()}"
    seg = result.segmentation
    assert seg is not None
    assert [s.name for s in seg.segments] == list(expected)
    assert [s.label for s in seg.segments] == list(range(1, len(expected) + 1))
    projection = study[view]
    assert seg.labels.shape == (1, *projection.image.shape)
    assert seg.source_sop_instance_uids == (_uid(series),)
    names = projection.structure_names
    for segment in seg.segments:
        truth_value = next(v for v, n in names.items() if n == segment.name)
        score = _dice(seg.labels[0] == segment.label, projection.structures == truth_value)
        assert score > 0.6, (segment.name, score)


def test_spine_seg_without_view_position_is_refused(study: dict, models: OrtModels,
                                                    tmp_path: Path) -> None:
    source = study["ap"].files()[0]
    ds = pydicom.dcmread(source)
    del ds.ViewPosition
    folder = tmp_path / "noview"
    folder.mkdir()
    ds.save_as(folder / source.name)
    series = SeriesRef(study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                       path=folder)
    with pytest.raises(PipelineError, match="ViewPosition"):
        get_pipeline("xray-spine-seg").run([series], models)


def test_tissue_seg(study: dict, models: OrtModels) -> None:
    series: SeriesRef = study["ap"]
    result = get_pipeline("xray-tissue-seg").run([series], models)
    seg = result.segmentation
    assert seg is not None and [s.name for s in seg.segments] == list(TISSUES)
    projection = study["AP"]
    for segment in seg.segments:
        score = _dice(seg.labels[0] == segment.label, projection.tissue == segment.label)
        assert score > 0.8, (segment.name, score)


def test_monochrome1_reads_the_same(study: dict, models: OrtModels, tmp_path: Path) -> None:
    """A MONOCHROME1 copy (inverted stored values) gives the same masks."""
    source = study["ap"].files()[0]
    ds = pydicom.dcmread(source)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (4095 - ds.pixel_array).astype(np.uint16).tobytes()
    folder = tmp_path / "mono1"
    folder.mkdir()
    ds.save_as(folder / source.name)
    inverted = SeriesRef(study_uid=study["ap"].study_uid, series_uid=study["ap"].series_uid,
                         path=folder, view_position="AP")
    first = get_pipeline("xray-tissue-seg").run([study["ap"]], models).segmentation
    second = get_pipeline("xray-tissue-seg").run([inverted], models).segmentation
    assert first is not None and second is not None
    assert (first.labels == second.labels).mean() > 0.99


def test_pair_classify_uses_both_views(study: dict, models: OrtModels) -> None:
    result = get_pipeline("xray-pair-classify").run([study["lat"], study["ap"]], models)
    [finding] = result.findings
    assert finding.kind == "damage" and 0.0 <= finding.probability <= 1.0
    assert result.model.name == "xray-pair-classifier"
    assert result.source_sop_instance_uids == (_uid(study["ap"]), _uid(study["lat"]))
    assert set(result.series_uids) == {study["ap"].series_uid, study["lat"].series_uid}


def test_pair_classify_without_lat_says_so(study: dict, models: OrtModels) -> None:
    with pytest.raises(PipelineError, match="no LAT image"):
        get_pipeline("xray-pair-classify").run([study["ap"]], models)
