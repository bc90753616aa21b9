"""A small ONNX Runtime model provider for the X-ray pipeline tests.

It implements :class:`spine_node.inference.runtime.base.Engine` over ``onnxruntime`` (CPU, one
thread) for models in ``engines/``; the node's own runtime selection is tested elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from spine_node.engines import ENGINES_DIR
from spine_node.inference.card import ModelCard
from spine_node.inference.runtime.base import Engine


class OrtTestEngine(Engine):
    backend = "onnxruntime-cpu"

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(card.onnx_path), options,
                                            providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, card: ModelCard) -> OrtTestEngine:
        return cls(card)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(inputs)), strict=True))


class OrtModels:
    """``models(name)`` -> a loaded engine, cached; records which names were asked for."""

    def __init__(self, root: Path = ENGINES_DIR) -> None:
        self.root = root
        self.loaded: dict[str, OrtTestEngine] = {}
        self.requested: list[str] = []

    def __call__(self, model_name: str) -> OrtTestEngine:
        self.requested.append(model_name)
        if model_name not in self.loaded:
            self.loaded[model_name] = OrtTestEngine.load(ModelCard.load(self.root / model_name))
        return self.loaded[model_name]
