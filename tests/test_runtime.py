"""Engine runtime: model repository, backends, selection, parity, tiling, CLI.

Small real torch models are built here, exported to ONNX and written into a temporary
engines folder with cards; every backend must reproduce the torch module's outputs
within :data:`spine_node.inference.runtime.base.PARITY_TOLERANCE`. The TensorRT twins run the same
assertion and are skipped, with the reason, where there is no GPU or no tensorrt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.peers import require_module

torch = require_module("torch")
require_module("onnx")

from torch import nn  # noqa: E402

import spine_node.inference.models as architectures  # noqa: E402
from spine_node.inference.card import ModelCard, ModelCardError  # noqa: E402
from spine_node.inference.repository import (  # noqa: E402
    ModelImportError,
    ModelNotFoundError,
    ModelRepository,
    import_model,
)
from spine_node.inference.runtime import (  # noqa: E402
    EngineError,
    EngineInputError,
    EngineOptions,
    EngineProvider,
    EngineUnavailable,
    NoEngineAvailable,
    load_engine,
)
from spine_node.inference.runtime.base import Engine, parity_tolerance  # noqa: E402
from spine_node.inference.runtime.tiling import (  # noqa: E402
    argmax_labels,
    sliding_window_inference,
    window_grid,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# dynamo=False is the TorchScript exporter: deterministic, no extra dependencies, and
# what the model recipes use; torch warns that it is legacy.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]


# -- small real models ---------------------------------------------------------------------


@architectures.register("test-classifier2d")
class Classifier2d(nn.Module):
    """Conv + BN + pool + linear head with softmax: a radiograph classifier in miniature."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(image).flatten(1)), dim=1)


@architectures.register("test-seg3d")
class Seg3d(nn.Module):
    """Two 3x3x3 convolutions: fully convolutional, receptive radius 2."""

    def __init__(self, classes: int = 3, kernel: int = 3) -> None:
        super().__init__()
        pad = kernel // 2
        self.a = nn.Conv3d(1, 6, kernel, padding=pad)
        self.b = nn.Conv3d(6, classes, kernel, padding=pad)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(image)))


def _card(name: str, task: str, inputs: list, outputs: list, labels: dict,  # type: ignore[type-arg]
          architecture: dict | None = None) -> dict[str, Any]:  # type: ignore[type-arg]
    card: dict[str, Any] = {
        "name": name,
        "version": "0.1.0",
        "task": task,
        "description": "test fixture exported by tests/test_runtime.py",
        "inputs": inputs,
        "outputs": outputs,
        "labels": labels,
        "preprocessing": {},
        "weights": {"trained_on": "nothing: seeded initial weights of a test fixture",
                    "recipe": "tests/test_runtime.py"},
        "intended_use": "tests only",
        "clinical_use": False,
    }
    if architecture is not None:
        card["architecture"] = architecture
    return card


def export(
    folder: Path,
    module: nn.Module,
    example: torch.Tensor,
    card: dict[str, Any],
    dynamic_axes: dict[str, dict[int, str]],
    *,
    state_dict: bool = True,
) -> Path:
    """Export ``module`` to ``folder/model.onnx`` with its card (and state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    module.eval()
    torch.onnx.export(
        module, (example,), str(folder / "model.onnx"),
        input_names=[t["name"] for t in card["inputs"]],
        output_names=[t["name"] for t in card["outputs"]],
        dynamic_axes=dynamic_axes, opset_version=17, dynamo=False,
    )
    if state_dict:
        torch.save(module.state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")
    return folder


def _seeded(factory: Any, seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    module = factory(**kwargs)
    # Non-trivial BatchNorm statistics so the exported graph folds real values.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return module.eval()


SEG_DYNAMIC = {"image": {0: "batch", 2: "z", 3: "y", 4: "x"},
               "logits": {0: "batch", 2: "z", 3: "y", 4: "x"}}


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with four small real models."""
    root = tmp_path_factory.mktemp("engines")
    cls_arch = {"name": "test-classifier2d", "kwargs": {"classes": 3}}
    export(
        root / "cls2d", _seeded(Classifier2d, 1, classes=3), torch.zeros(2, 1, 64, 64),
        _card("cls2d", "classification",
              [{"name": "image", "shape": [-1, 1, 64, 64]}],
              [{"name": "probabilities", "shape": [-1, 3]}],
              {0: "normal", 1: "fracture", 2: "dislocation"}, cls_arch),
        {"image": {0: "batch"}, "probabilities": {0: "batch"}},
    )
    seg_arch = {"name": "test-seg3d", "kwargs": {"classes": 3}}
    labels = {0: "background", 1: "C1", 2: "C2"}
    export(
        root / "seg3d", _seeded(Seg3d, 2, classes=3), torch.zeros(1, 1, 16, 16, 16),
        _card("seg3d", "segmentation",
              [{"name": "image", "shape": [-1, 1, -1, -1, -1]}],
              [{"name": "logits", "shape": [-1, 3, -1, -1, -1]}], labels, seg_arch),
        SEG_DYNAMIC,
    )
    export(
        root / "seg3d-fixed", _seeded(Seg3d, 2, classes=3), torch.zeros(1, 1, 16, 24, 24),
        _card("seg3d-fixed", "segmentation",
              [{"name": "image", "shape": [-1, 1, 16, 24, 24]}],
              [{"name": "logits", "shape": [-1, 3, 16, 24, 24]}], labels, seg_arch),
        {"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    export(
        root / "seg3d-onnx-only", _seeded(Seg3d, 3, classes=3), torch.zeros(1, 1, 16, 16, 16),
        _card("seg3d-onnx-only", "segmentation",
              [{"name": "image", "shape": [-1, 1, -1, -1, -1]}],
              [{"name": "logits", "shape": [-1, 3, -1, -1, -1]}], labels),
        SEG_DYNAMIC, state_dict=False,
    )
    return root


def reference(engines_dir: Path, name: str) -> nn.Module:
    """The torch module a model folder was exported from, rebuilt from its state dict."""
    card = ModelCard.load(engines_dir / name)
    assert card.architecture is not None
    module = architectures.architecture(card.architecture["name"],
                                        **card.architecture["kwargs"])
    module.load_state_dict(torch.load(card.state_dict_path, weights_only=True))
    return module.eval()


def example_inputs(card: ModelCard, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spatial = {4: (64, 64), 5: (16, 24, 24)}
    inputs = {}
    for spec in card.inputs:
        shape = [3 if axis == 0 and d == -1 else d for axis, d in enumerate(spec.shape)]
        dynamic = [i for i, d in enumerate(shape) if d == -1]
        for i, size in zip(dynamic, spatial[len(shape)][-len(dynamic):], strict=False):
            shape[i] = size
        inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return inputs


def assert_parity(engine: Engine, module: nn.Module, inputs: dict[str, np.ndarray]) -> None:
    """The engine's outputs equal the torch module's within the backend's tolerance."""
    rtol, atol = parity_tolerance(engine.backend)
    with torch.inference_mode():
        expected = module(*[torch.from_numpy(inputs[s.name]) for s in engine.card.inputs])
    expected_outputs = {engine.card.outputs[0].name: expected.numpy()}
    got = engine.infer(inputs)
    assert set(got) == set(expected_outputs)
    for name, want in expected_outputs.items():
        assert got[name].shape == want.shape
        np.testing.assert_allclose(got[name], want, rtol=rtol, atol=atol,
                                   err_msg=f"{engine.backend} vs torch, output {name}")


PARITY_MODELS = ["cls2d", "seg3d-fixed"]


# -- parity: every backend against torch eager ---------------------------------------------


@pytest.mark.parametrize("name", PARITY_MODELS + ["seg3d"])
def test_onnxruntime_cpu_matches_torch(engines_dir: Path, name: str) -> None:
    engine = load_engine(name, engines_dir, backends=["onnxruntime-cpu"])
    assert engine.backend == "onnxruntime-cpu"
    assert_parity(engine, reference(engines_dir, name), example_inputs(engine.card))


@pytest.mark.parametrize("name", PARITY_MODELS)
def test_torch_backend_matches_torch(engines_dir: Path, name: str) -> None:
    engine = load_engine(name, engines_dir, backends=["torch-cpu"])
    assert engine.backend == "torch-cpu"
    assert_parity(engine, reference(engines_dir, name), example_inputs(engine.card))


@pytest.mark.gpu
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_tensorrt_matches_torch(engines_dir: Path, name: str, tmp_path: Path) -> None:
    from spine_node.inference.runtime.tensorrt_backend import TensorRTEngine

    card = ModelRepository(engines_dir).card(name)
    try:
        engine = TensorRTEngine.load(card, EngineOptions(plans_dir=tmp_path, progress=False))
    except EngineUnavailable as exc:
        pytest.skip(f"TensorRT unavailable here: {exc}")
    assert engine.backend in ("tensorrt-fp16", "tensorrt-fp32")
    assert_parity(engine, reference(engines_dir, name), example_inputs(engine.card))
    # The cached plan is reused (no rebuild) and carries its sidecar.
    sidecar = json.loads(engine.plan.with_suffix(".json").read_text())
    assert sidecar["tensorrt_version"] in engine.plan.name
    again = TensorRTEngine.load(card, EngineOptions(plans_dir=tmp_path, progress=False))
    assert again.plan == engine.plan
    assert_parity(again, reference(engines_dir, name), example_inputs(engine.card, seed=1))


# -- selection and fallback ----------------------------------------------------------------


def test_default_order_falls_back_with_reasons(engines_dir: Path) -> None:
    engine = load_engine("cls2d", engines_dir)
    if engine.backend.startswith("tensorrt"):
        pytest.skip("TensorRT is available here, so nothing falls back")
    assert engine.backend in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert "tensorrt" in engine.skipped
    assert engine.skipped["tensorrt"]  # a reason, not an empty string


def test_order_is_respected(engines_dir: Path) -> None:
    assert load_engine("cls2d", engines_dir, backends=["torch", "onnxruntime"]).backend \
        .startswith("torch-")
    assert load_engine("cls2d", engines_dir, backends=["onnxruntime", "torch"]).backend \
        .startswith("onnxruntime-")


def test_torch_skipped_without_state_dict_or_architecture(engines_dir: Path) -> None:
    engine = load_engine("seg3d-onnx-only", engines_dir, backends=["torch", "onnxruntime-cpu"])
    assert engine.backend == "onnxruntime-cpu"
    assert "architecture" in engine.skipped["torch"]


def test_no_backend_lists_every_reason(engines_dir: Path) -> None:
    with pytest.raises(NoEngineAvailable) as info:
        load_engine("seg3d-onnx-only", engines_dir, backends=["torch"])
    assert set(info.value.reasons) == {"torch"}
    assert "seg3d-onnx-only" in str(info.value) and "architecture" in str(info.value)


def test_cuda_only_backends_are_skipped_on_a_cpu_box(engines_dir: Path) -> None:
    import onnxruntime as ort

    if torch.cuda.is_available() or "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    engine = load_engine("cls2d", engines_dir,
                         backends=["tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime"])
    assert engine.backend == "onnxruntime-cpu"
    assert list(engine.skipped) == ["tensorrt", "onnxruntime-cuda", "torch-cuda"]
    assert "CUDAExecutionProvider" in engine.skipped["onnxruntime-cuda"]
    assert "CUDA" in engine.skipped["torch-cuda"]


def test_unknown_backend_name_is_rejected(engines_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown backend 'openvino'.*onnxruntime-cpu"):
        load_engine("cls2d", engines_dir, backends=["openvino"])


def test_broken_model_is_an_error_not_a_fallback(engines_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cls2d"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((engines_dir / "cls2d" / "model.onnx").read_bytes())
    card = yaml.safe_load((engines_dir / "cls2d" / "model.yaml").read_text())
    card["inputs"][0]["shape"] = [-1, 1, 32, 32]  # the graph takes 64 x 64
    (folder / "model.yaml").write_text(yaml.safe_dump(card))
    with pytest.raises(EngineError, match="axis 2 is 32 in the card but 64"):
        load_engine("cls2d", tmp_path, backends=["onnxruntime-cpu", "torch"])


def test_provider_caches_engines(engines_dir: Path) -> None:
    provider = EngineProvider(engines_dir, backends=["onnxruntime-cpu"])
    first = provider("cls2d")
    assert provider("cls2d") is first
    assert provider.loaded() == {"cls2d": "onnxruntime-cpu"}
    info = first.model_info()
    assert (info.name, info.backend, info.clinical_use) == ("cls2d", "onnxruntime-cpu", False)
    assert "sha256:" in info.weights and info.trained_on.startswith("nothing")
    with pytest.raises(ModelNotFoundError, match="no model 'missing'.*cls2d"):
        provider("missing")
    provider.close()
    assert provider.loaded() == {}


def test_provider_from_settings(engines_dir: Path) -> None:
    from spine_node.node.config import load_settings

    settings = load_settings(worker={"engines_dir": str(engines_dir),
                                     "backends": ["torch-cpu", "onnxruntime-cpu"]})
    provider = EngineProvider.from_settings(settings)
    assert provider("cls2d").backend == "torch-cpu"
    assert provider("seg3d-onnx-only").backend == "onnxruntime-cpu"
    assert provider.options.threads is None  # all cores of the host


def test_engine_threads_setting_caps_onnxruntime_threads(engines_dir: Path) -> None:
    from spine_node.node.config import load_settings

    settings = load_settings(worker={"engines_dir": str(engines_dir), "backends": ["onnxruntime-cpu"],
                                     "engine_threads": 1})
    engine = EngineProvider.from_settings(settings)("seg3d-onnx-only")
    session = engine._session  # type: ignore[attr-defined]
    assert session.get_session_options().intra_op_num_threads == 1


def test_engine_checks_inputs_against_card(engines_dir: Path) -> None:
    engine = load_engine("cls2d", engines_dir, backends=["onnxruntime-cpu"])
    good = np.zeros((1, 1, 64, 64), np.float32)
    with pytest.raises(EngineInputError, match="no input"):
        engine.infer({"img": good})
    with pytest.raises(EngineInputError, match="rank 4"):
        engine.infer({"image": good[0]})
    with pytest.raises(EngineInputError, match="axis 3 must be 64"):
        engine.infer({"image": np.zeros((1, 1, 64, 32), np.float32)})
    with pytest.raises(EngineInputError, match="no safe cast"):
        engine.infer({"image": np.zeros((1, 1, 64, 64), np.complex64)})
    # An int16 image (CT-like) is cast to the card's float32.
    out = engine.infer({"image": np.ones((2, 1, 64, 64), np.int16)})["probabilities"]
    assert out.shape == (2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)


# -- cards and the repository --------------------------------------------------------------


def _valid_card() -> dict[str, Any]:
    return _card("demo", "classification", [{"name": "image", "shape": [-1, 1, 64, 64]}],
                 [{"name": "probabilities", "shape": [-1, 2]}], {0: "normal", 1: "fracture"})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c.pop("task"), "'task'"),
        (lambda c: c.update(task="colouring"), "task 'colouring'"),
        (lambda c: c.update(name="Demo Model"), "invalid name"),
        (lambda c: c["inputs"][0].update(shape=[1, 0, 64]), "inputs[0].shape"),
        (lambda c: c["outputs"][0].update(dtype="float128"), "outputs[0].dtype"),
        (lambda c: c.update(outputs=[{"name": "p", "shape": [1]}, {"name": "p", "shape": [1]}]),
         "duplicate tensor names"),
        (lambda c: c["weights"].pop("trained_on"), "weights.trained_on"),
        (lambda c: c.update(clinical_use="no"), "clinical_use"),
        (lambda c: c.update(architecture={"name": "Bad Name"}), "architecture.name"),
        (lambda c: c.update(architecture={"name": "x", "kwarg": {}}), "architecture has unknown"),
        (lambda c: c.update(labels={"zero": "normal"}), "labels"),
    ],
)
def test_card_errors_name_the_field(change: Any, field: str) -> None:
    data = _valid_card()
    change(data)
    with pytest.raises(ModelCardError) as info:
        ModelCard.from_dict(data, Path("engines/demo"))
    assert field in str(info.value)
    assert "engines/demo/model.yaml" in str(info.value)


def test_card_round_trips_with_architecture(tmp_path: Path) -> None:
    data = _valid_card()
    data["architecture"] = "test-classifier2d"
    card = ModelCard.from_dict(data, tmp_path)
    assert card.architecture == {"name": "test-classifier2d", "kwargs": {}}
    card.save(tmp_path)
    assert ModelCard.load(tmp_path) == card
    assert card.input().name == "image"
    with pytest.raises(ModelCardError, match="no output 'logits'"):
        card.output("logits")


def test_repository_lists_and_validates(engines_dir: Path, tmp_path: Path) -> None:
    repo = ModelRepository(engines_dir)
    assert repo.names() == ["cls2d", "seg3d", "seg3d-fixed", "seg3d-onnx-only"]
    assert [r.name for r in repo.validate_all() if not r.ok] == []
    assert "seg3d" in repo and "nothing" not in repo

    # A card that promises a dynamic axis the graph fixes, and a folder/name mismatch.
    broken = tmp_path / "engines"
    (broken / "cls2d").mkdir(parents=True)
    (broken / "cls2d" / "model.onnx").write_bytes((engines_dir / "cls2d" / "model.onnx")
                                                  .read_bytes())
    card = yaml.safe_load((engines_dir / "cls2d" / "model.yaml").read_text())
    card["inputs"][0]["shape"] = [-1, 1, -1, 64]
    (broken / "cls2d" / "model.yaml").write_text(yaml.safe_dump(card))
    (broken / "renamed").mkdir()
    (broken / "renamed" / "model.yaml").write_text(yaml.safe_dump(card))
    reports = {r.folder.name: r for r in ModelRepository(broken).validate_all()}
    assert not reports["cls2d"].ok
    assert "axis 2 is dynamic (-1) in the card but fixed (64)" in reports["cls2d"].problems[0]
    assert "differs from its folder name 'renamed'" in reports["renamed"].problems[0]
    with pytest.raises(ModelNotFoundError, match="known: cls2d, renamed"):
        ModelRepository(broken).card("seg3d")


def test_import_model_checks_the_onnx_against_the_card(engines_dir: Path,
                                                      tmp_path: Path) -> None:
    source = engines_dir / "seg3d"
    target = tmp_path / "repo"
    card = import_model(source / "model.onnx", source / "model.yaml", target,
                        state_dict=source / "model.pt")
    assert card.folder == target / "seg3d"
    assert sorted(p.name for p in card.folder.iterdir()) == ["model.onnx", "model.pt",
                                                             "model.yaml"]
    assert ModelRepository(target).validate("seg3d").ok
    with pytest.raises(ModelImportError, match="already exists"):
        import_model(source / "model.onnx", source / "model.yaml", target)
    import_model(source / "model.onnx", source / "model.yaml", target, replace=True)

    wrong = yaml.safe_load((source / "model.yaml").read_text())
    wrong["name"] = "seg3d-wrong"
    wrong["outputs"][0]["name"] = "scores"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises(ModelImportError, match=r"card names \['scores'\] but ONNX has"):
        import_model(source / "model.onnx", tmp_path / "wrong.yaml", target)
    assert not (target / "seg3d-wrong").exists()
    assert [p.name for p in target.iterdir()] == ["seg3d"]  # no staging left behind

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelImportError, match="not a valid ONNX model"):
        import_model(tmp_path / "junk.onnx", source / "model.yaml", tmp_path / "other")


def test_import_model_with_external_data(engines_dir: Path, tmp_path: Path) -> None:
    import onnx

    source = tmp_path / "source"
    source.mkdir()
    model = onnx.load(str(engines_dir / "cls2d" / "model.onnx"))
    onnx.save_model(model, str(source / "exported.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="exported.weights",
                    size_threshold=0)
    card = import_model(source / "exported.onnx", engines_dir / "cls2d" / "model.yaml",
                        tmp_path / "repo")
    assert (card.folder / "exported.weights").is_file()
    assert ModelRepository(tmp_path / "repo").validate("cls2d").ok
    engine = load_engine(card, backends=["onnxruntime-cpu"])
    assert_parity(engine, reference(engines_dir, "cls2d"), example_inputs(card))


def test_packaged_models_validate() -> None:
    """Whatever models the project ships in engines/ must match their cards."""
    problems = {r.name: r.problems for r in ModelRepository().validate_all() if not r.ok}
    assert problems == {}


# -- TensorRT plan cache logic (no GPU needed) ---------------------------------------------


def test_tensorrt_plan_naming_profiles_and_staleness(engines_dir: Path, tmp_path: Path) -> None:
    from spine_node.inference.runtime import tensorrt_backend as trt_backend

    card = ModelRepository(engines_dir).card("seg3d-fixed")
    files = trt_backend.plan_files(card, (8, 9), "10.3.0", "fp16")
    assert files.plan == engines_dir / "seg3d-fixed" / "plans" / \
        "seg3d-fixed.sm89.trt10.3.0.fp16.plan"
    assert files.sidecar.name == "seg3d-fixed.sm89.trt10.3.0.fp16.json"

    options = EngineOptions(max_batch=4, opt_batch=2)
    profiles = trt_backend.optimisation_profiles(card, options)
    assert profiles == {"image": ((1, 1, 16, 24, 24), (2, 1, 16, 24, 24), (4, 1, 16, 24, 24))}
    dynamic = ModelRepository(engines_dir).card("seg3d")
    with pytest.raises(EngineUnavailable, match="dynamic axes \\[0, 2, 3, 4\\]"):
        trt_backend.optimisation_profiles(dynamic, options)
    given = {"image": ((1, 1, 8, 8, 8), (1, 1, 16, 16, 16), (2, 1, 32, 32, 32))}
    assert trt_backend.optimisation_profiles(
        dynamic, EngineOptions(shape_profiles=given))["image"] == given["image"]

    assert trt_backend.choose_precision("auto", (9, 0)) == "fp16"
    assert trt_backend.choose_precision("auto", (6, 1)) == "fp32"
    assert trt_backend.choose_precision("fp32", (9, 0)) == "fp32"
    with pytest.raises(EngineUnavailable, match="no fast FP16"):
        trt_backend.choose_precision("fp16", (6, 1))

    files = trt_backend.plan_files(card, (8, 9), "10.3.0", "fp16", tmp_path)
    expected = trt_backend.expected_sidecar(card, "a" * 64, "10.3.0", (8, 9), "fp16", profiles)
    assert trt_backend.stale_reason(files, expected) == "no cached plan"
    files.plan.write_bytes(b"plan")
    files.sidecar.write_text(json.dumps(expected))
    assert trt_backend.stale_reason(files, expected) is None
    changed = dict(expected, onnx_sha256="b" * 64)
    assert "onnx_sha256 changed" in str(trt_backend.stale_reason(files, changed))
    changed = dict(expected, tensorrt_version="10.4.0")
    assert "tensorrt_version changed" in str(trt_backend.stale_reason(files, changed))


# -- tiling ----------------------------------------------------------------------------------


def test_tiled_equals_whole_volume_away_from_window_edges(engines_dir: Path) -> None:
    engine = load_engine("seg3d", engines_dir, backends=["onnxruntime-cpu"])
    volume = np.random.default_rng(5).standard_normal((37, 45, 52)).astype(np.float32)
    whole = engine.infer({"image": volume[None, None]})["logits"][0]
    tiled = sliding_window_inference(engine, volume, (20, 24, 24), overlap=0.5,
                                     batch_size=3)
    assert tiled.shape == whole.shape and tiled.dtype == np.float32
    # Inside, a window's own edges (receptive radius 2) see zero padding instead of the
    # volume; the Gaussian down-weights them and the neighbours dominate: equal within a
    # small tolerance. A window edge on the volume border sees what the whole run sees,
    # and is not down-weighted: the corner covered by one window alone is exact.
    scale = float(np.abs(whole).max())
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-3 * scale)
    corner = (slice(None), slice(0, 6), slice(0, 6), slice(0, 6))
    np.testing.assert_allclose(tiled[corner], whole[corner], rtol=0, atol=1e-5 * scale)
    labels = sliding_window_inference(engine, volume, (20, 24, 24), overlap=0.5,
                                      batch_size=4, reduce=argmax_labels)
    assert labels.dtype == np.uint8
    assert (labels == whole.argmax(axis=0)).mean() > 0.999


@pytest.mark.parametrize("blend", ["gaussian", "linear", "constant"])
def test_pointwise_model_is_exact_for_every_blend(tmp_path: Path, blend: str) -> None:
    module = _seeded(Seg3d, 7, classes=2, kernel=1)
    export(tmp_path / "pointwise", module, torch.zeros(1, 1, 8, 8, 8),
           _card("pointwise", "segmentation", [{"name": "image", "shape": [-1, 1, 8, 8, 8]}],
                 [{"name": "logits", "shape": [-1, 2, 8, 8, 8]}], {0: "a", 1: "b"}),
           {"image": {0: "batch"}, "logits": {0: "batch"}}, state_dict=False)
    engine = load_engine("pointwise", tmp_path, backends=["onnxruntime-cpu"])
    volume = np.random.default_rng(1).integers(-1000, 2000, (19, 5, 23)).astype(np.int16)
    tiled = sliding_window_inference(engine, volume, overlap=0.3, blend=blend,  # type: ignore[arg-type]
                                     batch_size=5)
    with torch.inference_mode():
        whole = module(torch.from_numpy(volume.astype(np.float32))[None, None])[0].numpy()
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-3)  # values ~ 1e3


@pytest.fixture(scope="module")
def pointwise_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, nn.Module]:
    """A 1x1x1-kernel net with dynamic spatial axes: tiling must not change its output."""
    root = tmp_path_factory.mktemp("pointwise")
    module = _seeded(Seg3d, 11, classes=3, kernel=1)
    export(root / "pointwise-dyn", module, torch.zeros(1, 1, 4, 4, 4),
           _card("pointwise-dyn", "segmentation",
                 [{"name": "image", "shape": [-1, 1, -1, -1, -1]}],
                 [{"name": "logits", "shape": [-1, 3, -1, -1, -1]}], {0: "a", 1: "b", 2: "c"}),
           SEG_DYNAMIC, state_dict=False)
    return load_engine("pointwise-dyn", root, backends=["onnxruntime-cpu"]), module


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 23)] * 3),
    window=st.tuples(*[st.integers(1, 9)] * 3),
    overlap=st.floats(0.0, 0.9),
    blend=st.sampled_from(["gaussian", "linear", "constant"]),
    batch=st.integers(1, 4),
)
def test_tiling_any_grid_is_exact_for_a_pointwise_model(
    pointwise_engine: tuple[Engine, nn.Module], shape: tuple[int, int, int],
    window: tuple[int, int, int], overlap: float, blend: str, batch: int,
) -> None:
    engine, module = pointwise_engine
    volume = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    tiled = sliding_window_inference(engine, volume, window, overlap=overlap,
                                     blend=blend, batch_size=batch)  # type: ignore[arg-type]
    with torch.inference_mode():
        whole = module(torch.from_numpy(volume)[None, None])[0].numpy()
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5)


def test_fixed_batch_and_grid(engines_dir: Path) -> None:
    grid = window_grid((600, 512, 512), (64, 160, 160), 0.25)
    assert grid.starts[0][0] == 0 and grid.starts[0][-1] == 600 - 64
    assert all(b - a <= 64 * 0.75 for a, b in zip(grid.starts[0], grid.starts[0][1:],
                                                   strict=False))
    assert len(grid) == len(grid.starts[0]) * len(grid.starts[1]) * len(grid.starts[2])
    scores = np.random.default_rng(2).standard_normal((5, 4, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(argmax_labels(scores), scores.argmax(axis=0))
    engine = load_engine("seg3d-fixed", engines_dir, backends=["onnxruntime-cpu"])
    volume = np.random.default_rng(3).standard_normal((30, 40, 50)).astype(np.float32)
    out = sliding_window_inference(engine, volume, batch_size=2)  # window from the card
    assert out.shape == (3, 30, 40, 50)
    with pytest.raises(ValueError, match="does not fit the model input"):
        sliding_window_inference(engine, volume, (16, 16, 16))


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from spine_node.inference.runtime import load_engine
    from spine_node.inference.runtime.tiling import argmax_labels, sliding_window_inference

    engine = load_engine("conv1", sys.argv[1], backends=["onnxruntime-cpu"])
    volume = np.empty((600, 512, 512), np.float32)   # a 512 x 512 x 600 CT, as float32
    volume[:] = 0.25
    volume[::7] = 1.0
    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = peak_mb()
    labels = sliding_window_inference(engine, volume, overlap=0.0, batch_size=2,
                                      reduce=argmax_labels)
    print(json.dumps({"peak_increase_mb": peak_mb() - before,
                      "volume_mb": volume.nbytes / 2**20,
                      "labels_mb": labels.nbytes / 2**20,
                      "shape": list(labels.shape), "positive": int(labels.sum())}))
""")


def test_tiling_memory_is_bounded_for_a_full_ct(tmp_path: Path) -> None:
    """A 512 x 512 x 600 float32 volume through a one-layer conv net in windows.

    The increase in peak RSS is bounded by the uint8 label volume plus a slab of the
    float accumulator (window depth x 512 x 512 per class), far below what a full-size
    float prediction per class (2 x 600 MB here) would take. Run in a subprocess so the
    peak is this test's own.
    """
    module = nn.Conv3d(1, 2, 3, padding=1)
    torch.manual_seed(0)
    nn.init.normal_(module.weight, std=0.2)
    window = [32, 256, 256]
    export(tmp_path / "conv1", module.eval(), torch.zeros(1, 1, *window),
           _card("conv1", "segmentation", [{"name": "image", "shape": [-1, 1, *window]}],
                 [{"name": "logits", "shape": [-1, 2, *window]}], {0: "a", 1: "b"}),
           {"image": {0: "batch"}, "logits": {0: "batch"}}, state_dict=False)
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["shape"] == [600, 512, 512]
    assert figures["positive"] > 0
    slab_mb = 2 * window[0] * 512 * 512 * 4 / 2**20  # accumulator: classes x depth x 512^2
    bound = figures["labels_mb"] + 2.5 * slab_mb + 100
    assert figures["peak_increase_mb"] < bound, figures
    assert figures["peak_increase_mb"] < 0.75 * figures["volume_mb"], figures


# -- the CLI, end to end -----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), COLUMNS="200")
    env.pop("SPINE_NODE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "spine_node.node.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_import_list_show_validate(engines_dir: Path, tmp_path: Path) -> None:
    target = str(tmp_path / "repo")
    source = engines_dir / "cls2d"
    done = _cli("models", "import", str(source / "model.onnx"), "--card",
                str(source / "model.yaml"), "--engines-dir", target)
    assert done.returncode == 0, done.stderr
    assert "imported cls2d version 0.1.0" in done.stdout
    assert "NOT FOR CLINICAL USE" in done.stdout

    done = _cli("models", "list", "--engines-dir", target)
    assert done.returncode == 0, done.stderr
    assert "cls2d" in done.stdout and "NOT FOR CLINICAL USE" in done.stdout

    done = _cli("models", "show", "cls2d", "--engines-dir", target)
    assert done.returncode == 0, done.stderr
    for text in ("provenance", "trained_on", "tests/test_runtime.py", "probabilities",
                 "NOT FOR CLINICAL USE", "sha256"):
        assert text in done.stdout, text

    done = _cli("models", "validate", "--engines-dir", target)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout

    # A card that does not match the graph is refused with the reason, nothing copied.
    wrong = yaml.safe_load((source / "model.yaml").read_text())
    wrong["name"] = "cls2d-wrong"
    wrong["inputs"][0]["dtype"] = "uint8"
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    done = _cli("models", "import", str(source / "model.onnx"), "--card",
                str(tmp_path / "wrong.yaml"), "--engines-dir", target)
    assert done.returncode == 2
    assert "card dtype uint8 but ONNX dtype float32" in done.stderr
    assert not (tmp_path / "repo" / "cls2d-wrong").exists()

    # A model broken after import fails validation (exit 1) and names the problem.
    card_file = tmp_path / "repo" / "cls2d" / "model.yaml"
    card_file.write_text(card_file.read_text().replace("probabilities", "scores"))
    done = _cli("models", "validate", "cls2d", "--engines-dir", target)
    assert done.returncode == 1
    assert "invalid" in done.stdout and "scores" in done.stdout

    done = _cli("models", "show", "nothing", "--engines-dir", target)
    assert done.returncode == 2 and "no model 'nothing'" in done.stderr
