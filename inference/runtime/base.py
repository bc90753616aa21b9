"""The engine interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np

from inference.card import ModelCard


class EngineUnavailable(RuntimeError):
    """This backend cannot run here (missing package, no GPU); the message says why."""


class Engine(ABC):
    """A loaded model on one backend."""

    #: Backend name recorded in audit rows and result objects ("onnxruntime-cpu", ...).
    backend: str = ""

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    @classmethod
    @abstractmethod
    def load(cls, card: ModelCard) -> Engine:
        """Load ``card``'s model; raise :class:`EngineUnavailable` if this backend can't."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input name -> array, returns output name -> array."""
