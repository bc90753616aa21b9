"""Cervical spine CT fracture pipeline (``ct-cspine-fracture``), two stages.

1. Load the CT series, sort its slices along the slice normal (head first), apply the
   rescale, resample to the segmentation model's grid, normalise, and run stage 1
   (``cspine-ct-vertebra-seg``) for a C1..C7 label map.
2. Crop each vertebra found (bounding box from the stage-1 mask, resampled to a fixed
   grid) and run stage 2 (``cspine-ct-fracture``) over the 7 crops for a fracture
   probability per vertebra and for the patient.

The label map is mapped back onto the source slices, one frame per source instance, so
the SEG encoder can reference them. The preprocessing functions here are shared with the
training recipe (:mod:`spine_node.inference.train.ct`), so training and inference see the same input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from spine_node.inference.errors import PipelineError
from spine_node.inference.findings import Finding, Findings, LabelMap, Segment
from spine_node.inference.pipelines import ModelProvider, engine_card, model_info, register
from spine_node.inference.pixels import check_pixel_data
from spine_node.inference.series import SeriesRef

log = logging.getLogger(__name__)

PIPELINE_NAME = "ct-cspine-fracture"
SEGMENTATION_MODEL = "cspine-ct-vertebra-seg"
FRACTURE_MODEL = "cspine-ct-fracture"
LEVELS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

# Defaults; the model cards' ``preprocessing`` sections override them.
SEGMENTATION_PREPROCESSING: dict[str, Any] = {
    "spacing_mm": [2.0, 2.0, 2.0],
    "hu_window": [-1000.0, 2000.0],
    "hu_scale": 1000.0,
    "pad_multiple": 16,
    "axes": "z head-to-feet, y anterior-to-posterior, x right-to-left",
}
FRACTURE_PREPROCESSING: dict[str, Any] = {
    "crop_shape": [15, 40, 40],
    "crop_margin_mm": 4.0,
    "min_voxels": 20,
    "source": "the stage-1 grid (spacing_mm of cspine-ct-vertebra-seg), normalised like stage 1",
}


# ----------------------------------------------------------------------- loading


@dataclass
class CtVolume:
    """A CT series as a ``(z, y, x)`` HU volume, head first, in canonical orientation.

    ``sop_instance_uids[k]`` is the instance of slice ``k``. ``flip_rows`` /
    ``flip_columns`` say whether the stored pixel rows / columns were reversed to put
    anterior at row 0 and patient right at column 0; :meth:`to_source_frames` undoes it.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    sop_instance_uids: tuple[str, ...]
    study_uid: str
    series_uid: str
    flip_rows: bool = False
    flip_columns: bool = False

    def to_source_frames(self, labels: np.ndarray) -> np.ndarray:
        """A canonical ``(z, y, x)`` array as frames in the stored pixel orientation."""
        out = labels
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_columns:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)


def load_ct_series(files: Sequence[Path]) -> CtVolume:
    """Read a single-frame CT series into a :class:`CtVolume`.

    Raises
    ------
    PipelineError
        No CT slices, mixed series, oblique or non-axial slices, uneven geometry.
    """
    import pydicom

    slices = []
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE_STORAGE:
            raise PipelineError(f"{PIPELINE_NAME}: enhanced (multi-frame) CT is not supported")
        if "PixelData" not in ds or str(ds.get("Modality", "")) != "CT":
            continue
        slices.append(ds)
    if len(slices) < 8:
        raise PipelineError(f"{PIPELINE_NAME}: need at least 8 CT slices, got {len(slices)}")
    series = {str(ds.SeriesInstanceUID) for ds in slices}
    if len(series) != 1:
        raise PipelineError(f"{PIPELINE_NAME}: slices from {len(series)} series")
    first = slices[0]
    try:
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        pixel_spacing = [float(v) for v in first.PixelSpacing]
    except (AttributeError, TypeError, ValueError):
        raise PipelineError(
            f"{PIPELINE_NAME}: slices lack ImageOrientationPatient/PixelSpacing") from None
    row_dir, col_dir = orientation[:3], orientation[3:]
    # Axial only: rows along +-x, columns along +-y (a few degrees of gantry tilt allowed).
    if abs(row_dir[0]) < 0.98 or abs(col_dir[1]) < 0.98:
        raise PipelineError(f"{PIPELINE_NAME}: slices are not axial "
                            f"(ImageOrientationPatient {orientation.round(3).tolist()})")
    normal = np.cross(row_dir, col_dir)
    shape = (int(first.Rows), int(first.Columns))
    for ds in slices:
        other = np.array([float(v) for v in ds.ImageOrientationPatient])
        if np.abs(other - orientation).max() > 1e-3 or (int(ds.Rows), int(ds.Columns)) != shape:
            raise PipelineError(f"{PIPELINE_NAME}: slices differ in orientation or size")
    positions = np.array([np.dot([float(v) for v in ds.ImagePositionPatient], normal)
                          for ds in slices])
    order = np.argsort(positions)
    if normal[2] > 0:  # ascending along +z (feet to head): put the head first
        order = order[::-1]
    slices = [slices[i] for i in order]
    steps = np.abs(np.diff(positions[order]))
    if steps.min() <= 1e-3:
        raise PipelineError(f"{PIPELINE_NAME}: two slices share a position")
    spacing_z = float(np.median(steps))
    if steps.max() > 1.5 * spacing_z:
        log.warning("CT series %s has uneven slice spacing (%.2f..%.2f mm); resampling "
                    "assumes %.2f mm", first.SeriesInstanceUID, steps.min(), steps.max(),
                    spacing_z)
    check_pixel_data(slices, PIPELINE_NAME)  # declared sizes and pixel budget, before decoding
    hu = np.empty((len(slices), *shape), dtype=np.float32)
    for k, ds in enumerate(slices):
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu[k] = ds.pixel_array.astype(np.float32) * slope + intercept
    flip_rows, flip_columns = bool(col_dir[1] < 0), bool(row_dir[0] < 0)
    if flip_rows:
        hu = hu[:, ::-1, :]
    if flip_columns:
        hu = hu[:, :, ::-1]
    return CtVolume(
        hu=np.ascontiguousarray(hu),
        spacing=(spacing_z, pixel_spacing[0], pixel_spacing[1]),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in slices),
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        flip_rows=flip_rows,
        flip_columns=flip_columns,
    )


# ------------------------------------------------------------------ preprocessing


def resample(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float],
             order: int = 1) -> np.ndarray:
    """Resample ``volume`` from ``spacing`` to ``target`` (mm); voxel centres kept aligned."""
    if np.allclose(spacing, target):
        return volume
    shape = [max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, spacing, target,
                                                               strict=True)]
    return _sample_grid(volume, spacing, target, shape, order)


def _sample_grid(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float],
                 shape: Sequence[int], order: int) -> np.ndarray:
    axes = [np.clip((np.arange(n) + 0.5) * t / s - 0.5, 0, m - 1)
            for n, t, s, m in zip(shape, target, spacing, volume.shape, strict=True)]
    if order == 0:
        idx = [np.rint(a).astype(np.intp) for a in axes]
        return volume[np.ix_(*idx)]
    # Separable linear interpolation, one axis at a time (cheaper than map_coordinates).
    out = volume.astype(np.float32, copy=False)
    for axis, coords in enumerate(axes):
        lo = np.floor(coords).astype(np.intp)
        hi = np.minimum(lo + 1, volume.shape[axis] - 1)
        w = (coords - lo).astype(np.float32)
        shape_w = [1, 1, 1]
        shape_w[axis] = -1
        w = w.reshape(shape_w)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def labels_to_source(labels: np.ndarray, model_spacing: Sequence[float],
                     source_spacing: Sequence[float],
                     source_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour map of a model-grid label map back onto the source grid."""
    if tuple(labels.shape) == tuple(source_shape) and np.allclose(model_spacing, source_spacing):
        return labels
    return _sample_grid(labels, model_spacing, source_spacing, source_shape, order=0)


def normalise(hu: np.ndarray, preprocessing: dict[str, Any] | None = None) -> np.ndarray:
    """Clip to the HU window and scale, as the stage-1 card says."""
    pre = {**SEGMENTATION_PREPROCESSING, **(preprocessing or {})}
    low, high = (float(v) for v in pre["hu_window"])
    return (np.clip(hu, low, high) / float(pre["hu_scale"])).astype(np.float32)


def pad_to_multiple(image: np.ndarray, multiple: int,
                    value: float) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad at the far end of each axis; returns the padded array and the slices to undo it."""
    pads = [(0, (-n) % multiple) for n in image.shape]
    padded = np.pad(image, pads, constant_values=value)
    return padded, tuple(slice(0, n) for n in image.shape)


def vertebra_crops(
    image: np.ndarray,
    labels: np.ndarray,
    crop_shape: Sequence[int] = (15, 40, 40),
    margin_vox: Sequence[float] = (2.0, 2.0, 2.0),
    min_voxels: int = 20,
    rng: np.random.Generator | None = None,
    background: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One crop per vertebra C1..C7 around its bounding box in ``labels``.

    Each crop covers the vertebra's bounding box plus ``margin_vox`` voxels and is
    resampled (linear) to ``crop_shape``, so vertebrae of every size fill their crop.
    ``rng`` jitters box centre and size (training augmentation). Returns the crops
    ``(7, D, H, W)`` (zeros where a vertebra is missing) and a boolean ``present`` (7,).
    """
    crops = np.zeros((len(LEVELS), *crop_shape), dtype=np.float32)
    present = np.zeros(len(LEVELS), dtype=bool)
    fill = float(image.min()) if background is None else background
    boxes = ndimage.find_objects(labels.astype(np.int32), max_label=len(LEVELS))
    for index, box in enumerate(boxes):
        if box is None:
            continue
        level = index + 1
        if int((labels[box] == level).sum()) < min_voxels:
            continue
        lo = np.array([s.start for s in box], dtype=np.float64)
        hi = np.array([s.stop - 1 for s in box], dtype=np.float64)
        centre = (lo + hi) / 2
        half = (hi - lo) / 2 + 0.5 + np.asarray(margin_vox, dtype=np.float64)
        if rng is not None:
            centre = centre + rng.normal(0.0, 0.06, size=3) * half
            half = half * rng.uniform(0.92, 1.08, size=3)
        grids = [np.linspace(c - h, c + h, n) for c, h, n in zip(centre, half, crop_shape,
                                                                 strict=True)]
        coords = np.meshgrid(*grids, indexing="ij")
        crops[index] = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=fill)
        present[index] = True
    return crops, present


def clean_labels(labels: np.ndarray, keep_fraction: float = 0.1) -> np.ndarray:
    """Drop small islands of each label (< ``keep_fraction`` of its largest piece)."""
    out = labels.copy()
    for level in range(1, len(LEVELS) + 1):
        mask = labels == level
        if not mask.any():
            continue
        pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        if count <= 1:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        small = np.nonzero(sizes < keep_fraction * sizes.max())[0] + 1
        out[np.isin(pieces, small)] = 0
    return out


# ----------------------------------------------------------------------- pipeline


def _single_output(outputs: dict[str, np.ndarray], card: Any) -> np.ndarray:
    name = card.outputs[0].name
    if name not in outputs:
        raise PipelineError(f"{PIPELINE_NAME}: model {card.name} returned no output {name!r}")
    return np.asarray(outputs[name])


def segment(engine: object,
            volume: CtVolume) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Stage 1: returns (labels on the model grid, normalised model-grid image, spacing)."""
    card = engine_card(engine)
    pre = {**SEGMENTATION_PREPROCESSING, **card.preprocessing}
    spacing = tuple(float(s) for s in pre["spacing_mm"])
    image = normalise(resample(volume.hu, volume.spacing, spacing), pre)
    low = float(pre["hu_window"][0]) / float(pre["hu_scale"])
    padded, unpad = pad_to_multiple(image, int(pre["pad_multiple"]), low)
    outputs = engine.infer({card.inputs[0].name: padded[None, None]})  # type: ignore[attr-defined]
    logits = _single_output(outputs, card)
    labels = np.argmax(logits[0], axis=0).astype(np.uint8)[unpad]
    return clean_labels(labels), image, spacing


def classify(engine: object, image: np.ndarray,
             labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: returns (probabilities C1..C7 then patient, vertebra present flags)."""
    card = engine_card(engine)
    pre = {**FRACTURE_PREPROCESSING, **card.preprocessing}
    spacing = np.asarray(pre.get("spacing_mm", SEGMENTATION_PREPROCESSING["spacing_mm"]), float)
    crops, present = vertebra_crops(
        image, labels, crop_shape=tuple(int(n) for n in pre["crop_shape"]),
        margin_vox=float(pre["crop_margin_mm"]) / spacing, min_voxels=int(pre["min_voxels"]),
    )
    outputs = engine.infer({card.inputs[0].name: crops[None]})  # type: ignore[attr-defined]
    return _single_output(outputs, card)[0].astype(np.float64), present


@register(PIPELINE_NAME)
class CervicalSpineCtFracture:
    """DICOM CT series in, C1..C7 masks and fracture probabilities out."""

    name = PIPELINE_NAME
    model_names = (SEGMENTATION_MODEL, FRACTURE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        if len(inputs) != 1:
            raise PipelineError(f"{PIPELINE_NAME} takes one CT series, got {len(inputs)}")
        ref = inputs[0]
        files = ref.files()
        if not files:
            raise PipelineError(f"{PIPELINE_NAME}: no instances in {ref.path}")
        volume = load_ct_series(files)
        segmenter = models(SEGMENTATION_MODEL)
        classifier = models(FRACTURE_MODEL)
        labels, image, model_spacing = segment(segmenter, volume)
        probabilities, present = classify(classifier, image, labels)
        source_labels = labels_to_source(labels, model_spacing, volume.spacing, volume.hu.shape)
        frames = volume.to_source_frames(source_labels)
        found = [i + 1 for i in range(len(LEVELS)) if present[i] and (frames == i + 1).any()]
        # A level stage 2 did not keep (too few voxels for a crop) leaves the label map too:
        # every label in the SEG has a segment and a finding.
        frames = np.where(np.isin(frames, found), frames, 0)
        missing = [LEVELS[i] for i in range(len(LEVELS)) if i + 1 not in found]
        if missing:
            log.info("series %s: no %s found by stage 1", volume.series_uid, ",".join(missing))
        findings = [
            Finding(kind="fracture", probability=float(probabilities[label - 1]),
                    site=LEVELS[label - 1], segment_label=label)
            for label in found
        ]
        findings.append(Finding(kind="fracture", probability=float(probabilities[len(LEVELS)])))
        seg_info, fracture_info = model_info(segmenter), model_info(classifier)
        return Findings(
            pipeline=PIPELINE_NAME,
            model=fracture_info,
            study_uid=volume.study_uid,
            series_uids=(volume.series_uid,),
            source_sop_instance_uids=volume.sop_instance_uids,
            findings=findings,
            segmentation=LabelMap(
                labels=frames.astype(np.uint8),
                source_sop_instance_uids=volume.sop_instance_uids,
                segments=tuple(Segment(label, LEVELS[label - 1]) for label in found),
            ) if found else None,
            models=(seg_info, fracture_info),
        )
