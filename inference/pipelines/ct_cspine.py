"""Cervical spine CT fracture pipeline (``ct-cspine-fracture``), two stages with gates.

1. **Gate on the series** (:func:`load_ct_series`): enough slices, axial, a frame of
   reference, slices at most 3 mm apart and pixels at most 2 mm, the range the models
   were trained on. A series outside it gets "analysis not performed" with the reason.
2. **Stage 1** (``cspine-ct-vertebra-seg``) on a 2 mm grid: per voxel one of background,
   C1, C2, a subaxial cervical vertebra (C3-C7) or a thoracolumbar vertebra, plus a heat
   map peaking at each vertebral body. C1 (a ring without a body) and C2 (with the dens)
   are told apart by their shape; C3-C7 look alike, so they are separated into instances
   at the heat-map peaks and **numbered by counting from an anatomical anchor**: down from
   C2, or up from T1 (the first vertebra with ribs). With no anchor in view, or when the
   two counts disagree, the vertebrae get no level and the levels are reported as not
   assessable - never a shifted label (:func:`identify_levels`).
3. **Stage 2** (``cspine-ct-fracture``) classifies each identified vertebra on a crop
   taken from the source volume at its own resolution; the rule-in threshold and (where
   the card has one) the rule-out threshold are operating points chosen on validation
   data: at or above rule-in a fracture is present, below rule-out absent, in between
   indeterminate (the report says so and asks for review).

Every level C1-C7 ends as assessed / not in field / not assessable with a reason
(``Findings.site_status``); the patient-level finding exists only when the assessed
levels justify it (one of them present or indeterminate, or all seven assessed) and
agrees with them. The
label map is mapped back onto the source slices, one frame per source instance, so the
SEG encoder can reference them. The preprocessing here is shared with the training recipe
(:mod:`spine_node.inference.train.ct`), so training and inference see the same input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from spine_node.inference.errors import NotAssessableError, PipelineError
from spine_node.inference.findings import (
    AssessmentValues,
    Finding,
    Findings,
    LabelMap,
    Segment,
    SiteStatus,
)
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

#: Stage-1 classes (channel order of the model's output; the heat map follows them).
SEG_CLASSES: tuple[str, ...] = ("background", "C1", "C2", "C3-C7", "thoracolumbar")
CLASS_C1, CLASS_C2, CLASS_SUBAXIAL, CLASS_LOWER = 1, 2, 3, 4
HEATMAP_CHANNEL = len(SEG_CLASSES)

# Defaults; the model cards' ``preprocessing`` sections override them.
SEGMENTATION_PREPROCESSING: dict[str, Any] = {
    "spacing_mm": [2.0, 2.0, 2.0],
    "hu_window": [-1000.0, 2000.0],
    "hu_scale": 1000.0,
    "pad_multiple": 16,
    "classes": list(SEG_CLASSES),
    "heatmap": "channel 5: logit of a Gaussian (sigma 3 mm) at each C3-T3 vertebral body centre",
    "axes": "z head-to-feet, y anterior-to-posterior, x right-to-left",
}
FRACTURE_PREPROCESSING: dict[str, Any] = {
    "crop_shape": [24, 48, 48],
    "crop_margin_mm": 4.0,
    "hu_window": [-400.0, 1800.0],
    "hu_scale": 1000.0,
    "min_voxels": 20,
    "threshold": 0.5,
    "source": "the source CT at its own resolution, around each identified vertebra's box",
    # "scanner": the box in the scanner's axes (the demo weights; a card without the key);
    # "vertebra": the box in the vertebra's own frame, z along the local spine axis, so a
    # lordotic or flexed neck gives upright crops. A card may also give
    # "crop_spacing_mm" (spine axis, front-back, across): every vertebra sampled at one
    # physical scale instead of stretched over its box (docs/models-ct.md: tried, not kept).
    "crop_frame": "scanner",
}
#: A card without ``crop_frame`` was trained on axis-aligned crops.
LEGACY_CROP_FRAME = "scanner"
#: Test-time augmentation a card may ask for (``preprocessing.test_time_augmentation``):
#: stage 2 reads each vertebra at every box margin listed (mm) and, with ``mirror``, each
#: of those crops mirrored left-right too, and the vertebra's probability is the mean of
#: their logits. Both are changes training already draws (box jitter, mirror), so every
#: read is one the model knows; their mean is steadier where one read is off (a box a
#: little short or long, an unfamiliar shape). A card without the key: one read.
TTA_KEYS = frozenset({"margins_mm", "mirror"})
#: The local spine axis is taken at most this far (degrees) from the scanner's z axis.
MAX_AXIS_TILT_DEG = 50.0


@dataclass(frozen=True)
class Gates:
    """What a series must be for the models to assess it (their training range)."""

    min_slices: int = 8
    max_slice_spacing_mm: float = 3.05
    max_pixel_mm: float = 2.0
    min_coverage_mm: float = 30.0
    #: a vertebra's mean class confidence below this: not assessable
    min_confidence: float = 0.5
    #: heat-map peaks (vertebral body centres) below this, or below ``peak_relative`` of
    #: the strongest peak of the scan, are not vertebrae; of peaks closer than
    #: ``peak_separation_mm`` along the spine axis (z) only the strongest counts: vertebral
    #: bodies are stacked, so two peaks that close mark one body (another scanner's or
    #: anatomy's look weakens and splits the heat map before it moves it)
    peak_threshold: float = 0.12
    peak_relative: float = 0.2
    peak_separation_mm: float = 7.0
    #: consecutive vertebrae further apart than this many median steps break the count
    max_step_ratio: float = 1.7
    #: the end plates of two neighbours are at most this far apart (mm) to count on
    max_neighbour_gap_mm: float = 12.0
    #: a vertebra taller than this many median steps, or a subaxial one bigger than this
    #: many times the median, is two grown into one: it breaks the count
    max_height_steps: float = 2.2
    max_size_ratio: float = 1.7
    min_size_ratio: float = 0.4
    #: counted up from T1 with C2 in view, the gap above the highest level may differ from
    #: the levels it must hold by this many median steps
    room_tolerance_steps: float = 0.6
    #: C2 (body and dens) taller than this many median steps has grown into C3. From the
    #: dens tip to the lowest point of its arch C2 spans about three subaxial steps (45-55 mm
    #: on 15-18 mm steps); C2 with C3 grown in spans four or more
    max_c2_height_steps: float = 3.6
    #: a C1 or C2 smaller than this (mm3; adults: C1 about 5-8 cm3, C2 10-14 cm3) is a
    #: fragment or a false find: not delineated
    min_c1_mm3: float = 1500.0
    min_c2_mm3: float = 2500.0
    #: a C2 cut by the first slice with no C1 in view anchors a count only when it is at
    #: least this many median steps tall (its body and most of the dens in view: C2 with
    #: its dens spans about three steps): a C2 body alone looks like C3's, and another
    #: generator's C3 at the top of the field, its processes sloping down, was read as C2
    #: 1.4 steps tall, every name below it one level up
    min_cut_c2_height_steps: float = 2.0
    #: ... and a C2 cut by the first slice with less bone than this share of the median
    #: subaxial vertebra is a sliver (or the top of C3 misread): it gets no name and anchors
    #: nothing (a C2 body alone, with its large arch, is bigger than C3)
    min_cut_c2_size_ratio: float = 0.6
    #: the vertebra above the one taken for T1 with bone this far (mm) to both sides of it
    #: has ribs too: the anchor may be T2 under a T1 read as cervical, so no count up
    #: (farther out than :func:`has_ribs`' 38 mm: a large C7's transverse processes reach
    #: 40-45 mm, a first rib well beyond)
    ribs_above_t1_mm: float = 50.0
    #: bone sits in soft tissue: the median of a 6 mm shell around a vertebra above this
    #: (HU) means the find is not a vertebra (noise, a dense phantom, contrast, metal)
    max_surround_hu: float = 300.0
    #: stage 1 reads the scan on the card's grid, then (while levels stay unidentified) on
    #: that grid scaled by these factors: 1.2 shows vertebrae of a patient about a fifth
    #: larger than the training range at a size stage 1 knows, 0.85 a smaller one
    grid_scales: tuple[float, ...] = (1.0, 1.2, 0.85)
    #: a read on a scaled grid replaces the first, or has a say in which read is kept
    #: (:func:`choose_read`), only when it identifies at least this many levels
    min_rescaled_levels: int = 3
    #: a body two reads found within this many median steps of each other is one vertebra
    #: (:func:`names_differ`, :func:`folds`)
    max_read_offset_steps: float = 0.3
    #: two bodies of the card-grid read this many median steps apart with one body of a
    #: scaled read nearest to both: the scaled read folded two vertebrae into one
    min_fold_steps: float = 0.6


GATES = Gates()


# ----------------------------------------------------------------------- loading


@dataclass
class CtVolume:
    """A CT series as a ``(z, y, x)`` HU volume, head first, in canonical orientation.

    ``sop_instance_uids[k]`` is the instance of slice ``k``. ``flip_rows`` /
    ``flip_columns`` say whether the stored pixel rows / columns were reversed to put
    anterior at row 0 and patient right at column 0; :meth:`to_source_frames` undoes it.
    ``positions`` (one patient-coordinate ImagePositionPatient per canonical slice),
    ``row_direction`` / ``column_direction`` (ImageOrientationPatient) and
    ``frame_of_reference_uid`` place voxels in the patient (:meth:`patient_mm`); they
    are empty for volumes that did not come from DICOM.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    sop_instance_uids: tuple[str, ...]
    study_uid: str
    series_uid: str
    flip_rows: bool = False
    flip_columns: bool = False
    positions: np.ndarray | None = None
    row_direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    column_direction: tuple[float, float, float] = (0.0, 1.0, 0.0)
    frame_of_reference_uid: str = ""
    #: the stated slice thickness (mm); None: the slice spacing
    slice_thickness_mm: float | None = None

    def to_source_frames(self, labels: np.ndarray) -> np.ndarray:
        """A canonical ``(z, y, x)`` array as frames in the stored pixel orientation."""
        out = labels
        if self.flip_rows:
            out = out[:, ::-1, :]
        if self.flip_columns:
            out = out[:, :, ::-1]
        return np.ascontiguousarray(out)

    def patient_mm(self, index_zyx: Sequence[float]) -> tuple[float, float, float] | None:
        """Patient coordinates (LPS, mm) of a canonical voxel index, or None without geometry."""
        if self.positions is None:
            return None
        k, i, j = (float(v) for v in index_zyx)
        rows, columns = self.hu.shape[1:]
        if self.flip_rows:
            i = rows - 1 - i
        if self.flip_columns:
            j = columns - 1 - j
        k0 = int(np.clip(np.floor(k), 0, len(self.positions) - 1))
        k1 = min(k0 + 1, len(self.positions) - 1)
        origin = self.positions[k0] + (k - k0) * (self.positions[k1] - self.positions[k0])
        point = (origin + np.asarray(self.row_direction) * j * self.spacing[2]
                 + np.asarray(self.column_direction) * i * self.spacing[1])
        return (float(point[0]), float(point[1]), float(point[2]))


def _number(ds: Any, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def load_ct_series(files: Sequence[Path], gates: Gates = GATES) -> CtVolume:
    """Read a single-frame CT series into a :class:`CtVolume`, gated on what the models know.

    Raises
    ------
    NotAssessableError
        Readable, but outside the models' range: too few slices, slices thicker than
        3 mm, pixels coarser than 2 mm, too short a stretch of the body, not axial, no
        frame of reference, a multi-frame CT. The message is for the radiologist.
    PipelineError
        Not a usable series: no CT slices, mixed series, uneven geometry.
    """
    import pydicom

    slices = []
    for path in files:
        ds = pydicom.dcmread(path)
        if str(ds.get("SOPClassUID", "")) == ENHANCED_CT_IMAGE_STORAGE:
            raise NotAssessableError("Enhanced (multi-frame) CT is not supported by this analysis")
        if "PixelData" not in ds or str(ds.get("Modality", "")) != "CT":
            continue
        slices.append(ds)
    if not slices:
        raise NotAssessableError("The series holds no CT images")
    if len(slices) < gates.min_slices:
        count = len(slices)
        raise NotAssessableError(f"Only {count} slice{'s' if count != 1 else ''}; the analysis "
                                 f"needs a volume of at least {gates.min_slices} slices")
    series = {str(ds.SeriesInstanceUID) for ds in slices}
    if len(series) != 1:
        raise PipelineError(f"{PIPELINE_NAME}: slices from {len(series)} series")
    first = slices[0]
    if not str(first.get("FrameOfReferenceUID", "")):
        raise NotAssessableError("The images have no frame of reference (position in the patient unknown)")
    try:
        orientation = np.array([float(v) for v in first.ImageOrientationPatient])
        pixel_spacing = [float(v) for v in first.PixelSpacing]
        [float(v) for v in first.ImagePositionPatient]
    except (AttributeError, TypeError, ValueError):
        raise NotAssessableError("The images lack position, orientation or pixel spacing") from None
    row_dir, col_dir = orientation[:3], orientation[3:]
    # Axial only: rows along +-x, columns along +-y (a few degrees of gantry tilt allowed).
    if abs(row_dir[0]) < 0.98 or abs(col_dir[1]) < 0.98:
        raise NotAssessableError("The slices are not axial")
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
    thickness = _number(first, "SliceThickness") or spacing_z
    check_geometry((spacing_z, pixel_spacing[0], pixel_spacing[1]), len(slices), thickness, gates)
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
        positions=np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices]),
        row_direction=tuple(float(v) for v in row_dir),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in col_dir),  # type: ignore[arg-type]
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        slice_thickness_mm=thickness,
    )


def check_geometry(spacing: Sequence[float], slices: int, thickness: float | None = None,
                   gates: Gates = GATES) -> None:
    """Raise :class:`NotAssessableError` where the grid is outside what the models know."""
    spacing_z, row_mm, column_mm = (float(v) for v in spacing)
    thickness = thickness or spacing_z
    if max(row_mm, column_mm) > gates.max_pixel_mm:
        raise NotAssessableError(f"Pixels of {max(row_mm, column_mm):.2g} mm are coarser than the "
                                 f"{gates.max_pixel_mm:g} mm the analysis needs")
    if spacing_z > gates.max_slice_spacing_mm or thickness > gates.max_slice_spacing_mm + 0.5:
        raise NotAssessableError(f"Slices are {max(spacing_z, thickness):.2g} mm thick or apart; "
                                 f"the analysis needs slices of at most 3 mm")
    if slices < gates.min_slices:
        raise NotAssessableError(f"Only {slices} slice{'s' if slices != 1 else ''}; the analysis "
                                 f"needs a volume of at least {gates.min_slices} slices")
    if spacing_z * (slices - 1) < gates.min_coverage_mm:
        raise NotAssessableError(f"The series covers only {spacing_z * (slices - 1):.0f} mm "
                                 "of the body; a cervical spine needs more")


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
                 shape: Sequence[int], order: int,
                 box: Sequence[slice] | None = None) -> np.ndarray:
    """``volume`` sampled on the ``target`` grid of ``shape`` (only the part ``box`` of it,
    when given)."""
    box = box or tuple(slice(0, n) for n in shape)
    axes = [np.clip((np.arange(b.start, b.stop) + 0.5) * t / s - 0.5, 0, m - 1)
            for b, t, s, m in zip(box, target, spacing, volume.shape, strict=True)]
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


def refine_to_source(labels: np.ndarray, foreground: np.ndarray | None,
                     model_spacing: Sequence[float], source_spacing: Sequence[float],
                     source_shape: Sequence[int]) -> np.ndarray:
    """The model-grid label map on the source grid, with its outline from ``foreground``
    (stage 1's probability that a voxel is a cervical vertebra, model grid) interpolated
    linearly rather than as whole 2 mm blocks: a source voxel belongs to a vertebra where
    that probability is at least 0.5, and to the level of its nearest model voxel or, at
    the edge, of a labelled neighbour within one model voxel. On the model's own grid (or
    without ``foreground``) this is :func:`labels_to_source`."""
    nearest = labels_to_source(labels, model_spacing, source_spacing, source_shape)
    if foreground is None or nearest is labels or not labels.any():
        return nearest
    found = ndimage.find_objects((nearest > 0).astype(np.uint8))[0]
    pad = [int(np.ceil(m / s)) + 1 for m, s in zip(model_spacing, source_spacing, strict=True)]
    box = tuple(slice(max(0, b.start - p), min(n, b.stop + p))
                for b, p, n in zip(found, pad, source_shape, strict=True))
    inside = _sample_grid(foreground.astype(np.float32), model_spacing, source_spacing,
                          source_shape, 1, box) >= 0.5
    grown = _sample_grid(ndimage.grey_dilation(labels, size=3), model_spacing, source_spacing,
                         source_shape, 0, box)
    local = nearest[box]
    out = np.zeros(nearest.shape, nearest.dtype)
    out[box] = np.where(inside, np.where(local > 0, local, grown), 0)
    return out


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


# ------------------------------------------------------------- levels from anatomy


@dataclass
class LevelMap:
    """Stage 1's answer on the model grid: identified levels and what became of each.

    ``labels`` holds C1..C7 as 1..7 where a vertebra was identified and assessable, 0
    elsewhere; ``status`` maps every level to (assessment, reason); ``unlabelled`` counts
    cervical vertebrae that were found but could not be given a level; ``centroids`` are
    model-grid voxel indices of each labelled vertebra.
    """

    labels: np.ndarray
    status: dict[str, tuple[AssessmentValues, str]]
    unlabelled: int = 0
    centroids: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    vertebrae_found: int = 0
    #: stage 1's probability that a voxel is a cervical vertebra (C1, C2 or C3-C7), model
    #: grid: the outline :func:`refine_to_source` draws on the source grid
    foreground: np.ndarray | None = None
    #: (mm along z, level or None) of every vertebra below C2 found with a body of its own,
    #: named or not: what :func:`segment` compares between two reads of one scan
    bodies: tuple[tuple[float, str | None], ...] = ()
    #: mm along z of every piece of vertebra below C2 that no body peak reached (counted
    #: through, never named): where a vertebra is, for :func:`folds`
    pieces: tuple[float, ...] = ()

    @property
    def assessed(self) -> list[str]:
        return [level for level in LEVELS if self.status[level][0] is AssessmentValues.ASSESSED]


@dataclass
class _Vertebra:
    kind: int  # CLASS_C1, CLASS_C2, CLASS_SUBAXIAL or CLASS_LOWER
    mask: np.ndarray  # boolean, model grid
    anchor_z: float  # mm along z, for ordering
    top_z: float
    bottom_z: float
    confidence: float


def _largest_component(mask: np.ndarray) -> np.ndarray:
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())[1:]
    return pieces == (int(np.argmax(sizes)) + 1)


def _grow(seeds: np.ndarray, region: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled ``seeds`` through ``region`` one voxel per step (geodesic), so a
    vertebra's arch stays with its own body rather than the nearest neighbour's."""
    out = seeds.copy()
    cross = ndimage.generate_binary_structure(3, 1)
    for _ in range(steps):
        grown = ndimage.grey_dilation(out, footprint=cross)
        free = (out == 0) & region & (grown > 0)
        if not free.any():
            break
        out[free] = grown[free]
    return out


def body_peaks(heat: np.ndarray, allowed: np.ndarray, spacing: Sequence[float],
               gates: Gates = GATES) -> np.ndarray:
    """Vertebral body centres from the heat map: local maxima of the lightly smoothed
    map inside ``allowed`` (vertebra classes, one voxel around them), above
    ``gates.peak_threshold`` and ``gates.peak_relative`` of the strongest, at most one
    per ``gates.peak_separation_mm`` along z (the strongest wins)."""
    smooth = ndimage.gaussian_filter(heat.astype(np.float32), 0.8)
    candidates = (smooth == ndimage.maximum_filter(smooth, size=3)) & (smooth > gates.peak_threshold)
    candidates &= ndimage.binary_dilation(allowed)
    found = np.zeros(heat.shape, bool)
    if not candidates.any():
        return found
    coords = np.argwhere(candidates)
    values = smooth[candidates]
    floor = max(gates.peak_threshold, gates.peak_relative * float(values.max()))
    taken: list[float] = []
    sz = float(spacing[0])
    for index in np.argsort(-values, kind="stable"):
        if values[index] < floor:
            break
        z_mm = float(coords[index][0]) * sz
        if all(abs(z_mm - other) >= gates.peak_separation_mm for other in taken):
            taken.append(z_mm)
            found[tuple(coords[index])] = True
    return found


def _find_vertebrae(classes: np.ndarray, confidence: np.ndarray, peaks: np.ndarray,
                    spacing: Sequence[float], gates: Gates) -> list[_Vertebra]:
    sz = float(spacing[0])
    found: list[_Vertebra] = []

    def describe(kind: int, mask: np.ndarray, anchor_z: float | None = None) -> _Vertebra:
        zs = np.nonzero(mask.any(axis=(1, 2)))[0]
        centre = float(np.nonzero(mask)[0].mean())
        return _Vertebra(kind, mask, (centre if anchor_z is None else anchor_z) * sz,
                         float(zs.min()) * sz, float(zs.max() + 1) * sz,
                         float(confidence[mask].mean()))

    voxel_mm3 = float(np.prod(np.asarray(spacing, float)))
    for kind, least in ((CLASS_C1, gates.min_c1_mm3), (CLASS_C2, gates.min_c2_mm3)):
        mask = classes == kind
        if int(mask.sum()) >= 20:
            vertebra = describe(kind, _largest_component(mask))
            if int(vertebra.mask.sum()) * voxel_mm3 < least:
                vertebra.confidence = 0.0  # too small to be delineated: never assessed
            found.append(vertebra)
    region = (classes == CLASS_SUBAXIAL) | (classes == CLASS_LOWER)
    if region.any():
        seeds = np.zeros(classes.shape, np.int32)
        near = ndimage.binary_dilation(peaks & ndimage.binary_dilation(region), iterations=2) & region
        pieces, count = ndimage.label(near, structure=np.ones((3, 3, 3)))
        seeds[:] = pieces
        instances = _grow(seeds, region, steps=30)
        for index in range(1, count + 1):
            mask = instances == index
            if int(mask.sum()) < 20:
                continue
            # The kind is the body's (around the peak): a long, steep spinous process may
            # look thoracic, the body is what tells.
            kinds = classes[pieces == index]
            kind = CLASS_LOWER if (kinds == CLASS_LOWER).mean() > 0.5 else CLASS_SUBAXIAL
            peak_z = float(np.nonzero(pieces == index)[0].mean())
            found.append(describe(kind, mask, anchor_z=peak_z))
        # A sizeable piece of vertebra no peak reached is a vertebra the count would miss,
        # unless it lies level with a vertebra that has its peak (then it is a piece of
        # that one, e.g. a process the growth did not reach, not a vertebra of its own).
        seeded = [(v.top_z, v.bottom_z) for v in found if v.kind in (CLASS_SUBAXIAL, CLASS_LOWER)]
        left, pieces_left = ndimage.label(region & (instances == 0), structure=np.ones((3, 3, 3)))
        if pieces_left:
            sizes = np.bincount(left.ravel())[1:]
            for index in np.nonzero(sizes >= 150)[0] + 1:
                mask = left == index
                kinds = classes[mask]
                kind = CLASS_LOWER if (kinds == CLASS_LOWER).mean() > 0.5 else CLASS_SUBAXIAL
                vertebra = describe(kind, mask)
                if any(top <= vertebra.anchor_z <= bottom for top, bottom in seeded):
                    continue
                vertebra.confidence = 0.0  # never labelled: it only breaks a count through it
                found.append(vertebra)
    return sorted(found, key=lambda v: v.anchor_z)


def has_ribs(image: np.ndarray, vertebra: _Vertebra, spacing: Sequence[float],
             bone: float = 0.2, lateral_mm: float = 38.0) -> bool:
    """Whether bone lies beside ``vertebra`` where only a rib can be: more than
    ``lateral_mm`` to either side of it, level with it, not in front of its body (the
    clavicles are). ``image`` is normalised CT (``bone`` = 200 HU)."""
    z, y, x = np.nonzero(vertebra.mask)
    sz, sy, sx = (float(v) for v in spacing)
    z0, z1 = int(z.min()), int(z.max()) + 1
    ys = (np.arange(image.shape[1]) - y.mean()) * sy
    xs = (np.arange(image.shape[2]) - x.mean()) * sx
    window = (np.abs(xs)[None, :] > lateral_mm) & (ys[:, None] > -15.0) & (ys[:, None] < 45.0)
    dense = (image[z0:z1] > bone) & window[None]
    return bool(dense[..., xs < 0].sum() >= 4 and dense[..., xs > 0].sum() >= 4)


def _surround_hu(image: np.ndarray, mask: np.ndarray, hu_scale: float) -> float:
    """Median HU of a 3-voxel shell around ``mask`` (``image`` normalised by ``hu_scale``)."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    box = tuple(slice(max(0, b.start - 3), b.stop + 3) for b in box)
    local = mask[box]
    shell = ndimage.binary_dilation(local, iterations=3) & ~local
    return float(np.median(image[box][shell])) * hu_scale if shell.any() else float("-inf")


def _median_step(heights: Sequence[float]) -> float:
    """The median step (mm) between successive vertebra heights in cranio-caudal order,
    held to 10-24 mm; 16 with fewer than two heights."""
    steps = np.diff(heights)
    return float(np.clip(np.median(steps) if len(steps) else 16.0, 10.0, 24.0))


def identify_levels(classes: np.ndarray, confidence: np.ndarray, heat: np.ndarray,
                    spacing: Sequence[float], gates: Gates = GATES,
                    image: np.ndarray | None = None,
                    hu_scale: float = float(SEGMENTATION_PREPROCESSING["hu_scale"])) -> LevelMap:
    """Name the vertebrae stage 1 found by anatomy (see the module docstring).

    With ``image`` (the normalised model-grid CT, HU / ``hu_scale``), T1 serves as an anchor
    only where ribs are seen beside it (:func:`has_ribs`), and a vertebra must stand in soft
    tissue (``gates.max_surround_hu``)."""
    sz = float(spacing[0])
    extent = classes.shape[0] * sz
    peaks = body_peaks(heat, classes > 0, spacing, gates)
    vertebrae = _find_vertebrae(classes, confidence, peaks, spacing, gates)
    names: dict[int, str] = {}
    # A vertebra classed thoracolumbar with subaxial vertebrae right above and right below
    # it is a cervical one whose body stage 1 misread (no neck holds a thoracic vertebra
    # between two cervical ones): it takes its place in the chain as subaxial, rather than
    # failing the order check and leaving every level unassessed.
    column = sorted((v for v in vertebrae if v.kind in (CLASS_SUBAXIAL, CLASS_LOWER)),
                    key=lambda v: v.anchor_z)
    for above, middle, below in zip(column, column[1:], column[2:], strict=False):
        if middle.kind == CLASS_LOWER and above.kind == below.kind == CLASS_SUBAXIAL:
            middle.kind = CLASS_SUBAXIAL
    by_kind = {kind: [i for i, v in enumerate(vertebrae) if v.kind == kind]
               for kind in (CLASS_C1, CLASS_C2, CLASS_SUBAXIAL, CLASS_LOWER)}
    c1 = by_kind[CLASS_C1][0] if by_kind[CLASS_C1] else None
    c2 = by_kind[CLASS_C2][0] if by_kind[CLASS_C2] else None
    subs = by_kind[CLASS_SUBAXIAL]
    lowers = by_kind[CLASS_LOWER]
    # C1 or C2 holding the body centre of a vertebra below (a heat-map peak: the heat marks
    # C3 downwards) has grown into it: neither gets a name nor anchors a count.
    overgrown: set[int] = {i for i in (c1, c2) if i is not None and (peaks & vertebrae[i].mask).any()}
    order_ok = True
    anchored = False  # C2 or T1 (with its ribs) seen, so a count could start
    cut_c2 = False  # C2 cut by the field's top edge, too short to be told from C3
    # Order: C1 above C2 above every subaxial vertebra above every thoracolumbar one.
    chain = [i for i in (c1, c2) if i is not None] + subs + lowers
    zs = [vertebrae[i].anchor_z for i in chain]
    if any(b < a for a, b in zip(zs, zs[1:], strict=False)):
        order_ok = False
    if order_ok:
        typical = _median_step([vertebrae[i].anchor_z for i in subs + lowers[:1]])
        if c2 is not None and vertebrae[c2].bottom_z - vertebrae[c2].top_z > gates.max_c2_height_steps * typical:
            overgrown.add(c2)
        if c2 is not None and vertebrae[c2].confidence < gates.min_confidence:
            # A fragment of C2 (too small or too unsure to delineate): the rest of it may
            # have been read as a subaxial vertebra, and a count from it would name that
            # piece C3 and every vertebra below one level too low.
            overgrown.add(c2)
        sizes = [int(vertebrae[i].mask.sum()) for i in subs]
        usual = float(np.median(sizes)) if sizes else 0.0
        # C2 at the field's top edge with no C1 in view (C1 seen means a piece of it that
        # could be delineated, not a fragment at the edge)
        c1_seen = c1 is not None and vertebrae[c1].confidence >= gates.min_confidence
        c2_at_top = c2 is not None and not c1_seen and vertebrae[c2].top_z < 2 * sz
        if (c2 is not None and c2_at_top and usual
                and int(vertebrae[c2].mask.sum()) < gates.min_cut_c2_size_ratio * usual):
            # A sliver at the field's top edge (the last of C2, or the top of C3 misread as
            # C2 above the rest of C3): named C2 it would sit on the wrong bone.
            overgrown.add(c2)
        # Cut by the top of the field with neither C1 nor the dens in view, nothing in the
        # image tells a C2 body from a C3 (a C3 at the top of another generator's field was
        # read as C2, every name below it one level up): such a C2 is named, and counted
        # from, only where a count up from T1 confirms it (below).
        cut_c2 = (c2 is not None and c2 not in overgrown and c2_at_top
                  and vertebrae[c2].bottom_z - vertebrae[c2].top_z
                  < gates.min_cut_c2_height_steps * typical)
        if c1 is not None and c1 not in overgrown:
            names[c1] = "C1"
        if c2 is not None and c2 not in overgrown:
            if not cut_c2:
                names[c2] = "C2"
        else:
            c2 = None  # no count down from it

        def plausible(v: _Vertebra) -> bool:
            # Two vertebrae grown into one (a missed peak) are too tall or too big for one.
            # A fragment (a piece of a neighbour with a peak of its own) is too small. C2
            # (body and dens) is taller than the others by nature: it has its own limit.
            tallest = gates.max_c2_height_steps if v.kind == CLASS_C2 else gates.max_height_steps
            return (v.bottom_z - v.top_z <= tallest * typical
                    and (not usual or v.kind != CLASS_SUBAXIAL
                         or gates.min_size_ratio * usual <= int(v.mask.sum()) <= gates.max_size_ratio * usual))

        def linked(upper: _Vertebra, lower: _Vertebra) -> bool:
            return (plausible(upper) and plausible(lower)
                    and lower.anchor_z - upper.anchor_z <= gates.max_step_ratio * typical
                    and lower.top_z - upper.bottom_z <= gates.max_neighbour_gap_mm)

        down: dict[int, str] = {}
        if c2 is not None and subs and linked(vertebrae[c2], vertebrae[subs[0]]):
            for n, i in enumerate(subs):
                if n and not linked(vertebrae[subs[n - 1]], vertebrae[i]):
                    break
                if 3 + n > 7:
                    break
                down[i] = f"C{3 + n}"
        up: dict[int, str] = {}
        t1_seen = bool(lowers) and (image is None or has_ribs(image, vertebrae[lowers[0]], spacing))
        if (t1_seen and subs and image is not None
                and has_ribs(image, vertebrae[subs[-1]], spacing, lateral_mm=gates.ribs_above_t1_mm)):
            # The vertebra above "T1" has ribs as well: T1 may have been read as cervical and
            # T2 taken for T1, so a count up would shift every name by a level.
            t1_seen = False
        if t1_seen and subs and linked(vertebrae[subs[-1]], vertebrae[lowers[0]]):
            for n, i in enumerate(reversed(subs)):
                if n and not linked(vertebrae[i], vertebrae[subs[len(subs) - n]]):
                    break
                if 7 - n < 3:
                    # A sixth vertebra in one unbroken chain above "T1": no neck has one, so
                    # the count started on the wrong vertebra (a T1 read as cervical, the
                    # vertebra with ribs below it taken for T1) and every name from it would
                    # be shifted by a level. No name from this count.
                    up = {}
                    break
                up[i] = f"C{7 - n}"
        if down and up and any(down.get(i, name) != name for i, name in up.items()):
            down, up = {}, {}  # the two counts disagree: a vertebra was missed or misread
        if cut_c2 and c2 is not None:
            if set(down) & set(up):
                names[c2] = "C2"  # confirmed by the count up from T1
            else:
                down = {}
        anchored = (c2 is not None and not cut_c2) or t1_seen
        if up and not down and c2 is not None:
            # Counted up from T1 with C2 in view: the space between C2 and the highest level
            # counted must hold the levels in between (none for C3, one for C4, ...). A C2
            # cut by the first slice is held to this too: if it is C3, or the count up
            # started on C7, the two cannot both be right, and neither names anything.
            top = min(up, key=lambda i: vertebrae[i].anchor_z)
            between = int(up[top][1]) - 3
            room = vertebrae[top].top_z - vertebrae[c2].bottom_z
            # ... and no more vertebrae with a body of their own than that: a count up that
            # started on T2 (T1 read as cervical) stops at a piece it cannot link, with
            # that piece still between C2 and its "C3"
            found_between = sum(1 for i, v in enumerate(vertebrae)
                                if i not in up and v.kind in (CLASS_SUBAXIAL, CLASS_LOWER)
                                and v.confidence > 0
                                and vertebrae[c2].anchor_z < v.anchor_z < vertebrae[top].anchor_z)
            if (abs(room - between * typical) > gates.room_tolerance_steps * typical
                    or found_between > between):
                up = {}
        names.update(down)
        names.update(up)
    labels = np.zeros(classes.shape, np.uint8)
    status: dict[str, tuple[AssessmentValues, str]] = {}
    centroids: dict[str, tuple[float, float, float]] = {}
    unlabelled = 0
    for i, vertebra in enumerate(vertebrae):
        if vertebra.kind == CLASS_LOWER:
            continue
        name = names.get(i)
        if name is None:
            unlabelled += 1
            continue
        if name in status:
            continue
        if vertebra.confidence < gates.min_confidence:
            status[name] = (AssessmentValues.NOT_ASSESSABLE,
                            f"{name} could not be delineated with confidence")
            continue
        if image is not None and _surround_hu(image, vertebra.mask, hu_scale) > gates.max_surround_hu:
            status[name] = (AssessmentValues.NOT_ASSESSABLE,
                            f"{name}: what was found does not stand in soft tissue as a vertebra does")
            continue
        labels[vertebra.mask] = LEVELS.index(name) + 1
        status[name] = (AssessmentValues.ASSESSED, "")
        centroids[name] = tuple(float(np.mean(axis)) for axis in np.nonzero(vertebra.mask))
    labelled = [v for i, v in enumerate(vertebrae) if i in names]
    top_edge = min((v.top_z for v in labelled), default=None)
    bottom_edge = max((v.bottom_z for v in labelled), default=None)
    for number, level in enumerate(LEVELS, start=1):
        if level in status:
            continue
        if level == "C2" and cut_c2 and "C2" not in names.values():
            status[level] = (AssessmentValues.NOT_ASSESSABLE,
                             "C2 is cut by the first slice: without C1 or the dens in view it cannot "
                             "be told from C3")
        elif not order_ok:
            status[level] = (AssessmentValues.NOT_ASSESSABLE,
                             "The vertebrae found are not in a plausible order")
        elif unlabelled and anchored:
            status[level] = (AssessmentValues.NOT_ASSESSABLE,
                             f"{level} could not be identified (the count of levels from C2 or T1 "
                             "stopped at a vertebra that could not be told apart from its neighbour)")
        elif unlabelled:
            status[level] = (AssessmentValues.NOT_ASSESSABLE,
                             f"{level} could not be identified (C2 or T1 must be in view to count levels)")
        elif top_edge is not None and top_edge < 2 * sz and all(
                int(n[1]) > number for n in status if status[n][0] is AssessmentValues.ASSESSED):
            status[level] = (AssessmentValues.NOT_IN_FIELD, f"{level} is above the first slice")
        elif bottom_edge is not None and bottom_edge > extent - 2 * sz and all(
                int(n[1]) < number for n in status if status[n][0] is AssessmentValues.ASSESSED):
            status[level] = (AssessmentValues.NOT_IN_FIELD, f"{level} is below the last slice")
        else:
            status[level] = (AssessmentValues.NOT_ASSESSABLE, f"{level} was not found")
    bodies = tuple((v.anchor_z, names.get(i) if i in names and names[i] in status
                    and status[names[i]][0] is AssessmentValues.ASSESSED else None)
                   for i, v in enumerate(vertebrae)
                   if v.kind in (CLASS_SUBAXIAL, CLASS_LOWER) and v.confidence > 0)
    pieces = tuple(v.anchor_z for v in vertebrae
                   if v.kind in (CLASS_SUBAXIAL, CLASS_LOWER) and v.confidence <= 0)
    return LevelMap(labels, status, unlabelled, centroids,
                    vertebrae_found=sum(v.kind != CLASS_LOWER for v in vertebrae), bodies=bodies,
                    pieces=pieces)


# --------------------------------------------------------------- stage 2 crops


def vertebra_crop(hu: np.ndarray, spacing: Sequence[float], box_mm: np.ndarray,
                  crop_shape: Sequence[int], margin_mm: float,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """HU samples on a ``crop_shape`` grid spanning ``box_mm`` ((lo, hi) per axis, mm from
    the volume's corner) plus ``margin_mm``, from the volume at its own resolution.
    ``rng`` jitters the box (training)."""
    lo, hi = np.asarray(box_mm[0], float), np.asarray(box_mm[1], float)
    centre, half = (lo + hi) / 2, (hi - lo) / 2 + margin_mm
    if rng is not None:
        centre = centre + rng.normal(0.0, 0.06, size=3) * half
        half = half * rng.uniform(0.9, 1.1, size=3)
    grids = [(np.linspace(c - h, c + h, n) / s) - 0.5
             for c, h, n, s in zip(centre, half, crop_shape, spacing, strict=True)]
    coords = np.meshgrid(*grids, indexing="ij")
    return ndimage.map_coordinates(hu, coords, order=1, mode="constant",
                                   cval=-1000.0).astype(np.float32)


def level_boxes_mm(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, np.ndarray]:
    """Bounding box (mm, (lo, hi) x 3) of every labelled level in a label map."""
    boxes = {}
    step = np.asarray(spacing, float)
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int32), max_label=len(LEVELS))):
        if box is None:
            continue
        lo = np.array([s.start for s in box], float) * step
        hi = np.array([s.stop for s in box], float) * step
        boxes[LEVELS[index]] = np.stack([lo, hi])
    return boxes


@dataclass(frozen=True)
class VertebraFrame:
    """A vertebra's own box: centre (mm from the volume's corner, z y x), the rotation whose
    rows are its axes in (z, y, x) - row 0 along the spine (head to feet), row 1 front to
    back, row 2 across - and the half extents (mm) of the vertebra along them."""

    centre: np.ndarray
    axes: np.ndarray
    half: np.ndarray


def _frame_axes(axis: np.ndarray) -> np.ndarray:
    """Rows (spine, front-back, across) of a right-handed frame whose first row is ``axis``
    (z y x), the across row as close to the scanner's x as the spine axis allows."""
    ez = axis / np.linalg.norm(axis)
    ex = np.array([0.0, 0.0, 1.0]) - ez[2] * ez
    ex /= np.linalg.norm(ex)
    ey = np.cross(ex, ez)  # (z, y, x) components; keeps the anterior-posterior sense of y
    if ey[1] < 0:
        ey = -ey
    return np.stack([ez, ey, ex])


def vertebra_frames(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, VertebraFrame]:
    """The frame of every labelled level (1..7 = C1..C7, more labels allowed) in ``labels``.

    The spine axis at a level runs between the centres of its nearest labelled neighbours
    above and below (or itself and its one neighbour), at most :data:`MAX_AXIS_TILT_DEG`
    from z; a level alone keeps the scanner's axes. The extents are the vertebra's own
    along those axes, so the crop holds the whole vertebra however the neck is bent."""
    step = np.asarray(spacing, float)
    points: dict[int, np.ndarray] = {}
    for index, box in enumerate(ndimage.find_objects(labels.astype(np.int32)), start=1):
        if box is None:
            continue
        where = np.nonzero(labels[box] == index)
        if not len(where[0]):
            continue
        offset = np.array([s.start for s in box], float)
        points[index] = (np.stack(where, axis=1) + offset + 0.5) * step
    centres = {k: v.mean(axis=0) for k, v in points.items()}
    order = sorted(centres)
    frames = {}
    for index in order:
        if index > len(LEVELS):
            continue
        above = [k for k in order if k < index]
        below = [k for k in order if k > index]
        top = centres[above[-1]] if above else centres[index]
        bottom = centres[below[0]] if below else centres[index]
        axis = bottom - top
        if np.linalg.norm(axis) < 1e-6 or axis[0] <= 0:
            axis = np.array([1.0, 0.0, 0.0])
        axis = axis / np.linalg.norm(axis)
        limit = np.cos(np.radians(MAX_AXIS_TILT_DEG))
        if axis[0] < limit:  # tilted too far: keep the direction, at the limit
            side = axis.copy()
            side[0] = 0.0
            side /= np.linalg.norm(side)
            axis = limit * np.array([1.0, 0.0, 0.0]) + np.sqrt(1 - limit ** 2) * side
        rows = _frame_axes(axis)
        local = (points[index] - centres[index]) @ rows.T
        lo, hi = local.min(axis=0) - step.max() / 2, local.max(axis=0) + step.max() / 2
        frames[LEVELS[index - 1]] = VertebraFrame(centres[index] + ((lo + hi) / 2) @ rows, rows,
                                                  (hi - lo) / 2)
    return frames


def oriented_crop(hu: np.ndarray, spacing: Sequence[float], frame: VertebraFrame,
                  crop_shape: Sequence[int], half_mm: Sequence[float] | np.ndarray,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """HU samples on a ``crop_shape`` grid spanning ``half_mm`` either side of ``frame``'s
    centre along its axes. ``rng`` jitters the centre and the scale and tilts the axes by
    a few degrees (training: the axis of a real read is an estimate)."""
    centre, axes, half = frame.centre, frame.axes, np.asarray(half_mm, float)
    if rng is not None:
        centre = centre + (rng.normal(0.0, 0.06, size=3) * half) @ axes
        half = half * rng.uniform(0.85, 1.2) * rng.uniform(0.95, 1.05, size=3)
        tilt = rng.normal(0.0, np.radians(4.0), size=3)
        axes = _frame_axes(axes[0] + tilt[0] * axes[1] + tilt[1] * axes[2])
    local = [np.linspace(-h, h, n) for h, n in zip(half, crop_shape, strict=True)]
    grid = np.stack(np.meshgrid(*local, indexing="ij"), axis=-1)  # (d, h, w, 3) local mm
    world = centre + grid @ axes
    coords = np.moveaxis(world / np.asarray(spacing, float) - 0.5, -1, 0)
    return ndimage.map_coordinates(hu, coords, order=1, mode="constant",
                                   cval=-1000.0).astype(np.float32)


def stage2_crops(hu: np.ndarray, spacing: Sequence[float], labels: np.ndarray,
                 labels_spacing: Sequence[float], preprocessing: dict[str, Any],
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Stage 2's input crop (not yet normalised) of every level labelled in ``labels``
    (on a grid of ``labels_spacing``, same extent as ``hu``), as ``preprocessing`` asks."""
    shape = tuple(int(n) for n in preprocessing["crop_shape"])
    margin = float(preprocessing["crop_margin_mm"])
    if preprocessing.get("crop_frame", LEGACY_CROP_FRAME) == "vertebra":
        frames = vertebra_frames(labels, labels_spacing)
        step = preprocessing.get("crop_spacing_mm")

        def half(frame: VertebraFrame) -> np.ndarray:
            if step is None:
                return frame.half + margin
            return (np.asarray(shape, float) - 1) / 2 * np.asarray(step, float)

        return {name: oriented_crop(hu, spacing, frame, shape, half(frame), rng=rng)
                for name, frame in frames.items()}
    boxes = level_boxes_mm(labels, labels_spacing)
    return {name: vertebra_crop(hu, spacing, box, shape, margin, rng=rng) for name, box in boxes.items()}


def normalise_crop(hu: np.ndarray, preprocessing: dict[str, Any] | None = None) -> np.ndarray:
    pre = {**FRACTURE_PREPROCESSING, **(preprocessing or {})}
    low, high = (float(v) for v in pre["hu_window"])
    return (np.clip(hu, low, high) / float(pre["hu_scale"])).astype(np.float32)


# ----------------------------------------------------------------------- pipeline


def _single_output(outputs: dict[str, np.ndarray], card: Any) -> np.ndarray:
    name = card.outputs[0].name
    if name not in outputs:
        raise PipelineError(f"{PIPELINE_NAME}: model {card.name} returned no output {name!r}")
    return np.asarray(outputs[name])


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the classes of stage 1's ``(C + 1, D, H, W)`` logits, ``(C, D, H, W)``."""
    class_logits = logits[:HEATMAP_CHANNEL].astype(np.float32)
    probabilities = np.exp(class_logits - class_logits.max(axis=0, keepdims=True))
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    return probabilities


def split_stage1(logits: np.ndarray, probabilities: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes, class confidence and heat map from stage 1's ``(C + 1, D, H, W)`` logits
    (``probabilities``: their :func:`class_probabilities`, when already computed)."""
    if probabilities is None:
        probabilities = class_probabilities(logits)
    classes = probabilities.argmax(axis=0).astype(np.uint8)
    heat = 1.0 / (1.0 + np.exp(-logits[HEATMAP_CHANNEL].astype(np.float32)))
    return classes, probabilities.max(axis=0), heat


def segment(engine: object, volume: CtVolume,
            gates: Gates = GATES) -> tuple[LevelMap, tuple[float, float, float]]:
    """Stage 1 and level identification on the model grid.

    Patients differ in size more than the training phantoms do, and stage 1 splits or
    merges vertebrae that look much larger or smaller than it learned. Where the card's
    grid leaves levels unidentified, the scan is read again on grids scaled by
    ``gates.grid_scales`` (a coarser grid shows a large patient's vertebrae at the size
    stage 1 knows), and :func:`choose_read` keeps one. Each read is held to every
    anatomical check on its own, in millimetres, so a second read adds levels only where
    they are identified by anatomy; a read that folded two vertebrae the first read tells
    apart, or that two other reads contradict, is not kept."""
    card = engine_card(engine)
    pre = {**SEGMENTATION_PREPROCESSING, **card.preprocessing}
    base = tuple(float(s) for s in pre["spacing_mm"])
    reads: list[tuple[LevelMap, tuple[float, float, float]]] = []
    for scale in gates.grid_scales:
        spacing = (base[0] * scale, base[1] * scale, base[2] * scale)
        image = normalise(resample(volume.hu, volume.spacing, spacing), pre)
        low = float(pre["hu_window"][0]) / float(pre["hu_scale"])
        padded, unpad = pad_to_multiple(image, int(pre["pad_multiple"]), low)
        outputs = engine.infer({card.inputs[0].name: padded[None, None]})  # type: ignore[attr-defined]
        logits = _single_output(outputs, card)[0][(slice(None), *unpad)]
        probabilities = class_probabilities(logits)
        classes, confidence, heat = split_stage1(logits, probabilities)
        levels = identify_levels(classes, confidence, heat, spacing, gates, image=image,
                                 hu_scale=float(pre["hu_scale"]))
        levels.foreground = probabilities[[CLASS_C1, CLASS_C2, CLASS_SUBAXIAL]].sum(axis=0)
        reads.append((levels, spacing))
        # Stop once the read kept names every level, unless the last read contradicts an
        # earlier one (then the next grid's read settles it).
        if not _contradicted(reads, gates) and len(choose_read(reads, gates)[0].assessed) == len(LEVELS):
            break
    return choose_read(reads, gates)


Read = tuple[LevelMap, tuple[float, float, float]]


def _counts(read: Read, first: bool, gates: Gates) -> bool:
    """Whether a read's names are evidence: the first read's always, a scaled read's with
    at least ``gates.min_rescaled_levels`` levels (one or two levels from a second look are
    weak evidence: a chest CT's T2 read as "C7" on the 1.2 grid)."""
    return first or len(read[0].assessed) >= gates.min_rescaled_levels


def _contradicted(reads: Sequence[Read], gates: Gates) -> bool:
    """Whether the last read names a vertebra otherwise than an earlier one."""
    if len(reads) < 2 or not _counts(reads[-1], False, gates):
        return False
    return any(names_differ(read[0], reads[-1][0], gates)
               for k, read in enumerate(reads[:-1]) if _counts(read, k == 0, gates))


def choose_read(reads: Sequence[Read], gates: Gates = GATES) -> Read:
    """The read :func:`segment` keeps, from the reads in the order they were made (the
    card's grid first): the one that identifies the most levels, the first on a tie; a
    scaled read only with at least ``gates.min_rescaled_levels`` levels, and never one
    that folded two vertebrae the first read tells apart (:func:`folds`). A read that
    names a vertebra otherwise than two other reads is outvoted and not used
    (:func:`names_differ`); where two reads disagree and no third settles it, the one
    naming more levels is kept (on the benchmark's second generator it was right in 5 of
    6 such scans). Where every read is outvoted, no level is named (:func:`unnamed`)."""
    if not reads:
        raise ValueError("Gates.grid_scales is empty: stage 1 needs at least one grid")
    # Reads whose names count: the first, and scaled reads with enough levels that did
    # not fold two vertebrae into one (a folded read's names are not evidence).
    counting = [k for k, read in enumerate(reads) if _counts(read, k == 0, gates)
                and not (k and folds(reads[0][0], read[0], gates))]
    outvoted = {k for k in counting
                if sum(names_differ(reads[m][0], reads[k][0], gates) for m in counting if m != k) >= 2}
    best: Read | None = None
    for k in counting:
        if k not in outvoted and (best is None or len(reads[k][0].assessed) > len(best[0].assessed)):
            best = reads[k]
    if best is None:
        return unnamed(reads[0][0], "the reads of the scan named the same vertebrae differently, "
                       "so no level could be identified with confidence"), reads[0][1]
    return best


def unnamed(levels: LevelMap, reason: str) -> LevelMap:
    """``levels`` with no vertebra named: every level C1-C7 not assessable for ``reason``."""
    found = max(levels.vertebrae_found, len(levels.assessed) + levels.unlabelled)
    return LevelMap(np.zeros_like(levels.labels), {level: (AssessmentValues.NOT_ASSESSABLE, reason)
                                                   for level in LEVELS},
                    unlabelled=found, vertebrae_found=found, foreground=levels.foreground,
                    bodies=tuple((z, None) for z, _ in levels.bodies))


def _typical_step(levels: LevelMap) -> float:
    """The median height step between a read's bodies (:func:`_median_step`)."""
    return _median_step(sorted(z for z, _ in levels.bodies))


def names_differ(one: LevelMap, other: LevelMap, gates: Gates = GATES) -> bool:
    """Whether a body both reads found at the same height (within
    ``gates.max_read_offset_steps`` of the smaller of their median steps) carries a
    different level in each: one of the two counts is wrong, and nothing says which.
    Symmetric in its two reads."""
    near = gates.max_read_offset_steps * min(_typical_step(one), _typical_step(other))
    return any(a and b and a != b and abs(y - z) < near
               for y, a in one.bodies for z, b in other.bodies)


def folds(first: LevelMap, scaled: LevelMap, gates: Gates = GATES) -> bool:
    """Whether a read on a scaled grid folded two vertebrae the card-grid read tells apart.

    A coarser grid can fold two vertebrae into one, and a count through them names every
    vertebra beyond one level wrong; nothing within that read tells (the folded pair is as
    tall and as evenly spaced as the others on that grid), but the first read holds both
    bodies: two of its bodies at least ``gates.min_fold_steps`` of its median step apart
    have the same body of the scaled read as their nearest (and the scaled read names a
    level). The other way round, a first read that folded two vertebrae the scaled read
    tells apart, is what the scaled read is for. (A first read that split one large
    vertebra into two body peaks is held apart by the step: its halves lie 7-10 mm apart,
    under 0.6 of a step; no such scan changed among 400 of either generator at +-15 %
    size.)"""
    ours = sorted(z for z, _ in first.bodies)
    if len(ours) < 2 or not any(name for _, name in scaled.bodies):
        return False
    typical = _typical_step(first)
    near = gates.max_read_offset_steps * typical
    # where the scaled read has a vertebra: its bodies, and the pieces no peak reached
    # (a count steps through those, so a vertebra there is not folded into a neighbour)
    heights = np.array(sorted([z for z, _ in scaled.bodies] + list(scaled.pieces)))
    # the first read's bodies within the scaled read's span (beyond it, every body has the
    # scaled read's last as its nearest)
    inside = [y for y in ours if heights[0] - near <= y <= heights[-1] + near]
    nearest = [int(np.argmin(np.abs(heights - y))) for y in inside]
    return any(nearest[k] == nearest[k + 1] and inside[k + 1] - inside[k] >= gates.min_fold_steps * typical
               for k in range(len(inside) - 1))


def classify(engine: object, volume: CtVolume, levels: LevelMap,
             model_spacing: Sequence[float]) -> tuple[dict[str, float], float]:
    """Stage 2: fracture probability per assessed level, and the card's threshold."""
    card = engine_card(engine)
    pre = {**FRACTURE_PREPROCESSING, "crop_frame": LEGACY_CROP_FRAME, **card.preprocessing}
    threshold = float(pre.get("threshold", 0.5))
    tta = dict(pre.get("test_time_augmentation") or {})
    unknown = set(tta) - TTA_KEYS
    if unknown:
        raise PipelineError(f"{PIPELINE_NAME}: model {card.name} asks for test-time augmentation "
                            f"this pipeline does not know: {', '.join(sorted(unknown))}")
    margins = [float(m) for m in tta.get("margins_mm", [pre["crop_margin_mm"]])]
    reads: list[np.ndarray] = []
    names: list[str] = []
    for margin in margins:
        found = stage2_crops(volume.hu, volume.spacing, levels.labels, model_spacing,
                             {**pre, "crop_margin_mm": margin})
        names = [name for name in LEVELS if name in found]
        if not names:
            return {}, threshold
        crops = np.stack([normalise_crop(found[name], pre) for name in names])
        for view in ([crops, np.ascontiguousarray(crops[..., ::-1])] if tta.get("mirror") else [crops]):
            outputs = engine.infer({card.inputs[0].name: view[None]})  # type: ignore[attr-defined]
            reads.append(_single_output(outputs, card)[0].astype(np.float64))
    probabilities = reads[0]
    if len(reads) > 1:
        p = np.clip(np.stack(reads), 1e-7, 1 - 1e-7)
        probabilities = 1.0 / (1.0 + np.exp(-np.mean(np.log(p) - np.log1p(-p), axis=0)))
    return {name: float(p) for name, p in zip(names, probabilities, strict=True)}, threshold


def rule_out_threshold(engine: object, threshold: float) -> float | None:
    """The card's rule-out operating point (``preprocessing.rule_out_threshold``), or None
    where the card gives none or one that is not below the rule-in ``threshold``."""
    value = engine_card(engine).preprocessing.get("rule_out_threshold")
    if value is None:
        return None
    value = float(value)
    return value if 0.0 <= value < threshold else None


def _not_performed(reason: str, volume_or_files: CtVolume | Sequence[Path],
                   models: tuple[Any, ...] = ()) -> Findings:
    from spine_node.inference.findings import ModelInfo

    if isinstance(volume_or_files, CtVolume):
        study, series, sops = (volume_or_files.study_uid, volume_or_files.series_uid,
                               volume_or_files.sop_instance_uids)
    else:
        import pydicom

        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in volume_or_files]
        study = str(headers[0].get("StudyInstanceUID", "")) if headers else ""
        series = str(headers[0].get("SeriesInstanceUID", "")) if headers else ""
        sops = tuple(str(h.get("SOPInstanceUID", "")) for h in headers)
    info = models[-1] if models else ModelInfo(name=FRACTURE_MODEL, version="")
    return Findings(pipeline=PIPELINE_NAME, model=info, study_uid=study, series_uids=(series,),
                    source_sop_instance_uids=sops, models=tuple(models),
                    not_performed_reason=reason,
                    site_status=tuple(SiteStatus(level, AssessmentValues.NOT_ASSESSABLE, reason)
                                      for level in LEVELS))


@register(PIPELINE_NAME)
class CervicalSpineCtFracture:
    """DICOM CT series in, C1..C7 masks and fracture findings (or an abstention) out."""

    name = PIPELINE_NAME
    model_names = (SEGMENTATION_MODEL, FRACTURE_MODEL)

    def run(self, inputs: Sequence[SeriesRef], models: ModelProvider) -> Findings:
        if len(inputs) != 1:
            raise PipelineError(f"{PIPELINE_NAME} takes one CT series, got {len(inputs)}")
        ref = inputs[0]
        files = ref.files()
        if not files:
            raise PipelineError(f"{PIPELINE_NAME}: no instances in {ref.path}")
        try:
            volume = load_ct_series(files)
        except NotAssessableError as exc:
            return _not_performed(str(exc), files)
        return self.analyse(volume, models)

    def analyse(self, volume: CtVolume, models: ModelProvider, gates: Gates = GATES) -> Findings:
        """The pipeline on a volume already in memory (what :meth:`run` does after loading,
        the grid checks included)."""
        segmenter = models(SEGMENTATION_MODEL)
        classifier = models(FRACTURE_MODEL)
        infos = (model_info(segmenter), model_info(classifier))
        try:
            check_geometry(volume.spacing, volume.hu.shape[0], volume.slice_thickness_mm, gates)
        except NotAssessableError as exc:
            return _not_performed(str(exc), volume, infos)
        levels, model_spacing = segment(segmenter, volume, gates)
        if not levels.assessed:
            if levels.vertebrae_found:
                reason = "Cervical vertebrae were found but none could be identified and assessed"
            else:
                reason = "Cervical spine not in the field of view"
            findings = _not_performed(reason, volume, infos)
            findings.site_status = tuple(SiteStatus(level, *levels.status[level]) for level in LEVELS)
            return findings
        probabilities, threshold = classify(classifier, volume, levels, model_spacing)
        rule_out = rule_out_threshold(classifier, threshold)
        source_labels = refine_to_source(levels.labels, levels.foreground, model_spacing,
                                         volume.spacing, volume.hu.shape)
        frames = volume.to_source_frames(source_labels)
        status = dict(levels.status)
        for level in levels.assessed:
            if level not in probabilities or not (frames == LEVELS.index(level) + 1).any():
                status[level] = (AssessmentValues.NOT_ASSESSABLE, f"{level} is too small to assess")
        assessed = [level for level in LEVELS if status[level][0] is AssessmentValues.ASSESSED]
        frames = np.where(np.isin(frames, [LEVELS.index(level) + 1 for level in assessed]), frames, 0)
        findings = []
        ratio = np.asarray(model_spacing, float) / np.asarray(volume.spacing, float)
        for level in assessed:
            centroid = None
            if level in levels.centroids:
                index = (np.asarray(levels.centroids[level]) + 0.5) * ratio - 0.5
                centroid = volume.patient_mm(index)
            findings.append(Finding(kind="fracture", probability=probabilities[level], site=level,
                                    threshold=threshold, segment_label=LEVELS.index(level) + 1,
                                    centroid_mm=centroid, rule_out=rule_out))
        notes = []
        unclear = [f.site for f in findings if f.indeterminate]
        if unclear:
            notes.append(f"Fracture indeterminate at {', '.join(str(s) for s in unclear)}: the "
                         f"probability lies between the rule-out ({rule_out:g}) and rule-in "
                         f"({threshold:g}) operating points; please review")
        # The patient-level call exists where the assessed levels justify it: a level at or
        # above rule-out (the patient is then at least that), or every level assessed.
        flagged = any(f.present or f.indeterminate for f in findings)
        if flagged or len(assessed) == len(LEVELS):
            findings.append(Finding(kind="fracture",
                                    probability=max(probabilities[level] for level in assessed),
                                    threshold=threshold, rule_out=rule_out))
        else:
            notes.append("No patient-level result: not every level C1-C7 could be assessed")
        if levels.unlabelled:
            notes.append(f"{levels.unlabelled} cervical vertebra(e) found without an identifiable level "
                         "were not assessed")
        return Findings(
            pipeline=PIPELINE_NAME,
            model=infos[1],
            study_uid=volume.study_uid,
            series_uids=(volume.series_uid,),
            source_sop_instance_uids=volume.sop_instance_uids,
            findings=findings,
            segmentation=LabelMap(
                labels=frames.astype(np.uint8),
                source_sop_instance_uids=volume.sop_instance_uids,
                segments=tuple(Segment(LEVELS.index(level) + 1, level) for level in assessed),
            ),
            models=infos,
            site_status=tuple(SiteStatus(level, *status[level]) for level in LEVELS),
            notes=tuple(notes),
        )
