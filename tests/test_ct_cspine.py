"""Cervical spine CT: architectures, RSNA layout loader, demo weights on held-out phantoms,
and the ``ct-cspine-fracture`` pipeline end to end from DICOM files."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from spine_node.engines import ENGINES_DIR
from spine_node.inference import phantoms
from spine_node.inference.card import ModelCard
from spine_node.inference.runtime.base import Engine
from spine_node.inference.series import SeriesRef

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from spine_node.inference.pipelines import ct_cspine  # noqa: E402
from spine_node.inference.train import ct as recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Never used by the training recipe (training 10_000.., validation 500_000..).
HELD_OUT_SEEDS = range(9_000_000, 9_000_040)


class OnnxCpuEngine(Engine):
    """Minimal ONNX Runtime engine for these tests (the node's runtime has the full one)."""

    backend = "onnxruntime-cpu"

    def __init__(self, card: ModelCard, session: object) -> None:
        super().__init__(card)
        self.session = session

    @classmethod
    def load(cls, card: ModelCard) -> OnnxCpuEngine:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        return cls(card, ort.InferenceSession(str(card.onnx_path), options,
                                              providers=["CPUExecutionProvider"]))

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [spec.name for spec in self.card.outputs]
        outputs = self.session.run(names, {k: np.ascontiguousarray(v, dtype=np.float32)  # type: ignore[attr-defined]
                                           for k, v in inputs.items()})
        return dict(zip(names, outputs, strict=True))


@pytest.fixture(scope="module")
def engines() -> dict[str, OnnxCpuEngine]:
    loaded = {}
    for name in (ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL):
        card = ModelCard.load(ENGINES_DIR / name)
        assert card.onnx_path.is_file(), f"demo weights missing: {card.onnx_path}"
        loaded[name] = OnnxCpuEngine.load(card)
    return loaded


# ------------------------------------------------------------------ architectures


def test_architectures_registered_and_shaped() -> None:
    from spine_node.inference.models import architecture, names

    assert {"cspine-ct-unet3d", "cspine-ct-fracture-2.5d"} <= set(names())
    unet = architecture("cspine-ct-unet3d", **recipe.SEG_ARCH[1]).eval()
    with torch.inference_mode():
        assert unet(torch.zeros(1, 1, 32, 16, 48)).shape == (1, 8, 32, 16, 48)
    net = architecture("cspine-ct-fracture-2.5d", **recipe.FRACTURE_ARCH[1]).eval()
    with torch.inference_mode():
        assert net(torch.zeros(3, 7, 15, 40, 40)).shape == (3, 8)
    with pytest.raises(ValueError, match="multiple"):
        architecture("cspine-ct-fracture-2.5d", slices=16, group=3)


def test_roc_auc_matches_definition() -> None:
    assert recipe.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert recipe.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(recipe.roc_auc([1, 1], [0.2, 0.3]))


def test_cards_are_honest() -> None:
    for name in (ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL):
        card = ModelCard.load(ENGINES_DIR / name)
        assert card.clinical_use is False
        assert "not for clinical use" in card.intended_use.lower()
        assert card.trained_on.startswith("synthetic phantoms (spine-node inference.phantoms")
        assert card.weights["metrics"]
        assert card.onnx_path.stat().st_size < 10 * 2**20
    seg = ModelCard.load(ENGINES_DIR / ct_cspine.SEGMENTATION_MODEL)
    assert seg.labels == {0: "background", **{i + 1: f"C{i + 1}" for i in range(7)}}


def test_onnx_matches_torch_state_dict(engines: dict[str, OnnxCpuEngine]) -> None:
    """The exported graphs compute what the shipped state dicts compute in torch."""
    import yaml

    from spine_node.inference.models import architecture

    ph = phantoms.generate(9_000_500)
    image = ct_cspine.normalise(ph.hu)
    crops = recipe.case_crops(recipe.phantom_case(9_000_500), np.where(ph.labels <= 7,
                                                                       ph.labels, 0))
    for name, x, tolerance in ((ct_cspine.SEGMENTATION_MODEL, image[None, None], 1e-3),
                               (ct_cspine.FRACTURE_MODEL, crops[None], 1e-4)):
        engine = engines[name]
        folder = engine.card.folder
        arch = yaml.safe_load((folder / "model.yaml").read_text())["architecture"]
        module = architecture(arch["name"], **arch["kwargs"]).eval()
        module.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        with torch.inference_mode():
            expected = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
        got = engine.infer({engine.card.inputs[0].name: x})[engine.card.outputs[0].name]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < tolerance, name


# ---------------------------------------------------------------------- RSNA layout


def _fake_rsna(root: Path) -> tuple[phantoms.Phantom, phantoms.Phantom]:
    """Two studies in the RSNA 2022 layout; the first with a NIfTI segmentation stored
    feet-first in RAS, as the published files are, the second without one."""
    nibabel = pytest.importorskip("nibabel")
    with_seg = phantoms.generate(77, shape=(66, 80, 80), spacing=(2.4, 1.6, 1.6),
                                 fractures={"C6": "wedge"}, dislocation=None, p_dislocation=0)
    without = phantoms.generate(78, fractures={}, p_dislocation=0)
    rows = []
    for ph, segmented in ((with_seg, True), (without, False)):
        study = phantoms._uid(ph.seed, "study")
        paths = phantoms.write_ct_series(ph, root / "train_images" / study)
        assert paths
        fractures = ph.fractures()
        rows.append({"StudyInstanceUID": study, "patient_overall": int(fractures.any()),
                     **{f"C{i + 1}": int(f) for i, f in enumerate(fractures)}})
        if segmented:
            nz, ny, nx = ph.shape
            sz, sy, sx = ph.spacing
            x0, y0, z0 = -(nx - 1) * sx / 2, -(ny - 1) * sy / 2, 0.0
            data = np.transpose(ph.labels, (2, 1, 0))[:, :, ::-1]  # (x, y, z feet first)
            affine = np.array([[-sx, 0, 0, -x0],
                               [0, -sy, 0, -y0],
                               [0, 0, sz, z0 - (nz - 1) * sz],
                               [0, 0, 0, 1]])
            (root / "segmentations").mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(data.astype(np.uint8), affine),
                         str(root / "segmentations" / f"{study}.nii"))
    with (root / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return with_seg, without


def test_rsna_layout_loader(tmp_path: Path) -> None:
    with_seg, without = _fake_rsna(tmp_path)
    layout = recipe.RsnaCervicalSpine(tmp_path)
    studies = layout.studies()
    assert len(studies) == 2
    first, second = studies
    assert first.segmentation is not None and second.segmentation is None
    assert first.fractures.tolist() == [0, 0, 0, 0, 0, 1, 0] and first.patient == 1
    case = layout.load(first)
    assert case.labels is not None
    # The labels placed through the NIfTI affine equal the phantom's own labels taken
    # to the model grid directly.
    expected = ct_cspine.labels_to_source(
        np.where(with_seg.labels <= 7, with_seg.labels, 0), with_seg.spacing,
        (2.0, 2.0, 2.0), case.image.shape)
    assert case.labels.shape == case.image.shape == (79, 64, 64)
    # (Grids chosen so that no nearest-neighbour sample falls on a tie.)
    assert np.mean(case.labels == expected) > 0.9999
    assert set(np.unique(case.labels)) == set(range(8))
    assert layout.load(second).labels is None
    with pytest.raises(FileNotFoundError):
        recipe.RsnaCervicalSpine(tmp_path / "nowhere")


def test_recipe_runs_on_rsna_layout(tmp_path: Path) -> None:
    """The whole recipe, shrunk, on the fake RSNA layout: trains, exports, writes cards."""
    from spine_node.inference.train import TrainOptions, run

    _fake_rsna(tmp_path / "rsna")
    summary = run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=tmp_path / "engines",
                                            quick=True, progress=False, threads=1))
    for name in (ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL):
        card = ModelCard.load(tmp_path / "engines" / name)
        assert card.trained_on.startswith("RSNA 2022") and card.onnx_path.is_file()
    assert "vertebra_fracture_auc" in summary["metrics"]


def test_train_cli_lists_families() -> None:
    result = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "train", "--help"], cwd=REPO,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "ct-cspine" in result.stdout


# ------------------------------------------------------- demo weights, held out


def test_demo_weights_on_held_out_phantoms(engines: dict[str, OnnxCpuEngine]) -> None:
    """The issue's bar on phantoms the recipe never saw: Dice >= 0.90, vertebra AUC >= 0.90."""
    seg = engines[ct_cspine.SEGMENTATION_MODEL]
    fracture = engines[ct_cspine.FRACTURE_MODEL]
    dice, truth, scores = [], [], []
    for seed in HELD_OUT_SEEDS:
        ph = phantoms.generate(seed)
        volume = ct_cspine.CtVolume(ph.hu, ph.spacing, tuple(map(str, range(ph.shape[0]))),
                                    "1.2.3", "1.2.3.4")
        labels, image, _ = ct_cspine.segment(seg, volume)
        dice.append(recipe.dice_per_level(labels, np.where(ph.labels <= 7, ph.labels, 0)))
        probabilities, present = ct_cspine.classify(fracture, image, labels)
        assert present.all()
        truth += ph.fractures().tolist()
        scores += probabilities[:7].tolist()
    mean_dice = float(np.nanmean(np.stack(dice)))
    auc = recipe.roc_auc(truth, scores)
    print(f"held-out phantoms: {len(HELD_OUT_SEEDS)}, mean Dice C1-C7 {mean_dice:.4f}, "
          f"per-vertebra fracture AUC {auc:.4f} ({sum(truth)} fractured vertebrae)")
    assert mean_dice >= 0.90
    assert auc >= 0.90


# --------------------------------------------------------------------- pipeline


def test_pipeline_end_to_end_from_dicom(engines: dict[str, OnnxCpuEngine],
                                        tmp_path: Path) -> None:
    from spine_node.inference import pipelines

    # A finer grid than the model's, so resampling there and back is exercised.
    ph = phantoms.generate(9_100_001, shape=(100, 128, 128), spacing=(1.6, 1.0, 1.0),
                           fractures={"C2": "crack", "C6": "wedge"}, p_dislocation=0)
    paths = phantoms.write_ct_series(ph, tmp_path / "series")
    ref = SeriesRef(study_uid=phantoms._uid(ph.seed, "study"),
                    series_uid=phantoms._uid(ph.seed, "ct-series", 1), path=tmp_path / "series",
                    modality="CT", body_part="CSPINE", instance_count=len(paths))
    pipeline = pipelines.get("ct-cspine-fracture")
    findings = pipeline.run([ref], lambda name: engines[name])

    assert findings.pipeline == "ct-cspine-fracture"
    assert findings.study_uid == ref.study_uid and findings.series_uids == (ref.series_uid,)
    # Frames follow the slices head first, whatever order the files came in.
    import pydicom

    uid_of = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in paths}
    assert findings.source_sop_instance_uids == tuple(uid_of[p.name] for p in paths)
    seg = findings.segmentation
    assert seg is not None and seg.labels.shape == ph.shape
    assert seg.source_sop_instance_uids == findings.source_sop_instance_uids
    assert [s.name for s in seg.segments] == [f"C{i}" for i in range(1, 8)]
    assert [s.label for s in seg.segments] == list(range(1, 8))
    dice = recipe.dice_per_level(seg.labels, np.where(ph.labels <= 7, ph.labels, 0))
    assert np.nanmean(dice) >= 0.85, dice

    per_vertebra = [f for f in findings.findings if f.site is not None]
    patient = [f for f in findings.findings if f.site is None]
    assert [f.site for f in per_vertebra] == [f"C{i}" for i in range(1, 8)]
    assert all(f.kind == "fracture" and 0 <= f.probability <= 1 for f in findings.findings)
    assert [f.segment_label for f in per_vertebra] == list(range(1, 8))
    assert len(patient) == 1
    assert {f.site for f in per_vertebra if f.present} >= {"C2", "C6"} or patient[0].present

    names = [m.name for m in findings.models]
    assert names == [ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL]
    assert findings.model.name == ct_cspine.FRACTURE_MODEL
    for info in findings.models:
        assert info.clinical_use is False and info.backend == "onnxruntime-cpu"
        assert info.trained_on.startswith("synthetic phantoms") and len(info.weights) == 64


def test_pipeline_rejects_bad_series(engines: dict[str, OnnxCpuEngine], tmp_path: Path) -> None:
    from spine_node.inference.errors import PipelineError

    ph = phantoms.generate(9_100_002)
    paths = phantoms.write_ct_series(ph, tmp_path / "few")
    for path in paths[5:]:
        path.unlink()
    ref = SeriesRef(study_uid="1.2", series_uid="1.2.3", path=tmp_path / "few")
    with pytest.raises(PipelineError, match="at least 8"):
        ct_cspine.CervicalSpineCtFracture().run([ref], lambda name: engines[name])


def test_pipeline_on_a_real_ct_that_is_not_a_cervical_spine(engines: dict[str, OnnxCpuEngine],
                                                          tmp_path: Path) -> None:
    """A real 512x512 CT slice (pydicom-data) stacked 60 times: whatever stage 1 finds, every
    label left in the label map has its segment, so the SEG can be encoded (a bug seen in
    bench.scaleout: small components of levels stage 2 did not keep stayed in the map)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    from spine_node.inference import pipelines
    from spine_node.node import results
    from spine_node.node.uids import derive_uid

    source = get_testdata_file("693_UNCR.dcm")
    if source is None:
        pytest.skip("pydicom-data is not installed (the dev extra installs it)")
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        ds.decompress()
    study, series = derive_uid("not-a-cspine", "study"), derive_uid("not-a-cspine", "series")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = derive_uid(study, "frame")
    ds.BodyPartExamined = "CSPINE"
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    folder = tmp_path / "series"
    folder.mkdir()
    for index in range(60):
        ds.SOPInstanceUID = derive_uid(series, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [x, y, z + index]
        ds.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
    ref = SeriesRef(study_uid=study, series_uid=series, path=folder, modality="CT", body_part="CSPINE",
                    instance_count=60)
    findings = pipelines.get("ct-cspine-fracture").run([ref], lambda name: engines[name])
    seg = findings.segmentation
    if seg is not None:
        assert set(np.unique(seg.labels)) - {0} == {s.label for s in seg.segments}
    assert {f.segment_label for f in findings.findings if f.site} == ({s.label for s in seg.segments}
                                                                       if seg else set())
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    encoded = results.encode(findings, sources)
    assert encoded  # a SEG (if anything was found) and an SR
