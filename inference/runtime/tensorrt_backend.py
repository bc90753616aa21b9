"""TensorRT backend: a serialized plan built from the model's ONNX on the GPU that runs it.

The plan is cached beside the model as
``<model>/plans/<name>.sm<cc>.trt<version>.<precision>.plan`` with a JSON sidecar that
records what it was built from (ONNX SHA-256, TensorRT version, compute capability,
precision, optimisation profiles). A plan is rebuilt when any of those change; plans are
never committed (they only run on the GPU model and TensorRT version that built them).

Device buffers are torch CUDA tensors: torch is already the project's GPU dependency
(training, the reference backend), its caching allocator reuses memory across batches
and its streams give ``execute_async_v3`` a stream handle, so no second CUDA binding
(cuda-python, pycuda) is needed on GPU workers.

``tensorrt`` and ``torch`` are imported lazily, inside :meth:`TensorRTEngine.load`; when
either is missing or no GPU is visible, loading raises
:class:`~inference.runtime.base.EngineUnavailable` with the reason, and selection moves
on to the next backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from spine_node.inference.card import ModelCard
from spine_node.inference.runtime.base import (
    Engine,
    EngineError,
    EngineInputError,
    EngineOptions,
    EngineUnavailable,
    Shape,
)

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1
Profiles = dict[str, tuple[Shape, Shape, Shape]]

# Compute capabilities with fast native FP16 (the rule TensorRT's deprecated
# platform_has_fast_fp16 applied): 5.3, 6.0, 6.2 and everything from Volta (7.0) on.
_FAST_FP16 = {(5, 3), (6, 0), (6, 2)}


def has_fast_fp16(capability: tuple[int, int]) -> bool:
    return capability >= (7, 0) or capability in _FAST_FP16


def choose_precision(requested: str, capability: tuple[int, int]) -> str:
    """``fp16`` or ``fp32`` for a requested precision on a GPU of ``capability``."""
    if requested == "fp32":
        return "fp32"
    if has_fast_fp16(capability):
        return "fp16"
    if requested == "fp16":
        raise EngineUnavailable(f"FP16 requested but the GPU (sm{capability[0]}{capability[1]}) "
                                "has no fast FP16")
    return "fp32"


@dataclass(frozen=True)
class PlanFiles:
    """Where the plan for one (model, GPU, TensorRT, precision) lives."""

    plan: Path
    sidecar: Path
    lock: Path


def plan_files(
    card: ModelCard,
    capability: tuple[int, int],
    trt_version: str,
    precision: str,
    plans_dir: Path | None = None,
) -> PlanFiles:
    folder = plans_dir if plans_dir is not None else card.folder / "plans"
    stem = f"{card.name}.sm{capability[0]}{capability[1]}.trt{trt_version}.{precision}"
    return PlanFiles(folder / f"{stem}.plan", folder / f"{stem}.json", folder / f"{stem}.lock")


def optimisation_profiles(card: ModelCard, options: EngineOptions) -> Profiles:
    """``(min, opt, max)`` shapes per input for the plan's single optimisation profile.

    Fixed shapes are their own profile. A dynamic axis 0 is the batch: ``1``,
    ``options.opt_batch``, ``options.max_batch``. Any other dynamic axis needs
    ``options.shape_profiles[input]``; without one the plan cannot be built.
    """
    profiles: Profiles = {}
    for spec in card.inputs:
        given = options.shape_profiles.get(spec.name)
        if given is not None:
            low, opt, high = (tuple(int(d) for d in s) for s in given)
            for shape in (low, opt, high):
                if len(shape) != len(spec.shape) or any(
                    want != -1 and want != have
                    for want, have in zip(spec.shape, shape, strict=True)
                ):
                    raise EngineUnavailable(
                        f"shape profile {shape} for input {spec.name!r} does not fit the card "
                        f"shape {list(spec.shape)}")
            if not all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
                raise EngineUnavailable(f"shape profile for {spec.name!r} needs min <= opt <= "
                                        f"max, got {low}, {opt}, {high}")
            profiles[spec.name] = (low, opt, high)
            continue
        dynamic = [axis for axis, dim in enumerate(spec.shape) if dim == -1]
        if any(axis != 0 for axis in dynamic):
            raise EngineUnavailable(
                f"input {spec.name!r} has dynamic axes {dynamic} (shape {list(spec.shape)}); "
                "TensorRT needs a shape profile for them (EngineOptions.shape_profiles)")
        low = tuple(1 if d == -1 else d for d in spec.shape)
        opt = tuple(options.opt_batch if d == -1 else d for d in spec.shape)
        high = tuple(options.max_batch if d == -1 else d for d in spec.shape)
        profiles[spec.name] = (low, opt, high)
    return profiles


def expected_sidecar(
    card: ModelCard,
    onnx_sha256: str,
    trt_version: str,
    capability: tuple[int, int],
    precision: str,
    profiles: Profiles,
) -> dict[str, Any]:
    """The sidecar fields a cached plan must match to be reused."""
    return {
        "format": SIDECAR_FORMAT,
        "model": card.name,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": trt_version,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "precision": precision,
        "profiles": {name: [list(s) for s in shapes] for name, shapes in profiles.items()},
    }


def stale_reason(files: PlanFiles, expected: Mapping[str, Any]) -> str | None:
    """Why the cached plan cannot be reused, or ``None`` when it can."""
    if not files.plan.is_file():
        return "no cached plan"
    if not files.sidecar.is_file():
        return "cached plan has no sidecar"
    try:
        recorded = json.loads(files.sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"sidecar unreadable ({exc})"
    for key, value in expected.items():
        if recorded.get(key) != value:
            return f"{key} changed ({recorded.get(key)!r} -> {value!r})"
    return None


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One builder per plan across processes (two workers starting on one GPU host)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# -- TensorRT objects (need the tensorrt module) -----------------------------------------

_trt_logger: Any = None
_trt_logger_lock = threading.Lock()


def _logger(trt: Any) -> Any:
    """One TensorRT logger per process, forwarding to :mod:`logging`."""
    global _trt_logger
    with _trt_logger_lock:
        if _trt_logger is None:

            class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    S = trt.ILogger.Severity
                    if severity in (S.INTERNAL_ERROR, S.ERROR):
                        log.error("TensorRT: %s", msg)
                    elif severity == S.WARNING:
                        log.warning("TensorRT: %s", msg)
                    elif severity == S.INFO:
                        log.debug("TensorRT: %s", msg)

            _trt_logger = _Logger()
        return _trt_logger


def _progress_monitor(trt: Any, progress: Any) -> Any:
    """A ``trt.IProgressMonitor`` that drives a rich progress display, one bar per phase."""

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._tasks: dict[str, Any] = {}
            self._depth: dict[str, int] = {}
            self._lock = threading.Lock()  # TensorRT may call from several threads

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._tasks[phase_name] = progress.add_task(
                    "  " * depth + phase_name, total=max(1, num_steps)
                )

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                task = self._tasks.get(phase_name)
                if task is not None:
                    progress.update(task, completed=step + 1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                task = self._tasks.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if task is not None:
                    progress.remove_task(task)

    return _Monitor()


def build_plan(
    trt: Any,
    card: ModelCard,
    precision: str,
    profiles: Profiles,
    options: EngineOptions,
) -> bytes:
    """Parse ``card``'s ONNX and build a serialized TensorRT plan.

    Raises
    ------
    EngineError
        The ONNX parser or the builder failed (the parser's errors are in the message).
    """
    logger = _logger(trt)
    builder = trt.Builder(logger)
    # Explicit batch is the only mode in TensorRT 10, so no creation flags.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(card.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {card.onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profiles:
            raise EngineError(f"ONNX input {tensor.name!r} is not in the card of {card.name!r}")
        low, opt, high = profiles[tensor.name]
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)

    progress = None
    if options.progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        monitor = _progress_monitor(trt, progress)
        config.progress_monitor = monitor
    started = time.monotonic()
    if progress is not None:
        progress.start()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if progress is not None:
            progress.stop()
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan for {card.name!r} (see the "
                          "TensorRT errors logged above)")
    log.info("built TensorRT %s plan for %s in %.0f s", precision, card.name,
             time.monotonic() - started)
    return bytes(serialized)


class TensorRTEngine(Engine):
    """A model run by a TensorRT execution context on one GPU."""

    def __init__(
        self,
        card: ModelCard,
        *,
        trt: Any,
        torch: Any,
        cuda_engine: Any,
        device: Any,
        precision: str,
        plan: Path,
    ) -> None:
        super().__init__(card)
        self.backend = f"tensorrt-{precision}"
        self.precision = precision
        self.plan = plan
        self.device = device
        self._trt = trt
        self._torch = torch
        self._engine = cuda_engine
        self._context = cuda_engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"TensorRT could not create an execution context for "
                              f"{card.name!r} (out of GPU memory?)")
        self._stream = torch.cuda.Stream(device=device)
        self._lock = threading.Lock()
        io_names = [cuda_engine.get_tensor_name(i) for i in range(cuda_engine.num_io_tensors)]
        self._inputs = [n for n in io_names
                        if cuda_engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in io_names if n not in self._inputs]
        want_in = [s.name for s in card.inputs]
        want_out = [s.name for s in card.outputs]
        if sorted(self._inputs) != sorted(want_in) or sorted(self._outputs) != sorted(want_out):
            raise EngineError(f"plan {plan} has inputs {self._inputs} and outputs "
                              f"{self._outputs}; the card names {want_in} and {want_out}")
        self._dtypes = {n: np.dtype(trt.nptype(cuda_engine.get_tensor_dtype(n)))
                        for n in io_names}
        # Largest batch the profile accepts (for splitting bigger batches).
        self.max_batch = min(
            int(cuda_engine.get_tensor_profile_shape(n, 0)[2][0]) for n in self._inputs
        )
        self._batch_dynamic = all(s.shape[0] == -1 for s in card.inputs)

    @classmethod
    def load(cls, card: ModelCard, options: EngineOptions | None = None) -> TensorRTEngine:
        options = options or EngineOptions()
        if options.device == "cpu":
            raise EngineUnavailable("TensorRT needs a GPU and the CPU was requested")
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise EngineUnavailable(f"tensorrt is not installed ({exc}); GPU workers "
                                    "install it with the 'gpu' extra") from None
        try:
            import torch
        except ImportError:
            raise EngineUnavailable("torch with CUDA is needed for TensorRT device "
                                    "buffers and is not installed") from None
        if not torch.cuda.is_available():
            raise EngineUnavailable("no CUDA GPU visible (torch.cuda.is_available() is "
                                    "False)")
        if not card.onnx_path.is_file():
            raise EngineUnavailable(f"model {card.name!r} has no {card.onnx_path.name}")
        from spine_node.inference.repository import file_sha256

        device = torch.device("cuda", options.device_id)
        capability = tuple(torch.cuda.get_device_capability(device))
        precision = choose_precision(options.precision, capability)  # type: ignore[arg-type]
        profiles = optimisation_profiles(card, options)
        trt_version = str(trt.__version__)
        files = plan_files(card, capability, trt_version, precision,  # type: ignore[arg-type]
                           options.plans_dir)
        expected = expected_sidecar(card, file_sha256(card.onnx_path), trt_version,
                                    capability, precision, profiles)  # type: ignore[arg-type]

        with torch.cuda.device(device):
            runtime = trt.Runtime(_logger(trt))
            cuda_engine = None
            with _exclusive(files.lock):
                reason = stale_reason(files, expected)
                if reason is None:
                    cuda_engine = runtime.deserialize_cuda_engine(files.plan.read_bytes())
                    if cuda_engine is None:
                        reason = "cached plan did not deserialize"
                if cuda_engine is None:
                    log.info("building TensorRT plan %s (%s); this runs once per GPU model, "
                             "TensorRT version and ONNX file", files.plan.name, reason)
                    started = time.monotonic()
                    plan = build_plan(trt, card, precision, profiles, options)
                    _atomic_write(files.plan, plan)
                    sidecar = dict(expected)
                    sidecar.update(
                        model_version=card.version,
                        gpu=torch.cuda.get_device_name(device),
                        workspace_mb=options.workspace_mb,
                        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
                        build_seconds=round(time.monotonic() - started, 1),
                    )
                    _atomic_write(files.sidecar,
                                  json.dumps(sidecar, indent=2).encode("utf-8") + b"\n")
                    cuda_engine = runtime.deserialize_cuda_engine(plan)
                    if cuda_engine is None:
                        raise EngineError(f"TensorRT could not deserialize the plan it just "
                                          f"built for {card.name!r}")
            engine = cls(card, trt=trt, torch=torch, cuda_engine=cuda_engine, device=device,
                         precision=precision, plan=files.plan)
        log.info("loaded %s %s on %s (%s)", card.name, card.version, engine.backend,
                 files.plan.name)
        return engine

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = self.check_inputs(inputs)
        if self._context is None:
            raise EngineError(f"engine for {self.card.name!r} is closed")
        batch = next(iter(feed.values())).shape[0]
        if not self._batch_dynamic or batch <= self.max_batch:
            return self._run(feed)
        # Larger than the profile allows: run in chunks and concatenate.
        parts = [
            self._run({n: a[start:start + self.max_batch] for n, a in feed.items()})
            for start in range(0, batch, self.max_batch)
        ]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        context = self._context
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            keep = []  # device tensors must outlive the launch
            for name in self._inputs:
                array = np.ascontiguousarray(feed[name], dtype=self._dtypes[name])
                tensor = torch.from_numpy(array).to(self.device)
                keep.append(tensor)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise EngineInputError(f"shape {tuple(tensor.shape)} of input {name!r} is "
                                           f"outside the TensorRT profile of {self.card.name!r}")
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = {}
            for name in self._outputs:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"output {name!r} of {self.card.name!r} has a "
                                      f"data-dependent shape {shape}; not supported")
                buffer = torch.empty(shape, dtype=_torch_dtype(torch, self._dtypes[name]),
                                     device=self.device)
                context.set_tensor_address(name, buffer.data_ptr())
                outputs[name] = buffer
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError(f"TensorRT execution failed for {self.card.name!r}")
            self._stream.synchronize()
            specs = {s.name: s for s in self.card.outputs}
            return {
                name: outputs[name].cpu().numpy().astype(specs[name].dtype, copy=False)
                for name in (s.name for s in self.card.outputs)
            }

    def close(self) -> None:
        self._context = None
        self._engine = None


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    mapping = {
        np.dtype("float32"): torch.float32,
        np.dtype("float16"): torch.float16,
        np.dtype("int32"): torch.int32,
        np.dtype("int64"): torch.int64,
        np.dtype("int8"): torch.int8,
        np.dtype("uint8"): torch.uint8,
        np.dtype("bool"): torch.bool,
    }
    try:
        return mapping[np.dtype(dtype)]
    except KeyError:
        raise EngineError(f"no torch dtype for TensorRT tensor dtype {dtype}") from None
