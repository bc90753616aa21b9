"""Training recipe ``ct-cspine``: the two-stage cervical spine CT fracture models.

Stage 1 (``cspine-ct-vertebra-seg``, :class:`~spine_node.inference.models.ct.VertebraUNet3D`)
learns, per voxel on a 2 mm grid, background / C1 / C2 / a subaxial cervical vertebra /
a thoracolumbar vertebra, and a heat map at each vertebral body; the pipeline numbers
C3-C7 by counting from C2 or T1 (:func:`~spine_node.inference.pipelines.ct_cspine.identify_levels`).
Stage 2 (``cspine-ct-fracture``, :class:`~spine_node.inference.models.ct.VertebraFractureNet`)
learns fracture / no fracture per vertebra from crops of the source-resolution CT.

Data
----
Phantoms (default): :func:`spine_node.inference.phantoms.generate` with ``context=True``
(skull, T1-T3 with ribs, shoulders), random patient size (0.8-1.2), pose (up to 15
degrees about every axis) and fractures, scanned by a random acquisition
(:mod:`spine_node.inference.acquisition`: field of view from the cranium to T3, slices
0.5-3 mm with their slice profile, HU calibration, dose, metal), plus negatives (head,
air, water, noise, chest and abdomen phantoms) that hold no cervical spine. Seeds:
:data:`TRAIN_SEEDS` for training, :data:`VALIDATION_SEEDS` for the operating point and
the card's metrics; tests and benchmarks use other seeds and a second, independent
generator (:mod:`spine_node.inference.heldout`) that training never sees.

The operating point (the fracture threshold the pipeline uses) is chosen on the
validation cohort, run through the exported ONNX models and the real pipeline, for a
patient-level specificity of at least :data:`TARGET_SPECIFICITY`.

RSNA 2022 Cervical Spine Fracture Detection (``--data ROOT``), the layout as published::

    ROOT/train.csv                    StudyInstanceUID,patient_overall,C1,...,C7 (0/1)
    ROOT/train_images/<study>/*.dcm   one axial CT series per study
    ROOT/segmentations/<study>.nii    C1..C7 = 1..7 (T1.. = 8..; treated as background),
                                      for a subset of the studies

Segmentations are placed on the CT through their NIfTI affine (RAS) and the DICOM
geometry (LPS), not through a fixed axis flip. Stage 1 trains on the studies that have a
segmentation; stage 2 on the studies with a segmentation (crops need the vertebra boxes).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import ndimage
from torch.nn import functional as F

from spine_node.inference import acquisition, phantoms
from spine_node.inference.card import ModelCard, TensorSpec
from spine_node.inference.findings import AssessmentValues
from spine_node.inference.models import architecture
from spine_node.inference.pipelines.ct_cspine import (
    CLASS_C1,
    CLASS_C2,
    CLASS_LOWER,
    CLASS_SUBAXIAL,
    FRACTURE_MODEL,
    FRACTURE_PREPROCESSING,
    LEVELS,
    SEG_CLASSES,
    SEGMENTATION_MODEL,
    SEGMENTATION_PREPROCESSING,
    CervicalSpineCtFracture,
    CtVolume,
    load_ct_series,
    normalise,
    normalise_crop,
    resample,
    stage2_crops,
)
from spine_node.inference.stats import roc_auc, wilson_ci
from spine_node.inference.train import TrainOptions, mean_weights

log = logging.getLogger(__name__)

VERSION = "0.7.0"
#: Stage 2's test-time augmentation, written into its card
#: (``ct_cspine.TTA_KEYS``): the box margin training uses (4 mm) and 0 and 8 mm around
#: it, each also mirrored left-right; logits averaged. Chosen 2026-11-28 among four
#: schemes (none, mirror, mirror + margins, the same with logits averaged) on 60 cases of
#: four benchmark cohorts; the benchmark figures since then are on other seeds
#: (docs/models-ct.md, "Stage 2 read six ways").
STAGE2_TTA: dict[str, Any] = {"margins_mm": [4.0, 0.0, 8.0], "mirror": True}
SEG_ARCH = ("cspine-ct-unet3d", {"widths": [16, 32, 64, 64], "stem": 6, "classes": len(SEG_CLASSES) + 1})
FRACTURE_ARCH = ("cspine-ct-vertebra-classifier-2.5d",
                 {"slices": 24, "group": 3, "widths": [12, 24, 32, 48], "hidden": 32})
#: Phantom seeds: training, and validation (operating point, card). Tests use other seeds.
TRAIN_SEEDS = range(10_000, 200_000)
VALIDATION_SEEDS = range(500_000, 501_000)
TARGET_SPECIFICITY = 0.92
#: ``TrainOptions.stage``: both stages, or one alone (the other kept as it is in ``out``).
STAGES = ("all", "fracture", "segmentation")
#: The rule-out operating point: the highest threshold at which the validation cohort's
#: fractured patients are flagged (present or indeterminate) at least this often.
TARGET_RULE_OUT_SENSITIVITY = 0.9
#: ... but the rule-out point flags at most half of the fracture-free validation patients:
#: a band that calls nearly every normal study indeterminate tells the reader nothing
#: (0.5.0 at sensitivity 0.9 alone: rule-out 0.017, flagged specificity 0.02 on the
#: benchmark's training generator). Where the floor binds, the card's flagged sensitivity
#: says what the band catches.
MIN_RULE_OUT_SPECIFICITY = 0.5
HEAT_SIGMA_MM = 3.0
INTENDED_USE = ("Demonstration and integration testing of spine-node only. Trained on "
                "synthetic phantoms; NOT for clinical use, not a medical device.")
NEGATIVES = ("head", "air", "water", "noise", "chest", "abdomen")


@dataclass(frozen=True)
class Budget:
    """How much data and how many optimiser steps each stage gets."""

    seg_cases: int = 320
    seg_steps: int = 900
    seg_batch: int = 1
    seg_crop: tuple[int, int, int] = (80, 64, 64)
    fracture_cases: int = 360
    fracture_steps: int = 1500
    fracture_batch: int = 16
    validation_cases: int = 100
    negative_share: float = 0.12
    workers: int = 2

    @classmethod
    def quick(cls) -> Budget:
        return cls(seg_cases=4, seg_steps=2, fracture_cases=3, fracture_steps=2,
                   fracture_batch=4, validation_cases=3, workers=1)

    @classmethod
    def gpu(cls) -> Budget:
        """For a machine with a CUDA GPU and many cores (``--budget gpu``)."""
        return cls(seg_cases=900, seg_steps=3500, seg_batch=4, fracture_cases=600,
                   fracture_steps=4000, fracture_batch=96, validation_cases=150, workers=16)


def _spacing() -> tuple[float, float, float]:
    z, y, x = (float(s) for s in SEGMENTATION_PREPROCESSING["spacing_mm"])
    return z, y, x


def _crop_shape() -> tuple[int, int, int]:
    d, h, w = (int(n) for n in FRACTURE_PREPROCESSING["crop_shape"])
    return d, h, w


# ------------------------------------------------------------------------- targets


def classes_from_labels(labels: np.ndarray) -> np.ndarray:
    """RSNA-numbered vertebra labels -> stage-1 classes (C1, C2, C3-C7, thoracolumbar)."""
    out = np.zeros(labels.shape, np.uint8)
    out[labels == 1] = CLASS_C1
    out[labels == 2] = CLASS_C2
    out[(labels >= 3) & (labels <= 7)] = CLASS_SUBAXIAL
    out[labels >= 8] = CLASS_LOWER
    return out


def heat_target(labels: np.ndarray, spacing: Sequence[float],
                sigma_mm: float = HEAT_SIGMA_MM) -> np.ndarray:
    """A Gaussian at the body centre of every vertebra from C3 down: the centroid of the
    anterior 35 % of its voxels (the body, whatever the arch looks like)."""
    heat = np.zeros(labels.shape, np.float32)
    step = np.asarray(spacing, float)
    reach = np.ceil(3 * sigma_mm / step).astype(int)
    boxes = ndimage.find_objects(labels.astype(np.int32))
    for index, box in enumerate(boxes):
        label = index + 1
        if box is None or label < 3:
            continue
        idx = np.nonzero(labels[box] == label)
        if len(idx[0]) < 10:
            continue
        ys = idx[1]
        front = ys <= ys.min() + 0.35 * (ys.max() - ys.min())
        centre = np.array([idx[a][front].mean() + box[a].start for a in range(3)])
        lo = np.maximum(np.floor(centre - reach).astype(int), 0)
        hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, labels.shape)
        grid = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
        d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, step, strict=True))
        sub = heat[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(sub, np.exp(-d2 / (2 * sigma_mm ** 2)).astype(np.float32), out=sub)
    return heat


@dataclass
class SegCase:
    """A stage-1 training case on the model grid."""

    image: np.ndarray  # normalised CT
    classes: np.ndarray  # uint8 stage-1 classes
    heat: np.ndarray  # float32 heat-map target


@dataclass
class CropSet:
    """Stage-2 samples of one case: normalised crops (V, D, H, W), 0/1 targets, levels."""

    crops: np.ndarray
    targets: np.ndarray
    levels: tuple[str, ...]


def _landmarks(ph: phantoms.Phantom) -> dict[str, float]:
    return {v.name: float(v.center_mm[0]) for v in ph.vertebrae}


#: Share of training and validation phantoms drawn with ``varied_anatomy`` (domain
#: randomisation of proportions, densities and neighbours); the rest keep the textbook shapes.
VARIED_ANATOMY_SHARE = 0.75


def _random_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    return dict(context=True, varied_fractures=True,
                size_scale=float(rng.uniform(0.8, 1.2)),
                pose_deg=tuple(float(a) for a in rng.uniform(-15.0, 15.0, size=3)),
                varied_anatomy=bool(rng.random() < VARIED_ANATOMY_SHARE))


#: Share of the stage-1 phantoms drawn with ``varied_anatomy`` that also get
#: ``posterior_detail`` (articular pillars, spinous processes sloping down, longer spinous
#: and transverse processes). Stage 1 0.4.0 saw none and its boxes stop short of the
#: second generator's long sloping processes; 0 (no draw) reproduces 0.4.0. A fine-tune
#: with 0.6 is in docs/models-ct.md ("Stage 1 on posterior detail").
SEG_POSTERIOR_SHARE = 0.0
#: The same for stage-2 phantoms (0: no draw, so the stage-2 recipe reproduces 0.5.0).
FRACTURE_POSTERIOR_SHARE = 0.0


def _with_posterior(seed: int, anatomy: dict[str, Any], share: float) -> dict[str, Any]:
    """``anatomy`` with ``posterior_detail`` for ``share`` of the varied phantoms, drawn from
    a stream of its own (the case's other draws stay as they were)."""
    if share <= 0 or not anatomy.get("varied_anatomy"):
        return anatomy
    drawn = np.random.default_rng([seed, 0x9057]).random() < share
    return {**anatomy, "posterior_detail": bool(drawn)}


def _negative(seed: int, rng: np.random.Generator,
              spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """A negative scan on ``spacing`` and its labels (thoracolumbar vertebrae >= 8)."""
    kind = NEGATIVES[int(rng.integers(0, len(NEGATIVES)))]
    if kind in ("chest", "abdomen"):
        region = "thoracic" if kind == "chest" else "lumbar"
        ph = phantoms.generate(seed, region=region, spacing=tuple(spacing), p_fracture=0.2,
                               p_dislocation=0.0)
        labels = np.where(ph.labels > 0, np.maximum(ph.labels, 8), 0).astype(np.uint8)
        scan = acquisition.CtAcquisition(spacing=tuple(spacing),  # type: ignore[arg-type]
                                         slice_thickness_mm=float(spacing[0]),
                                         hu_scale=float(rng.uniform(0.85, 1.15)),
                                         hu_offset=float(rng.uniform(-150, 150)),
                                         noise_hu=float(rng.uniform(3, 40)))
        hu, lab = acquisition.acquire(ph.hu, labels, ph.spacing, scan, rng)
        assert lab is not None
        return hu, lab
    hu = acquisition.negative_volume(kind, rng, spacing)
    if kind in ("head", "water"):
        hu = hu * float(rng.uniform(0.85, 1.15)) + float(rng.uniform(-150, 150))
        hu += rng.normal(0.0, float(rng.uniform(3, 40)), size=hu.shape).astype(np.float32)
    return hu.astype(np.float32), np.zeros(hu.shape, np.uint8)


def seg_case(seed: int, negative_share: float = 0.12) -> SegCase:
    """A randomised stage-1 case: phantom, acquisition, then the pipeline's 2 mm grid."""
    rng = np.random.default_rng(seed)
    grid = _spacing()
    if rng.random() < negative_share:
        hu, labels = _negative(seed, rng, grid)
    else:
        anatomy = _with_posterior(seed, _random_anatomy(rng), SEG_POSTERIOR_SHARE)
        ph = phantoms.generate(seed, spacing=2.0, p_fracture=0.5, **anatomy)
        scan = acquisition.random_acquisition(rng, _landmarks(ph), np.asarray(ph.shape) * 2.0,
                                              fine=False)
        acquired, lab = acquisition.acquire(ph.hu, ph.labels, ph.spacing, scan, rng)
        assert lab is not None
        hu = resample(acquired, scan.spacing, grid)
        labels = resample(lab, scan.spacing, grid, order=0)
    return SegCase(normalise(hu), classes_from_labels(labels), heat_target(labels, grid))


def level_crops(hu: np.ndarray, labels: np.ndarray, spacing: Sequence[float],
                fractured: Sequence[str], rng: np.random.Generator | None) -> CropSet:
    """Stage-2 crops of every C1..C7 vertebra mostly inside ``labels``' field."""
    pre = FRACTURE_PREPROCESSING
    cervical = np.where(labels <= len(LEVELS), labels, 0)
    found = stage2_crops(hu, spacing, cervical, spacing, pre, rng=rng)
    crops, targets, names = [], [], []
    for level, crop in found.items():
        if int((labels == LEVELS.index(level) + 1).sum()) < int(pre["min_voxels"]):
            continue
        crops.append(normalise_crop(crop))
        targets.append(int(level in fractured))
        names.append(level)
    shape = (0, *_crop_shape())
    return CropSet(np.stack(crops) if crops else np.zeros(shape, np.float32),
                   np.asarray(targets, np.float32), tuple(names))


#: Stage-2 phantoms are rendered at this grid (mm): fine enough for 1.2 mm fracture lines,
#: coarse enough to render hundreds on two cores.
RENDER_MM = 1.5
#: Share of stage-2 and validation phantoms rendered at 2 mm instead (point-sampled, so
#: cortex and fracture gaps alias: intact bone must not read as broken on coarse data).
COARSE_RENDER_SHARE = 0.25


def _render_mm(rng: np.random.Generator) -> float:
    return 2.0 if rng.random() < COARSE_RENDER_SHARE else RENDER_MM


def _fine_scan(ph: phantoms.Phantom, render: float, rng: np.random.Generator
               ) -> tuple[tuple[float, float, float], np.ndarray, np.ndarray]:
    """A random fine acquisition of phantom ``ph`` (rendered at ``render`` mm): its grid,
    HU and labels. The renderer has no detail finer than its grid, so finer acquisition
    grids would only interpolate: the grid is at least ``render``."""
    scan = acquisition.random_acquisition(rng, _landmarks(ph), np.asarray(ph.shape, float) * render,
                                          fine=True)
    scan = scan.with_(spacing=tuple(max(render, s) for s in scan.spacing))
    hu, labels = acquisition.acquire(ph.hu, ph.labels, ph.spacing, scan, rng)
    assert labels is not None
    return scan.spacing, hu, labels


#: Share of stage-2 phantoms with one forced upper-cervical fracture (:data:`UPPER_PATTERNS`).
#: C1 and C2 fractures are the commonest in the neck but the hardest for stage 2: with
#: only the random draw (a C2 crack is a dens or hangman's fracture one time in three)
#: 0.4.0 saw a few dozen dens and hangman's fractures and scored them like intact C2s
#: on the second generator (vertebra AUC 0.30 and 0.15, n = 21 and 14).
UPPER_CERVICAL_SHARE = 0.4
#: Share of the stage-2 phantoms' C2-C7 fracture lines drawn as incomplete fractures
#: confined to one part of the vertebra (``phantoms.generate(local_cracks=...)``: one
#: pedicle, lamina, pillar, process, a corner or part of the body); 0 draws nothing. Off:
#: a fine-tune with 0.5 lost on the second generator (docs/models-ct.md, "Stage 2 0.7.0").
LOCAL_CRACK_SHARE = 0.0
#: Share of the stage-2 phantoms whose findings are drawn as the generator's plain default
#: draws them (``varied_fractures=False``: a C2 line at the base of the dens in half the
#: C2 cracks, anterior wedges of 22-45 %, C1 with one break), with the same random anatomy
#: and acquisitions; decided on a stream of its own. Off (0: no draw): a fine-tune from
#: 0.7.0 with 0.5 did not read the plain phantoms' C2 better (docs/models-ct.md, "C2 on
#: the training generator").
PLAIN_FRACTURE_SHARE = 0.0
#: (level, kind) of those forced fractures, drawn uniformly.
UPPER_PATTERNS: tuple[tuple[str, str], ...] = (
    ("C1", "crack"), ("C2", "dens"), ("C2", "dens"), ("C2", "hangman"), ("C2", "hangman"),
    ("C2", "crack"))


def _with_plain_findings(seed: int, anatomy: dict[str, Any], forced: dict[str, Any], share: float
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``anatomy`` and ``forced`` with the plain default findings (``varied_fractures``
    off) for ``share`` of the seeds, drawn from a stream of its own; a forced C2 pattern of
    the varied draws (dens, hangman's) becomes a plain C2 crack, which breaks the base of
    the dens in half the draws."""
    if share <= 0 or np.random.default_rng([seed, 0x91A1]).random() >= share:
        return anatomy, forced
    if forced.get("fractures", {}).get("C2") in phantoms.C2_PATTERNS:
        forced = {**forced, "fractures": {**forced["fractures"], "C2": "crack"}}
    return {**anatomy, "varied_fractures": False}, forced


def _stage2_draws() -> str:
    """The stage-2 draws this recipe takes beyond the varied phantoms, for the card."""
    shares = {"plain fracture patterns": PLAIN_FRACTURE_SHARE, "incomplete fractures": LOCAL_CRACK_SHARE,
              "posterior detail": FRACTURE_POSTERIOR_SHARE, "shape jitter": SHAPE_JITTER_SHARE}
    return "".join(f"; stage 2: {what} in {share:.0%}" for what, share in shares.items() if share > 0)


def fracture_case(seed: int, scans: int = 3) -> CropSet:
    """Randomised stage-2 samples from one phantom rendered at :data:`RENDER_MM` and scanned ``scans``
    times (rendering is the expensive part; each scan has its own acquisition)."""
    rng = np.random.default_rng(seed)
    anatomy = {**_with_posterior(seed, _random_anatomy(rng), FRACTURE_POSTERIOR_SHARE),
               "context": False}  # crops need the neck, not the cranium
    render = _render_mm(rng)
    forced: dict[str, Any] = {}
    if rng.random() < UPPER_CERVICAL_SHARE:
        level, kind = UPPER_PATTERNS[int(rng.integers(len(UPPER_PATTERNS)))]
        forced = {"fractures": {level: kind}}
    anatomy, forced = _with_plain_findings(seed, anatomy, forced, PLAIN_FRACTURE_SHARE)
    ph = phantoms.generate(seed, spacing=render, shape=tuple(int(n / render) for n in (150, 128, 128)),
                           p_fracture=0.7, local_cracks=LOCAL_CRACK_SHARE, **anatomy, **forced)
    fractured = [v.name for v in ph.vertebrae if v.fractured]
    sets = []
    for _ in range(scans):
        spacing, hu, labels = _fine_scan(ph, render, rng)
        sets.append(level_crops(hu, labels, spacing, fractured, rng))
    return CropSet(np.concatenate([c.crops for c in sets]), np.concatenate([c.targets for c in sets]),
                   sum((c.levels for c in sets), ()))


def _map(function: Callable[[int], Any], seeds: Sequence[int], workers: int, progress: bool,
         label: str) -> list[Any]:
    out: list[Any] = []
    with _progress(progress) as bar:
        task = bar.add_task(label, total=len(seeds), status="")
        if workers <= 1:
            for seed in seeds:
                out.append(function(seed))
                bar.update(task, advance=1)
            return out
        import multiprocessing

        with ProcessPoolExecutor(max_workers=workers,
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(function, seeds, chunksize=4):
                out.append(result)
                bar.update(task, advance=1)
    return out


# ------------------------------------------------------------------- RSNA layout


@dataclass(frozen=True)
class RsnaStudy:
    uid: str
    images: Path
    segmentation: Path | None
    fractures: np.ndarray
    patient: int


class RsnaCervicalSpine:
    """The RSNA 2022 Cervical Spine Fracture Detection layout (see the module docstring)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.csv = self.root / "train.csv"
        if not self.csv.is_file():
            raise FileNotFoundError(f"RSNA layout: no train.csv in {self.root}")
        if not (self.root / "train_images").is_dir():
            raise FileNotFoundError(f"RSNA layout: no train_images/ in {self.root}")

    def studies(self) -> list[RsnaStudy]:
        studies = []
        with self.csv.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            need = {"StudyInstanceUID", "patient_overall", *LEVELS}
            missing = need - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{self.csv}: missing columns {sorted(missing)}")
            for row in reader:
                uid = row["StudyInstanceUID"].strip()
                images = self.root / "train_images" / uid
                if not images.is_dir():
                    log.warning("RSNA study %s listed in train.csv has no images; skipped", uid)
                    continue
                segmentation = None
                for suffix in (".nii", ".nii.gz"):
                    candidate = self.root / "segmentations" / f"{uid}{suffix}"
                    if candidate.is_file():
                        segmentation = candidate
                fractures = np.array([int(row[level]) for level in LEVELS], dtype=np.int64)
                studies.append(RsnaStudy(uid, images, segmentation, fractures,
                                         int(row["patient_overall"])))
        return studies

    def load(self, study: RsnaStudy) -> tuple[CtVolume, np.ndarray]:
        """One study's volume and its labels on the volume's own grid (placed by affine)."""
        if study.segmentation is None:
            raise ValueError(f"RSNA study {study.uid} has no segmentation")
        volume = load_ct_series(sorted(study.images.glob("*.dcm")))
        labels = segmentation_on_grid(study.segmentation, volume, volume.spacing, volume.hu.shape)
        return volume, labels


def volume_affine(files: Sequence[Path], volume: CtVolume) -> np.ndarray:
    """4x4 map from canonical ``(z, y, x)`` voxel indices of ``volume`` to LPS millimetres."""
    import pydicom

    by_uid = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_uid[str(ds.SOPInstanceUID)] = ds
    first = by_uid[volume.sop_instance_uids[0]]
    last = by_uid[volume.sop_instance_uids[-1]]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    d_row, d_col = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    p1 = np.array([float(v) for v in last.ImagePositionPatient])
    n = len(volume.sop_instance_uids)
    rows, cols = volume.hu.shape[1:]
    slice_vec = (p1 - p0) / max(n - 1, 1)
    y_vec = col_dir * d_row * (-1 if volume.flip_rows else 1)
    x_vec = row_dir * d_col * (-1 if volume.flip_columns else 1)
    origin = p0.copy()
    if volume.flip_rows:
        origin += col_dir * d_row * (rows - 1)
    if volume.flip_columns:
        origin += row_dir * d_col * (cols - 1)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = slice_vec, y_vec, x_vec, origin
    return affine


def segmentation_on_grid(path: Path, volume: CtVolume, spacing: Sequence[float],
                         shape: Sequence[int], files: Sequence[Path] | None = None) -> np.ndarray:
    """Sample a NIfTI label map at the centres of the model grid over ``volume``.

    The model grid voxel ``m`` lies at canonical index ``(m + 0.5) * spacing / source - 0.5``;
    canonical indices go to LPS through :func:`volume_affine`, LPS to RAS by negating x
    and y, and RAS to NIfTI voxels through the inverse NIfTI affine (nearest neighbour).
    Labels above 7 (thoracic) become background.
    """
    import nibabel

    image = nibabel.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    files = files if files is not None else sorted(_series_dir(path, volume).glob("*.dcm"))
    to_lps = volume_affine(files, volume)
    axes = [(np.arange(n) + 0.5) * t / s - 0.5 for n, t, s in zip(shape, spacing, volume.spacing,
                                                                  strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    index = np.stack([zz.ravel(), yy.ravel(), xx.ravel(), np.ones(zz.size)])
    lps = to_lps @ index
    ras = lps.copy()
    ras[0] *= -1
    ras[1] *= -1
    voxel = np.linalg.inv(image.affine) @ ras
    ijk = np.rint(voxel[:3]).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(data.shape)[:, None]), axis=0)
    out = np.zeros(zz.size, dtype=np.uint8)
    values = data[ijk[0, inside], ijk[1, inside], ijk[2, inside]]
    out[inside] = np.where((values >= 1) & (values <= len(LEVELS)), values, 0).astype(np.uint8)
    return out.reshape(tuple(shape))


def _series_dir(segmentation: Path, volume: CtVolume) -> Path:
    root = segmentation.parent.parent
    return root / "train_images" / volume.study_uid


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not enabled)



# --------------------------------------------------------------------- training


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def _random_crop(case: SegCase, crop: Sequence[int],
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, classes, heat = case.image, case.classes, case.heat
    low = float(SEGMENTATION_PREPROCESSING["hu_window"][0]) / float(SEGMENTATION_PREPROCESSING["hu_scale"])
    pads = [(0, max(0, c - n)) for c, n in zip(crop, image.shape, strict=True)]
    if any(p[1] for p in pads):
        image = np.pad(image, pads, constant_values=low)
        classes = np.pad(classes, pads)
        heat = np.pad(heat, pads)
    starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(image.shape, crop, strict=True)]
    box = tuple(slice(s, s + c) for s, c in zip(starts, crop, strict=True))
    image, classes, heat = image[box], classes[box], heat[box]
    if rng.random() < 0.5:  # left-right mirror: anatomy is symmetric enough
        image, classes, heat = image[:, :, ::-1], classes[:, :, ::-1], heat[:, :, ::-1]
    return (np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(classes),
            np.ascontiguousarray(heat))


def _initial_weights(model: torch.nn.Module, init: Path | None, name: str) -> bool:
    """Load ``init/<name>/model.pt`` into ``model`` (fine-tuning); False without ``init``."""
    if init is None:
        return False
    path = init / name / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--init {init}: no {name}/model.pt there to start from")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    log.info("%s: starting from %s", name, path)
    return True


def train_segmentation(cases: Sequence[SegCase], budget: Budget, seed: int,
                       progress: bool, init: Path | None = None) -> torch.nn.Module:
    """Train stage 1 (classes + heat map) and return the model in eval mode, on the CPU."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = _device()
    name, kwargs = SEG_ARCH
    model = architecture(name, **kwargs)
    tuned = _initial_weights(model, init, SEGMENTATION_MODEL)
    model = model.to(device)
    if not tuned:
        with torch.no_grad():
            # Start from "everything is background" (about 97 % of voxels) and a cold heat map.
            last = model.full[-1]  # type: ignore[index]
            last.bias.zero_()
            last.bias[0] = 3.0
            last.bias[len(SEG_CLASSES)] = -4.0
    class_weights = torch.tensor([1.0, 3.0, 3.0, 2.0, 2.0], device=device)
    peak = 1.5e-3 if tuned else 4e-3
    optimiser = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=peak, total_steps=budget.seg_steps,
                                                   pct_start=0.1)
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task("stage 1: vertebrae and levels", total=budget.seg_steps, status="")
        for _ in range(budget.seg_steps):
            batch = [_random_crop(cases[int(i)], budget.seg_crop, rng)
                     for i in rng.integers(0, len(cases), size=budget.seg_batch)]
            x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(device)
            y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64)).to(device)
            h = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
            x = x * float(rng.uniform(0.95, 1.05)) + float(rng.normal(0.0, 0.02))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(x)
            out = out.float()
            logits, heat_logit = out[:, : len(SEG_CLASSES)], out[:, len(SEG_CLASSES)]
            heat_loss = F.binary_cross_entropy_with_logits(heat_logit, h, weight=1.0 + 30.0 * h)
            loss = (F.cross_entropy(logits, y, weight=class_weights) + _soft_dice_loss(logits, y)
                    + 2.0 * heat_loss)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
    return model.cpu().eval()


#: Share of each stage-2 batch's fractured/intact pairs per level group (C1, C2, C3-C7).
LEVEL_GROUP_WEIGHTS: tuple[float, float, float] = (0.25, 0.3, 0.45)


def level_balanced_pairs(targets: np.ndarray, levels: Sequence[str]
                         ) -> Callable[[np.random.Generator, int], np.ndarray]:
    """A sampler of ``2 * half`` crop indices: ``half`` fractured, then ``half`` intact, the
    intact ones drawn from the same level groups as the fractured ones, groups drawn with
    :data:`LEVEL_GROUP_WEIGHTS` (renormalised over the groups that have both). Without any
    such group (e.g. no fractures at all) every crop is drawn alike."""
    group = np.array([0 if n == "C1" else 1 if n == "C2" else 2 for n in levels], np.int64)
    positive = np.asarray(targets) > 0.5
    by_group = [(np.nonzero(positive & (group == g))[0], np.nonzero(~positive & (group == g))[0])
                for g in range(3)]
    usable = [g for g, (p, n) in enumerate(by_group) if len(p) and len(n)]
    everything = np.arange(len(positive))
    weights = np.array([LEVEL_GROUP_WEIGHTS[g] for g in usable], float)

    def draw(rng: np.random.Generator, half: int) -> np.ndarray:
        if not usable:
            return rng.choice(everything, 2 * half)
        picks = rng.choice(len(usable), half, p=weights / weights.sum())
        pos = [rng.choice(by_group[usable[k]][0]) for k in picks]
        neg = [rng.choice(by_group[usable[k]][1]) for k in picks]
        return np.asarray(pos + neg, np.int64)

    return draw


#: Stage-2 shape jitter (:func:`shape_jitter`): share of crops, range of the scale along
#: the spine axis and across it, and the largest tilt (degrees) in the sagittal plane.
#: Off in the recipe (0.0, so it reproduces 0.5.0): at 0.7 a fine-tune from 0.5.0 read the
#: second generator's vertebrae better at their true boxes (AUC 0.71 -> 0.81,
#: bench/ct_kinds.py) but not through stage 1's boxes, and called fractures on 15 % of its
#: fracture-free patients (docs/models-ct.md, "Stage 2: shape jitter, tried").
SHAPE_JITTER_SHARE = 0.0
SHAPE_SCALE_Z = (0.7, 1.45)
SHAPE_SCALE_YX = (0.85, 1.2)
SHAPE_TILT_DEG = 12.0


def shape_jitter(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stage-2 crops ``(B, D, H, W)`` with other proportions: :data:`SHAPE_JITTER_SHARE` of
    them scaled about their centre by :data:`SHAPE_SCALE_Z` along the spine axis and
    :data:`SHAPE_SCALE_YX` front-back and across (each on its own) and tilted up to
    :data:`SHAPE_TILT_DEG` in the sagittal plane; the others unchanged.

    Crops are stretched over each vertebra's box, so a vertebra taller or squatter than
    our phantoms' (another body, another generator: the second generator's C2 with its
    dens is half as tall again as ours) shows its fracture gap thinner or wider in crop
    voxels and its parts at other heights. Edge values fill what comes in from outside."""
    if SHAPE_JITTER_SHARE <= 0.0:
        return crops  # no draw from ``rng``: the rest of the batch's jitter stays as it was
    chosen = np.flatnonzero(rng.random(len(crops)) < SHAPE_JITTER_SHARE)
    if not len(chosen):
        return crops
    half = (np.asarray(crops.shape[1:], float) - 1) / 2
    thetas = []
    for _ in chosen:
        scale = np.array([rng.uniform(*SHAPE_SCALE_Z), *rng.uniform(*SHAPE_SCALE_YX, size=2)])
        angle = np.deg2rad(rng.uniform(-SHAPE_TILT_DEG, SHAPE_TILT_DEG))
        c, s = np.cos(angle), np.sin(angle)
        rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        # voxel offsets (z, y, x) from the centre: input = R^T S^-1 output (zoom by S);
        # in grid_sample's units (-1..1 per axis) and its axis order (x, y, z)
        matrix = np.diag(1 / half) @ rotation.T @ np.diag(1.0 / scale) @ np.diag(half)
        theta = np.zeros((3, 4))
        theta[:, :3] = matrix[::-1, ::-1]
        thetas.append(theta)
    x = torch.from_numpy(np.ascontiguousarray(crops[chosen], dtype=np.float32))[:, None]
    grid = F.affine_grid(torch.from_numpy(np.stack(thetas)).float(), list(x.shape), align_corners=True)
    out = crops.copy()
    out[chosen] = F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                align_corners=True)[:, 0].numpy()
    return out


def appearance_jitter(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stage-2 training batch ``(B, D, H, W)`` as other scanners and bodies would show it,
    each crop on its own: other proportions in :data:`SHAPE_JITTER_SHARE` of the crops
    (:func:`shape_jitter`; none in the recipe), left-right mirror, contrast 0.8-1.25 and
    level +-0.05 (bone density, calibration), a blur of 0.3-1 voxel in one crop of three
    (reconstruction kernel, slice profile) and noise of 0-0.06 (dose). Fracture gaps and steps survive all
    of them; the texture and proportions of one generator do not."""
    out = np.empty_like(crops)
    for k, crop in enumerate(shape_jitter(crops, rng)):
        x = crop[..., ::-1] if rng.random() < 0.5 else crop
        centre = float(x.mean())
        x = (x - centre) * rng.uniform(0.8, 1.25) + centre + rng.normal(0.0, 0.05)
        if rng.random() < 1 / 3:
            x = ndimage.gaussian_filter(x, rng.uniform(0.3, 1.0))
        out[k] = x + rng.normal(0.0, rng.uniform(0.0, 0.06), x.shape)
    return out


def train_fracture(sets: Sequence[CropSet], budget: Budget, seed: int,
                   progress: bool, init: Path | None = None) -> torch.nn.Module:
    """Train stage 2 on every crop of ``sets``; eval-mode model on the CPU.

    Batches are half fractured, half intact vertebrae: fractures are rare (about one crop in
    six) and subtle, and with their natural share the classifier settled on a constant.
    Each fractured crop is paired with an intact one of the same group (C1, C2, C3-C7;
    :data:`LEVEL_GROUP_WEIGHTS`), so what a level looks like says nothing about whether it
    is broken and the ring of C1 and the dens of C2 get a fair share of the steps."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = _device()
    crops = np.concatenate([s.crops for s in sets if len(s.targets)])
    targets = np.concatenate([s.targets for s in sets if len(s.targets)])
    levels = [name for s in sets if len(s.targets) for name in s.levels]
    pairs = level_balanced_pairs(targets, levels)
    name, kwargs = FRACTURE_ARCH
    model = architecture(name, **kwargs)
    tuned = _initial_weights(model, init, FRACTURE_MODEL)
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-4 if tuned else 1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=budget.fracture_steps,
                                                          eta_min=1e-4)
    half = max(1, budget.fracture_batch // 2)
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task("stage 2: fracture per vertebra", total=budget.fracture_steps, status="")
        for _ in range(budget.fracture_steps):
            chosen = pairs(rng, half)
            x = appearance_jitter(crops[chosen], rng)
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None].to(device)
            yt = torch.from_numpy(targets[chosen]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model.logits(xt)[:, 0].float()  # type: ignore[operator]
            loss = F.binary_cross_entropy_with_logits(logits, yt)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
    return model.cpu().eval()


# ---------------------------------------------------------------- validation


@dataclass
class ValidationCase:
    volume: CtVolume
    labels: np.ndarray  # truth on the volume grid (RSNA numbering)
    fractured: tuple[str, ...]
    negative: bool
    #: the generator's plain default (:data:`PLAIN_VALIDATION_SHARE`), not a randomised scan
    plain: bool = False


#: Share of validation scans that are the generator's plain default (textbook anatomy and
#: fracture patterns on its own 2 mm grid, no acquisition drawn): the operating point must
#: hold on plain scans too, not only on the randomised acquisitions training sees.
PLAIN_VALIDATION_SHARE = 0.3


def validation_case(seed: int) -> ValidationCase:
    """A validation scan drawn like the training ones (acquisition grid at least the
    render's), or in :data:`PLAIN_VALIDATION_SHARE` of the cases the generator's default
    phantom as it comes (own random stream, so the other cases stay what they were)."""
    rng = np.random.default_rng(seed)

    def volume(hu: np.ndarray, spacing: Sequence[float]) -> CtVolume:
        return CtVolume(hu, tuple(spacing), tuple(str(i) for i in range(hu.shape[0])),  # type: ignore[arg-type]
                        "v", "v")

    if rng.random() < 0.1:
        hu, labels = _negative(seed, rng, (2.0, 1.0, 1.0))
        return ValidationCase(volume(hu, (2.0, 1.0, 1.0)), labels, (), True)
    plain = bool(np.random.default_rng([seed, 1]).random() < PLAIN_VALIDATION_SHARE)
    if plain:
        ph = phantoms.generate(seed, p_fracture=0.5)
        spacing, hu, labels = ph.spacing, ph.hu, ph.labels.astype(np.uint8)
    else:
        render = _render_mm(rng)
        ph = phantoms.generate(seed, spacing=render,
                               shape=tuple(int(n / render) for n in (215, 140, 140)),
                               p_fracture=0.5, **_random_anatomy(rng))
        spacing, hu, labels = _fine_scan(ph, render, rng)
    in_field = [v.name for v in ph.vertebrae if v.fractured
                and (labels == phantoms.LEVEL_LABELS[v.name]).sum() > 0]
    return ValidationCase(volume(hu, spacing), labels, tuple(in_field), False, plain)


def validate(engines: Callable[[str], Any], cases: Sequence[ValidationCase],
             progress: bool) -> tuple[dict[str, Any], float]:
    """Run the real pipeline on ``cases``; choose the rule-in threshold (returned) and the
    rule-out threshold (``metrics["operating_point"]["rule_out_threshold"]``)."""
    pipeline = CervicalSpineCtFracture()
    per_level: dict[str, tuple[list[int], list[float]]] = {level: ([], []) for level in LEVELS}
    dice: dict[str, list[float]] = {level: [] for level in LEVELS}
    patient_truth, patient_score, patient_plain = [], [], []
    negatives_flagged = wrong_levels = labelled = 0
    with _progress(progress) as bar:
        task = bar.add_task("validation", total=len(cases), status="")
        for case in cases:
            findings = pipeline.analyse(case.volume, engines)
            bar.update(task, advance=1)
            if case.negative:
                negatives_flagged += int(findings.performed)
                continue
            status = {s.site: s.assessment for s in findings.site_status}
            scores = {f.site: f.probability for f in findings.findings if f.site}
            predicted = (findings.segmentation.labels if findings.segmentation is not None
                         else np.zeros(case.labels.shape, np.uint8))
            for number, level in enumerate(LEVELS, start=1):
                truth = case.labels == number
                if status.get(level) is AssessmentValues.ASSESSED and level in scores:
                    mine = predicted == number
                    if truth.sum():
                        dice[level].append(2 * float((mine & truth).sum()) / float(mine.sum() + truth.sum()))
                        overlap = np.bincount(case.labels[mine], minlength=len(LEVELS) + 4)
                        labelled += 1
                        wrong_levels += int(int(np.argmax(overlap[1:])) + 1 != number)
                    per_level[level][0].append(int(level in case.fractured))
                    per_level[level][1].append(scores[level])
            if scores:
                patient_truth.append(int(bool(case.fractured)))
                patient_score.append(max(scores.values()))
                patient_plain.append(case.plain)
    threshold = choose_threshold(patient_truth, patient_score, TARGET_SPECIFICITY)
    rule_out = min(choose_rule_out_point(patient_truth, patient_score, TARGET_RULE_OUT_SENSITIVITY,
                                         MIN_RULE_OUT_SPECIFICITY, patient_plain), threshold)
    metrics: dict[str, Any] = {"cases": len(cases), "negatives": sum(c.negative for c in cases)}
    for level in LEVELS:
        truth, score = per_level[level]
        metrics[f"auc_{level}"] = round(roc_auc(truth, score), 4)
        metrics[f"n_{level}"] = f"{sum(truth)}+/{len(truth) - sum(truth)}-"
        metrics[f"dice_{level}"] = round(float(np.mean(dice[level])), 4) if dice[level] else float("nan")
    all_truth = sum((per_level[level][0] for level in LEVELS), [])
    all_score = sum((per_level[level][1] for level in LEVELS), [])
    metrics["vertebra_fracture_auc"] = round(roc_auc(all_truth, all_score), 4)
    metrics["patient_fracture_auc"] = round(roc_auc(patient_truth, patient_score), 4)
    metrics["dice_mean_c1_c7"] = round(float(np.nanmean([metrics[f"dice_{lv}"] for lv in LEVELS])), 4)
    metrics["wrong_level_share"] = round(wrong_levels / max(labelled, 1), 4)
    metrics["negatives_with_findings"] = negatives_flagged
    truth = np.asarray(patient_truth, bool)
    called = np.asarray(patient_score) >= threshold
    tp, tn = int((called & truth).sum()), int((~called & ~truth).sum())
    metrics["operating_point"] = {
        "threshold": round(threshold, 4),
        "patient_sensitivity": round(tp / max(int(truth.sum()), 1), 4),
        "patient_sensitivity_ci95": [round(v, 4) for v in wilson_ci(tp, int(truth.sum()))],
        "patient_specificity": round(tn / max(int((~truth).sum()), 1), 4),
        "patient_specificity_ci95": [round(v, 4) for v in wilson_ci(tn, int((~truth).sum()))],
        "n_patients": f"{int(truth.sum())}+/{int((~truth).sum())}-",
        "chosen_for": f"patient-level specificity >= {TARGET_SPECIFICITY} on the validation cohort",
    }
    flagged = np.asarray(patient_score) >= rule_out
    tp, tn = int((flagged & truth).sum()), int((~flagged & ~truth).sum())
    metrics["operating_point"].update({
        "rule_out_threshold": round(rule_out, 4),
        "rule_out_chosen_for": (f"patient-level sensitivity >= {TARGET_RULE_OUT_SENSITIVITY} of "
                                "present-or-indeterminate on the validation cohort, flagging at "
                                f"most {1 - MIN_RULE_OUT_SPECIFICITY:.0%} of fracture-free patients "
                                "of its plain and of its randomised scans each"),
        "flagged_sensitivity": round(tp / max(int(truth.sum()), 1), 4),
        "flagged_sensitivity_ci95": [round(v, 4) for v in wilson_ci(tp, int(truth.sum()))],
        "flagged_specificity": round(tn / max(int((~truth).sum()), 1), 4),
        "flagged_specificity_ci95": [round(v, 4) for v in wilson_ci(tn, int((~truth).sum()))],
    })
    return metrics, threshold


def choose_rule_out(truth: Sequence[int], scores: Sequence[float], sensitivity: float) -> float:
    """The highest threshold at which at least ``sensitivity`` of the positives of
    (truth, scores) score at or above it (0.0 when there are no positives)."""
    positives = np.sort(np.asarray([s for t, s in zip(truth, scores, strict=True) if t]))[::-1]
    if not len(positives):
        return 0.0
    index = int(np.ceil(sensitivity * len(positives))) - 1
    return float(positives[min(max(index, 0), len(positives) - 1)])


def choose_rule_out_point(truth: Sequence[int], scores: Sequence[float], sensitivity: float,
                          min_specificity: float, parts: Sequence[object] | None = None) -> float:
    """The rule-out point: :func:`choose_rule_out` for ``sensitivity``, raised where that
    would leave fewer than ``min_specificity`` of the negatives below it - of every part
    where ``parts`` labels each case (plain and randomised validation scans: a band that
    flags most normal scans of one kind says nothing there, however the pool looks)."""
    point = max(choose_rule_out(truth, scores, sensitivity),
                choose_threshold(truth, scores, min_specificity))
    for part in dict.fromkeys(parts or ()):
        chosen = [k for k, p in enumerate(parts or ()) if p == part]
        if any(not truth[k] for k in chosen):
            point = max(point, choose_threshold([truth[k] for k in chosen],
                                                [scores[k] for k in chosen], min_specificity))
    return point


def choose_threshold(truth: Sequence[int], scores: Sequence[float], specificity: float) -> float:
    """The lowest threshold whose specificity on (truth, scores) reaches ``specificity``."""
    negatives = np.sort(np.asarray([s for t, s in zip(truth, scores, strict=True) if not t]))
    if not len(negatives):
        return 0.5
    index = int(np.ceil(specificity * len(negatives))) - 1
    value = float(negatives[min(index, len(negatives) - 1)])
    return float(min(0.99, np.nextafter(value, 1.0)))


# ------------------------------------------------------------------------ export


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_segmentation(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    dummy = torch.zeros(1, 1, 32, 32, 32)
    model = model.to(memory_format=torch.contiguous_format)
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False,
        input_names=["ct"], output_names=["logits"], opset_version=17,
        dynamic_axes={"ct": {0: "batch", 2: "depth", 3: "height", 4: "width"},
                      "logits": {0: "batch", 2: "depth", 3: "height", 4: "width"}},
    )
    # The state dict serves the torch reference backend (architecture in the card).
    torch.save(model.state_dict(), folder / "model.pt")
    return path


def export_fracture(model: torch.nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    dummy = torch.zeros(2, 3, *_crop_shape())
    with warnings.catch_warnings():
        # The GRU starts from zero states made inside the graph, so any batch size works
        # (tested), whatever the exporter's generic warning about batch sizes says.
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        torch.onnx.export(
            model.eval(), (dummy,), str(path), dynamo=False,
            input_names=["crops"], output_names=["probabilities"], opset_version=17,
            dynamic_axes={"crops": {0: "batch", 1: "vertebrae"},
                          "probabilities": {0: "batch", 1: "vertebrae"}},
        )
    torch.save(model.state_dict(), folder / "model.pt")
    return path


def write_cards(out: Path, provenance: dict[str, Any], metrics: dict[str, Any],
                threshold: float, segmentation: bool = True, fracture: bool = True) -> list[Path]:
    """Both stages' cards (``segmentation=False``: the fracture card only;
    ``fracture=False``: the segmentation card only)."""
    seg_dir, fracture_dir = out / SEGMENTATION_MODEL, out / FRACTURE_MODEL
    seg_metrics, fracture_metrics = _split_metrics(metrics)
    point = metrics.get("operating_point", {})
    seg = ModelCard(
        name=SEGMENTATION_MODEL,
        version=VERSION,
        task="segmentation",
        description="Cervical spine CT stage 1: 3-D U-Net on a 2 mm grid giving per voxel "
                    "background / C1 / C2 / C3-C7 / thoracolumbar vertebra plus a heat map at "
                    "each vertebral body; the pipeline numbers C3-C7 by counting from C2 or T1.",
        inputs=(TensorSpec("ct", (-1, 1, -1, -1, -1)),),
        outputs=(TensorSpec("logits", (-1, len(SEG_CLASSES) + 1, -1, -1, -1)),),
        labels={**dict(enumerate(SEG_CLASSES)), len(SEG_CLASSES): "vertebral body heat map"},
        preprocessing=dict(SEGMENTATION_PREPROCESSING),
        weights={**provenance, "sha256": _sha256(seg_dir / "model.onnx"),
                 "metrics": {"validation": seg_metrics}},
        intended_use=INTENDED_USE,
        clinical_use=False,
        folder=seg_dir,
    )
    fracture_card = ModelCard(
        name=FRACTURE_MODEL,
        version=VERSION,
        task="classification",
        description="Cervical spine CT stage 2: fracture probability of each identified "
                    "vertebra from a 2.5-D crop of the source CT around it (each vertebra on its "
                    "own; the patient level is derived from the vertebrae by the pipeline).",
        inputs=(TensorSpec("crops", (-1, -1, *_crop_shape())),),
        outputs=(TensorSpec("probabilities", (-1, -1)),),
        labels={0: "fracture"},
        preprocessing={**FRACTURE_PREPROCESSING, "test_time_augmentation": STAGE2_TTA,
                       "threshold": round(threshold, 4),
                       **({"rule_out_threshold": point["rule_out_threshold"]}
                          if "rule_out_threshold" in point else {})},
        weights={**provenance, "sha256": _sha256(fracture_dir / "model.onnx"),
                 "metrics": {"validation": fracture_metrics}, "finding": "fracture"},
        intended_use=INTENDED_USE,
        clinical_use=False,
        folder=fracture_dir,
    )
    return (([_save(seg, SEG_ARCH)] if segmentation else [])
            + ([_save(fracture_card, FRACTURE_ARCH)] if fracture else []))


def _next_patch(version: object) -> str:
    """``major.minor.patch`` moved on one patch: a card with the same weights that now
    calls otherwise."""
    major, minor, patch = (int(v) for v in str(version).split("."))
    return f"{major}.{minor}.{patch + 1}"


def _rewrite_validation(path: Path, metrics: dict[str, Any],
                        preprocessing: dict[str, Any] | None = None) -> Path:
    """Replace the validation metrics in the card at ``path``, dated (``revalidated``),
    and update its ``preprocessing`` with the given entries (operating points). A card
    whose operating points move this way moves on a patch version (same weights, other
    calls), so a report names the points it was made with."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["weights"].setdefault("metrics", {})["validation"] = metrics
    data["weights"]["revalidated"] = time.strftime("%Y-%m-%d", time.gmtime())
    changed = {k: v for k, v in (preprocessing or {}).items() if data["preprocessing"].get(k) != v}
    data["preprocessing"].update(preprocessing or {})
    if changed:
        data["version"] = _next_patch(data["version"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _adopt_tta(path: Path) -> None:
    """Give the stage-2 card at ``path`` the recipe's :data:`STAGE2_TTA` before it is
    validated, so the operating points are chosen on what the pipeline will read; a card
    that changes this way moves on a patch version (same weights, other probabilities)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if data["preprocessing"].get("test_time_augmentation") == STAGE2_TTA:
        return
    data["preprocessing"]["test_time_augmentation"] = STAGE2_TTA
    data["version"] = _next_patch(data["version"])
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    log.info("%s: test-time augmentation %s, version %s", path.parent.name, STAGE2_TTA,
             data["version"])


def _split_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validation metrics of stage 1 (segmentation, levels) and stage 2 (fracture)."""
    seg = {k: v for k, v in metrics.items()
           if k.startswith(("dice", "wrong_level", "negatives", "cases"))}
    fracture = {k: v for k, v in metrics.items()
                if k.startswith(("auc", "n_", "vertebra", "patient", "operating", "cases"))}
    return seg, fracture


def _operating_points(metrics: dict[str, Any], threshold: float) -> dict[str, float]:
    """The fracture card's operating points (``preprocessing`` entries) that
    :func:`validate` chose: rule-in ``threshold`` and the rule-out threshold."""
    return {"threshold": round(threshold, 4),
            "rule_out_threshold": metrics["operating_point"]["rule_out_threshold"]}


def revalidate(options: TrainOptions) -> dict[str, Any]:
    """``spine-node train ct-cspine --validate-only``: run the validation cohort through the
    models already in ``--out`` and the pipeline as it is now, choose both operating points
    again and write them and the validation metrics into the two cards. Weights,
    provenance and benchmark figures stay as they are. For a pipeline change (levels,
    gates, reporting) that moves what validation sees without retraining."""
    started = time.monotonic()
    out = Path(options.out)
    _adopt_tta(out / FRACTURE_MODEL / "model.yaml")
    budget = Budget.quick() if options.quick else Budget()
    seeds = list(range(VALIDATION_SEEDS.start, VALIDATION_SEEDS.start + budget.validation_cases))
    validation = _map(validation_case, seeds, max(1, min(budget.workers, options.threads)),
                      options.progress, "validation scans")
    metrics, threshold = validate(_engines(out), validation, options.progress)
    seg_metrics, fracture_metrics = _split_metrics(metrics)
    written = []
    for name, stage in ((SEGMENTATION_MODEL, seg_metrics), (FRACTURE_MODEL, fracture_metrics)):
        path = _rewrite_validation(out / name / "model.yaml", stage,
                                   _operating_points(metrics, threshold) if name == FRACTURE_MODEL else None)
        written.append(str(path))
    log.info("ct-cspine revalidated in %.0f s: %s", time.monotonic() - started,
             metrics["operating_point"])
    return {"cards": written, "metrics": metrics, "seconds": round(time.monotonic() - started, 1)}


def _save(card: ModelCard, arch: tuple[str, dict[str, Any]]) -> Path:
    """Write ``model.yaml`` with the torch ``architecture`` (for the torch reference
    backend; the ONNX backends ignore it)."""
    data = card.to_dict()
    data["architecture"] = {"name": arch[0], "kwargs": arch[1]}
    path = card.folder / "model.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- run


def _started_from(init: Path | None) -> dict[str, Any]:
    """What a fine-tuning run starts from: each stage's version, recipe and weights hash,
    read before the run may overwrite them (``--init`` and ``--out`` may be one folder)."""
    if init is None:
        return {}
    found: dict[str, Any] = {}
    for name in (SEGMENTATION_MODEL, FRACTURE_MODEL):
        card = init / name / "model.yaml"
        weights = init / name / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"--init {init}: no {name}/model.pt there to start from")
        data = yaml.safe_load(card.read_text(encoding="utf-8")) if card.is_file() else {}
        previous = (data.get("weights") or {}) if isinstance(data, dict) else {}
        found[name] = {"version": data.get("version") if isinstance(data, dict) else None,
                       "recipe": previous.get("recipe"),
                       "device": previous.get("device"),
                       "model_pt_sha256": _sha256(weights)}
    return found


def _averaged_from(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """What a weight average (``--average``) is made of: each source's version, recipe,
    training data, what it was fine-tuned from and the hash of its stage-2 weights (read
    before the average is written: ``--out`` may be one of the sources)."""
    found = []
    for folder in folders:
        card = Path(folder) / FRACTURE_MODEL / "model.yaml"
        data = yaml.safe_load(card.read_text(encoding="utf-8")) if card.is_file() else {}
        data = data if isinstance(data, dict) else {}
        weights = data.get("weights") or {}
        origin = (weights.get("fine_tuned_from") or {}).get(FRACTURE_MODEL) or {}
        found.append({"version": data.get("version"), "recipe": weights.get("recipe"),
                      "seed": weights.get("seed"), "trained_on": weights.get("trained_on"),
                      "fine_tuned_from": {k: origin[k] for k in ("version", "model_pt_sha256")
                                          if k in origin},
                      "model_pt_sha256": _sha256(Path(folder) / FRACTURE_MODEL / "model.pt")})
    return found


def average_fracture(folders: Sequence[Path]) -> torch.nn.Module:
    """Stage 2 whose weights are the mean of the ``model.pt`` weights in ``folders``
    (a uniform "model soup"). Averaging fine-tunes of one model keeps what they share and
    evens out what each learned of its own training draws; it only makes sense for models
    fine-tuned from one another (one basin), which the caller vouches for. Integer buffers
    (BatchNorm's batch counter) are taken from the first."""
    states = []
    for folder in folders:
        path = Path(folder) / FRACTURE_MODEL / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"--average {folder}: no {FRACTURE_MODEL}/model.pt there")
        states.append(torch.load(path, map_location="cpu", weights_only=True))
    mean = mean_weights(states, [f"--average {folder}: stage 2" for folder in folders])
    name, kwargs = FRACTURE_ARCH
    model = architecture(name, **kwargs)
    model.load_state_dict(mean)
    log.info("ct-cspine: stage 2 = the mean of %d models' weights", len(states))
    return model.eval()


def _engines(folder: Path) -> Callable[[str], Any]:
    """The exported models on ONNX Runtime (CPU), as a worker without a GPU runs them."""
    from spine_node.inference.runtime.selection import load_engine

    loaded: dict[str, Any] = {}

    def provider(name: str) -> Any:
        if name not in loaded:
            loaded[name] = load_engine(name, folder, backends=("onnxruntime-cpu",))
        return loaded[name]

    return provider


def _rsna_data(root: Path, progress: bool, rng: np.random.Generator) -> tuple[
        list[SegCase], list[CropSet], list[ValidationCase]]:
    layout = RsnaCervicalSpine(root)
    studies = [s for s in layout.studies() if s.segmentation is not None]
    order = rng.permutation(len(studies))
    held = {int(i) for i in order[: max(1, len(studies) // 10)]} if len(studies) > 1 else set()
    seg_cases, crop_sets, validation = [], [], []
    with _progress(progress) as bar:
        task = bar.add_task("loading RSNA studies", total=len(studies), status="")
        for index, study in enumerate(studies):
            volume, labels = layout.load(study)
            fractured = tuple(level for level, f in zip(LEVELS, study.fractures, strict=True) if f)
            if index in held:
                validation.append(ValidationCase(volume, labels, fractured, False))
            else:
                grid = _spacing()
                on_grid = resample(labels, volume.spacing, grid, order=0)
                seg_cases.append(SegCase(normalise(resample(volume.hu, volume.spacing, grid)),
                                         classes_from_labels(on_grid), heat_target(on_grid, grid)))
                crop_sets.append(level_crops(volume.hu, labels, volume.spacing, fractured,
                                             np.random.default_rng(index)))
            bar.update(task, advance=1)
    return seg_cases, crop_sets, validation


def run(options: TrainOptions) -> dict[str, Any]:
    """Train both stages, export ONNX, choose the operating point on validation data
    through the real pipeline, and write the cards (``validate_only``: :func:`revalidate`)."""
    from functools import partial

    if options.average and (options.stage != "fracture" or options.init is not None
                            or options.validate_only or options.epochs is not None):
        raise ValueError("--average replaces training of stage 2: give it with --stage fracture "
                         "and without --init, --epochs or --validate-only")
    if options.validate_only:
        return revalidate(options)
    if options.stage not in STAGES:
        raise ValueError(f"ct-cspine trains stage {options.stage!r}? expected one of {', '.join(STAGES)}")
    fracture_only = options.stage == "fracture"
    segmentation_only = options.stage == "segmentation"
    for alone, kept in ((fracture_only, SEGMENTATION_MODEL), (segmentation_only, FRACTURE_MODEL)):
        if alone and not (Path(options.out) / kept / "model.onnx").is_file():
            raise FileNotFoundError(f"--stage {options.stage} keeps the other stage as it is in "
                                    f"--out, but {Path(options.out) / kept} has no model.onnx")

    torch.set_num_threads(max(1, options.threads))
    torch.backends.cudnn.benchmark = True
    budget = Budget.quick() if options.quick else Budget()
    if options.budget == "gpu":
        budget = Budget.gpu()
    if options.epochs is not None:  # a multiplier of the optimiser steps
        budget = replace(budget, seg_steps=budget.seg_steps * options.epochs,
                         fracture_steps=budget.fracture_steps * options.epochs)
    workers = max(1, min(budget.workers, options.threads))
    started = time.monotonic()
    rng = np.random.default_rng(options.seed)
    seed0 = TRAIN_SEEDS.start + options.seed * 10_000
    if options.data is None:
        seg_seeds = list(range(seed0, seed0 + budget.seg_cases))
        fracture_seeds = list(range(seed0 + 5_000, seed0 + 5_000 + budget.fracture_cases))
        validation_seeds = list(range(VALIDATION_SEEDS.start,
                                      VALIDATION_SEEDS.start + budget.validation_cases))
        seg_cases = [] if fracture_only else _map(
            partial(seg_case, negative_share=budget.negative_share), seg_seeds, workers,
            options.progress, "stage 1 cases (phantom + acquisition)")
        crop_sets = [] if segmentation_only or options.average else _map(
            fracture_case, fracture_seeds, workers, options.progress,
            "stage 2 crops (phantom at 1 mm + acquisition)")
        validation = _map(validation_case, validation_seeds, workers, options.progress,
                          "validation scans")
        trained_on = (f"synthetic phantoms (spine-node inference.phantoms with context, random "
                      f"anatomy and acquisition; seeds {seed0}-{seed0 + 5_000 + budget.fracture_cases - 1}"
                      f"{'' if segmentation_only else _stage2_draws()})")
        validated_on = (f"synthetic phantoms, validation seeds {validation_seeds[0]}-{validation_seeds[-1]} "
                        "(same generator); test cohorts and a second generator: bench/RESULTS.md")
    else:
        seg_cases, crop_sets, validation = _rsna_data(options.data, options.progress, rng)
        trained_on = f"RSNA 2022 Cervical Spine Fracture Detection ({len(seg_cases)} studies)"
        validated_on = f"RSNA 2022, {len(validation)} held-out studies"
    data_seconds = time.monotonic() - started
    log.info("ct-cspine: %d stage-1 cases, %d stage-2 crops, %d validation scans in %.0f s",
             len(seg_cases), sum(len(c.targets) for c in crop_sets), len(validation), data_seconds)
    init = Path(options.init) if options.init is not None else None
    started_from = _started_from(init)
    seg_model = None
    if not fracture_only:
        seg_model = train_segmentation(seg_cases, budget, options.seed, options.progress, init)
        log.info("ct-cspine: stage 1 trained at %.0f s", time.monotonic() - started)
    fracture_model = None
    averaged_from = _averaged_from(options.average) if options.average else []
    if options.average:
        fracture_model = average_fracture(options.average)
    elif not segmentation_only:
        fracture_model = train_fracture(crop_sets, budget, options.seed + 1, options.progress, init)
    train_seconds = time.monotonic() - started
    log.info("ct-cspine: stage 2 trained at %.0f s", train_seconds)

    out = Path(options.out)
    if seg_model is not None:
        export_segmentation(seg_model, out / SEGMENTATION_MODEL)
    if fracture_model is not None:
        export_fracture(fracture_model, out / FRACTURE_MODEL)
    if averaged_from:
        trained_on = " + ".join(f"{a['trained_on']} [{a['version']}]"
                                for a in averaged_from) + (
            " (stage 2: the mean of these models' weights, see averaged_from)")
    provenance = {
        "trained_on": trained_on,
        "validated_on": validated_on,
        "recipe": "spine-node train ct-cspine"
                  + (" --budget gpu" if options.budget == "gpu" else "")
                  + (f" --epochs {options.epochs}" if options.epochs is not None else "")
                  + (f" --init {init}" if init is not None else "")
                  + (f" --stage {options.stage}" if options.stage != "all" else "")
                  + "".join(f" --average {Path(a)}" for a in options.average),
        "seed": options.seed,
        "torch": str(torch.__version__),
        "device": str(_device()),
        "threads": options.threads,
        "training_seconds": {"data": round(data_seconds, 1), "total": round(train_seconds, 1)},
    }
    if started_from:
        provenance["fine_tuned_from"] = started_from
    if averaged_from:
        # Nothing was trained: no seed or training time of this run's to report.
        provenance["averaged_from"] = averaged_from
        provenance.pop("seed")
        provenance.pop("training_seconds")
    # Cards first with a provisional threshold, so the pipeline can load the exports.
    write_cards(out, provenance, {}, float(FRACTURE_PREPROCESSING["threshold"]),
                segmentation=not fracture_only, fracture=not segmentation_only)
    metrics, threshold = validate(_engines(out), validation, options.progress)
    cards = write_cards(out, provenance, metrics, threshold, segmentation=not fracture_only,
                        fracture=not segmentation_only)
    if fracture_only:  # stage 1 is unchanged, but what validation measured of it is today's
        cards.insert(0, _rewrite_validation(out / SEGMENTATION_MODEL / "model.yaml",
                                            _split_metrics(metrics)[0]))
    if segmentation_only:
        # Stage 2's weights are unchanged, but it now reads the new stage 1's boxes: its
        # operating points are chosen again on validation, as --validate-only does.
        cards.append(_rewrite_validation(out / FRACTURE_MODEL / "model.yaml",
                                         _split_metrics(metrics)[1],
                                         _operating_points(metrics, threshold)))
    log.info("ct-cspine trained in %.0f s: %s", train_seconds, metrics)
    return {"cards": [str(c) for c in cards], "metrics": metrics,
            "seconds": round(time.monotonic() - started, 1)}
