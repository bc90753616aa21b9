"""Stage 1's boxes against the true ones, per level, on one benchmark cohort.

Runs the CT pipeline of one or more engine folders on the cases of a bench/eval_ct.py
cohort (the same seeds, so the figures sit beside bench/RESULTS.md) and prints, per level
present in the field, the Dice of the predicted vertebra and its bounding box against the
true one: the predicted / true extent along each axis (head-feet, front-back, across)
and the shift of the box centre in mm. Stage 2 reads crops cut from these boxes, so a
box that stops short of a vertebra's processes or spills over its neighbours explains
misses there that the classifier alone does not (bench/ct_kinds.py scores stage 2 at the
true boxes).

    python -m bench.ct_boxes --cohort cross --n 24
    python -m bench.ct_boxes --cohort cross --n 40 --engines engines other/engines

Synthetic data; not for clinical use.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.eval_ct import COHORTS, SEED_BASE, cohort_seeds, make_case, model_provider, predicted_labels, run_pipeline
from spine_node.inference.pipelines.ct_cspine import LEVELS, level_boxes_mm

#: Levels with less of their volume than this inside the field are left out.
MIN_IN_FIELD = 0.99
#: Level groups of the table (C3-C6 look alike and are pooled).
GROUPS: dict[str, tuple[str, ...]] = {"C1": ("C1",), "C2": ("C2",),
                                      "C3-C6": ("C3", "C4", "C5", "C6"), "C7": ("C7",)}


_PROVIDERS: dict[Path, Any] = {}


def case_boxes(cohort: str, seed: int, engines: Path) -> list[dict[str, Any]]:
    """One row per level fully in the field: level, Dice, true extent, ratio, shift."""
    case = make_case(COHORTS[cohort], seed)
    if engines not in _PROVIDERS:
        _PROVIDERS[engines] = model_provider(engines)
    findings, uids, _, _ = run_pipeline(case, _PROVIDERS[engines])
    predicted, _ = predicted_labels(findings, uids, case.hu.shape)
    # The boxes stage 2 cuts its crops from (mm, (lo, hi) per axis), true and predicted.
    true_boxes = level_boxes_mm(case.labels, case.spacing)
    found_boxes = level_boxes_mm(predicted, case.spacing)
    rows = []
    for number, level in enumerate(LEVELS, start=1):
        if case.in_field.get(level, 0.0) < MIN_IN_FIELD or level not in true_boxes:
            continue
        truth, guess = case.labels == number, predicted == number
        dice = 2.0 * float((truth & guess).sum()) / float(truth.sum() + guess.sum())
        true_extent, true_centre = np.ptp(true_boxes[level], axis=0), true_boxes[level].mean(axis=0)
        row: dict[str, Any] = {"level": level, "dice": dice, "extent": true_extent.tolist()}
        if level in found_boxes:
            found = found_boxes[level]
            row["ratio"] = (np.ptp(found, axis=0) / true_extent).tolist()
            row["shift"] = (found.mean(axis=0) - true_centre).tolist()
        rows.append(row)
    return rows


def _axes(values: Sequence[Sequence[float]], digits: int) -> str:
    med = np.median(np.asarray(values, float), axis=0)
    return " / ".join(f"{v:.{digits}f}" for v in med)


def table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| level | n | Dice (median) | true extent (mm) | extent ratio | centre shift (mm) | not found |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for group, levels in GROUPS.items():
        mine = [r for r in rows if r["level"] in levels]
        if not mine:
            continue
        found = [r for r in mine if "ratio" in r]
        lines.append(
            f"| {group} | {len(mine)} | {np.median([r['dice'] for r in mine]):.2f} | "
            f"{_axes([r['extent'] for r in mine], 0)} | "
            f"{_axes([r['ratio'] for r in found], 2) if found else '-'} | "
            f"{_axes([r['shift'] for r in found], 1) if found else '-'} | {len(mine) - len(found)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ct_boxes", description=__doc__.split("\n")[0])
    parser.add_argument("--cohort", default="cross", choices=sorted(COHORTS),
                        help="bench/eval_ct.py cohort (default: %(default)s)")
    parser.add_argument("--n", type=int, default=24, help="cases (default: %(default)s)")
    parser.add_argument("--engines", type=Path, nargs="*", default=[Path("engines")])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    seeds = cohort_seeds(args.n, SEED_BASE)
    for engines in args.engines:
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            per_case = list(pool.map(case_boxes, [args.cohort] * len(seeds), seeds,
                                     [engines] * len(seeds)))
        rows = [row for case in per_case for row in case]
        print(f"\n{engines} on {args.cohort}, seeds {seeds[0]}-{seeds[-1]} (axes head-feet / "
              "front-back / across):")
        print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
