"""Training recipes for the five spine X-ray model families.

Every recipe trains with a fixed seed, shows a progress bar, exports ``model.onnx``
(``torch.onnx.export(..., dynamo=False)``, dynamic batch) and writes ``model.yaml``
(:class:`~inference.card.ModelCard`) into ``engines/<model-name>/``. Metrics in the card
are measured through the exported ONNX graph with ONNX Runtime on held-out data.

Data
----
By default a recipe trains on digitally reconstructed radiographs (DRRs) of the
project's synthetic spine phantoms (:mod:`spine_node.inference.phantoms`): every phantom gives an AP
and a LAT view, their structure and tissue masks, and per-vertebra fracture and
dislocation labels. Metrics come from phantoms drawn with a seed never used in training.
The segmenters learn from 2 mm DRRs (80 x 64 pixels) of the phantoms the CT models see;
the classifiers from 1 mm DRRs (160 x 128) of the radiographic cohort, whose fractures
and dislocations are drawn to show on a radiograph (:data:`RADIOGRAPHIC_COHORT`): at
2 mm a fracture was one or two pixels of height loss, and many cracks lay along the beam
of neither view. The classifiers first learn on crops around the vertebral bodies, then
on whole images (:func:`train_model`).

Pass ``data=<root>`` to train on a real dataset laid out like the seed projects'::

    root/train/<class>/*.png|*.jpg|*.dcm        classifiers; <class> is a label key:
    root/val/<class>/...                         normal, fracture, dislocation (cspine)
    root/train/<class>/<study>/{AP,LAT}.*        pair classifier: one folder per study
                                                 with an image whose name starts with
                                                 "ap" and one starting with "lat"
                                                 (or DICOM files with ViewPosition);
                                                 classes normal, damage (or damaged)
    root/train/images/<name>.png|.jpg|.dcm       segmenters: the image, and either
    root/train/masks/<name>.png                  a label image (0 background, k = k-th
                                                 structure in the model's order), or
    root/train/masks/<structure>/<name>.png      one binary mask per structure key
    root/val/...                                 the same under val/

Greyscale images are read bone-bright; DICOM files go through the same reader as the
pipelines (MONOCHROME1 inverted, rescale applied).

Run ``spine-node train xray`` to regenerate all six demo models (11 min 26 s of wall time on 2 CPU cores,
peak memory 1.3 GB: README, Models), or
``spine-node train <model-name>`` for one.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from spine_node.engines import ENGINES_DIR
from spine_node.inference.card import ModelCard
from spine_node.inference.models import architecture
from spine_node.inference.pipelines.xray import (
    AP_STRUCTURES,
    CSPINE_MODEL,
    FRACTURE_MODEL,
    GATE_MODEL,
    LAT_STRUCTURES,
    PAIR_MODEL,
    TISSUE_MODEL,
    TISSUES,
    UNET_AP_MODEL,
    UNET_LAT_MODEL,
    Grid,
    average_mirrored,
    centre_origin,
    file_sha256,
    place,
    prepare_radiograph,
    read_radiograph,
    resize_bilinear,
    to_canvas,
    window,
)
from spine_node.inference.stats import roc_auc, wilson_ci
from spine_node.inference.train import TrainOptions, mean_weights
from spine_node.inference.train import xray_augment as augment

logger = logging.getLogger(__name__)

#: 0.2.0: the segmenters trained on context phantoms (2026-11-28); classifiers and gate
#: committed before then carry 0.1.0.
VERSION = "0.2.0"
INTENDED_USE = ("Demonstration of the spine-node pipeline only: weights trained by the "
                "project's own code on synthetic phantoms. Not for clinical use; not a "
                "medical device. Replace with a validated model trained on real data.")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
#: Classifiers see the whole 160 x 128 mm field at 1 mm: a fracture is several pixels.
CLASSIFIER_SIZE = (160, 128)
SEGMENTER_SIZE = (80, 64)
#: Output stride of the classifiers' lesion-map heads.
LESION_STRIDE = 8
#: Local contrast normalisation scale (Gaussian sigma, mm), about a vertebral body's
#: height: end plates, cortices and steps of the column stand out and the neck's thickness
#: profile, the exposure and the display curve do not. Chosen on the recipe's validation
#: phantoms with the cervical classifier (abnormal AUC for sigma 3 / 6 / 10 / 16 / 24 mm:
#: 0.93 / 0.91 / 0.96 / 0.91 / 0.85; plain window 0.61); docs/models-xray.md.
LOCAL_CONTRAST_MM = 10.0


class DatasetError(ValueError):
    """A training data folder does not follow the documented layout; says what is wrong."""


#: The radiograph field every cohort renders, (rows, columns) in mm: head to feet by
#: left-right (AP) or front-back (LAT).
FIELD_MM = (160, 128)
#: Phantoms drawn with their surroundings (:func:`spine_node.inference.phantoms.generate`
#: ``context=True``: cranium and skull base above, T1-T3 with ribs, shoulders and lung
#: apices below) are rendered on this volume (z, y, x mm) and cut to :data:`FIELD_MM`
#: with its top edge drawn from :data:`CONTEXT_TOP_MM` (mm below the volume's top; the
#: skull base lies 70-76 mm down): from skull and C1 down to C7 up to C2 down to T3.
CONTEXT_VOLUME_MM = (250, 140, 170)
CONTEXT_TOP_MM = (35.0, 85.0)


@dataclass(frozen=True)
class PhantomCohort:
    """Which cervical phantoms a recipe draws and on what grid they are projected.

    Every cohort renders a :data:`FIELD_MM` field. ``context_share`` of the phantoms
    (chosen by seed) are drawn with their surroundings and with varied anatomy
    (``varied_anatomy=True``: vertebra, disc and process sizes, lordosis, bone density,
    neck width, unlabelled dense neighbours), as a radiograph shows the neck between the
    skull and the shoulders; the rest are the classic phantom (160 x 128 x 128 mm volume,
    textbook proportions).
    """

    name: str
    spacing_mm: float
    #: :func:`spine_node.inference.phantoms.generate`'s ``radiographic_findings``.
    radiographic_findings: bool
    context_share: float = 0.0
    #: Share of the context phantoms also drawn with ``posterior_detail`` (articular
    #: pillars, sloping spinous processes: the LAT view's posterior column).
    posterior_share: float = 0.0
    #: Share of the phantoms whose airway is faint or absent (``airway_hu`` drawn from
    #: -900 to +40 HU instead of air): a model must find the view in the spine, not in
    #: the air column in front of it.
    faint_airway_share: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (round(FIELD_MM[0] / self.spacing_mm), round(FIELD_MM[1] / self.spacing_mm),
                round(FIELD_MM[1] / self.spacing_mm))

    def with_context(self, seed: int) -> bool:
        """Whether phantom ``seed`` of this cohort is drawn with its surroundings."""
        return bool(np.random.default_rng([seed, 4099]).random() < self.context_share)

    def with_posterior(self, seed: int) -> bool:
        """Whether phantom ``seed`` (a context one) also gets ``posterior_detail``; no draw
        with a share of 0, so cohorts without it stay as they were."""
        if self.posterior_share <= 0 or not self.with_context(seed):
            return False
        return bool(np.random.default_rng([seed, 4111]).random() < self.posterior_share)

    def airway_hu(self, seed: int) -> float:
        """What fills phantom ``seed``'s airway: air, or for :attr:`faint_airway_share` of
        them something from -900 HU to soft tissue (no draw with a share of 0)."""
        if self.faint_airway_share <= 0:
            return -1000.0
        rng = np.random.default_rng([seed, 4127])
        return float(rng.uniform(-900.0, 40.0)) if rng.random() < self.faint_airway_share else -1000.0


#: The classic 2 mm phantoms with every kind of finding (the view gate's until 0.2.0).
CT_COHORT = PhantomCohort("ct", 2.0, radiographic_findings=False)
#: The view gate (0.2.0): 2 mm phantoms, half drawn with their surroundings. On the
#: evaluation generator's spines the gate on classic phantoms alone read 50 % of AP and
#: 60 % of LAT views as their own view (n = 60 each); this one 87 % / 83 %, with 2100 steps,
#: 1.5 times the phantoms and chest junk twice as often (docs/models-xray.md).
GATE_COHORT = PhantomCohort("gate", 2.0, radiographic_findings=False, context_share=0.5,
                           faint_airway_share=0.4)
#: Segmenters: the same 2 mm phantoms, three in four drawn with their surroundings and
#: varied anatomy (skull above, shoulders and ribs below, as the evaluation generator's
#: radiographs show them; it took the spine U-Nets' Dice there from 0.20 / 0.16 to 0.37 /
#: 0.26, AP / LAT).
CONTEXT_COHORT = PhantomCohort("ct-context", 2.0, radiographic_findings=False,
                               context_share=0.75)
#: The spine U-Nets (0.3.0): the context cohort with six in ten of its context phantoms
#: drawn with articular pillars and sloping spinous processes (``posterior_detail``), the
#: posterior column a lateral radiograph shows. On the evaluation generator (n = 100) it
#: took LAT Dice from 0.375 to 0.458 (posterior elements 0.23 -> 0.32) and AP from 0.448
#: to 0.518, same generator unchanged; the tissue XNet gained nothing and keeps
#: :data:`CONTEXT_COHORT` (docs/models-xray.md).
SPINE_SEGMENTER_COHORT = PhantomCohort("ct-context-posterior", 2.0, radiographic_findings=False,
                                       context_share=0.75, posterior_share=0.6)
#: Classifiers: 1 mm phantoms whose findings a radiograph shows, as in X-ray datasets
#: labelled from the radiographs (see ``radiographic_findings`` in the phantoms). Classic
#: phantoms only: with three in four context phantoms the classifiers learned less in the
#: same steps (validation AUC 0.68-0.77, were 0.86-0.95) and lost on the evaluation
#: generator (2026-11-28, docs/models-xray.md).
RADIOGRAPHIC_COHORT = PhantomCohort("radiographic", 1.0, radiographic_findings=True)
#: The classifiers' second validation cohort (0.1.1): the same findings on 1 mm phantoms
#: drawn with their surroundings and varied anatomy, six in ten with posterior detail. The
#: committed classifiers score its normals higher than the classic ones (cervical
#: dislocation: median 0.04 against 0.008, 90th centile 0.27 against 0.04), as they do the
#: evaluation generator's: an operating point chosen on classic phantoms alone flagged
#: most normals there. Operating points are chosen on both cohorts together; the card
#: gives the figures of each. Never trained on.
CONTEXT_VALIDATION_COHORT = PhantomCohort("radiographic-context-posterior", 1.0,
                                          radiographic_findings=True, context_share=1.0,
                                          posterior_share=0.6)
#: Seeds of the context validation phantoms: the plan's held-out seeds plus this.
CONTEXT_VALIDATION_OFFSET = 1_000_000
#: ``--init`` (fine-tuning a classifier): half its phantoms drawn with their surroundings
#: and varied anatomy, six in ten of those with posterior detail, the findings as
#: radiographs show them; half as many phantoms as training, on seeds of their own
#: (the plan's seed plus :data:`FINE_TUNE_SEED_OFFSET`), at half the learning rate, with
#: half the crop steps. Meant as an ingredient of a weight average (``--average``).
FINE_TUNE_COHORT = PhantomCohort("radiographic-context-ft", 1.0, radiographic_findings=True,
                                 context_share=0.5, posterior_share=0.6)
FINE_TUNE_SEED_OFFSET = 7_000_000


# --------------------------------------------------------------------------- samples


@dataclass
class ImageSet:
    """Prepared images ``(N, 1, H, W)`` in [0, 1] and targets for one split."""

    images: np.ndarray
    #: Classifiers: class index ``(N,)``. Segmenters: class-index maps ``(N, H, W)`` at
    #: model size (``-1``: not labelled, ignored by the loss).
    targets: np.ndarray
    second: np.ndarray | None = None  # LAT images for the pair classifier
    #: Segmenters: class-index maps on each source image's own grid (for metrics).
    source_targets: list[np.ndarray] = field(default_factory=list)
    #: Classifiers on phantoms: where the lesions project, one array per lesion-map output
    #: of the model ``(N, C, H/8, W/8)`` in [0, 1], and a per-sample weight (0 where the
    #: lesion has no projected body to point at, e.g. a C1 ring fracture).
    lesion_maps: tuple[np.ndarray, ...] = ()
    lesion_weight: np.ndarray | None = None
    #: Classifiers on phantoms: where the vertebral bodies project, one boolean array
    #: ``(N, H, W)`` per input (the crop phase centres its crops on them).
    body_masks: tuple[np.ndarray, ...] = ()
    #: Per input, which samples stay valid when mirrored left-right ``(N,)`` (AP views).
    mirrorable: tuple[np.ndarray, ...] = ()
    #: The view of each sample ("AP", "LAT", "pair", "other"), for per-view metrics.
    views: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Spec:
    """What one model is: family, labels, input size and how it is trained."""

    name: str
    architecture: str
    task: str
    labels: tuple[str, ...]
    size: tuple[int, int]
    description: str
    architecture_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 1200
    batch_size: int = 16
    learning_rate: float = 3e-3
    cohort: PhantomCohort = CT_COHORT
    #: Classifiers on phantoms first train this many steps on crops around the vertebral
    #: bodies (see :func:`train_model`), then ``steps`` on whole images.
    crop_steps: int = 0
    crop_size: int = 64
    crop_batch_size: int = 32
    #: Randomised acquisitions (:mod:`xray_augment`) drawn per phantom view for training.
    copies: int = 2
    #: Training phantoms: this many times the plan's ``train_phantoms``.
    phantom_factor: float = 1.0
    #: The card's version (default :data:`VERSION`; a model retrained on its own moves on).
    version: str = VERSION
    #: Which views the model reads (the pipelines gate on them; the card states them).
    views: tuple[str, ...] = ("AP", "LAT")
    #: Classifiers: a second validation cohort; the operating points are chosen on both
    #: validation cohorts together (:data:`CONTEXT_VALIDATION_COHORT`).
    validation_mix: PhantomCohort | None = None
    #: Sigma (mm) of the local contrast normalisation the model's inputs go through
    #: (:func:`~spine_node.inference.pipelines.xray.local_contrast`); None: plain window.
    #: The tissue model keeps the plain window: open beam and soft tissue differ by their
    #: absolute brightness, which local contrast removes.
    local_contrast_mm: float | None = LOCAL_CONTRAST_MM
    #: Read each window as it is and mirrored left-right, outputs averaged (the card's
    #: ``preprocessing.test_time_flip``; validation reads the same way). A view, fracture or
    #: dislocation is the same in a mirror image, and a lateral comes facing either way.
    test_time_flip: bool = False

    @property
    def contrast_px(self) -> float | None:
        return self.local_contrast_mm / self.grid_mm if self.local_contrast_mm else None

    @property
    def grid_mm(self) -> float:
        return self.cohort.spacing_mm


#: How the three classifiers train on phantoms (the MobileNet learns the AP view slower).
_CLASSIFIER_TRAINING: dict[str, Any] = {"cohort": RADIOGRAPHIC_COHORT, "crop_steps": 2000,
                                        "steps": 600, "copies": 3, "version": "0.1.3",
                                        "validation_mix": CONTEXT_VALIDATION_COHORT,
                                        "test_time_flip": True}

SPECS: dict[str, Spec] = {
    PAIR_MODEL: Spec(PAIR_MODEL, "xray-pair-classifier", "classification", ("normal", "damage"),
                     CLASSIFIER_SIZE, "Spine radiograph pair (AP + LAT of one study): "
                     "damaged / normal; two-branch CNN.", **_CLASSIFIER_TRAINING),
    FRACTURE_MODEL: Spec(FRACTURE_MODEL, "xray-fracture-mobilenet", "classification",
                         ("normal", "fracture"), CLASSIFIER_SIZE,
                         "Spine radiograph fracture / normal; MobileNet-style "
                         "depthwise-separable CNN.", **{**_CLASSIFIER_TRAINING,
                                                        "crop_steps": 3000}),
    CSPINE_MODEL: Spec(CSPINE_MODEL, "xray-cspine-classifier", "classification",
                       ("normal", "fracture", "dislocation"), CLASSIFIER_SIZE,
                       "Cervical spine lateral radiograph normal / fracture / dislocation "
                       "with a class-activation saliency map (second output).",
                       **{**_CLASSIFIER_TRAINING, "views": ("LAT",)}),
    UNET_AP_MODEL: Spec(UNET_AP_MODEL, "xray-spine-unet", "segmentation",
                        ("background", *AP_STRUCTURES), SEGMENTER_SIZE,
                        "Spine AP radiograph segmentation (vertebral body, pedicle, spinous "
                        "process), 2D U-Net.",
                        {"num_classes": 1 + len(AP_STRUCTURES), "base": 12, "depth": 3},
                        steps=600, views=("AP",), cohort=SPINE_SEGMENTER_COHORT, version="0.3.0"),
    UNET_LAT_MODEL: Spec(UNET_LAT_MODEL, "xray-spine-unet", "segmentation",
                         ("background", *LAT_STRUCTURES), SEGMENTER_SIZE,
                         "Spine LAT radiograph segmentation (vertebral body, posterior "
                         "elements, disc, spinal canal, prevertebral soft tissue), 2D U-Net.",
                         {"num_classes": 1 + len(LAT_STRUCTURES), "base": 12, "depth": 3},
                         steps=600, views=("LAT",), cohort=SPINE_SEGMENTER_COHORT,
                         version="0.3.0"),
    TISSUE_MODEL: Spec(TISSUE_MODEL, "xray-tissue-xnet", "segmentation", TISSUES,
                       SEGMENTER_SIZE, "Radiograph tissue segmentation (bone, soft tissue, "
                       "open beam), XNet-style.", {"num_classes": len(TISSUES), "base": 12},
                       steps=600, local_contrast_mm=None, cohort=CONTEXT_COHORT),
    GATE_MODEL: Spec(GATE_MODEL, "xray-view-gate", "classification", ("other", "AP", "LAT"),
                     SEGMENTER_SIZE, "View gate: spine AP / spine LAT / not a spine radiograph "
                     "(noise, blank, CT slices, chest, hand); run before every X-ray model.",
                     steps=4200, batch_size=32, views=("AP", "LAT", "other"), cohort=GATE_COHORT,
                     phantom_factor=2.0, version="0.3.1", test_time_flip=True),
}
#: Junk images per spine phantom in the gate's training and validation data.
GATE_JUNK_PER_PHANTOM = 3
#: The kinds of junk the gate sees, in turn: chest radiographs twice as often as the rest
#: (a chest's centre shows a spine between the lungs; the hardest junk to tell apart).
GATE_JUNK_KINDS = augment.JUNK_KINDS + ("chest",)
#: Share of the gate's spine acquisitions collimated on all four sides to a field smaller
#: than the gate's window (:func:`framed_acquisition`): a tightly coned-down or small-field
#: cervical radiograph, blades bright inside its edges or cut off, nothing around it. Until
#: gate 0.2.0 a field trimmed on all four sides was one draw in fifty, and such images
#: read as the other view (docs/models-xray.md, "View gate 0.3.0").
GATE_FRAMED_SHARE = 0.35


# --------------------------------------------------------------------------- folders


def read_image_file(path: Path) -> np.ndarray:
    """Bone-bright float32 pixels of a PNG/JPEG (greyscale) or DICOM file."""
    if path.suffix.lower() == ".dcm":
        return read_radiograph(path).pixels
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("RGB", "RGBA", "P", "LA"):
            image = image.convert("L")
        return np.asarray(image, dtype=np.float32)


def _read_mask_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("RGB", "RGBA", "P", "LA"):
            image = image.convert("L")
        return np.asarray(image).astype(np.int64)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _split_dir(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{root}: missing '{split}/' folder (expected {split}/<class>/... "
                           "or {split}/images + {split}/masks)")
    return folder


def _class_index(folder_name: str, labels: Sequence[str]) -> int:
    key = {"damaged": "damage", "fractured": "fracture"}.get(folder_name.lower(),
                                                             folder_name.lower())
    if key not in labels:
        raise DatasetError(f"class folder {folder_name!r} is not one of {list(labels)}")
    return labels.index(key)


def load_class_folders(root: Path, split: str, spec: Spec) -> ImageSet:
    """``root/<split>/<class>/*`` images (or, for the pair model, study folders)."""
    folder = _split_dir(root, split)
    images: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    targets: list[int] = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        index = _class_index(class_dir.name, spec.labels)
        if spec.name == PAIR_MODEL:
            for study in sorted(p for p in class_dir.iterdir() if p.is_dir()):
                ap, lat = _pair_files(study)
                images.append(prepare_radiograph(read_image_file(ap), spec.size))
                seconds.append(prepare_radiograph(read_image_file(lat), spec.size))
                targets.append(index)
        else:
            for path in _images_in(class_dir):
                images.append(prepare_radiograph(read_image_file(path), spec.size))
                targets.append(index)
    if not images:
        raise DatasetError(f"{folder}: no images found under <class>/ folders "
                           f"(classes {list(spec.labels)}, files {IMAGE_SUFFIXES})")
    return ImageSet(np.stack(images)[:, None], np.asarray(targets, dtype=np.int64),
                    np.stack(seconds)[:, None] if seconds else None)


def _pair_files(study: Path) -> tuple[Path, Path]:
    found: dict[str, Path] = {}
    for path in _images_in(study):
        stem = path.stem.lower()
        view = "ap" if stem.startswith(("ap", "pa")) else "lat" if stem.startswith("lat") else ""
        if not view and path.suffix.lower() == ".dcm":
            position = read_radiograph(path).view_position
            view = "ap" if position in ("AP", "PA") else "lat" if position in (
                "LAT", "LL", "RL", "LATERAL") else ""
        if view:
            found.setdefault(view, path)
    if set(found) != {"ap", "lat"}:
        raise DatasetError(f"study folder {study} needs an AP and a LAT image "
                           "(names starting with 'ap' and 'lat', or DICOM ViewPosition)")
    return found["ap"], found["lat"]


def load_segmentation_folders(root: Path, split: str, spec: Spec) -> ImageSet:
    """``root/<split>/images/*`` with ``masks/<name>.png`` or ``masks/<structure>/<name>.png``."""
    folder = _split_dir(root, split)
    image_dir, mask_dir = folder / "images", folder / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise DatasetError(f"{folder}: segmentation data needs 'images/' and 'masks/' folders")
    structures = _structure_keys(spec)
    images: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    for path in _images_in(image_dir):
        pixels = read_image_file(path)
        label_file = mask_dir / f"{path.stem}.png"
        if label_file.is_file():
            label = _read_mask_file(label_file)
            if label.max() > len(structures):
                raise DatasetError(f"{label_file}: label value {label.max()} > "
                                   f"{len(structures)} structures {list(structures)}")
        else:
            per = [mask_dir / name / f"{path.stem}.png" for name in structures]
            missing = [str(p) for p in per if not p.is_file()]
            if missing:
                raise DatasetError(f"no mask for {path.name}: expected {label_file} or "
                                   f"{', '.join(missing)}")
            label = np.zeros(pixels.shape, dtype=np.int64)
            for k, mask_path in enumerate(per):  # later structures win where masks overlap
                label[_read_mask_file(mask_path) > 0] = k + 1
        if label.shape != pixels.shape:
            raise DatasetError(f"{path.name}: mask shape {label.shape} != image shape "
                               f"{pixels.shape}")
        images.append(prepare_radiograph(pixels, spec.size))
        sources.append(_structure_labels_to_classes(label, spec))
    if not images:
        raise DatasetError(f"{image_dir}: no images ({IMAGE_SUFFIXES})")
    return _segmentation_set(spec, images, sources)


def _structure_keys(spec: Spec) -> tuple[str, ...]:
    return spec.labels[1:] if spec.labels[0] == "background" else spec.labels


def _structure_labels_to_classes(label: np.ndarray, spec: Spec) -> np.ndarray:
    """Structure label values (0 none, k the k-th structure) -> model class indices.

    With a background class they coincide; without one (tissue classes cover every
    pixel), class = label - 1 and unlabelled pixels become -1 (ignored).
    """
    label = label.astype(np.int64)
    return label if spec.labels[0] == "background" else label - 1


def resize_class_map(classes: np.ndarray, num_classes: int, size: tuple[int, int]) -> np.ndarray:
    """Resize a class-index map (``-1`` ignored) by resizing its one-hot planes."""
    planes = np.stack([classes == k for k in range(-1, num_classes)]).astype(np.float32)
    return (np.argmax(resize_bilinear(planes, size), axis=0) - 1).astype(np.int64)


def _segmentation_set(spec: Spec, images: Sequence[np.ndarray],
                      sources: Sequence[np.ndarray]) -> ImageSet:
    targets = np.stack([resize_class_map(c, len(spec.labels), spec.size) for c in sources])
    return ImageSet(np.stack(images)[:, None], targets, source_targets=list(sources))


# --------------------------------------------------------------------------- phantoms


@dataclass
class PhantomViews:
    """One phantom study as the X-ray recipes use it: noise-free DRR line integrals on the
    cohort's grid (the model grid), label maps, findings."""

    ap: np.ndarray          # float32 line integral (bone bright), AP
    lat: np.ndarray
    ap_structures: np.ndarray   # uint8, 0 none, k = AP_STRUCTURES[k - 1]
    lat_structures: np.ndarray  # uint8, 0 none, k = LAT_STRUCTURES[k - 1]
    ap_tissue: np.ndarray       # uint8, k = TISSUES[k - 1] (every pixel labelled)
    lat_tissue: np.ndarray
    fracture: bool          # any vertebra fractured
    dislocation: bool       # any vertebra dislocated
    cspine_fracture: bool   # among C1-C7
    cspine_dislocation: bool
    #: Where the lesions project: float32 masks of the fractured vertebral bodies and of
    #: the dislocated joint (the displaced vertebra and the one below), per view.
    ap_fracture_map: np.ndarray
    lat_fracture_map: np.ndarray
    ap_dislocation_map: np.ndarray
    lat_dislocation_map: np.ndarray
    lesions_located: bool   # every lesion has projected body pixels
    seed: int = 0


def _relabel(label: np.ndarray, names: Mapping[int, str], order: Sequence[str]) -> np.ndarray:
    """A phantom label map re-numbered to ``order`` (1-based) by structure key."""
    out = np.zeros(label.shape, dtype=np.uint8)
    for value, name in names.items():
        if name in order:
            out[label == value] = order.index(name) + 1
    return out


def phantom_views(seed: int, cohort: PhantomCohort = CT_COHORT) -> PhantomViews:
    """Render cervical phantom ``seed`` of ``cohort``: noise-free AP and LAT DRRs (the
    acquisition is drawn later, per training copy) and truth maps."""
    from spine_node.inference import phantoms

    context = cohort.with_context(seed)
    sp = cohort.spacing_mm
    shape = (tuple(round(mm / sp) for mm in CONTEXT_VOLUME_MM) if context else cohort.shape)
    phantom = phantoms.generate(seed, region="cervical", shape=shape, spacing=sp,
                                radiographic_findings=cohort.radiographic_findings,
                                context=context, varied_anatomy=context,
                                posterior_detail=cohort.with_posterior(seed),
                                airway_hu=cohort.airway_hu(seed))
    views = {view: phantom.radiograph(view) for view in ("AP", "LAT")}
    ap, lat = views["AP"], views["LAT"]
    if ap.structures is None or lat.structures is None or ap.levels is None or lat.levels is None:
        raise RuntimeError("phantom radiographs came without structure or level maps")
    order = list(phantom.vertebrae)
    fractured = [v.label for v in order if v.fractured]
    dislocated = [w.label for i, v in enumerate(order) if v.dislocation
                  for w in order[i:i + 2]]
    cut = (_context_field(seed, sp, [ap.levels, lat.levels], fractured + dislocated)
           if context else None)

    def field(a: np.ndarray) -> np.ndarray:
        if cut is None:
            return a
        top, rows = cut
        left = (a.shape[1] - round(FIELD_MM[1] / sp)) // 2
        return np.ascontiguousarray(a[top:top + rows, left:left + round(FIELD_MM[1] / sp)])

    ap_levels, lat_levels = field(ap.levels), field(lat.levels)
    # Context phantoms: the field is placed to hold every lesion whole (_context_field), so
    # the study's labels hold for the cut; a lesion without pixels in view is not located.
    located = all((ap_levels == label).any() and (lat_levels == label).any()
                  for label in fractured + dislocated)
    return PhantomViews(
        ap=field(ap.line_integral), lat=field(lat.line_integral),
        ap_structures=field(_relabel(ap.structures, ap.structure_names, AP_STRUCTURES)),
        lat_structures=field(_relabel(lat.structures, lat.structure_names, LAT_STRUCTURES)),
        ap_tissue=field(_relabel(ap.tissue, ap.tissue_names, TISSUES)),
        lat_tissue=field(_relabel(lat.tissue, lat.tissue_names, TISSUES)),
        fracture=bool(phantom.fractured),
        dislocation=bool(phantom.dislocated),
        cspine_fracture=bool(phantom.fractures(phantoms.CERVICAL).any()),
        cspine_dislocation=bool(phantom.dislocations(phantoms.CERVICAL).any()),
        ap_fracture_map=np.isin(ap_levels, fractured).astype(np.float32),
        lat_fracture_map=np.isin(lat_levels, fractured).astype(np.float32),
        ap_dislocation_map=np.isin(ap_levels, dislocated).astype(np.float32),
        lat_dislocation_map=np.isin(lat_levels, dislocated).astype(np.float32),
        lesions_located=bool(located),
        seed=seed,
    )


def _context_field(seed: int, spacing_mm: float, levels: Sequence[np.ndarray],
                   lesions: Sequence[int]) -> tuple[int, int]:
    """Top row and row count of the :data:`FIELD_MM` field cut from a context phantom's
    radiographs: the top edge drawn from :data:`CONTEXT_TOP_MM`, narrowed so that every
    lesion's projected vertebrae (``lesions``, level labels in ``levels``) stay whole in
    view (a study labelled "fracture" shows its fracture)."""
    rows = round(FIELD_MM[0] / spacing_mm)
    total = int(levels[0].shape[0])
    low, high = (round(mm / spacing_mm) for mm in CONTEXT_TOP_MM)
    shown = [np.nonzero(np.isin(view, lesions).any(axis=1))[0] for view in levels]
    shown = [r for r in shown if len(r)]
    if shown:
        first = min(int(r.min()) for r in shown)
        last = max(int(r.max()) for r in shown)
        low, high = max(low, last + 3 - rows), min(high, first - 2)
        if low > high:  # taller than the window allows: centre on the lesions
            low = high = (first + last - rows) // 2
    top = int(np.random.default_rng([seed, 4100]).integers(low, high + 1))
    return int(np.clip(top, 0, total - rows)), rows


@dataclass
class _Acquired:
    """One randomised acquisition of a sample: windowed inputs and moved truth."""

    images: list[np.ndarray]
    target: Any
    lesions: tuple[tuple[np.ndarray, ...], ...]
    bodies: tuple[np.ndarray, ...]


def _acquire_sample(spec: Spec, sample: _Sample, rng: np.random.Generator) -> _Acquired | None:
    """Draw an acquisition per input view and move the truth with it.

    Classifiers: lesion maps keep only what stays visible; a copy whose lesions are mostly
    hidden (trimmed field, shutter) is dropped rather than mislabelled. Segmenters: pixels
    the detector did not see are ignored (-1) by the loss.
    """
    grid = spec.grid_mm
    classifier = spec.task == "classification"
    inputs = [sample.image] + ([sample.second] if sample.second is not None else [])
    images, visibles, acquisitions = [], [], []
    for integral in inputs:
        acq = augment.draw(rng, max_trim=0.12 if classifier else 0.25)
        image, valid, visible = augment.acquire(integral, grid, acq, rng)
        images.append(window(image, valid, contrast_px=spec.contrast_px))
        visibles.append(visible)
        acquisitions.append(acq)
    if not classifier:
        labels = augment.transform_map(sample.target.astype(np.uint8), acquisitions[0], grid, 0)
        classes = _structure_labels_to_classes(labels, spec)
        classes[~visibles[0]] = -1
        return _Acquired(images, classes, (), ())
    lesions = []
    for v, maps in enumerate(sample.lesions):
        view = v if len(inputs) > 1 else 0
        moved = []
        for lesion in maps:
            shown = augment.transform_map(lesion, acquisitions[view], grid, 1) * visibles[view]
            if lesion.sum() > 0 and shown.sum() < 0.5 * lesion.sum() * acquisitions[view].scale ** 2:
                return None
            moved.append(shown.astype(np.float32))
        lesions.append(tuple(moved))
    bodies = tuple(augment.transform_map(body.astype(np.uint8), acquisitions[v], grid, 0).astype(bool)
                   & visibles[v] for v, body in enumerate(sample.bodies))
    return _Acquired(images, sample.target, tuple(lesions), bodies)


def phantom_sets(spec: Spec, seeds: Sequence[int], progress: Progress | None = None,
                 workers: int = 1, copies: int | None = None, split: int = 0) -> ImageSet:
    """Prepared images and targets for ``spec`` from the phantoms ``seeds``, rendered by
    ``workers`` processes, each view acquired ``copies`` times (randomised; ``split``
    keeps the draws of training and validation apart)."""
    if spec.name == GATE_MODEL:
        return gate_set(spec, seeds, progress, workers, copies or spec.copies, split)
    copies = copies or spec.copies
    images: list[np.ndarray] = []
    seconds: list[np.ndarray] = []
    targets: list[Any] = []
    lesions: list[tuple[np.ndarray, ...]] = []
    weights: list[float] = []
    bodies: list[tuple[np.ndarray, ...]] = []
    mirrorable: list[tuple[bool, ...]] = []
    sample_views: list[str] = []
    feature_size = (spec.size[0] // LESION_STRIDE, spec.size[1] // LESION_STRIDE)
    salt = zlib.crc32(spec.name.encode())
    for views in render_views(seeds, spec.cohort, workers, progress, f"{spec.name}: phantoms"):
        for s, sample in enumerate(_phantom_samples(spec, views)):
            for copy in range(copies):
                rng = np.random.default_rng([views.seed, salt, s, copy, split])
                acquired = _acquire_sample(spec, sample, rng)
                if acquired is None:
                    continue
                images.append(resize_bilinear(acquired.images[0], spec.size))
                if len(acquired.images) > 1:
                    seconds.append(resize_bilinear(acquired.images[1], spec.size))
                targets.append(acquired.target)
                sample_views.append(sample.view)
                if acquired.lesions:
                    lesions.append(tuple(resize_bilinear(np.stack(maps), feature_size)
                                         for maps in acquired.lesions))
                    weights.append(1.0 if views.lesions_located else 0.0)
                bodies.append(tuple(resize_bilinear(body.astype(np.float32), spec.size) > 0.5
                                    for body in acquired.bodies))
                # Flips are part of the acquisitions now, so every view may be mirrored.
                mirrorable.append(tuple(True for _ in acquired.bodies))
    if spec.task == "segmentation":
        result = _segmentation_set(spec, images, targets)
        result.views = np.asarray(sample_views)
        return result
    return ImageSet(np.stack(images)[:, None], np.asarray(targets, dtype=np.int64),
                    np.stack(seconds)[:, None] if seconds else None,
                    lesion_maps=tuple(np.stack(group) for group in zip(*lesions, strict=True)),
                    lesion_weight=np.asarray(weights, np.float32) if weights else None,
                    body_masks=tuple(np.stack(group) for group in zip(*bodies, strict=True)),
                    mirrorable=tuple(np.array(group) for group in zip(*mirrorable, strict=True)),
                    views=np.asarray(sample_views))


def gate_input(pixels: np.ndarray, spacing_mm: tuple[float, float], size: tuple[int, int],
               grid_mm: float, contrast_px: float | None = None) -> np.ndarray:
    """The gate's window of an image at ``spacing_mm``, as the pipelines prepare it."""
    grid = Grid((int(pixels.shape[0]), int(pixels.shape[1])), spacing_mm, grid_mm)
    canvas = to_canvas(pixels, grid)
    image, valid = place(canvas, size, centre_origin(canvas.shape, size))
    return window(image, valid, contrast_px=contrast_px)


def framed_acquisition(integral: np.ndarray, grid_mm: float, rng: np.random.Generator
                       ) -> np.ndarray:
    """One acquisition of ``integral`` collimated on all four sides, cut to the recorded
    field: with collimator blades (bright bands 0-12 mm wide inside the edges), or without
    (the file holds only the exposed field). The pipeline centres what it gets in its
    window, so the window shows the field with nothing around it."""
    acq = augment.draw(rng, coverage_chance=0.0)
    trims = tuple(float(v) for v in rng.uniform(0.04, 0.22, 4))
    acq = replace(acq, coverage=trims, shutter=bool(rng.random() < 0.7))  # type: ignore[arg-type]
    image, _, visible = augment.acquire(integral, grid_mm, acq, rng)
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    band = int(rng.integers(0, round(12 / grid_mm) + 1)) if acq.shutter else 0
    top, bottom = max(int(rows[0]) - band, 0), min(int(rows[-1]) + 1 + band, image.shape[0])
    left, right = max(int(cols[0]) - band, 0), min(int(cols[-1]) + 1 + band, image.shape[1])
    return image[top:bottom, left:right]


def gate_set(spec: Spec, seeds: Sequence[int], progress: Progress | None, workers: int,
             copies: int, split: int) -> ImageSet:
    """Spine AP / LAT acquisitions of the 2 mm phantoms and junk (:func:`augment.junk`),
    labelled 1 AP, 2 LAT, 0 other."""
    from spine_node.inference import phantoms

    images: list[np.ndarray] = []
    targets: list[int] = []
    views: list[str] = []
    grid = spec.grid_mm
    for views_ in render_views(seeds, spec.cohort, workers, progress, f"{spec.name}: phantoms"):
        for label, integral in ((1, views_.ap), (2, views_.lat)):
            for copy in range(copies):
                rng = np.random.default_rng([views_.seed, 11, label, copy, split])
                if rng.random() < GATE_FRAMED_SHARE:
                    images.append(gate_input(framed_acquisition(integral, grid, rng), (grid, grid),
                                             spec.size, grid, spec.contrast_px))
                else:
                    image, valid, _ = augment.acquire(integral, grid, augment.draw(rng), rng)
                    images.append(resize_bilinear(window(image, valid, contrast_px=spec.contrast_px),
                                                  spec.size))
                targets.append(label)
                views.append(spec.labels[label])
        for k in range(GATE_JUNK_PER_PHANTOM * copies):
            rng = np.random.default_rng([views_.seed, 12, k, split])
            kind = GATE_JUNK_KINDS[(views_.seed + k) % len(GATE_JUNK_KINDS)]
            if kind == "ct_slice" and k % 2:
                # A real phantom's axial slice, as a CT image sent to the X-ray route would be.
                phantom = phantoms.generate(views_.seed + 7919 * (k + 1), region="cervical")
                hu = phantom.hu[int(rng.integers(10, phantom.hu.shape[0] - 10))]
                pixels, spacing = np.clip(hu + 1024.0, 0, None), float(phantom.spacing[1])
            else:
                shape = (int(rng.integers(24, 160)), int(rng.integers(24, 140)))
                pixels, spacing = augment.junk(kind, rng, grid, shape)
            images.append(gate_input(pixels, (spacing, spacing), spec.size, grid, spec.contrast_px))
            targets.append(0)
            views.append("other")
    return ImageSet(np.stack(images)[:, None].astype(np.float32), np.asarray(targets, np.int64),
                    views=np.asarray(views))


@dataclass
class _Sample:
    image: np.ndarray
    second: np.ndarray | None
    target: Any
    #: One tuple of lesion masks (source size) per lesion-map output of the model.
    lesions: tuple[tuple[np.ndarray, ...], ...] = ()
    #: Classifiers: the vertebral bodies of each input view (source size), and whether
    #: the view may be mirrored left-right (an AP view; a LAT view keeps anterior left).
    bodies: tuple[np.ndarray, ...] = ()
    mirrorable: tuple[bool, ...] = ()
    view: str = ""


_VIEW_CACHE: dict[tuple[int, str], PhantomViews] = {}


def _can_spawn() -> bool:
    """Spawned processes re-import the main module from its file (none for code on stdin)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return path is None or Path(path).is_file()


def render_views(seeds: Sequence[int], cohort: PhantomCohort, workers: int = 1,
                 progress: Progress | None = None, label: str = "phantoms"
                 ) -> list[PhantomViews]:
    """:func:`phantom_views` of ``seeds`` (in that order), each rendered once per process.

    The recipes of one run that draw the same cohort share them. With ``workers`` > 1
    they are rendered in that many processes (each phantom depends on its seed only).
    """
    missing = [seed for seed in dict.fromkeys(seeds) if (seed, cohort.name) not in _VIEW_CACHE]
    task = progress.add_task(label, total=len(seeds)) if progress else None
    if progress is not None and task is not None:
        progress.advance(task, len(seeds) - len(missing))
    if workers > 1 and len(missing) > 1 and _can_spawn():
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        # spawn: the children need numpy and scipy only, not the parent's torch threads.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            rendered = pool.map(phantom_views, missing, [cohort] * len(missing), chunksize=4)
            for seed, views in zip(missing, rendered, strict=True):
                _VIEW_CACHE[(seed, cohort.name)] = views
                if progress is not None and task is not None:
                    progress.advance(task)
    for seed in missing:
        if (seed, cohort.name) not in _VIEW_CACHE:
            _VIEW_CACHE[(seed, cohort.name)] = phantom_views(seed, cohort)
            if progress is not None and task is not None:
                progress.advance(task)
    return [_VIEW_CACHE[(seed, cohort.name)] for seed in seeds]


def _phantom_samples(spec: Spec, views: PhantomViews) -> Iterator[_Sample]:
    """The training samples of ``spec`` in one phantom study (before acquisition)."""
    body = AP_STRUCTURES.index("vertebral_body") + 1
    ap_bodies = views.ap_structures == body
    lat_bodies = views.lat_structures == LAT_STRUCTURES.index("vertebral_body") + 1
    if spec.name == PAIR_MODEL:
        damage_ap = np.maximum(views.ap_fracture_map, views.ap_dislocation_map)
        damage_lat = np.maximum(views.lat_fracture_map, views.lat_dislocation_map)
        yield _Sample(views.ap, views.lat, int(views.fracture or views.dislocation),
                      ((damage_ap,), (damage_lat,)), (ap_bodies, lat_bodies), (True, True), "pair")
    elif spec.name == FRACTURE_MODEL:
        yield _Sample(views.lat, None, int(views.fracture), ((views.lat_fracture_map,),),
                      (lat_bodies,), (True,), "LAT")
        yield _Sample(views.ap, None, int(views.fracture), ((views.ap_fracture_map,),),
                      (ap_bodies,), (True,), "AP")
    elif spec.name == CSPINE_MODEL:
        label = 2 if views.cspine_dislocation else 1 if views.cspine_fracture else 0
        yield _Sample(views.lat, None, label,
                      ((views.lat_fracture_map, views.lat_dislocation_map),), (lat_bodies,),
                      (True,), "LAT")
    elif spec.name == UNET_AP_MODEL:
        yield _Sample(views.ap, None, views.ap_structures, view="AP")
    elif spec.name == UNET_LAT_MODEL:
        yield _Sample(views.lat, None, views.lat_structures, view="LAT")
    elif spec.name == TISSUE_MODEL:
        yield _Sample(views.ap, None, views.ap_tissue, view="AP")
        yield _Sample(views.lat, None, views.lat_tissue, view="LAT")
    else:
        raise KeyError(spec.name)


# --------------------------------------------------------------------------- training


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast and noise per image (geometry untouched, so masks hold)."""
    n = batch.shape[0]
    gamma = torch.exp(torch.empty(n, 1, 1, 1).uniform_(-0.4, 0.4, generator=generator))
    scale = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.1, generator=generator)
    offset = torch.empty(n, 1, 1, 1).uniform_(-0.05, 0.1, generator=generator)
    noise = torch.randn(batch.shape, generator=generator) * 0.02
    return (batch.clamp(0, 1) ** gamma * scale + offset + noise).clamp(0, 1)


def _loss(spec: Spec, model: nn.Module, images: torch.Tensor, second: torch.Tensor | None,
          targets: torch.Tensor, class_weights: torch.Tensor | None,
          lesions: Sequence[torch.Tensor] = (), lesion_weight: torch.Tensor | None = None
          ) -> torch.Tensor:
    if spec.task == "classification":
        inputs = (images, second) if second is not None else (images,)
        logits, maps = model.training_outputs(*inputs)
        loss = F.cross_entropy(logits, targets, weight=class_weights)
        if lesions and lesion_weight is not None and lesion_weight.sum() > 0:
            # Deep supervision: the lesion-map heads learn where the lesions project.
            # Lesion and lesion-free cells count half each: lesions cover a few percent
            # of a map.
            weight = lesion_weight[:, None, None, None]
            for predicted, truth in zip(maps, lesions, strict=True):
                cells = F.binary_cross_entropy_with_logits(predicted, truth, reduction="none")
                inside = (cells * truth * weight).sum() / (truth * weight).sum().clamp(min=1.0)
                outside = ((cells * (1 - truth) * weight).sum()
                           / ((1 - truth) * weight).sum().clamp(min=1.0))
                loss = loss + inside + outside
        return loss
    logits = model.logits(images)
    loss = F.cross_entropy(logits, targets, weight=class_weights, ignore_index=-1)
    # Soft Dice over the labelled pixels, so small structures (pedicles) count as much as
    # large ones.
    probabilities = torch.softmax(logits, dim=1)
    valid = (targets >= 0).unsqueeze(1).float()
    one_hot = F.one_hot(targets.clamp(min=0), probabilities.shape[1]).permute(0, 3, 1, 2).float()
    overlap = (probabilities * one_hot * valid).sum(dim=(0, 2, 3))
    total = ((probabilities + one_hot) * valid).sum(dim=(0, 2, 3))
    dice = (2 * overlap + 1) / (total + 1)
    return loss + (1 - dice).mean()


#: One mini-batch: images, second images (pair), targets, class weights, lesion maps and
#: per-sample lesion weights, as :func:`_loss` takes them.
_Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
               list[torch.Tensor], torch.Tensor | None]


def train_model(spec: Spec, train: ImageSet, seed: int, steps: int | None = None,
                progress: Progress | None = None, crop_steps: int = 0,
                init_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Train a fresh ``spec`` model on ``train`` (AdamW, one-cycle schedule per phase).

    With ``crop_steps`` (classifiers with lesion maps and body masks, i.e. phantoms) the
    model first learns on ``spec.crop_size`` crops around the vertebral bodies (and some
    anywhere), each labelled by the lesions inside it: the fully convolutional
    classifiers see many more lesion and lesion-free examples per second than on whole
    images and learn what a fracture looks like instead of remembering whole phantoms.
    Then ``steps`` mini-batches of whole images fit the pooled class scores.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = architecture(spec.architecture, **spec.architecture_kwargs)
    if init_state is not None:  # fine-tuning (``--init``)
        model.load_state_dict(init_state)
    model = model.to(_device())
    steps = steps or spec.steps
    images = torch.from_numpy(train.images)
    second = torch.from_numpy(train.second) if train.second is not None else None
    targets = torch.from_numpy(train.targets)
    lesions = [torch.from_numpy(maps) for maps in train.lesion_maps]
    lesion_weight = (torch.from_numpy(train.lesion_weight) if train.lesion_weight is not None
                     else None)
    counts = np.bincount(train.targets[train.targets >= 0].ravel(),
                         minlength=len(spec.labels)).astype(np.float32)
    if spec.task == "classification":
        class_weights = torch.from_numpy(counts.sum() / (len(counts) * np.maximum(counts, 1)))
    else:
        # Small structures (pedicles) would otherwise lose to the large ones around them.
        weights = 1.0 / np.sqrt(np.maximum(counts / counts.sum(), 1e-4))
        class_weights = torch.from_numpy((weights / weights.mean()).astype(np.float32))
    if crop_steps and lesions and train.body_masks and lesion_weight is not None:
        crops = _Crops(spec, train, generator)
        _train_phase(spec, model, crop_steps, crops.batch, progress, f"{spec.name}: crops")

    def whole_images() -> _Batch:
        index = torch.randint(0, len(train), (min(spec.batch_size, len(train)),),
                              generator=generator)
        batch = _augment(images[index], generator)
        batch_second = _augment(second[index], generator) if second is not None else None
        return (batch, batch_second, targets[index], class_weights,
                [maps[index] for maps in lesions],
                lesion_weight[index] if lesion_weight is not None else None)

    _train_phase(spec, model, steps, whole_images, progress, f"{spec.name}: train")
    return model.cpu().eval()


def _device() -> torch.device:
    """A CUDA GPU when there is one (the batches are drawn on the CPU either way)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def _train_phase(spec: Spec, model: nn.Module, steps: int, next_batch: Callable[[], _Batch],
                 progress: Progress | None, label: str) -> None:
    """``steps`` optimiser steps on the mini-batches ``next_batch()`` returns."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=spec.learning_rate,
                                                   total_steps=steps, pct_start=0.15)
    task = progress.add_task(label, total=steps) if progress else None
    model.train()
    for _ in range(steps):
        device = next(model.parameters()).device
        loss = _loss(spec, model, *(_to(part, device) for part in next_batch()))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if progress is not None and task is not None:
            progress.update(task, advance=1, description=f"{label} loss {loss.item():.3f}")


class _Crops:
    """Mini-batches of crops for the crop phase of :func:`train_model`.

    A crop is ``spec.crop_size`` square, aligned to the lesion maps' stride, centred
    (give or take one stride) on a random vertebral body pixel, or anywhere in a quarter
    of the cases so that the rest of the image is seen too; AP crops are mirrored
    left-right half of the time. The pair classifier's two
    crops cover the same rows (the same levels) of the AP and the LAT view. A crop's class
    is the last abnormal class whose lesion map reaches 0.5 in it (in either view), else
    normal. Samples whose lesions could not be located are left out.
    """

    ANYWHERE = 0.25

    def __init__(self, spec: Spec, train: ImageSet, generator: torch.Generator) -> None:
        self.spec = spec
        self.generator = generator
        self.size = spec.crop_size
        self.views = [torch.from_numpy(train.images)]
        if train.second is not None:
            self.views.append(torch.from_numpy(train.second))
        self.lesions = [torch.from_numpy(maps) for maps in train.lesion_maps]
        # The pair classifier has one lesion map per view; the others one for their image.
        self.lesion_view = list(range(len(self.lesions))) if len(self.views) > 1 else [0]
        self.bodies = [[np.argwhere(mask) for mask in masks] for masks in train.body_masks]
        self.mirrorable = [torch.from_numpy(flags) for flags in train.mirrorable]
        assert train.lesion_weight is not None
        self.pool = torch.from_numpy(np.flatnonzero(train.lesion_weight > 0))

    def _uniform(self, high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=self.generator))

    def _origin(self, centre: tuple[int, int] | None, extent: int, axis: int) -> int:
        stride = LESION_STRIDE
        if centre is None:
            return self._uniform((extent - self.size) // stride + 1) * stride
        jitter = self._uniform(2 * stride + 1) - stride
        start = round((centre[axis] - self.size / 2 + jitter) / stride)
        return int(np.clip(start, 0, (extent - self.size) // stride)) * stride

    def _centre(self, pixels: np.ndarray, row: int | None = None) -> tuple[int, int] | None:
        if row is not None:
            near = pixels[np.abs(pixels[:, 0] - row) < LESION_STRIDE]
            pixels = near if len(near) else pixels
        if not len(pixels):
            return None
        r, c = pixels[self._uniform(len(pixels))]
        return int(r), int(c)

    def batch(self) -> _Batch:
        size, stride = self.size, LESION_STRIDE
        height, width = self.spec.size
        picks = self.pool[torch.randint(0, len(self.pool), (self.spec.crop_batch_size,),
                                        generator=self.generator)].tolist()
        crops: list[list[torch.Tensor]] = [[] for _ in self.views]
        maps: list[list[torch.Tensor]] = [[] for _ in self.lesions]
        for i in picks:
            anywhere = float(torch.rand(1, generator=self.generator)) < self.ANYWHERE
            centre = None if anywhere else self._centre(self.bodies[0][i])
            top = self._origin(centre, height, 0)
            for v, view in enumerate(self.views):
                if v > 0:
                    centre = self._centre(self.bodies[v][i], row=top + size // 2)
                left = self._origin(centre, width, 1)
                mirror = (bool(self.mirrorable[v][i]) if self.mirrorable else False) and float(
                    torch.rand(1, generator=self.generator)) < 0.5
                crop = view[i, :, top:top + size, left:left + size]
                crops[v].append(crop.flip(-1) if mirror else crop)
                for k, lesion_view in enumerate(self.lesion_view):
                    if lesion_view == v:
                        cells = self.lesions[k][i, :, top // stride:(top + size) // stride,
                                                left // stride:(left + size) // stride]
                        maps[k].append(cells.flip(-1) if mirror else cells)
        lesions = [torch.stack(group) for group in maps]
        peak = torch.stack([m.amax(dim=(2, 3)) for m in lesions]).amax(dim=0)
        targets = torch.zeros(len(picks), dtype=torch.long)
        for channel in range(peak.shape[1]):
            targets[peak[:, channel] >= 0.5] = channel + 1
        classes = len(self.spec.labels)
        counts = torch.bincount(targets, minlength=classes).float()
        class_weights = counts.sum() / (classes * counts.clamp(min=1))
        batch = [_augment(torch.stack(group), self.generator) for group in crops]
        return (batch[0], batch[1] if len(batch) > 1 else None, targets, class_weights,
                lesions, torch.ones(len(picks)))


# --------------------------------------------------------------------------- export


def export_onnx(model: nn.Module, spec: Spec, path: Path) -> None:
    """Export ``model``'s inference graph with a dynamic batch dimension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    input_names = list(model.input_names)
    output_names = list(model.output_names)
    example = tuple(torch.zeros(2, 1, *spec.size) for _ in input_names)
    dynamic = {name: {0: "batch"} for name in input_names + output_names}
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo=False is deliberate (stable graphs for ONNX Runtime and TensorRT).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, example, str(path), input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, opset_version=17,
                          dynamo=False)


def onnx_predict(path: Path, data: ImageSet, batch_size: int = 32,
                 mirror: bool = False) -> dict[str, np.ndarray]:
    """Run an exported model over ``data`` with ONNX Runtime (CPU); with ``mirror`` each
    image is also read mirrored left-right and the outputs averaged, as the pipelines do
    for a card with ``test_time_flip`` (a map output is mirrored back first)."""
    if mirror:
        flipped = replace(data, images=np.ascontiguousarray(data.images[..., ::-1]),
                          second=(None if data.second is None
                                  else np.ascontiguousarray(data.second[..., ::-1])))
        return average_mirrored(onnx_predict(path, data, batch_size),
                                onnx_predict(path, flipped, batch_size))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs: dict[str, list[np.ndarray]] = {o.name: [] for o in session.get_outputs()}
    for start in range(0, len(data), batch_size):
        feed = {names[0]: data.images[start:start + batch_size]}
        if len(names) > 1 and data.second is not None:
            feed[names[1]] = data.second[start:start + batch_size]
        for name, value in zip(outputs, session.run(list(outputs), feed), strict=True):
            outputs[name].append(value)
    return {name: np.concatenate(values) for name, values in outputs.items()}


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * float((prediction & truth).sum()) / total


def _rates(scores: np.ndarray, positives: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold``, with n and 95 % Wilson intervals."""
    positives = positives.astype(bool)
    flagged = scores >= threshold
    tp, tn = int((flagged & positives).sum()), int((~flagged & ~positives).sum())
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return {"n_positive": n_pos, "n_negative": n_neg,
            "sensitivity": round(tp / max(n_pos, 1), 4),
            "sensitivity_ci95": [round(v, 4) for v in wilson_ci(tp, n_pos)],
            "specificity": round(tn / max(n_neg, 1), 4),
            "specificity_ci95": [round(v, 4) for v in wilson_ci(tn, n_neg)]}


def operating_point(scores: np.ndarray, positives: np.ndarray) -> dict[str, Any]:
    """The threshold with the highest Youden J (sensitivity + specificity - 1) on these
    scores, with its sensitivity and specificity and their 95 % Wilson intervals."""
    positives = positives.astype(bool)
    candidates = np.unique(np.concatenate([scores, [0.5]]))
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    best, best_j = 0.5, -2.0
    for threshold in candidates:
        flagged = scores >= threshold
        j = ((flagged & positives).sum() / max(n_pos, 1) + (~flagged & ~positives).sum()
             / max(n_neg, 1) - 1)
        if j > best_j + 1e-9:
            best, best_j = float(threshold), j
    return {"threshold": round(best, 4), **_rates(scores, positives, best)}


def abnormal_scores(spec: Spec, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Score per finding kind the pipelines report (class probability)."""
    return {key: probabilities[:, k] for k, key in enumerate(spec.labels) if k > 0}


#: Specificity every validation cohort must keep at a classifier's rule-in point (where
#: some threshold gives it): a "present" call is one a reader can act on, so at most one
#: normal in ten of any validation cohort gets it (the CT card's bar too); what the model
#: cannot call at that specificity falls between the points, "indeterminate". Until 0.1.1
#: the floor was 0.7: the dislocation point then flagged 24 % of the context validation
#: cohort's normals present, and the evaluation generator's normals more than half.
SPECIFICITY_FLOOR = 0.9


def robust_threshold(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The threshold whose worst Youden J over several validation cohorts (``parts``: scores,
    positives) is highest, among those keeping :data:`SPECIFICITY_FLOOR` on each where
    any does; ties go to the higher mean J. On one cohort it is the Youden threshold."""
    candidates = np.unique(np.concatenate([scores for scores, _ in parts] + [np.array([0.5])]))
    rows = []
    for threshold in candidates:
        js, specs = [], []
        for scores, positives in parts:
            positives = positives.astype(bool)
            flagged = scores >= threshold
            sens = (flagged & positives).sum() / max(int(positives.sum()), 1)
            spec = (~flagged & ~positives).sum() / max(int((~positives).sum()), 1)
            js.append(sens + spec - 1)
            specs.append(spec)
        rows.append((min(specs) >= SPECIFICITY_FLOOR, round(min(js), 9), round(float(np.mean(js)), 9),
                     -float(threshold)))
    allowed = any(row[0] for row in rows)
    best = max(range(len(rows)), key=lambda i: (rows[i][0] or not allowed, *rows[i][1:]))
    return float(candidates[best])


#: The rule-out point below each rule-in point: sensitivity kept on every validation
#: cohort, unless that leaves fewer than :data:`RULE_OUT_MIN_SPECIFICITY` of some cohort's
#: normals below it. Between the two the finding is "indeterminate" (a reader should look).
RULE_OUT_SENSITIVITY = 0.9
RULE_OUT_MIN_SPECIFICITY = 0.5


def rule_out_threshold(parts: Sequence[tuple[np.ndarray, np.ndarray]], rule_in: float) -> float:
    """The highest threshold at most ``rule_in`` keeping :data:`RULE_OUT_SENSITIVITY` on every
    cohort (``parts``: scores, positives), raised where needed to keep
    :data:`RULE_OUT_MIN_SPECIFICITY` on each."""
    sensitive, specific = rule_in, 0.0
    for scores, positives in parts:
        positives = positives.astype(bool)
        found = np.sort(scores[positives])
        if len(found):  # the k-th lowest positive: at most (1 - target) of them fall below it
            sensitive = min(sensitive, float(found[int(np.floor((1 - RULE_OUT_SENSITIVITY) * len(found)))]))
        normals = np.sort(scores[~positives])
        if len(normals):
            index = min(int(np.ceil(RULE_OUT_MIN_SPECIFICITY * len(normals))) - 1, len(normals) - 1)
            specific = max(specific, float(np.nextafter(normals[max(index, 0)], 1.0)))
    return float(min(rule_in, max(sensitive, specific)))


def _mixed_points(spec: Spec, parts: Mapping[str, tuple[np.ndarray, ImageSet]],
                  points: dict[str, dict[str, Any]], metrics: dict[str, float]) -> None:
    """Operating points chosen on several validation cohorts together (``parts``: name ->
    (probabilities, set)); each point also gives its rates on every part, and ``metrics``
    gets each extra part's AUCs (``auc_<kind>[_<view>]_<part>``)."""
    views = sorted({str(v) for _, data in parts.values() for v in
                    (data.views if data.views is not None else ["all"] * len(data))})

    def of(data: ImageSet, view: str) -> np.ndarray:
        return (data.views == view if data.views is not None
                else np.ones(len(data), bool))

    for k, key in enumerate(spec.labels[1:], start=1):
        points[key] = {}
        for view in views:
            cohorts = {name: (p[of(d, view), k], d.targets[of(d, view)] == k)
                       for name, (p, d) in parts.items()}
            scores = np.concatenate([scores for scores, _ in cohorts.values()])
            truth = np.concatenate([truth for _, truth in cohorts.values()])
            threshold = round(robust_threshold(list(cohorts.values())), 4)
            point = {"threshold": threshold, **_rates(scores, truth, threshold)}
            rule_out = round(rule_out_threshold(list(cohorts.values()), threshold), 4)
            point["rule_out_threshold"] = rule_out
            point["rule_out"] = {name: _rates(*cohort, rule_out) for name, cohort in cohorts.items()}
            point["rule_out_chosen_for"] = (f"sensitivity >= {RULE_OUT_SENSITIVITY} on every cohort "
                                            f"unless that leaves under {RULE_OUT_MIN_SPECIFICITY:.0%} "
                                            "of some cohort's normals below it; between it and "
                                            "threshold the finding is indeterminate")
            point["chosen_on"] = (" + ".join(parts) + ": best worst-cohort Youden J with "
                                  f"specificity >= {SPECIFICITY_FLOOR} on each")
            point["parts"] = {name: _rates(*cohort, threshold) for name, cohort in cohorts.items()}
            points[key][view] = point
        for name, (probabilities, data) in list(parts.items())[1:]:
            metrics[f"auc_{key}_{name}"] = roc_auc(data.targets == k, probabilities[:, k])
            for view in views if len(views) > 1 else []:
                chosen = of(data, view)
                metrics[f"auc_{key}_{view}_{name}"] = roc_auc(data.targets[chosen] == k,
                                                             probabilities[chosen, k])


def evaluate(spec: Spec, onnx_path: Path, data: ImageSet,
             points: dict[str, dict[str, Any]] | None = None,
             mix: ImageSet | None = None) -> dict[str, float]:
    """Held-out metrics of the exported model: AUC per class (and per view), or Dice per
    structure (and per view).

    Dice is measured on each source image's own grid, after the class probabilities are
    resized back the way the pipelines do it. ``points``, when given, is filled with the
    operating point of each finding kind per view (:func:`operating_point`), chosen on
    ``data`` and ``mix`` together where ``mix`` (a classifier's context validation set,
    :data:`CONTEXT_VALIDATION_COHORT`) is given; its AUCs go in as ``..._context``.
    """
    outputs = onnx_predict(onnx_path, data, mirror=spec.test_time_flip)
    probabilities = outputs["probabilities"]
    metrics: dict[str, float] = {"samples": float(len(data))}
    views = sorted(set(data.views.tolist())) if data.views is not None else []
    if spec.task == "classification":
        if spec.name == GATE_MODEL:
            predicted = probabilities.argmax(1)
            metrics["accuracy"] = float((predicted == data.targets).mean())
            for k, key in enumerate(spec.labels):
                chosen = data.targets == k
                metrics[f"recall_{key}"] = float((predicted[chosen] == k).mean()) if chosen.any() else 1.0
            return metrics
        for k, key in enumerate(spec.labels[1:], start=1):
            metrics[f"auc_{key}"] = roc_auc(data.targets == k, probabilities[:, k])
            for view in views if len(views) > 1 else []:
                chosen = data.views == view
                metrics[f"auc_{key}_{view}"] = roc_auc(data.targets[chosen] == k,
                                                      probabilities[chosen, k])
            if points is not None and mix is None:
                points[key] = {}
                for view in views or ["all"]:
                    chosen = data.views == view if views else np.ones(len(data), bool)
                    points[key][view] = operating_point(probabilities[chosen, k],
                                                        data.targets[chosen] == k)
        if mix is not None:
            _mixed_points(spec, {"classic": (probabilities, data),
                                 "context": (onnx_predict(onnx_path, mix, mirror=spec.test_time_flip
                                                          )["probabilities"], mix)},
                          points if points is not None else {}, metrics)
        metrics["accuracy"] = float((probabilities.argmax(1) == data.targets).mean())
        if len(spec.labels) > 2:
            metrics["auc_abnormal"] = roc_auc(data.targets > 0, 1 - probabilities[:, 0])
        return metrics
    first = 1 if spec.labels[0] == "background" else 0
    groups = {"": np.ones(len(data), bool)}
    if len(views) > 1:
        groups.update({f"_{view}": data.views == view for view in views})
    for suffix, chosen in groups.items():
        overlap = np.zeros(len(spec.labels))
        total = np.zeros(len(spec.labels))
        for i in np.flatnonzero(chosen):
            truth = data.source_targets[i]
            predicted = np.argmax(resize_bilinear(probabilities[i], truth.shape), axis=0)
            labelled = truth >= 0
            for k in range(first, len(spec.labels)):
                hit, real = (predicted == k) & labelled, truth == k
                overlap[k] += (hit & real).sum()
                total[k] += hit.sum() + real.sum()
        values = {f"dice_{spec.labels[k]}{suffix}": float(2 * overlap[k] / total[k]) if total[k] else 1.0
                  for k in range(first, len(spec.labels))}
        metrics.update(values)
        metrics[f"dice_mean{suffix}"] = float(np.mean(list(values.values())))
    return metrics


#: The issue's bars for the demo weights on held-out phantoms.
AUC_BAR = 0.90
DICE_BAR = 0.85


#: What the classifiers' phantom cohort leaves out (their cards say so).
RADIOGRAPHIC_LIMITATION = (
    "Trained and evaluated only on phantoms whose findings show on a radiograph "
    "(compressions losing 25-50 % of the body height, displaced transverse cracks of C2-C7, "
    "dislocations of 4-8 mm); fractures that plain films miss (sagittal cracks, C1 ring "
    "fractures, mild wedges) were never shown to it.")


def limitations_note(spec: Spec, metrics: dict[str, float]) -> str:
    """A plain statement for the card when held-out metrics miss the project's bar."""
    if spec.task == "classification":
        missed = {k: v for k, v in metrics.items() if k.startswith("auc_") and v < AUC_BAR}
        bar = f"AUC {AUC_BAR}"
    else:
        missed = {k: v for k, v in metrics.items() if k.startswith("dice_") and v < DICE_BAR}
        bar = f"Dice {DICE_BAR}"
    if not missed:
        return ""
    shown = ", ".join(f"{k} {v:.3f}" for k, v in sorted(missed.items()))
    return f"Below the project's bar ({bar}) on held-out phantoms: {shown}."


def write_card(spec: Spec, model: nn.Module, folder: Path, weights: dict[str, Any],
               phantoms: bool = True) -> ModelCard:
    """``model.yaml`` describing the exported ``model.onnx`` in ``folder`` (``phantoms``:
    trained on the mm grid with the spec's local contrast; folder datasets without it)."""
    batch = -1
    inputs = [{"name": name, "shape": [batch, 1, *spec.size], "dtype": "float32"}
              for name in model.input_names]
    if spec.task == "classification":
        outputs = [{"name": "probabilities", "shape": [batch, len(spec.labels)],
                    "dtype": "float32"}]
        if "saliency" in model.output_names:
            outputs.append({"name": "saliency", "shape": [batch, 1, *spec.size],
                            "dtype": "float32"})
    else:
        outputs = [{"name": "probabilities", "shape": [batch, len(spec.labels), *spec.size],
                    "dtype": "float32"}]
    card = ModelCard.from_dict({
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "description": spec.description,
        "inputs": inputs,
        "outputs": outputs,
        "labels": {k: key for k, key in enumerate(spec.labels)},
        "preprocessing": {
            "size": list(spec.size),
            # Physical scale: every radiograph is resampled to this grid from its pixel size
            # (Pixel Spacing / Imager Pixel Spacing and magnification) before the model.
            "grid_mm": spec.grid_mm,
            "field_mm": [round(spec.size[0] * spec.grid_mm, 1), round(spec.size[1] * spec.grid_mm, 1)],
            "placement": ("tiles over the whole image (half overlap), probabilities averaged"
                          if spec.task == "segmentation" else "centred window of the field"),
            "views": list(spec.views),
            "percentiles": [1.0, 99.0],
            **({"local_contrast_mm": spec.local_contrast_mm}
               if phantoms and spec.local_contrast_mm else {}),
            **({"test_time_flip": True} if spec.test_time_flip else {}),
            "range": [0.0, 1.0],
            "photometric": "bone bright: MONOCHROME1 inverted, modality rescale applied",
            "resize": "block mean then bilinear (half-pixel centres) to grid_mm; not imaged: 0",
            "activation": "softmax",
        },
        "weights": weights,
        "intended_use": INTENDED_USE,
        "clinical_use": False,
        # For the torch reference backend (with model.pt beside the ONNX).
        "architecture": dict(weights["architecture"]),
    }, folder)
    card.save(folder)
    return card


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Plan:
    """How many phantoms and steps one run uses; the defaults make the demo weights.

    ``steps`` None: the model's defaults (crop phase included); otherwise that many
    whole-image steps and no crop phase, a negative value ``-e`` meaning ``e`` epochs.
    ``workers``: processes that render the phantoms.
    """

    train_phantoms: int = 240
    heldout_phantoms: int = 100
    seed: int = 20260523
    heldout_seed: int = 90000000
    steps: int | None = None
    workers: int = 1
    #: ``--budget``: "default" (2 CPU cores) or "gpu" (more phantoms, ``steps_factor``
    #: times each model's steps and crop steps; for a CUDA GPU and many cores).
    budget: str = "default"
    steps_factor: int = 1

    @classmethod
    def gpu(cls, seed: int, workers: int) -> Plan:
        return cls(train_phantoms=960, heldout_phantoms=200, seed=seed, workers=workers,
                   budget="gpu", steps_factor=4)


def _progress(enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                    "{task.total}"), TimeRemainingColumn(), disable=not enabled)


def train_recipe(model_name: str, out_dir: Path | None = None, data: Path | None = None,
                 plan: Plan = Plan(), progress: Progress | None = None) -> ModelCard:
    """Train, export and evaluate one model; returns its card (written beside the ONNX)."""
    spec = SPECS[model_name]
    folder = (out_dir or ENGINES_DIR) / spec.name
    started = time.monotonic()
    if data is None:
        train_seeds = [plan.seed + i for i in range(round(plan.train_phantoms * spec.phantom_factor))]
        train = phantom_sets(spec, train_seeds, progress, plan.workers)
        held, mix = validation_sets(spec, plan, progress)
        cohort = f"; {spec.cohort.spacing_mm:g} mm grid"
        if spec.cohort.radiographic_findings:
            cohort += ", radiographic findings only: phantoms.generate(radiographic_findings=True)"
        if spec.cohort.context_share:
            cohort += (f", {spec.cohort.context_share:.0%} drawn with context=True and "
                       "varied_anatomy=True (skull, shoulders, ribs; a 160 x 128 mm field cut "
                       "between skull and T3)")
        if spec.cohort.posterior_share:
            cohort += (f", {spec.cohort.posterior_share:.0%} of those with posterior_detail=True "
                       "(articular pillars, sloping spinous processes)")
        if spec.cohort.faint_airway_share:
            cohort += (f", {spec.cohort.faint_airway_share:.0%} with a faint or no airway "
                       "(airway_hu -900 to 40)")
        if spec.name == GATE_MODEL:
            cohort += (f"; {GATE_FRAMED_SHARE:.0%} of the spine acquisitions collimated on all "
                       "four sides to a field smaller than the window")
        trained_on = (f"synthetic phantoms (spine-node inference.phantoms DRRs, seeds "
                      f"{train_seeds[0]}-{train_seeds[-1]}{cohort}), {spec.copies} randomised "
                      "acquisitions per view (inference.train.xray_augment: detector 0.1-0.2 mm, "
                      "3e2-1e5 photons, scatter, blur, rotation up to 15 degrees, flips, "
                      "patient size, partial coverage, shutters, burned-in markers)")
        evaluated_on = validation_text(spec, plan)
    else:
        load = (load_class_folders if spec.task == "classification"
                else load_segmentation_folders)
        train, held, mix = load(data, "train", spec), load(data, "val", spec), None
        trained_on = f"folder dataset {data.name}/train ({len(train)} samples)"
        evaluated_on = f"folder dataset {data.name}/val"
    steps, crop_steps = plan_steps(spec, plan, len(train), bool(train.body_masks))
    model = train_model(spec, train, plan.seed, steps, progress, crop_steps)
    onnx_path, points, metrics = _export_and_validate(model, spec, folder, held, mix)
    weights = {
        "trained_on": trained_on,
        "recipe": ("spine-node train xray (the gate trains with the family)" if spec.name == GATE_MODEL
                   else f"spine-node train {spec.name}")
                  + (f" --budget {plan.budget}" if plan.budget != "default" else ""),
        "architecture": {"name": spec.architecture, "kwargs": dict(spec.architecture_kwargs)},
        "seed": plan.seed,
        "train_samples": len(train),
        "steps": steps,
        "evaluated_on": evaluated_on,
        "metrics": {key: round(value, 4) for key, value in metrics.items()},
        "framework": f"torch {torch.__version__.split('+')[0]}",
        "sha256": file_sha256(onnx_path),
    }
    if crop_steps:
        weights["crop_steps"] = crop_steps
    if points:
        weights["operating_points"] = points
    limitations = limitations_note(spec, metrics)
    if data is None and spec.cohort.radiographic_findings:
        limitations = " ".join(filter(None, (limitations, RADIOGRAPHIC_LIMITATION)))
    if limitations:
        weights["limitations"] = limitations
    card = write_card(spec, model, folder, weights, phantoms=data is None)
    logger.info("%s: %s in %.0f s", spec.name, weights["metrics"], time.monotonic() - started)
    return card


def _export_and_validate(model: nn.Module, spec: Spec, folder: Path, held: ImageSet,
                         mix: ImageSet | None) -> tuple[Path, dict[str, dict[str, Any]], dict[str, float]]:
    """Export ``model`` (ONNX and state dict) into ``folder`` and measure the export on the
    validation sets: the ONNX path, the operating points chosen and the metrics."""
    onnx_path = folder / "model.onnx"
    export_onnx(model, spec, onnx_path)
    torch.save(model.state_dict(), folder / "model.pt")
    points: dict[str, dict[str, Any]] = {}
    return onnx_path, points, evaluate(spec, onnx_path, held, points, mix)


def _source(folder: Path, spec: Spec) -> dict[str, Any]:
    """What a fine-tune or an average starts from: version, recipe, seed, the hash of its
    weights and what it was itself fine-tuned from."""
    card = ModelCard.load(folder / spec.name)
    found: dict[str, Any] = {"version": card.version, "recipe": card.weights.get("recipe"),
                             "seed": card.weights.get("seed"), "trained_on": card.trained_on,
                             "model_pt_sha256": file_sha256(folder / spec.name / "model.pt")}
    origin = card.weights.get("fine_tuned_from")
    if isinstance(origin, dict):
        found["fine_tuned_from"] = {k: origin[k] for k in ("version", "model_pt_sha256")
                                    if k in origin}
    return found


def _next_minor(versions: Sequence[object]) -> str:
    """One minor version past the highest of ``versions`` (other weights than any of them)."""
    major, minor = max(tuple(int(v) for v in str(version).split(".")[:2]) for version in versions)
    return f"{major}.{minor + 1}.0"


def tune_recipe(model_name: str, out_dir: Path, plan: Plan = Plan(),
                progress: Progress | None = None, init: Path | None = None,
                average: Sequence[Path] = ()) -> ModelCard:
    """A classifier fine-tuned from ``init`` (``--init``: :data:`FINE_TUNE_COHORT`), or
    one whose weights are the mean of the models in ``average`` (``--average``: a "model
    soup" of fine-tunes of one model); then validated, its operating points chosen and
    its card written as training does. The card says what it started from."""
    spec = SPECS[model_name]
    if spec.validation_mix is None:
        raise DatasetError(f"--init and --average are for the X-ray classifiers, not {model_name}")
    if (init is None) == (not average):
        raise ValueError("give one of init (a fine-tune) or average (two or more models)")
    sources = [Path(init)] if init is not None else [Path(a) for a in average]
    for source in sources:
        if not (source / spec.name / "model.pt").is_file():
            raise FileNotFoundError(f"{source}: no {spec.name}/model.pt there")
    found = [_source(source, spec) for source in sources]  # before --out may be overwritten
    states = [torch.load(source / spec.name / "model.pt", map_location="cpu", weights_only=True)
              for source in sources]
    started = time.monotonic()
    extra: dict[str, Any]
    if init is not None:
        tuned = replace(spec, cohort=FINE_TUNE_COHORT, learning_rate=spec.learning_rate / 2)
        count = max(1, round(plan.train_phantoms * spec.phantom_factor) // 2)
        seeds = [plan.seed + FINE_TUNE_SEED_OFFSET + i for i in range(count)]
        train = phantom_sets(tuned, seeds, progress, plan.workers)
        steps, crop_steps = plan_steps(spec, plan, len(train), bool(train.body_masks))
        crop_steps //= 2
        model = train_model(tuned, train, plan.seed, steps, progress, crop_steps,
                            init_state=states[0])
        extra = {"trained_on": (f"synthetic phantoms (spine-node inference.phantoms DRRs, seeds "
                                f"{seeds[0]}-{seeds[-1]}; 1 mm grid, radiographic findings, "
                                "half drawn with context=True and varied_anatomy=True, 60% of "
                                f"those with posterior_detail=True), {spec.copies} randomised "
                                "acquisitions per view (inference.train.xray_augment); "
                                "fine-tuned from fine_tuned_from"),
                 "recipe": f"spine-node train {spec.name} --init {init}",
                 "seed": plan.seed, "train_samples": len(train), "steps": steps,
                 "crop_steps": crop_steps, "learning_rate": tuned.learning_rate,
                 "fine_tuned_from": found[0]}
    else:
        mean = mean_weights(states, [f"{source}: {spec.name}" for source in sources])
        model = architecture(spec.architecture, **spec.architecture_kwargs)
        model.load_state_dict(mean)
        extra = {"trained_on": " + ".join(f"{f['trained_on']} [{f['version']}]" for f in found)
                 + " (the mean of these models' weights, see averaged_from)",
                 "recipe": f"spine-node train {spec.name}" + "".join(f" --average {a}" for a in sources),
                 "averaged_from": found}
    model = model.cpu().eval()
    held, mix = validation_sets(spec, plan, progress)
    folder = out_dir / spec.name
    onnx_path, points, metrics = _export_and_validate(model, spec, folder, held, mix)
    weights = {
        **extra,
        "architecture": {"name": spec.architecture, "kwargs": dict(spec.architecture_kwargs)},
        "evaluated_on": validation_text(spec, plan),
        "metrics": {key: round(value, 4) for key, value in metrics.items()},
        "framework": f"torch {torch.__version__.split('+')[0]}",
        "sha256": file_sha256(onnx_path),
        "operating_points": points,
    }
    limitations = " ".join(filter(None, (limitations_note(spec, metrics), RADIOGRAPHIC_LIMITATION)))
    if limitations:
        weights["limitations"] = limitations
    card = write_card(replace(spec, version=_next_minor([f["version"] for f in found])), model,
                      folder, weights)
    logger.info("%s: %s in %.0f s", spec.name, weights["metrics"], time.monotonic() - started)
    return card


def validation_sets(spec: Spec, plan: Plan, progress: Progress | None = None
                    ) -> tuple[ImageSet, ImageSet | None]:
    """The validation phantoms of ``spec`` and, for a classifier, its second validation set
    (:data:`CONTEXT_VALIDATION_COHORT`; else None)."""
    seeds = [plan.heldout_seed + i for i in range(plan.heldout_phantoms)]
    held = phantom_sets(spec, seeds, progress, plan.workers, copies=1, split=1)
    if spec.validation_mix is None:
        return held, None
    mix = phantom_sets(replace(spec, cohort=spec.validation_mix),
                       [seed + CONTEXT_VALIDATION_OFFSET for seed in seeds], progress, plan.workers,
                       copies=1, split=1)
    return held, mix


def validation_text(spec: Spec, plan: Plan) -> str:
    """The card's ``evaluated_on`` for a model validated on phantoms."""
    first, last = plan.heldout_seed, plan.heldout_seed + plan.heldout_phantoms - 1
    text = (f"validation: held-out synthetic phantoms, seeds {first}-{last}, one randomised "
            "acquisition per view")
    if spec.validation_mix is None:
        return text + "; operating points chosen here (Youden J)"
    mix = spec.validation_mix
    return (text + f"; and {plan.heldout_phantoms} phantoms of a second cohort (seeds "
            f"{first + CONTEXT_VALIDATION_OFFSET}-{last + CONTEXT_VALIDATION_OFFSET}, "
            f"{mix.spacing_mm:g} mm, the same findings, drawn with context=True and "
            f"varied_anatomy=True, {mix.posterior_share:.0%} with posterior_detail=True; "
            "metrics suffixed _context); operating points chosen on both together (the best "
            f"worst-cohort Youden J keeping specificity >= {SPECIFICITY_FLOOR} on each), with the "
            "rates on each in operating_points.<finding>.<view>.parts")


def revalidate(name: str, out_dir: Path, plan: Plan, progress: Progress | None = None) -> ModelCard:
    """``spine-node train <classifier> --validate-only``: run both validation cohorts through
    the classifier already in ``out_dir``, choose its operating points again and write
    them, the validation metrics and the recipe's version into its card. Weights,
    provenance and benchmark figures stay as they are."""
    spec = SPECS[name]
    folder = out_dir / spec.name
    card = ModelCard.load(folder)
    held, mix = validation_sets(spec, plan, progress)
    points: dict[str, dict[str, Any]] = {}
    found = evaluate(spec, folder / "model.onnx", held, points, mix)
    weights = dict(card.weights)
    weights["metrics"] = {key: round(value, 4) for key, value in found.items()}
    weights["operating_points"] = points
    weights["evaluated_on"] = validation_text(spec, plan)
    weights["limitations"] = " ".join(filter(None, (limitations_note(spec, found),
                                                    RADIOGRAPHIC_LIMITATION)))
    weights["revalidated"] = (f"operating points re-chosen by spine-node train {name} "
                              f"--validate-only (recipe version {spec.version}); "
                              f"weights as trained (sha256 unchanged)")
    preprocessing = {k: v for k, v in card.preprocessing.items() if k != "test_time_flip"}
    if spec.test_time_flip:
        preprocessing["test_time_flip"] = True
    card = replace(card, version=spec.version, weights=weights, preprocessing=preprocessing)
    card.save(folder)
    return card


def plan_steps(spec: Spec, plan: Plan, samples: int, body_masks: bool) -> tuple[int, int]:
    """Whole-image and crop-phase steps of ``spec`` under ``plan`` for ``samples``
    training samples (crop phase only for the model's default steps, with body masks)."""
    steps = plan.steps or spec.steps * plan.steps_factor
    if steps < 0:
        steps = max(1, -steps * samples // spec.batch_size)
    crop_steps = spec.crop_steps * plan.steps_factor if plan.steps is None and body_masks else 0
    return steps, crop_steps


def _plan(options: TrainOptions) -> Plan:
    seed, workers = Plan.seed + 10_000 * options.seed, max(1, options.threads)
    plan = Plan.gpu(seed, workers) if options.budget == "gpu" else Plan(seed=seed, workers=workers)
    if options.quick:
        plan = replace(plan, train_phantoms=8, heldout_phantoms=6, steps=4)
    if options.epochs is not None:
        # An epoch here is one pass over the training phantoms' samples.
        plan = replace(plan, steps=-options.epochs)
    return plan


def _run(names: Sequence[str], options: TrainOptions) -> dict[str, Any]:
    if options.validate_only:
        chosen = [n for n in names if SPECS[n].validation_mix is not None]
        if not chosen:
            raise DatasetError(f"--validate-only re-chooses classifier operating points; "
                               f"{', '.join(names)} has none")
        if options.data is not None:
            raise DatasetError("--validate-only runs the phantom validation cohorts; drop --data")
        names = chosen
    tuning = options.init is not None or bool(options.average)
    if tuning and (options.data is not None or options.validate_only or options.epochs is not None):
        raise DatasetError("--init and --average run on phantoms with the recipe's steps: drop "
                           "--data, --epochs and --validate-only")
    if tuning and any(SPECS[n].validation_mix is None for n in names):
        classifiers = ", ".join(n for n, s in SPECS.items() if s.validation_mix is not None)
        raise DatasetError(f"--init and --average are for the X-ray classifiers ({classifiers})")
    torch.set_num_threads(max(1, options.threads))
    plan = _plan(options)
    started = time.monotonic()
    cards: list[str] = []
    metrics: dict[str, float] = {}
    with _progress(options.progress) as progress:
        for name in names:
            if options.validate_only:
                card = revalidate(name, Path(options.out), plan, progress)
            elif tuning:
                card = tune_recipe(name, Path(options.out), plan, progress, options.init,
                                   options.average)
            else:
                card = train_recipe(name, Path(options.out), options.data, plan, progress)
            cards.append(str(card.folder / "model.yaml"))
            metrics.update({f"{name}.{k}": v for k, v in card.weights["metrics"].items()})
    return {"cards": cards, "metrics": metrics, "seconds": round(time.monotonic() - started, 1)}


def run_all(options: TrainOptions) -> dict[str, Any]:
    """``spine-node train xray``: all six X-ray demo models on phantoms."""
    if options.data is not None:
        raise DatasetError("'xray' trains every family on phantoms; give --data to one family")
    return _run(list(SPECS), options)


def run_pair(options: TrainOptions) -> dict[str, Any]:
    return _run([PAIR_MODEL], options)


def run_fracture(options: TrainOptions) -> dict[str, Any]:
    return _run([FRACTURE_MODEL], options)


def run_cspine(options: TrainOptions) -> dict[str, Any]:
    return _run([CSPINE_MODEL], options)


def run_unet_ap(options: TrainOptions) -> dict[str, Any]:
    return _run([UNET_AP_MODEL], options)


def run_unet_lat(options: TrainOptions) -> dict[str, Any]:
    return _run([UNET_LAT_MODEL], options)


def run_tissue(options: TrainOptions) -> dict[str, Any]:
    return _run([TISSUE_MODEL], options)
