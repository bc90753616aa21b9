"""Per-level evaluation of the ``ct-cspine-fracture`` pipeline on cohorts it was not trained on.

Run from the repository root::

    python -m bench.eval_ct --n 8 --cohorts same,cross,negatives     # a quick look
    python -m bench.eval_ct --n 200 --jobs 2 --write                  # the full run

Cost per case on one core of a 2-core machine under load (generation + pipeline): 1-2 s
for the training generator's cohorts, 10-15 s for the cross generator's (its analytic
renderer dominates), ~40 s for its clinical grid, ~25 s for its chest and abdomen.
``--n-per cross=50,...`` sizes cohorts apart; clinical-grid cohorts default to at most 50.

Each case is drawn from a seed, run through the pipeline's public interface and scored
against the generator's truth on the source grid. ``--via`` picks the entry:
``analyse`` hands ``CervicalSpineCtFracture.analyse`` the volume (no DICOM, so the
header checks of ``load_ct_series`` - slice thickness, pixel size, coverage - are not
made), ``dicom`` writes the volume as a CT series for ``run``, which reads it as the
node does, and ``auto`` (the default) takes ``analyse`` where the pipeline has it.
Cohorts (``--cohorts``, comma separated; ``all`` is the default):

* ``same``: :func:`spine_node.inference.phantoms.generate`, the training generator, on
  its default cervical grid (2 mm, 160 x 128 x 128 mm) and seeds from 9_200_000 up (the
  training recipe draws 10_000..199_999 and validates on 500_000..500_999);
* ``cross``: ``spine_node.inference.heldout.ct.generate(kind="cspine")``, a generator the
  models never saw, on its default grid (skipped with a note while it is not installed);
* ``<generator>/<perturbation>`` for each generator and each of ``clinical_grid``
  (1 x 0.5 x 0.5 mm), ``3mm`` (3 mm slices with a 3 mm slice profile), ``hu+100``,
  ``hu-100`` (calibration offsets), ``size+15``, ``size-15``, ``rot10`` (10 degrees
  about one axis per case) and ``no_skull_base`` (field from C2 to T1); a bare
  perturbation name means both generators;
* negatives ``neg/head``, ``neg/chest``, ``neg/abdomen``, ``neg/air``, ``neg/water``,
  ``neg/noise`` (cross generator) and ``neg/thoracic``, ``neg/lumbar`` (training generator,
  other regions); ``negatives`` means all of them.

The perturbed cohorts of one generator use the same seeds as its unperturbed cohort, so
they are paired: the same anatomy and findings under a different acquisition.

Metrics per cohort (definitions in :func:`summarise`): Dice per level and mean; level
accuracy (right / unlabelled / wrong); fracture AUC per level, pooled over vertebrae and
per patient with 95 % CIs; sensitivity and specificity at the pipeline's threshold with
Wilson CIs; for negatives the share not assessable and the segments and positive findings
reported. ``--write`` replaces this benchmark's section of ``bench/RESULTS.md`` and writes
``bench/out/eval_ct.json`` for the model cards.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import importlib
import inspect
import json
import logging
import math
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from bench.harness import machine, replace_section
from spine_node.inference import phantoms
from spine_node.inference.errors import PipelineError
from spine_node.inference.findings import AssessmentValues, Findings
from spine_node.inference.pipelines import ModelProvider, ct_cspine
from spine_node.inference.series import SeriesRef
from spine_node.inference.stats import auc_ci, wilson_ci

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
#: Truth labels of the generators (RSNA numbering): C1..C7 are 1..7.
TRUTH_LABEL: dict[str, int] = {name: i + 1 for i, name in enumerate(LEVELS)}
SEED_BASE = 9_200_000
#: Default cap on cases for the clinical-grid cohorts (volumes ~10x the default grid's).
BIG_GRID_CASES = 50
#: A vertebra counts as "in the field" (level accuracy, fracture truth) with at least this
#: share of its voxels inside the scanned volume.
IN_FIELD_SHARE = 0.5
#: A vertebra is "unlabelled" when predicted C1..C7 labels cover less than this share of it.
LABELLED_SHARE = 0.1
#: Extra slices (mm) the training generator draws below the field, so the share of each
#: vertebra inside the field can be measured rather than assumed.
BELOW_FIELD_MM = 40.0
#: z step (mm) the training generator renders at before a thick slice profile is applied.
FINE_Z_MM = 0.5
CROSS_MODULE = "spine_node.inference.heldout.ct"
VIAS = ("auto", "analyse", "dicom")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
OUT_JSON = Path(__file__).resolve().parent / "out" / "eval_ct.json"
BEGIN, END = "<!-- bench/eval_ct.py: begin -->", "<!-- bench/eval_ct.py: end -->"


# ----------------------------------------------------------------------- cohorts


@dataclass(frozen=True)
class Perturbation:
    """Acquisition changes, in the cross generator's vocabulary.

    The cross generator takes them as parameters; for the training generator the harness
    applies those it lacks (slice profile, HU calibration, field of view) to the volume.
    """

    #: output grid (z, y, x) in mm; a None entry keeps the generator's default on that axis
    spacing: tuple[float | None, float | None, float | None] | None = None
    #: slice profile width (mm); the training generator's volume is then rendered at
    #: <= 0.5 mm along z and averaged over the profile
    slice_thickness_mm: float | None = None
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    size_scale: float | None = None
    #: (axial, lateral bend, flexion) degrees, or one number: that many degrees about one
    #: axis picked per case from its seed, with a random sign, the other two at 0 (the
    #: generator's own pose variation is replaced)
    rotation_deg: tuple[float, float, float] | float | None = None
    #: (top, bottom) vertebrae of the field, e.g. ("C2", "T1")
    z_range: tuple[str, str] | None = None
    noise_hu: float | None = None
    #: (in-plane width, z length) of the field in mm
    fov_mm: tuple[float, float] | None = None

    def resolved_rotation(self, seed: int) -> tuple[float, float, float] | None:
        if self.rotation_deg is None or isinstance(self.rotation_deg, tuple):
            return self.rotation_deg
        rng = np.random.default_rng([seed, 10])
        angles = [0.0, 0.0, 0.0]
        angles[int(rng.integers(3))] = float(self.rotation_deg) * (1 if rng.random() < 0.5 else -1)
        return (angles[0], angles[1], angles[2])

    def changed(self) -> dict[str, Any]:
        """The fields that differ from no perturbation."""
        default = Perturbation()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclass(frozen=True)
class Cohort:
    name: str
    generator: str  # "same" (inference.phantoms) or "cross" (inference.heldout.ct)
    kind: str  # "cspine", or a negative: a cross kind or a training-generator region
    perturbation: Perturbation = field(default_factory=Perturbation)
    description: str = ""

    @property
    def negative(self) -> bool:
        return self.kind != "cspine"


PERTURBATIONS: dict[str, tuple[Perturbation, str]] = {
    "clinical_grid": (Perturbation(spacing=(1.0, 0.5, 0.5)), "1 x 0.5 x 0.5 mm grid"),
    "3mm": (Perturbation(spacing=(3.0, None, None), slice_thickness_mm=3.0),
            "3 mm slices, 3 mm slice profile, in-plane grid as the generator's"),
    "hu+100": (Perturbation(hu_offset=100.0), "HU + 100"),
    "hu-100": (Perturbation(hu_offset=-100.0), "HU - 100"),
    "size+15": (Perturbation(size_scale=1.15), "patient size x 1.15"),
    "size-15": (Perturbation(size_scale=0.85), "patient size x 0.85"),
    "rot10": (Perturbation(rotation_deg=10.0), "10 degrees about one axis"),
    "no_skull_base": (Perturbation(z_range=("C2", "T1")), "field C2 to T1"),
    # An independent tester's field starting at the top of C3 (at most a sliver of C2):
    # the top vertebra was read as C2 and every name below it shifted by a level.
    "from_c3": (Perturbation(z_range=("C3", "T1")), "field C3 to T1 (at most a sliver of C2)"),
}
CROSS_NEGATIVES = ("head", "chest", "abdomen", "air", "water", "noise")
SAME_NEGATIVES = ("thoracic", "lumbar")


def _catalogue() -> dict[str, Cohort]:
    cohorts = {
        "same": Cohort("same", "same", "cspine", description="training generator, unseen seeds"),
        "cross": Cohort("cross", "cross", "cspine", description="cross generator"),
    }
    for generator in ("same", "cross"):
        for key, (perturbation, text) in PERTURBATIONS.items():
            name = f"{generator}/{key}"
            cohorts[name] = Cohort(name, generator, "cspine", perturbation, text)
    for kind in CROSS_NEGATIVES:
        cohorts[f"neg/{kind}"] = Cohort(f"neg/{kind}", "cross", kind, description=f"{kind} CT")
    for region in SAME_NEGATIVES:
        cohorts[f"neg/{region}"] = Cohort(f"neg/{region}", "same", region,
                                          description=f"{region} spine phantom")
    return cohorts


COHORTS: dict[str, Cohort] = _catalogue()


def expand_cohorts(spec: str) -> list[str]:
    """Cohort names from a comma list of names, bare perturbations, ``negatives``, ``all``."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if item == "all":
            expanded = list(COHORTS)
        elif item == "negatives":
            expanded = [n for n, c in COHORTS.items() if c.negative]
        elif item in PERTURBATIONS:
            expanded = [f"same/{item}", f"cross/{item}"]
        elif item in COHORTS:
            expanded = [item]
        else:
            raise SystemExit(f"unknown cohort {item!r}; expected one of all, negatives, "
                             f"{', '.join(PERTURBATIONS)}, {', '.join(COHORTS)}")
        names += [n for n in expanded if n not in names]
    return names


def cross_generator() -> Any | None:
    """The cross generator module, or None while it is not installed."""
    try:
        return importlib.import_module(CROSS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and CROSS_MODULE.startswith(exc.name):
            return None
        raise


def cohort_seeds(n: int, base: int = SEED_BASE) -> list[int]:
    return list(range(base, base + n))


def cohort_counts(names: Sequence[str], n: int, overrides: str = "") -> dict[str, int]:
    """Cases per cohort: ``n``, at most :data:`BIG_GRID_CASES` for clinical-grid cohorts,
    and ``overrides`` (``"name=count,..."``) over both."""
    counts = {name: min(n, BIG_GRID_CASES) if name.endswith("/clinical_grid") else n for name in names}
    for item in (part.strip() for part in overrides.split(",")):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in COHORTS or not value.strip().isdigit() or int(value) < 1:
            raise SystemExit(f"bad --n-per entry {item!r}; expected cohort=count with a known cohort "
                             "and a count >= 1")
        if name in counts:
            counts[name] = int(value)
    return counts


# ------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One volume with its truth, on the grid the pipeline receives."""

    seed: int
    hu: np.ndarray  # (z, y, x) float32 HU, head first
    spacing: tuple[float, float, float]
    #: C1..C7 = 1..7 on the same grid, 0 elsewhere
    labels: np.ndarray
    #: level -> share of the vertebra's voxels inside the field (levels drawn at all; the
    #: cross generator only says in (1.0) or out (0.0) at the 50 % mark)
    in_field: dict[str, float]
    #: level -> fractured, for every level drawn
    fractured: dict[str, bool]


def _cervical(labels: np.ndarray) -> np.ndarray:
    return np.where((labels >= 1) & (labels <= len(LEVELS)), labels, 0).astype(np.uint8)


def _voxel_counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels.ravel(), minlength=len(LEVELS) + 1)
    return {name: int(counts[TRUTH_LABEL[name]]) for name in LEVELS}


def _same_case(cohort: Cohort, seed: int, p: Perturbation) -> Case:
    """A training-generator phantom under ``p`` (what the generator lacks, done here)."""
    kwargs: dict[str, Any] = {}
    if p.size_scale is not None:
        kwargs["size_scale"] = p.size_scale
    rotation = p.resolved_rotation(seed)
    if rotation is not None:
        kwargs["pose_deg"] = rotation
    if p.noise_hu is not None:
        kwargs["noise_hu"] = p.noise_hu
    if cohort.negative:
        unsupported = [k for k in ("spacing", "slice_thickness_mm", "z_range", "fov_mm") if getattr(p, k) is not None]
        if unsupported:
            raise ValueError(f"{cohort.name}: {', '.join(unsupported)} not supported for "
                             "training-generator negatives (they keep the generator's grid)")
        ph = phantoms.generate(seed, region=cohort.kind, **kwargs)
        hu, labels, spacing = ph.hu, np.zeros(ph.shape, np.uint8), ph.spacing
        return Case(seed, _calibrate(hu, p), spacing, labels, {}, {})
    # The default cervical field: 160 x 128 x 128 mm, as phantoms.generate draws it.
    target = _grid(p.spacing, (2.0, 2.0, 2.0))
    width, length = p.fov_mm or (128.0, 160.0)
    field_mm = (length, width, width)
    # A slice profile wider than the generator's own (it blurs by 0.6 mm) is simulated:
    # render on a z grid of <= 0.5 mm that divides the target spacing, average over the
    # profile, sample every target spacing.
    thickness = float(p.slice_thickness_mm or 0.0)
    thick = thickness > FINE_Z_MM * 1.5
    ratio = int(math.ceil(target[0] / FINE_Z_MM - 1e-6)) if thick else 1
    fine_z = target[0] / ratio
    nz = int(round(field_mm[0] / fine_z))
    extra = int(math.ceil(BELOW_FIELD_MM / fine_z))
    shape = (nz + extra, int(round(field_mm[1] / target[1])), int(round(field_mm[2] / target[2])))
    ph = phantoms.generate(seed, shape=shape, spacing=(fine_z, target[1], target[2]), **kwargs)
    hu, every_level = ph.hu, ph.labels
    drawn = _voxel_counts(_cervical(every_level))
    hu, every_level = hu[:nz], every_level[:nz]
    if p.z_range is not None:
        hu, every_level = _crop_levels(hu, every_level, p.z_range)
    kept = _voxel_counts(_cervical(every_level))
    in_field = {k: min(1.0, kept[k] / drawn[k]) for k in LEVELS if drawn[k] > 0}
    if thick:
        # A thick slice averages the tissue over its profile (box of slice_thickness_mm),
        # sampled every target z spacing; truth is the label at each slice's centre.
        width = max(1, int(round(thickness / fine_z)))
        blurred = ndimage.uniform_filter1d(hu, size=width, axis=0, mode="nearest")
        centres = np.arange(ratio // 2, hu.shape[0], ratio)
        hu, every_level = blurred[centres], every_level[centres]
    spacing = (target[0], target[1], target[2])
    labels = _cervical(every_level)
    fractured = {v.name: v.fractured for v in ph.vertebrae if v.name in TRUTH_LABEL}
    return Case(seed, _calibrate(hu, p), spacing, labels, in_field, fractured)


def _crop_levels(hu: np.ndarray, labels: np.ndarray,
                 z_range: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the slices from just below the vertebra above ``top`` down to ``bottom``
    (``labels``: every level, as the generator numbers them)."""
    source = labels
    top, bottom = (phantoms.LEVEL_LABELS[name] for name in z_range)
    start = 0
    if top > 1:
        above = np.flatnonzero((source == top - 1).any(axis=(1, 2)))
        start = int(above.max()) + 1 if len(above) else 0
    below = np.flatnonzero((source == bottom).any(axis=(1, 2)))
    stop = int(below.max()) + 1 if len(below) else source.shape[0]
    if stop - start < 8:
        raise ValueError(f"field {z_range} leaves {stop - start} slices; expected at least 8")
    return hu[start:stop], labels[start:stop]


def _grid(spacing: Sequence[float | None] | None,
          default: Sequence[float]) -> tuple[float, float, float]:
    """``spacing`` with its None entries (or all of it) taken from ``default``."""
    if spacing is None:
        return (float(default[0]), float(default[1]), float(default[2]))
    z, y, x = (float(d if v is None else v) for v, d in zip(spacing, default, strict=True))
    return (z, y, x)


def _calibrate(hu: np.ndarray, p: Perturbation) -> np.ndarray:
    """A calibration error, then what a scanner stores: whole HU in the 12-bit range (as
    the DICOM writer does, so ``analyse`` and ``run`` see the same numbers)."""
    out = hu
    if p.hu_scale != 1.0 or p.hu_offset != 0.0:
        out = hu * np.float32(p.hu_scale) + np.float32(p.hu_offset)
    return _stored(out)


def _stored(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -1024.0, 3071.0).astype(np.float32)


def _cross_case(cohort: Cohort, seed: int, p: Perturbation) -> Case:
    module = cross_generator()
    if module is None:
        raise RuntimeError(f"cohort {cohort.name} needs {CROSS_MODULE}, which is not installed")
    kwargs: dict[str, Any] = {}
    for name in ("slice_thickness_mm", "size_scale", "z_range", "noise_hu", "fov_mm"):
        value = getattr(p, name)
        if value is not None:
            kwargs[name] = value
    if p.spacing is not None:
        default = inspect.signature(module.generate).parameters["spacing"].default
        kwargs["spacing"] = _grid(p.spacing, default)
    rotation = p.resolved_rotation(seed)
    if rotation is not None:
        kwargs["rotation_deg"] = rotation
    if p.hu_offset != 0.0:
        kwargs["hu_offset"] = p.hu_offset
    if p.hu_scale != 1.0:
        kwargs["hu_scale"] = p.hu_scale
    ct = module.generate(seed, kind=cohort.kind, **kwargs)
    labels = _cervical(np.asarray(ct.labels))
    counts = _voxel_counts(labels)
    # The generator lists the levels with >= 50 % of their height in the field (1.0 here);
    # one with voxels but not listed is cut by the field's edge (0.0 here: counted for
    # Dice, not for level accuracy or fracture truth).
    listed = set(ct.levels_in_field)
    in_field = {k: (1.0 if k in listed else 0.0) for k in LEVELS if counts[k] > 0 or k in listed}
    fractured = {k: k in ct.fractures for k in in_field}
    spacing = tuple(float(s) for s in ct.spacing)
    return Case(seed, _stored(np.asarray(ct.hu)), spacing, labels, in_field,  # type: ignore[arg-type]
                fractured)


def make_case(cohort: Cohort, seed: int, perturbation: Perturbation | None = None) -> Case:
    p = perturbation or cohort.perturbation
    if cohort.generator == "same":
        return _same_case(cohort, seed, p)
    return _cross_case(cohort, seed, p)


# ---------------------------------------------------------------------- pipeline


def _volume(case: Case) -> ct_cspine.CtVolume:
    uids = tuple(f"2.25.{case.seed}.{k + 1}" for k in range(case.hu.shape[0]))
    return ct_cspine.CtVolume(hu=case.hu, spacing=case.spacing, sop_instance_uids=uids,
                              study_uid=f"2.25.{case.seed}.1", series_uid=f"2.25.{case.seed}.2")


def run_pipeline(case: Case, models: ModelProvider,
                 via: str = "auto") -> tuple[Findings, tuple[str, ...], str, float]:
    """Run the pipeline on ``case``; returns findings, the UID of each of the case's slices,
    the path taken (``analyse`` or ``run``) and the pipeline's seconds.

    ``via="analyse"`` hands the volume to ``CervicalSpineCtFracture.analyse``; ``"dicom"``
    writes it as a DICOM series (to a temporary folder, not timed) for ``run``, which
    reads it back as the node does, checks on the DICOM header included; ``"auto"`` takes
    ``analyse`` where the pipeline has it.
    """
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, got {via!r}")
    pipeline = ct_cspine.CervicalSpineCtFracture()
    analyse: Callable[..., Findings] | None = getattr(pipeline, "analyse", None)
    if via == "analyse" and analyse is None:
        raise ValueError("this pipeline has no analyse(); use via='dicom' or 'auto'")
    if analyse is not None and via != "dicom":
        volume = _volume(case)
        start = time.perf_counter()
        findings = analyse(volume, models)
        return findings, volume.sop_instance_uids, "analyse", time.perf_counter() - start
    import pydicom

    phantom = phantoms.Phantom(seed=case.seed, region="cervical", hu=case.hu, spacing=case.spacing,
                               labels=np.zeros(case.hu.shape, np.uint8),
                               structures=np.zeros(case.hu.shape, np.uint8), vertebrae=())
    with tempfile.TemporaryDirectory(prefix="eval-ct-") as folder:
        paths = phantoms.write_ct_series(phantom, folder)
        uids = tuple(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in paths)
        ref = SeriesRef(study_uid="", series_uid="", path=Path(folder), modality="CT",
                        body_part="CSPINE", instance_count=len(paths))
        start = time.perf_counter()
        findings = pipeline.run([ref], models)
        return findings, uids, "run", time.perf_counter() - start


def predicted_labels(findings: Findings, uids: Sequence[str],
                     shape: Sequence[int]) -> tuple[np.ndarray, int]:
    """The predicted map on the case's grid with C1..C7 as 1..7, mapped by segment *name*
    (label values are the pipeline's business); and the count of other segments."""
    out = np.zeros(tuple(shape), np.uint8)
    seg = findings.segmentation
    if seg is None:
        return out, 0
    position = {uid: k for k, uid in enumerate(seg.source_sop_instance_uids)}
    missing = [uid for uid in uids if uid not in position]
    if missing or seg.labels.shape[1:] != tuple(shape[1:]):
        raise ValueError(f"segmentation frames do not match the input: {len(missing)} of "
                         f"{len(uids)} slices without a frame, frame shape {seg.labels.shape[1:]} "
                         f"for slices of {tuple(shape[1:])}")
    frames = seg.labels[[position[uid] for uid in uids]]
    others = 0
    for segment in seg.segments:
        if segment.name in TRUTH_LABEL:
            out[frames == segment.label] = TRUTH_LABEL[segment.name]
        else:
            others += 1
    return out, others


def score_case(case: Case, findings: Findings | None, predicted: np.ndarray | None,
               other_segments: int = 0, error: str | None = None) -> dict[str, Any]:
    """Everything :func:`summarise` needs from one case, as plain JSON-able values."""
    fractures = [f for f in (findings.findings if findings else []) if f.kind == "fracture"]
    level_prob = {f.site: float(f.probability) for f in fractures if f.site in TRUTH_LABEL}
    patient = [f for f in fractures if f.site is None]
    status = {s.site: str(s.assessment) for s in (findings.site_status if findings else ())}
    names = [s.name for s in findings.segmentation.segments] if findings and findings.segmentation else []
    if status:
        assessed = [k for k in LEVELS if status.get(k) == AssessmentValues.ASSESSED]
    else:
        # Today's pipeline reports no site status: a level is assessed when it was found.
        assessed = [k for k in LEVELS if k in level_prob or k in names]
    not_assessable = [k for k in LEVELS if status.get(k) == AssessmentValues.NOT_ASSESSABLE]
    truth = case.labels
    levels: dict[str, dict[str, Any]] = {}
    for name in LEVELS:
        value = TRUTH_LABEL[name]
        t = truth == value
        t_voxels = int(t.sum())
        p_voxels = int((predicted == value).sum()) if predicted is not None else 0
        if t_voxels == 0 and name not in case.in_field and p_voxels == 0:
            continue
        entry: dict[str, Any] = {
            "truth_voxels": t_voxels, "predicted_voxels": p_voxels,
            "in_field": round(float(case.in_field.get(name, 0.0)), 4),
            "fractured": bool(case.fractured.get(name, False)),
            "score": level_prob.get(name) if name in assessed else None,
            "status": status.get(name, "assessed" if name in assessed else "absent"),
        }
        if predicted is not None and t_voxels:
            under = predicted[t]
            entry["intersection"] = int((under == value).sum())
            covered = under[under > 0]
            entry["covered"] = round(len(covered) / t_voxels, 4)
            if len(covered):
                best = int(np.bincount(covered).argmax())
                entry["best"] = LEVELS[best - 1]
        levels[name] = entry
    threshold = min((f.threshold for f in fractures), default=0.5)
    patient_prob = patient[0].probability if patient else None
    patient_present = patient[0].present if patient else any(
        f.present for f in fractures if f.site in assessed)
    # Flagged: present or indeterminate (a reader looks); equal to present without a
    # rule-out point.
    patient_flagged = (patient[0].present or patient[0].indeterminate) if patient else any(
        f.present or f.indeterminate for f in fractures if f.site in assessed)
    return {
        "seed": case.seed,
        "error": error,
        "not_performed_reason": findings.not_performed_reason if findings else None,
        "levels": levels,
        "assessed": assessed,
        "not_assessable": not_assessable,
        "segments": len(names),
        "other_segments": other_segments,
        "present": sum(f.present for f in fractures),
        "patient_probability": patient_prob,
        "patient_present": bool(patient_present),
        "patient_flagged": bool(patient_flagged),
        "indeterminate": sum(f.indeterminate for f in fractures),
        "threshold": threshold,
        "models": [{"name": m.name, "version": m.version, "weights": m.weights[:12], "backend": m.backend}
                   for m in (findings.models if findings else ())],
    }


def evaluate_case(cohort: Cohort | str, seed: int, models: ModelProvider,
                  perturbation: Perturbation | None = None, via: str = "auto",
                  keep_going: bool = False) -> dict[str, Any]:
    """Draw, run and score one case.

    A :class:`PipelineError` is the pipeline refusing the input (``error_kind``
    ``"refused"``, scored as nothing found). Any other exception propagates, unless
    ``keep_going``: then the case is ``"crashed"``, scored as nothing found, and counted
    apart so a long run survives one bad case without hiding it; a generator failure
    then gives a record with ``error_kind`` ``"generator"`` that the metrics leave out.
    """
    cohort = COHORTS[cohort] if isinstance(cohort, str) else cohort
    start = time.perf_counter()
    try:
        case = make_case(cohort, seed, perturbation)
    except Exception as exc:
        if not keep_going:
            raise
        # Not the pipeline's doing: the case is left out of every metric and counted.
        log.error("%s seed %d: the generator failed: %s: %s", cohort.name, seed, type(exc).__name__, exc)
        return {"seed": seed, "error_kind": "generator", "error": f"{type(exc).__name__}: {exc}"}
    generated = time.perf_counter() - start
    try:
        findings, uids, path, seconds = run_pipeline(case, models, via)
        predicted, others = predicted_labels(findings, uids, case.hu.shape)
    except Exception as exc:
        if not isinstance(exc, PipelineError) and not keep_going:
            raise
        kind = "refused" if isinstance(exc, PipelineError) else "crashed"
        if kind == "crashed":
            log.error("%s seed %d crashed: %s: %s", cohort.name, seed, type(exc).__name__, exc)
        record = score_case(case, None, None, error=f"{type(exc).__name__}: {exc}")
        record.update(path="", seconds=float("nan"), generate_seconds=generated, error_kind=kind,
                      shape=list(case.hu.shape), spacing=list(case.spacing))
        return record
    record = score_case(case, findings, predicted, others)
    record.update(path=path, seconds=seconds, generate_seconds=generated, error_kind=None,
                  shape=list(case.hu.shape), spacing=list(case.spacing))
    return record


# ---------------------------------------------------------------------- metrics


def _ci(pair: tuple[float, float]) -> list[float | None]:
    return [None if math.isnan(v) else round(v, 4) for v in pair]


def _share(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "share": round(k / n, 4) if n else None, "ci95": _ci(wilson_ci(k, n))}


def _auc(y: Sequence[int], s: Sequence[float], groups: Sequence[int] | None = None,
         n_resamples: int = 2000) -> dict[str, Any]:
    if groups is None:
        result = auc_ci(y, s)
    else:
        result = auc_ci(y, s, method="bootstrap", groups=groups, n_resamples=n_resamples)
    return {"auc": None if math.isnan(result.auc) else round(result.auc, 4),
            "ci95": _ci((result.low, result.high)), "positives": result.positives,
            "negatives": result.negatives, "method": result.method}


def summarise(name: str, records: Sequence[Mapping[str, Any]], negative: bool = False,
              n_resamples: int = 2000) -> dict[str, Any]:
    """Cohort metrics from :func:`evaluate_case` records.

    * Dice per level: ``2 |P & T| / (|P| + |T|)`` on the source grid for every case where
      the level has truth voxels (a level cut by the field counts too); ``mean`` pools all.
      ``spurious_levels``: levels predicted where the truth has none (e.g. C1 above the field).
    * Level accuracy over true vertebrae with >= 50 % of their voxels in the field: *right*
      when the predicted level covering most of it has its name, *unlabelled* when
      predicted C1..C7 labels cover < 10 % of it or the pipeline calls that level not
      assessable, *wrong* otherwise (a shifted label). Bar: right + unlabelled >= 95 %;
      read it with ``assessed_in_field`` (the share of those vertebrae the pipeline
      assessed), since a pipeline that abstains on everything meets it.
    * Fracture AUC per level and pooled over vertebrae (in the field as above; a level the
      pipeline did not assess scores 0, so a missed level is a missed fracture); pooled
      CIs by a cluster bootstrap over cases (a patient's vertebrae are not independent),
      per-level and patient CIs by DeLong.
    * Patient: positive when an in-field vertebra C1..C7 is fractured, negative when no
      vertebra C1..C7 with voxels in the field is, otherwise left out (a fracture only in
      a vertebra mostly outside the field). Fractures below C7 (the cross generator
      draws some at T1) are outside the pipeline's scope and do not count. Score: the
      patient-level finding, else the highest level. Sensitivity / specificity at the
      pipeline's threshold (the patient-level finding, else any level finding), and the
      share of fracture-free cases with any present finding.
    * Negatives: not assessable = not performed, refused, or no level assessed.
    """
    not_drawn = sum(1 for r in records if r["error_kind"] == "generator")
    records = [r for r in records if r["error_kind"] != "generator"]
    n = len(records)
    timing = [r["seconds"] for r in records if not math.isnan(r["seconds"])]
    out: dict[str, Any] = {
        "cohort": name, "n": n, "negative": negative, "generator_failed": not_drawn,
        "refused": sum(1 for r in records if r["error_kind"] == "refused"),
        "crashed": sum(1 for r in records if r["error_kind"] == "crashed"),
        "not_performed": sum(1 for r in records if r["not_performed_reason"]),
        "seconds_mean": round(float(np.mean(timing)), 3) if timing else None,
        "generate_seconds_mean": round(float(np.mean([r["generate_seconds"] for r in records])), 3) if n else None,
        "path": sorted({r["path"] for r in records if r["path"]}),
        "threshold": sorted({r["threshold"] for r in records}),
    }
    if negative:
        # A crash is no answer: it does not count as "not assessable".
        refused = [r for r in records if r["error_kind"] != "crashed"
                   and (r["error_kind"] == "refused" or r["not_performed_reason"] or not r["assessed"])]
        out.update(
            not_assessable=_share(len(refused), n),
            segments_total=sum(r["segments"] for r in records),
            segments_max=max((r["segments"] for r in records), default=0),
            present_total=sum(r["present"] for r in records),
            cases_with_present=_share(sum(1 for r in records if r["present"]), n),
        )
        return out

    dice: dict[str, list[float]] = {k: [] for k in LEVELS}
    spurious = 0
    right = unlabelled = wrong = 0
    per_level: dict[str, tuple[list[int], list[float]]] = {k: ([], []) for k in LEVELS}
    pooled_y: list[int] = []
    pooled_s: list[float] = []
    pooled_g: list[int] = []
    patient_y: list[int] = []
    patient_s: list[float] = []
    tp = fn = tn = fp = 0
    flagged_tp = flagged_fp = 0
    negatives_with_present = 0
    assessed_in_field = in_field_total = 0
    for index, r in enumerate(records):
        for name, e in r["levels"].items():
            if e["truth_voxels"]:
                if "intersection" in e:
                    dice[name].append(2 * e["intersection"] / (e["predicted_voxels"] + e["truth_voxels"]))
                else:
                    dice[name].append(0.0)  # refused case: nothing predicted
            elif e["predicted_voxels"]:
                spurious += 1
            if e["in_field"] < IN_FIELD_SHARE or not e["truth_voxels"]:
                continue
            in_field_total += 1
            best = e.get("best")
            if e.get("covered", 0.0) < LABELLED_SHARE or best in r["not_assessable"]:
                unlabelled += 1
            elif best == name:
                right += 1
            else:
                wrong += 1
            score = e["score"] if e["score"] is not None else 0.0
            assessed_in_field += e["score"] is not None
            per_level[name][0].append(int(e["fractured"]))
            per_level[name][1].append(score)
            pooled_y.append(int(e["fractured"]))
            pooled_s.append(score)
            pooled_g.append(index)
        in_field = [e for e in r["levels"].values() if e["in_field"] >= IN_FIELD_SHARE and e["truth_voxels"]]
        visible = [e for e in r["levels"].values() if e["truth_voxels"]]
        if any(e["fractured"] for e in in_field):
            truth = 1
        elif not any(e["fractured"] for e in visible):
            truth = 0
        else:
            continue
        level_scores = [e["score"] for e in r["levels"].values() if e["score"] is not None]
        score = r["patient_probability"]
        if score is None:
            score = max(level_scores, default=0.0)
        patient_y.append(truth)
        patient_s.append(float(score))
        flagged = r.get("patient_flagged", r["patient_present"])
        if truth:
            tp += r["patient_present"]
            fn += not r["patient_present"]
            flagged_tp += flagged
        else:
            tn += not r["patient_present"]
            fp += r["patient_present"]
            negatives_with_present += r["present"] > 0
            flagged_fp += flagged
    total = right + unlabelled + wrong
    all_dice = [d for values in dice.values() for d in values]
    out.update(
        dice={k: (round(float(np.mean(v)), 4) if v else None) for k, v in dice.items()},
        dice_mean=round(float(np.mean(all_dice)), 4) if all_dice else None,
        spurious_levels=spurious,
        level_accuracy={
            "vertebrae": total,
            "right": _share(right, total), "unlabelled": _share(unlabelled, total),
            "wrong": _share(wrong, total),
            "right_or_unlabelled": _share(right + unlabelled, total),
        },
        assessed_in_field=_share(assessed_in_field, in_field_total),
        auc_level={k: _auc(*per_level[k]) for k in LEVELS},
        auc_vertebra=_auc(pooled_y, pooled_s, pooled_g, n_resamples=n_resamples),
        auc_patient=_auc(patient_y, patient_s),
        patients_left_out=n - len(patient_y),
        sensitivity=_share(tp, tp + fn),
        specificity=_share(tn, tn + fp),
        flagged_sensitivity=_share(flagged_tp, tp + fn),
        flagged_specificity=_share(tn + fp - flagged_fp, tn + fp),
        fracture_free_with_present=_share(negatives_with_present, tn + fp),
    )
    return out


def evaluate_cohort(name: str, seeds: Iterable[int], models: ModelProvider, *, via: str = "auto",
                    **perturbation: Any) -> dict[str, Any]:
    """Metrics of cohort ``name`` (a key of :data:`COHORTS`) on ``seeds``, in this process.

    Keyword arguments are :class:`Perturbation` fields and replace the cohort's own, e.g.
    ``evaluate_cohort("same", range(9_200_000, 9_200_012), models, hu_offset=100.0)``.
    ``via`` picks the pipeline entry (:func:`run_pipeline`). The result is
    :func:`summarise`'s dict plus ``records``, one per case.
    """
    if name not in COHORTS:
        raise ValueError(f"unknown cohort {name!r}; expected one of {', '.join(COHORTS)}")
    cohort = COHORTS[name]
    p = dataclasses.replace(cohort.perturbation, **perturbation) if perturbation else cohort.perturbation
    records = [evaluate_case(cohort, seed, models, p, via) for seed in seeds]
    result = summarise(name, records, cohort.negative)
    result["perturbation"] = _jsonable(p.changed())
    result["records"] = records
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---------------------------------------------------------------------- models


def model_provider(engines_dir: Path | None = None, backend: str = "onnxruntime",
                   threads: int | None = 1) -> ModelProvider:
    """Engines from the model repository (default: the packaged ``engines/``) on ``backend``."""
    from spine_node.inference.runtime.base import EngineOptions
    from spine_node.inference.runtime.selection import EngineProvider

    options = EngineOptions(threads=threads, device="cpu" if backend == "onnxruntime" else "auto",
                            progress=False)
    return EngineProvider(engines_dir, backends=(backend,), options=options)


_WORKER_MODELS: ModelProvider | None = None


def _init_worker(engines_dir: Path | None, backend: str, threads: int) -> None:
    global _WORKER_MODELS
    logging.basicConfig(level=logging.WARNING)
    _WORKER_MODELS = model_provider(engines_dir, backend, threads)


def _worker_case(name: str, seed: int, via: str, keep_going: bool) -> tuple[str, dict[str, Any]]:
    assert _WORKER_MODELS is not None, "worker not initialised"
    return name, evaluate_case(COHORTS[name], seed, _WORKER_MODELS, via=via, keep_going=keep_going)


# ---------------------------------------------------------------------- records


def journal_config(engines_dir: Path | None, backend: str, via: str, seed_base: int) -> dict[str, Any]:
    """What a records file's cases depend on: the models (sha256 of each CT engine's
    weights), the backend, the pipeline entry, the seeds and the code's commit."""
    import hashlib

    from spine_node.engines import ENGINES_DIR

    folder = Path(engines_dir) if engines_dir is not None else ENGINES_DIR
    weights = {}
    for onnx in sorted(folder.glob("cspine-ct-*/model.onnx")):
        weights[onnx.parent.name] = hashlib.sha256(onnx.read_bytes()).hexdigest()[:16]
    return {"weights": weights, "backend": backend, "via": via, "seed_base": seed_base,
            "commit": source_commit()}


class Journal:
    """Finished cases, one JSON line each, so an interrupted run resumes where it stopped.

    The first line holds :func:`journal_config`; a file written under another one is
    refused rather than mixed. A last line cut short by a kill is dropped (that case runs
    again).
    """

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        self.path = path
        self.done: dict[str, list[dict[str, Any]]] = {}
        entries: list[str] = []
        if path.exists() and path.stat().st_size:
            lines = path.read_text(encoding="utf-8").splitlines()
            written = json.loads(lines[0]).get("config")
            if written != config:
                differ = sorted(k for k in set(config) | set(written or {})
                                if (written or {}).get(k) != config.get(k))
                raise SystemExit(f"{path} holds cases of another run ({', '.join(differ)} "
                                 "differ); give a new --records file or delete this one")
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break
                self.done.setdefault(entry["cohort"], []).append(entry["record"])
                entries.append(line)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten whole: drops a cut-off last line before appending after it.
        path.write_text("".join(f"{line}\n" for line in
                                [json.dumps({"config": config}), *entries]), encoding="utf-8")
        self._file = path.open("a", encoding="utf-8")

    def has(self, name: str, seed: int) -> bool:
        return any(r.get("seed") == seed for r in self.done.get(name, ()))

    def add(self, name: str, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"cohort": name, "record": _jsonable(record)}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------- report


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fci(entry: Mapping[str, Any], key: str = "share") -> str:
    value = entry.get(key)
    low, high = entry["ci95"]
    if value is None:
        return "n/a"
    if low is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _n(result: Mapping[str, Any]) -> str:
    failed = result.get("generator_failed", 0)
    return f"{result['n']}" + (f" (+{failed} the generator failed on)" if failed else "")


def _auc_cell(entry: Mapping[str, Any]) -> str:
    if entry["auc"] is None:
        return f"n/a ({entry['positives']}+/{entry['negatives']}-)"
    return f"{_fci(entry, 'auc')} ({entry['positives']}+/{entry['negatives']}-)"


def tables(results: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the positive cohorts, per-level figures and negatives."""
    positive = [r for r in results.values() if not r["negative"] and "skipped" not in r]
    negative = [r for r in results.values() if r["negative"] and "skipped" not in r]
    out: list[tuple[str, list[str], list[list[str]]]] = []
    if positive:
        rows = []
        for r in positive:
            la = r["level_accuracy"]
            rows.append([
                r["cohort"], _n(r), _f(r["dice_mean"]),
                f"{_f(la['right']['share'], 2)} / {_f(la['unlabelled']['share'], 2)} / "
                f"{_f(la['wrong']['share'], 2)} ({la['vertebrae']})",
                _fci(la["right_or_unlabelled"]), _fci(r["assessed_in_field"]), _auc_cell(r["auc_vertebra"]),
                _auc_cell(r["auc_patient"]), _fci(r["sensitivity"]), _fci(r["specificity"]),
                f"{_f(r['flagged_sensitivity']['share'], 2)} / {_f(r['flagged_specificity']['share'], 2)}",
                _fci(r["fracture_free_with_present"]),
                f"{r['not_performed']} / {r['refused']} / {r['crashed']}", _f(r["seconds_mean"], 2),
            ])
        out.append(("Fracture cohorts", [
            "cohort", "n", "Dice C1-C7", "levels right / unlab. / wrong (n)",
            "right or unlab.", "assessed", "vertebra AUC", "patient AUC", "sensitivity",
            "specificity", "flagged sens. / spec. (present or indeterminate)",
            "fracture-free with a present finding",
            "not perf. / refused / crashed", "s / case"], rows))
        rows = []
        for r in positive:
            rows.append([r["cohort"], "Dice", *(_f(r["dice"][k]) for k in LEVELS)])
            rows.append([r["cohort"], "AUC", *(
                "n/a" if r["auc_level"][k]["auc"] is None else
                f"{r['auc_level'][k]['auc']:.2f} ({r['auc_level'][k]['positives']}+)" for k in LEVELS)])
        out.append(("Per level", ["cohort", "metric", *LEVELS], rows))
    if negative:
        rows = [[r["cohort"], _n(r), _fci(r["not_assessable"]), str(r["segments_total"]),
                 str(r["segments_max"]), str(r["present_total"]), str(r["crashed"]),
                 _f(r["seconds_mean"], 2)]
                for r in negative]
        out.append(("Negatives (bars: not assessable 100 %, 0 segments, 0 present findings)", [
            "cohort", "n", "not assessable", "vertebra segments", "max per case",
            "present findings", "crashed", "s / case"], rows))
    return out


def markdown(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = [BEGIN, "## CT cervical spine: held-out evaluation (bench/eval_ct.py)", "",
             f"`{meta['command']}` on {meta['date']}; {meta['machine']}.", "",
             f"Models: {', '.join(meta['models']) or 'none loaded'}; pipeline entry: "
             f"{', '.join(meta['paths']) or '-'}. Seeds from {meta['seed_base']} up, the same seeds "
             "for every perturbation of a generator. 95 % CIs: Wilson for shares, DeLong for "
             "per-level and patient AUC, cluster bootstrap over cases for the vertebra AUC; an AUC "
             "of 0 or 1 (no overlapping scores) has a zero-width interval, so read its n. "
             f"Code: {meta['commit']}. Definitions: `bench/eval_ct.py` (`summarise`).", ""]
    for title, header, rows in tables(results):
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |",
                  "| " + " | ".join("---" for _ in header) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    skipped = [f"{r['cohort']} ({r['skipped']})" for r in results.values() if "skipped" in r]
    if skipped:
        lines += ["Not run: " + "; ".join(skipped) + ".", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def print_tables(results: Mapping[str, Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no wrapping at 80 columns
        console = Console(width=240)
    for title, header, rows in tables(results):
        table = Table(title=title, show_lines=False)
        for column in header:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for r in results.values():
        if "skipped" in r:
            console.print(f"[yellow]not run[/]: {r['cohort']}: {r['skipped']}")


# ------------------------------------------------------------------------- main


def source_commit() -> str:
    """The repository's commit, and whether the pipeline or model files differ from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "inference", "engines"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes under inference/ or engines/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_ct", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="cases per cohort (default: %(default)s)")
    parser.add_argument("--n-per", default="",
                        help="per-cohort case counts, e.g. cross=100,neg/chest=40; clinical_grid "
                             f"cohorts default to at most {BIG_GRID_CASES} (their volumes are 10x larger)")
    parser.add_argument("--cohorts", default="all", help="comma list (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads per process (default: %(default)s)")
    parser.add_argument("--engines-dir", type=Path, default=None,
                        help="model repository (default: the packaged engines/)")
    parser.add_argument("--backend", default="onnxruntime", help="engine backend (default: %(default)s)")
    parser.add_argument("--via", choices=VIAS, default="auto",
                        help="pipeline entry: analyse() on the volume, run() on a DICOM series "
                             "(the node's path, header checks included), or auto: analyse where "
                             "present (default: %(default)s)")
    parser.add_argument("--fail-fast", action="store_true",
                        help="stop at the first case that crashes (default: count it and go on)")
    parser.add_argument("--seed-base", type=int, default=SEED_BASE)
    parser.add_argument("--resamples", type=int, default=2000,
                        help="bootstrap resamples for the pooled vertebra AUC (default: %(default)s)")
    parser.add_argument("--write", action="store_true",
                        help="write bench/RESULTS.md's section and bench/out/eval_ct.json")
    parser.add_argument("--json", type=Path, default=OUT_JSON, help="JSON output with --write")
    parser.add_argument("--records", type=Path, default=None,
                        help="append each finished case to this JSON-lines file and skip the "
                             "cases it already holds: a run stopped part way resumes with the "
                             "same command (refused when models, backend, entry, seeds or commit "
                             "differ)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.n < 1 or args.jobs < 1:
        raise SystemExit(f"--n and --jobs must be >= 1, got {args.n} and {args.jobs}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    names = expand_cohorts(args.cohorts)
    results: dict[str, dict[str, Any]] = {}
    runnable = []
    have_cross = cross_generator() is not None
    for name in names:
        if COHORTS[name].generator == "cross" and not have_cross:
            results[name] = {"cohort": name, "negative": COHORTS[name].negative,
                             "skipped": f"{CROSS_MODULE} not installed"}
        else:
            runnable.append(name)
    counts = cohort_counts(runnable, args.n, args.n_per)
    tasks = [(name, seed) for name in runnable for seed in cohort_seeds(counts[name], args.seed_base)]
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in runnable}
    journal = None
    total_cases = len(tasks)
    if args.records is not None:
        journal = Journal(args.records, journal_config(args.engines_dir, args.backend, args.via,
                                                       args.seed_base))
        kept = [(name, seed) for name, seed in tasks if not journal.has(name, seed)]
        for name in runnable:
            wanted = set(cohort_seeds(counts[name], args.seed_base))
            records[name] = [r for r in journal.done.get(name, ()) if r.get("seed") in wanted]
        if len(kept) < len(tasks):
            print(f"{len(tasks) - len(kept)} of {len(tasks)} cases read from {args.records}")
        tasks = kept
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        bar = progress.add_task("cases", total=len(tasks))
        if args.jobs == 1:
            models = model_provider(args.engines_dir, args.backend, args.threads)
            for name, seed in tasks:
                progress.update(bar, description=f"{name} {seed}")
                records[name].append(evaluate_case(COHORTS[name], seed, models, via=args.via,
                                                   keep_going=not args.fail_fast))
                if journal is not None:
                    journal.add(name, records[name][-1])
                progress.advance(bar)
        else:
            context = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker,
                                             initargs=(args.engines_dir, args.backend, args.threads)) as pool:
                pending = [pool.submit(_worker_case, name, seed, args.via, not args.fail_fast)
                           for name, seed in tasks]
                for future in futures.as_completed(pending):
                    name, record = future.result()
                    records[name].append(record)
                    if journal is not None:
                        journal.add(name, record)
                    progress.update(bar, description=name)
                    progress.advance(bar)
    if journal is not None:
        journal.close()
    for name in runnable:
        ordered = sorted(records[name], key=lambda r: r["seed"])
        summary = summarise(name, ordered, COHORTS[name].negative, n_resamples=args.resamples)
        summary["perturbation"] = _jsonable(COHORTS[name].perturbation.changed())
        summary["description"] = COHORTS[name].description
        summary["records"] = ordered
        results[name] = summary
    elapsed = time.perf_counter() - started
    print_tables(results)

    argv_used = sys.argv[1:] if argv is None else argv
    models_seen = sorted({f"{m['name']} {m['version']} ({m['backend']}, sha256 {m['weights']}...)"
                          for r in results.values() for rec in r.get("records", ()) for m in rec.get("models", ())})
    meta = {
        "command": "python -m bench.eval_ct" + (" " + shlex.join(argv_used) if argv_used else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "cores": os.cpu_count(),
        "jobs": args.jobs,
        "threads": args.threads,
        "elapsed_s": round(elapsed, 1),
        **({"records": str(args.records), "cases_read_from_records": total_cases - len(tasks)}
           if journal is not None else {}),
        "seed_base": args.seed_base,
        "commit": source_commit(),
        "n_per_cohort": {name: results[name].get("n", 0) for name in names},
        "models": models_seen,
        "paths": sorted({p for r in results.values() for p in r.get("path", [])}),
    }
    print(f"{len(tasks)} cases run in {elapsed:.0f} s" + (f" ({total_cases - len(tasks)} read from "
          f"{args.records})" if total_cases > len(tasks) else ""))
    if args.write:
        replace_section(RESULTS, BEGIN, END, markdown(results, meta))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_jsonable({"meta": meta, "cohorts": results}), indent=1) + "\n",
                             encoding="utf-8")
        for card in fold_into_cards(results, meta, args.engines_dir):
            print(f"wrote {card}")
        print(f"wrote {RESULTS} and {args.json}")
    return 0


def card_evaluation(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any],
                    stage: str) -> dict[str, Any]:
    """What a model card keeps of a benchmark run: per cohort, n and the stage's figures."""
    out: dict[str, Any] = {"command": meta.get("command"), "date": meta.get("date"),
                           "commit": meta.get("commit"), "cohorts": {}}
    for name, r in results.items():
        entry: dict[str, Any] = {"n": r.get("n")}
        if r.get("negative"):
            entry.update(not_assessable=r["not_assessable"]["share"], segments=r["segments_total"],
                         present_findings=r["present_total"])
        elif stage == "segmentation":
            entry.update(dice_mean=r.get("dice_mean"),
                         levels={k: r["level_accuracy"][k]["share"] for k in ("right", "unlabelled", "wrong")})
        else:
            entry.update(vertebra_auc=r["auc_vertebra"]["auc"], vertebra_auc_ci95=r["auc_vertebra"]["ci95"],
                         patient_auc=r["auc_patient"]["auc"], patient_auc_ci95=r["auc_patient"]["ci95"],
                         sensitivity=r["sensitivity"]["share"], specificity=r["specificity"]["share"],
                         sensitivity_ci95=r["sensitivity"]["ci95"],
                         specificity_ci95=r["specificity"]["ci95"],
                         flagged_sensitivity=r["flagged_sensitivity"]["share"],
                         flagged_specificity=r["flagged_specificity"]["share"],
                         level_auc={k: {"auc": v["auc"], "ci95": v["ci95"],
                                        "n": f"{v['positives']}+/{v['negatives']}-"}
                                    for k, v in r["auc_level"].items()})
        out["cohorts"][name] = entry
    return out


def fold_into_cards(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any],
                    engines_dir: Path | None) -> list[Path]:
    """Write the run's figures into the two CT cards (``weights.metrics.evaluation``)."""
    import yaml

    from spine_node.engines import ENGINES_DIR

    folder = Path(engines_dir) if engines_dir is not None else ENGINES_DIR
    written = []
    for model, stage in ((ct_cspine.SEGMENTATION_MODEL, "segmentation"),
                         (ct_cspine.FRACTURE_MODEL, "classification")):
        path = folder / model / "model.yaml"
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        metrics = data.setdefault("weights", {}).setdefault("metrics", {})
        metrics["evaluation"] = _jsonable(card_evaluation(results, meta, stage))
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
