"""Stage 2 alone on the second CT generator (or the training generator), per fracture kind.

Crops every C1-C7 vertebra of second-generator scans at its *true* box (stage 1 left out),
scores them with the fracture model of one or more engine folders and prints, per
fracture kind, the vertebra AUC of fractured crops of that kind against intact crops of
the same levels, with n and a 95 % interval from a bootstrap over scans (the vertebrae
of one scan are resampled together, as bench/eval_ct.py does for its vertebra AUC). It tells whether a miss comes from
stage 2 (the crop and the classifier) or from stage 1 (levels, boxes).

    python -m bench.ct_kinds --n 120 --cache bench/out/ct_kinds.npz
    python -m bench.ct_kinds --cache bench/out/ct_kinds.npz --engines engines other/engines

The scans force one fracture pattern each, in turn (C2 dens, C2 hangman, C1 Jefferson, a
lower-level line, compression, burst, teardrop, spinous process) with every fifth scan
fracture-free, so each kind has dozens of cases at n = 120. Seeds start at 7 100 000,
apart from the benchmark's (bench/eval_ct.py). Synthetic data; not for clinical use.

``--generator same`` reads the training generator's default phantoms
(``spine_node.inference.phantoms.generate``, 2 mm grid, the benchmark's ``same`` cohort)
the same way, with C2 and C5 patterns forced in turn and the kind each draw took
(``params["fracture_patterns"]``: a plain C2 crack is a line at the base of the dens in
half the draws, "dens base"; the varied patterns give "dens II", "dens III", "hangman"):

    python -m bench.ct_kinds --generator same --n 120 --cache bench/out/ct_kinds_same.npz
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.eval_ct import _cervical, model_provider

SEED_BASE = 7_100_000
#: (level, kind) forced in turn; None: a fracture-free scan.
PATTERNS: tuple[tuple[str, str] | None, ...] = (
    ("C2", "dens"), ("C2", "hangman"), ("C1", "jefferson"), None, ("C4", "line"),
    ("C5", "compression"), ("C6", "burst"), ("C2", "dens"), None, ("C3", "teardrop"),
    ("C7", "spinous"), ("C2", "hangman"), ("C6", "line"), None, ("C5", "burst"))


def case_crops(seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Normalised stage-2 crops of one second-generator scan: crops, level, kind ('' intact)."""
    from spine_node.inference.heldout import ct as heldout

    pattern = PATTERNS[(seed - SEED_BASE) % len(PATTERNS)]
    fractures = {pattern[0]: pattern[1]} if pattern else {}
    ct = heldout.generate(seed, fractures=fractures)
    return _true_box_crops(np.asarray(ct.hu, np.float32), ct.spacing, np.asarray(ct.labels),
                           ct.fractures, set(ct.levels_in_field))


def _true_box_crops(hu: np.ndarray, spacing: Sequence[float], labels: np.ndarray,
                    kinds_of: Mapping[str, str], listed: set[str] | None = None
                    ) -> tuple[np.ndarray, list[str], list[str]]:
    """Normalised stage-2 crops of every cervical level of ``labels`` (those in ``listed``
    where given) at its true box, its level and kind (``kinds_of``; '' intact)."""
    from spine_node.inference.pipelines import ct_cspine

    pre = ct_cspine.FRACTURE_PREPROCESSING
    found = ct_cspine.stage2_crops(hu, spacing, _cervical(labels), spacing, pre)
    crops, levels, kinds = [], [], []
    for level, crop in found.items():
        if listed is not None and level not in listed:
            continue
        crops.append(ct_cspine.normalise_crop(crop))
        levels.append(level)
        kinds.append(kinds_of.get(level, ""))
    shape = (0, *(int(n) for n in pre["crop_shape"]))
    return (np.stack(crops) if crops else np.zeros(shape, np.float32)), levels, kinds


#: The training generator's patterns forced in turn: (level, kind, varied_fractures).
SAME_PATTERNS: tuple[tuple[str, str, bool] | None, ...] = (
    ("C2", "crack", False), ("C2", "dens", True), None, ("C2", "crack", False),
    ("C2", "wedge", False), ("C2", "hangman", True), None, ("C5", "crack", False),
    ("C1", "crack", False), ("C5", "wedge", False))


def same_case_crops(seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """The same for one of the training generator's default phantoms: crops, level, kind."""
    from spine_node.inference import phantoms

    pattern = SAME_PATTERNS[(seed - SEED_BASE) % len(SAME_PATTERNS)]
    forced = ({"fractures": {pattern[0]: pattern[1]}, "varied_fractures": pattern[2]}
              if pattern else {"fractures": {}})
    ph = phantoms.generate(seed, **forced)
    return _true_box_crops(ph.hu, ph.spacing, ph.labels, ph.params["fracture_patterns"])


def build_cache(n: int, path: Path, workers: int, generator: str = "cross") -> None:
    seeds = list(range(SEED_BASE, SEED_BASE + n))
    crops, levels, kinds, cases = [], [], [], []
    reader = same_case_crops if generator == "same" else case_crops
    with ProcessPoolExecutor(workers) as pool:
        for k, (c, lv, kd) in enumerate(pool.map(reader, seeds)):
            crops.append(c.astype(np.float16))
            levels += lv
            kinds += kd
            cases += [seeds[k]] * len(lv)
            print(f"\r{k + 1}/{n} scans", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, crops=np.concatenate(crops), levels=np.asarray(levels),
                        kinds=np.asarray(kinds), cases=np.asarray(cases))


def scores(engines: Path, crops: np.ndarray) -> np.ndarray:
    """Stage 2's probability of every crop, by the fracture model in ``engines`` loaded as
    the pipeline loads it (onnxruntime on the CPU), eight crops a call."""
    from spine_node.inference.pipelines import engine_card
    from spine_node.inference.pipelines.ct_cspine import FRACTURE_MODEL, _single_output

    engine = model_provider(engines)(FRACTURE_MODEL)
    card = engine_card(engine)
    out = [_single_output(engine.infer({card.inputs[0].name: crops[i:i + 8][None].astype(np.float32)}),
                          card)[0] for i in range(0, len(crops), 8)]
    return np.concatenate(out).astype(np.float64)


def report(engines: Path, data: dict[str, np.ndarray]) -> list[str]:
    from spine_node.inference.stats import auc_ci

    p = scores(engines, data["crops"])
    levels, kinds = data["levels"], data["kinds"]
    lines = [f"{engines}", f"{'kind':<12} {'n pos':>5} {'n neg':>5}  AUC (95 % CI)"]
    for kind in sorted(set(kinds) - {""}) + ["all"]:
        pos = kinds != "" if kind == "all" else kinds == kind
        at = set(levels[pos])
        neg = (kinds == "") & np.isin(levels, list(at))
        y = np.r_[np.ones(pos.sum()), np.zeros(neg.sum())]
        result = auc_ci(y, np.r_[p[pos], p[neg]], method="bootstrap",
                        groups=np.r_[data["cases"][pos], data["cases"][neg]])
        lines.append(f"{kind:<12} {int(pos.sum()):>5} {int(neg.sum()):>5}  "
                     f"{result.auc:.3f} ({result.low:.3f}-{result.high:.3f})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=0, help="scans to generate into --cache (0: use it)")
    parser.add_argument("--cache", type=Path, default=Path("bench/out/ct_kinds.npz"))
    parser.add_argument("--engines", type=Path, nargs="*", default=[Path("engines")])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--generator", choices=("cross", "same"), default="cross",
                        help="scans of the second generator (default) or the training one")
    args = parser.parse_args(argv)
    if args.n:
        build_cache(args.n, args.cache, args.workers, args.generator)
    data = dict(np.load(args.cache))
    for engines in args.engines:
        print("\n".join(report(engines, data)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
