"""Choosing a backend: try each in the configured order, keep the first that loads.

Backend names in the order list are a family (``tensorrt``, ``onnxruntime``, ``torch``),
which picks the best device the family can use, or a family with a variant that pins it:
``tensorrt-fp16``, ``tensorrt-fp32``, ``onnxruntime-cuda``, ``onnxruntime-cpu``,
``torch-cuda``, ``torch-cpu``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spine_node.inference.card import ModelCard
from spine_node.inference.errors import InferenceError
from spine_node.inference.repository import ModelRepository
from spine_node.inference.runtime.base import Engine, EngineOptions, EngineUnavailable

log = logging.getLogger(__name__)

DEFAULT_BACKENDS: tuple[str, ...] = ("tensorrt", "onnxruntime", "torch")

# Backend family -> "module:class"; imported only when tried, so a CPU node never
# imports tensorrt or torch.
BACKENDS: dict[str, str] = {
    "tensorrt": "spine_node.inference.runtime.tensorrt_backend:TensorRTEngine",
    "onnxruntime": "spine_node.inference.runtime.onnxruntime_backend:OnnxRuntimeEngine",
    "torch": "spine_node.inference.runtime.torch_backend:TorchEngine",
}
_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "tensorrt": {"fp16": {"precision": "fp16"}, "fp32": {"precision": "fp32"}},
    "onnxruntime": {"cuda": {"device": "cuda"}, "cpu": {"device": "cpu"}},
    "torch": {"cuda": {"device": "cuda"}, "cpu": {"device": "cpu"}},
}


class NoEngineAvailable(InferenceError):
    """No backend in the order could load the model; ``reasons`` says why for each."""

    def __init__(self, model: str, reasons: dict[str, str]) -> None:
        self.model = model
        self.reasons = dict(reasons)
        detail = "; ".join(f"{b}: {r}" for b, r in reasons.items()) or "no backends given"
        super().__init__(f"no engine can run model {model!r}: {detail}")


def parse_backend(name: str) -> tuple[str, dict[str, Any]]:
    """``"onnxruntime-cpu"`` -> ``("onnxruntime", {"device": "cpu"})``; raise on unknown."""
    family, _, variant = name.partition("-")
    if family not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(known_backends())}")
    if not variant:
        return family, {}
    try:
        return family, _VARIANTS[family][variant]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: "
                         f"{', '.join(known_backends())}") from None


def known_backends() -> list[str]:
    names = []
    for family in BACKENDS:
        names.append(family)
        names.extend(f"{family}-{variant}" for variant in _VARIANTS.get(family, {}))
    return names


def backend_class(family: str) -> type[Engine]:
    """The engine class of a backend family (imports its module)."""
    module_name, _, class_name = BACKENDS[family].partition(":")
    module = importlib.import_module(module_name)
    cls: type[Engine] = getattr(module, class_name)
    return cls


def load_engine(
    card_or_name: ModelCard | str,
    engines_dir: Path | str | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    options: EngineOptions | None = None,
) -> Engine:
    """Load a model on the first backend in ``backends`` that can run it here.

    Backends that cannot (``EngineUnavailable``: package missing, no GPU, no torch
    weights) are skipped with the reason logged and kept in ``engine.skipped``. Any other
    error (a broken model) propagates: falling back would hide it.

    Parameters
    ----------
    card_or_name
        A loaded card, or a model name looked up in ``engines_dir``.
    engines_dir
        The model repository; ``None`` is the packaged ``engines/`` folder.
    backends
        Preference order (see the module docstring for names).
    options
        Loading options shared by all backends.

    Raises
    ------
    NoEngineAvailable
        No backend could load the model; the message lists each backend's reason.
    """
    options = options or EngineOptions()
    if isinstance(card_or_name, ModelCard):
        card = card_or_name
    else:
        card = ModelRepository(engines_dir).card(card_or_name)
    parsed = [(name, *parse_backend(name)) for name in backends]  # validate all up front
    reasons: dict[str, str] = {}
    for name, family, overrides in parsed:
        try:
            cls = backend_class(family)
        except ImportError as exc:
            reasons[name] = f"backend module failed to import: {exc}"
            log.info("model %s: backend %s unavailable: %s", card.name, name, reasons[name])
            continue
        try:
            engine = cls.load(card, dataclasses.replace(options, **overrides))
        except EngineUnavailable as exc:
            reasons[name] = str(exc)
            log.info("model %s: backend %s unavailable: %s", card.name, name, exc)
            continue
        engine.skipped = dict(reasons)
        return engine
    raise NoEngineAvailable(card.name, reasons)


class EngineProvider:
    """A :class:`~inference.pipelines.ModelProvider`: model name -> loaded engine, cached.

    One engine per model name for the life of the provider (a worker process); loading
    is serialised per model so two threads asking at once load it once.
    """

    def __init__(
        self,
        engines_dir: Path | str | None = None,
        backends: Sequence[str] = DEFAULT_BACKENDS,
        options: EngineOptions | None = None,
    ) -> None:
        self.repository = ModelRepository(engines_dir)
        self.backends = tuple(backends)
        for name in self.backends:
            parse_backend(name)
        self.options = options or EngineOptions()
        self._engines: dict[str, Engine] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, options: EngineOptions | None = None) -> EngineProvider:
        """From ``Settings.worker`` (``engines_dir``, ``backends`` and ``engine_threads``)."""
        if options is None:
            options = EngineOptions(threads=getattr(settings.worker, "engine_threads", None))
        return cls(settings.worker.engines_dir, settings.worker.backends, options)

    def __call__(self, model_name: str) -> Engine:
        with self._guard:
            engine = self._engines.get(model_name)
            if engine is not None:
                return engine
            lock = self._locks.setdefault(model_name, threading.Lock())
        with lock:
            with self._guard:
                engine = self._engines.get(model_name)
            if engine is None:
                engine = load_engine(
                    self.repository.card(model_name), backends=self.backends,
                    options=self.options,
                )
                with self._guard:
                    self._engines[model_name] = engine
            return engine

    def loaded(self) -> dict[str, str]:
        """Model name -> backend of every engine loaded so far."""
        with self._guard:
            return {name: engine.backend for name, engine in self._engines.items()}

    def close(self) -> None:
        with self._guard:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()
