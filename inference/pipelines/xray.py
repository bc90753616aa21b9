"""Spine radiograph pipelines: DICOM DX/CR images in, :class:`Findings` out.

Registered names (the default routes use them):

``xray-fracture``
    MobileNet-style fracture / normal classifier, one finding ``fracture``.
``xray-cspine-classify``
    Cervical normal / fracture / dislocation with a class-activation saliency map
    (findings ``fracture`` and ``dislocation`` plus a probability map).
``xray-spine-seg``
    U-Net segmentation; the AP or the LAT model is picked from ViewPosition.
``xray-tissue-seg``
    XNet-style tissue segmentation: bone, soft tissue, open beam.
``xray-pair-classify``
    Damaged / normal spine from the AP and the LAT image of one study (finding ``damage``).

Preprocessing is numpy only (no torch, no scipy) and shared with the training recipes, so
the models see the same pixels in training and in production: modality rescale,
MONOCHROME1 inverted so bone is bright, a percentile window to [0, 1], then an
area-then-bilinear resize to the model's input size. Masks and maps are resized back
(bilinear on class probabilities, then arg-max) to each source image's own grid.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from spine_node.inference.errors import PipelineError
from spine_node.inference.findings import Finding, Findings, LabelMap, ProbabilityMap, Segment
from spine_node.inference.pipelines import ModelProvider, engine_card, model_info, register
from spine_node.inference.pixels import check_pixel_data
from spine_node.inference.series import SeriesRef

logger = logging.getLogger(__name__)

#: Structure keys of each segmentation model, in output-channel order.
AP_STRUCTURES = ("vertebral_body", "pedicle", "spinous_process")
LAT_STRUCTURES = ("vertebral_body", "posterior_elements", "intervertebral_disc",
                  "spinal_canal", "prevertebral_soft_tissue")
TISSUES = ("bone", "soft_tissue", "open_beam")

#: Model names in ``engines/``.
PAIR_MODEL = "xray-pair-classifier"
FRACTURE_MODEL = "xray-fracture-mobilenet"
CSPINE_MODEL = "xray-cspine-classifier"
UNET_AP_MODEL = "xray-spine-unet-ap"
UNET_LAT_MODEL = "xray-spine-unet-lat"
TISSUE_MODEL = "xray-tissue-xnet"

_AP_VIEWS = frozenset({"AP", "PA"})
_LAT_VIEWS = frozenset({"LAT", "LL", "RL", "LATERAL", "RLD", "LLD"})

DEFAULT_PERCENTILES = (1.0, 99.0)


# --------------------------------------------------------------------------- pixels


def normalise_window(image: np.ndarray,
                     percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Map the ``percentiles`` window of ``image`` linearly to [0, 1] (float32, clipped)."""
    values = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(values, percentiles)
    if not np.isfinite(low) or not np.isfinite(high) or high - low < 1e-6:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _linear_axis(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for half-pixel-centred linear interpolation along one axis."""
    position = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    position = np.clip(position, 0.0, source - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, source - 1)
    return lower, upper, (position - lower).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes of ``image`` to ``size`` (rows, columns).

    When shrinking by two or more, whole blocks are averaged first (area), so a large
    radiograph is not aliased; then bilinear interpolation with half-pixel centres (the
    same as ``torch.nn.functional.interpolate(..., align_corners=False)``).
    """
    values = np.asarray(image, dtype=np.float32)
    rows, cols = values.shape[-2:]
    factor_r, factor_c = max(rows // size[0], 1), max(cols // size[1], 1)
    if factor_r > 1 or factor_c > 1:
        rows_c, cols_c = rows // factor_r * factor_r, cols // factor_c * factor_c
        values = values[..., :rows_c, :cols_c]
        values = values.reshape(*values.shape[:-2], rows_c // factor_r, factor_r,
                                cols_c // factor_c, factor_c).mean(axis=(-3, -1))
        rows, cols = values.shape[-2:]
    if (rows, cols) == tuple(size):
        return np.ascontiguousarray(values, dtype=np.float32)
    r0, r1, wr = _linear_axis(rows, size[0])
    c0, c1, wc = _linear_axis(cols, size[1])
    wr = wr[:, None]
    top = values[..., r0, :] * (1 - wr) + values[..., r1, :] * wr
    return (top[..., c0] * (1 - wc) + top[..., c1] * wc).astype(np.float32)


def prepare_radiograph(pixels: np.ndarray, size: tuple[int, int],
                       percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Model input ``(rows, columns)`` float32 in [0, 1] from a bone-bright image.

    The training recipes call this on DRRs, the pipelines on decoded DICOM pixels.
    """
    return resize_bilinear(normalise_window(pixels, percentiles), size)


@dataclass(frozen=True)
class Radiograph:
    """One decoded projection image and what identifies it."""

    pixels: np.ndarray  # float32 (rows, columns), bone bright (MONOCHROME2 sense)
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    view_position: str
    instance_number: int

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))


def read_radiograph(path: Path) -> Radiograph:
    """Decode a single-frame greyscale radiograph with the modality rescale applied.

    MONOCHROME1 images are inverted so that high attenuation (bone) is always bright.
    """
    try:
        ds = pydicom.dcmread(path)
        check_pixel_data([ds], path.name)  # declared sizes and pixel budget, before decoding
        raw = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or undecodable files
        raise PipelineError(f"cannot decode radiograph {path.name}: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PipelineError(f"{path.name}: photometric interpretation {photometric!r} is not "
                            "supported; expected MONOCHROME1 or MONOCHROME2")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1 or raw.ndim != 2:
        raise PipelineError(f"{path.name}: expected one 2-D frame, got shape {raw.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pixels = raw.astype(np.float32) * slope + intercept
    if photometric == "MONOCHROME1":
        pixels = -pixels
    return Radiograph(
        pixels=pixels,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        view_position=str(ds.get("ViewPosition", "") or "").strip().upper(),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
    )


def read_series(series: SeriesRef) -> list[Radiograph]:
    """All images of ``series`` sorted by instance number (then SOP Instance UID)."""
    files = series.files()
    if not files:
        raise PipelineError(f"series {series.series_uid} has no instances in {series.path}")
    images = [read_radiograph(path) for path in files]
    images.sort(key=lambda image: (image.instance_number, image.sop_instance_uid))
    return images


def view_of(image: Radiograph, fallback: str = "") -> str:
    """``"AP"`` or ``"LAT"`` from ViewPosition (the series' as fallback), else ``""``."""
    for view in (image.view_position, fallback.strip().upper()):
        if view in _AP_VIEWS:
            return "AP"
        if view in _LAT_VIEWS:
            return "LAT"
    return ""


# --------------------------------------------------------------------------- models


def _input_size(card: Any) -> tuple[int, int]:
    size = card.preprocessing.get("size")
    if not (isinstance(size, list | tuple) and len(size) == 2):
        raise PipelineError(f"model card {card.name}: preprocessing.size must be [rows, columns]")
    return (int(size[0]), int(size[1]))


def _percentiles(card: Any) -> tuple[float, float]:
    low, high = card.preprocessing.get("percentiles", DEFAULT_PERCENTILES)
    return (float(low), float(high))


def _batch(engine: Any, images: Sequence[Radiograph]) -> np.ndarray:
    card = engine_card(engine)
    size, percentiles = _input_size(card), _percentiles(card)
    return np.stack([prepare_radiograph(image.pixels, size, percentiles)[None]
                     for image in images]).astype(np.float32)


def _infer(engine: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return dict(engine.infer(dict(inputs)))
    except PipelineError:
        raise
    except Exception as exc:  # a backend failure becomes a pipeline error with its reason
        raise PipelineError(f"model {engine_card(engine).name} failed: {exc}") from exc


def _class_index(card: Any, key: str) -> int:
    for index, name in card.labels.items():
        if name == key:
            return int(index)
    raise PipelineError(f"model card {card.name} has no class {key!r} in its labels")


def _findings(pipeline: str, engine: Any, images: Sequence[Radiograph],
              extra_models: Sequence[Any] = ()) -> Findings:
    first = images[0]
    infos = tuple(model_info(e) for e in (engine, *extra_models))
    return Findings(
        pipeline=pipeline,
        model=infos[0],
        study_uid=first.study_uid,
        series_uids=tuple(dict.fromkeys(image.series_uid for image in images)),
        source_sop_instance_uids=tuple(image.sop_instance_uid for image in images),
        models=infos,
    )


def _only_series(inputs: Sequence[SeriesRef], pipeline: str) -> SeriesRef:
    if not inputs:
        raise PipelineError(f"{pipeline}: no input series")
    return inputs[0]


# --------------------------------------------------------------------------- pipelines


class FracturePipeline:
    """MobileNet fracture classifier; a series with several images reports the highest."""

    name = "xray-fracture"
    model_names = (FRACTURE_MODEL,)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        engine = models(FRACTURE_MODEL)
        card = engine_card(engine)
        probabilities = _infer(engine, {"image": _batch(engine, images)})["probabilities"]
        fracture = float(probabilities[:, _class_index(card, "fracture")].max())
        result = _findings(self.name, engine, images)
        result.findings.append(Finding(kind="fracture", probability=fracture))
        logger.info("xray-fracture series %s: p(fracture)=%.3f", images[0].series_uid, fracture)
        return result


class CSpineClassifyPipeline:
    """Cervical normal / fracture / dislocation with the model's saliency map."""

    name = "xray-cspine-classify"
    model_names = (CSPINE_MODEL,)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        _require_one_grid(images, self.name)
        engine = models(CSPINE_MODEL)
        card = engine_card(engine)
        outputs = _infer(engine, {"image": _batch(engine, images)})
        probabilities, saliency = outputs["probabilities"], outputs["saliency"]
        result = _findings(self.name, engine, images)
        for kind in ("fracture", "dislocation"):
            result.findings.append(Finding(
                kind=kind, probability=float(probabilities[:, _class_index(card, kind)].max())))
        maps = resize_bilinear(saliency[:, 0], images[0].shape)
        result.probability_map = ProbabilityMap(
            values=np.clip(maps, 0.0, 1.0).astype(np.float32),
            source_sop_instance_uids=result.source_sop_instance_uids,
            name="saliency",
        )
        return result


def _require_one_grid(images: Sequence[Radiograph], pipeline: str) -> None:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise PipelineError(f"{pipeline}: images of one series differ in size {sorted(shapes)}; "
                            "one label map needs one grid")


def _label_map(probabilities: np.ndarray, images: Sequence[Radiograph], card: Any) -> LabelMap:
    """Label frames on the source grid from softmax outputs ``(N, C, h, w)``.

    The class probabilities are resized to each image's grid and the arg-max taken there,
    so the boundaries are as fine as the upsampled probabilities allow. A card whose class
    0 is ``background`` labels structures 1..C-1; otherwise class k becomes label k + 1
    (every pixel belongs to a structure, as with tissue classes).
    """
    names = [card.labels[k] for k in sorted(card.labels)]
    full = resize_bilinear(probabilities, images[0].shape)
    winner = np.argmax(full, axis=1)
    if names[0] == "background":
        labels, segments = winner, names[1:]
    else:
        labels, segments = winner + 1, names
    return LabelMap(
        labels=labels.astype(np.uint8),
        source_sop_instance_uids=tuple(image.sop_instance_uid for image in images),
        segments=tuple(Segment(label=k + 1, name=name) for k, name in enumerate(segments)),
    )


class SpineSegPipeline:
    """U-Net spine structures; the AP or LAT model is chosen from ViewPosition."""

    name = "xray-spine-seg"
    model_names = (UNET_AP_MODEL, UNET_LAT_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = _only_series(inputs, self.name)
        images = read_series(series)
        _require_one_grid(images, self.name)
        views = {view_of(image, series.view_position) for image in images}
        if "" in views:
            raise PipelineError(
                f"{self.name}: series {series.series_uid} has an image without a ViewPosition "
                "of AP/PA or LAT/LL/RL; cannot pick the AP or the LAT model")
        if len(views) > 1:
            raise PipelineError(f"{self.name}: series {series.series_uid} mixes AP and LAT images")
        engine = models(UNET_AP_MODEL if views == {"AP"} else UNET_LAT_MODEL)
        probabilities = _infer(engine, {"image": _batch(engine, images)})["probabilities"]
        result = _findings(self.name, engine, images)
        result.segmentation = _label_map(probabilities, images, engine_card(engine))
        return result


class TissueSegPipeline:
    """XNet tissue classes: every pixel is bone, soft tissue or open beam."""

    name = "xray-tissue-seg"
    model_names = (TISSUE_MODEL,)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        _require_one_grid(images, self.name)
        engine = models(TISSUE_MODEL)
        probabilities = _infer(engine, {"image": _batch(engine, images)})["probabilities"]
        result = _findings(self.name, engine, images)
        result.segmentation = _label_map(probabilities, images, engine_card(engine))
        return result


class PairClassifyPipeline:
    """Damaged / normal from the AP and the LAT image of one study (all its series)."""

    name = "xray-pair-classify"
    model_names = (PAIR_MODEL,)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        if not inputs:
            raise PipelineError(f"{self.name}: no input series")
        by_view: dict[str, Radiograph] = {}
        for series in inputs:
            for image in read_series(series):
                by_view.setdefault(view_of(image, series.view_position), image)
        missing = [view for view in ("AP", "LAT") if view not in by_view]
        if missing:
            raise PipelineError(
                f"{self.name}: study {inputs[0].study_uid} has no {' and no '.join(missing)} "
                f"image (ViewPosition AP/PA and LAT/LL/RL needed) among {len(inputs)} series")
        ap, lat = by_view["AP"], by_view["LAT"]
        engine = models(PAIR_MODEL)
        card = engine_card(engine)
        outputs = _infer(engine, {"ap": _batch(engine, [ap]), "lat": _batch(engine, [lat])})
        damage = float(outputs["probabilities"][0, _class_index(card, "damage")])
        result = _findings(self.name, engine, [ap, lat])
        result.findings.append(Finding(kind="damage", probability=damage))
        return result


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (weights identity in model cards)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


register(FracturePipeline.name)(FracturePipeline)
register(CSpineClassifyPipeline.name)(CSpineClassifyPipeline)
register(SpineSegPipeline.name)(SpineSegPipeline)
register(TissueSegPipeline.name)(TissueSegPipeline)
register(PairClassifyPipeline.name)(PairClassifyPipeline)
