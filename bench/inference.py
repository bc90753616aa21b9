"""Inference benchmark: latency and throughput per backend per model, against torch eager.

Run from the repository root::

    python -m bench.inference                       # models in engines/, else synthetic
    python -m bench.inference --synthetic --seconds 5 --backends onnxruntime,torch

For every model in the engines folder (or, when it has none or ``--synthetic`` is given,
two built-in synthetic conv nets with seeded weights, benchmark fixtures only) and every
backend family, it loads the engine, checks its outputs against torch eager on the same
input, then times ``engine.infer`` calls: median and p90 latency, throughput, and the
speed-up over torch eager measured in the same run. Backends that cannot run here are
listed with the reason. The table, the exact command and the machine facts replace this
benchmark's section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import replace_section
from spine_node.inference.card import ModelCard, TensorSpec
from spine_node.inference.repository import ModelRepository
from spine_node.inference.runtime.base import (
    Engine,
    EngineOptions,
    EngineUnavailable,
    available_cores,
    intra_op_threads,
    parity_tolerance,
)
from spine_node.inference.runtime.selection import backend_class, parse_backend

log = logging.getLogger("bench.inference")

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- bench/inference.py: begin -->"
END = "<!-- bench/inference.py: end -->"
DEFAULT_BACKENDS = ("tensorrt", "onnxruntime", "torch")
# Size used for dynamic non-batch axes of models in engines/ (a 3-D patch, a radiograph).
DYNAMIC_AXIS_SIZE = 64


@dataclass
class Measurement:
    model: str
    backend: str
    batch: int
    threads: int
    runs: int = 0
    median_ms: float = float("nan")
    p90_ms: float = float("nan")
    items_per_s: float = float("nan")
    max_abs_diff: float | None = None
    within_tolerance: bool | None = None
    note: str = ""


# -- synthetic models ------------------------------------------------------------------------


def _synthetic_models(folder: Path, batch: int) -> list[str]:
    """Export two small conv nets with seeded weights into ``folder`` (benchmark fixtures)."""
    import torch
    from torch import nn

    import spine_node.inference.models as architectures
    from spine_node.inference.repository import import_model

    @architectures.register("bench-seg3d")
    class Seg3d(nn.Module):
        """A 3-D conv encoder/decoder on a 64^3 CT patch, 8 output classes."""

        def __init__(self) -> None:
            super().__init__()
            self.encode = nn.Sequential(
                nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(),
                nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv3d(32, 32, 3, padding=1), nn.ReLU(),
            )
            self.decode = nn.Sequential(
                nn.ConvTranspose3d(32, 16, 2, stride=2), nn.ReLU(),
                nn.Conv3d(16, 8, 3, padding=1),
            )

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.decode(self.encode(image))

    @architectures.register("bench-classifier2d")
    class Classifier2d(nn.Module):
        """A MobileNet-style 2-D classifier on a 256^2 radiograph, 2 classes."""

        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int) -> nn.Sequential:
                return nn.Sequential(
                    nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin),
                    nn.BatchNorm2d(cin), nn.ReLU6(),
                    nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU6(),
                )

            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU6())
            self.blocks = nn.Sequential(block(16, 32), block(32, 64), block(64, 128),
                                        block(128, 128))
            self.head = nn.Linear(128, 2)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            features = self.blocks(self.stem(image)).mean(dim=(2, 3))
            return torch.softmax(self.head(features), dim=1)

    specs = [
        ("synthetic-seg3d", "bench-seg3d", Seg3d, "segmentation", (1, 64, 64, 64),
         "logits", 8),
        ("synthetic-classifier2d", "bench-classifier2d", Classifier2d, "classification",
         (1, 256, 256), "probabilities", 2),
    ]
    names = []
    for seed, (name, arch, factory, task, shape, output, classes) in enumerate(specs):
        torch.manual_seed(seed)
        module = factory().eval()
        staging = folder / f".{name}"
        staging.mkdir(parents=True)
        example = torch.zeros(batch, *shape)
        torch.onnx.export(module, (example,), str(staging / "model.onnx"),
                          input_names=["image"], output_names=[output],
                          dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}},
                          opset_version=17, dynamo=False)
        torch.save(module.state_dict(), staging / "model.pt")
        out_shape = [-1, classes, *shape[1:]] if task == "segmentation" else [-1, classes]
        card = ModelCard(
            name=name, version="bench", task=task,
            description="synthetic benchmark fixture, seeded random weights",
            inputs=(_spec("image", (-1, *shape)),), outputs=(_spec(output, out_shape),),
            labels={i: f"class{i}" for i in range(classes)}, preprocessing={},
            weights={"trained_on": "nothing (seeded random weights, benchmark only)"},
            intended_use="benchmark only", clinical_use=False,
            architecture={"name": arch, "kwargs": {}},
        )
        card.save(staging)
        import_model(staging / "model.onnx", staging / "model.yaml", folder,
                     state_dict=staging / "model.pt")
        names.append(name)
    return names


def _spec(name: str, shape: Any) -> TensorSpec:
    return TensorSpec(name, tuple(int(d) for d in shape))


# -- measuring -------------------------------------------------------------------------------


def _inputs(card: ModelCard, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in card.inputs:
        shape = [batch if (axis == 0 and d == -1) else (DYNAMIC_AXIS_SIZE if d == -1 else d)
                 for axis, d in enumerate(spec.shape)]
        if spec.dtype.startswith("float"):
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
    return inputs


def _time(engine: Engine, inputs: dict[str, np.ndarray], seconds: float,
          max_runs: int) -> list[float]:
    for _ in range(3):  # warm-up: allocator, kernels, caches
        engine.infer(inputs)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < 5 or (time.perf_counter() < deadline and len(latencies) < max_runs):
        start = time.perf_counter()
        engine.infer(inputs)
        latencies.append(time.perf_counter() - start)
    return latencies


def bench_model(card: ModelCard, backends: list[str], options: EngineOptions, batch: int,
                seconds: float, max_runs: int) -> list[Measurement]:
    threads = intra_op_threads(options.threads)
    inputs = _inputs(card, batch)
    loaded: dict[str, Engine] = {}
    results: list[Measurement] = []
    # torch eager first: it is the reference for the outputs and the ratios.
    order = sorted(backends, key=lambda b: parse_backend(b)[0] != "torch")
    for name in order:
        family, overrides = parse_backend(name)
        try:
            engine = backend_class(family).load(card, dataclasses.replace(options, **overrides))
        except (EngineUnavailable, ImportError) as exc:
            results.append(Measurement(card.name, name, batch, threads,
                                       note=f"unavailable: {exc}"))
            continue
        loaded[name] = engine
        latencies = _time(engine, inputs, seconds, max_runs)
        ms = sorted(1000 * t for t in latencies)
        m = Measurement(
            card.name, engine.backend, batch, threads, runs=len(ms),
            median_ms=statistics.median(ms),
            p90_ms=ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))],
            items_per_s=batch * len(ms) / sum(latencies),
        )
        reference = next((e for e in loaded.values() if e.backend.startswith("torch")), None)
        if reference is not None and reference is not engine:
            want, got = reference.infer(inputs), engine.infer(inputs)
            diffs = [float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in want]
            m.max_abs_diff = max(diffs)
            rtol, atol = parity_tolerance(engine.backend)
            m.within_tolerance = all(
                np.allclose(got[k], want[k], rtol=rtol, atol=atol) for k in want
            )
        results.append(m)
        log.info("%s on %s: median %.2f ms, p90 %.2f ms (%d runs)", card.name,
                 engine.backend, m.median_ms, m.p90_ms, m.runs)
    for engine in loaded.values():
        engine.close()
    # Report in the order asked for (measured torch-first for the reference).
    return [results[order.index(name)] for name in backends]


# -- machine facts and the report --------------------------------------------------------


def machine_facts() -> list[tuple[str, str]]:
    facts = [("platform", platform.platform()), ("python", platform.python_version())]
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts.append(("CPU", f"{cpu or 'unknown'}; {available_cores()} core(s) available to "
                         "this process"))
    import onnxruntime as ort

    facts.append(("onnxruntime", f"{ort.__version__}, providers "
                                 f"{', '.join(ort.get_available_providers())}"))
    gpu = "none"
    try:
        import torch

        facts.append(("torch", torch.__version__))
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        facts.append(("torch", "not installed"))
    try:
        import tensorrt

        facts.append(("tensorrt", str(tensorrt.__version__)))
    except ImportError:
        facts.append(("tensorrt", "not installed"))
    facts.append(("GPU", gpu if gpu != "none" else "none: no CUDA GPU on this machine, so "
                                                    "the TensorRT and CUDA rows are unavailable"))
    return facts


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if value != value else f"{value:.{digits}f}"  # NaN -> "-"


def render(results: list[Measurement], command: str, facts: list[tuple[str, str]],
           seconds: float, note: str = "") -> str:
    lines = [
        BEGIN,
        "## Inference engines (`bench/inference.py`)",
        "",
        f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} with:",
        "",
        "```",
        command,
        "```",
        "",
        "| machine | |",
        "| --- | --- |",
        *[f"| {key} | {value} |" for key, value in facts],
        "",
        f"Each engine: 3 warm-up calls, then `engine.infer` timed for about {seconds:g} s "
        "(at least 5 calls); threads is the intra-op thread count given to ONNX Runtime "
        "and torch (`min(cores, configured)`). Latency is per call (one batch); throughput "
        "is items per second; speed-up is torch eager's median latency over the backend's "
        "at the same thread count, in the same run. Max abs diff is against torch eager on "
        "the same input (tolerance: `spine_node.inference.runtime.base.PARITY_TOLERANCE`).",
        "",
        "| model | backend | threads | batch | calls | median ms | p90 ms | items/s | "
        "speed-up vs torch eager | max abs diff | within tolerance |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    torch_median = {(r.model, r.threads): r.median_ms for r in results
                    if r.backend.startswith("torch")}
    seen_notes: set[tuple[str, str, str]] = set()
    for r in results:
        if r.note:
            if (r.model, r.backend, r.note) in seen_notes:
                continue  # same reason at every thread count: say it once
            seen_notes.add((r.model, r.backend, r.note))
            lines.append(f"| {r.model} | {r.backend} | {r.threads} | {r.batch} | - | - | - | - "
                         f"| - | - | {r.note.replace('|', '/')} |")
            continue
        base = torch_median.get((r.model, r.threads), float("nan"))
        ratio = base / r.median_ms if r.median_ms else float("nan")
        diff = "reference" if r.backend.startswith("torch") else (
            "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}")
        within = "-" if r.within_tolerance is None else ("yes" if r.within_tolerance else "NO")
        lines.append(f"| {r.model} | {r.backend} | {r.threads} | {r.batch} | {r.runs} | "
                     f"{_fmt(r.median_ms)} "
                     f"| {_fmt(r.p90_ms)} | {_fmt(r.items_per_s, 1)} | {_fmt(ratio)}x | "
                     f"{diff} | {within} |")
    if note:
        lines += ["", note]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def _set_torch_threads(threads: int) -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines-dir", type=Path, default=None,
                        help="model repository (default: the packaged engines/)")
    parser.add_argument("--synthetic", action="store_true",
                        help="benchmark the built-in synthetic models too")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help="comma-separated backends (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", default="",
                        help="comma-separated intra-op thread caps to compare, e.g. 1,2 "
                             "(default: all available cores)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="timing budget per engine (default: %(default)s)")
    parser.add_argument("--max-runs", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a sentence to print under the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for name in backends:
        parse_backend(name)
    if not any(parse_backend(b)[0] == "torch" for b in backends):
        backends.append("torch")  # the reference for ratios and outputs
    thread_counts = sorted({intra_op_threads(int(t)) for t in args.threads.split(",")
                            if t.strip()} or {intra_op_threads(None)})

    repo = ModelRepository(args.engines_dir)
    cards = repo.cards()
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="spine-bench-") as scratch:
        if not cards or args.synthetic:
            names = _synthetic_models(Path(scratch), args.batch)
            cards += [ModelRepository(scratch).card(n) for n in names]
        for card in cards:
            for threads in thread_counts:
                _set_torch_threads(threads)
                options = EngineOptions(threads=threads, max_batch=max(8, args.batch),
                                        opt_batch=args.batch)
                results += bench_model(card, backends, options, args.batch, args.seconds,
                                       args.max_runs)
    command = "python -m bench.inference" + (
        " " + shlex.join(sys.argv[1:] if argv is None else argv)
        if (sys.argv[1:] if argv is None else argv) else "")
    section = render(results, command, machine_facts(), args.seconds, args.note)
    replace_section(args.output, BEGIN, END, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
