"""Held-out evaluation of the spine X-ray pipelines, per view, with 95 % intervals.

Every image goes the production way: written as a DICOM file, read by the pipeline's
reader (pixel size from the header), gated for view and content, then the model for its
view. Cohorts (``--n`` studies each, every study an AP and a LAT image of one patient):

``same``
    the training generator on fresh seeds (``inference.phantoms`` 1 mm DRRs of the
    radiographic cohort with one randomised acquisition from ``inference.train.xray_augment``
    per view, no trimmed field).
``cross``
    the independent evaluation generator ``inference.heldout.xray`` (never used in
    training), 0.3 mm detector pixels (its matrix is the field over the pixel size, so this
    keeps a 200-study cohort within minutes on 2 cores), 3e4 photons.
``fov0.7``, ``fov1.5``, ``photons3e2``, ``blur1.5``, ``rot10``
    ``cross`` with one acquisition changed (field of view x0.7 / x1.5 at the same matrix,
    3e2 photons per pixel, 1.5 px detector blur, 10 degrees rotation).
``junk``
    images that are not spine radiographs: noise, blank, chest-like and hand-like
    radiographs and CT slices from this project's junk generator, plus the evaluation
    generator's negative kinds where it has any.

Metrics: classifier AUC (DeLong 95 % interval) per view, sensitivity / specificity at the
card's operating point (Wilson), the share of normals flagged abnormal, the share of
images the gate refused; segmenter Dice per structure (mean over images, bootstrap 95 %
interval); for junk the share "not assessable", "present" findings and masks. Results go
into each model card's ``weights.evaluation`` and a section of ``bench/RESULTS.md``::

    nice python -m bench.eval_xray --n 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from bench.harness import REPO, write_section
from spine_node.engines import ENGINES_DIR
from spine_node.inference.card import ModelCard
from spine_node.inference.pipelines import get as get_pipeline
from spine_node.inference.pipelines.xray import (
    AP_STRUCTURES,
    CSPINE_MODEL,
    FRACTURE_MODEL,
    LAT_STRUCTURES,
    PAIR_MODEL,
    TISSUE_MODEL,
    TISSUES,
    UNET_AP_MODEL,
    UNET_LAT_MODEL,
)
from spine_node.inference.series import SeriesRef
from spine_node.inference.stats import auc_ci, bootstrap, wilson_ci

logger = logging.getLogger(__name__)

CROSS = {"pixel_spacing_mm": 0.3, "photons": 3e4}
PERTURBATIONS: dict[str, dict[str, float]] = {
    "fov0.7": {"fov_scale": 0.7},
    "fov1.5": {"fov_scale": 1.5},
    "photons3e2": {"photons": 3e2},
    "blur1.5": {"blur_px": 1.5},
    "rot10": {"rotation_deg": 10.0},
}
COHORTS = ("same", "cross", *PERTURBATIONS, "junk")
#: Seeds: far from training (20260523 + i), validation (90000000 + i) and the tests.
SEED_BASE = {"same": 71000000, "cross": 72000000, "junk": 73000000,
             **{name: 72000000 for name in PERTURBATIONS}}
JUNK_KINDS = ("uniform_noise", "blank", "chest", "hand", "ct_slice")


# --------------------------------------------------------------------------- models


class _Provider:
    """ONNX Runtime CPU engines from ``engines/``, one thread each, loaded once."""

    def __init__(self, root: Path = ENGINES_DIR) -> None:
        self.root = root
        self.loaded: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self.loaded:
            from spine_node.inference.runtime.base import EngineOptions
            from spine_node.inference.runtime.onnxruntime_backend import OnnxRuntimeEngine

            card = ModelCard.load(self.root / name)
            self.loaded[name] = OnnxRuntimeEngine.load(card, EngineOptions(threads=1, device="cpu"))
        return self.loaded[name]


_MODELS: _Provider | None = None
#: The model repository the run reads (``--engines-dir``; forked workers inherit it).
_MODELS_ROOT: Path = ENGINES_DIR


def _models() -> _Provider:
    global _MODELS
    if _MODELS is None:
        _MODELS = _Provider(_MODELS_ROOT)
    return _MODELS


# --------------------------------------------------------------------------- images


@dataclass
class Image:
    """One radiograph of a cohort with its truth, before it is written as DICOM."""

    pixels: np.ndarray              # uint16 MONOCHROME2
    spacing: tuple[float, float] | None
    view: str
    structures: np.ndarray | None = None   # model order, 0 background
    tissues: np.ndarray | None = None      # 1 bone 2 soft 3 open, 0 not labelled
    fracture: bool = False
    dislocation: bool = False
    kind: str = "cspine"


def same_generator(seed: int) -> list[Image]:
    """AP and LAT of one fresh training-generator phantom, one random acquisition each."""
    from spine_node.inference.train import xray as train
    from spine_node.inference.train import xray_augment as augment

    views = train.phantom_views(seed, train.RADIOGRAPHIC_COHORT)
    grid = train.RADIOGRAPHIC_COHORT.spacing_mm
    out = []
    for view, integral, structures, tissue in (
            ("AP", views.ap, views.ap_structures, views.ap_tissue),
            ("LAT", views.lat, views.lat_structures, views.lat_tissue)):
        rng = np.random.default_rng([seed, 5, len(view)])
        acq = augment.draw(rng, coverage_chance=0.0)
        image, _, _ = augment.acquire(integral, grid, acq, rng)
        stored = np.rint(np.clip(image / max(float(image.max()), 1e-6), 0, 1) * 4095).astype(np.uint16)
        out.append(Image(stored, (grid, grid), view,
                         augment.transform_map(structures, acq, grid, 0),
                         augment.transform_map(tissue, acq, grid, 0),
                         views.cspine_fracture, views.cspine_dislocation))
    return out


def cross_generator(seed: int, **params: float) -> list[Image]:
    """AP and LAT of one patient of the evaluation generator."""
    from spine_node.inference.heldout import xray as heldout

    out = []
    for view in ("AP", "LAT"):
        rad = heldout.generate(seed, view=view, **{**CROSS, **params})
        out.append(Image(rad.image, None, view, rad.structures, rad.tissues, bool(rad.fracture),
                         bool(rad.dislocation)))
        out[-1].raw = rad  # type: ignore[attr-defined]
    return out


def junk_images(seed: int) -> list[Image]:
    """Images that are not spine radiographs (see the module docstring)."""
    from spine_node.inference import phantoms
    from spine_node.inference.train import xray_augment as augment

    rng = np.random.default_rng([seed, 9])
    out = []
    for kind in JUNK_KINDS:
        if kind == "uniform_noise":
            pixels, spacing = rng.uniform(0, 4095, (512, 512)), None
        elif kind == "blank":
            pixels, spacing = np.full((600, 500), rng.uniform(0, 4095)), (0.15, 0.15)
        elif kind == "ct_slice":
            phantom = phantoms.generate(seed, region="cervical")
            hu = phantom.hu[int(rng.integers(10, phantom.hu.shape[0] - 10))]
            pixels = np.kron(np.clip(hu + 1024, 0, 4095), np.ones((4, 4)))
            spacing = (phantom.spacing[1] / 4, phantom.spacing[2] / 4)
        else:
            image, grid = augment.junk(kind, rng, 1.0)
            pixels, spacing = image / max(float(image.max()), 1e-6) * 4095, (grid, grid)
        out.append(Image(np.clip(pixels, 0, 4095).astype(np.uint16), spacing,
                         "AP" if rng.random() < 0.5 else "LAT", kind=kind))
    try:
        from spine_node.inference.heldout import xray as heldout

        for kind in getattr(heldout, "NEGATIVE_KINDS", ()):
            rad = heldout.generate(seed, view="AP", kind=kind, **CROSS)
            image = Image(rad.image, None, "AP", kind=f"heldout-{kind}")
            image.raw = rad  # type: ignore[attr-defined]
            out.append(image)
    except ImportError:
        pass
    return out


def cohort_images(cohort: str, seed: int) -> list[Image]:
    if cohort == "same":
        return same_generator(seed)
    if cohort == "cross":
        return cross_generator(seed)
    if cohort in PERTURBATIONS:
        return cross_generator(seed, **PERTURBATIONS[cohort])
    if cohort == "junk":
        return junk_images(seed)
    raise ValueError(f"unknown cohort {cohort!r}; expected one of {COHORTS}")


def write_image(image: Image, folder: Path, seed: int, index: int) -> SeriesRef:
    """``image`` as a DX file in its own series folder; the reader sees only the header."""
    from spine_node.inference.heldout import xray as heldout

    folder.mkdir(parents=True, exist_ok=True)
    raw = getattr(image, "raw", None)
    if raw is not None:
        path = heldout.write_dicom(raw, folder / "image.dcm", seed=seed,
                                   study_uid=f"2.25.{seed}")
    else:
        from spine_node.inference import phantoms

        pixels = image.pixels.astype(np.float32) / 4095.0
        path = phantoms.write_radiograph(pixels, folder, view=image.view, seed=seed * 10 + index,
                                         pixel_spacing=image.spacing or (0.15, 0.15),
                                         study_uid=f"2.25.{seed}")
        if image.spacing is None:  # no pixel size in the file: the pipeline must assume one
            ds = pydicom.dcmread(path)
            for keyword in ("ImagerPixelSpacing", "PixelSpacing", "PixelSpacingCalibrationType"):
                if keyword in ds:
                    delattr(ds, keyword)
            ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SeriesRef(study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                     path=folder, modality=str(ds.Modality),
                     body_part=str(ds.get("BodyPartExamined", "")),
                     view_position=str(ds.get("ViewPosition", "")),
                     sop_class_uid=str(ds.SOPClassUID), instance_count=1)


# --------------------------------------------------------------------------- one study


def _dice(predicted: np.ndarray, truth: np.ndarray, count: int, labelled: np.ndarray | None = None
          ) -> dict[int, float]:
    out = {}
    for k in range(1, count + 1):
        p, t = predicted == k, truth == k
        if labelled is not None:
            p = p & labelled
        total = int(p.sum()) + int(t.sum())
        if total:
            out[k] = 2.0 * float((p & t).sum()) / total
    return out


def evaluate_study(cohort: str, seed: int) -> list[dict[str, Any]]:
    """Run every X-ray pipeline on one study of ``cohort``; one record per (pipeline, view)."""
    models = _models()
    records: list[dict[str, Any]] = []
    images = cohort_images(cohort, seed)
    with tempfile.TemporaryDirectory() as tmp:
        refs = [write_image(image, Path(tmp) / f"s{i}", seed, i) for i, image in enumerate(images)]
        for image, ref in zip(images, refs, strict=True):
            base = {"cohort": cohort, "seed": seed, "view": image.view, "kind": image.kind}
            for pipeline in ("xray-fracture", "xray-cspine-classify", "xray-spine-seg", "xray-tissue-seg"):
                result = get_pipeline(pipeline).run([ref], models)
                record = {**base, "pipeline": pipeline, "performed": result.performed,
                          "reason": result.not_performed_reason or "",
                          "present": sum(f.present for f in result.findings),
                          "mask": bool(result.segmentation is not None
                                       and result.segmentation.labels.any()),
                          "fracture": image.fracture, "dislocation": image.dislocation,
                          "assessed_views": [s.site for s in result.site_status
                                             if s.assessment == "assessed"]}
                for finding in result.findings:
                    record[f"p_{finding.kind}"] = finding.probability
                    record[f"t_{finding.kind}"] = finding.threshold
                    record[f"r_{finding.kind}"] = finding.rule_out
                if result.segmentation is not None and image.structures is not None:
                    labels = result.segmentation.labels[0]
                    if pipeline == "xray-spine-seg":
                        names = AP_STRUCTURES if result.model.name == UNET_AP_MODEL else LAT_STRUCTURES
                        record["model"] = result.model.name
                        record["dice"] = {names[k - 1]: v for k, v in
                                          _dice(labels, image.structures, len(names)).items()}
                    elif image.tissues is not None:
                        record["dice"] = {TISSUES[k - 1]: v for k, v in
                                          _dice(labels, image.tissues, len(TISSUES),
                                                image.tissues > 0).items()}
                records.append(record)
        if cohort != "junk":
            result = get_pipeline("xray-pair-classify").run(refs, models)
            record = {"cohort": cohort, "seed": seed, "view": "pair", "kind": "cspine",
                      "pipeline": "xray-pair-classify", "performed": result.performed,
                      "reason": result.not_performed_reason or "",
                      "present": sum(f.present for f in result.findings), "mask": False,
                      "damage": any(i.fracture or i.dislocation for i in images)}
            for finding in result.findings:
                record[f"p_{finding.kind}"] = finding.probability
                record[f"t_{finding.kind}"] = finding.threshold
                record[f"r_{finding.kind}"] = finding.rule_out
            records.append(record)
    return records


def _study(args: tuple[str, int]) -> list[dict[str, Any]]:
    try:
        return evaluate_study(*args)
    except Exception as exc:  # one broken study must not lose the run; it is counted
        logger.exception("study %s/%s failed", *args)
        return [{"cohort": args[0], "seed": args[1], "error": f"{type(exc).__name__}: {exc}"}]


def run(cohorts: Sequence[str], n: int, workers: int = 1) -> list[dict[str, Any]]:
    """Records of ``n`` studies per cohort (``n // 5`` junk sets of five kinds for junk)."""
    tasks = []
    for cohort in cohorts:
        count = max(1, n // len(JUNK_KINDS)) if cohort == "junk" else n
        tasks += [(cohort, SEED_BASE[cohort] + i) for i in range(count)]
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            for k, out in enumerate(pool.map(_study, tasks, chunksize=4)):
                records += out
                _tick(k + 1, len(tasks), started)
    else:
        for k, task in enumerate(tasks):
            records += _study(task)
            _tick(k + 1, len(tasks), started)
    return records


def _tick(done: int, total: int, started: float) -> None:
    if done % 20 == 0 or done == total:
        elapsed = time.monotonic() - started
        print(f"\r{done}/{total} studies, {elapsed:.0f} s, ~{elapsed / done * (total - done):.0f} s left",
              end="" if done < total else "\n", flush=True)


# --------------------------------------------------------------------------- metrics


#: (pipeline, finding kind, truth key, views, model) of each classifier metric.
CLASSIFIERS = (
    ("xray-fracture", "fracture", "fracture", ("AP", "LAT"), FRACTURE_MODEL),
    ("xray-cspine-classify", "fracture", "fracture", ("LAT",), CSPINE_MODEL),
    ("xray-cspine-classify", "dislocation", "dislocation", ("LAT",), CSPINE_MODEL),
    ("xray-pair-classify", "damage", "damage", ("pair",), PAIR_MODEL),
)
SEGMENTERS = (
    ("xray-spine-seg", "AP", UNET_AP_MODEL, AP_STRUCTURES),
    ("xray-spine-seg", "LAT", UNET_LAT_MODEL, LAT_STRUCTURES),
    ("xray-tissue-seg", "AP", TISSUE_MODEL, TISSUES),
    ("xray-tissue-seg", "LAT", TISSUE_MODEL, TISSUES),
)


def _r(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics per cohort: ``{cohort: {"classifiers": {...}, "segmenters": {...}, ...}}``."""
    out: dict[str, Any] = {}
    errors = [r for r in records if "error" in r]
    cohorts = list(dict.fromkeys(r["cohort"] for r in records))
    for cohort in cohorts:
        rows = [r for r in records if r["cohort"] == cohort and "error" not in r]
        entry: dict[str, Any] = {"errors": sum(1 for r in errors if r["cohort"] == cohort)}
        if cohort == "junk":
            entry["junk"] = {}
            for kind in dict.fromkeys(r["kind"] for r in rows):
                runs = [r for r in rows if r["kind"] == kind]
                entry["junk"][kind] = {
                    "runs": len(runs), "images": len({r["seed"] for r in runs}),
                    "not_assessable": _r(np.mean([not r["performed"] for r in runs])),
                    "present_findings": int(sum(r["present"] for r in runs)),
                    "masks": int(sum(r["mask"] for r in runs))}
            out[cohort] = entry
            continue
        entry["classifiers"] = {}
        for pipeline, kind, truth, views, model in CLASSIFIERS:
            for view in views:
                runs = [r for r in rows if r["pipeline"] == pipeline and r["view"] == view]
                scored = [r for r in runs if f"p_{kind}" in r]
                y = np.array([bool(r[truth]) for r in scored], int)
                p = np.array([r[f"p_{kind}"] for r in scored])
                flagged = np.array([r[f"p_{kind}"] >= r[f"t_{kind}"] for r in scored], bool)
                # Present or indeterminate: at or above the rule-out point where the card has one.
                looked = np.array([r[f"p_{kind}"] >= min(r[f"t_{kind}"], r.get(f"r_{kind}") or r[f"t_{kind}"])
                                   for r in scored], bool)
                key = f"{model}.{kind}.{view}"
                metric: dict[str, Any] = {"n": len(runs), "n_scored": len(scored),
                                          "positives": int(y.sum()),
                                          "refused": _r(1 - len(scored) / max(len(runs), 1))}
                if len(scored) and 0 < y.sum() < len(y):
                    ci = auc_ci(y, p)
                    metric.update(auc=_r(ci.auc), auc_ci95=[_r(ci.low), _r(ci.high)])
                    tp, pos = int((flagged & (y == 1)).sum()), int(y.sum())
                    tn, neg = int((~flagged & (y == 0)).sum()), int((y == 0).sum())
                    metric.update(
                        sensitivity=_r(tp / pos), sensitivity_ci95=[_r(v) for v in wilson_ci(tp, pos)],
                        specificity=_r(tn / neg), specificity_ci95=[_r(v) for v in wilson_ci(tn, neg)],
                        flagged_normals=_r(1 - tn / neg))
                    if any(r.get(f"r_{kind}") is not None for r in scored):
                        metric.update(
                            indeterminate_sensitivity=_r(int((looked & (y == 1)).sum()) / pos),
                            indeterminate_flagged_normals=_r(int((looked & (y == 0)).sum()) / neg))
                entry["classifiers"][key] = metric
        entry["segmenters"] = {}
        for pipeline, view, model, names in SEGMENTERS:
            runs = [r for r in rows if r["pipeline"] == pipeline and r["view"] == view]
            scored = [r for r in runs if "dice" in r]
            metric = {"n": len(runs), "n_scored": len(scored),
                      "refused": _r(1 - len(scored) / max(len(runs), 1))}
            means = []
            for name in names:
                values = np.array([r["dice"].get(name, 0.0) for r in scored])
                if len(values):
                    low, high = bootstrap(np.mean, values, n_resamples=1000)
                    metric[f"dice_{name}"] = _r(values.mean())
                    metric[f"dice_{name}_ci95"] = [_r(low), _r(high)]
                    means.append(values)
            if means:
                per_image = np.mean(np.stack(means), axis=0)
                low, high = bootstrap(np.mean, per_image, n_resamples=1000)
                metric["dice_mean"] = _r(per_image.mean())
                metric["dice_mean_ci95"] = [_r(low), _r(high)]
            entry["segmenters"][f"{model}.{view}"] = metric
        out[cohort] = entry
    return out


# --------------------------------------------------------------------------- reports


def _ci(metric: dict[str, Any], key: str) -> str:
    value = metric.get(key)
    if value is None:
        return "-"
    low, high = metric.get(f"{key}_ci95", [None, None])
    return f"{value:.3f} ({low:.3f}-{high:.3f})" if low is not None else f"{value:.3f}"


def markdown(summary: dict[str, Any], command: str, seconds: float) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{command}` "
             f"({seconds / 60:.0f} min on this 2-core machine, shared). Every image is written as "
             "DICOM and read back by the pipelines (pixel size from the header, view gate, the "
             "model for the view). AUC with DeLong 95 % intervals; sensitivity, specificity and "
             "normals flagged at the card's operating point (Wilson); 'with indeterminate': the same "
             "counting indeterminate calls (between the card's rule-out and rule-in points) as "
             "flagged; Dice is the mean over images "
             "(bootstrap 95 %); 'refused' is the share of spine images the gate called not "
             "assessable. Synthetic images only; not for clinical use.", ""]
    cohorts = [c for c in summary if c != "junk"]
    lines += ["### Classifiers", "", "| model.finding.view | " + " | ".join(cohorts) + " |",
              "| --- |" + " --- |" * len(cohorts)]
    keys = list(dict.fromkeys(k for c in cohorts for k in summary[c]["classifiers"]))
    for key in keys:
        cells = []
        for c in cohorts:
            m = summary[c]["classifiers"].get(key, {})
            cells.append(f"AUC {_ci(m, 'auc')}; sens {m.get('sensitivity', '-')}, spec "
                         f"{m.get('specificity', '-')}; flagged normals {m.get('flagged_normals', '-')}; "
                         + (f"with indeterminate: sens {m['indeterminate_sensitivity']}, flagged normals "
                            f"{m['indeterminate_flagged_normals']}; " if "indeterminate_sensitivity" in m else "")
                         + f"refused {m.get('refused', '-')}; n {m.get('n', 0)} ({m.get('positives', 0)} pos)")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "### Segmenters", "", "| model.view | " + " | ".join(cohorts) + " |",
              "| --- |" + " --- |" * len(cohorts)]
    keys = list(dict.fromkeys(k for c in cohorts for k in summary[c]["segmenters"]))
    for key in keys:
        cells = []
        for c in cohorts:
            m = summary[c]["segmenters"].get(key, {})
            extra = ""
            if "dice_posterior_elements" in m:
                extra = f"; posterior elements {_ci(m, 'dice_posterior_elements')}"
            cells.append(f"Dice {_ci(m, 'dice_mean')}{extra}; refused {m.get('refused', '-')}; n {m.get('n', 0)}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if "junk" in summary:
        lines += ["", "### Not spine radiographs (junk)", "",
                  "| kind | images | pipeline runs | not assessable | present findings | masks |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for kind, m in summary["junk"]["junk"].items():
            lines.append(f"| {kind} | {m['images']} | {m['runs']} | {m['not_assessable']} | "
                         f"{m['present_findings']} | {m['masks']} |")
    errors = {c: e["errors"] for c, e in summary.items() if e.get("errors")}
    if errors:
        lines += ["", f"Studies that raised an error (counted, left out): {errors}"]
    return "\n".join(lines)


def write_cards(summary: dict[str, Any], root: Path = ENGINES_DIR) -> None:
    """Each card's ``weights.evaluation``: its rows of ``summary`` per cohort."""
    import yaml

    for model in (PAIR_MODEL, FRACTURE_MODEL, CSPINE_MODEL, UNET_AP_MODEL, UNET_LAT_MODEL, TISSUE_MODEL):
        path = root / model / "model.yaml"
        data = yaml.safe_load(path.read_text())
        evaluation: dict[str, Any] = {
            "command": "python -m bench.eval_xray", "note": "synthetic images only; see bench/RESULTS.md"}
        for cohort, entry in summary.items():
            if cohort == "junk":
                evaluation["junk"] = entry["junk"]
                continue
            rows = {k: v for group in ("classifiers", "segmenters")
                    for k, v in entry.get(group, {}).items() if k.startswith(model + ".")}
            evaluation[cohort] = {k[len(model) + 1:]: v for k, v in rows.items()}
        data["weights"]["evaluation"] = evaluation
        path.write_text(yaml.safe_dump(data, sort_keys=False, width=100))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="studies per cohort (AP + LAT each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cohorts", nargs="*", default=list(COHORTS), choices=COHORTS)
    parser.add_argument("--no-write", action="store_true", help="print only; cards and RESULTS.md untouched")
    parser.add_argument("--records", type=Path, default=Path("bench/out/eval_xray_records.json"),
                        help="per-image records (JSON), written after each cohort")
    parser.add_argument("--from-records", action="store_true",
                        help="summarise the records file of an earlier run instead of running")
    parser.add_argument("--engines-dir", type=Path, default=ENGINES_DIR,
                        help="model repository to evaluate (default: the package's engines/); "
                             "its cards get the figures")
    args = parser.parse_args(argv)
    global _MODELS_ROOT
    _MODELS_ROOT = args.engines_dir
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    if args.from_records:
        saved = json.loads(args.records.read_text())
        records, seconds = saved["records"], saved["seconds"]
    else:
        records = []
        for cohort in args.cohorts:
            records += run([cohort], args.n, args.workers)
            seconds = time.monotonic() - started
            args.records.parent.mkdir(parents=True, exist_ok=True)
            args.records.write_text(json.dumps({"records": records, "seconds": seconds}, default=str))
    summary = summarise(records)
    command = "python -m bench.eval_xray " + " ".join(
        [f"--n {args.n}", f"--workers {args.workers}"]
        + ([f"--cohorts {' '.join(args.cohorts)}"] if list(args.cohorts) != list(COHORTS) else [])
        + ([f"--engines-dir {args.engines_dir}"] if args.engines_dir != ENGINES_DIR else []))
    text = markdown(summary, command, seconds)
    print(text)
    if not args.no_write:
        write_cards(summary, args.engines_dir)
        write_section("X-ray held-out evaluation (bench/eval_xray.py)", text)
        (REPO / "bench" / "eval_xray.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
