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
MONOCHROME1 inverted so bone is bright, the model's millimetre grid, a percentile window to
[0, 1] and, for models whose card asks for it (``preprocessing.local_contrast_mm``), local
contrast normalisation (:func:`local_contrast`). Masks and maps are resized back
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
from spine_node.inference.findings import (
    AssessmentValues,
    Finding,
    Findings,
    LabelMap,
    ProbabilityMap,
    Segment,
    SiteStatus,
)
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
GATE_MODEL = "xray-view-gate"

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


#: Pixel size assumed (mm, at the patient) when a file states none; the SR says so.
ASSUMED_SPACING_MM = 0.15


def sample_bilinear(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``values[..., r, c]`` at fractional pixel-centre coordinates (edges clamped)."""
    h, w = values.shape[-2:]
    r = np.clip(rows, 0.0, h - 1)
    c = np.clip(cols, 0.0, w - 1)
    r0 = np.floor(r).astype(np.int64)
    c0 = np.floor(c).astype(np.int64)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    wr = (r - r0).astype(np.float32)[:, None]
    wc = (c - c0).astype(np.float32)[None, :]
    top = values[..., r0, :] * (1 - wr) + values[..., r1, :] * wr
    return (top[..., c0] * (1 - wc) + top[..., c1] * wc).astype(np.float32)


@dataclass(frozen=True)
class Grid:
    """A source image's pixels and the model's millimetre grid laid over the same field.

    The canvas covers the source field from its top-left corner: canvas pixel ``k`` spans
    ``[k * grid_mm, (k + 1) * grid_mm)`` mm, source pixel ``i`` spans
    ``[i * spacing, (i + 1) * spacing)`` mm, per axis, so non-square pixels and odd sizes
    map exactly both ways (:func:`to_canvas`, :func:`from_canvas`).
    """

    source_shape: tuple[int, int]
    spacing_mm: tuple[float, float]
    grid_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(max(1, round(n * s / self.grid_mm))  # type: ignore[return-value]
                     for n, s in zip(self.source_shape, self.spacing_mm, strict=True))

    @property
    def field_mm(self) -> tuple[float, float]:
        return (self.source_shape[0] * self.spacing_mm[0], self.source_shape[1] * self.spacing_mm[1])


def to_canvas(pixels: np.ndarray, grid: Grid) -> np.ndarray:
    """Resample ``pixels`` onto ``grid``'s millimetre canvas (block mean, then bilinear)."""
    values = np.asarray(pixels, dtype=np.float32)
    spacing = list(grid.spacing_mm)
    factors = [max(1, int(grid.grid_mm / s + 1e-6)) for s in spacing]
    if max(factors) > 1:  # average whole blocks first so a fine detector is not aliased
        fr, fc = factors
        rows, cols = values.shape[0] // fr * fr, values.shape[1] // fc * fc
        values = values[:rows, :cols].reshape(rows // fr, fr, cols // fc, fc).mean(axis=(1, 3))
        spacing = [spacing[0] * fr, spacing[1] * fc]
    out_rows, out_cols = grid.shape
    r = (np.arange(out_rows) + 0.5) * grid.grid_mm / spacing[0] - 0.5
    c = (np.arange(out_cols) + 0.5) * grid.grid_mm / spacing[1] - 0.5
    return sample_bilinear(values, r, c)


def from_canvas(planes: np.ndarray, grid: Grid) -> np.ndarray:
    """Canvas planes ``(..., rows, cols)`` sampled back at every source pixel centre."""
    r = (np.arange(grid.source_shape[0]) + 0.5) * grid.spacing_mm[0] / grid.grid_mm - 0.5
    c = (np.arange(grid.source_shape[1]) + 0.5) * grid.spacing_mm[1] / grid.grid_mm - 0.5
    return sample_bilinear(planes, r, c)


def window(image: np.ndarray, valid: np.ndarray | None = None,
           percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
           contrast_px: float | None = None) -> np.ndarray:
    """:func:`normalise_window` over the ``valid`` pixels; the rest (not imaged) become 0.

    With ``contrast_px`` the windowed image then goes through :func:`local_contrast` with
    that Gaussian sigma (in pixels of ``image``).
    """
    values = np.asarray(image, dtype=np.float32)
    if valid is None or valid.all():
        out = normalise_window(values, percentiles)
        valid = np.ones(values.shape, dtype=bool)
    else:
        out = np.zeros(values.shape, dtype=np.float32)
        if valid.sum() < 16:
            return out
        low, high = np.percentile(values[valid], percentiles)
        if high - low > 1e-6:
            out[valid] = np.clip((values[valid] - low) / (high - low), 0.0, 1.0)
    if contrast_px:
        out = local_contrast(out, valid, contrast_px)
    return out


def _gaussian_blur(values: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D image, zeros outside it (numpy only)."""
    radius = max(1, int(3.0 * sigma_px + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma_px) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(values, dtype=np.float32)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(out, pad), kernel.size,
                                                           axis=axis)
        out = windows @ kernel
    return out.astype(np.float32)


#: :func:`local_contrast` maps a pixel ``z`` local standard deviations above its local
#: mean to ``0.5 + z / LOCAL_CONTRAST_SPAN`` (clipped to [0, 1]).
LOCAL_CONTRAST_SPAN = 5.0
#: Floor of the local variance (windowed units): flat areas are not blown up into noise.
LOCAL_CONTRAST_FLOOR = 1e-4


def local_contrast(image: np.ndarray, valid: np.ndarray, sigma_px: float) -> np.ndarray:
    """Local contrast normalisation of a windowed image: each imaged pixel minus its
    Gaussian-weighted local mean (sigma ``sigma_px``), divided by the local standard
    deviation, mapped to [0, 1] around 0.5; pixels not imaged stay 0.

    What a radiograph's own processing does (unsharp masking): the smooth thickness of the
    neck and the exposure drop out and the cortical edges, end plates and steps of the
    column keep the same contrast whatever the patient size, dose or field. Means and
    spreads are normalised by the imaged part of each neighbourhood, so the edge of a
    collimated or trimmed field is not an edge.
    """
    mask = np.asarray(valid, dtype=np.float32)
    values = np.asarray(image, dtype=np.float32) * mask
    weight = _gaussian_blur(mask, sigma_px) + 1e-6
    mean = _gaussian_blur(values, sigma_px) / weight
    detail = (values - mean) * mask
    spread = np.sqrt(_gaussian_blur(detail * detail, sigma_px) / weight + LOCAL_CONTRAST_FLOOR)
    return (np.clip(0.5 + detail / spread / LOCAL_CONTRAST_SPAN, 0.0, 1.0) * mask).astype(np.float32)


def place(canvas: np.ndarray, size: tuple[int, int], origin: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` window of ``canvas`` at ``origin`` (may reach outside) and its valid mask."""
    out = np.zeros(size, dtype=np.float32)
    valid = np.zeros(size, dtype=bool)
    r0, c0 = origin
    rs, re = max(r0, 0), min(r0 + size[0], canvas.shape[0])
    cs, ce = max(c0, 0), min(c0 + size[1], canvas.shape[1])
    if re > rs and ce > cs:
        out[rs - r0:re - r0, cs - c0:ce - c0] = canvas[rs:re, cs:ce]
        valid[rs - r0:re - r0, cs - c0:ce - c0] = True
    return out, valid


def centre_origin(canvas_shape: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """Origin of the ``size`` window centred on the canvas (negative: the canvas is smaller)."""
    return ((canvas_shape[0] - size[0]) // 2, (canvas_shape[1] - size[1]) // 2)


def tile_origins(extent: int, size: int) -> list[int]:
    """Window starts that cover ``extent`` with ``size`` windows overlapping by about half."""
    if extent <= size:
        return [(extent - size) // 2]
    count = int(np.ceil((extent - size) / (size / 2))) + 1
    return sorted({round(v) for v in np.linspace(0, extent - size, count)})


def model_window(pixels: np.ndarray, grid: Grid, size: tuple[int, int],
                 percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
                 contrast_px: float | None = None) -> np.ndarray:
    """What a classifier sees: the centred ``size`` window of the mm canvas, windowed."""
    canvas = to_canvas(pixels, grid)
    image, valid = place(canvas, size, centre_origin(canvas.shape, size))
    return window(image, valid, percentiles, contrast_px)


@dataclass(frozen=True)
class Radiograph:
    """One decoded projection image and what identifies it."""

    pixels: np.ndarray  # float32 (rows, columns), bone bright (MONOCHROME2 sense)
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    view_position: str
    instance_number: int
    #: (row, column) pixel size at the patient in mm, and where it came from
    spacing_mm: tuple[float, float] = (ASSUMED_SPACING_MM, ASSUMED_SPACING_MM)
    spacing_source: str = "assumed"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[0]), int(self.pixels.shape[1]))

    def grid(self, grid_mm: float) -> Grid:
        return Grid(self.shape, self.spacing_mm, grid_mm)


def _pair(value: Any) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (0.01 <= row <= 5.0 and 0.01 <= col <= 5.0):
        return None
    return (row, col)


def pixel_spacing(ds: Any) -> tuple[tuple[float, float], str]:
    """Pixel size at the patient ``(row, column)`` mm and its source.

    A calibrated Pixel Spacing (Pixel Spacing Calibration Type present) wins; otherwise
    Imager Pixel Spacing (at the detector) divided by the Estimated Radiographic
    Magnification Factor when the file has one; otherwise Pixel Spacing as given;
    otherwise :data:`ASSUMED_SPACING_MM` with source ``"assumed"``.
    """
    spacing = _pair(ds.get("PixelSpacing"))
    if spacing and ds.get("PixelSpacingCalibrationType"):
        return spacing, "PixelSpacing (calibrated)"
    imager = _pair(ds.get("ImagerPixelSpacing"))
    if imager:
        try:
            magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 1) or 1)
        except (TypeError, ValueError):
            magnification = 1.0
        if not 0.5 <= magnification <= 3.0:
            magnification = 1.0
        source = ("ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
                  if magnification != 1.0 else "ImagerPixelSpacing")
        return (imager[0] / magnification, imager[1] / magnification), source
    if spacing:
        return spacing, "PixelSpacing"
    return (ASSUMED_SPACING_MM, ASSUMED_SPACING_MM), "assumed"


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
    spacing, source = pixel_spacing(ds)
    return Radiograph(
        pixels=pixels,
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        view_position=str(ds.get("ViewPosition", "") or "").strip().upper(),
        instance_number=int(ds.get("InstanceNumber", 0) or 0),
        spacing_mm=spacing,
        spacing_source=source,
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


def _card_mm(card: Any, key: str, meaning: str, low: float, high: float) -> float | None:
    """The length in mm the card's ``preprocessing[key]`` states, checked to lie in
    ``[low, high]``; None when the card has none."""
    value = card.preprocessing.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PipelineError(f"model card {card.name}: preprocessing.{key} must be {meaning} in "
                            f"mm, got {value!r}") from None
    if not low <= number <= high:
        raise PipelineError(f"model card {card.name}: preprocessing.{key} {number} is not a "
                            f"plausible {meaning} ({low:g}-{high:g} mm)")
    return number


def _grid_mm(card: Any) -> float | None:
    """The model's pixel size in mm; None for a card without one (an imported model made
    for whole images resized to its input: the pipelines then do exactly that)."""
    return _card_mm(card, "grid_mm", "pixel size", 0.05, 10.0)


def _contrast_px(card: Any, grid_mm: float | None) -> float | None:
    """Sigma of :func:`local_contrast` in model pixels: the card's
    ``preprocessing.local_contrast_mm`` on its grid; None (no local contrast) for a card
    without either."""
    sigma_mm = _card_mm(card, "local_contrast_mm", "local contrast scale", 0.5, 100.0)
    if sigma_mm is None or grid_mm is None:
        return None
    return sigma_mm / grid_mm


def card_views(card: Any) -> tuple[str, ...]:
    """The views a model reads (card ``preprocessing.views``; default AP and LAT, LAT for
    the cervical classifier, which was only ever trained on lateral views)."""
    default = ("LAT",) if card.name == CSPINE_MODEL else ("AP", "LAT")
    return tuple(str(v).upper() for v in card.preprocessing.get("views", default))


def _card_point(card: Any, kind: str, view: str) -> Any:
    """The card's operating point entry for ``kind`` on ``view`` (or for all views, or the
    pair), else None."""
    points = card.weights.get("operating_points") or {}
    by_view = points.get(kind) or {}
    return by_view.get(view) or by_view.get("all") or by_view.get("pair")


def operating_threshold(card: Any, kind: str, view: str) -> float:
    """The card's operating point for ``kind`` on ``view`` (chosen on validation), else 0.5."""
    point = _card_point(card, kind, view)
    try:
        return float(point["threshold"]) if point else 0.5
    except (KeyError, TypeError, ValueError):
        return 0.5


def operating_rule_out(card: Any, kind: str, view: str) -> float | None:
    """The card's rule-out point for ``kind`` on ``view`` (``rule_out_threshold``, at most the
    rule-in point; between the two the finding is indeterminate), else None (one cut)."""
    point = _card_point(card, kind, view)
    try:
        value = float(point["rule_out_threshold"]) if point else None
    except (KeyError, TypeError, ValueError):
        return None
    return None if value is None else min(value, operating_threshold(card, kind, view))


def _windows(engine: Any, images: Sequence[Radiograph]) -> np.ndarray:
    """Classifier inputs ``(N, 1, H, W)``: each image's centred window on the model grid."""
    card = engine_card(engine)
    size, percentiles, grid = _input_size(card), _percentiles(card), _grid_mm(card)
    if grid is None:
        return np.stack([prepare_radiograph(image.pixels, size, percentiles)[None]
                         for image in images]).astype(np.float32)
    contrast = _contrast_px(card, grid)
    return np.stack([model_window(image.pixels, image.grid(grid), size, percentiles, contrast)[None]
                     for image in images]).astype(np.float32)


def _infer(engine: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return dict(engine.infer(dict(inputs)))
    except PipelineError:
        raise
    except Exception as exc:  # a backend failure becomes a pipeline error with its reason
        raise PipelineError(f"model {engine_card(engine).name} failed: {exc}") from exc


def mirrored_reads(card: Any) -> bool:
    """Whether the card asks for each window to be read as it is and mirrored left-right
    (``preprocessing.test_time_flip``): a view, a fracture or a dislocation is the same in a
    mirror image, and a lateral radiograph comes facing either way."""
    return bool(card.preprocessing.get("test_time_flip", False))


def _infer_read(engine: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`_infer` for a classifier's ``(N, 1, H, W)`` windows; where the card asks for
    mirrored reads (:func:`mirrored_reads`) every window is also read mirrored and the two
    outputs are averaged (a map output is mirrored back first)."""
    if not mirrored_reads(engine_card(engine)):
        return _infer(engine, inputs)
    count = len(next(iter(inputs.values())))
    doubled = {name: np.concatenate([value, value[..., ::-1]]).astype(np.float32)
               for name, value in inputs.items()}
    outputs = {name: np.asarray(value) for name, value in _infer(engine, doubled).items()}
    return average_mirrored({name: value[:count] for name, value in outputs.items()},
                            {name: value[count:] for name, value in outputs.items()})


def average_mirrored(plain: Mapping[str, np.ndarray],
                     mirrored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The mean of a model's outputs on windows and on the same windows mirrored
    left-right; a map output (three or more axes) of the mirrored windows is mirrored back
    first, so it stays on the pixels it was made from."""
    averaged = {}
    for name, value in plain.items():
        second = mirrored[name]
        if value.ndim >= 3:  # a map over the window: back into the window's orientation
            second = second[..., ::-1]
        averaged[name] = ((value + second) / 2).astype(value.dtype)
    return averaged


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
        notes=limitation_notes(engine),
    )


def limitation_notes(engine: Any) -> tuple[str, ...]:
    """The first sentence of the card's ``weights.limitations`` (a model below its bar
    says so in every report it makes), as one note naming the model."""
    card = engine_card(engine)
    text = str((card.weights or {}).get("limitations") or "").strip()
    if not text:
        return ()
    end = text.find(". ")
    first = text if end < 0 else text[:end + 1]
    return (f"{card.name} {card.version}: {first}",)


def _only_series(inputs: Sequence[SeriesRef], pipeline: str) -> SeriesRef:
    if not inputs:
        raise PipelineError(f"{pipeline}: no input series")
    return inputs[0]


# --------------------------------------------------------------------------- gate

#: Below this lag-1 correlation of neighbouring 2 mm pixels an image is noise, not anatomy.
MIN_NEIGHBOUR_CORRELATION = 0.35
#: A spine radiograph's field is at least this many mm along each axis.
MIN_FIELD_MM = 60.0
#: A cervical spine radiograph is taken on an 18 x 24 or 24 x 30 cm field: one wider than
#: this on *both* axes is a chest, abdomen or whole-body radiograph (35 x 43 cm; the
#: project's own chest junk spans 350-430 mm), whose centre the models would read as a neck.
MAX_CERVICAL_FIELD_MM = 300.0


@dataclass(frozen=True)
class Gated:
    """What the view gate made of one image: its view, or why it is not assessable."""

    image: Radiograph
    view: str               # "AP", "LAT", or "" (not a spine radiograph)
    probability: float      # the gate's probability of that view (or of "other")
    reason: str = ""
    notes: tuple[str, ...] = ()


def content_problem(canvas: np.ndarray, field_mm: tuple[float, float]) -> str:
    """Why an image cannot be a radiograph from its statistics alone ("" if it may be)."""
    if min(field_mm) < MIN_FIELD_MM:
        return (f"the image covers {field_mm[0]:.0f} x {field_mm[1]:.0f} mm, smaller than any "
                f"spine radiograph ({MIN_FIELD_MM:.0f} mm)")
    if min(field_mm) > MAX_CERVICAL_FIELD_MM:
        return (f"the image covers {field_mm[0]:.0f} x {field_mm[1]:.0f} mm, more than a cervical "
                f"spine radiograph ({MAX_CERVICAL_FIELD_MM:.0f} mm on each side): a chest or body "
                "radiograph?")
    values = canvas.astype(np.float64)
    low, high = np.percentile(values, (1.0, 99.0))
    if not np.isfinite(high - low) or high - low <= 1e-6 * max(abs(high), abs(low), 1.0):
        return "the image is blank (no contrast)"
    if min(values.shape) >= 4:
        centred = np.clip(values, low, high) - values.mean()
        variance = float((centred ** 2).mean())
        rows = float((centred[1:] * centred[:-1]).mean()) / max(variance, 1e-12)
        cols = float((centred[:, 1:] * centred[:, :-1]).mean()) / max(variance, 1e-12)
        if min(rows, cols) < MIN_NEIGHBOUR_CORRELATION:
            return (f"the image content is noise-like (neighbouring pixels correlate "
                    f"{min(rows, cols):.2f}; a radiograph is above {MIN_NEIGHBOUR_CORRELATION})")
    return ""


def _gate_engine(models: ModelProvider) -> Any | None:
    """The view gate, or None where it is not installed (older model repositories)."""
    try:
        return models(GATE_MODEL)
    except Exception as exc:  # providers raise their own errors for a missing model
        logger.warning("no %s model (%s); views from ViewPosition, statistics checks only",
                       GATE_MODEL, exc)
        return None


def gate_images(images: Sequence[Radiograph], models: ModelProvider) -> list[Gated]:
    """Establish each image's view from its pixels (:data:`GATE_MODEL` plus statistics).

    The view comes from the image; ViewPosition, often empty or wrong, is only compared:
    where it names a view and the image reads as the other, the image is not assessable
    ("the view is unclear") rather than read by the wrong view's model. Without a gate
    model installed the view comes from ViewPosition and only the statistics checks run.
    """
    engine = _gate_engine(models)
    card = engine_card(engine) if engine is not None else None
    size = _input_size(card) if card is not None else (80, 64)
    percentiles = _percentiles(card) if card is not None else DEFAULT_PERCENTILES
    grid_mm = (_grid_mm(card) if card is not None else None) or 2.0
    contrast = _contrast_px(card, grid_mm) if card is not None else None
    problems, windows = [], []
    for image in images:
        grid = image.grid(grid_mm)
        canvas = to_canvas(image.pixels, grid)
        problems.append(content_problem(canvas, grid.field_mm))
        win, valid = place(canvas, size, centre_origin(canvas.shape, size))
        windows.append(window(win, valid, percentiles, contrast)[None])
    if card is not None:
        labels = [card.labels[k] for k in sorted(card.labels)]
        probabilities = _infer_read(engine, {"image": np.stack(windows).astype(np.float32)}
                                    )["probabilities"]
    else:
        labels = ["other", "AP", "LAT"]
        probabilities = np.array([[0.0, float(view_of(i) == "AP"), float(view_of(i) == "LAT")]
                                  for i in images])
    out = []
    for image, problem, p in zip(images, problems, probabilities, strict=True):
        notes = []
        if image.spacing_source == "assumed":
            notes.append(f"No pixel spacing in the file; {ASSUMED_SPACING_MM} mm assumed.")
        if card is None and not problem and not view_of(image):
            out.append(Gated(image, "", 1.0, "no view gate installed and no AP/LAT "
                             "ViewPosition: the view is unknown", tuple(notes)))
            continue
        scores = {label.upper(): float(v) for label, v in zip(labels, p, strict=True)}
        spine = {view: scores.get(view, 0.0) for view in ("AP", "LAT")}
        view = max(spine, key=lambda key: spine[key])
        if problem:
            out.append(Gated(image, "", 1.0, problem, tuple(notes)))
            continue
        # Not a spine radiograph only when "other" outweighs both spine views together.
        if scores.get("OTHER", 0.0) >= spine["AP"] + spine["LAT"]:
            out.append(Gated(image, "", scores["OTHER"],
                             "the image does not look like a spine radiograph (view gate "
                             f"p(other) {scores['OTHER']:.2f})", tuple(notes)))
            continue
        declared = view_of(image)
        if declared and declared != view:
            # Two sources disagree and either may be wrong (headers often are; the gate is
            # on another generator's AP views, bench/RESULTS.md): reading the image with the
            # other view's model would be a confident wrong answer, so it is not read.
            out.append(Gated(image, "", spine[view],
                             f"ViewPosition says {image.view_position} but the image reads as "
                             f"{view} (view gate p {spine[view]:.2f}): the view is unclear",
                             tuple(notes)))
            continue
        if not declared:
            # Nothing to compare the gate with: say so, so the reader checks the view
            # (another generator's laterals have been read as AP at p 0.95).
            notes.append(f"No AP/LAT ViewPosition: the view ({view}) was read from the image "
                         f"alone (view gate p {spine[view]:.2f}).")
        out.append(Gated(image, view, spine[view], "", tuple(notes)))
    return out


def _gate_models(models: ModelProvider) -> tuple[Any, ...]:
    engine = _gate_engine(models)
    return (engine,) if engine is not None else ()


def _apply_gate(result: Findings, gated: Sequence[Gated], views: Sequence[str],
                model: str) -> list[Gated]:
    """Site status and notes for every image; the images the model may read.

    When none is left, ``result`` becomes "not performed" with the reasons.
    """
    statuses: dict[str, SiteStatus] = {}
    notes: list[str] = list(result.notes)
    usable: list[Gated] = []
    reasons: list[str] = []
    for item in gated:
        notes.extend(n for n in item.notes if n not in notes)
        site = item.view or view_of(item.image) or "AP"
        if not item.view:
            reasons.append(item.reason)
            statuses.setdefault(site, SiteStatus(site, AssessmentValues.NOT_ASSESSABLE, item.reason))
        elif item.view not in views:
            reason = f"{item.view} view; {model} reads {' and '.join(views)} views only"
            reasons.append(reason)
            statuses.setdefault(site, SiteStatus(site, AssessmentValues.NOT_ASSESSABLE, reason))
        else:
            usable.append(item)
            statuses[site] = SiteStatus(site, AssessmentValues.ASSESSED)
    result.notes = tuple(notes)
    if not usable:
        result.not_performed_reason = "Not assessable: " + "; ".join(dict.fromkeys(reasons)) + "."
        result.site_status = ()
        return []
    result.site_status = tuple(statuses.values())
    return usable


# --------------------------------------------------------------------------- pipelines


class FracturePipeline:
    """MobileNet fracture classifier on the AP and LAT images of a series (gated); the
    image furthest above its view's operating point is reported."""

    name = "xray-fracture"
    model_names = (FRACTURE_MODEL, GATE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        engine = models(FRACTURE_MODEL)
        card = engine_card(engine)
        result = _findings(self.name, engine, images, _gate_models(models))
        usable = _apply_gate(result, gate_images(images, models), card_views(card), card.name)
        if not usable:
            return result
        probabilities = _infer_read(engine, {"image": _windows(engine, [g.image for g in usable])}
                               )["probabilities"][:, _class_index(card, "fracture")]
        thresholds = [operating_threshold(card, "fracture", g.view) for g in usable]
        best = int(np.argmax(np.asarray(probabilities) - np.asarray(thresholds)))
        result.findings.append(Finding(kind="fracture", probability=float(probabilities[best]),
                                       threshold=thresholds[best],
                                       rule_out=operating_rule_out(card, "fracture", usable[best].view)))
        logger.info("xray-fracture series %s: p(fracture)=%.3f (%s, threshold %.3f)",
                    images[0].series_uid, probabilities[best], usable[best].view, thresholds[best])
        return result


def _window_to_source(planes: np.ndarray, image: Radiograph, grid_mm: float | None,
                      size: tuple[int, int]) -> np.ndarray:
    """Planes ``(..., H, W)`` of the centred model window back on the source pixels (0 outside)."""
    if grid_mm is None:  # the whole image was resized to the model input
        return resize_bilinear(planes, image.shape)
    grid = image.grid(grid_mm)
    rows, cols = grid.shape
    r0, c0 = centre_origin((rows, cols), size)  # as model_window placed it
    canvas = np.zeros((*planes.shape[:-2], rows, cols), dtype=np.float32)
    rs, re, cs, ce = max(r0, 0), min(r0 + size[0], rows), max(c0, 0), min(c0 + size[1], cols)
    canvas[..., rs:re, cs:ce] = planes[..., rs - r0:re - r0, cs - c0:ce - c0]
    return from_canvas(canvas, grid)


class CSpineClassifyPipeline:
    """Cervical normal / fracture / dislocation with the model's saliency map (LAT only)."""

    name = "xray-cspine-classify"
    model_names = (CSPINE_MODEL, GATE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        _require_one_grid(images, self.name)
        engine = models(CSPINE_MODEL)
        card = engine_card(engine)
        result = _findings(self.name, engine, images, _gate_models(models))
        usable = _apply_gate(result, gate_images(images, models), card_views(card), card.name)
        if not usable:
            return result
        outputs = _infer_read(engine, {"image": _windows(engine, [g.image for g in usable])})
        probabilities, saliency = outputs["probabilities"], outputs["saliency"]
        for kind in ("fracture", "dislocation"):
            scores = probabilities[:, _class_index(card, kind)]
            thresholds = np.asarray([operating_threshold(card, kind, g.view) for g in usable])
            best = int(np.argmax(scores - thresholds))
            result.findings.append(Finding(kind=kind, probability=float(scores[best]),
                                           threshold=float(thresholds[best]),
                                           rule_out=operating_rule_out(card, kind, usable[best].view)))
        size, grid_mm = _input_size(card), _grid_mm(card)
        used = {g.image.sop_instance_uid: k for k, g in enumerate(usable)}
        maps = np.zeros((len(images), *images[0].shape), dtype=np.float32)
        for i, image in enumerate(images):
            if image.sop_instance_uid in used:
                maps[i] = _window_to_source(saliency[used[image.sop_instance_uid], 0], image,
                                            grid_mm, size)
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


def segment_probabilities(engine: Any, image: Radiograph) -> np.ndarray:
    """Class probabilities ``(C, rows, cols)`` on the source pixels of ``image``.

    The image is resampled to the model's mm grid, covered with model-size tiles (half
    overlap; a smaller image is padded), each tile windowed like in training, and the
    tiles' probabilities averaged on the canvas, then sampled back at every source pixel.
    """
    card = engine_card(engine)
    size, percentiles, grid_mm = _input_size(card), _percentiles(card), _grid_mm(card)
    if grid_mm is None:  # a model for whole images resized to its input
        whole = prepare_radiograph(image.pixels, size, percentiles)[None, None]
        planes = _infer(engine, {"image": whole.astype(np.float32)})["probabilities"][0]
        return resize_bilinear(planes, image.shape)
    grid = image.grid(grid_mm)
    contrast = _contrast_px(card, grid_mm)
    canvas = to_canvas(image.pixels, grid)
    rows, cols = canvas.shape
    origins = [(r, c) for r in tile_origins(rows, size[0]) for c in tile_origins(cols, size[1])]
    tiles = []
    for origin in origins:
        tile, valid = place(canvas, size, origin)
        tiles.append(window(tile, valid, percentiles, contrast)[None])
    probabilities = _infer(engine, {"image": np.stack(tiles).astype(np.float32)})["probabilities"]
    total = np.zeros((probabilities.shape[1], rows, cols), dtype=np.float32)
    weight = np.zeros((rows, cols), dtype=np.float32)
    for (r0, c0), planes in zip(origins, probabilities, strict=True):
        rs, re, cs, ce = max(r0, 0), min(r0 + size[0], rows), max(c0, 0), min(c0 + size[1], cols)
        total[:, rs:re, cs:ce] += planes[:, rs - r0:re - r0, cs - c0:ce - c0]
        weight[rs:re, cs:ce] += 1.0
    return from_canvas(total / np.maximum(weight, 1e-6), grid)


def _label_map(probabilities: Sequence[np.ndarray], images: Sequence[Radiograph],
               card: Any) -> LabelMap:
    """Label frames on the source grid from per-image class probabilities ``(C, rows, cols)``.

    A card whose class 0 is ``background`` labels structures 1..C-1; otherwise class k
    becomes label k + 1 (every pixel belongs to a structure, as with tissue classes). An
    image without probabilities (not assessable) gets an empty frame.
    """
    names = [card.labels[k] for k in sorted(card.labels)]
    frames = np.zeros((len(images), *images[0].shape), dtype=np.uint8)
    for i, planes in enumerate(probabilities):
        if planes is None:
            continue
        winner = np.argmax(planes, axis=0)
        frames[i] = winner if names[0] == "background" else winner + 1
    segments = names[1:] if names[0] == "background" else names
    return LabelMap(
        labels=frames,
        source_sop_instance_uids=tuple(image.sop_instance_uid for image in images),
        segments=tuple(Segment(label=k + 1, name=name) for k, name in enumerate(segments)),
    )


class SpineSegPipeline:
    """U-Net spine structures; the AP or LAT model is chosen by the view gate."""

    name = "xray-spine-seg"
    model_names = (UNET_AP_MODEL, UNET_LAT_MODEL, GATE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        series = _only_series(inputs, self.name)
        images = read_series(series)
        _require_one_grid(images, self.name)
        gated = gate_images(images, models)
        views = {g.view for g in gated if g.view}
        if len(views) > 1:
            raise PipelineError(f"{self.name}: series {series.series_uid} mixes AP and LAT images")
        engine = models(UNET_LAT_MODEL if views == {"LAT"} else UNET_AP_MODEL)
        card = engine_card(engine)
        result = _findings(self.name, engine, images, _gate_models(models))
        usable = _apply_gate(result, gated, card_views(card), card.name)
        if not usable:
            return result
        used = {g.image.sop_instance_uid for g in usable}
        planes = [segment_probabilities(engine, image) if image.sop_instance_uid in used else None
                  for image in images]
        result.segmentation = _label_map(planes, images, card)
        return result


class TissueSegPipeline:
    """XNet tissue classes: every pixel is bone, soft tissue or open beam."""

    name = "xray-tissue-seg"
    model_names = (TISSUE_MODEL, GATE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        images = read_series(_only_series(inputs, self.name))
        _require_one_grid(images, self.name)
        engine = models(TISSUE_MODEL)
        card = engine_card(engine)
        result = _findings(self.name, engine, images, _gate_models(models))
        usable = _apply_gate(result, gate_images(images, models), card_views(card), card.name)
        if not usable:
            return result
        used = {g.image.sop_instance_uid for g in usable}
        planes = [segment_probabilities(engine, image) if image.sop_instance_uid in used else None
                  for image in images]
        result.segmentation = _label_map(planes, images, card)
        return result


class PairClassifyPipeline:
    """Damaged / normal from the AP and the LAT image of one study (all its series); the
    views come from the gate, not from ViewPosition."""

    name = "xray-pair-classify"
    model_names = (PAIR_MODEL, GATE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        if not inputs:
            raise PipelineError(f"{self.name}: no input series")
        images = [image for series in inputs for image in read_series(series)]
        gated = gate_images(images, models)
        engine = models(PAIR_MODEL)
        card = engine_card(engine)
        by_view: dict[str, Gated] = {}
        for item in gated:  # the most confident image of each view
            if item.view and (item.view not in by_view
                              or item.probability > by_view[item.view].probability):
                by_view[item.view] = item
        chosen = [by_view[v] for v in ("AP", "LAT") if v in by_view]
        result = _findings(self.name, engine, [g.image for g in chosen] or images,
                           _gate_models(models))
        usable = _apply_gate(result, gated, ("AP", "LAT"), card.name)
        missing = [view for view in ("AP", "LAT") if view not in by_view]
        if not usable:
            return result
        if missing:
            result.not_performed_reason = (
                f"Not assessable: the study has no {' and no '.join(missing)} spine radiograph "
                f"among {len(images)} images in {len(inputs)} series (views read from the images)")
            result.site_status = ()
            return result
        ap, lat = by_view["AP"].image, by_view["LAT"].image
        outputs = _infer_read(engine, {"ap": _windows(engine, [ap]), "lat": _windows(engine, [lat])})
        damage = float(outputs["probabilities"][0, _class_index(card, "damage")])
        result.findings.append(Finding(kind="damage", probability=damage,
                                       threshold=operating_threshold(card, "damage", "pair"),
                                       rule_out=operating_rule_out(card, "damage", "pair")))
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
