"""The engine interface every backend implements."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from spine_node.inference.card import ModelCard
from spine_node.inference.errors import InferenceError
from spine_node.inference.findings import ModelInfo

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp16", "fp32"]
Shape = tuple[int, ...]


class EngineUnavailable(InferenceError, RuntimeError):
    """This backend cannot run here (missing package, no GPU); the message says why."""


class EngineError(InferenceError):
    """A loaded engine failed to run a batch."""


class EngineInputError(EngineError, ValueError):
    """Inputs do not match the model card (missing name, wrong rank or size, bad dtype)."""


@dataclass(frozen=True)
class EngineOptions:
    """How to load an engine; every backend reads the fields that concern it.

    Parameters
    ----------
    threads
        Cap on intra-op CPU threads (ONNX Runtime, torch). The engine uses
        ``min(cores available to this process, threads)``; ``None`` means all of them.
    device
        ``"cpu"`` forces the CPU, ``"cuda"`` requires a GPU, ``"auto"`` takes a GPU when
        the backend can use one.
    device_id
        CUDA device ordinal.
    precision
        TensorRT build precision; ``"auto"`` is FP16 where the GPU has fast FP16.
    max_batch, opt_batch
        TensorRT optimisation profile for a dynamic batch axis (axis 0 marked ``-1``).
    shape_profiles
        TensorRT ``(min, opt, max)`` shapes per input name, for inputs with dynamic axes
        other than the batch axis.
    workspace_mb
        TensorRT builder workspace memory pool limit.
    plans_dir
        Where TensorRT plans are cached; default ``<model folder>/plans``.
    progress
        Show a progress display while a TensorRT plan builds.
    """

    threads: int | None = None
    device: Device = "auto"
    device_id: int = 0
    precision: Precision = "auto"
    max_batch: int = 8
    opt_batch: int = 1
    shape_profiles: Mapping[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)
    workspace_mb: int = 2048
    plans_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in ("auto", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, fp16 or fp32, got {self.precision!r}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt_batch <= max_batch, got {self.opt_batch}, "
                             f"{self.max_batch}")


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity / container cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def intra_op_threads(configured: int | None) -> int:
    """``min(cores, configured)``: never more threads than cores on a small box."""
    cores = available_cores()
    return cores if configured is None else max(1, min(cores, configured))


_CASTABLE = {"float32", "float16", "int64", "int32", "uint8", "bool"}

#: How close every backend's outputs must be to the torch reference: (rtol, atol), used
#: as ``numpy.testing.assert_allclose(out, reference, rtol, atol)`` by the parity tests
#: and the benchmark. FP16 TensorRT plans round activations to 11-bit mantissas.
PARITY_TOLERANCE: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 1e-4),
    "fp16": (2e-2, 2e-2),
}


def parity_tolerance(backend: str) -> tuple[float, float]:
    """``(rtol, atol)`` for outputs of ``backend`` (``"tensorrt-fp16"`` -> the FP16 pair)."""
    return PARITY_TOLERANCE["fp16" if backend.endswith("fp16") else "fp32"]


class Engine(ABC):
    """A loaded model on one backend."""

    #: Backend name recorded in audit rows and result objects ("onnxruntime-cpu", ...).
    backend: str = ""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        #: Backends tried before this one and why each was skipped (set by selection).
        self.skipped: dict[str, str] = {}

    @classmethod
    @abstractmethod
    def load(cls, card: ModelCard, options: EngineOptions | None = None) -> Engine:
        """Load ``card``'s model; raise :class:`EngineUnavailable` if this backend can't."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: input name -> array, returns output name -> array."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the engine holds (sessions, GPU memory); idempotent."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.card.name} {self.card.version} "
                f"on {self.backend}>")

    def model_info(self) -> ModelInfo:
        """What result objects record about the model that produced them."""
        from spine_node.inference.repository import file_sha256

        weights = f"{self.card.name} {self.card.version}"
        if self.card.onnx_path.is_file():
            weights += f" (model.onnx sha256:{file_sha256(self.card.onnx_path)[:16]})"
        return ModelInfo(
            name=self.card.name,
            version=self.card.version,
            backend=self.backend,
            weights=weights,
            trained_on=self.card.trained_on,
            clinical_use=self.card.clinical_use,
        )

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs validated against the card and cast to its dtypes, in card order.

        Raises
        ------
        EngineInputError
            A missing or unknown name, a wrong rank, a fixed axis of the wrong size, a
            batch size that differs between inputs, or a dtype that cannot be cast safely.
        """
        model = self.card.name
        expected = {spec.name for spec in self.card.inputs}
        unknown = set(inputs) - expected
        if unknown:
            raise EngineInputError(f"model {model!r} has no input(s) {sorted(unknown)}; "
                                   f"it takes {sorted(expected)}")
        checked: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in self.card.inputs:
            if spec.name not in inputs:
                raise EngineInputError(f"model {model!r}: input {spec.name!r} is missing")
            array = np.asarray(inputs[spec.name])
            if array.ndim != len(spec.shape):
                raise EngineInputError(
                    f"model {model!r}: input {spec.name!r} must have rank {len(spec.shape)} "
                    f"(shape {list(spec.shape)}), got shape {list(array.shape)}")
            for axis, (want, have) in enumerate(zip(spec.shape, array.shape, strict=True)):
                if want != -1 and want != have:
                    raise EngineInputError(
                        f"model {model!r}: input {spec.name!r} axis {axis} must be {want} "
                        f"(shape {list(spec.shape)}), got shape {list(array.shape)}")
            if batch is None:
                batch = array.shape[0] if array.ndim else None
            elif array.ndim and array.shape[0] != batch:
                raise EngineInputError(f"model {model!r}: inputs disagree on batch size "
                                       f"({batch} and {array.shape[0]})")
            if array.dtype != np.dtype(spec.dtype):
                if spec.dtype not in _CASTABLE or not np.can_cast(
                    array.dtype, spec.dtype, casting="same_kind"
                ):
                    raise EngineInputError(
                        f"model {model!r}: input {spec.name!r} needs dtype {spec.dtype}, got "
                        f"{array.dtype} (no safe cast)")
                array = array.astype(spec.dtype)
            checked[spec.name] = np.ascontiguousarray(array)
        return checked
