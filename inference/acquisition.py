"""What a real CT scanner does to the anatomy a phantom renders, and CTs without a neck.

The training recipe (:mod:`spine_node.inference.train.ct`) draws a phantom, then an
acquisition: a field of view that may start and stop anywhere from the cranium to T3, a
slice grid and a slice profile (0.5-3 mm), in-plane pixels of 0.3-1.0 mm, a HU
calibration error, dose (noise) and now and then metal. So the models see scans as
scanners make them rather than one fixed rendering. The same functions make the
perturbed cohorts the evaluation uses (clinical grid, 3 mm slices, HU shifts).

Negatives (:func:`negative_volume`) are CTs in which there is no cervical spine to
assess: a head, air, a water phantom, noise. The thoracic and lumbar phantoms of
:func:`spine_node.inference.phantoms.generate` serve as chest and abdomen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

#: In-plane pixel size and slice spacing a clinical cervical-spine CT is acquired with.
IN_PLANE_MM = (0.3, 1.0)
SLICE_MM = (0.5, 3.0)
NEGATIVE_KINDS = ("head", "air", "water", "noise")


@dataclass(frozen=True)
class CtAcquisition:
    """One simulated acquisition of a rendered volume.

    ``spacing`` is the output grid ``(z, y, x)`` in mm, ``slice_thickness_mm`` the slice
    profile's full width at half maximum; ``z_window_mm`` (top, bottom) and
    ``xy_window_mm`` ((y0, y1), (x0, x1)) select the field of view in the rendered
    volume's millimetres (None: all of it).
    """

    spacing: tuple[float, float, float]
    slice_thickness_mm: float
    hu_scale: float = 1.0
    hu_offset: float = 0.0
    noise_hu: float = 0.0
    z_window_mm: tuple[float, float] | None = None
    xy_window_mm: tuple[tuple[float, float], tuple[float, float]] | None = None
    metal: bool = False

    def with_(self, **changes: object) -> CtAcquisition:
        return replace(self, **changes)  # type: ignore[arg-type]


def random_acquisition(rng: np.random.Generator, landmarks_mm: Mapping[str, float],
                       extent_mm: Sequence[float], *, fine: bool = True) -> CtAcquisition:
    """Draw an acquisition. ``landmarks_mm`` maps vertebra names to their z (mm) in the
    rendered volume; ``extent_mm`` is the rendered (z, y, x) size. ``fine=False`` keeps
    the grid at or above 2 mm where the renderer had no finer detail to give."""
    z_extent = float(extent_mm[0])
    names = [n for n in ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3") if n in landmarks_mm]
    z = [landmarks_mm[n] for n in names]
    skull_base = landmarks_mm.get("C1", z[0]) - 12.0
    if rng.random() < 0.5:
        # A typical cervical-spine CT: from the skull base (or a little above) to T1-T3.
        top = skull_base - float(rng.uniform(0.0, 35.0))
        bottom = float(rng.uniform(landmarks_mm.get("C7", z[-1]), z[-1] + 10.0))
    else:
        # Anywhere from the cranium to T3, at least 40 mm long.
        top = float(rng.uniform(max(0.0, skull_base - 60.0), z[min(len(z) - 1, 4)]))
        bottom = float(rng.uniform(top + 40.0, max(top + 41.0, z[-1] + 15.0)))
    top, bottom = max(0.0, top), min(z_extent, bottom)
    if fine:
        in_plane = float(rng.uniform(*IN_PLANE_MM))
        spacing_z = float(rng.uniform(*SLICE_MM))
    else:
        in_plane = 2.0
        spacing_z = float(rng.choice([2.0, float(rng.uniform(2.0, 3.0))]))
    thickness = spacing_z * float(rng.uniform(1.0, 1.5)) if rng.random() < 0.5 else spacing_z
    width = float(rng.uniform(120.0, 200.0))
    y_extent, x_extent = float(extent_mm[1]), float(extent_mm[2])
    cy = y_extent / 2 + float(rng.uniform(-10.0, 10.0))
    cx = x_extent / 2 + float(rng.uniform(-10.0, 10.0))
    xy = ((max(0.0, cy - width / 2), min(y_extent, cy + width / 2)),
          (max(0.0, cx - width / 2), min(x_extent, cx + width / 2)))
    return CtAcquisition(
        spacing=(spacing_z, in_plane, in_plane),
        slice_thickness_mm=min(thickness, 3.0),
        hu_scale=float(rng.uniform(0.85, 1.15)),
        hu_offset=float(rng.uniform(-150.0, 150.0)),
        noise_hu=float(rng.choice([rng.uniform(3.0, 20.0), rng.uniform(20.0, 70.0)])),
        z_window_mm=(top, bottom),
        xy_window_mm=xy,
        metal=bool(rng.random() < 0.12),
    )


def _window(spacing: float, n: int, window: tuple[float, float] | None) -> slice:
    if window is None:
        return slice(0, n)
    lo = int(np.clip(np.floor(window[0] / spacing), 0, n - 1))
    hi = int(np.clip(np.ceil(window[1] / spacing), lo + 1, n))
    return slice(lo, hi)


def _resample_axis(volume: np.ndarray, axis: int, source: float, target: float,
                   order: int) -> np.ndarray:
    n = volume.shape[axis]
    count = max(1, int(round(n * source / target)))
    coords = np.clip((np.arange(count) + 0.5) * target / source - 0.5, 0, n - 1)
    if order == 0:
        return np.take(volume, np.rint(coords).astype(np.intp), axis=axis)
    lo = np.floor(coords).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * volume.ndim
    shape[axis] = -1
    w = (coords - lo).astype(np.float32).reshape(shape)
    return np.take(volume, lo, axis=axis) * (1 - w) + np.take(volume, hi, axis=axis) * w


def acquire(hu: np.ndarray, labels: np.ndarray | None, spacing: Sequence[float],
            acquisition: CtAcquisition,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Scan a rendered ``hu`` volume (and carry its ``labels``) as ``acquisition`` says.

    Returns the acquired HU volume on ``acquisition.spacing`` and the labels on the same
    grid (nearest neighbour), or None when ``labels`` is None.
    """
    sz, sy, sx = (float(s) for s in spacing)
    xy = acquisition.xy_window_mm
    box = (_window(sz, hu.shape[0], acquisition.z_window_mm),
           _window(sy, hu.shape[1], xy[0] if xy else None),
           _window(sx, hu.shape[2], xy[1] if xy else None))
    out = hu[box].astype(np.float32)
    lab = labels[box] if labels is not None else None
    # Slice profile: a Gaussian of the slice thickness' FWHM along z, less what the
    # rendering already blurred; a little in-plane blur from the reconstruction kernel.
    fwhm_extra = np.sqrt(max(acquisition.slice_thickness_mm ** 2 - sz ** 2, 0.0))
    sigma = (fwhm_extra / 2.355 / sz, 0.35 / sy, 0.35 / sx)
    if max(sigma) > 0.05:
        out = ndimage.gaussian_filter(out, sigma, mode="nearest")
    if acquisition.metal:
        _metal(out, (sz, sy, sx), rng)
    for axis, (source, target) in enumerate(zip((sz, sy, sx), acquisition.spacing, strict=True)):
        if abs(source - target) > 1e-6:
            out = _resample_axis(out, axis, source, float(target), order=1)
            if lab is not None:
                lab = _resample_axis(lab, axis, source, float(target), order=0)
    out = out * acquisition.hu_scale + acquisition.hu_offset
    if acquisition.noise_hu > 0:
        noise = rng.normal(0.0, 1.0, size=out.shape).astype(np.float32)
        # Reconstruction correlates noise between neighbouring pixels.
        noise = ndimage.gaussian_filter(noise, (0.0, 0.7, 0.7)) * 2.2
        out += acquisition.noise_hu * noise
    np.clip(out, -1024.0, 3071.0, out=out)
    return np.ascontiguousarray(out, dtype=np.float32), lab


def _metal(hu: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> None:
    """A dense implant in some slices, with the streaks it throws across them."""
    nz, ny, nx = hu.shape
    k0 = int(rng.integers(0, max(1, nz - 1)))
    k1 = min(nz, k0 + max(1, int(rng.uniform(6.0, 20.0) / spacing[0])))
    cy = int(ny * rng.uniform(0.35, 0.6))
    cx = int(nx * rng.uniform(0.4, 0.6))
    r = max(1, int(rng.uniform(2.0, 5.0) / spacing[1]))
    yy, xx = np.ogrid[:ny, :nx]
    implant = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    angle = np.arctan2(yy - cy, xx - cx)
    streaks = np.cos(angle * int(rng.integers(4, 9)) + rng.uniform(0, np.pi))
    falloff = 1.0 / (1.0 + np.hypot(yy - cy, xx - cx) / (8.0 * r))
    strength = float(rng.uniform(150.0, 600.0))
    for k in range(k0, k1):
        hu[k] += (strength * streaks * falloff).astype(np.float32)
        hu[k][implant] = 3000.0


def negative_volume(kind: str, rng: np.random.Generator,
                    spacing: Sequence[float] = (2.0, 2.0, 2.0),
                    extent_mm: Sequence[float] = (160.0, 170.0, 170.0)) -> np.ndarray:
    """A CT volume with no spine in it: ``"head"``, ``"air"``, ``"water"`` or ``"noise"``."""
    shape = tuple(max(8, int(round(e / s))) for e, s in zip(extent_mm, spacing, strict=True))
    nz, ny, nx = shape
    if kind == "air":
        return np.full(shape, -1000.0, np.float32)
    if kind == "noise":
        return rng.uniform(-1024.0, 2000.0, size=shape).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)],
                             indexing="ij")
    cz, cy, cx = (n * s / 2 for n, s in zip(shape, spacing, strict=True))
    if kind == "water":
        radius = float(rng.uniform(50.0, 80.0))
        out = np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2, 0.0, -1000.0)
        return out.astype(np.float32)
    if kind == "head":
        semi = np.array([rng.uniform(85, 100), rng.uniform(70, 82), rng.uniform(60, 72)])
        centre_z = cz + float(rng.uniform(-20.0, 20.0))
        rho = np.sqrt(((zz - centre_z) / semi[0]) ** 2 + ((yy - cy) / semi[1]) ** 2
                      + ((xx - cx) / semi[2]) ** 2)
        shell = float(rng.uniform(5.0, 8.0)) / float(semi.min())
        out = np.full(shape, -1000.0, np.float32)
        out[rho <= 1.0 + 4.0 / float(semi.min())] = 40.0
        out[rho <= 1.0] = float(rng.uniform(700.0, 1200.0))
        out[rho <= 1.0 - shell] = float(rng.uniform(25.0, 40.0))
        # Ventricles and the skull base's dense ridges.
        ventricle = (((zz - centre_z) / 20.0) ** 2 + ((yy - cy) / 25.0) ** 2
                     + ((xx - cx) / 12.0) ** 2) <= 1.0
        out[ventricle] = 8.0
        return out
    raise ValueError(f"unknown negative kind {kind!r}; expected one of {NEGATIVE_KINDS}")
