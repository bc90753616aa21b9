"""The committed X-ray demo weights: honest cards, physical grid and operating points, and
ONNX graphs that are the trained torch weights.

Accuracy on fresh cohorts (same generator, the independent evaluation generator, a
perturbation, junk) is tested through the pipelines in ``test_xray_eval.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
if not (__import__("spine_node.engines", fromlist=["ENGINES_DIR"]).ENGINES_DIR
        / "xray-view-gate" / "model.yaml").is_file():
    pytest.skip("engines/ has no xray-view-gate (weights predate the mm grid): "
                "spine-node train xray", allow_module_level=True)

from spine_node.engines import ENGINES_DIR  # noqa: E402
from spine_node.inference.card import ModelCard  # noqa: E402
from tests.peers import require_module  # noqa: E402
from tests.xray_engines import OrtModels  # noqa: E402

CLASSIFIERS = {"xray-pair-classifier": {"damage": ("pair",)},
               "xray-fracture-mobilenet": {"fracture": ("AP", "LAT")},
               "xray-cspine-classifier": {"fracture": ("LAT",), "dislocation": ("LAT",)}}
SEGMENTERS = ("xray-spine-unet-ap", "xray-spine-unet-lat", "xray-tissue-xnet")
MODELS = (*CLASSIFIERS, *SEGMENTERS, "xray-view-gate")


@pytest.fixture(scope="module")
def models() -> OrtModels:
    return OrtModels()


def _grid_card(name: str) -> bool:
    """Weights trained on the mm grid (randomised acquisitions, operating points); the
    others are the earlier whole-image weights, which the pipelines resize as before."""
    return "grid_mm" in ModelCard.load(ENGINES_DIR / name).preprocessing


@pytest.mark.parametrize("name", MODELS)
def test_cards_are_honest_and_small(name: str) -> None:
    card = ModelCard.load(ENGINES_DIR / name)
    assert card.name == name
    assert card.clinical_use is False
    assert "not for clinical use" in card.intended_use.lower()
    assert card.trained_on.startswith("synthetic phantoms (spine-node inference.phantoms DRRs")
    assert card.weights["metrics"]
    assert card.onnx_path.stat().st_size < 10_000_000
    assert (card.folder / "model.pt").stat().st_size < 10_000_000


@pytest.mark.parametrize("name", MODELS)
def test_cards_state_the_grid_and_views(name: str) -> None:
    """Grid-trained cards state grid, field and views (the gate always is); an earlier
    card states none of them and is read whole-image by the pipelines."""
    from spine_node.inference.pipelines.xray import _grid_mm

    card = ModelCard.load(ENGINES_DIR / name)
    if not _grid_card(name):
        assert name != "xray-view-gate"
        assert _grid_mm(card) is None and "randomised acquisitions" not in card.trained_on
        return
    assert "randomised acquisitions" in card.trained_on
    grid = card.preprocessing["grid_mm"]
    size = card.preprocessing["size"]
    assert grid in (1.0, 2.0)
    assert card.preprocessing["field_mm"] == [size[0] * grid, size[1] * grid]
    assert set(card.preprocessing["views"]) <= {"AP", "LAT", "other"}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_cards_carry_operating_points_or_take_the_whole_image(name: str) -> None:
    """A grid-trained classifier card has per-view operating points; an earlier one has
    neither grid nor points and the pipelines read it as before (whole image, 0.5)."""
    from spine_node.inference.pipelines.xray import _grid_mm, card_views, operating_threshold

    card = ModelCard.load(ENGINES_DIR / name)
    if not _grid_card(name):
        assert _grid_mm(card) is None and "operating_points" not in card.weights
        assert all(operating_threshold(card, kind, view) == 0.5
                   for kind, views in CLASSIFIERS[name].items() for view in views)
        assert card_views(card) == (("LAT",) if name == "xray-cspine-classifier" else ("AP", "LAT"))
        return
    points = card.weights["operating_points"]
    for kind, views in CLASSIFIERS[name].items():
        for view in views:
            point = points[kind][view]
            assert 0.0 < point["threshold"] < 1.0
            assert point["n_positive"] > 0 and point["n_negative"] > 0
            for key in ("sensitivity", "specificity"):
                low, high = point[f"{key}_ci95"]
                assert low <= point[key] <= high
            # Chosen on both validation cohorts, with a rule-out point below (indeterminate band).
            assert set(point["parts"]) == {"classic", "context"}
            assert 0.0 < point["rule_out_threshold"] <= point["threshold"]
            for cohort, part in point["rule_out"].items():
                assert part["sensitivity"] >= point["parts"][cohort]["sensitivity"]


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_the_torch_weights(models: OrtModels, name: str) -> None:
    """The exported graph is the trained model: same outputs as model.pt in torch."""
    torch = require_module("torch")
    from spine_node.inference.models import architecture

    card = models(name).card
    module = architecture(card.weights["architecture"]["name"],
                          **card.weights["architecture"]["kwargs"])
    module.load_state_dict(torch.load(card.folder / "model.pt", weights_only=True))
    module.eval()
    rng = np.random.default_rng(0)
    size = card.preprocessing["size"]
    rows = np.linspace(0, 1, size[0])[:, None]
    smooth = (0.5 + 0.4 * np.sin(6 * rows) * np.cos(np.linspace(0, 5, size[1]))[None, :])
    batch = np.stack([np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1)[None]
                      for _ in range(3)]).astype(np.float32)
    feed = {spec.name: batch for spec in card.inputs}
    expected = models(name).infer(feed)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feed[spec.name]) for spec in card.inputs])
    got = got if isinstance(got, tuple) else (got,)
    for spec, value in zip(card.outputs, got, strict=True):
        np.testing.assert_allclose(value.numpy(), expected[spec.name], atol=1e-4)
