"""Torch reference backend: the model's own architecture with its trained state dict.

It needs the card's ``architecture`` entry (a name registered in
:mod:`spine_node.inference.models`) and ``model.pt`` (a state dict) in the model folder. It is the
reference the exported ONNX is checked against, and the slowest backend; the node's
default order puts it last.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from spine_node.inference.card import ModelCard
from spine_node.inference.runtime.base import (
    Engine,
    EngineError,
    EngineOptions,
    EngineUnavailable,
    intra_op_threads,
)

log = logging.getLogger(__name__)


class TorchEngine(Engine):
    """A model run in torch eager mode (``inference_mode``)."""

    def __init__(self, card: ModelCard, module: Any, device: Any) -> None:
        super().__init__(card)
        self.module = module
        self.device = device
        self.backend = f"torch-{device.type}"
        self._lock = threading.Lock()

    @classmethod
    def load(cls, card: ModelCard, options: EngineOptions | None = None) -> TorchEngine:
        options = options or EngineOptions()
        if card.architecture is None:
            raise EngineUnavailable(f"model {card.name!r} names no torch architecture in "
                                    "its card (field 'architecture')")
        if not card.state_dict_path.is_file():
            raise EngineUnavailable(f"model {card.name!r} has no torch state dict "
                                    f"{card.state_dict_path.name}")
        try:
            import torch
        except ImportError:
            raise EngineUnavailable("torch is not installed (pip install "
                                    "'spine-node[torch]')") from None
        from spine_node.inference.models import architecture

        if options.device == "cpu":
            device = torch.device("cpu")
        elif torch.cuda.is_available():
            device = torch.device("cuda", options.device_id)
        elif options.device == "cuda":
            raise EngineUnavailable("torch sees no CUDA GPU")
        else:
            device = torch.device("cpu")
        if device.type == "cpu" and options.threads is not None:
            torch.set_num_threads(intra_op_threads(options.threads))

        name = card.architecture["name"]
        try:
            module = architecture(name, **card.architecture.get("kwargs", {}))
        except KeyError as exc:
            raise EngineUnavailable(str(exc.args[0])) from None
        try:
            state = torch.load(card.state_dict_path, map_location=device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and IO errors alike
            raise EngineError(f"cannot read {card.state_dict_path}: {exc}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise EngineError(f"{card.state_dict_path} does not fit architecture {name!r}: "
                              f"{exc}") from None
        module.to(device).eval()
        engine = cls(card, module, device)
        log.info("loaded %s %s on %s", card.name, card.version, engine.backend)
        return engine

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        feed = self.check_inputs(inputs)
        names = [spec.name for spec in self.card.outputs]
        with self._lock, torch.inference_mode():
            tensors = [torch.from_numpy(feed[spec.name]).to(self.device)
                       for spec in self.card.inputs]
            try:
                result = self.module(*tensors)
            except Exception as exc:  # noqa: BLE001 - any forward failure is the model's
                raise EngineError(f"torch forward failed on {self.card.name!r}: {exc}") from None
            if isinstance(result, torch.Tensor):
                result = (result,)
            if isinstance(result, Mapping):
                missing = [n for n in names if n not in result]
                if missing:
                    raise EngineError(f"{self.card.name!r} forward returned no {missing}")
                values = [result[n] for n in names]
            else:
                values = list(result)
                if len(values) != len(names):
                    raise EngineError(f"{self.card.name!r} forward returned {len(values)} "
                                      f"outputs, the card names {len(names)}")
            return {n: v.detach().cpu().numpy() for n, v in zip(names, values, strict=True)}
