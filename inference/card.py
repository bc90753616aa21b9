"""Model cards: ``engines/<name>/model.yaml``, validated on load with clear errors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("classification", "segmentation", "detection", "regression")
DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Architecture names may carry a version-like dot ("...-2.5d").
_ARCH_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class ModelCardError(ValueError):
    """A model card is missing a field or has a bad value; the message names it."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor. A ``-1`` dimension is dynamic (e.g. batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Output channel / class index -> structure or class key ("C1", "fracture", ...).
    labels: dict[int, str]
    preprocessing: dict[str, Any]
    # Provenance: how the weights were made (trained_on, recipe command, seed, metrics).
    weights: dict[str, Any]
    intended_use: str
    clinical_use: bool = False
    folder: Path = field(default=Path("."), compare=False)
    # Torch architecture for the reference backend: {"name": registered name, "kwargs": {...}}
    # (see spine_node.inference.models.architecture); None when the model ships ONNX only.
    architecture: dict[str, Any] | None = None

    @property
    def onnx_path(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def state_dict_path(self) -> Path:
        """Torch weights for the reference backend (optional)."""
        return self.folder / "model.pt"

    @property
    def trained_on(self) -> str:
        return str(self.weights.get("trained_on", ""))

    def input(self, name: str | None = None) -> TensorSpec:
        """The input called ``name`` (default: the only input)."""
        return _pick(self.inputs, name, "input", self.name)

    def output(self, name: str | None = None) -> TensorSpec:
        """The output called ``name`` (default: the only output)."""
        return _pick(self.outputs, name, "output", self.name)

    @classmethod
    def from_dict(cls, data: Any, folder: Path = Path(".")) -> ModelCard:
        where = f"model card {folder / 'model.yaml'}"
        if not isinstance(data, dict):
            raise ModelCardError(f"{where}: expected a mapping at top level")

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ModelCardError(f"{where}: missing field '{key}'")
            value = data[key]
            if not isinstance(value, kind):
                raise ModelCardError(f"{where}: field '{key}' has type "
                                     f"{type(value).__name__}, expected {kind}")
            return value

        name = need("name", str)
        if not _NAME_RE.match(name):
            raise ModelCardError(f"{where}: invalid name {name!r}: lower-case letters, digits, - _")
        version = str(need("version", (str, int, float)))
        task = need("task", str)
        if task not in TASKS:
            raise ModelCardError(f"{where}: task {task!r} not one of {TASKS}")

        def tensors(key: str) -> tuple[TensorSpec, ...]:
            items = need(key, list)
            if not items:
                raise ModelCardError(f"{where}: '{key}' is empty")
            specs = []
            for i, item in enumerate(items):
                if not isinstance(item, dict) or "name" not in item or "shape" not in item:
                    raise ModelCardError(f"{where}: {key}[{i}] needs 'name' and 'shape'")
                shape = item["shape"]
                if not isinstance(shape, list) or not all(
                    isinstance(d, int) and (d > 0 or d == -1) for d in shape
                ):
                    raise ModelCardError(f"{where}: {key}[{i}].shape must be a list of positive "
                                         f"ints or -1, got {shape!r}")
                dtype = item.get("dtype", "float32")
                if dtype not in DTYPES:
                    raise ModelCardError(f"{where}: {key}[{i}].dtype {dtype!r} not one of {DTYPES}")
                specs.append(TensorSpec(str(item["name"]), tuple(shape), dtype))
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ModelCardError(f"{where}: '{key}' has duplicate tensor names {names}")
            return tuple(specs)

        labels_raw = need("labels", dict)
        try:
            labels = {int(k): str(v) for k, v in labels_raw.items()}
        except (TypeError, ValueError):
            raise ModelCardError(f"{where}: labels must map integer indices to names") from None
        weights = need("weights", dict)
        if "trained_on" not in weights:
            raise ModelCardError(f"{where}: weights.trained_on is required (provenance)")
        clinical = data.get("clinical_use", False)
        if not isinstance(clinical, bool):
            raise ModelCardError(f"{where}: clinical_use must be true or false")
        architecture = _architecture(data.get("architecture"), where)
        return cls(
            name=name,
            version=version,
            task=task,
            description=str(data.get("description", "")),
            inputs=tensors("inputs"),
            outputs=tensors("outputs"),
            labels=labels,
            preprocessing=dict(data.get("preprocessing") or {}),
            weights=dict(weights),
            intended_use=need("intended_use", str),
            clinical_use=clinical,
            folder=folder,
            architecture=architecture,
        )

    @classmethod
    def load(cls, folder: Path | str) -> ModelCard:
        folder = Path(folder)
        path = folder / "model.yaml"
        if not path.is_file():
            raise ModelCardError(f"no model card at {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ModelCardError(f"model card {path} is not valid YAML: {exc}") from None
        return cls.from_dict(data, folder)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "inputs": [_spec_dict(t) for t in self.inputs],
            "outputs": [_spec_dict(t) for t in self.outputs],
            "labels": dict(self.labels),
            "preprocessing": self.preprocessing,
            "weights": self.weights,
            "intended_use": self.intended_use,
            "clinical_use": self.clinical_use,
            **({"architecture": self.architecture} if self.architecture is not None else {}),
        }

    def save(self, folder: Path | str) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.yaml"
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return path


def _spec_dict(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def _pick(
    specs: tuple[TensorSpec, ...], name: str | None, kind: str, model: str
) -> TensorSpec:
    if name is None:
        if len(specs) != 1:
            raise ModelCardError(f"model {model!r} has {len(specs)} {kind}s "
                                 f"({', '.join(s.name for s in specs)}); name one")
        return specs[0]
    for spec in specs:
        if spec.name == name:
            return spec
    raise ModelCardError(f"model {model!r} has no {kind} {name!r}; "
                         f"it has {', '.join(s.name for s in specs)}")


def _architecture(value: Any, where: str) -> dict[str, Any] | None:
    """``architecture: unet3d`` or ``{name: unet3d, kwargs: {...}}`` -> normalised dict."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ModelCardError(f"{where}: field 'architecture' must be a name or a mapping "
                             f"with 'name' and 'kwargs', got {type(value).__name__}")
    name = value.get("name")
    if not isinstance(name, str) or not _ARCH_RE.match(name):
        raise ModelCardError(f"{where}: architecture.name must be a registered architecture "
                             f"name (lower-case letters, digits, - _ .), got {name!r}")
    kwargs = value.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelCardError(f"{where}: architecture.kwargs must map argument names to values")
    extra = set(value) - {"name", "kwargs"}
    if extra:
        raise ModelCardError(f"{where}: architecture has unknown keys {sorted(extra)}; "
                             "expected 'name' and 'kwargs'")
    return {"name": name, "kwargs": dict(kwargs)}
