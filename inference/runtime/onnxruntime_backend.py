"""ONNX Runtime backend: CUDA execution provider where present, else the CPU.

On CPU the session uses ``min(cores, configured)`` intra-op threads and one inter-op
thread: on a small box (two cores, shared with the node) more threads only contend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

import numpy as np

from spine_node.inference.card import ModelCard
from spine_node.inference.repository import compare_signature, session_signature
from spine_node.inference.runtime.base import (
    Engine,
    EngineError,
    EngineOptions,
    EngineUnavailable,
    intra_op_threads,
)

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


class OnnxRuntimeEngine(Engine):
    """A model run by an ONNX Runtime ``InferenceSession``."""

    def __init__(self, card: ModelCard, session: object, threads: int) -> None:
        super().__init__(card)
        self._session = session
        self.threads = threads
        providers = session.get_providers()  # type: ignore[attr-defined]
        self.provider = providers[0]
        self.backend = "onnxruntime-cuda" if self.provider == CUDA_PROVIDER else "onnxruntime-cpu"
        self._output_names = [spec.name for spec in card.outputs]
        # Sessions are thread-safe for run(), but a worker thread per job would each
        # start intra-op pools; serialise so the thread budget holds.
        self._lock = threading.Lock()

    @classmethod
    def load(cls, card: ModelCard, options: EngineOptions | None = None) -> OnnxRuntimeEngine:
        options = options or EngineOptions()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineUnavailable(f"onnxruntime is not installed ({exc})") from None
        if not card.onnx_path.is_file():
            raise EngineUnavailable(f"model {card.name!r} has no {card.onnx_path.name}")

        available = ort.get_available_providers()
        if options.device == "cpu":
            providers: list[object] = [CPU_PROVIDER]
        elif CUDA_PROVIDER in available:
            providers = [(CUDA_PROVIDER, {"device_id": options.device_id}), CPU_PROVIDER]
        elif options.device == "cuda":
            raise EngineUnavailable(
                "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu "
                f"on a CUDA host); available: {', '.join(available)}")
        else:
            providers = [CPU_PROVIDER]

        threads = intra_op_threads(options.threads)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = threads
        session_options.inter_op_num_threads = 1
        session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Worker threads spinning after a run burn the cores the node needs.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(card.onnx_path), session_options, providers=providers
            )
        except Exception as exc:  # ORT raises its own exception types
            if len(providers) == 1:
                raise EngineError(f"onnxruntime could not load {card.onnx_path}: "
                                  f"{exc}") from None
            if options.device == "cuda":
                raise EngineUnavailable(f"onnxruntime could not create a CUDA session: "
                                        f"{exc}") from None
            log.warning("onnxruntime CUDA session failed for %s (%s); using the CPU",
                        card.name, exc)
            try:
                session = ort.InferenceSession(
                    str(card.onnx_path), session_options, providers=[CPU_PROVIDER]
                )
            except Exception as cpu_exc:  # noqa: BLE001
                raise EngineError(f"onnxruntime could not load {card.onnx_path}: "
                                  f"{cpu_exc}") from None

        problems = compare_signature(card, session_signature(session))
        if problems:
            raise EngineError(f"model {card.name!r}: {card.onnx_path} does not match its "
                              "card: " + "; ".join(problems))
        if options.device == "cuda" and session.get_providers()[0] != CUDA_PROVIDER:
            raise EngineUnavailable("onnxruntime fell back to the CPU: the CUDA provider "
                                    "could not initialise (CUDA/cuDNN libraries missing?)")
        engine = cls(card, session, threads)
        log.info("loaded %s %s on %s (%d intra-op threads)",
                 card.name, card.version, engine.backend, threads)
        return engine

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = self.check_inputs(inputs)
        if self._session is None:
            raise EngineError(f"engine for {self.card.name!r} is closed")
        with self._lock:
            try:
                results = self._session.run(self._output_names, feed)  # type: ignore[attr-defined]
            except Exception as exc:  # ORT raises its own exception types
                raise EngineError(f"onnxruntime failed on {self.card.name!r}: {exc}") from None
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None
