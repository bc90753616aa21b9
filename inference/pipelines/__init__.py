"""Pipelines: DICOM series in, :class:`~inference.findings.Findings` out.

A pipeline registers itself under the name routes use (``ct-cspine-fracture``, ...)
with :func:`register`. Pipelines never import Celery or pynetdicom.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from spine_node.inference.errors import PipelineError
from spine_node.inference.findings import Findings, ModelInfo
from spine_node.inference.registry import Registry
from spine_node.inference.series import SeriesRef


class ModelProvider(Protocol):
    """Gives a pipeline a loaded engine by model name (the worker picks the backend)."""

    def __call__(self, model_name: str) -> object: ...


class Pipeline(Protocol):
    """A pipeline class may also declare ``model_names``: the models it asks its
    ModelProvider for (``spine-node pipelines list`` shows them)."""

    name: str

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings: ...


_PIPELINES: Registry[Callable[[], Pipeline]] = Registry(
    "pipeline", ("spine_node.inference.pipelines.ct_cspine", "spine_node.inference.pipelines.xray"))
register = _PIPELINES.register
names = _PIPELINES.names


def get(name: str) -> Pipeline:
    """A new instance of the pipeline registered as ``name``."""
    return _PIPELINES.factory(name)()


def model_names(name: str) -> tuple[str, ...]:
    """The models the pipeline registered as ``name`` declares it uses (empty: none declared)."""
    return tuple(getattr(_PIPELINES.factory(name), "model_names", ()))


def engine_card(engine: Any) -> Any:
    """The model card of an engine a ModelProvider returned."""
    card = getattr(engine, "card", None)
    if card is None:
        raise PipelineError(f"engine {engine!r} has no model card")
    return card


def model_info(engine: Any) -> ModelInfo:
    """Which model, version, backend and weights produced a result."""
    card = engine_card(engine)
    return ModelInfo(
        name=card.name,
        version=str(card.version),
        backend=str(getattr(engine, "backend", "")),
        weights=str(card.weights.get("sha256", "")),
        trained_on=card.trained_on,
        clinical_use=bool(card.clinical_use),
    )
