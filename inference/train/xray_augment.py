"""Randomised radiograph acquisition for the X-ray training recipes, and junk for the gate.

The phantoms' DRRs (:func:`spine_node.inference.phantoms.drr`) are noise-free parallel-beam
line integrals on the model's own millimetre grid. :func:`acquire` turns one into what a
detector might have recorded, after the pipelines' resampling to that grid: patient size,
rotation, position and flips; partial coverage and collimator shutters; scatter; blur;
quantum noise for 3e2-1e5 photons per detector pixel of 0.1-0.2 mm (binned to the grid as the
pipelines' block-mean resampling does, or in one draw in five not, since another generator
may state its dose per grid pixel); a random display curve;
burned-in markers and text. Every truth map the recipe gives travels through the same
geometry, so masks and lesion maps stay on their pixels.

:func:`junk` draws images that are not spine radiographs (noise, blank and gradient
frames, CT-like axial slices, chest-like and hand-like radiographs) for the view gate.
Nothing here reads the evaluation generator; these are this project's own guesses of what
a PACS may send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Junk kinds :func:`junk` draws, for the gate's "not a spine radiograph" class.
JUNK_KINDS = ("uniform_noise", "gaussian_noise", "blank", "gradient", "ct_slice", "chest",
              "hand", "speckle")


@dataclass(frozen=True)
class Acquisition:
    """The drawn acquisition of one image (all lengths in mm)."""

    rotation_deg: float
    scale: float            # patient size / magnification error
    attenuation: float      # thicker or thinner patient
    shift_mm: tuple[float, float]
    flip: bool
    detector_mm: float
    photons: float          # per detector pixel, unattenuated
    binned: bool            # detector pixels averaged into the grid pixel
    scatter: float          # scatter-to-primary fraction of the open beam
    blur_mm: float
    gamma: float
    coverage: tuple[float, float, float, float]   # top, bottom, left, right trimmed (fraction)
    shutter: bool           # trimmed edges are collimator shutters (bright) rather than absent
    markers: int


def draw(rng: np.random.Generator, *, max_rotation: float = 15.0, max_shift_mm: float = 12.0,
         coverage_chance: float = 0.3, max_trim: float = 0.2) -> Acquisition:
    """Draw an acquisition; ranges are the issue's (exposure 3e2-1e5 photons, rotation
    up to 15 degrees, 0.1-0.2 mm detector pixels) and a little wider where cheap."""
    trims = (0.0, 0.0, 0.0, 0.0)
    if rng.random() < coverage_chance:
        trims = tuple(float(v) for v in rng.uniform(0, max_trim, 4) * (rng.random(4) < 0.5))
    return Acquisition(
        rotation_deg=float(rng.uniform(-max_rotation, max_rotation)),
        scale=float(rng.uniform(0.88, 1.12)),
        attenuation=float(rng.uniform(0.8, 1.25)),
        shift_mm=(float(rng.uniform(-max_shift_mm, max_shift_mm)),
                  float(rng.uniform(-max_shift_mm, max_shift_mm))),
        flip=bool(rng.random() < 0.5),
        detector_mm=float(rng.uniform(0.1, 0.2)),
        photons=float(np.exp(rng.uniform(np.log(3e2), np.log(1e5)))),
        binned=bool(rng.random() < 0.8),
        scatter=float(rng.uniform(0.0, 0.5)),
        blur_mm=float(rng.uniform(0.0, 2.0)) if rng.random() < 0.6 else 0.0,
        gamma=float(np.exp(rng.uniform(-0.35, 0.35))),
        coverage=trims,  # type: ignore[arg-type]
        shutter=bool(rng.random() < 0.4),
        markers=int(rng.integers(0, 4)) if rng.random() < 0.6 else 0,
    )


def _geometry(shape: tuple[int, int], acq: Acquisition, grid_mm: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Matrix and offset for ``ndimage.affine_transform`` (output pixel -> input pixel)."""
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    theta = np.deg2rad(acq.rotation_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rotation / acq.scale
    if acq.flip:
        matrix = matrix @ np.diag([1.0, -1.0])
    shift = np.asarray(acq.shift_mm) / grid_mm
    offset = centre - matrix @ (centre + shift)
    return matrix, offset


def transform_map(values: np.ndarray, acq: Acquisition, grid_mm: float, order: int) -> np.ndarray:
    """A truth map moved like the image (``order`` 0 for labels, 1 for fractions)."""
    matrix, offset = _geometry(values.shape[-2:], acq, grid_mm)
    return ndimage.affine_transform(values, matrix, offset, order=order, mode="nearest",
                                    prefilter=False).astype(values.dtype)


def coverage_mask(shape: tuple[int, int], acq: Acquisition) -> np.ndarray:
    """True where the detector recorded the patient (inside the trimmed field)."""
    rows, cols = shape
    top, bottom, left, right = acq.coverage
    mask = np.zeros(shape, dtype=bool)
    mask[round(top * rows):rows - round(bottom * rows), round(left * cols):cols - round(right * cols)] = True
    return mask


_GLYPH_BITS = 35  # 5 x 7 dot-matrix glyphs


def _burn_markers(image: np.ndarray, count: int, grid_mm: float, value: float,
                  rng: np.random.Generator) -> None:
    """Side markers and text: bright dot-matrix glyphs near the corners, in place."""
    rows, cols = image.shape
    for _ in range(count):
        height = max(5, round(rng.uniform(5, 14) / grid_mm))
        glyphs = int(rng.integers(1, 5))
        cell = max(1, height // 7)
        top = int(rng.integers(0, max(1, rows // 6))) if rng.random() < 0.5 else \
            rows - 7 * cell - int(rng.integers(1, max(2, rows // 6)))
        left = int(rng.integers(0, max(1, cols // 3)))
        for g in range(glyphs):
            bits = rng.random(_GLYPH_BITS) < 0.5
            for k in np.flatnonzero(bits):
                r, c = top + (k // 5) * cell, left + g * 6 * cell + (k % 5) * cell
                image[max(r, 0):max(r + cell, 0), max(c, 0):max(c + cell, 0)] = value


def expose(integral: np.ndarray, acq: Acquisition, grid_mm: float,
           rng: np.random.Generator) -> np.ndarray:
    """Scatter, blur, quantum noise and the display curve for a line-integral image."""
    transmitted = np.exp(-np.clip(integral, 0.0, None) * acq.attenuation)
    if acq.scatter > 0:
        fog = ndimage.gaussian_filter(transmitted, 25.0 / grid_mm, mode="nearest")
        transmitted = (transmitted + acq.scatter * fog) / (1.0 + acq.scatter)
    if acq.blur_mm > 0:
        transmitted = ndimage.gaussian_filter(transmitted, acq.blur_mm / grid_mm, mode="nearest")
    photons = acq.photons * ((grid_mm / acq.detector_mm) ** 2 if acq.binned else 1.0)
    counts = rng.poisson(photons * transmitted).astype(np.float64)
    measured = -np.log(np.maximum(counts, 0.5) / photons)
    scale = max(float(np.percentile(measured, 99.5)), 1e-3)
    return (np.clip(measured / scale, 0.0, 1.5) ** acq.gamma).astype(np.float32)


def acquire(integral: np.ndarray, grid_mm: float, acq: Acquisition, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Display image, valid mask and visible mask of one acquisition of a DRR line integral.

    ``valid`` is False where nothing was imaged (outside the covered field); there the
    pipelines see nothing, so training windows and pads it the same way. A shuttered
    edge is imaged (valid) but bright (collimator blades); ``visible`` is False there and
    outside the field: the anatomy cannot be seen.
    """
    moved = transform_map(integral.astype(np.float32), acq, grid_mm, order=1)
    visible = coverage_mask(moved.shape, acq)
    valid = visible
    if acq.shutter:
        moved = np.where(visible, moved, moved.max() + 4.0).astype(np.float32)
        valid = np.ones_like(visible)
    image = expose(moved, acq, grid_mm, rng)
    if acq.markers:
        _burn_markers(image, acq.markers, grid_mm, float(image.max()) * rng.uniform(1.0, 1.3), rng)
    return image, valid, visible


# --------------------------------------------------------------------------- junk


def _ellipse(shape: tuple[int, int], centre: Sequence[float], semi: Sequence[float],
             angle: float = 0.0) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    r, c = rows - centre[0], cols - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * r + sin * c, -sin * r + cos * c
    return (u / semi[0]) ** 2 + (v / semi[1]) ** 2 <= 1.0


def _capsule(shape: tuple[int, int], p0: Sequence[float], p1: Sequence[float],
             radius: float) -> np.ndarray:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    a, b = np.asarray(p0, float), np.asarray(p1, float)
    d = b - a
    t = np.clip(((rows - a[0]) * d[0] + (cols - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0, 1)
    return (rows - a[0] - t * d[0]) ** 2 + (cols - a[1] - t * d[1]) ** 2 <= radius ** 2


def _chest(rng: np.random.Generator, grid_mm: float) -> np.ndarray:
    """Line integrals of a chest-like PA radiograph (whole thorax, 350-430 mm field)."""
    field = rng.uniform(350, 430)
    shape = (round(field / grid_mm), round(field * rng.uniform(0.9, 1.05) / grid_mm))
    h, w = shape
    mm = 1.0 / grid_mm
    integral = np.zeros(shape)
    body = _ellipse(shape, (h * 0.55, w / 2), (h * 0.55, w * rng.uniform(0.4, 0.47)))
    integral += body * 2.2
    for side in (-1, 1):
        lung = _ellipse(shape, (h * 0.5, w / 2 + side * w * 0.2),
                        (h * rng.uniform(0.28, 0.34), w * rng.uniform(0.13, 0.17)))
        integral -= lung * 1.3
        for k in range(9):  # ribs: arcs across each lung
            row = h * 0.25 + k * h * 0.055
            ribs = _capsule(shape, (row, w / 2 + side * 25 * mm), (row + h * 0.06, w / 2 + side * w * 0.38),
                            rng.uniform(3, 5) * mm)
            integral += ribs * 0.35
        clavicle = _capsule(shape, (h * 0.2, w / 2 + side * 15 * mm), (h * 0.17, w / 2 + side * w * 0.32),
                            6 * mm)
        integral += clavicle * 0.5
    integral += _ellipse(shape, (h * 0.62, w * rng.uniform(0.52, 0.58)), (h * 0.14, w * 0.14)) * 0.9
    integral += (np.abs(np.arange(w) - w / 2) < 15 * mm)[None, :] * body * 0.8
    return ndimage.gaussian_filter(np.clip(integral, 0, None), 1.5 * mm)


def _hand(rng: np.random.Generator, grid_mm: float) -> np.ndarray:
    """Line integrals of a hand-like radiograph (palm, five fingers with phalanges)."""
    field = rng.uniform(200, 280)
    shape = (round(field / grid_mm), round(field * rng.uniform(0.75, 0.95) / grid_mm))
    h, w = shape
    mm = 1.0 / grid_mm
    integral = np.zeros(shape)
    palm_centre = (h * 0.65, w * 0.5)
    integral += _ellipse(shape, palm_centre, (45 * mm, 40 * mm)) * 0.8
    for k, angle in enumerate(np.linspace(-0.5, 0.5, 4)):
        base = (palm_centre[0] - 35 * mm, palm_centre[1] + (k - 1.5) * 20 * mm)
        length = rng.uniform(60, 85) * mm
        tip = (base[0] - length * np.cos(angle * 0.3), base[1] + length * np.sin(angle * 0.3))
        integral += _capsule(shape, base, tip, 8 * mm) * 0.6
        for j in range(3):  # phalanges with joint gaps
            a = j / 3 + 0.03
            b = (j + 1) / 3 - 0.03
            p0 = (base[0] + (tip[0] - base[0]) * a, base[1] + (tip[1] - base[1]) * a)
            p1 = (base[0] + (tip[0] - base[0]) * b, base[1] + (tip[1] - base[1]) * b)
            integral += _capsule(shape, p0, p1, 4 * mm) * 0.9
        metacarpal = _capsule(shape, (palm_centre[0] + 30 * mm, palm_centre[1] + (k - 1.5) * 12 * mm),
                              (base[0] + 5 * mm, base[1]), 4 * mm)
        integral += metacarpal * 0.9
    thumb_base = (palm_centre[0] + 10 * mm, palm_centre[1] - 38 * mm)
    thumb_tip = (thumb_base[0] - 55 * mm, thumb_base[1] - 30 * mm)
    integral += _capsule(shape, thumb_base, thumb_tip, 9 * mm) * 0.6
    integral += _capsule(shape, thumb_base, thumb_tip, 4 * mm) * 0.9
    integral += _capsule(shape, (h * 0.85, w * 0.45), (h, w * 0.45), 30 * mm) * 0.9  # forearm
    if rng.random() < 0.5:
        integral = integral[:, ::-1]
    return ndimage.gaussian_filter(integral, 1.0 * mm)


def _ct_slice(rng: np.random.Generator, grid_mm: float) -> np.ndarray:
    """A CT-like axial slice shown as an image: round body, ring of bone, dark air."""
    field = rng.uniform(200, 500)
    n = round(field / grid_mm)
    shape = (n, n)
    mm = 1.0 / grid_mm
    body_semi = (rng.uniform(0.25, 0.42) * n, rng.uniform(0.3, 0.46) * n)
    image = np.zeros(shape)
    body = _ellipse(shape, (n / 2, n / 2), body_semi)
    image += body * 1.0
    image += _ellipse(shape, (n / 2 + body_semi[0] * 0.45, n / 2), (12 * mm, 14 * mm)) * 1.2
    if rng.random() < 0.6:
        for side in (-1, 1):
            image -= _ellipse(shape, (n / 2 - 0.05 * n, n / 2 + side * body_semi[1] * 0.45),
                              (body_semi[0] * 0.55, body_semi[1] * 0.35)) * 0.9
    ring = body & ~_ellipse(shape, (n / 2, n / 2), (body_semi[0] - 6 * mm, body_semi[1] - 6 * mm))
    image += ring * rng.uniform(0.0, 0.3)
    if rng.random() < 0.5:  # the scanner table
        image[min(n - 1, round(n / 2 + body_semi[0] + 8 * mm)):round(n / 2 + body_semi[0] + 14 * mm), :] += 0.6
    return ndimage.gaussian_filter(image, 0.7 * mm) * 2.0


def junk(kind: str, rng: np.random.Generator, grid_mm: float = 2.0,
         shape: tuple[int, int] = (80, 64)) -> tuple[np.ndarray, float]:
    """One image that is not a spine radiograph, and the pixel size (mm) it is drawn at.

    Noise and blank kinds fill ``shape`` on the grid; the others have their own field
    and pass through :func:`expose` (they are radiographs or a CT display of other parts).
    """
    if kind == "uniform_noise":
        return rng.uniform(0, 1, shape).astype(np.float32), grid_mm
    if kind == "gaussian_noise":
        sigma = rng.uniform(0, 2)
        return ndimage.gaussian_filter(rng.normal(0, 1, shape), sigma).astype(np.float32), grid_mm
    if kind == "speckle":
        return (rng.random(shape) < rng.uniform(0.01, 0.3)).astype(np.float32), grid_mm
    if kind == "blank":
        value = rng.uniform(0, 1)
        return np.full(shape, value, np.float32) + rng.normal(0, 1e-3, shape).astype(np.float32), grid_mm
    if kind == "gradient":
        rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
        angle = rng.uniform(0, np.pi)
        return (np.cos(angle) * rows + np.sin(angle) * cols).astype(np.float32), grid_mm
    if kind == "ct_slice":
        image = _ct_slice(rng, grid_mm)
        return (image + rng.normal(0, 0.03, image.shape)).astype(np.float32), grid_mm
    if kind in ("chest", "hand"):
        integral = _chest(rng, grid_mm) if kind == "chest" else _hand(rng, grid_mm)
        acq = draw(rng, max_rotation=10.0, coverage_chance=0.0)
        acq = Acquisition(**{**acq.__dict__, "shift_mm": (0.0, 0.0), "scale": 1.0})
        return expose(integral, acq, grid_mm, rng), grid_mm
    raise ValueError(f"unknown junk kind {kind!r}; expected one of {JUNK_KINDS}")
