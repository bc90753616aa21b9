"""X-ray training recipes on the documented folder layouts (a tiny layout the test writes).

These check the data loading, training loop, ONNX export and model card, not accuracy:
accuracy on held-out phantoms is tested in ``test_xray_models.py`` against the committed
demo weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.peers import require_module

torch = require_module("torch")
ort = pytest.importorskip("onnxruntime")
Image = require_module("PIL.Image")

from spine_node.inference.card import ModelCard  # noqa: E402
from spine_node.inference.pipelines.xray import LAT_STRUCTURES  # noqa: E402
from spine_node.inference.train import RECIPES, TrainOptions  # noqa: E402
from spine_node.inference.train import run as run_recipe  # noqa: E402
from spine_node.inference.train.xray import (  # noqa: E402
    LOCAL_CONTRAST_MM,
    SPECS,
    DatasetError,
    Plan,
    _Crops,
    dice,
    load_class_folders,
    load_segmentation_folders,
    operating_point,
    phantom_sets,
    roc_auc,
    train_model,
    train_recipe,
    wilson_ci,
)
from tests.xray_dicom import write_test_radiograph  # noqa: E402

torch.set_num_threads(1)  # the recipes' own setting; tests share a small CPU


def _spine_like(rng: np.random.Generator, broken: bool, shape: tuple[int, int] = (60, 48)
                ) -> np.ndarray:
    """A column of bright blocks; ``broken`` squashes one of them."""
    image = rng.normal(40, 5, shape)
    top = 4
    for level in range(5):
        height = 4 if broken and level == 2 else 9
        image[top:top + height, 18:30] = 200
        top += height + 3
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def class_layout(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "fractures"
    for split, count in (("train", 6), ("val", 3)):
        for label in ("normal", "fracture"):
            for i in range(count):
                pixels = _spine_like(rng, label == "fracture")
                if i == 0:  # one DICOM per class, stored MONOCHROME1 like many CR plates
                    path = root / split / label / f"{i}.dcm"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_test_radiograph(path, 255 - pixels, photometric="MONOCHROME1")
                else:
                    _write_png(root / split / label / f"{i}.png", pixels)
    return root


def test_class_folders_read_png_and_dicom_alike(class_layout: Path) -> None:
    spec = SPECS["xray-fracture-mobilenet"]
    data = load_class_folders(class_layout, "train", spec)
    assert data.images.shape == (12, 1, *spec.size)
    assert sorted(np.bincount(data.targets).tolist()) == [6, 6]
    # The MONOCHROME1 DICOM is inverted on read: bone bright like the PNGs.
    dicom_image, png_image = data.images[0, 0], data.images[1, 0]
    assert dicom_image[spec.size[0] // 2, spec.size[1] // 2] > 0.8
    assert abs(float(dicom_image.mean()) - float(png_image.mean())) < 0.1


def test_fracture_recipe_on_folder_layout_exports_onnx_and_card(class_layout: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "engines"
    card = train_recipe("xray-fracture-mobilenet", out, class_layout, Plan(steps=10))
    loaded = ModelCard.load(out / "xray-fracture-mobilenet")
    assert loaded == card
    assert loaded.clinical_use is False
    assert "not for clinical use" in loaded.intended_use.lower()
    assert loaded.trained_on.startswith("folder dataset fractures/train")
    # Folder images are not prepared with local contrast, so the card must not ask for it.
    assert "local_contrast_mm" not in loaded.preprocessing
    assert set(loaded.weights["metrics"]) >= {"auc_fracture", "accuracy"}
    session = ort.InferenceSession(str(loaded.onnx_path), providers=["CPUExecutionProvider"])
    shape = loaded.inputs[0].shape[1:]
    for batch in (1, 3):  # dynamic batch
        (probabilities,) = session.run(None, {"image": np.zeros((batch, *shape), np.float32)})
        assert probabilities.shape == (batch, 2)
        np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)


def test_pair_layout_needs_both_views(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "pairs"
    for split in ("train", "val"):
        for label in ("normal", "damaged"):
            for study in range(2):
                folder = root / split / label / f"study{study}"
                _write_png(folder / "AP.png", _spine_like(rng, label == "damaged"))
                _write_png(folder / "lat.jpg", _spine_like(rng, label == "damaged"))
    spec = SPECS["xray-pair-classifier"]
    data = load_class_folders(root, "train", spec)
    assert data.second is not None and data.second.shape == data.images.shape == (4, 1, *spec.size)
    card = train_recipe("xray-pair-classifier", tmp_path / "out", root, Plan(steps=3))
    assert [t.name for t in card.inputs] == ["ap", "lat"]
    (root / "train" / "normal" / "study0" / "lat.jpg").unlink()
    with pytest.raises(DatasetError, match="needs an AP and a LAT image"):
        load_class_folders(root, "train", spec)


def test_unknown_class_folder_is_named(class_layout: Path) -> None:
    (class_layout / "train" / "broken").mkdir()
    with pytest.raises(DatasetError, match="'broken'"):
        load_class_folders(class_layout, "train", SPECS["xray-fracture-mobilenet"])


def _segmentation_layout(root: Path, per_structure: bool, structures: int) -> None:
    rng = np.random.default_rng(2)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            image = rng.normal(30, 4, (64, 56))
            label = np.zeros((64, 56), np.uint8)
            for k in range(structures):
                top = 4 + 12 * k + i
                label[top:top + 9, 10 + 3 * k:40] = k + 1
                image[label == k + 1] = 80 + 40 * k
            _write_png(root / split / "images" / f"case{i}.png",
                       np.clip(image, 0, 255).astype(np.uint8))
            if per_structure:
                for k, name in enumerate(LAT_STRUCTURES[:structures]):
                    _write_png(root / split / "masks" / name / f"case{i}.png",
                               ((label == k + 1) * 255).astype(np.uint8))
            else:
                _write_png(root / split / "masks" / f"case{i}.png", label)


@pytest.mark.parametrize("per_structure", [False, True])
def test_segmentation_layouts(tmp_path: Path, per_structure: bool) -> None:
    root = tmp_path / "seg"
    _segmentation_layout(root, per_structure, structures=5)
    spec = SPECS["xray-spine-unet-lat"]
    data = load_segmentation_folders(root, "train", spec)
    assert data.images.shape == (4, 1, *spec.size)
    assert data.targets.shape == (4, *spec.size)
    assert set(np.unique(data.targets).tolist()) == {0, 1, 2, 3, 4, 5}
    assert [t.shape for t in data.source_targets] == [(64, 56)] * 4


def test_tissue_recipe_on_label_masks(tmp_path: Path) -> None:
    root = tmp_path / "tissue"
    _segmentation_layout(root, per_structure=False, structures=3)
    card = train_recipe("xray-tissue-xnet", tmp_path / "out", root, Plan(steps=2))
    assert card.labels == {0: "bone", 1: "soft_tissue", 2: "open_beam"}
    assert card.outputs[0].shape == (-1, 3, *SPECS["xray-tissue-xnet"].size)
    # Label 0 in a tissue mask means "not labelled" (tissue classes cover every pixel).
    data = load_segmentation_folders(root, "train", SPECS["xray-tissue-xnet"])
    assert data.targets.min() == -1 and data.targets.max() == 2
    assert "dice_bone" in card.weights["metrics"]


def test_missing_masks_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    _segmentation_layout(root, per_structure=False, structures=3)
    (root / "train" / "masks" / "case1.png").unlink()
    with pytest.raises(DatasetError, match="no mask for case1.png"):
        load_segmentation_folders(root, "train", SPECS["xray-spine-unet-ap"])


def test_recipes_registered_and_runnable(tmp_path: Path) -> None:
    # The view gate trains with the family ("spine-node train xray"), not on its own.
    assert set(RECIPES) >= {"xray", *(set(SPECS) - {"xray-view-gate"})}
    rng = np.random.default_rng(3)
    root = tmp_path / "cspine"
    for split in ("train", "val"):
        for label in ("normal", "fracture", "dislocation"):
            for i in range(3):
                pixels = _spine_like(rng, label == "fracture")
                if label == "dislocation":
                    pixels[:30] = np.roll(pixels[:30], 4, axis=1)
                _write_png(root / split / label / f"{i}.png", pixels)
    out = tmp_path / "out"
    summary = run_recipe("xray-cspine-classifier",
                         TrainOptions(data=root, out=out,
                                      epochs=1, threads=1, progress=False))
    assert summary["cards"] == [str(out / "xray-cspine-classifier" / "model.yaml")]
    assert "xray-cspine-classifier.auc_dislocation" in summary["metrics"]
    assert (out / "xray-cspine-classifier" / "model.pt").is_file()


def test_quick_phantom_recipe(tmp_path: Path) -> None:
    summary = run_recipe("xray-spine-unet-lat",
                         TrainOptions(out=tmp_path, quick=True, threads=1, progress=False))
    card = ModelCard.load(tmp_path / "xray-spine-unet-lat")
    assert card.trained_on.startswith("synthetic phantoms (spine-node inference.phantoms DRRs")
    assert card.labels[0] == "background" and len(card.labels) == 6
    # The pipelines prepare its inputs as the recipe did: 2 mm grid, local contrast.
    assert card.preprocessing["grid_mm"] == 2.0
    assert card.preprocessing["local_contrast_mm"] == LOCAL_CONTRAST_MM
    assert "xray-spine-unet-lat.dice_mean" in summary["metrics"]


def test_crop_phase_labels_each_crop_by_the_lesions_in_it() -> None:
    """Classifiers on phantoms first train on crops around the vertebral bodies."""
    spec = SPECS["xray-pair-classifier"]
    data = phantom_sets(spec, range(95000000, 95000006), copies=1)  # 1 mm radiographic cohort
    n = len(data)  # a copy whose lesion the acquisition hid is dropped
    assert 4 <= n <= 6
    assert data.images.shape == data.second.shape == (n, 1, *spec.size)
    assert [m.shape for m in data.body_masks] == [(n, *spec.size)] * 2
    assert all(mask.any() for masks in data.body_masks for mask in masks)
    # Flips are part of the randomised acquisitions, so both views may be mirrored.
    assert [flags.tolist() for flags in data.mirrorable] == [[True] * n, [True] * n]
    assert data.views is not None and set(data.views.tolist()) == {"pair"}
    ap, lat, targets, _, lesions, _ = _Crops(spec, data, torch.Generator().manual_seed(0)).batch()
    crop = (spec.crop_batch_size, 1, spec.crop_size, spec.crop_size)
    assert ap.shape == crop and lat is not None and lat.shape == crop
    # One lesion map per view, cut to the crop (stride 8); damage if either view has one.
    cells = spec.crop_size // 8
    assert [m.shape for m in lesions] == [(spec.crop_batch_size, 1, cells, cells)] * 2
    peak = torch.maximum(lesions[0].amax(dim=(1, 2, 3)), lesions[1].amax(dim=(1, 2, 3)))
    assert torch.equal(targets, (peak >= 0.5).long())
    model = train_model(spec, data, seed=1, steps=2, crop_steps=3)
    assert not model.training


def test_operating_point_and_wilson() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    truth = np.array([0, 0, 0, 1, 1, 1])
    point = operating_point(scores, truth)
    assert 0.3 < point["threshold"] <= 0.6
    assert point["sensitivity"] == 1.0 and point["specificity"] == 1.0
    low, high = wilson_ci(3, 3)
    assert 0.4 < low < 0.5 and high == 1.0  # Wilson: 0.438-1.0 for 3/3
    assert wilson_ci(0, 0) != wilson_ci(0, 0)  # NaN for no trials


def test_acquisition_moves_masks_with_the_image() -> None:
    """Rotation, flip, shift and scale act on the image and its truth maps alike."""
    from spine_node.inference.train import xray_augment as augment

    integral = np.zeros((80, 64), np.float32)
    integral[20:40, 10:22] = 3.0
    mask = (integral > 0).astype(np.uint8)
    rng = np.random.default_rng(4)
    acq = augment.Acquisition(rotation_deg=12.0, scale=1.1, attenuation=1.0, shift_mm=(6.0, -4.0),
                              flip=True, detector_mm=0.15, photons=1e5, binned=True, scatter=0.0,
                              blur_mm=0.0, gamma=1.0, coverage=(0.0, 0.0, 0.0, 0.0),
                              shutter=False, markers=0)
    image, valid, visible = augment.acquire(integral, 2.0, acq, rng)
    moved = augment.transform_map(mask, acq, 2.0, 0).astype(bool)
    assert valid.all() and visible.all()
    bright = image > 0.5 * image.max()
    assert dice(bright, moved) > 0.9
    assert not np.array_equal(moved, mask.astype(bool))


@pytest.mark.parametrize("kind", ["uniform_noise", "blank", "chest", "hand", "ct_slice"])
def test_junk_kinds_draw(kind: str) -> None:
    from spine_node.inference.train import xray_augment as augment

    image, spacing = augment.junk(kind, np.random.default_rng(1), 2.0)
    assert image.ndim == 2 and np.isfinite(image).all() and spacing == 2.0


def test_metric_helpers() -> None:
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert dice(a, a) == 1.0
    assert dice(a, ~a) == 0.0


# ----------------------------------------------------------- context phantoms


def test_context_field_holds_every_lesion_whole() -> None:
    """The field cut from a context phantom's radiographs keeps each lesion's vertebrae
    whole (a study labelled "fracture" shows its fracture), wherever its top is drawn."""
    from spine_node.inference.train.xray import CONTEXT_TOP_MM, FIELD_MM, _context_field

    rows = FIELD_MM[0]
    levels = np.zeros((250, 170), np.uint8)
    levels[200:214, 60:110] = 7  # a C7 low in the volume
    levels[30:44, 60:110] = 3  # with C7, taller than the field
    for seed in range(30):
        top, n = _context_field(seed, 1.0, [levels, levels], [7])
        assert n == rows and top <= 200 - 2 and top + rows >= 214 + 2
        top, n = _context_field(seed, 1.0, [levels, levels], [])
        assert CONTEXT_TOP_MM[0] <= top <= CONTEXT_TOP_MM[1]
    # Lesions further apart than the field: centred on them, inside the volume.
    top, n = _context_field(0, 1.0, [levels, levels], [3, 7])
    assert 0 <= top <= 250 - rows and abs((top + rows / 2) - (30 + 214) / 2) <= 1


def test_most_segmenter_phantoms_show_the_neck_between_skull_and_shoulders() -> None:
    """Three in four of the segmenters' phantoms are drawn with their surroundings and
    varied anatomy, cut to the same field as the classic ones; their lesions stay located.
    The classifiers keep the classic phantoms; the gate draws half of its with context."""
    from spine_node.inference.train.xray import (
        CONTEXT_COHORT,
        GATE_COHORT,
        GATE_MODEL,
        RADIOGRAPHIC_COHORT,
        TISSUE_MODEL,
        phantom_views,
    )

    cohort = CONTEXT_COHORT
    assert SPECS[TISSUE_MODEL].cohort is cohort and SPECS[GATE_MODEL].cohort is not cohort
    assert not any(RADIOGRAPHIC_COHORT.with_context(seed) for seed in range(50))
    assert SPECS[GATE_MODEL].cohort is GATE_COHORT
    assert 0.4 < np.mean([GATE_COHORT.with_context(seed) for seed in range(400)]) < 0.6
    chosen = [cohort.with_context(seed) for seed in range(400)]
    assert 0.65 < np.mean(chosen) < 0.85
    seeds = [s for s in range(40) if cohort.with_context(s)][:6]
    for seed in seeds:
        views = phantom_views(seed, cohort)
        assert views.ap.shape == views.lat.shape == views.ap_structures.shape == cohort.shape[:2]
        assert views.lesions_located
        if views.cspine_fracture:
            assert views.lat_fracture_map.sum() > 0 and views.ap_fracture_map.sum() > 0
    plain = next(s for s in range(40) if not cohort.with_context(s))
    assert phantom_views(plain, cohort).ap.shape == cohort.shape[:2]


def test_gpu_budget_scales_phantoms_and_steps() -> None:
    """``--budget gpu`` gives every X-ray model more phantoms and four times its steps
    (crop phase included); the default keeps the models' own; an explicit step count or
    epochs (``--epochs``) are taken as given."""
    from spine_node.inference.train import xray as recipe

    default, gpu = recipe._plan(TrainOptions()), recipe._plan(TrainOptions(budget="gpu", threads=16))
    assert (default.budget, default.steps_factor) == ("default", 1)
    assert gpu.budget == "gpu" and gpu.train_phantoms > default.train_phantoms and gpu.workers == 16
    spec = recipe.SPECS[recipe.CSPINE_MODEL]
    assert spec.crop_steps > 0
    assert recipe.plan_steps(spec, default, 1000, True) == (spec.steps, spec.crop_steps)
    assert recipe.plan_steps(spec, gpu, 1000, True) == (4 * spec.steps, 4 * spec.crop_steps)
    assert recipe.plan_steps(spec, gpu, 1000, False) == (4 * spec.steps, 0)
    epochs = recipe._plan(TrainOptions(budget="gpu", epochs=2))
    assert recipe.plan_steps(spec, epochs, 1000, True) == (2 * 1000 // spec.batch_size, 0)


def test_lat_segmenter_phantoms_show_articular_pillars() -> None:
    """The spine U-Nets' cohort draws six in ten of its context phantoms with posterior
    detail (articular pillars, sloping spinous processes), and the LAT truth map counts the
    pillars as posterior elements; the other cohorts draw none."""
    from dataclasses import replace

    from spine_node.inference.phantoms import LAT_STRUCTURES
    from spine_node.inference.train.xray import (
        CONTEXT_COHORT,
        SPINE_SEGMENTER_COHORT,
        TISSUE_MODEL,
        UNET_AP_MODEL,
        UNET_LAT_MODEL,
        phantom_views,
    )

    cohort = SPINE_SEGMENTER_COHORT
    assert SPECS[UNET_LAT_MODEL].cohort is cohort and SPECS[UNET_AP_MODEL].cohort is cohort
    assert SPECS[TISSUE_MODEL].cohort is CONTEXT_COHORT
    drawn = [cohort.with_posterior(seed) for seed in range(600)]
    context = [cohort.with_context(seed) for seed in range(600)]
    assert not any(d and not c for d, c in zip(drawn, context, strict=True))
    assert 0.5 < np.mean([d for d, c in zip(drawn, context, strict=True) if c]) < 0.7
    assert not any(CONTEXT_COHORT.with_posterior(seed) for seed in range(100))
    seed = next(s for s in range(40) if cohort.with_posterior(s))
    code = next(k for k, v in LAT_STRUCTURES.items() if v == "posterior_elements")
    with_pillars = phantom_views(seed, cohort).lat_structures
    without = phantom_views(seed, replace(cohort, name="no-posterior", posterior_share=0.0)).lat_structures
    assert (with_pillars == code).sum() > 1.15 * (without == code).sum()


def test_operating_points_are_chosen_on_both_validation_cohorts() -> None:
    """A threshold chosen on the classic cohort alone would flag the context cohort's
    normals (scored higher); chosen on both, it holds on each, and the card's point gives
    the rates on each part."""
    from spine_node.inference.train.xray import ImageSet, _mixed_points

    spec = SPECS["xray-cspine-classifier"]  # normal, fracture, dislocation

    def part(normal: list[float], dislocated: list[float]) -> tuple[np.ndarray, ImageSet]:
        scores = np.array(normal + dislocated)
        probabilities = np.zeros((len(scores), 3))
        probabilities[:, 2] = scores
        probabilities[:, 0] = 1 - scores
        targets = np.array([0] * len(normal) + [2] * len(dislocated))
        data = ImageSet(np.zeros((len(scores), 1, 4, 4), np.float32), targets,
                        views=np.array(["LAT"] * len(scores)))
        return probabilities, data

    classic = part([0.01, 0.02, 0.03, 0.04], [0.1, 0.5, 0.6, 0.7])
    context = part([0.15, 0.2, 0.25, 0.3], [0.4, 0.5, 0.6, 0.8])
    alone = operating_point(classic[0][:, 2], classic[1].targets == 2)
    assert alone["threshold"] <= 0.1  # would flag every context normal
    points: dict = {}
    metrics: dict = {}
    _mixed_points(spec, {"classic": classic, "context": context}, points, metrics)
    point = points["dislocation"]["LAT"]
    assert 0.3 < point["threshold"] <= 0.4
    assert point["chosen_on"].startswith("classic + context: best worst-cohort Youden J")
    assert point["parts"]["context"]["specificity"] == 1.0
    assert point["parts"]["classic"]["specificity"] == 1.0
    assert point["parts"]["classic"]["sensitivity"] == 0.75  # the weak classic positive is missed
    assert point["n_positive"] == 8 and point["n_negative"] == 8
    assert metrics["auc_dislocation_context"] == 1.0
    assert set(points) == {"fracture", "dislocation"}


def test_robust_threshold_keeps_a_specificity_floor() -> None:
    """The best worst-cohort J would flag half the second cohort's normals; the floor
    (on every cohort) moves the threshold up, unless no threshold can keep it."""
    from spine_node.inference.train.xray import SPECIFICITY_FLOOR, robust_threshold

    classic = (np.array([0.1, 0.1, 0.9, 0.9]), np.array([0, 0, 1, 1]))
    context = (np.array([0.2, 0.3, 0.6, 0.7, 0.65, 0.8, 0.85, 0.9, 0.95, 0.97]),
               np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]))
    threshold = robust_threshold([classic, context])
    normals = context[0][context[1] == 0]
    assert (normals < threshold).mean() >= SPECIFICITY_FLOOR
    assert threshold == 0.8
    everything = (np.array([0.5, 0.6, 0.7]), np.array([0, 0, 1]))  # 0.7 keeps the floor here
    assert robust_threshold([everything]) == 0.7
    hopeless = (np.array([0.9, 0.9, 0.1]), np.array([0, 0, 1]))  # no threshold keeps it
    assert robust_threshold([hopeless]) in (0.1, 0.5, 0.9)


def test_validate_only_rechooses_classifier_operating_points(tmp_path: Path) -> None:
    """``--validate-only`` keeps the weights and rewrites points, metrics and version."""
    import shutil

    from spine_node.inference.train.xray import CSPINE_MODEL, ENGINES_DIR

    shutil.copytree(ENGINES_DIR / CSPINE_MODEL, tmp_path / CSPINE_MODEL)
    before = ModelCard.load(tmp_path / CSPINE_MODEL)
    summary = run_recipe(CSPINE_MODEL, TrainOptions(out=tmp_path, quick=True, threads=1,
                                                    progress=False, validate_only=True))
    assert summary["cards"] == [str(tmp_path / CSPINE_MODEL / "model.yaml")]
    card = ModelCard.load(tmp_path / CSPINE_MODEL)
    assert card.weights["sha256"] == before.weights["sha256"]
    assert card.weights["trained_on"] == before.weights["trained_on"]
    assert card.version == SPECS[CSPINE_MODEL].version
    point = card.weights["operating_points"]["dislocation"]["LAT"]
    assert set(point["parts"]) == {"classic", "context"}
    assert "auc_dislocation_context" in card.weights["metrics"]
    assert "second cohort" in card.weights["evaluated_on"]
    # the points are chosen on the reads the pipelines make: as it is and mirrored
    assert card.preprocessing["test_time_flip"] is True
    with pytest.raises(DatasetError, match="operating points"):
        run_recipe("xray-spine-unet-ap", TrainOptions(out=tmp_path, quick=True, progress=False,
                                                      validate_only=True))


def test_rule_out_point_keeps_sensitivity_on_every_cohort() -> None:
    """Below the rule-in point, the rule-out point keeps nine in ten positives of each
    cohort at or above it, unless that leaves fewer than half of some cohort's normals
    below it; never above the rule-in point."""
    from spine_node.inference.train.xray import rule_out_threshold

    classic = (np.array([0.01, 0.02, 0.03, 0.04, *np.linspace(0.5, 0.9, 10)]),
               np.array([0] * 4 + [1] * 10))
    context = (np.array([0.1, 0.12, 0.14, 0.16, *np.linspace(0.2, 0.9, 10)]),
               np.array([0] * 4 + [1] * 10))
    rule_out = rule_out_threshold([classic, context], rule_in=0.7)
    for scores, truth in (classic, context):
        assert (scores[truth == 1] >= rule_out).mean() >= 0.9
    assert rule_out == pytest.approx(0.2)
    # Positives scored like the normals: the floor on specificity raises the point.
    mixed = (np.array([0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.9]), np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    rule_out = rule_out_threshold([mixed], rule_in=0.8)
    assert (mixed[0][mixed[1] == 0] < rule_out).mean() >= 0.5
    assert rule_out_threshold([mixed], rule_in=0.15) == 0.15


def test_gate_phantoms_hide_the_airway_and_collimate_some_fields() -> None:
    """The gate must find the view in the spine: four in ten of its phantoms have a faint
    or no airway (only that changes in the volume), and about a third of its spine
    acquisitions are collimated on all four sides, smaller than its window, with bright
    blades or without. Cohorts without a share draw nothing (their phantoms stay as
    they were)."""
    from spine_node.inference import phantoms
    from spine_node.inference.train.xray import (
        GATE_COHORT,
        RADIOGRAPHIC_COHORT,
        framed_acquisition,
        gate_input,
    )

    fills = [GATE_COHORT.airway_hu(seed) for seed in range(400)]
    faint = np.array([hu > -1000.0 for hu in fills])
    assert 0.3 < faint.mean() < 0.5 and all(-900.0 <= hu <= 40.0 for hu, f in zip(fills, faint, strict=True) if f)
    assert {RADIOGRAPHIC_COHORT.airway_hu(seed) for seed in range(50)} == {-1000.0}

    air = phantoms.generate(7, spacing=2.0)
    filled = phantoms.generate(7, spacing=2.0, airway_hu=40.0)
    assert np.array_equal(air.labels, filled.labels)
    changed = air.hu != filled.hu
    # Only the airway changed: it was air (up to blur and noise at its edge) and is now soft.
    assert 200 < changed.sum() < 0.05 * changed.size
    assert np.median(air.hu[changed]) < -500 and np.median(filled.hu[changed]) > -100
    assert np.array_equal(phantoms.generate(7, spacing=2.0).hu, air.hu)

    integral = np.zeros((80, 64), np.float32)
    integral[10:70, 24:40] = 2.0  # a bright column
    shapes, blades = [], 0
    for k in range(20):
        rng = np.random.default_rng(k)
        cut = framed_acquisition(integral, 2.0, rng)
        shapes.append(cut.shape)
        window = gate_input(cut, (2.0, 2.0), (80, 64), 2.0)
        assert (window[0] == 0).all() and (window[-1] == 0).all()   # nothing beyond the field
        edge = np.concatenate([cut[0], cut[-1], cut[:, 0], cut[:, -1]])
        blades += bool(np.median(edge) > np.percentile(cut, 90))
    assert all(r < 80 and c < 64 for r, c in shapes)
    assert 5 <= blades <= 19  # blades bright inside the edges in most, cut off in some


def test_mirrored_validation_reads_average_an_image_and_its_mirror() -> None:
    """``onnx_predict(mirror=True)`` reads each image as it is and mirrored and averages,
    as the pipelines do for a card with ``test_time_flip``: an image and its mirror image
    get one score."""
    from spine_node.inference.train.xray import CSPINE_MODEL, ENGINES_DIR, ImageSet, onnx_predict

    rng = np.random.default_rng(5)
    image = rng.random((1, 1, 160, 128)).astype(np.float32)
    data = ImageSet(images=np.concatenate([image, image[..., ::-1]]), targets=np.zeros(2, int))
    path = ENGINES_DIR / CSPINE_MODEL / "model.onnx"
    single = onnx_predict(path, data)["probabilities"]
    both = onnx_predict(path, data, mirror=True)
    assert not np.allclose(single[0], single[1], atol=1e-4)
    np.testing.assert_allclose(both["probabilities"][0], both["probabilities"][1], atol=1e-5)
    np.testing.assert_allclose(both["probabilities"][0], single.mean(axis=0), atol=1e-5)
    # the saliency map of the mirror image, mirrored back, is the image's own
    np.testing.assert_allclose(both["saliency"][0], both["saliency"][1][..., ::-1], atol=1e-5)


def test_a_classifier_fine_tunes_and_averages_with_what_it_started_from(tmp_path: Path) -> None:
    """--init fine-tunes a classifier on the fine-tuning cohort and --average takes the mean
    of two models' weights; both validate and card as training does, name what they
    started from and move on a minor version. Segmenters, --data and one folder are refused."""
    import shutil

    import torch

    from spine_node.inference.train import xray as recipe

    first = tmp_path / "first"
    run_recipe("xray-cspine-classifier", TrainOptions(out=first, quick=True, threads=1, progress=False))
    tuned = tmp_path / "tuned"
    run_recipe("xray-cspine-classifier", TrainOptions(out=tuned, quick=True, threads=1,
                                                      progress=False, init=first))
    name = "xray-cspine-classifier"
    card = ModelCard.load(tuned / name)
    start = ModelCard.load(first / name)
    assert card.weights["fine_tuned_from"]["model_pt_sha256"] == recipe.file_sha256(first / name / "model.pt")
    assert card.weights["recipe"].endswith(f"--init {first}") and card.weights["operating_points"]
    assert card.version == recipe._next_minor([start.version])
    states = [torch.load(f / name / "model.pt", weights_only=True) for f in (first, tuned)]
    floating = [k for k, v in states[0].items() if v.is_floating_point()]
    assert any(not torch.equal(states[0][k], states[1][k]) for k in floating)

    mixed = tmp_path / "mixed"
    summary = run_recipe(name, TrainOptions(out=mixed, quick=True, threads=1, progress=False,
                                            average=(first, tuned)))
    assert summary["cards"] == [str(mixed / name / "model.yaml")]
    mean = torch.load(mixed / name / "model.pt", weights_only=True)
    for key in floating:
        assert torch.allclose(mean[key], (states[0][key] + states[1][key]) / 2, atol=1e-6)
    card = ModelCard.load(mixed / name)
    assert [s["model_pt_sha256"] for s in card.weights["averaged_from"]] == [
        recipe.file_sha256(f / name / "model.pt") for f in (first, tuned)]
    assert card.weights["averaged_from"][1]["fine_tuned_from"]["version"] == start.version
    assert card.trained_on.startswith("synthetic phantoms (spine-node inference.phantoms DRRs")

    with pytest.raises(DatasetError, match="X-ray classifiers"):
        run_recipe("xray-spine-unet-lat", TrainOptions(out=tmp_path / "x", quick=True, progress=False,
                                                       init=first))
    with pytest.raises(DatasetError, match="drop --data"):
        run_recipe(name, TrainOptions(out=tmp_path / "x", quick=True, progress=False, init=first,
                                      data=tmp_path))
    with pytest.raises(ValueError, match="at least two"):
        recipe.tune_recipe(name, tmp_path / "x", recipe.Plan(), average=(first,))
    broken = tmp_path / "broken"
    shutil.copytree(first, broken)
    states[0].pop(floating[0])
    torch.save(states[0], broken / name / "model.pt")
    with pytest.raises(ValueError, match="another architecture"):
        recipe.tune_recipe(name, tmp_path / "x", recipe.Plan(train_phantoms=8, heldout_phantoms=6,
                                                             steps=4), average=(first, broken))
