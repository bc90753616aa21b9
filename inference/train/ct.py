"""Training recipe ``ct-cspine``: the two-stage cervical spine CT fracture models.

Stage 1 (``cspine-ct-vertebra-seg``, :class:`~inference.models.ct.VertebraUNet3D`) learns
C1..C7 labels; stage 2 (``cspine-ct-fracture``, :class:`~inference.models.ct.FractureNet25D`)
learns fractures per vertebra from crops taken around each vertebra's mask. Both are
exported to ONNX with model cards into ``<out>/cspine-ct-vertebra-seg`` and
``<out>/cspine-ct-fracture``.

Data
----
Phantoms (default): :func:`spine_node.inference.phantoms.generate` with fixed seed ranges,
training seeds from :data:`TRAIN_SEEDS`, card metrics on :data:`VALIDATION_SEEDS`.

RSNA 2022 Cervical Spine Fracture Detection (``--data ROOT``), the layout as published::

    ROOT/train.csv                    StudyInstanceUID,patient_overall,C1,...,C7 (0/1)
    ROOT/train_images/<study>/*.dcm   one axial CT series per study
    ROOT/segmentations/<study>.nii    C1..C7 = 1..7 (T1.. = 8..; treated as background),
                                      for a subset of the studies

Segmentations are placed on the CT through their NIfTI affine (RAS) and the DICOM
geometry (LPS), not through a fixed axis flip. Stage 1 trains on the studies that have a
segmentation; stage 2 on every study, with the stage-1 model's own masks where a study
has none. Each study is loaded once and kept on the model grid in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import multiprocessing
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn import functional as F

from spine_node.inference import phantoms
from spine_node.inference.card import ModelCard, TensorSpec
from spine_node.inference.models import architecture
from spine_node.inference.pipelines.ct_cspine import (
    FRACTURE_MODEL,
    FRACTURE_PREPROCESSING,
    LEVELS,
    SEGMENTATION_MODEL,
    SEGMENTATION_PREPROCESSING,
    CtVolume,
    clean_labels,
    load_ct_series,
    normalise,
    pad_to_multiple,
    resample,
    vertebra_crops,
)
from spine_node.inference.train import TrainOptions

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SEG_ARCH = ("cspine-ct-unet3d", {"widths": [16, 32, 64, 64], "stem": 6})
FRACTURE_ARCH = ("cspine-ct-fracture-2.5d",
                 {"slices": 15, "group": 3, "widths": [12, 24, 32, 48], "hidden": 32})
#: Phantom seeds: training, and held out for the card's metrics. Tests use other seeds.
TRAIN_SEEDS = range(10_000, 20_000)
VALIDATION_SEEDS = range(500_000, 501_000)
INTENDED_USE = ("Demonstration and integration testing of spine-node only. Trained on "
                "synthetic phantoms; NOT for clinical use, not a medical device.")


@dataclass
class CtCase:
    """One study on the stage-1 model grid.

    ``image`` is normalised CT (:func:`~inference.pipelines.ct_cspine.normalise`),
    ``labels`` C1..C7 = 1..7 (None: no segmentation), ``fractures`` 0/1 per vertebra.
    """

    uid: str
    image: np.ndarray
    labels: np.ndarray | None
    fractures: np.ndarray
    patient: int


@dataclass(frozen=True)
class Budget:
    """How much data and how many passes each stage gets."""

    seg_cases: int = 48
    seg_epochs: int = 8
    seg_batch: int = 1
    seg_crop: tuple[int, int, int] = (80, 48, 48)
    fracture_cases: int = 400
    fracture_epochs: int = 6
    fracture_batch: int = 8
    validation_cases: int = 48

    @classmethod
    def quick(cls) -> Budget:
        return cls(seg_cases=4, seg_epochs=1, fracture_cases=8, fracture_epochs=1,
                   validation_cases=3)


def _spacing() -> tuple[float, float, float]:
    z, y, x = (float(s) for s in SEGMENTATION_PREPROCESSING["spacing_mm"])
    return z, y, x


# ------------------------------------------------------------------------- data


def phantom_case(seed: int, p_fracture: float = 0.5) -> CtCase:
    """A phantom as a training case on the model grid (C1..C7 only)."""
    ph = phantoms.generate(seed, p_fracture=p_fracture, spacing=_spacing())
    labels = np.where(ph.labels <= len(LEVELS), ph.labels, 0).astype(np.uint8)
    fractures = ph.fractures(LEVELS)
    return CtCase(uid=f"phantom-{seed}", image=normalise(ph.hu), labels=labels,
                  fractures=fractures, patient=int(fractures.any()))


def phantom_cases(seeds: Sequence[int], p_fracture: float = 0.5) -> list[CtCase]:
    return [phantom_case(seed, p_fracture) for seed in seeds]


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

    def load(self, study: RsnaStudy) -> CtCase:
        """Load one study onto the model grid (CT resampled, labels placed by affine)."""
        volume = load_ct_series(sorted(study.images.glob("*.dcm")))
        spacing = _spacing()
        image = normalise(resample(volume.hu, volume.spacing, spacing))
        labels = None
        if study.segmentation is not None:
            labels = segmentation_on_grid(study.segmentation, volume, spacing, image.shape)
        return CtCase(study.uid, image, labels, study.fractures, study.patient)


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


# --------------------------------------------------------------------- training


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[status]}"), disable=not enabled)


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


def _random_crop(case: CtCase, crop: Sequence[int], rng: np.random.Generator,
                 multiple: int) -> tuple[np.ndarray, np.ndarray]:
    assert case.labels is not None
    image, labels = case.image, case.labels
    low = float(image.min())
    pads = [(0, max(0, c - n)) for c, n in zip(crop, image.shape, strict=True)]
    if any(p[1] for p in pads):
        image = np.pad(image, pads, constant_values=low)
        labels = np.pad(labels, pads)
    starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(image.shape, crop, strict=True)]
    box = tuple(slice(s, s + c) for s, c in zip(starts, crop, strict=True))
    image, labels = image[box], labels[box]
    if rng.random() < 0.5:  # left-right mirror: anatomy is symmetric enough
        image, labels = image[:, :, ::-1], labels[:, :, ::-1]
    image = image * float(rng.uniform(0.93, 1.07)) + float(rng.normal(0.0, 0.03))
    assert all(n % multiple == 0 for n in image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)


def train_segmentation(cases: Sequence[CtCase], budget: Budget, seed: int,
                       progress: bool) -> torch.nn.Module:
    """Train stage 1 on ``cases`` (those with labels) and return the model in eval mode."""
    usable = [c for c in cases if c.labels is not None]
    if not usable:
        raise ValueError("no case has a segmentation to train stage 1 on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    name, kwargs = SEG_ARCH
    model = architecture(name, **kwargs).to(memory_format=torch.channels_last_3d)
    multiple = model.multiple  # type: ignore[attr-defined]
    steps = max(1, budget.seg_epochs * len(usable) // budget.seg_batch)
    with torch.no_grad():
        # Start from "everything is background" (about 98 % of voxels), so the first
        # steps go into finding vertebrae rather than learning the class prior.
        last = model.full[-1]  # type: ignore[index]
        last.bias.zero_()
        last.bias[0] = 3.0
    class_weights = torch.tensor([1.0] + [3.0] * len(LEVELS))
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=5e-3, total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task("stage 1: vertebra segmentation", total=steps, status="")
        for step in range(steps):
            batch = [_random_crop(usable[int(i)], budget.seg_crop, rng, multiple)
                     for i in rng.integers(0, len(usable), size=budget.seg_batch)]
            x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None])
            y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
            logits = model(x.contiguous(memory_format=torch.channels_last_3d))
            loss = F.cross_entropy(logits, y, weight=class_weights) + _soft_dice_loss(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
            if step % 20 == 0:
                log.debug("stage 1 step %d loss %.4f", step, loss.item())
    return model.eval()


def predict_labels(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Stage-1 labels for a normalised model-grid image (torch, as the pipeline does)."""
    low = float(SEGMENTATION_PREPROCESSING["hu_window"][0]) / float(
        SEGMENTATION_PREPROCESSING["hu_scale"])
    padded, unpad = pad_to_multiple(image, int(SEGMENTATION_PREPROCESSING["pad_multiple"]), low)
    x = torch.from_numpy(padded)[None, None]
    with torch.inference_mode():
        logits = model(x)
    return clean_labels(logits[0].argmax(0).numpy().astype(np.uint8)[unpad])


def dice_per_level(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each of C1..C7 (NaN where a level is absent from both)."""
    scores = np.full(len(LEVELS), np.nan)
    for i in range(len(LEVELS)):
        p, t = predicted == i + 1, truth == i + 1
        total = int(p.sum() + t.sum())
        if total:
            scores[i] = 2.0 * float((p & t).sum()) / total
    return scores


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    positives, negatives = int(y.sum()), int((~y).sum())
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_scores = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _crop_shape() -> tuple[int, int, int]:
    d, h, w = (int(n) for n in FRACTURE_PREPROCESSING["crop_shape"])
    return d, h, w


def _margin_vox() -> np.ndarray:
    return float(FRACTURE_PREPROCESSING["crop_margin_mm"]) / np.asarray(_spacing())


def case_crops(case: CtCase, labels: np.ndarray,
               rng: np.random.Generator | None = None) -> np.ndarray:
    crops, _ = vertebra_crops(case.image, labels, _crop_shape(), _margin_vox(),
                              int(FRACTURE_PREPROCESSING["min_voxels"]), rng=rng)
    return crops


def train_fracture(samples: Sequence[tuple[np.ndarray, np.ndarray]], budget: Budget, seed: int,
                   progress: bool) -> torch.nn.Module:
    """Train stage 2 on (crops (7, D, H, W), targets (8,)) samples; eval-mode model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    name, kwargs = FRACTURE_ARCH
    model = architecture(name, **kwargs)
    steps = max(1, budget.fracture_epochs * len(samples) // budget.fracture_batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps,
                                                   pct_start=0.15)
    targets_all = np.stack([t for _, t in samples])
    rate = targets_all[:, : len(LEVELS)].mean()
    pos_weight = torch.tensor([min(8.0, (1 - rate) / max(rate, 1e-3))] * len(LEVELS) + [1.0])
    model.train()
    with _progress(progress) as bar:
        task = bar.add_task("stage 2: fracture classifier", total=steps, status="")
        for _ in range(steps):
            chosen = rng.integers(0, len(samples), size=budget.fracture_batch)
            crops = np.stack([samples[int(i)][0] for i in chosen])
            if rng.random() < 0.5:
                crops = crops[..., ::-1]  # left-right mirror
            crops = crops * rng.uniform(0.93, 1.07) + rng.normal(0.0, 0.03)
            x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))
            y = torch.from_numpy(targets_all[chosen].astype(np.float32))
            logits = model.logits(x)  # type: ignore[operator]
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.update(task, advance=1, status=f"loss {loss.item():.3f}")
    return model.eval()


def _targets(case: CtCase) -> np.ndarray:
    return np.concatenate([case.fractures, [case.patient]]).astype(np.float32)


def evaluate(seg_model: torch.nn.Module, fracture_model: torch.nn.Module,
             cases: Sequence[CtCase]) -> dict[str, float]:
    """End-to-end metrics: stage-1 Dice against truth, stage-2 AUC on stage-1 crops."""
    dice: list[np.ndarray] = []
    vertebra_scores, vertebra_truth, patient_scores, patient_truth = [], [], [], []
    for case in cases:
        predicted = predict_labels(seg_model, case.image)
        if case.labels is not None:
            dice.append(dice_per_level(predicted, case.labels))
        with torch.inference_mode():
            crops = torch.from_numpy(case_crops(case, predicted))[None]
            probabilities = fracture_model(crops)[0].numpy()
        vertebra_scores += probabilities[: len(LEVELS)].tolist()
        vertebra_truth += case.fractures.tolist()
        patient_scores.append(float(probabilities[len(LEVELS)]))
        patient_truth.append(case.patient)
    metrics: dict[str, float] = {
        "vertebra_fracture_auc": round(roc_auc(vertebra_truth, vertebra_scores), 4),
        "patient_fracture_auc": round(roc_auc(patient_truth, patient_scores), 4),
        "cases": len(cases),
    }
    if dice:
        per_level = np.nanmean(np.stack(dice), axis=0)
        metrics["dice_mean_c1_c7"] = round(float(np.nanmean(per_level)), 4)
        metrics.update({f"dice_{level}": round(float(d), 4)
                        for level, d in zip(LEVELS, per_level, strict=True)})
    return metrics


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
    dummy = torch.zeros(2, len(LEVELS), *_crop_shape())
    with warnings.catch_warnings():
        # The GRUs start from zero states made inside the graph, so any batch size works
        # (tested), whatever the exporter's generic warning about batch sizes says.
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        _export_onnx(model.eval(), dummy, path)
    torch.save(model.state_dict(), folder / "model.pt")
    return path


def _export_onnx(model: torch.nn.Module, dummy: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False,
        input_names=["crops"], output_names=["probabilities"], opset_version=17,
        dynamic_axes={"crops": {0: "batch"}, "probabilities": {0: "batch"}},
    )


def write_cards(out: Path, provenance: dict[str, Any], metrics: dict[str, float]) -> list[Path]:
    seg_dir, fracture_dir = out / SEGMENTATION_MODEL, out / FRACTURE_MODEL
    seg_metrics = {k: v for k, v in metrics.items() if k.startswith("dice") or k == "cases"}
    fracture_metrics = {k: v for k, v in metrics.items() if "auc" in k or k == "cases"}
    seg = ModelCard(
        name=SEGMENTATION_MODEL,
        version=VERSION,
        task="segmentation",
        description="Cervical spine CT stage 1: 3-D U-Net labelling C1..C7 "
                    "(8 classes with background) on a 2 mm grid.",
        inputs=(TensorSpec("ct", (-1, 1, -1, -1, -1)),),
        outputs=(TensorSpec("logits", (-1, 8, -1, -1, -1)),),
        labels={0: "background", **{i + 1: level for i, level in enumerate(LEVELS)}},
        preprocessing=dict(SEGMENTATION_PREPROCESSING),
        weights={
            **provenance,
            "sha256": _sha256(seg_dir / "model.onnx"),
            "metrics": seg_metrics,
        },
        intended_use=INTENDED_USE,
        clinical_use=False,
        folder=seg_dir,
    )
    fracture = ModelCard(
        name=FRACTURE_MODEL,
        version=VERSION,
        task="classification",
        description="Cervical spine CT stage 2: per-vertebra fracture probability from 2.5-D "
                    "crops around each stage-1 vertebra mask, with a GRU over C1..C7; "
                    "outputs C1..C7 then patient-level.",
        inputs=(TensorSpec("crops", (-1, len(LEVELS), *_crop_shape())),),
        outputs=(TensorSpec("probabilities", (-1, len(LEVELS) + 1)),),
        labels={**{i: level for i, level in enumerate(LEVELS)}, len(LEVELS): "patient"},
        preprocessing={**FRACTURE_PREPROCESSING,
                       "spacing_mm": list(SEGMENTATION_PREPROCESSING["spacing_mm"])},
        weights={
            **provenance,
            "sha256": _sha256(fracture_dir / "model.onnx"),
            "metrics": fracture_metrics,
            "finding": "fracture",
        },
        intended_use=INTENDED_USE,
        clinical_use=False,
        folder=fracture_dir,
    )
    return [_save(seg, SEG_ARCH), _save(fracture, FRACTURE_ARCH)]


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


def _rsna_cases(root: Path, progress: bool) -> list[CtCase]:
    layout = RsnaCervicalSpine(root)
    studies = layout.studies()
    cases = []
    with _progress(progress) as bar:
        task = bar.add_task("loading RSNA studies", total=len(studies), status="")
        for study in studies:
            cases.append(layout.load(study))
            bar.update(task, advance=1)
    return cases


def _hold_out(cases: Sequence[CtCase],
              rng: np.random.Generator) -> tuple[list[CtCase], list[CtCase]]:
    """About 10 % of the segmented and of the unsegmented studies held out for the card's
    metrics, never every segmented study (stage 1 needs them)."""
    held: list[CtCase] = []
    kept: list[CtCase] = []
    for group in ([c for c in cases if c.labels is not None],
                  [c for c in cases if c.labels is None]):
        order = rng.permutation(len(group))
        count = len(group) // 10
        if group and group[0].labels is None:
            count = max(1, count)
        held += [group[i] for i in order[:count]]
        kept += [group[i] for i in order[count:]]
    return held, kept


def _fracture_samples(cases: Sequence[CtCase], seg_model: torch.nn.Module | None,
                      rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for case in cases:
        labels = case.labels
        if labels is None:
            assert seg_model is not None
            labels = predict_labels(seg_model, case.image)
        yield case_crops(case, labels, rng=rng), _targets(case)


def _phantom_fracture_samples(seeds: Sequence[int],
                              seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    samples = []
    for phantom_seed in seeds:
        # More fractured phantoms than the 50 % of the validation set: more positives.
        case = phantom_case(phantom_seed, p_fracture=0.7)
        assert case.labels is not None
        samples.append((case_crops(case, case.labels, rng=rng), _targets(case)))
    return samples


def _phantom_fracture_job(seeds: Sequence[int], budget: Budget, seed: int) -> bytes:
    """Stage 2 on phantoms in a worker process; returns the trained state dict."""
    torch.set_num_threads(1)
    model = train_fracture(_phantom_fracture_samples(seeds, seed), budget, seed, progress=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def run(options: TrainOptions) -> dict[str, Any]:
    """Train both stages, evaluate on held-out data, export ONNX and write the cards."""
    torch.set_num_threads(max(1, options.threads))
    budget = Budget.quick() if options.quick else Budget()
    if options.epochs is not None:
        budget = Budget(**{**budget.__dict__, "seg_epochs": options.epochs,
                           "fracture_epochs": options.epochs})
    started = time.monotonic()
    rng = np.random.default_rng(options.seed)
    seed0 = TRAIN_SEEDS.start + options.seed * 1000
    if options.data is None:
        seg_seeds = range(seed0, seed0 + budget.seg_cases)
        fracture_seeds = range(seed0 + budget.seg_cases,
                               seed0 + budget.seg_cases + budget.fracture_cases)
        validation_seeds = range(VALIDATION_SEEDS.start,
                                 VALIDATION_SEEDS.start + budget.validation_cases)
        seg_cases = phantom_cases(seg_seeds)
        validation = phantom_cases(validation_seeds)
        trained_on = (f"synthetic phantoms (spine-node inference.phantoms, seeds "
                      f"{seg_seeds.start}-{fracture_seeds.stop - 1})")
        validated_on = (f"held-out synthetic phantoms (seeds {validation_seeds.start}-"
                        f"{validation_seeds.stop - 1})")
    else:
        cases = _rsna_cases(options.data, options.progress)
        validation, seg_cases = _hold_out(cases, rng)
        trained_on = f"RSNA 2022 Cervical Spine Fracture Detection ({len(seg_cases)} studies)"
        validated_on = f"RSNA 2022, {len(validation)} held-out studies"
    parallel = options.data is None and options.threads >= 2
    if parallel:
        # Stage 2 trains on phantom crops around the true masks, so it need not wait for
        # stage 1: run it in a second process with one thread.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            job = pool.submit(_phantom_fracture_job, list(fracture_seeds), budget,
                              options.seed + 1)
            torch.set_num_threads(max(1, options.threads))
            seg_model = train_segmentation(seg_cases, budget, options.seed, options.progress)
            seg_seconds = time.monotonic() - started
            state = job.result()
        name, kwargs = FRACTURE_ARCH
        fracture_model = architecture(name, **kwargs)
        fracture_model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        fracture_model.eval()
        torch.set_num_threads(max(1, options.threads))
    else:
        seg_model = train_segmentation(seg_cases, budget, options.seed, options.progress)
        seg_seconds = time.monotonic() - started
        if options.data is None:
            samples = _phantom_fracture_samples(list(fracture_seeds), options.seed + 1)
        else:
            samples = list(_fracture_samples(seg_cases, seg_model, rng))
        fracture_model = train_fracture(samples, budget, options.seed + 1, options.progress)
    train_seconds = time.monotonic() - started
    metrics = evaluate(seg_model, fracture_model, validation)

    out = Path(options.out)
    export_segmentation(seg_model, out / SEGMENTATION_MODEL)
    export_fracture(fracture_model, out / FRACTURE_MODEL)
    provenance = {
        "trained_on": trained_on,
        "validated_on": validated_on,
        "recipe": "spine-node train ct-cspine"
                  + (f" --epochs {options.epochs}" if options.epochs is not None else ""),
        "seed": options.seed,
        "torch": str(torch.__version__),
        "threads": options.threads,
        "training_seconds": {"stage1": round(seg_seconds, 1),
                             "total": round(train_seconds, 1)},
    }
    cards = write_cards(out, provenance, metrics)
    log.info("ct-cspine trained in %.0f s: %s", train_seconds, metrics)
    return {"cards": [str(c) for c in cards], "metrics": metrics,
            "seconds": round(time.monotonic() - started, 1)}
