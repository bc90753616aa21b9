"""Cervical spine CT: architectures, RSNA layout loader, demo weights on held-out phantoms,
and the ``ct-cspine-fracture`` pipeline end to end from DICOM files."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from spine_node.engines import ENGINES_DIR
from spine_node.inference import phantoms
from spine_node.inference.card import ModelCard
from spine_node.inference.findings import AssessmentValues
from spine_node.inference.runtime.base import Engine
from spine_node.inference.series import SeriesRef
from tests.peers import require_module

torch = require_module("torch")
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

    assert {"cspine-ct-unet3d", "cspine-ct-vertebra-classifier-2.5d"} <= set(names())
    unet = architecture("cspine-ct-unet3d", **recipe.SEG_ARCH[1]).eval()
    with torch.inference_mode():
        assert unet(torch.zeros(1, 1, 32, 16, 48)).shape == (1, 6, 32, 16, 48)
    net = architecture("cspine-ct-vertebra-classifier-2.5d", **recipe.FRACTURE_ARCH[1]).eval()
    crops = torch.randn(2, 5, *recipe._crop_shape())
    with torch.inference_mode():
        out = net(crops)
        assert out.shape == (2, 5)
        # Each vertebra on its own: a neighbour's crop does not change another's answer.
        alone = net(crops[:, 2:3])
    assert torch.allclose(out[:, 2:3], alone, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        architecture("cspine-ct-vertebra-classifier-2.5d", slices=16, group=3)


def test_roc_auc_matches_definition() -> None:
    assert recipe.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert recipe.roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert np.isnan(recipe.roc_auc([1, 1], [0.2, 0.3]))


def test_choose_threshold_and_wilson() -> None:
    truth = [0, 0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.95]
    threshold = recipe.choose_threshold(truth, scores, 0.75)
    assert 0.3 < threshold <= 0.31
    negatives = [s for t, s in zip(truth, scores, strict=True) if not t]
    assert np.mean(np.asarray(negatives) < threshold) >= 0.75
    low, high = recipe.wilson_ci(45, 50)
    assert low < 0.9 < high and 0.78 < low < 0.8


def test_choose_rule_out() -> None:
    """The highest threshold that keeps at least the asked share of positives flagged."""
    truth = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    scores = [0.05, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.1, 0.2]
    rule_out = recipe.choose_rule_out(truth, scores, 0.9)
    assert rule_out == 0.3
    positives = np.asarray([s for t, s in zip(truth, scores, strict=True) if t])
    assert np.mean(positives >= rule_out) >= 0.9 and np.mean(positives >= 0.4) < 0.9
    assert recipe.choose_rule_out([0, 0], [0.1, 0.2], 0.9) == 0.0
    # Negatives low: the sensitivity target decides. Negatives high: the point rises until
    # no more than half of them are flagged, and the sensitivity falls short.
    assert recipe.choose_rule_out_point(truth, scores, 0.9, 0.5) == 0.3
    crowded = [0.05, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.45, 0.55]
    point = recipe.choose_rule_out_point(truth, crowded, 0.9, 0.5)
    assert 0.45 < point <= 0.46
    assert np.mean(np.asarray(crowded[10:]) < point) >= 0.5
    # Two kinds of scan: the pool's normals are mostly low, but the plain scans' normals
    # are high; the point rises until half of the plain ones are below it as well.
    truth2 = [1] * 10 + [0] * 8
    scores2 = [0.05, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99,
               0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.6, 0.7]
    parts = ["random"] * 10 + ["random"] * 6 + ["plain"] * 2
    assert recipe.choose_rule_out_point(truth2, scores2, 0.9, 0.5) == 0.3
    split = recipe.choose_rule_out_point(truth2, scores2, 0.9, 0.5, parts)
    assert 0.6 < split <= 0.61
    # A part without normals sets nothing.
    assert recipe.choose_rule_out_point(truth2, scores2, 0.9, 0.5, ["plain"] * 10 + ["random"] * 8) == 0.3


def test_validation_holds_plain_scans_beside_randomised_ones() -> None:
    """The operating point is chosen on a validation cohort that includes the generator's
    plain default scans (2 mm, no acquisition drawn) as well as randomised acquisitions."""
    import numpy.random as npr
    seeds = range(recipe.VALIDATION_SEEDS.start, recipe.VALIDATION_SEEDS.start + 40)
    plain = [s for s in seeds if npr.default_rng([s, 1]).random() < recipe.PLAIN_VALIDATION_SHARE
             and npr.default_rng(s).random() >= 0.1]
    assert plain, "no plain validation case among 40 seeds"
    case = recipe.validation_case(plain[0])
    default = phantoms.generate(plain[0], p_fracture=0.5)
    assert not case.negative and case.volume.spacing == default.spacing
    np.testing.assert_array_equal(case.volume.hu, default.hu)
    assert set(case.fractured) == {v.name for v in default.vertebrae if v.fractured
                                   and v.name in ct_cspine.LEVELS}
    randomised = next(s for s in seeds if s not in plain and npr.default_rng(s).random() >= 0.1)
    assert recipe.validation_case(randomised).volume.hu.shape != default.hu.shape


def test_cards_are_honest() -> None:
    for name in (ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL):
        card = ModelCard.load(ENGINES_DIR / name)
        assert card.clinical_use is False
        assert "not for clinical use" in card.intended_use.lower()
        assert card.trained_on.startswith("synthetic phantoms (spine-node inference.phantoms")
        assert card.weights["metrics"]["validation"]
        assert card.onnx_path.stat().st_size < 10 * 2**20
    seg = ModelCard.load(ENGINES_DIR / ct_cspine.SEGMENTATION_MODEL)
    assert [seg.labels[i] for i in range(5)] == list(ct_cspine.SEG_CLASSES)
    fracture = ModelCard.load(ENGINES_DIR / ct_cspine.FRACTURE_MODEL)
    point = fracture.weights["metrics"]["validation"]["operating_point"]
    # The threshold the pipeline uses is the one chosen on validation data.
    assert fracture.preprocessing["threshold"] == point["threshold"]
    assert "validation" in point["chosen_for"]


def test_onnx_matches_torch_state_dict(engines: dict[str, OnnxCpuEngine]) -> None:
    """The exported graphs compute what the shipped state dicts compute in torch."""
    import yaml

    from spine_node.inference.models import architecture

    ph = phantoms.generate(9_000_500, fractures={"C4": "wedge"})
    image = ct_cspine.normalise(ph.hu)
    crops = recipe.level_crops(ph.hu, ph.labels, ph.spacing, ["C4"], None).crops
    assert crops.shape == (7, *recipe._crop_shape())
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


# ------------------------------------------------------------ levels from anatomy


def _truth_maps(labels: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Stage-1 outputs as a perfect model would give them, from a phantom's labels."""
    return (recipe.classes_from_labels(labels), np.ones(labels.shape, np.float32),
            recipe.heat_target(labels, spacing))


def _dice(predicted: np.ndarray, truth: np.ndarray, level: int) -> float:
    p, t = predicted == level, truth == level
    return 2.0 * float((p & t).sum()) / max(1.0, float(p.sum() + t.sum()))


@pytest.mark.parametrize("seed", [9_200_001, 9_200_002])
def test_levels_counted_from_c2_and_from_t1(seed: int) -> None:
    ph = phantoms.generate(seed, context=True, spacing=2.0, size_scale=1.15, pose_deg=(8.0, -6.0, 10.0))
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    full = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    assert full.assessed == list(ct_cspine.LEVELS)
    assert min(_dice(full.labels, truth, level) for level in range(1, 8)) > 0.97
    # No skull base, no C1 or C2: C3-C7 are numbered up from T1 (the vertebra with ribs).
    top = int(ph.vertebra("C3").center_mm[0] / 2) - 3
    cut = ct_cspine.identify_levels(classes[top:], confidence[top:], heat[top:], ph.spacing)
    assert cut.assessed == ["C3", "C4", "C5", "C6", "C7"]
    assert cut.status["C1"][0] is AssessmentValues.NOT_IN_FIELD
    assert min(_dice(cut.labels, truth[top:], level) for level in range(4, 8)) > 0.97


def test_no_anchor_in_view_gives_no_level_rather_than_a_shifted_one() -> None:
    ph = phantoms.generate(9_200_003, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    top = int(ph.vertebra("C3").center_mm[0] / 2) - 3
    bottom = int(ph.vertebra("C6").center_mm[0] / 2) + 3
    levels = ct_cspine.identify_levels(classes[top:bottom], confidence[top:bottom],
                                       heat[top:bottom], ph.spacing)
    assert levels.assessed == [] and not levels.labels.any()
    assert levels.unlabelled >= 3
    assert all(status is AssessmentValues.NOT_ASSESSABLE for status, _ in levels.status.values())
    assert "C2 or T1" in levels.status["C4"][1]


def test_t1_read_as_cervical_gives_no_shifted_label() -> None:
    """Found by an independent tester: stage 1 took T1 for a cervical vertebra and T2 (with
    ribs) for T1, so counting up named C4-C7 as C3-C6. Six vertebrae in one chain above
    "T1" cannot all be C3-C7: that count names nothing (no shifted label)."""
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    top = int(ph.vertebra("C3").center_mm[0] / 2) - 3  # no C1, no C2: only T1 anchors
    misread = classes.copy()
    misread[ph.labels == phantoms.LEVEL_LABELS["T1"]] = ct_cspine.CLASS_SUBAXIAL
    truth = np.where(ph.labels <= 7, ph.labels, 0)[top:]
    levels = ct_cspine.identify_levels(misread[top:], confidence[top:], heat[top:], ph.spacing)
    for number in range(1, 8):
        mine = levels.labels == number
        if mine.any():
            assert np.bincount(truth[mine], minlength=8).argmax() == number
    assert not levels.assessed
    # Read right, the same field is counted up from T1 as before.
    right = ct_cspine.identify_levels(classes[top:], confidence[top:], heat[top:], ph.spacing)
    assert right.assessed == ["C3", "C4", "C5", "C6", "C7"]


def _first_slice(ph: phantoms.Phantom, name: str) -> int:
    return int(np.nonzero((ph.labels == phantoms.LEVEL_LABELS[name]).any(axis=(1, 2)))[0].min())


def _last_slice(ph: phantoms.Phantom, name: str) -> int:
    return int(np.nonzero((ph.labels == phantoms.LEVEL_LABELS[name]).any(axis=(1, 2)))[0].max())


def _names_belong(levels: ct_cspine.LevelMap, truth: np.ndarray) -> None:
    for number in range(1, 8):
        mine = levels.labels == number
        if mine.any():
            assert np.bincount(truth[mine], minlength=8).argmax() == number


def test_c3_at_the_top_read_as_c2_gives_no_shifted_label() -> None:
    """Found by an independent tester: a field starting at the top of C3 (a sliver of C2
    above it), stage 1 called C3 "C2" and counting down named C4-C7 as C3-C6. A C2 cut by
    the first slice, with no C1 and too short to hold any dens, anchors nothing alone."""
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    top, bottom = _first_slice(ph, "C3"), _last_slice(ph, "C6") + 1  # no C2, no T1
    labels = ph.labels[top:bottom]
    misread = recipe.classes_from_labels(labels)
    misread[labels == phantoms.LEVEL_LABELS["C3"]] = ct_cspine.CLASS_C2
    heat = recipe.heat_target(np.where(labels == 3, 0, labels), ph.spacing)  # no C3 body peak
    levels = ct_cspine.identify_levels(misread, np.ones(labels.shape, np.float32), heat, ph.spacing)
    _names_belong(levels, np.where(labels <= 7, labels, 0))
    assert not levels.assessed
    assert "cut by the first slice" in levels.status["C2"][1]


def test_a_cut_c2_is_named_where_the_count_up_from_t1_confirms_it() -> None:
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    c2 = ph.labels == phantoms.LEVEL_LABELS["C2"]
    zs = np.nonzero(c2.any(axis=(1, 2)))[0]
    top = int(zs.max()) - 7  # the lowest 16 mm of C2: its body, no dens, no C1
    classes, confidence, heat = _truth_maps(ph.labels[top:], ph.spacing)
    truth = np.where(ph.labels <= 7, ph.labels, 0)[top:]
    confirmed = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    _names_belong(confirmed, truth)
    assert confirmed.assessed == ["C2", "C3", "C4", "C5", "C6", "C7"]
    # Without T1 the same C2 is not taken on trust, and nothing is counted from it.
    bottom = _last_slice(ph, "C6") + 1 - top
    alone = ct_cspine.identify_levels(classes[:bottom], confidence[:bottom], heat[:bottom], ph.spacing)
    assert not alone.assessed
    assert "cannot be told from C3" in alone.status["C2"][1]


def test_a_c2_fragment_anchors_no_count() -> None:
    """Found by the benchmark (a rescaled grid): C2 split into an unsure C2 fragment and a
    lower piece classed subaxial with a body peak of its own.
    Counted down from the fragment, that piece would be "C3" and every name below it one
    level low; a C2 under ``min_confidence`` anchors nothing."""
    ph = phantoms.generate(9_200_002, context=True, spacing=2.0)
    labels = ph.labels.copy()
    classes, confidence, _ = _truth_maps(labels, ph.spacing)
    c2 = labels == phantoms.LEVEL_LABELS["C2"]
    zs = np.nonzero(c2.any(axis=(1, 2)))[0]
    cut = int(zs.min() + 0.7 * (zs.max() - zs.min()))  # dens and the top of the body stay C2
    lower = c2.copy()
    lower[:cut] = False
    classes[lower] = ct_cspine.CLASS_SUBAXIAL
    confidence[c2 & ~lower] = 0.3
    marked = labels.copy()
    marked[lower] = 40  # a body peak of its own
    heat = recipe.heat_target(marked, ph.spacing)
    # the fragment passes the size floor here, so only its confidence tells
    gates = dataclasses.replace(ct_cspine.GATES, min_c2_mm3=500.0)
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing, gates)
    _names_belong(levels, np.where(labels <= 7, labels, 0))
    assert "C2" not in levels.assessed and "C1" in levels.assessed


def test_a_sliver_at_the_top_is_not_named_c2() -> None:
    """The benchmark's field from C3 (a sliver of C2 above it) on the second generator:
    stage 1 classed the top of C3 as C2 and the rest of C3 as subaxial; the
    count up from T1 agreed with the count down from that "C2", so a C2 label sat on C3.
    A C2 cut by the first slice with less bone than ``min_cut_c2_size_ratio`` of a
    subaxial vertebra is a sliver: no name; the levels below keep theirs."""
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    top = _first_slice(ph, "C3")  # C2's last slices merge into what is read as C2
    labels = ph.labels[top:].copy()
    classes, confidence, _ = _truth_maps(labels, ph.spacing)
    c3 = labels == phantoms.LEVEL_LABELS["C3"]
    zs = np.nonzero(c3.any(axis=(1, 2)))[0]
    upper = c3.copy()
    upper[int(zs.min() + 0.3 * (zs.max() - zs.min())):] = False
    classes[upper] = ct_cspine.CLASS_C2
    heat = recipe.heat_target(np.where(upper, 0, labels), ph.spacing)
    # the sliver passes the size floor here, so only its share of a subaxial vertebra tells
    gates = dataclasses.replace(ct_cspine.GATES, min_c2_mm3=500.0)
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing, gates)
    _names_belong(levels, np.where(labels <= 7, labels, 0))
    assert "C2" not in levels.assessed
    assert levels.assessed == ["C3", "C4", "C5", "C6", "C7"]


def test_ribs_above_the_vertebra_taken_for_t1_stop_the_count_up() -> None:
    """T1 and T2 read as cervical, T3 (with ribs) taken for T1: the vertebra above it has
    ribs far out to both sides (T2's), so no count starts there."""
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    top = _first_slice(ph, "C6")
    labels = ph.labels[top:]
    misread = recipe.classes_from_labels(labels)
    for name in ("T1", "T2"):
        misread[labels == phantoms.LEVEL_LABELS[name]] = ct_cspine.CLASS_SUBAXIAL
    image = ct_cspine.normalise(ph.hu[top:])
    levels = ct_cspine.identify_levels(misread, np.ones(labels.shape, np.float32),
                                       recipe.heat_target(labels, ph.spacing), ph.spacing, image=image)
    _names_belong(levels, np.where(labels <= 7, labels, 0))
    assert not levels.assessed


def test_a_count_up_that_leaves_a_vertebra_between_it_and_c2_names_nothing() -> None:
    """Found by the benchmark (rotated scan 9300018): T1 read as cervical, T2 taken for T1,
    and the count up from it stopped at a piece of C3 it could not link (the rest of C3
    read as C2), so C4-T1 were named C3-C7. A vertebra with a body of its own between C2
    and the highest level counted, where the count says there is none, drops the count."""
    ph = phantoms.generate(9_200_001, context=True, spacing=2.0)
    labels = ph.labels.copy()
    c3 = labels == phantoms.LEVEL_LABELS["C3"]
    zs = np.nonzero(c3.any(axis=(1, 2)))[0]
    upper = c3.copy()
    upper[int(round(zs.max() - 0.3 * (zs.max() - zs.min()))):] = False
    piece = c3 & ~upper  # too small to link, with a body peak of its own
    classes = recipe.classes_from_labels(labels)
    classes[upper] = ct_cspine.CLASS_C2
    classes[labels == phantoms.LEVEL_LABELS["T1"]] = ct_cspine.CLASS_SUBAXIAL
    marked = labels.copy()
    marked[upper] = phantoms.LEVEL_LABELS["C2"]
    marked[piece] = 40
    heat = recipe.heat_target(marked, ph.spacing)
    # the space between C2 and the count's "C3" passes the room check here, so only the
    # vertebra found in it tells
    gates = dataclasses.replace(ct_cspine.GATES, room_tolerance_steps=1.5)
    levels = ct_cspine.identify_levels(classes, np.ones(labels.shape, np.float32), heat,
                                       ph.spacing, gates)
    _names_belong(levels, np.where(labels <= 7, labels, 0))
    assert levels.assessed == ["C1", "C2"]
    assert all(levels.status[level][0] is not AssessmentValues.ASSESSED
               for level in ct_cspine.LEVELS[2:])


def _read(*bodies: tuple[float, str | None], extra: tuple[str, ...] = ()) -> ct_cspine.LevelMap:
    """A read as :func:`ct_cspine.choose_read` sees it: its bodies, and the levels named on
    them (and ``extra``, e.g. C1 and C2, named by shape) assessed."""
    named = {name for _, name in bodies if name} | set(extra)
    status = {level: (AssessmentValues.ASSESSED, "") if level in named
              else (AssessmentValues.NOT_ASSESSABLE, "") for level in ct_cspine.LEVELS}
    return ct_cspine.LevelMap(np.zeros((1, 1, 1), np.uint8), status, bodies=bodies)


# Scan 9300084 of the benchmark (field from C3, second generator), bodies (mm along z,
# level) as two reads found them: on the 1.2 grid stage 1 folded C5 and C6 into one
# vertebra and the count up from T1 named C3-C6 as C4-C7; the card-grid read had a body of
# its own at C5, 13 mm from both bodies of the scaled read around it.
FOLD_CARD = ((10.0, None), (26.0, None), (39.8, None), (56.0, "C6"), (76.0, "C7"), (98.0, None))
FOLD_SCALED = ((9.6, "C4"), (26.4, "C5"), (52.8, "C6"), (76.8, "C7"), (98.4, None))
# Scan 9300075 (second generator, size -15 %): the card grid named C3, C6 and C7 right
# (C4 and C5 folded, unnamed), the 1.2 grid counted down from C2 through the same fold
# (C4-C7 one level high), the 0.85 grid named all seven right.
NAMES_CARD = ((60.0, "C3"), (83.0, None), (106.0, "C6"), (120.0, "C7"), (136.0, None))
NAMES_COARSE = ((62.4, "C3"), (81.6, "C4"), (105.6, "C5"), (120.0, "C6"), (136.8, "C7"))
NAMES_FINE = ((61.2, "C3"), (76.5, "C4"), (90.1, "C5"), (105.4, "C6"), (120.7, "C7"), (137.7, None))


def test_a_scaled_read_that_folds_two_vertebrae_into_one_is_not_kept() -> None:
    card, folded = _read(*FOLD_CARD), _read(*FOLD_SCALED, extra=("C1", "C2"))
    assert ct_cspine.folds(card, folded)
    # The same scan read without the fold: every body of one read lies near one of the other.
    agreeing = _read((9.6, "C3"), (26.4, "C4"), (40.8, "C5"), (55.2, "C6"), (76.8, "C7"), (98.4, None))
    assert not ct_cspine.folds(card, agreeing)
    # A first read that folded two vertebrae the scaled read tells apart is what the
    # scaled read is for.
    assert not ct_cspine.folds(folded, card)
    # A first read that split one vertebra into two peaks 8 mm apart (a large patient on
    # the card's grid) does not make the scaled read a fold.
    split = _read((20.0, None), (40.0, None), (56.0, None), (64.0, None), (80.0, None), (100.0, None))
    assert not ct_cspine.folds(split, _read((20.4, "C3"), (40.8, "C4"), (60.0, "C5"), (79.2, "C6"), (100.8, "C7")))
    # A vertebra the scaled read found only as a piece no body peak reached (the count
    # steps through it) is not folded into a neighbour.
    even = _read((20.0, None), (36.0, None), (52.0, None), (68.0, None), (84.0, None), (100.0, None))
    gap = ((20.4, "C3"), (36.0, "C4"), (68.4, "C6"), (84.0, "C7"))
    assert not ct_cspine.folds(even, dataclasses.replace(_read(*gap), pieces=(52.8,)))
    assert ct_cspine.folds(even, _read(*gap))
    grid, coarse = (2.0, 2.0, 2.0), (2.4, 2.4, 2.4)
    # Kept even though it names more levels (and even where it also names a body otherwise
    # than the first read: a fold is not evidence).
    assert ct_cspine.choose_read([(card, grid), (folded, coarse)])[0] is card
    renamed = _read((9.6, "C4"), (26.4, "C5"), (52.8, "C5"), (76.8, "C7"), (98.4, None), extra=("C1", "C2"))
    assert ct_cspine.choose_read([(card, grid), (renamed, coarse)])[0] is card


def test_reads_that_name_one_vertebra_differently_disagree_either_way_round() -> None:
    card, coarse = _read(*NAMES_CARD), _read(*NAMES_COARSE)
    assert ct_cspine.names_differ(card, coarse) and ct_cspine.names_differ(coarse, card)
    assert not ct_cspine.names_differ(card, _read((62.4, "C3"), (81.6, None), (105.6, "C6"), (120.0, "C7")))
    # A read with a single body still disagrees with one naming it otherwise.
    assert ct_cspine.names_differ(_read((106.0, "C6")), coarse)
    assert ct_cspine.names_differ(coarse, _read((106.0, "C6")))


def test_a_read_two_others_contradict_is_outvoted() -> None:
    """Scan 9300075 with all three reads: the 1.2 read names the most (seven with C1 and
    C2) and contradicts both others: it is outvoted, and the 0.85 read is kept. Before,
    the 1.2 read's seven levels ended the search and were reported."""
    card = (_read(*NAMES_CARD, extra=("C1", "C2")), (2.0, 2.0, 2.0))
    coarse = (_read(*NAMES_COARSE, extra=("C1", "C2")), (2.4, 2.4, 2.4))
    fine = (_read(*NAMES_FINE, extra=("C1", "C2")), (1.7, 1.7, 1.7))
    assert len(coarse[0].assessed) == 7 and len(card[0].assessed) == 5
    assert ct_cspine._contradicted([card, coarse], ct_cspine.GATES)  # so segment reads on
    assert ct_cspine.choose_read([card, coarse, fine])[0] is fine[0]
    # Two reads disagreeing with no third to settle it: the one naming more is kept.
    assert ct_cspine.choose_read([card, coarse])[0] is coarse[0]
    # Three reads, each contradicted by both others: no level is named.
    one, two, three = ((_read((60.0, f"C{n}"), (80.0, f"C{n + 1}"), (100.0, f"C{n + 2}"), (120.0, None)),
                        card[1]) for n in (3, 4, 5))
    levels, _ = ct_cspine.choose_read([one, two, three])
    assert levels.assessed == [] and not levels.labels.any()
    assert "differently" in levels.status["C3"][1]


def test_segment_reads_the_next_grid_when_a_full_read_is_contradicted_or_folded(
        engines: dict[str, OnnxCpuEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """The search over grids: a seven-level read ends it only when it is the read kept and
    no read contradicts it. Stage 1 runs on a small volume; what each read names is given."""
    engine = engines[ct_cspine.SEGMENTATION_MODEL]
    volume = ct_cspine.CtVolume(np.full((40, 48, 48), -1000.0, np.float32), (2.0, 1.0, 1.0),
                                tuple(str(k) for k in range(40)), "1.2.3", "1.2.4")

    def run(*reads: ct_cspine.LevelMap) -> tuple[ct_cspine.LevelMap, int]:
        given = iter(reads)
        calls = []

        def identify(*args: object, **kwargs: object) -> ct_cspine.LevelMap:
            calls.append(1)
            return next(given)

        monkeypatch.setattr(ct_cspine, "identify_levels", identify)
        levels, _ = ct_cspine.segment(engine, volume)
        return levels, len(calls)

    card = _read(*NAMES_CARD, extra=("C1", "C2"))
    coarse = _read(*NAMES_COARSE, extra=("C1", "C2"))
    fine = _read(*NAMES_FINE, extra=("C1", "C2"))
    assert run(card, coarse, fine) == (fine, 3)
    # A full first read ends the search at once.
    assert run(fine, coarse, card) == (fine, 1)
    # A full scaled read that agrees with the first ends it too.
    partial = _read(*NAMES_FINE[:2])
    assert run(partial, fine, coarse) == (fine, 2)
    # A full scaled read that folded is not kept, so the next grid is read.
    assert run(_read(*FOLD_CARD), _read(*FOLD_SCALED, extra=("C1", "C2", "C3")),
               _read((10.2, "C3"), (26.4, "C4"), (40.0, "C5"), (56.1, "C6"), (76.5, "C7")))[1] == 3


def test_a_cervical_vertebra_classed_thoracolumbar_between_two_cervical_ones_is_counted() -> None:
    """Found by an independent tester: stage 1 classed one mid-neck body thoracolumbar, the
    order check failed and no level was assessed. Between two subaxial vertebrae it is a
    cervical one, so it is counted, and every name stays on its own vertebra."""
    ph = phantoms.generate(9_200_005, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    classes[ph.labels == 5] = ct_cspine.CLASS_LOWER
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    assert levels.assessed == list(ct_cspine.LEVELS)
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    assert min(_dice(levels.labels, truth, level) for level in range(1, 8)) > 0.97
    # Two in a row classed thoracolumbar are not taken for cervical: no shifted name.
    classes[ph.labels == 6] = ct_cspine.CLASS_LOWER
    two = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    for level in two.assessed:
        number = ct_cspine.LEVELS.index(level) + 1
        assert _dice(two.labels, truth, number) > 0.97, level


def test_a_missed_vertebra_between_the_anchors_gives_no_shifted_label() -> None:
    ph = phantoms.generate(9_200_004, context=True, spacing=2.0)
    labels = ph.labels.copy()
    labels[labels == 5] = 0  # stage 1 misses C5 entirely
    classes, confidence, heat = _truth_maps(labels, ph.spacing)
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    truth = np.where(labels <= 7, labels, 0)
    for number in range(1, 8):
        mine = levels.labels == number
        if mine.any():  # whatever carries a level carries the right one
            assert np.bincount(truth[mine]).argmax() == number
    assert levels.status["C5"][0] is not AssessmentValues.ASSESSED


def test_a_vertebra_without_a_peak_is_not_assessed_and_shifts_nothing() -> None:
    """Stage 1 misses C4's body peak: C4 is found only as a piece no peak reached, so it is
    not assessed, and every level that is given belongs to its own vertebra."""
    ph = phantoms.generate(9_200_006, context=True, spacing=2.0)
    classes, confidence, _ = _truth_maps(ph.labels, ph.spacing)
    heat = recipe.heat_target(np.where(ph.labels == 4, 0, ph.labels), ph.spacing)
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    assert "C4" not in levels.assessed and len(levels.assessed) >= 5
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    for level in levels.assessed:
        number = ct_cspine.LEVELS.index(level) + 1
        assert _dice(levels.labels, truth, number) > 0.97, level


def test_two_vertebrae_in_one_instance_break_the_count() -> None:
    """Where two vertebrae grew into one instance (too tall, too big), it gets no level and
    no count runs through it."""
    ph = phantoms.generate(9_200_007, context=True, spacing=2.0)
    labels = ph.labels.copy()
    # C3 and C4 as one vertebra with one body peak: the disc between them filled in.
    both = ndimage.binary_closing((labels == 3) | (labels == 4), structure=np.ones((7, 1, 1)))
    labels[both & (labels == 0)] = 3
    labels[labels == 4] = 3
    classes, confidence, _ = _truth_maps(labels, ph.spacing)
    heat = recipe.heat_target(np.where(ph.labels == 4, 0, ph.labels), ph.spacing)
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    assert "C3" not in levels.assessed and "C4" not in levels.assessed
    for level in levels.assessed:
        number = ct_cspine.LEVELS.index(level) + 1
        assert _dice(levels.labels, truth, number) > 0.97, level


def test_c2_grown_into_c3_is_not_named_and_counts_nothing() -> None:
    """Stage 1 calls the top of C3 (its body centre included) C2: that C2 gets no level,
    no count runs down from it, and every level given belongs to its own vertebra."""
    ph = phantoms.generate(9_200_008, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    c3_centre = int(round(ph.vertebra("C3").center_mm[0] / 2.0))
    bleed = (ph.labels == 3) & (np.arange(ph.shape[0])[:, None, None] <= c3_centre + 1)
    # One piece with C2, across the disc, as a model that bleeds draws it.
    joined = ndimage.binary_closing(bleed | (ph.labels == 2), structure=np.ones((7, 1, 1)))
    classes[joined & ((ph.labels == 0) | bleed)] = recipe.CLASS_C2
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    assert "C2" not in levels.assessed and levels.status["C2"][0] is AssessmentValues.NOT_ASSESSABLE
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    for level in levels.assessed:
        number = ct_cspine.LEVELS.index(level) + 1
        assert np.bincount(truth[levels.labels == number]).argmax() == number, level
    assert levels.unlabelled >= 1


def test_a_tall_c2_still_anchors_the_count_down() -> None:
    """C2 with its dens spans about three subaxial steps (another anatomy's C2 is taller
    than ours): that is no reason to stop counting down from it. No T1 in view, so the
    count from C2 is the only one."""
    ph = phantoms.generate(9_200_010, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    c2 = classes == recipe.CLASS_C2
    zs = np.nonzero(c2.any(axis=(1, 2)))[0]
    steps = np.diff([ph.vertebra(f"C{n}").center_mm[0] for n in range(3, 8)])
    # The dens drawn 1.3 steps taller than it is, into what was background above it.
    extra = int(round(1.3 * float(np.median(steps)) / 2.0))
    dens = c2[zs.min():zs.min() + 4].any(axis=0)
    for z in range(max(0, zs.min() - extra), zs.min()):
        classes[z][dens & (classes[z] == 0)] = recipe.CLASS_C2
    bottom = int(ph.vertebra("C7").center_mm[0] / 2) + 6  # T1 and its ribs out of view
    levels = ct_cspine.identify_levels(classes[:bottom], confidence[:bottom], heat[:bottom],
                                       ph.spacing)
    tall = np.nonzero((classes[:bottom] == recipe.CLASS_C2).any(axis=(1, 2)))[0]
    assert (tall.max() - tall.min() + 1) * 2.0 > ct_cspine.GATES.max_height_steps * float(np.median(steps))
    assert levels.assessed == list(ct_cspine.LEVELS)
    truth = np.where(ph.labels <= 7, ph.labels, 0)[:bottom]
    assert min(_dice(levels.labels, truth, level) for level in range(3, 8)) > 0.97


def test_a_piece_level_with_its_vertebra_breaks_nothing() -> None:
    """A piece of vertebra class no body peak reached, level with C5 (a process the growth
    did not reach), is part of C5, not a vertebra of its own: it neither breaks the order
    nor a count."""
    ph = phantoms.generate(9_200_011, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    z, y, x = (int(round(c / 2.0)) for c in ph.vertebra("C5").center_mm)
    x_side = int(np.nonzero((ph.labels == 5).any(axis=(0, 1)))[0].max()) + 4
    piece = (slice(z - 3, z + 3), slice(y - 3, y + 3), slice(x_side, x_side + 6))
    assert not (classes[piece] > 0).any()
    classes[piece] = recipe.CLASS_LOWER  # thoracic-looking, as a stray process may
    levels = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing)
    assert levels.assessed == list(ct_cspine.LEVELS)
    truth = np.where(ph.labels <= 7, ph.labels, 0)
    assert min(_dice(levels.labels, truth, level) for level in range(1, 8)) > 0.97


def test_finds_that_do_not_stand_in_soft_tissue_or_are_too_small_are_not_assessed() -> None:
    """Noise or a dense object read as vertebrae: the shell around each find is not soft
    tissue, so nothing is assessed; a C1 of a few voxels is not delineated either."""
    ph = phantoms.generate(9_200_009, context=True, spacing=2.0)
    classes, confidence, heat = _truth_maps(ph.labels, ph.spacing)
    image = ct_cspine.normalise(ph.hu)
    real = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing, image=image)
    assert real.assessed == list(ct_cspine.LEVELS)
    dense = ct_cspine.normalise(np.random.default_rng(0).uniform(0, 2000, ph.shape).astype(np.float32))
    noisy = ct_cspine.identify_levels(classes, confidence, heat, ph.spacing, image=dense)
    assert noisy.assessed == [] and not noisy.labels.any()
    assert "soft tissue" in noisy.status["C4"][1]
    tiny = classes.copy()
    c1 = np.argwhere(ph.labels == 1)
    tiny[ph.labels == 1] = 0
    for z, y, x in c1[:60]:  # 60 voxels of C1 (480 mm3) survive
        tiny[z, y, x] = recipe.CLASS_C1
    small = ct_cspine.identify_levels(tiny, confidence, heat, ph.spacing, image=image)
    assert "C1" not in small.assessed and "C2" in small.assessed


def test_stage1_targets() -> None:
    ph = phantoms.generate(9_200_005, context=True, spacing=2.0)
    classes = recipe.classes_from_labels(ph.labels)
    assert set(np.unique(classes)) == set(range(5))
    assert (classes[ph.labels == 1] == ct_cspine.CLASS_C1).all()
    heat = recipe.heat_target(ph.labels, ph.spacing)
    peaks = (heat == ndimage.maximum_filter(heat, size=5)) & (heat > 0.5)
    # One peak per vertebra from C3 down (C3-C7, T1-T3), none for C1 and C2.
    assert int(ndimage.label(peaks)[1]) == 8
    assert not heat[ph.labels == 1].max() > 0.5


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
    volume, labels = layout.load(first)
    # The labels placed through the NIfTI affine equal the phantom's own (C1..C7) labels.
    assert labels.shape == volume.hu.shape == with_seg.shape
    assert np.mean(labels == np.where(with_seg.labels <= 7, with_seg.labels, 0)) > 0.9999
    assert set(np.unique(labels)) == set(range(8))
    with pytest.raises(ValueError, match="no segmentation"):
        layout.load(second)
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
    assert "operating_point" in summary["metrics"]


def test_recipe_fine_tunes_from_a_model_repository(tmp_path: Path) -> None:
    """--init starts both stages from another repository's weights and the cards say so."""
    import torch

    from spine_node.inference.train import TrainOptions, run

    _fake_rsna(tmp_path / "rsna")
    first = tmp_path / "first"
    run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=first, quick=True, progress=False,
                                  threads=1))
    start = torch.load(first / ct_cspine.SEGMENTATION_MODEL / "model.pt", weights_only=True)
    model = recipe.architecture(recipe.SEG_ARCH[0], **recipe.SEG_ARCH[1])
    assert recipe._initial_weights(model, first, ct_cspine.SEGMENTATION_MODEL)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in start.items())

    run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=tmp_path / "second", quick=True,
                                  progress=False, threads=1, init=first))
    for name in (ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL):
        card = ModelCard.load(tmp_path / "second" / name)
        origin = card.weights["fine_tuned_from"][name]
        assert origin["model_pt_sha256"] == recipe._sha256(first / name / "model.pt")
        assert f"--init {first}" in card.weights["recipe"]
    with pytest.raises(FileNotFoundError, match="no cspine-ct-vertebra-seg/model.pt"):
        run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=tmp_path / "third", quick=True,
                                      progress=False, threads=1, init=tmp_path / "rsna"))


def _trained_before_one_stage(tmp_path: Path, stage: str, kept: str) -> tuple[Path, Path, Path]:
    """A one-stage run refuses a --out without the kept stage; then both stages trained
    (quick, fake RSNA layout): the folder and its two model folders."""
    from spine_node.inference.train import TrainOptions, run

    _fake_rsna(tmp_path / "rsna")
    out = tmp_path / "engines"
    with pytest.raises(FileNotFoundError, match=f"{kept} has no model.onnx"):
        run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=out, quick=True, progress=False,
                                      threads=1, stage=stage))
    run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=out, quick=True, progress=False,
                                  threads=1))
    return out, out / ct_cspine.SEGMENTATION_MODEL, out / ct_cspine.FRACTURE_MODEL


def test_stage_fracture_trains_stage_two_alone(tmp_path: Path) -> None:
    """--stage fracture retrains stage 2 only: stage 1's weights and card stay (its
    validation metrics are today's), the fracture card says how it was made."""
    from spine_node.inference.train import TrainOptions, run

    out, seg, fracture = _trained_before_one_stage(tmp_path, "fracture", "vertebra-seg")
    seg_onnx, seg_recipe = recipe._sha256(seg / "model.onnx"), ModelCard.load(seg).weights["recipe"]
    fracture_onnx = recipe._sha256(fracture / "model.onnx")
    summary = run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=out, quick=True,
                                            progress=False, threads=1, seed=5, stage="fracture"))
    assert recipe._sha256(seg / "model.onnx") == seg_onnx
    assert ModelCard.load(seg).weights["recipe"] == seg_recipe
    assert "revalidated" in ModelCard.load(seg).weights
    assert recipe._sha256(fracture / "model.onnx") != fracture_onnx
    assert ModelCard.load(fracture).weights["recipe"].endswith("--stage fracture")
    assert len(summary["cards"]) == 2
    with pytest.raises(ValueError, match="expected one of all, fracture, segmentation"):
        run("ct-cspine", TrainOptions(out=out, quick=True, progress=False, stage="vertebrae"))


def test_stage_fracture_can_average_the_weights_of_fine_tunes(tmp_path: Path) -> None:
    """--stage fracture --average A --average B: stage 2's weights are the mean of A's and
    B's (a model soup), validated and carded as training does; the card names what was
    averaged. Other architectures and a single folder are refused."""
    import shutil

    import torch

    from spine_node.inference.train import TrainOptions, run

    out, seg, fracture = _trained_before_one_stage(tmp_path, "fracture", "vertebra-seg")
    other = tmp_path / "other"
    run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=other, quick=True, progress=False,
                                  threads=1, seed=9))
    first = tmp_path / "first"
    shutil.copytree(out, first)
    seg_onnx = recipe._sha256(seg / "model.onnx")
    summary = run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=out, quick=True,
                                            progress=False, threads=1, stage="fracture",
                                            average=(first, other)))
    states = [torch.load(f / ct_cspine.FRACTURE_MODEL / "model.pt", weights_only=True)
              for f in (first, other, out)]
    floating = [k for k, v in states[0].items() if v.is_floating_point()]
    assert floating and any(not torch.equal(states[0][k], states[1][k]) for k in floating)
    for key in floating:
        assert torch.allclose(states[2][key], (states[0][key] + states[1][key]) / 2, atol=1e-6)
    card = ModelCard.load(fracture)
    sources = card.weights["averaged_from"]
    assert [s["model_pt_sha256"] for s in sources] == [
        recipe._sha256(f / ct_cspine.FRACTURE_MODEL / "model.pt") for f in (first, other)]
    assert f"--average {first} --average {other}" in card.weights["recipe"]
    assert card.preprocessing["threshold"] == round(summary["metrics"]["operating_point"]["threshold"], 4)
    assert recipe._sha256(seg / "model.onnx") == seg_onnx
    assert "seed" not in card.weights and "training_seconds" not in card.weights
    with pytest.raises(ValueError, match="at least two"):
        recipe.average_fracture([first])
    for wrong in (dict(stage="all"), dict(stage="fracture", init=first),
                  dict(stage="fracture", epochs=2)):
        with pytest.raises(ValueError, match="--average replaces training"):
            run("ct-cspine", TrainOptions(out=out, quick=True, progress=False,
                                          average=(first, other), **wrong))  # type: ignore[arg-type]
    # --out may be one of the averaged folders: the card names the weights it averaged.
    before = recipe._sha256(other / ct_cspine.FRACTURE_MODEL / "model.pt")
    shutil.copytree(seg, other / ct_cspine.SEGMENTATION_MODEL, dirs_exist_ok=True)
    run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=other, quick=True, progress=False,
                                  threads=1, stage="fracture", average=(first, other)))
    sources = ModelCard.load(other / ct_cspine.FRACTURE_MODEL).weights["averaged_from"]
    assert sources[1]["model_pt_sha256"] == before
    broken = tmp_path / "broken"
    shutil.copytree(first, broken)
    state = states[0]
    state.pop(floating[0])
    torch.save(state, broken / ct_cspine.FRACTURE_MODEL / "model.pt")
    with pytest.raises(ValueError, match="another architecture"):
        recipe.average_fracture([first, broken])


def test_stage_segmentation_trains_stage_one_alone(tmp_path: Path) -> None:
    """--stage segmentation retrains stage 1 only: stage 2's weights and recipe stay, its
    operating points and validation metrics are chosen again through the new stage 1."""
    from spine_node.inference.train import TrainOptions, run

    out, seg, fracture = _trained_before_one_stage(tmp_path, "segmentation", "fracture")
    seg_onnx = recipe._sha256(seg / "model.onnx")
    fracture_onnx = recipe._sha256(fracture / "model.onnx")
    fracture_recipe = ModelCard.load(fracture).weights["recipe"]
    summary = run("ct-cspine", TrainOptions(data=tmp_path / "rsna", out=out, quick=True,
                                            progress=False, threads=1, seed=6, stage="segmentation"))
    assert recipe._sha256(fracture / "model.onnx") == fracture_onnx
    card = ModelCard.load(fracture)
    assert card.weights["recipe"] == fracture_recipe and "revalidated" in card.weights
    assert card.preprocessing["threshold"] == round(summary["metrics"]["operating_point"]["threshold"], 4)
    assert recipe._sha256(seg / "model.onnx") != seg_onnx
    assert ModelCard.load(seg).weights["recipe"].endswith("--stage segmentation")
    assert len(summary["cards"]) == 2


def test_stage_two_pairs_each_fracture_with_an_intact_vertebra_of_its_group() -> None:
    levels = ["C1", "C2", "C2", "C5", "C6", "C1", "C7", "C2"]
    targets = np.array([1, 1, 0, 1, 0, 0, 0, 0], np.float32)
    draw = recipe.level_balanced_pairs(targets, levels)
    chosen = draw(np.random.default_rng(0), 400)
    positives, negatives = chosen[:400], chosen[400:]
    assert targets[positives].min() == 1 and targets[negatives].max() == 0

    def group(i: int) -> str:
        return levels[i] if levels[i] in ("C1", "C2") else "C3-C7"

    assert [group(i) for i in positives] == [group(i) for i in negatives]
    shares = {g: sum(group(i) == g for i in positives) / 400 for g in ("C1", "C2", "C3-C7")}
    for g, weight in zip(("C1", "C2", "C3-C7"), recipe.LEVEL_GROUP_WEIGHTS, strict=True):
        assert abs(shares[g] - weight) < 0.08, shares
    # No fractures at all: every crop alike, still 2 * half of them.
    assert len(recipe.level_balanced_pairs(np.zeros(4), levels[:4])(np.random.default_rng(0), 3)) == 6


def test_shape_jitter_scales_and_tilts_crops_about_their_centre(monkeypatch: pytest.MonkeyPatch) -> None:
    crop = np.zeros((1, 24, 48, 48), np.float32)
    crop[0, 5:8, 9:12, 29:32] = 1.0  # a block off the centre (11.5, 23.5, 23.5)
    monkeypatch.setattr(recipe, "SHAPE_JITTER_SHARE", 1.0)
    monkeypatch.setattr(recipe, "SHAPE_SCALE_Z", (1.3, 1.3))
    monkeypatch.setattr(recipe, "SHAPE_SCALE_YX", (0.9, 0.9))
    monkeypatch.setattr(recipe, "SHAPE_TILT_DEG", 0.0)
    out = recipe.shape_jitter(crop, np.random.default_rng(0))[0]
    expected = [(6 - 11.5) * 1.3 + 11.5, (10 - 23.5) * 0.9 + 23.5, (30 - 23.5) * 0.9 + 23.5]
    assert np.allclose(ndimage.center_of_mass(out), expected, atol=0.25)
    assert out.sum() == pytest.approx(crop.sum() * 1.3 * 0.9 * 0.9, rel=0.1)
    # a tilt moves the block in the sagittal plane (z, y) only
    monkeypatch.setattr(recipe, "SHAPE_SCALE_Z", (1.0, 1.0))
    monkeypatch.setattr(recipe, "SHAPE_SCALE_YX", (1.0, 1.0))
    monkeypatch.setattr(recipe, "SHAPE_TILT_DEG", 10.0)
    tilted = ndimage.center_of_mass(recipe.shape_jitter(crop, np.random.default_rng(1))[0])
    assert tilted[2] == pytest.approx(30.0, abs=0.05)
    assert abs(tilted[0] - 6.0) + abs(tilted[1] - 10.0) > 0.3
    # share 0: the batch as it came
    monkeypatch.setattr(recipe, "SHAPE_JITTER_SHARE", 0.0)
    assert recipe.shape_jitter(crop, np.random.default_rng(2)) is crop


def test_posterior_detail_share_draws_on_its_own_stream() -> None:
    """Stage-1 phantoms get posterior_detail for about SEG_POSTERIOR_SHARE of the varied
    ones, never for the textbook ones; a share of 0 leaves the anatomy untouched."""
    varied = {"varied_anatomy": True, "context": True}
    drawn = [recipe._with_posterior(seed, varied, 0.6)["posterior_detail"] for seed in range(400)]
    assert 0.5 < np.mean(drawn) < 0.7
    assert drawn == [recipe._with_posterior(seed, varied, 0.6)["posterior_detail"]
                     for seed in range(400)]
    assert "posterior_detail" not in recipe._with_posterior(1, {"varied_anatomy": False}, 0.6)
    assert recipe._with_posterior(1, varied, 0.0) is varied


def test_train_cli_lists_families() -> None:
    result = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "ct-cspine" in result.stdout


def test_train_cli_refuses_a_stage_the_recipe_lacks(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "train", "xray-tissue-xnet",
                             "--stage", "fracture", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "not a stage of xray-tissue-xnet" in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------- pipeline


def _series(ph: phantoms.Phantom, folder: Path) -> SeriesRef:
    paths = phantoms.write_ct_series(ph, folder)
    return SeriesRef(study_uid=phantoms._uid(ph.seed, "study"),
                     series_uid=phantoms._uid(ph.seed, "ct-series", 1), path=folder,
                     modality="CT", body_part="CSPINE", instance_count=len(paths))


def test_pipeline_end_to_end_from_dicom(engines: dict[str, OnnxCpuEngine],
                                        tmp_path: Path) -> None:
    import pydicom

    from spine_node.inference import pipelines

    # A finer grid than the model's, so resampling there and back is exercised.
    ph = phantoms.generate(9_100_001, shape=(100, 128, 128), spacing=(1.6, 1.0, 1.0),
                           fractures={"C6": "wedge"}, p_dislocation=0)
    ref = _series(ph, tmp_path / "series")
    paths = phantoms.write_ct_series(ph, tmp_path / "series")  # the same files, in slice order
    findings = pipelines.get("ct-cspine-fracture").run([ref], lambda name: engines[name])

    assert findings.pipeline == "ct-cspine-fracture" and findings.performed
    assert findings.study_uid == ref.study_uid and findings.series_uids == (ref.series_uid,)
    # Frames follow the slices head first, whatever order the files came in.
    uid_of = {p.name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert findings.source_sop_instance_uids == tuple(uid_of[p.name] for p in paths)
    seg = findings.segmentation
    assert seg is not None and seg.labels.shape == ph.shape
    assert seg.source_sop_instance_uids == findings.source_sop_instance_uids
    # Every level has a status; every segment is an assessed level with its finding.
    status = {s.site: s for s in findings.site_status}
    assert list(status) == list(ct_cspine.LEVELS)
    assessed = [level for level in ct_cspine.LEVELS if status[level].assessment is AssessmentValues.ASSESSED]
    assert [s.name for s in seg.segments] == assessed
    assert set(np.unique(seg.labels)) - {0} == {s.label for s in seg.segments}
    per_vertebra = [f for f in findings.findings if f.site is not None]
    assert [f.site for f in per_vertebra] == assessed
    assert all(f.centroid_mm is not None for f in per_vertebra)
    assert all(f.threshold == engines[ct_cspine.FRACTURE_MODEL].card.preprocessing["threshold"]
               for f in findings.findings)
    for level in assessed:  # whatever carries a level carries the right one
        number = ct_cspine.LEVELS.index(level) + 1
        assert _dice(seg.labels, np.where(ph.labels <= 7, ph.labels, 0), number) > 0.6, level
    names = [m.name for m in findings.models]
    assert names == [ct_cspine.SEGMENTATION_MODEL, ct_cspine.FRACTURE_MODEL]
    for info in findings.models:
        assert info.clinical_use is False and info.backend == "onnxruntime-cpu"
        assert info.trained_on.startswith("synthetic phantoms") and len(info.weights) == 64


@pytest.mark.parametrize("problem, reason", [
    ("few", "Only 5 slices"),
    ("thick", "at most 3 mm"),
    ("no-frame", "frame of reference"),
])
def test_series_outside_the_models_range_is_not_performed(engines: dict[str, OnnxCpuEngine],
                                                          tmp_path: Path, problem: str,
                                                          reason: str) -> None:
    import pydicom

    spacing = (4.0, 2.0, 2.0) if problem == "thick" else (2.0, 2.0, 2.0)
    shape = (40, 64, 64) if problem == "thick" else (80, 64, 64)
    ph = phantoms.generate(9_100_002, spacing=spacing, shape=shape)
    ref = _series(ph, tmp_path / "s")
    paths = sorted((tmp_path / "s").iterdir())
    if problem == "few":
        for path in paths[5:]:
            path.unlink()
    if problem == "no-frame":
        for path in paths:
            ds = pydicom.dcmread(path)
            del ds.FrameOfReferenceUID
            ds.save_as(path)
    findings = ct_cspine.CervicalSpineCtFracture().run([ref], lambda name: engines[name])
    assert not findings.performed and reason in (findings.not_performed_reason or "")
    assert findings.findings == [] and findings.segmentation is None
    assert [s.site for s in findings.site_status] == list(ct_cspine.LEVELS)
    assert findings.source_sop_instance_uids and findings.study_uid == ref.study_uid


@pytest.mark.parametrize("kind", ["air", "water", "noise", "head"])
def test_scans_without_a_cervical_spine_are_not_assessed(engines: dict[str, OnnxCpuEngine],
                                                         kind: str) -> None:
    from spine_node.inference import acquisition

    hu = acquisition.negative_volume(kind, np.random.default_rng(9_300_000), (2.0, 1.0, 1.0))
    volume = ct_cspine.CtVolume(hu, (2.0, 1.0, 1.0), tuple(map(str, range(hu.shape[0]))), "1.2", "1.2.3")
    findings = ct_cspine.CervicalSpineCtFracture().analyse(volume, lambda name: engines[name])
    assert not findings.performed, kind
    assert findings.segmentation is None and not any(f.present for f in findings.findings)


def test_pipeline_on_a_real_ct_that_is_not_a_cervical_spine(engines: dict[str, OnnxCpuEngine],
                                                          tmp_path: Path) -> None:
    """A real 512x512 CT slice (pydicom-data) stacked 60 times: no fracture is reported, and
    whatever is encoded is consistent (every label in the map has its segment)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    from spine_node.inference import pipelines

    source = get_testdata_file("693_UNCR.dcm")
    if source is None:
        pytest.skip("pydicom-data is not installed (the dev extra installs it)")
    ds = pydicom.dcmread(source)
    if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        ds.decompress()
    study, series = phantoms._uid("not-a-cspine", "study"), phantoms._uid("not-a-cspine", "series")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = phantoms._uid(study, "frame")
    ds.BodyPartExamined = "CSPINE"
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    folder = tmp_path / "series"
    folder.mkdir()
    for index in range(60):
        ds.SOPInstanceUID = phantoms._uid(series, str(index))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [x, y, z + index]
        ds.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
    ref = SeriesRef(study_uid=study, series_uid=series, path=folder, modality="CT", body_part="CSPINE",
                    instance_count=60)
    findings = pipelines.get("ct-cspine-fracture").run([ref], lambda name: engines[name])
    assert not any(f.present for f in findings.findings)
    seg = findings.segmentation
    if seg is not None:
        assert set(np.unique(seg.labels)) - {0} == {s.label for s in seg.segments}


def test_a_probability_between_the_operating_points_is_indeterminate_and_said_so(
        engines: dict[str, OnnxCpuEngine]) -> None:
    """A card with a rule-out point below its rule-in threshold gives three calls; a level
    in between is indeterminate, the report says so and asks for review, and the patient
    level is given (the patient is at least indeterminate) although C1 and C2 are out of
    the field. Without the rule-out point the same scores are simply absent."""
    from dataclasses import replace

    ph = phantoms.generate(9_000_031, context=True, spacing=2.0, fractures={})
    top = int(ph.vertebra("C3").center_mm[0] / 2) - 3
    hu = ph.hu[top:]
    volume = ct_cspine.CtVolume(hu, ph.spacing, tuple(map(str, range(hu.shape[0]))), "1.2", "1.2.3")
    fracture = engines[ct_cspine.FRACTURE_MODEL]

    def with_points(**points: float) -> OnnxCpuEngine:
        own = {k: v for k, v in fracture.card.preprocessing.items()
               if k not in ("threshold", "rule_out_threshold")}
        card = replace(fracture.card, preprocessing={**own, **points})
        return OnnxCpuEngine(card, fracture.session)

    pipeline = ct_cspine.CervicalSpineCtFracture()
    band = with_points(threshold=1.0, rule_out_threshold=0.0)
    findings = pipeline.analyse(volume, lambda name: band if name == ct_cspine.FRACTURE_MODEL
                                else engines[name])
    levels = [f for f in findings.findings if f.site]
    patient = [f for f in findings.findings if f.site is None]
    assert levels and "C1" not in {f.site for f in levels}
    assert all(f.call == "indeterminate" for f in levels)
    assert len(patient) == 1 and patient[0].call == "indeterminate"
    assert any("indeterminate" in note and "review" in note for note in findings.notes)
    single = with_points(threshold=1.0)
    findings = pipeline.analyse(volume, lambda name: single if name == ct_cspine.FRACTURE_MODEL
                                else engines[name])
    assert all(f.call == "absent" for f in findings.findings)
    assert not [f for f in findings.findings if f.site is None]  # C1, C2 out: no patient call


def test_refined_outline_on_a_fine_grid_follows_the_probability() -> None:
    """Labels from a 2 mm grid drawn on a 0.5 mm source grid: with stage 1's probability
    interpolated, a ball's outline is closer to the ball than whole 2 mm blocks are, every
    voxel keeps the level of its neighbourhood, and on the model's own grid nothing changes."""
    model, source = (2.0, 2.0, 2.0), (0.5, 0.5, 0.5)
    fine_shape = (80, 80, 80)

    def ball(spacing: tuple[float, ...], shape: tuple[int, ...]) -> np.ndarray:
        axes = [(np.arange(n) + 0.5) * s - 20.0 for n, s in zip(shape, spacing, strict=True)]
        z, y, x = np.meshgrid(*axes, indexing="ij")
        return np.sqrt(z ** 2 + y ** 2 + x ** 2)

    coarse = ball(model, (20, 20, 20))
    probability = np.clip(0.5 + (9.0 - coarse) / 3.0, 0.0, 1.0).astype(np.float32)
    labels = np.where(probability >= 0.5, 4, 0).astype(np.uint8)
    truth = ball(source, fine_shape) <= 9.0
    nearest = ct_cspine.labels_to_source(labels, model, source, fine_shape)
    refined = ct_cspine.refine_to_source(labels, probability, model, source, fine_shape)
    assert set(np.unique(refined)) == {0, 4}
    assert _dice(refined, np.where(truth, 4, 0), 4) > _dice(nearest, np.where(truth, 4, 0), 4) + 0.02
    same = ct_cspine.refine_to_source(labels, probability, model, model, labels.shape)
    assert same is labels


# ----------------------------------------------------------- stage 2 crop frames


def _tilted_column(tilt_deg: float, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels C2..C6 as discs (14 mm across, 10 mm tall) every 18 mm along an axis tilted
    ``tilt_deg`` forwards in the sagittal plane, HU with a bright rod along that axis, and
    the unit axis (z, y, x)."""
    shape = (140, 110, 80)
    axis = np.array([np.cos(np.radians(tilt_deg)), np.sin(np.radians(tilt_deg)), 0.0])
    zz, yy, xx = (np.indices(shape).astype(float) + 0.5) * np.asarray(spacing)[:, None, None, None]
    rel = np.stack([zz - 20.0, yy - 30.0, xx - 40.0], axis=-1)
    along = rel @ axis
    across = np.linalg.norm(rel - along[..., None] * axis, axis=-1)
    labels = np.zeros(shape, np.uint8)
    for k, level in enumerate(range(2, 7)):
        centre = 10.0 + 18.0 * k
        labels[(np.abs(along - centre) <= 5.0) & (across <= 7.0)] = level
    hu = np.where(across <= 2.0, 1000.0, 0.0).astype(np.float32)
    return labels, hu, axis


@pytest.mark.parametrize("tilt", [0.0, 25.0])
def test_vertebra_frames_follow_the_spine_axis(tilt: float) -> None:
    """Each vertebra's frame runs along the local spine axis (a lordotic or flexed neck
    gives upright crops); its extents are the vertebra's own along those axes."""
    labels, hu, axis = _tilted_column(tilt)
    frames = ct_cspine.vertebra_frames(labels, (1.0, 1.0, 1.0))
    assert sorted(frames) == ["C2", "C3", "C4", "C5", "C6"]
    for name, frame in frames.items():
        angle = np.degrees(np.arccos(abs(float(frame.axes[0] @ axis))))
        assert angle < 2.0, (name, angle)
        assert np.allclose(frame.axes @ frame.axes.T, np.eye(3), atol=1e-6)
        assert frame.axes[1][1] > 0  # front to back stays front to back
        assert abs(2 * frame.half[0] - 11.0) < 1.5 and abs(2 * frame.half[2] - 15.0) < 1.5
    # The rod along the axis sits in the middle of every slice of the oriented crop.
    for extra in ({}, {"crop_spacing_mm": [1.6, 1.25, 1.25]}):
        pre = {**ct_cspine.FRACTURE_PREPROCESSING, "crop_frame": "vertebra", **extra}
        crop = ct_cspine.stage2_crops(hu, (1.0, 1.0, 1.0), labels, (1.0, 1.0, 1.0), pre)["C4"]
        assert crop.shape == tuple(pre["crop_shape"])
        for plane in crop[::5]:
            rows, cols = np.nonzero(plane > 500)
            assert len(rows) and abs(rows.mean() - 23.5) < 1.0 and abs(cols.mean() - 23.5) < 1.0


def test_cards_without_a_crop_frame_keep_axis_aligned_crops() -> None:
    """A card without crop_frame (the demo weights) gets the crops its weights were trained
    on: the box in scanner axes, stretched over the vertebra plus the margin."""
    labels, hu, _ = _tilted_column(20.0)
    legacy = {"crop_shape": [24, 48, 48], "crop_margin_mm": 4.0}
    crops = ct_cspine.stage2_crops(hu, (1.0, 1.0, 1.0), labels, (1.0, 1.0, 1.0), legacy)
    boxes = ct_cspine.level_boxes_mm(labels, (1.0, 1.0, 1.0))
    for name, crop in crops.items():
        assert np.array_equal(crop, ct_cspine.vertebra_crop(hu, (1.0, 1.0, 1.0), boxes[name],
                                                            (24, 48, 48), 4.0))


def test_stage_two_reads_each_vertebra_as_its_card_asks() -> None:
    """preprocessing.test_time_augmentation: every listed margin, each also mirrored
    left-right, the logits averaged; a card without it reads once and gets the model's
    own probability; a key the pipeline does not know is refused, not ignored."""
    from dataclasses import replace
    from types import SimpleNamespace

    from spine_node.inference.pipelines import PipelineError

    labels, hu, _ = _tilted_column(0.0)
    volume = ct_cspine.CtVolume(hu.astype(np.float32), (1.0, 1.0, 1.0),
                                tuple(map(str, range(hu.shape[0]))), "1.2", "1.2.3")
    levels = SimpleNamespace(labels=labels)
    card = ModelCard.load(ENGINES_DIR / ct_cspine.FRACTURE_MODEL)

    class Recorder:
        def __init__(self, preprocessing: dict) -> None:  # type: ignore[type-arg]
            self.card = replace(card, preprocessing=preprocessing)
            self.inputs: list[np.ndarray] = []

        def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            crops = next(iter(feeds.values()))
            self.inputs.append(crops)
            # A toy "model" that sees where bone is: mirroring and margins move its answer.
            weights = np.linspace(-0.5, 1.5, crops.shape[-1])
            z = (crops[0] * weights).mean(axis=(1, 2, 3)) * 5.0 - 1.0
            return {card.outputs[0].name: (1 / (1 + np.exp(-z)))[None]}

    own = {k: v for k, v in card.preprocessing.items() if k != "test_time_augmentation"}
    once = Recorder(own)
    single, _ = ct_cspine.classify(once, volume, levels, (1.0, 1.0, 1.0))
    assert len(once.inputs) == 1 and set(single) == {"C2", "C3", "C4", "C5", "C6"}

    six = Recorder({**own, "test_time_augmentation": {"margins_mm": [4.0, 0.0, 8.0], "mirror": True}})
    averaged, _ = ct_cspine.classify(six, volume, levels, (1.0, 1.0, 1.0))
    assert len(six.inputs) == 6
    assert np.array_equal(six.inputs[0], once.inputs[0])             # margin 4 mm: the plain read
    assert np.array_equal(six.inputs[1], six.inputs[0][..., ::-1])    # and mirrored
    assert not np.array_equal(six.inputs[2], six.inputs[0])           # other margins, other crops
    reads = [six.infer({"crops": x})[card.outputs[0].name][0] for x in six.inputs[:6]]
    logits = np.mean([np.log(r) - np.log1p(-r) for r in reads], axis=0)
    expected = 1 / (1 + np.exp(-logits))
    assert [averaged[n] for n in sorted(averaged)] == pytest.approx(list(expected), rel=1e-6)
    assert averaged != single

    with pytest.raises(PipelineError, match="flip_z"):
        ct_cspine.classify(Recorder({**own, "test_time_augmentation": {"flip_z": True}}),
                           volume, levels, (1.0, 1.0, 1.0))


def test_moved_operating_points_move_the_card_on_a_patch_version(tmp_path: Path) -> None:
    import shutil

    import yaml

    from spine_node import engines

    card = tmp_path / "model.yaml"
    shutil.copy(Path(engines.__file__).parent / ct_cspine.FRACTURE_MODEL / "model.yaml", card)
    before = yaml.safe_load(card.read_text())
    same = {"threshold": before["preprocessing"]["threshold"],
            "rule_out_threshold": before["preprocessing"]["rule_out_threshold"]}
    recipe._rewrite_validation(card, {"cases": 1}, same)
    assert yaml.safe_load(card.read_text())["version"] == before["version"]
    recipe._rewrite_validation(card, {"cases": 1}, {**same, "threshold": 0.5})
    after = yaml.safe_load(card.read_text())
    major, minor, patch = (int(v) for v in before["version"].split("."))
    assert after["version"] == f"{major}.{minor}.{patch + 1}"
    assert after["preprocessing"]["threshold"] == 0.5


def test_plain_findings_share_turns_varied_patterns_plain() -> None:
    """About PLAIN_FRACTURE_SHARE of the stage-2 seeds draw the generator's plain findings
    (varied_fractures off), decided on a stream of their own; a forced dens or hangman's
    pattern, which only the varied draws know, becomes a plain C2 crack; other forced
    levels stay; a share of 0 changes nothing."""
    anatomy = {"varied_fractures": True, "context": False}
    drawn = [recipe._with_plain_findings(seed, anatomy, {}, 0.3)[0]["varied_fractures"]
             for seed in range(400)]
    assert 0.62 < np.mean(drawn) < 0.78
    plain = next(seed for seed in range(400) if not drawn[seed])
    for forced, expected in (({"fractures": {"C2": "dens"}}, {"C2": "crack"}),
                             ({"fractures": {"C2": "hangman"}}, {"C2": "crack"}),
                             ({"fractures": {"C1": "crack"}}, {"C1": "crack"})):
        new_anatomy, new_forced = recipe._with_plain_findings(plain, anatomy, forced, 0.3)
        assert new_anatomy["varied_fractures"] is False and new_forced["fractures"] == expected
        assert anatomy["varied_fractures"] is True  # the caller's dict is not changed
    assert recipe._with_plain_findings(plain, anatomy, {"fractures": {"C2": "dens"}}, 0.0) == (
        anatomy, {"fractures": {"C2": "dens"}})
    # the plain phantom the generator then draws: C2 forced as a crack is accepted
    ph = phantoms.generate(plain, p_fracture=0.0, varied_fractures=False,
                           fractures={"C2": "crack"})
    assert [v.name for v in ph.vertebrae if v.fractured] == ["C2"]


def test_card_names_the_stage2_draws_beyond_the_varied_phantoms(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PLAIN_FRACTURE_SHARE", "LOCAL_CRACK_SHARE", "FRACTURE_POSTERIOR_SHARE",
                 "SHAPE_JITTER_SHARE"):
        monkeypatch.setattr(recipe, name, 0.0)
    assert recipe._stage2_draws() == ""
    monkeypatch.setattr(recipe, "PLAIN_FRACTURE_SHARE", 0.5)
    monkeypatch.setattr(recipe, "SHAPE_JITTER_SHARE", 0.7)
    assert recipe._stage2_draws() == ("; stage 2: plain fracture patterns in 50%"
                                      "; stage 2: shape jitter in 70%")
