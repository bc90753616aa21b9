"""Held-out cervical-spine CT phantoms, for evaluation only (never for training).

Written without reference to ``inference/phantoms.py``: a different anatomy model built
from different primitives, so a model that only learned the training generator's look
fails here. See docs/heldout-phantoms.md.

Geometry
--------
Everything is a signed distance field (mm, negative inside) evaluated in the local frame
of its owner (a vertebra, the head, the neck column), only inside each primitive's own
bounding box. Primitives: superelliptic cylinders with rounded rims (vertebral bodies,
discs), superellipsoids (lateral masses, condyles, lungs), sheared rounded boxes
(articular pillars with 40 degree facet joints), tori (transverse foramina), tapered
capsules with elliptic cross-section chained into swept tubes (C1 arches, pedicles,
laminae, spinous and transverse processes, ribs, clavicles, mandible, airway, vessels,
spinal canal), joined with smooth minimum. A voxel's tissue fraction comes from the
distance at its centre (linear ramp over one voxel), which is the box-filtered coverage
of a locally planar surface: analytic supersampling, so partial volume is right at any
grid without rendering a finer one.

Bone is a cortical shell (0.8-1.2 mm, 1000-1800 HU) over cancellous bone (150-400 HU,
with a trabecular texture); the skull vault has two tables over diploe.

Anatomy and dimensions (mm)
---------------------------
Vertebral bodies C2-T3: endplate width/depth after Panjabi et al. 1991 (cervical and
thoracic vertebrae), body heights after Gilad & Nissan 1986; disc heights 4.5-5.6 mm
(cervical), 4.5 mm (upper thoracic); canal sagittal diameter 14-16 mm and width 23-25 mm
at C3-C7 (after Panjabi 1991 and Tatarek 2005); spinous processes bifid at C3-C6 (C7 the
long vertebra prominens, T1-T3 long and steep). C1: a ring without a body (anterior arch
with tubercle, lateral masses ~14 x 20 x 16, posterior arch, transverse processes with
foramina, span ~76); inner ring ~30 AP; atlanto-dental interval 2.5. C2: body plus dens
(10 mm wide, 15 mm above the body) reaching through the C1 ring, broad superior facets,
pars, heavy bifid spinous process. C3-C6: uncinate processes, pedicles angled 45 degrees,
articular pillars, laminae, transverse processes with foramina and anterior/posterior
tubercles. T1-T3: ribs 1-3 (the first rib short, flat and strongly curved to the
manubrium), costal cartilage, clavicles. Cervical lordosis (C2-C7) drawn 15-40 degrees,
upper thoracic kyphosis, +-8 degrees head/neck flexion, small per-level rotation.
Head: scalp, vault, posterior/middle/anterior cranial fossae, foramen magnum (35 x 30),
occipital condyles on the C1 lateral masses, basion ~5 mm above the dens tip, clivus,
mastoids with air cells, mandible with teeth, maxilla, hard palate, nasal cavity and
maxillary sinuses, brain with ventricles and CSF. Neck: skin, subcutaneous fat, muscle
with fat planes, pharynx/larynx/trachea, esophagus, thyroid, carotid sheaths, hyoid,
thyroid cartilage, spinal cord in CSF in epidural fat, lung apices.

Variation: size (``size_scale``), lordosis, kyphosis and head posture, per-level rotation, bone density
(age), cervical spondylosis in ~45 % (one to three narrowed discs with anterior osteophytes), CT
angiography in ~15 % (arteries 250-450 HU), fat thickness, neck and shoulder width.

Fractures (``fractures`` or drawn with ``p_fracture`` among the levels in the field)
-------------------------------------------------------------------------------------
A broken bone is split into fragments by planes (or, for the C1 ring, by angular sectors); each
fragment keeps its own cortex, the fracture surfaces show bare cancellous bone across a 1-3 mm gap
of soft-tissue density, and one fragment moves 0-3 mm. "line": a plane of any orientation through
the body, or through one side of the arch (pedicle/lamina), of C2-T3; at C1 both sides of the
posterior arch. "compression": 20-50 % loss of height at the superior endplate, usually as an
anterior wedge (the disc above fills the depression). "burst": uniform height loss, the body
widened 6-18 % and a posterosuperior fragment pushed 1.5-3.5 mm into the canal. "jefferson": the C1
ring broken in two to four places (anterior and posterior arches), each piece moved outward so
the lateral masses spread 1-4 mm each side. "dens": type II (at the base of the dens) or type III
(into the C2 body), tilted up to 20-35 degrees, the dens displaced up to 3 mm. "hangman": both
pars interarticularis of C2 cut by one oblique coronal plane, the body slipping forward. About 60 % of
fractured cervical levels also get a 3-8 mm prevertebral hematoma (58 HU) that narrows the airway. Labels
keep the whole vertebra (the gap included).

Acquisition
-----------
Slice profile along z (box of ``slice_thickness_mm`` convolved with a 0.25 mm Gaussian;
z is rendered finer and integrated when slices are thicker than 1 mm), in-plane blur
0.3-0.5 mm, noise 5-25 HU (spatially correlated in-plane, stronger in the shoulder
slices), then ``hu * hu_scale + hu_offset`` and clipping to [-1024, 3071].

Speed (``python -m spine_node.inference.heldout.ct --bench 5 [--spacing z,y,x] [--kind K]``: CPU seconds of
one process, numpy and scipy single-threaded, median over seeds; measured 2026-11-27 on a shared 2-core
machine at load average 11, so an idle core is faster): default cspine case at (1.0, 0.7, 0.7) mm, about
210 x 230 x 230 voxels: 2.6 s; clinical grid (1.0, 0.5, 0.5): 5.5 s; 3 mm slices (rendered at 1 mm and
integrated): 2.2 s. Negatives at the default grid: head 2.2 s, chest 7.4 s and abdomen 5.1 s (fields of
240-300 mm), water 3.8 s.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3")
CERVICAL: tuple[str, ...] = LEVELS[:7]
LABEL_OF: dict[str, int] = {name: i + 1 for i, name in enumerate(LEVELS)}
KINDS: tuple[str, ...] = ("cspine", "head", "chest", "abdomen", "air", "water", "noise")
FRACTURE_KINDS: tuple[str, ...] = ("line", "compression", "burst", "teardrop", "spinous", "jefferson", "dens",
                                   "hangman")
# Landmarks z_range understands, top to bottom.
LANDMARKS: tuple[str, ...] = ("vertex", "skull_base") + LEVELS

Arr = np.ndarray
SdfFn = Callable[[Arr, Arr, Arr], Arr]


#: Set by :mod:`spine_node.inference.heldout._negatives` when the package is imported.
NEGATIVE_GENERATOR: Callable[..., HeldoutCt] | None = None

@dataclass
class HeldoutCt:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    labels: np.ndarray
    fractures: dict[str, str]
    kind: str
    levels_in_field: tuple[str, ...]
    slice_thickness_mm: float
    origin_mm: tuple[float, float, float]


# --------------------------------------------------------------------------- primitives


@dataclass
class _Part:
    lo: np.ndarray
    hi: np.ndarray
    fn: SdfFn
    blend: float = 0.0  # smooth-union radius with what is already there (mm)
    subtract: bool = False
    # Large smooth shapes are evaluated every `coarse` voxels and interpolated; with `fields`,
    # each field is evaluated coarse and `fn` combines the interpolated fields (sharp edges stay sharp).
    coarse: int = 1
    fields: tuple[SdfFn, ...] = ()


def _v3(p: Sequence[float]) -> np.ndarray:
    return np.asarray(p, dtype=np.float64).reshape(3)


def capsule(a: Sequence[float], b: Sequence[float], r: float, r2: float | None = None,
            scale: Sequence[float] = (1.0, 1.0, 1.0), blend: float = 0.0) -> _Part:
    """Segment a-b swept by a sphere of radius r (tapering to r2), stretched per axis by scale."""
    pa, pb, sc = _v3(a), _v3(b), _v3(scale)
    r2 = r if r2 is None else r2
    rm = max(r, r2)
    A, B = pa / sc, pb / sc
    ba = B - A
    bb = float(ba @ ba) or 1e-9
    k = float(sc.min())

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        x = u * np.float32(1 / sc[0]) - np.float32(A[0])
        y = v * np.float32(1 / sc[1]) - np.float32(A[1])
        z = w * np.float32(1 / sc[2]) - np.float32(A[2])
        h = np.clip((x * ba[0] + y * ba[1] + z * ba[2]) * np.float32(1 / bb), 0, 1).astype(np.float32)
        x -= h * np.float32(ba[0])
        y -= h * np.float32(ba[1])
        z -= h * np.float32(ba[2])
        d = np.sqrt(x * x + y * y + z * z)
        d -= np.float32(r) + np.float32(r2 - r) * h if r2 != r else np.float32(r)
        return d * np.float32(k)

    return _Part(np.minimum(pa, pb) - rm * sc, np.maximum(pa, pb) + rm * sc, fn, blend)


def tube(points: Sequence[Sequence[float]], r: float | Sequence[float], scale: Sequence[float] = (1, 1, 1),
         blend: float = 0.0) -> list[_Part]:
    """A swept tube through points; r one radius or one per point."""
    pts = [_v3(p) for p in points]
    radii = [float(r)] * len(pts) if np.isscalar(r) else [float(x) for x in r]  # type: ignore[arg-type]
    return [capsule(pts[i], pts[i + 1], radii[i], radii[i + 1], scale, blend) for i in range(len(pts) - 1)]


def bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 8) -> list[np.ndarray]:
    a, b, c = _v3(p0), _v3(p1), _v3(p2)
    return [(1 - t) ** 2 * a + 2 * (1 - t) * t * b + t * t * c for t in np.linspace(0, 1, n + 1)]


Warp = Callable[[Arr, Arr, Arr], tuple[Arr, Arr, Arr]]


def supcyl(c: Sequence[float], a: float, b: float, hh: float, n: float = 2.5, rr: float = 1.2,
           warp: Warp | None = None, warp_k: float = 1.0, lo_extra: Sequence[float] = (0, 0, 0),
           blend: float = 0.0) -> _Part:
    """Superelliptic cylinder (half axes a, b, half height hh) with rims rounded by rr; axis along w."""
    cc = _v3(c)
    ai, bi, hi_ = a - rr, b - rr, hh - rr
    m = min(ai, bi)

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        if warp is not None:
            u, v, w = warp(u, v, w)
        x = np.abs(u - np.float32(cc[0])) * np.float32(1 / ai)
        y = np.abs(v - np.float32(cc[1])) * np.float32(1 / bi)
        f = (x ** np.float32(n) + y ** np.float32(n)) ** np.float32(1 / n)
        d2 = (f - 1) * np.float32(m)
        dz = np.abs(w - np.float32(cc[2])) - np.float32(hi_)
        out = np.sqrt(np.maximum(d2, 0) ** 2 + np.maximum(dz, 0) ** 2) + np.minimum(np.maximum(d2, dz), 0)
        out -= np.float32(rr)
        return out * np.float32(warp_k)

    ext = _v3(lo_extra)
    half = np.array([a, b, hh]) * 1.05 + ext
    return _Part(cc - half, cc + half, fn, blend)


def supell(c: Sequence[float], radii: Sequence[float], n: float = 2.0, blend: float = 0.0) -> _Part:
    """Superellipsoid |x/a|^n + |y/b|^n + |z/c|^n = 1 (approximate distance)."""
    cc, rad = _v3(c), _v3(radii)
    m = float(rad.min())

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        x = np.abs(u - np.float32(cc[0])) * np.float32(1 / rad[0])
        y = np.abs(v - np.float32(cc[1])) * np.float32(1 / rad[1])
        z = np.abs(w - np.float32(cc[2])) * np.float32(1 / rad[2])
        if n == 2.0:
            f = np.sqrt(x * x + y * y + z * z)
        else:
            e = np.float32(n)
            f = (x ** e + y ** e + z ** e) ** np.float32(1 / n)
        return (f - 1) * np.float32(m)

    return _Part(cc - rad * 1.02, cc + rad * 1.02, fn, blend)


def tilted_box(c: Sequence[float], half: Sequence[float], tilt_deg: float, rr: float = 1.0,
               blend: float = 0.0) -> _Part:
    """Rounded box whose top and bottom faces slope down posteriorly by tilt_deg (facet joints)."""
    cc, hf = _v3(c), _v3(half)
    t = math.tan(math.radians(tilt_deg))
    k = math.cos(math.radians(tilt_deg))
    inner = hf - rr

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        x = np.abs(u - np.float32(cc[0])) - np.float32(inner[0])
        vv = v - np.float32(cc[1])
        y = np.abs(vv) - np.float32(inner[1])
        z = np.abs(w - np.float32(cc[2]) + vv * np.float32(t)) - np.float32(inner[2])
        outside = np.sqrt(np.maximum(x, 0) ** 2 + np.maximum(y, 0) ** 2 + np.maximum(z, 0) ** 2)
        return (outside + np.minimum(np.maximum(np.maximum(x, y), z), 0) - np.float32(rr)) * np.float32(k)

    ext = np.array([hf[0], hf[1], hf[2] + abs(hf[1] * t)]) + 0.5
    return _Part(cc - ext, cc + ext, fn, blend)


def torus(c: Sequence[float], R: float, r: float, wscale: float = 1.0, blend: float = 0.0) -> _Part:
    """Ring around the w axis (a foramen of radius R - r), stretched along w by wscale."""
    cc = _v3(c)

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        q = np.sqrt((u - np.float32(cc[0])) ** 2 + (v - np.float32(cc[1])) ** 2) - np.float32(R)
        z = (w - np.float32(cc[2])) * np.float32(1 / wscale)
        return (np.sqrt(q * q + z * z) - np.float32(r)) * np.float32(min(1.0, wscale))

    ext = np.array([R + r, R + r, r * wscale]) + 0.5
    return _Part(cc - ext, cc + ext, fn, blend)


def cut(part: _Part) -> _Part:
    part.subtract = True
    return part


def _upsample(c: Arr, f: int, shape: tuple[int, ...]) -> Arr:
    """Linear interpolation of samples taken every f voxels back to the full grid (cropped to shape)."""
    out = c.astype(np.float32, copy=False)
    if f == 1:
        return out[: shape[0], : shape[1], : shape[2]]
    for axis in (2, 1, 0):  # the last pass (axis 0) writes whole contiguous slabs
        n = out.shape[axis]
        m = shape[axis] if n > 1 else 1
        if n == 1:
            if shape[axis] > 1:
                out = np.repeat(out, shape[axis], axis=axis)
            continue
        new_shape = list(out.shape)
        new_shape[axis] = m
        res = np.empty(new_shape, dtype=np.float32)

        def sl(a: int, s: slice) -> tuple[slice, ...]:
            idx = [slice(None)] * 3
            idx[a] = s
            return tuple(idx)

        for r in range(f):
            L = len(range(r, m, f))
            if L == 0:
                continue
            if r == 0:
                res[sl(axis, slice(0, None, f))] = out[sl(axis, slice(0, L))]
            else:
                t = np.float32(r / f)
                lo = out[sl(axis, slice(0, L))]
                hi = out[sl(axis, slice(1, L + 1))]
                res[sl(axis, slice(r, None, f))] = lo + (hi - lo) * t
        out = res
    return out


def _blur3(a: Arr, axis: int, sigma: float) -> float:
    """In-place 3-tap Gaussian-like blur along axis (sigma in voxels, up to ~0.8); returns the noise gain
    (the factor by which it scales the standard deviation of white noise)."""
    if sigma <= 0.3:  # the neighbours' weight would be below 0.4 %
        return 1.0
    if sigma > 0.8:
        ndimage.gaussian_filter1d(a, sigma, axis=axis, output=a, mode="nearest", truncate=3.0)
        k = np.exp(-0.5 * (np.arange(-3 * int(sigma + 1), 3 * int(sigma + 1) + 1) / sigma) ** 2)
        k /= k.sum()
        return float(np.sqrt((k * k).sum()))
    e = math.exp(-0.5 / sigma**2)
    w1 = e / (1 + 2 * e)
    w0 = 1 - 2 * w1
    x = np.moveaxis(a, axis, 0)
    if x.shape[0] < 3:
        return 1.0
    nb = x[:-2] + x[2:]  # neighbours of the interior (the two edge planes stay as they are)
    nb *= np.float32(w1)
    x[1:-1] *= np.float32(w0)
    x[1:-1] += nb
    return float(math.sqrt(w0 * w0 + 2 * w1 * w1))


def _smin(a: Arr, b: Arr, k: float) -> Arr:
    h = np.clip(np.float32(k) - np.abs(a - b), 0, None) * np.float32(1 / k)
    return np.minimum(a, b) - h * h * np.float32(k / 4)


# --------------------------------------------------------------------------- frames


@dataclass
class Frame:
    o: np.ndarray  # origin in the anatomy frame (x left, y posterior, z superior; mm)
    F: np.ndarray  # 3x3, columns u (left), v (posterior), w (superior) in the anatomy frame

    def at(self, p: Sequence[float]) -> np.ndarray:
        return self.o + self.F @ _v3(p)

    def rotated(self, axis: str, deg: float) -> Frame:
        return Frame(self.o.copy(), self.F @ _rot(axis, deg))

    def moved(self, p: Sequence[float]) -> Frame:
        return Frame(self.at(p), self.F.copy())


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


IDENTITY = Frame(np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------- scene


Region = Callable[[Arr, Arr, Arr], Arr]


@dataclass
class Fragment:
    """Part of a broken bone: moved by delta (local mm); region(u, v, w) <= 0 inside it,
    given with and without the fracture gap (original, unmoved coordinates)."""

    delta: np.ndarray
    region_gap: Region
    region_solid: Region


class _Scene:
    """The render grid, the world <- anatomy transform and the painted volumes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float], w0: np.ndarray,
                 A: np.ndarray, b: np.ndarray, scale: float) -> None:
        self.shape = shape
        self.spacing = spacing
        self.A, self.b, self.scale = A, b, scale
        self.w0 = w0
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.tex = np.zeros(shape, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)
        self.width_mm: np.ndarray | None = None  # patient width per slice, for noise and streaks
        self.aa = float(np.mean(spacing))  # coverage ramp width (mm)
        dz, dy, dx = spacing
        self.D = np.diag([dx, dy, -dz])  # index (i, j, k) -> world offset

    # local q = G @ (i, j, k) + g
    def _affine(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        G = frame.F.T @ self.A @ self.D
        g = frame.F.T @ (self.A @ self.w0 + self.b - frame.o)
        return G, g

    def _box(self, G: np.ndarray, g: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = np.linalg.solve(G, (corners - g).T).T  # (8, 3) as (i, j, k)
        mn = np.floor(idx.min(axis=0)).astype(int) - 1
        mx = np.ceil(idx.max(axis=0)).astype(int) + 2
        nz, ny, nx = self.shape
        i0, j0, k0 = max(mn[0], 0), max(mn[1], 0), max(mn[2], 0)
        i1, j1, k1 = min(mx[0], nx), min(mx[1], ny), min(mx[2], nz)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1))

    @staticmethod
    def _coords(G: np.ndarray, g: np.ndarray, box: tuple[slice, slice, slice], step: int = 1) -> tuple[Arr, Arr, Arr]:
        def ax(sl: slice) -> np.ndarray:
            n = (sl.stop - sl.start - 1 + step - 1) // step + 1
            return (sl.start + step * np.arange(n)).astype(np.float32)

        k = ax(box[0])[:, None, None]
        j = ax(box[1])[None, :, None]
        i = ax(box[2])[None, None, :]
        out = []
        for c in range(3):
            a = (i * np.float32(G[c, 0]) + np.float32(g[c])) + j * np.float32(G[c, 1])
            out.append(a + k * np.float32(G[c, 2]))
        return out[0], out[1], out[2]

    def _union_box(self, G: np.ndarray, g: np.ndarray, parts: Sequence[_Part],
                   shifts: Sequence[np.ndarray]) -> tuple[slice, slice, slice] | None:
        boxes = []
        for p in parts:
            if p.subtract:
                continue
            for s in shifts:
                bx = self._box(G, g, p.lo + s, p.hi + s)
                if bx is not None:
                    boxes.append(bx)
        if not boxes:
            return None
        return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))  # type: ignore[return-value]

    def evaluate(self, frame: Frame, parts: Sequence[_Part], shift: np.ndarray | None = None,
                 box: tuple[slice, slice, slice] | None = None) -> tuple[tuple[slice, slice, slice], Arr] | None:
        G, g = self._affine(frame)
        sh = np.zeros(3) if shift is None else shift
        if box is None:
            box = self._union_box(G, g, parts, [sh])
            if box is None:
                return None
        D = np.full(tuple(s.stop - s.start for s in box), 1e4, dtype=np.float32)
        gs = g - sh
        for p in parts:
            sub = self._box(G, g, p.lo + sh, p.hi + sh)
            if sub is None:
                continue
            sub = tuple(slice(max(sub[a].start, box[a].start), min(sub[a].stop, box[a].stop)) for a in range(3))
            if any(s.start >= s.stop for s in sub):
                continue
            if p.fields:
                shape = tuple(x.stop - x.start for x in sub)
                fl = [_upsample(f(*self._coords(G, gs, sub, p.coarse)), p.coarse, shape) for f in p.fields]
                d = p.fn(*fl)
            elif p.coarse > 1:
                shape = tuple(x.stop - x.start for x in sub)
                d = _upsample(p.fn(*self._coords(G, gs, sub, p.coarse)), p.coarse, shape)
            else:
                d = p.fn(*self._coords(G, gs, sub))  # type: ignore[arg-type]
            rel = tuple(slice(sub[a].start - box[a].start, sub[a].stop - box[a].start) for a in range(3))
            if p.subtract:
                np.maximum(D[rel], -d, out=D[rel])
            elif p.blend > 0:
                D[rel] = _smin(D[rel], d, p.blend)
            else:
                np.minimum(D[rel], d, out=D[rel])
        return box, D

    def set_width(self, table: Sequence[tuple[float, float, float, float, float]]) -> None:
        """Patient width per render slice, from an outline table (z, cy, half width, half depth, n)."""
        tb = np.array(sorted(table))
        nz, ny, nx = self.shape
        idx = np.stack([np.full(nz, nx / 2), np.full(nz, ny / 2), np.arange(nz)], 1)
        world = self.w0 + idx @ self.D.T
        z_anat = (world @ self.A.T + self.b)[:, 2]
        self.width_mm = 2 * np.interp(z_anat, tb[:, 0], tb[:, 2]) * self.scale

    def coverage(self, D: Arr) -> Arr:
        return np.clip(np.float32(0.5) - D * np.float32(self.scale / self.aa), 0, 1)

    def paint(self, frame: Frame, parts: Sequence[_Part], value: float, tex: float = 0.0,
              inset: float = 0.0) -> None:
        self.paint_layers(frame, parts, [(value, tex, inset)])

    def paint_layers(self, frame: Frame, parts: Sequence[_Part], layers: Sequence[tuple[float, float, float]]) -> None:
        """Paint (value, texture, inset mm) layers of one shape, outermost first."""
        res = self.evaluate(frame, parts)
        if res is None:
            return
        box, D = res
        reg = self.hu[box]
        t = self.tex[box]
        for value, tex, inset in layers:
            occ = self.coverage(D + np.float32(inset) if inset else D)
            reg += (np.float32(value) - reg) * occ
            t += (np.float32(tex) - t) * occ

    def paint_bone(self, frame: Frame, parts: Sequence[_Part], cortical: float, cancellous: float,
                   shell: float, label: int = 0, fragments: Sequence[Fragment] = (), tex: float = 70.0) -> None:
        G, g = self._affine(frame)
        if not fragments:
            res = self.evaluate(frame, parts)
            if res is None:
                return
            box, D = res
            d_out, d_in, d_lab = D, D + np.float32(shell), D
        else:
            box = self._union_box(G, g, parts, [f.delta for f in fragments])
            if box is None:
                return
            q = self._coords(G, g, box)
            d_out = d_in = d_lab = None
            for f in fragments:
                res = self.evaluate(frame, parts, f.delta, box)
                assert res is not None
                Di = res[1]
                qs = (q[0] - np.float32(f.delta[0]), q[1] - np.float32(f.delta[1]), q[2] - np.float32(f.delta[2]))
                rg, r0 = f.region_gap(*qs), f.region_solid(*qs)
                o_, i_, l_ = np.maximum(Di, rg), np.maximum(Di + np.float32(shell), rg), np.maximum(Di, r0)
                d_out = o_ if d_out is None else np.minimum(d_out, o_)
                d_in = i_ if d_in is None else np.minimum(d_in, i_)
                d_lab = l_ if d_lab is None else np.minimum(d_lab, l_)
        assert d_out is not None and d_in is not None and d_lab is not None
        o = self.coverage(d_out)
        i = self.coverage(d_in)
        reg = self.hu[box]
        reg *= 1 - o
        reg += np.float32(cortical) * (o - i) + np.float32(cancellous) * i
        t = self.tex[box]
        t *= 1 - o
        t += np.float32(tex) * i
        if label:
            self.labels[box][d_lab < 0] = label


# --------------------------------------------------------------------------- spine layout


@dataclass
class Level:
    name: str
    W: float  # endplate width
    D: float  # endplate depth
    H: float  # body height (mid)
    disc: float  # disc below
    cd: float  # canal sagittal diameter
    cw: float  # canal width
    sp: float  # spinous process length
    sp_tilt: float  # spinous process slope below horizontal (deg)
    tp: float  # transverse process span tip to tip
    frame: Frame = field(default_factory=lambda: IDENTITY)
    osteo: float = 0.0  # anterior osteophytes at both endplates (mm), with a narrowed disc: spondylosis


# name, W, D, H, disc, canal AP, canal W, spinous length, spinous slope, TP span
_DIMS: tuple[tuple[str, float, float, float, float, float, float, float, float, float], ...] = (
    ("C2", 17.5, 15.5, 18.0, 4.6, 16.0, 24.0, 22.0, 15.0, 56.0),
    ("C3", 15.9, 15.1, 14.0, 5.0, 14.5, 23.5, 15.0, 20.0, 52.0),
    ("C4", 17.4, 15.4, 13.6, 5.3, 14.2, 24.0, 15.0, 22.0, 53.0),
    ("C5", 17.5, 15.8, 13.5, 5.6, 14.2, 24.5, 16.0, 25.0, 56.0),
    ("C6", 19.8, 16.4, 13.8, 5.5, 14.4, 24.5, 21.0, 28.0, 58.0),
    ("C7", 21.6, 16.5, 14.8, 5.0, 14.8, 24.0, 32.0, 30.0, 68.0),
    ("T1", 24.5, 17.0, 16.5, 4.5, 15.5, 21.0, 36.0, 35.0, 74.0),
    ("T2", 25.5, 18.5, 17.5, 4.5, 15.0, 17.5, 40.0, 45.0, 70.0),
    ("T3", 26.0, 20.0, 18.0, 4.5, 14.5, 16.5, 42.0, 50.0, 66.0),
    ("T4", 26.5, 21.5, 18.5, 4.6, 14.5, 16.0, 42.0, 55.0, 64.0),
    ("T5", 27.0, 23.0, 19.0, 4.7, 14.5, 16.0, 42.0, 58.0, 62.0),
    ("T6", 28.0, 24.5, 19.5, 4.8, 14.5, 16.0, 41.0, 60.0, 62.0),
    ("T7", 29.0, 26.0, 20.0, 4.9, 14.5, 16.0, 40.0, 60.0, 62.0),
    ("T8", 30.5, 27.0, 20.5, 5.0, 14.5, 16.5, 38.0, 58.0, 62.0),
    ("T9", 32.0, 28.0, 21.0, 5.2, 14.8, 17.0, 36.0, 52.0, 60.0),
    ("T10", 34.0, 28.5, 22.0, 5.6, 15.0, 17.5, 34.0, 40.0, 58.0),
    ("T11", 37.0, 29.0, 23.0, 6.5, 15.5, 18.5, 32.0, 25.0, 50.0),
    ("T12", 40.0, 30.0, 24.0, 8.5, 16.0, 20.0, 32.0, 15.0, 40.0),
    ("L1", 42.0, 30.5, 25.0, 9.5, 17.0, 21.5, 32.0, 5.0, 62.0),
    ("L2", 44.0, 31.5, 25.5, 10.5, 16.5, 22.0, 33.0, 3.0, 72.0),
    ("L3", 46.0, 32.5, 26.0, 11.0, 16.5, 22.5, 33.0, 0.0, 80.0),
    ("L4", 48.0, 33.5, 26.0, 11.5, 17.0, 23.5, 31.0, 0.0, 74.0),
    ("L5", 50.0, 34.0, 25.0, 11.0, 17.5, 25.0, 28.0, 0.0, 78.0),
)


@dataclass
class Skeleton:
    levels: dict[str, Level]
    c1: Frame
    head: Frame
    order: list[str]

    def spine_points(self) -> np.ndarray:
        pts = [self.head.at((0, 0, 10)), self.c1.o] + [self.levels[n].frame.o for n in self.order]
        return np.array(pts)


def _layout(rng: np.random.Generator) -> Skeleton:
    lordosis = rng.uniform(15, 40)
    kyphosis = rng.uniform(30, 45)
    lumbar = rng.uniform(35, 55)
    flex = rng.uniform(-8, 8)
    names = [d[0] for d in _DIMS]
    phis: list[float] = []
    for i, name in enumerate(names):
        if i <= 5:  # C2..C7
            phi = -lordosis / 2 + lordosis * i / 5
        elif name.startswith("T"):
            phi = lordosis / 2 - kyphosis * (i - 5) / 12
        else:
            phi = lordosis / 2 - kyphosis + lumbar * (i - 17) / 5
        phis.append(phi + flex * max(0.0, 1 - i / 8))
    levels: dict[str, Level] = {}
    pos = np.zeros(3)
    prev: Level | None = None
    made = [Level(*d) for d in _DIMS]
    # cervical spondylosis in about half of the patients: narrowed discs with osteophytes, mostly C5-C7
    if rng.random() < 0.45:
        for k in {int(x) for x in rng.choice([1, 2, 3, 3, 4, 4, 5], size=int(rng.integers(1, 4)))}:
            made[k].disc *= rng.uniform(0.35, 0.7)
            size = rng.uniform(1.5, 4.0)
            made[k].osteo = max(made[k].osteo, size)
            made[k + 1].osteo = max(made[k + 1].osteo, size * rng.uniform(0.6, 1.0))
    for i, lv in enumerate(made):
        if prev is not None:
            phm = math.radians((phis[i - 1] + phis[i]) / 2)
            step = prev.H / 2 + prev.disc + lv.H / 2
            pos = pos + step * np.array([0.0, math.sin(phm), -math.cos(phm)])
        ph = math.radians(phis[i])
        F = np.array([[1, 0, 0], [0, math.cos(ph), -math.sin(ph)], [0, math.sin(ph), math.cos(ph)]], dtype=float)
        F = F @ _rot("z", rng.normal(0, 2.0)) @ _rot("y", rng.normal(0, 1.5))
        lv.frame = Frame(pos.copy(), F)
        levels[lv.name] = lv
        prev = lv
    c2 = levels["C2"]
    # C1 and the head keep their own pitch (the occipito-atlanto-axial joints take up the lordosis)
    c1_pitch = 0.6 * phis[0] + rng.uniform(-4, 4)
    head_pitch = 0.25 * phis[0] + rng.uniform(-6, 6)
    c1 = c2.frame.moved((0, -1.0, c2.H / 2 + 9.5)).rotated("x", c1_pitch - phis[0])
    head = c1.moved((0, 0, 11.0)).rotated("x", head_pitch - c1_pitch)
    return Skeleton(levels, c1, head, names)


# --------------------------------------------------------------------------- fractures


def _plane_fragments(n: Sequence[float], p0: Sequence[float], gap: float, delta: Sequence[float],
                     active: Region | None = None) -> list[Fragment]:
    """Two fragments either side of a plane; only where active(q) <= 0 is the bone cut."""
    nn = _v3(n) / np.linalg.norm(n)
    pp = _v3(p0)
    g2 = np.float32(gap / 2)

    def s(u: Arr, v: Arr, w: Arr) -> Arr:
        return (u - np.float32(pp[0])) * np.float32(nn[0]) + (v - np.float32(pp[1])) * np.float32(nn[1]) + \
            (w - np.float32(pp[2])) * np.float32(nn[2])

    def act(u: Arr, v: Arr, w: Arr) -> Arr:
        return active(u, v, w) if active is not None else np.full_like(u, -1e4)

    def ra(off: np.float32) -> Region:
        return lambda u, v, w: np.minimum(s(u, v, w) + off, -act(u, v, w))

    def rb(off: np.float32) -> Region:
        return lambda u, v, w: np.maximum(off - s(u, v, w), act(u, v, w))

    zero = np.float32(0)
    return [Fragment(np.zeros(3), ra(g2), ra(zero)), Fragment(_v3(delta), rb(g2), rb(zero))]


def _sector_fragments(centre: Sequence[float], cuts_deg: Sequence[float], gap: float,
                      spread: float) -> list[Fragment]:
    """A ring broken at angles (0 = anterior midline, +90 = left); each piece moves outward by spread/2."""
    c = _v3(centre)
    cuts = sorted(math.radians(a) % (2 * math.pi) for a in cuts_deg)
    frags = []
    for i, a0 in enumerate(cuts):
        a1 = cuts[(i + 1) % len(cuts)]
        span = (a1 - a0) % (2 * math.pi) or 2 * math.pi
        mid = a0 + span / 2
        delta = np.array([math.sin(mid), -math.cos(mid), 0.0]) * spread / 2

        def region(off: float, a0: float = a0, span: float = span) -> Region:
            def r(u: Arr, v: Arr, w: Arr) -> Arr:
                x, y = u - np.float32(c[0]), v - np.float32(c[1])
                phi = np.arctan2(x, -y)
                rel = np.mod(phi - np.float32(a0), np.float32(2 * math.pi))
                inside = np.where(rel < span, np.minimum(rel, span - rel),
                                  -np.minimum(rel - span, 2 * math.pi - rel))
                rho = np.maximum(np.sqrt(x * x + y * y), 4.0)
                return (np.float32(off) - rho * inside).astype(np.float32)
            return r

        frags.append(Fragment(delta, region(gap / 2), region(0.0)))
    return frags


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


@dataclass
class _Break:
    fragments: list[Fragment] = field(default_factory=list)
    warp: Warp | None = None
    warp_k: float = 1.0
    lost: float = 0.0  # height lost at the superior endplate (mm), for the disc above
    widen: float = 1.0
    hematoma: float = 0.0  # prevertebral hematoma thickness (mm), 0 for none


def _plan_fracture(kind: str, lv: Level | None, rng: np.random.Generator) -> _Break:
    """Fracture geometry in the vertebra's local frame."""
    br = _Break()
    gap = rng.uniform(1.0, 3.0)
    if lv is None and kind == "line":
        # C1 posterior arch fracture: both sides of the posterior arch broken, the ring barely spread
        cuts = [180 + rng.uniform(15, 45), 180 - rng.uniform(15, 45)]
        br.fragments = _sector_fragments((0, 6.0, 0), cuts, gap, rng.uniform(0, 1.0))
        return br
    if kind == "jefferson":
        n = int(rng.integers(2, 5))
        pool = [rng.uniform(10, 35), -rng.uniform(10, 35), 180 - rng.uniform(15, 45), 180 + rng.uniform(15, 45)]
        if n == 2:
            cuts = [pool[int(rng.integers(0, 2))], pool[2 + int(rng.integers(0, 2))]]
        elif n == 3:
            cuts = [pool[0], pool[1], pool[2 + int(rng.integers(0, 2))]]
        else:
            cuts = pool
        br.fragments = _sector_fragments((0, 6.0, 0), cuts, gap, rng.uniform(2.0, 8.0))
        return br
    assert lv is not None
    a, b, hh = lv.W / 2, lv.D / 2, lv.H / 2
    if kind == "dens":
        type3 = rng.random() < 0.35
        tilt = rng.uniform(-20, 20) if not type3 else rng.uniform(-35, 35)
        t = math.radians(tilt)
        w0 = hh + 1.5 if not type3 else hh - 4.0
        rad = 7.0 if not type3 else 11.0
        shift = np.array([rng.normal(0, 0.5), rng.uniform(-3, 3), rng.uniform(0, 1.0)])
        br.fragments = _plane_fragments((0, math.sin(t), math.cos(t)), (0, -1.0, w0), gap, shift,
                                        lambda u, v, w: np.sqrt(u * u + (v + 1) ** 2) - np.float32(rad))
        return br
    if kind == "hangman":
        t = math.radians(rng.uniform(-25, 25))
        shift = np.array([0.0, -rng.uniform(0, 3.5), -rng.uniform(0, 1.5)])
        br.fragments = _plane_fragments((0, -math.cos(t), math.sin(t)), (0, b + 5.5, -2), gap, shift,
                                        lambda u, v, w: np.abs(u) - np.float32(22))
        return br
    if kind in ("compression", "burst"):
        loss = rng.uniform(0.2, 0.5)
        wedge = kind == "compression" and rng.random() < 0.7
        widen = 1.0 if wedge else rng.uniform(1.06, 1.18)
        br.widen, br.lost = widen, loss * lv.H

        def warp(u: Arr, v: Arr, w: Arr) -> tuple[Arr, Arr, Arr]:
            if wedge:
                s = 1 - np.float32(loss) * np.clip((np.float32(b) - v) / np.float32(2 * b), 0, 1)
            else:
                s = np.float32(1 - loss)
            return u / np.float32(widen), v / np.float32(widen), np.float32(-hh) + (w + np.float32(hh)) / s

        br.warp, br.warp_k = warp, 1 - loss
        if not wedge:  # burst: a posterosuperior fragment pushed into the canal
            br.fragments = _plane_fragments((0, 1, 0.7), (0, b - 5, 0), rng.uniform(0.8, 1.8),
                                            (0, rng.uniform(1.5, 3.5), 0),
                                            lambda u, v, w: np.maximum(v - np.float32(b + 1), np.abs(u) - a))
        return br
    if kind == "teardrop":
        # the anteroinferior corner of the body broken off and pushed forwards and down
        n = np.array([0.0, -1.0, -rng.uniform(0.6, 1.4)])
        p0 = (0.0, -b + lv.D * rng.uniform(0.25, 0.4), -hh + lv.H * rng.uniform(0.25, 0.4))
        br.fragments = _plane_fragments(n, p0, rng.uniform(0.8, 2.0), (0, -rng.uniform(0.5, 3), -rng.uniform(0, 1.5)),
                                        lambda u, v, w: v - np.float32(b - 2))
        return br
    if kind == "spinous":
        # clay-shoveler's: the spinous process broken across, its tip displaced downwards
        thoracic = not lv.name.startswith("C")
        sp0 = np.array([0, b + lv.cd + (2.5 if thoracic else 2.0), -4.0 if thoracic else -2.5])
        t = math.radians(lv.sp_tilt)
        axis = np.array([0, math.cos(t), -math.sin(t)])
        p0 = sp0 + axis * lv.sp * rng.uniform(0.35, 0.7)
        n = axis + np.array([rng.normal(0, 0.15), 0, rng.normal(0, 0.3)])
        br.fragments = _plane_fragments(n, p0, gap, (0, rng.uniform(0, 1.5), -rng.uniform(1, 3.5)),
                                        lambda u, v, w: np.maximum(np.float32(b + lv.cd) - v, np.abs(u) - 9))
        return br
    # "line": one fracture plane through the body or through one side of the arch
    if rng.random() < 0.6:
        n = _unit(rng)
        p0 = (rng.uniform(-a / 2, a / 2), rng.uniform(-b / 2, b / 2), rng.uniform(-hh / 2, hh / 2))

        def active(u: Arr, v: Arr, w: Arr) -> Arr:
            return v - np.float32(b + 0.5)
    else:
        side = 1.0 if rng.random() < 0.5 else -1.0
        n = np.array([rng.normal(0, 0.3), 1.0, rng.normal(0, 0.5)])
        n[0] += side * rng.uniform(0.3, 1.2)
        p0 = (side * (lv.cw / 2 + rng.uniform(0, 4)), b + rng.uniform(3, 10), 0.0)

        def active(u: Arr, v: Arr, w: Arr) -> Arr:
            return np.maximum(np.float32(3) - u * np.float32(side), np.float32(b + 1) - v)
    nn = _v3(n) / np.linalg.norm(n)
    shift = np.cross(nn, _unit(rng))
    shift = shift / (np.linalg.norm(shift) + 1e-9) * rng.uniform(0, 3) + nn * rng.uniform(0, 1)
    br.fragments = _plane_fragments(nn, p0, gap, shift, active)
    return br


# --------------------------------------------------------------------------- bones


@dataclass
class BoneHu:
    cortical: float
    cancellous: float
    shell: float


def _vertebra_parts(lv: Level, br: _Break | None) -> list[_Part]:
    a, b, hh = lv.W / 2, lv.D / 2, lv.H / 2
    warp = br.warp if br else None
    wk = br.warp_k if br else 1.0
    ext = (0, 0, br.lost) if br else (0, 0, 0)
    cw, cd = lv.cw, lv.cd
    name = lv.name
    cerv = name.startswith("C")
    lumbar = name.startswith("L")
    parts: list[_Part] = []
    if name == "C2":
        parts.append(supcyl((0, 0, 0), a, b, hh, 2.6, 1.6, warp, wk, ext))
        parts.append(supell((0, -b + 2.5, -hh + 0.5), (a * 0.55, 3.5, 3.0), blend=1.5))  # anteroinferior lip
        parts += [capsule((0, -1.2, hh - 3), (0, -0.8, hh + 11.0), 4.9, 4.5, (0.95, 1.05, 1.0), blend=2.0)]
        parts.append(supell((0, -0.8, hh + 11.5), (4.4, 4.8, 4.2)))  # dens tip
        for s in (-1, 1):
            parts.append(supell((s * 11.5, 1.0, hh - 3.0), (7.5, 8.5, 4.5), 2.5, blend=2.0))  # superior facets
            parts += tube([(s * 9.5, 6.0, hh - 5), (s * 13.0, 13.0, -2), (s * 14.0, 18.0, -7)], 3.3,
                          (1.0, 1.0, 1.5), blend=1.5)  # pedicle + pars
            parts.append(tilted_box((s * 14.5, 19.0, -hh - 1), (5.0, 5.0, 6.5), 40, 1.2, blend=1.5))
            parts += tube([(s * 13.0, 21.0, -6), (s * 6.0, 25.5, -6), (0, 28.0, -6)], 3.0, (1, 1, 2.2), blend=1.5)
            parts.append(torus((s * 17.5, 2.0, 0.5), 4.0, 1.7, 1.6, blend=1.0))
            parts.append(capsule((s * 21.0, 2.5, 0.5), (s * lv.tp / 2, 4.0, -1.0), 2.6, 2.2, (1, 1, 1.4), blend=1.0))
            parts.append(capsule((s * 9.0, 1.0, hh - 6), (s * 14.0, 1.5, 0.5), 2.5, blend=1.5))
            parts.append(capsule((0, 28.0, -6), (s * 4.5, 28.0 + lv.sp, -13), 3.6, 2.8, (0.85, 1, 1.5), blend=2.0))
        return parts
    n_sup = 2.6 if cerv else (2.3 if not lumbar else 2.2)
    parts.append(supcyl((0, 0, 0), a, b, hh, n_sup, 1.5 if cerv else 2.0, warp, wk, ext))
    if lumbar or not cerv:
        # a kidney-shaped posterior wall: hollow the middle of the posterior surface a little
        parts.append(cut(supcyl((0, b + 3.2, 0), a * 0.45, 4.0, hh + 2, 2.0, 1.0)))
    # slightly concave endplates (the disc fills them) and the basivertebral venous foramen
    for sgn in (-1, 1):
        parts.append(cut(supell((0, -0.5, sgn * (hh + 3.0 - 0.9)), (a * 0.62, b * 0.62, 3.0))))
    parts.append(cut(capsule((0, b + 1.0, 0), (0, b - 3.0, 0), 0.8, scale=(1, 1, 1.4))))
    ped_y0 = b - 2.0
    for s in (-1, 1):
        if cerv:
            # uncinate process: a ridge on the lateral rim of the superior endplate
            parts.append(capsule((s * (a - 1.3), -b * 0.55, hh + 0.6), (s * (a - 1.3), b * 0.65, hh + 0.6), 1.5,
                                 scale=(0.9, 1.0, 1.5), blend=1.0))
            parts.append(capsule((s * (a - 2.2), ped_y0, 0.5), (s * (cw / 2 + 2.6), b + 5.0, 0.5), 2.8,
                                 scale=(1, 1, 1.3), blend=1.5))  # pedicle
            px, py = s * (cw / 2 + 5.0), b + 8.0
            hp = (lv.H + lv.disc) / 2 - 0.8
            parts.append(tilted_box((px, py, 0.0), (5.2, 5.5, hp), 40 if name != "C7" else 50, 3.0, blend=1.5))
            parts += tube([(s * (cw / 2 + 3.0), b + 11.0, -1.0), (s * cw / 4, b + cd + 0.8, -2.0),
                           (0, b + cd + 2.0, -2.5)], 2.0, (1, 1, 2.5), blend=1.5)  # lamina
            fx, fy = s * (cw / 2 + 2.8), b * 0.25
            if name != "C7":
                parts.append(torus((fx, fy, -0.5), 4.1, 1.5, 1.8, blend=1.0))  # transverse foramen
                parts.append(capsule((s * (a - 1.0), -1.5, -0.5), (fx - s * 2.5, fy - 2.5, -0.5), 2.0, blend=1.5))
                parts += tube([(fx + s * 3.5, fy - 2.5, -0.5), (s * (lv.tp / 2 - 2), fy - 5.0, -3.5)], [2.0, 2.4],
                              (1, 1, 1.3), blend=1.5)  # anterior tubercle
                parts += tube([(fx + s * 3.5, fy + 2.5, -0.5), (s * lv.tp / 2, fy + 3.5, -3.5)], [2.0, 2.6],
                              (1, 1, 1.3), blend=1.5)  # posterior tubercle
            else:
                parts.append(torus((fx, fy + 1.0, -0.5), 3.2, 1.6, 1.8, blend=1.0))
                parts += tube([(fx + s * 2.5, fy + 3.0, -0.5), (s * (lv.tp / 2 - 3), fy + 6.0, -2.0),
                               (s * lv.tp / 2, fy + 8.0, -2.5)], [2.6, 3.0, 3.2], (1, 1, 1.3), blend=1.5)
            sp0 = np.array([0, b + cd + 2.0, -2.5])
            t = math.radians(lv.sp_tilt)
            tip = sp0 + lv.sp * np.array([0, math.cos(t), -math.sin(t)])
            bifid = name in ("C3", "C4", "C5") or (name == "C6")
            parts.append(capsule(sp0, tip, 2.6, 2.0, (0.8, 1, 1.7), blend=2.0))
            if bifid:
                for s2 in (-1, 1):
                    parts.append(capsule(tip - (0, 2.0, -0.5), tip + (s2 * 3.2, 2.0, -0.8), 2.0, 1.8, blend=1.5))
            elif name == "C7":
                parts.append(supell(tip + (0, 1.5, -0.5), (4.0, 3.5, 4.5), blend=2.0))
        else:
            ped_w = 1.0 if not lumbar else 0.0
            parts.append(capsule((s * (a - 4.5), ped_y0, 2.0 + ped_w), (s * (cw / 2 + 2.8), b + 8.0, 2.0), 3.6 + ped_w,
                                 scale=(1, 1, 1.5), blend=1.5))
            parts += tube([(s * (cw / 2 + 3.5), b + 10.0, -1.0), (s * cw / 4, b + cd + 1.0, -3.0),
                           (0, b + cd + 2.5, -4.0)], 2.6, (1, 1, 2.6), blend=1.5)  # lamina
            facet_tilt = 70 if not lumbar else 88
            parts.append(tilted_box((s * (cw / 2 + 4.0), b + 11.0, 0.0), (4.2, 4.5, (lv.H + lv.disc) / 2 - 0.8),
                                    facet_tilt if not lumbar else 0, 1.3, blend=1.5))
            if not lumbar:
                tp_end = (s * lv.tp / 2, b + 16.0, 1.0)
                parts.append(capsule((s * (cw / 2 + 3.5), b + 9.0, 1.5), tp_end, 3.6, 3.2, (1, 1, 1.3), blend=1.5))
                parts.append(supell(tp_end, (4.5, 4.5, 5.0), blend=1.5))
            else:
                parts.append(capsule((s * (cw / 2 + 3.5), b + 6.0, 1.0), (s * lv.tp / 2, b + 8.0, 0.0), 4.5, 2.8,
                                     (1, 1, 1.2), blend=1.5))
            sp0 = np.array([0, b + cd + 2.5, -4.0])
            t = math.radians(lv.sp_tilt)
            tip = sp0 + lv.sp * np.array([0, math.cos(t), -math.sin(t)])
            if lumbar:
                parts.append(capsule(sp0, tip, 3.0, 3.0, (1.0, 1.0, 2.7), blend=2.0))
            else:
                parts.append(capsule(sp0, tip, 3.0, 2.6, (0.9, 1, 1.5), blend=2.0))
                parts.append(supell(tip, (3.5, 3.5, 4.0), blend=1.5))
    if lv.osteo > 0:
        o = lv.osteo
        for sgn in (-1, 1):  # lips on the anterior rims, curving towards the disc
            parts.append(capsule((-a * 0.55, -b + 0.8, sgn * (hh - 0.8)), (a * 0.55, -b + 0.8, sgn * (hh - 0.8)),
                                 1.0, scale=(1.0, 0.45 * o + 0.3, 0.35 * o + 0.3), blend=1.5))
            parts.append(capsule((0, -b - 0.1 * o, sgn * (hh - 0.5)), (0, -b - 0.45 * o, sgn * (hh + 0.35 * o)),
                                 0.4 * o + 0.5, scale=(2.5, 1.0, 1.0), blend=1.5))
    return parts


def _atlas_parts() -> list[_Part]:
    """C1 in its frame: origin on the dens axis at ring mid-height."""
    parts: list[_Part] = []
    arch = bezier((-13.0, -4.0, 0.5), (0.0, -16.5, 0.5), (13.0, -4.0, 0.5), 8)
    parts += tube(arch, 3.0, (1, 1, 1.7), blend=1.5)
    parts.append(supell((0, -12.5, 0.5), (4.0, 3.5, 5.5), blend=1.5))  # anterior tubercle
    post = [(20.0 * math.sin(math.radians(t)), 8.5 + 19.5 * math.cos(math.radians(t)), -0.5)
            for t in np.linspace(-112, 112, 11)]
    parts += tube(post, 3.0, (1, 1, 1.45), blend=1.5)
    parts.append(supell((0, 28.5, -1.0), (5.5, 3.8, 5.0), blend=1.5))  # posterior tubercle
    for s in (-1, 1):
        parts.append(supell((s * 18.5, 2.5, 0), (7.2, 10.0, 8.0), 2.8, blend=2.0))  # lateral mass
        parts.append(cut(supell((s * 17.5, 2.5, 10.5), (6.0, 9.0, 3.5))))  # concave superior facet
        parts.append(torus((s * 28.0, 3.5, 0.0), 4.2, 1.8, 1.5, blend=1.0))
        parts.append(capsule((s * 32.0, 3.5, 0.0), (s * 38.0, 4.5, -1.0), 3.2, 3.6, (1, 1, 1.4), blend=1.5))
        parts.append(supell((s * 38.0, 4.5, -1.0), (3.5, 4.5, 5.0), blend=1.5))
    return parts


# --------------------------------------------------------------------------- case assembly


@dataclass
class _Spec:
    kind: str
    rng: np.random.Generator
    skel: Skeleton
    bone: BoneHu
    breaks: dict[str, _Break]
    render_levels: list[str]
    chest_levels: list[str]


def _landmark_z(skel: Skeleton, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(top point, bottom point) of a landmark in the anatomy frame."""
    if name == "vertex":
        p = skel.head.at((0, 10, 135))
        return p, p
    if name == "skull_base":
        p = skel.head.at((0, 10, 22))
        return p, skel.head.at((0, 10, 2))
    if name == "C1":
        return skel.c1.at((0, 0, 8.0)), skel.c1.at((0, 0, -8.0))
    lv = skel.levels[name]
    return lv.frame.at((0, 0, lv.H / 2)), lv.frame.at((0, 0, -lv.H / 2))


def _level_extent(skel: Skeleton, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A level's whole craniocaudal extent (C2 from the dens tip), for levels_in_field."""
    if name == "C2":
        lv = skel.levels[name]
        return lv.frame.at((0, -1.0, lv.H / 2 + 15.5)), lv.frame.at((0, 0, -lv.H / 2))
    return _landmark_z(skel, name)


def _check(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {', '.join(map(str, allowed))}")


def generate(seed: int, *, kind: str = "cspine", p_fracture: float = 0.5, fractures: dict[str, str] | None = None,
             spacing: tuple[float, float, float] = (1.0, 0.7, 0.7), fov_mm: tuple[float, float] | None = None,
             z_range: tuple[str, str] | None = None, size_scale: float = 1.0,
             rotation_deg: tuple[float, float, float] = (0, 0, 0), hu_offset: float = 0.0, hu_scale: float = 1.0,
             noise_hu: float | None = None, slice_thickness_mm: float | None = None) -> HeldoutCt:
    """One held-out CT volume; deterministic for (seed, arguments)."""
    _check("kind", kind, KINDS)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing={spacing!r}; expected three positive mm values (z, y, x)")
    if not 0.3 <= size_scale <= 3:
        raise ValueError(f"size_scale={size_scale!r}; expected 0.3..3")
    if not 0 <= p_fracture <= 1:
        raise ValueError(f"p_fracture={p_fracture!r}; expected 0..1")
    rng = np.random.default_rng([seed, 11])
    frng = np.random.default_rng([seed, 23])  # fracture choices: independent of everything else
    nrng = np.random.default_rng([seed, 37])  # acquisition noise
    skel = _layout(rng)
    bone = BoneHu(rng.uniform(1000, 1800), rng.uniform(150, 400), rng.uniform(0.8, 1.2))
    if kind != "cspine":
        # The negatives module builds on this one's primitives and registers itself here
        # (the package imports it), so neither module imports the other both ways.
        if NEGATIVE_GENERATOR is None:
            raise RuntimeError("import spine_node.inference.heldout for the negative kinds")
        return NEGATIVE_GENERATOR(kind, seed, rng, nrng, skel, bone, spacing=spacing, fov_mm=fov_mm,
                                  size_scale=size_scale, rotation_deg=rotation_deg, hu_offset=hu_offset,
                                  hu_scale=hu_scale, noise_hu=noise_hu,
                                  slice_thickness_mm=slice_thickness_mm)
    start, stop = z_range if z_range is not None else ("skull_base", str(rng.choice(["T2", "T3"])))
    _check("z_range start", start, LANDMARKS)
    _check("z_range stop", stop, LANDMARKS)
    if LANDMARKS.index(stop) < LANDMARKS.index(start):
        raise ValueError(f"z_range={z_range!r}; expected the start above the stop")
    top_pt = _landmark_z(skel, start)[0]
    bot_pt = _landmark_z(skel, stop)[1]
    # the operator's slack beyond the landmarks: small at a vertebra (C1 stays out of a scan from C2)
    margin_top = rng.uniform(0, 15) if start in ("skull_base", "vertex") else rng.uniform(1, 6)
    margin_bot = rng.uniform(1, 6)
    geo = _Geometry.build(rng, spacing, fov_mm, size_scale, rotation_deg, top_pt, bot_pt, margin_top, margin_bot,
                          skel, fov_default=(140, 180))
    in_field = [n for n in LEVELS if geo.fraction_inside(*_level_extent(skel, n)) >= 0.5]
    # fractures: drawn only among the levels in the field
    if fractures is None:
        fractures = {}
        if in_field and frng.random() < p_fracture:
            fractures = _draw_fractures(frng, int(frng.integers(1, 3)), in_field)
    for lvl, fk in fractures.items():
        _check("fracture level", lvl, LEVELS)
        _check(f"fracture kind at {lvl}", fk, FRACTURE_KINDS)
        if fk == "jefferson" and lvl != "C1" or lvl == "C1" and fk not in ("jefferson", "line"):
            raise ValueError(f"fracture {lvl}={fk!r}; C1 takes 'jefferson' or 'line' and only C1 takes 'jefferson'")
        if fk in ("dens", "hangman") and lvl != "C2":
            raise ValueError(f"fracture {lvl}={fk!r}; 'dens' and 'hangman' are C2 fractures")
    breaks: dict[str, _Break] = {}
    for lvl in sorted(fractures):
        sub = np.random.default_rng([seed, 41, LABEL_OF[lvl]])
        breaks[lvl] = _plan_fracture(fractures[lvl], skel.levels.get(lvl), sub)
        hr = np.random.default_rng([seed, 43, LABEL_OF[lvl]])
        if lvl in CERVICAL and hr.random() < 0.6:
            breaks[lvl].hematoma = hr.uniform(3.0, 8.0)
    scene = geo.scene(slice_thickness_mm)
    _paint_neck(scene, skel, rng, bone, breaks)
    levels_in = tuple(n for n in CERVICAL if geo.fraction_inside(*_level_extent(skel, n)) >= 0.5)
    return geo.acquire(scene, nrng, kind, fractures, levels_in, hu_offset, hu_scale, noise_hu, slice_thickness_mm)


def _draw_fractures(rng: np.random.Generator, count: int, in_field: Sequence[str]) -> dict[str, str]:
    # roughly the clinical distribution: C2 and C5-C6 most often
    pool = [n for n in ("C1", "C2", "C2", "C3", "C4", "C5", "C5", "C6", "C6", "C7", "T1") if n in in_field]
    if not pool:
        return {}
    out: dict[str, str] = {}
    count = min(count, len(set(pool)))
    while len(out) < count:
        lvl = str(rng.choice(pool))
        if lvl == "C1":
            kind = str(rng.choice(["jefferson", "jefferson", "line"]))
        elif lvl == "C2":
            kind = str(rng.choice(["dens", "dens", "hangman", "line"]))
        else:
            kind = str(rng.choice(["line", "line", "line", "compression", "compression", "burst", "teardrop",
                                   "spinous"]))
        out[lvl] = kind
    return out


@dataclass
class _Geometry:
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    w0: np.ndarray  # world (DICOM LPS) position of voxel (0, 0, 0)
    A: np.ndarray
    b: np.ndarray
    scale: float
    R: np.ndarray
    C: np.ndarray
    Cw: np.ndarray
    z_top: float
    z_bot: float
    render_factor: int

    @staticmethod
    def build(rng: np.random.Generator, spacing: tuple[float, float, float], fov_mm: tuple[float, float] | None,
              size_scale: float, rotation_deg: tuple[float, float, float], top_pt: np.ndarray, bot_pt: np.ndarray,
              margin_top: float, margin_bot: float, skel: Skeleton, fov_default: tuple[float, float],
              centre: np.ndarray | None = None) -> _Geometry:
        rx, ry, rz = (float(r) for r in rotation_deg)
        R = _rot("z", rz) @ _rot("y", ry) @ _rot("x", rx)
        C = (top_pt + bot_pt) / 2 if centre is None else centre
        if centre is None:
            # centre the field a little anterior to the bodies, as a C-spine protocol does
            C = C + np.array([rng.normal(0, 3), -rng.uniform(5, 20), 0.0])
        Cw = np.array([rng.normal(0, 15), rng.normal(0, 15), rng.uniform(-80, 80)])  # table position
        s = float(size_scale)

        def world(p: np.ndarray) -> np.ndarray:
            return Cw + s * (R @ (p - C))

        zt, zb = world(top_pt)[2] + margin_top * s, world(bot_pt)[2] - margin_bot * s
        zt, zb = max(zt, zb), min(zt, zb)
        dz, dy, dx = spacing
        if fov_mm is not None:
            width, length = float(fov_mm[0]), float(fov_mm[1])
            if width <= 0 or length <= 0:
                raise ValueError(f"fov_mm={fov_mm!r}; expected two positive mm values (in-plane width, z length)")
        else:
            width, length = rng.uniform(*fov_default), zt - zb
        nz = max(1, int(round(length / dz)))
        ny, nx = max(8, int(round(width / dy))), max(8, int(round(width / dx)))
        w0 = np.array([Cw[0] - (nx - 1) / 2 * dx, Cw[1] - (ny - 1) / 2 * dy, zt])
        r = max(1, math.ceil(dz / 1.0 - 1e-6))
        A = R.T / s
        b = C - A @ Cw
        return _Geometry(spacing, (nz, ny, nx), w0, A, b, s, R, C, Cw, zt, zt - nz * dz, r)

    def world_z(self, p: np.ndarray) -> float:
        return float((self.Cw + self.scale * (self.R @ (p - self.C)))[2])

    def fraction_inside(self, top: np.ndarray, bot: np.ndarray) -> float:
        a, b = sorted((self.world_z(top), self.world_z(bot)))
        zl, zh = self.z_bot + self.spacing[0] / 2, self.z_top + self.spacing[0] / 2
        if b - a < 1e-6:
            return float(zl <= a <= zh)
        return max(0.0, min(b, zh) - max(a, zl)) / (b - a)

    def scene(self, thickness: float | None) -> _Scene:
        dz, dy, dx = self.spacing
        r = self.render_factor
        nz, ny, nx = self.shape
        dzr = dz / r
        w0 = self.w0 + np.array([0, 0, dz / 2 - dzr / 2])
        return _Scene((nz * r, ny, nx), (dzr, dy, dx), w0, self.A, self.b, self.scale)

    def acquire(self, scene: _Scene, nrng: np.random.Generator, kind: str, fractures: dict[str, str],
                levels_in: tuple[str, ...], hu_offset: float, hu_scale: float, noise_hu: float | None,
                thickness: float | None) -> HeldoutCt:
        dz, dy, dx = self.spacing
        r = self.render_factor
        dzr = dz / r
        thick = float(dz if thickness is None else thickness)
        if thick <= 0:
            raise ValueError(f"slice_thickness_mm={thickness!r}; expected a positive thickness")
        hu = scene.hu
        # tissue texture (trabeculae, lung vessels, fat septa): smooth noise at half resolution, ~1.2 mm grain
        tex_c = nrng.standard_normal(tuple(n // 2 + 1 for n in scene.shape), dtype=np.float32)
        ndimage.gaussian_filter(tex_c, (0.35 / dzr, 0.35 / dy, 0.35 / dx), output=tex_c, truncate=2.0)
        tex_c *= np.float32(1 / max(float(tex_c.std()), 1e-6))
        hu += scene.tex * _upsample(tex_c, 2, scene.shape)
        del tex_c
        # slice profile: the render already integrates one render slice; add the rest as a box + a 0.25 mm blur
        extra = max(thick - dzr, 0.0) / dzr
        if extra > 1.0:
            n = int(math.ceil(extra)) | 1
            ker = np.ones(n, dtype=np.float64)
            edge = (extra - (n - 2)) / 2
            ker[0] = ker[-1] = max(edge, 0.0)
            ker /= ker.sum()
            hu = ndimage.convolve1d(hu, ker.astype(np.float32), axis=0, mode="nearest")
        _blur3(hu, 0, math.sqrt(min(extra, 1.0) ** 2 / 12 + (0.25 / dzr) ** 2))
        blur = float(nrng.uniform(0.3, 0.5))
        _blur3(hu, 1, blur / dy)
        _blur3(hu, 2, blur / dx)
        labels = scene.labels
        if r > 1:
            centre = np.arange(self.shape[0]) * r + (r - 1) / 2
            lo = np.floor(centre).astype(int)
            frac = (centre - lo).astype(np.float32)[:, None, None]
            hi_idx = np.minimum(lo + 1, hu.shape[0] - 1)
            hu = hu[lo] * (1 - frac) + hu[hi_idx] * frac
            labels = labels[np.round(centre).astype(int)]
        sigma_n = float(nrng.uniform(5, 25)) if noise_hu is None else float(noise_hu)
        if sigma_n < 0:
            raise ValueError(f"noise_hu={noise_hu!r}; expected a non-negative standard deviation")
        noise = nrng.standard_normal(hu.shape, dtype=np.float32)
        if sigma_n > 0:
            # quantum noise, correlated in-plane by the reconstruction kernel
            gain = _blur3(noise, 1, 0.7) * _blur3(noise, 2, 0.7)
            # more noise through a wider patient (the shoulders), as with a fixed tube current
            if scene.width_mm is not None:
                width = scene.width_mm if r == 1 else scene.width_mm[np.round(centre).astype(int)]
                factor = (0.8 + 0.9 * np.clip((width - 110) / 250, 0, 1)).astype(np.float32)
                wide = np.clip((width - 230) / 120, 0, 1)
            else:
                factor = np.ones(hu.shape[0], dtype=np.float32)
                wide = np.zeros(hu.shape[0])
            hu += noise * (np.float32(sigma_n / gain) * factor[:, None, None])
            # photon starvation through the shoulders: streaks running left-right in the widest slices
            if wide.any():
                bands = nrng.standard_normal((hu.shape[0], hu.shape[1])).astype(np.float32)
                ndimage.gaussian_filter1d(bands, 1.2, axis=1, output=bands)
                bands *= np.float32(1.5 * sigma_n * 2.5) * wide[:, None].astype(np.float32)
                for k in np.nonzero(wide)[0]:
                    hu[k] += bands[k][:, None] * (hu[k] > -500)
        del noise
        hu = hu * np.float32(hu_scale) + np.float32(hu_offset)
        np.clip(hu, -1024, 3071, out=hu)
        origin = (float(self.w0[0]), float(self.w0[1]), float(self.w0[2]))
        return HeldoutCt(hu.astype(np.float32, copy=False), self.spacing, np.ascontiguousarray(labels), dict(fractures),
                         kind, levels_in, thick, origin)


# --------------------------------------------------------------------------- painting the neck


def _spine_y(skel: Skeleton) -> Callable[[Arr], Arr]:
    pts = skel.spine_points()
    order = np.argsort(pts[:, 2])
    zs, ys = pts[order, 2], pts[order, 1]

    def f(z: Arr) -> Arr:
        return np.interp(z, zs, ys).astype(np.float32)

    return f


def _column(skel: Skeleton, table: Sequence[tuple[float, float, float, float, float]], inset: float = 0.0,
            post_extra: float = 0.0, lo_z: float = -1e4, hi_z: float = 1e4) -> _Part:
    """Body outline: at height z a superellipse centred (0, cy) with half axes (ax, ay) and exponent n.
    table rows: (z, cy, ax, ay, n), z ascending."""
    tb = np.array(sorted(table), dtype=np.float64)
    zs = tb[:, 0]

    def fn(u: Arr, v: Arr, w: Arr) -> Arr:
        cy = np.interp(w, zs, tb[:, 1]).astype(np.float32)
        ax = np.interp(w, zs, tb[:, 2]).astype(np.float32)
        ay = np.interp(w, zs, tb[:, 3]).astype(np.float32)
        n = np.float32(tb[:, 4].mean())
        y = v - cy
        ins = np.float32(inset) + np.float32(post_extra) * np.clip(y / ay, 0, 1)
        x = np.abs(u) / (ax - ins)
        yy = np.abs(y) / (ay - ins)
        f = (x**n + yy**n) ** np.float32(1 / n)
        d = (f - 1) * np.minimum(ax, ay)
        dz = np.maximum(np.float32(lo_z) - w, w - np.float32(hi_z))
        return np.maximum(d, dz)

    big = float(tb[:, 2:4].max()) + 20
    return _Part(np.array([-big, -400.0, max(lo_z, zs[0] - 400)]), np.array([big, 400.0, min(hi_z, zs[-1] + 400)]),
                 fn, coarse=4)


def _paint_neck(sc: _Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu,
                breaks: dict[str, _Break]) -> None:
    L = skel.levels
    head = skel.head
    zb = float(head.o[2])
    yb = float(head.o[1])

    def lz(n: str) -> float:
        return float(L[n].frame.o[2])

    def ly(n: str) -> float:
        return float(L[n].frame.o[1])

    fat0 = rng.uniform(3, 8)
    fat_post = rng.uniform(4, 14)
    neck_w = rng.uniform(52, 64)
    shoulder = rng.uniform(150, 185)
    # (z, centre y, half width, half depth, exponent): skin ~50 mm in front of the bodies' centres and
    # 65-85 mm behind them (posterior neck muscles), widening into the shoulders below C7
    back = rng.uniform(62, 80)
    table = [
        (zb + 30, yb - 5, 70, 80, 2.2),
        (zb, yb + 5, neck_w + 8, 68, 2.2),
        (lz("C3"), ly("C3") + (back - 50) / 2, neck_w, (back + 50) / 2, 2.3),
        (lz("C5"), ly("C5") + (back - 52) / 2, neck_w, (back + 52) / 2, 2.4),
        (lz("C7"), ly("C7") + (back + 8 - 55) / 2, neck_w + 12, (back + 8 + 55) / 2, 2.6),
        (lz("T1"), ly("T1") + (back + 15 - 70) / 2, shoulder * 0.7, (back + 15 + 70) / 2, 2.8),
        (lz("T2"), ly("T2") - 8, shoulder, 95, 3.0),
        (lz("T4"), ly("T4") - 40, shoulder, 110, 3.0),
        (lz("T12"), ly("T12") - 50, shoulder * 0.9, 115, 2.6),
    ]
    hi = zb + 25
    sc.set_width(table)
    outline = [_column(skel, table, hi_z=hi), supell(head.at((0, 5, 40)), (76, 100, 96), blend=20.0),
               supell(head.at((0, -62, -25)), (52, 40, 42), blend=18.0)]
    outline[1].coarse = outline[2].coarse = 4
    sc.paint(IDENTITY, outline, -95.0, tex=8.0)  # everything inside the skin starts as fat
    muscle = [_column(skel, table, inset=fat0, post_extra=fat_post, hi_z=hi)]
    sc.paint(IDENTITY, muscle, 48.0, tex=6.0)
    # fat planes between the posterior neck muscles (splenius, semispinalis, multifidus)
    for k, off in enumerate((14.0, 24.0, 34.0)):
        for s in (-1, 1):
            pts = []
            for n in ("C2", "C3", "C4", "C5", "C6", "C7", "T1"):
                lv = L[n]
                pts.append(lv.frame.at((s * (8 + k * 6), lv.D / 2 + off + 6, 0)))
            sc.paint(IDENTITY, tube(pts, 1.0, (3.5, 1, 1)), -80.0)
    # posterior triangle fat, parapharyngeal/retropharyngeal fat
    for s in (-1, 1):
        sc.paint(IDENTITY, [supell(L["C5"].frame.at((s * 42, 5, 0)), (11, 13, 38))], -90.0, tex=8.0)
        sc.paint(IDENTITY, [supell(skel.c1.at((s * 20, -30, -12)), (9, 12, 22))], -90.0, tex=8.0)
    # head: scalp is the outline; vault, brain, skull base
    _paint_head(sc, skel, rng, bone, neck=True)
    # airway, esophagus, vessels, thyroid; some C-spine CTs are CT angiograms
    contrast = rng.random() < 0.15
    artery = rng.uniform(250, 450) if contrast else rng.uniform(35, 50)
    vein = rng.uniform(120, 250) if contrast else rng.uniform(30, 45)
    _paint_viscera(sc, skel, rng, bone, artery, vein)
    # prevertebral hematoma in front of a fractured cervical level (it narrows the airway)
    for n, br in breaks.items():
        if br.hematoma <= 0:
            continue
        t = br.hematoma
        if n == "C1":
            sc.paint(skel.c1, [supell((0, -16.0 - t / 2, 0), (12, t / 2 + 1.5, 14))], 58.0, tex=6.0)
        else:
            lv = L[n]
            sc.paint(lv.frame, [supell((0, -lv.D / 2 - t / 2 - 0.5, 0), (lv.W * 0.45, t / 2 + 1.5, lv.H / 2 + 5))],
                     58.0, tex=6.0)
    # vertebral arteries: up through the transverse foramina of C6-C1, then over the C1 posterior arch
    for s in (-1, 1):
        path = [L["C7"].frame.at((s * (L["C7"].cw / 2 + 6), -4, -6))]
        for n in ("C6", "C5", "C4", "C3"):
            lv = L[n]
            path.append(lv.frame.at((s * (lv.cw / 2 + 2.8), lv.D / 2 * 0.25, -0.5)))
        path += [L["C2"].frame.at((s * 17.5, 2.0, 0.5)), skel.c1.at((s * 28.0, 3.5, 0.0)),
                 skel.c1.at((s * 24.0, 14.0, 5.0)), skel.c1.at((s * 12.0, 24.0, 5.0))]
        sc.paint(IDENTITY, tube(path, 2.0), artery)
    # spinal canal contents
    canal = [head.at((0, 14, 30)), head.at((0, 16, 8)), skel.c1.at((0, 14, 0))]
    for n in skel.order[:10]:
        lv = L[n]
        canal.append(lv.frame.at((0, lv.D / 2 + lv.cd / 2 + 0.5, 0)))
    sc.paint(IDENTITY, tube(canal[2:], 6.5, (1.6, 1, 1)), -70.0)  # epidural fat
    sc.paint(IDENTITY, tube(canal[2:], 6.0, (1.45, 1, 1)), 6.0)  # dural sac (CSF)
    sc.paint(IDENTITY, tube(canal, [9, 8, 5.5] + [4.6] * (len(canal) - 3), (1.35, 1, 1)), 36.0, tex=2.0)  # cord
    # lungs (apices above the first rib)
    for s in (-1, 1):
        apex = L["T1"].frame.at((s * 42, -2, 6 + rng.uniform(0, 10)))
        ctr = apex - np.array([0, 0, 95.0]) + np.array([s * 18, -18, 0])
        lung = supell(ctr, (48, 62, 95), 2.0)
        lung.coarse = 3
        sc.paint(IDENTITY, [lung], -840.0, tex=40.0)
    # discs
    for up, lo in zip(skel.order[:9], skel.order[1:10], strict=True):
        lu, ll = L[up], L[lo]
        br = breaks.get(lo)
        lost = br.lost if br else 0.0
        wid = br.widen if br else 1.0
        hd = lu.disc / 2 + 0.9
        # disc in the lower vertebra's frame, reaching down into a depressed endplate
        fr = ll.frame.moved((0, 0, ll.H / 2 + lu.disc / 2))
        a = (lu.W + ll.W) / 4 * wid
        b = (lu.D + ll.D) / 4 * wid
        sc.paint(fr, [supcyl((0, 0, -lost / 2), a, b, hd + lost / 2, 2.4, 1.2)], 95.0, tex=6.0)
        sc.paint(fr, [supcyl((0, -0.5, 0), a * 0.5, b * 0.5, hd - 0.5, 2.0, 1.5)], 70.0)
    # bones
    _paint_spine(sc, skel, bone, breaks, skel.order[:10])
    _paint_ribs(sc, skel, rng, bone, ("T1", "T2", "T3"))


def _paint_spine(sc: _Scene, skel: Skeleton, bone: BoneHu, breaks: dict[str, _Break], names: Sequence[str],
                 labelled: bool = True, atlas: bool = True) -> None:
    for n in names:
        lv = skel.levels[n]
        br = breaks.get(n)
        label = LABEL_OF.get(n, 0) if labelled else 0
        sc.paint_bone(lv.frame, _vertebra_parts(lv, br), bone.cortical, bone.cancellous, bone.shell, label,
                      br.fragments if br else ())
    if not atlas:
        return
    br1 = breaks.get("C1")
    sc.paint_bone(skel.c1, _atlas_parts(), bone.cortical, bone.cancellous, bone.shell, LABEL_OF["C1"],
                  br1.fragments if br1 else ())


def _rib_points(lv: Level, side: int, number: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Rib path in the vertebra's frame: head on the body, tubercle at the transverse process tip, then an
    elliptic arc round the chest, dropping towards its anterior end; the last point is the costochondral
    junction."""
    a, b = lv.W / 2, lv.D / 2
    tub = np.array([side * (lv.tp / 2 - 3), b + 12.0, 0.0])
    pts = [np.array([side * (a + 1.5), b * 0.4, lv.H / 2 - (3 if number > 1 else 6)]), tub]
    # half width and half depth of the rib's arc: the upper thoracic cage widens quickly
    half_w = {1: 50, 2: 74, 3: 88, 4: 98, 5: 106}.get(number, 112) * rng.uniform(0.93, 1.07)
    half_d = {1: 36, 2: 52, 3: 64, 4: 72, 5: 80}.get(number, 86) * rng.uniform(0.93, 1.07)
    drop = {1: 28, 2: 45, 3: 60}.get(number, 75)
    th0 = math.asin(min(0.95, abs(tub[0]) / half_w))
    vc = tub[1] - half_d * math.cos(th0)
    th1 = math.pi * (0.80 if number == 1 else 0.86)
    for t in np.linspace(0.12, 1.0, 10):
        th = th0 + (th1 - th0) * t
        pts.append(np.array([side * half_w * math.sin(th), vc + half_d * math.cos(th), -drop * t**1.3]))
    return pts


def _paint_ribs(sc: _Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu, names: Sequence[str]) -> None:
    for n in names:
        lv = skel.levels[n]
        number = int(n[1:])
        for s in (-1, 1):
            pts = _rib_points(lv, s, number, rng)
            scale = (1, 1, 0.55) if number == 1 else (1, 1, 1.5)
            r = 5.0 if number == 1 else 3.6
            sc.paint_bone(lv.frame, tube(pts[:-1], r, scale, blend=1.0), bone.cortical, bone.cancellous * 0.9, 0.9)
            # costal cartilage to the sternum
            end = pts[-1]
            ster = np.array([s * 14.0, end[1] - 10, end[2] - 4])
            sc.paint(lv.frame, tube([pts[-2], end, ster], 3.5, scale), 120.0, tex=10.0)


def _paint_head(sc: _Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu, neck: bool) -> None:
    h = skel.head
    cort = bone.cortical
    canc = bone.cancellous + 100
    vault_c = (0, 5, 40)
    vault_r = np.array([76, 100, 96]) - 5.0  # scalp 5 mm
    thick = rng.uniform(5, 8)
    # cranial cavity, bounded below by the skull base (posterior fossa low, anterior fossa high)

    def floor(u: Arr, v: Arr, w: Arr) -> Arr:
        # height of the cranial floor: posterior fossa at -8, middle at +12, anterior at +38
        step1 = 1 / (1 + np.exp((v + 10) / 5))
        step2 = 1 / (1 + np.exp((v + 45) / 5))
        # behind the foramen magnum the occipital squama curves up to the inion; the cerebellar
        # fossae dip a little either side of the midline
        rise = np.float32(2.5) * np.logaddexp(0, (v - 38) / np.float32(5)) * np.float32(1.6)
        dip = np.float32(6) * np.exp(-(((np.abs(u) - 32) / np.float32(14)) ** 2)) / (1 + np.exp(-(v - 15) / 6))
        return np.float32(4) + np.float32(20) * step1 + np.float32(26) * step2 + rise - dip - w

    inner = supell(vault_c, vault_r - thick)
    outer = supell(vault_c, vault_r)
    cavity = _Part(inner.lo, inner.hi, lambda e_in, fl: np.maximum(e_in, fl), coarse=3, fields=(inner.fn, floor))

    def skull_fn(e_out: Arr, e_in: Arr, fl: Arr) -> Arr:
        shell = np.maximum(np.maximum(e_out, -e_in), fl - np.float32(8))
        base = np.maximum(e_in - np.float32(2), np.abs(fl - np.float32(4)) - np.float32(4))
        return np.minimum(shell, base)

    skull = _Part(outer.lo, outer.hi, skull_fn, coarse=3, fields=(outer.fn, inner.fn, floor))
    fm = supcyl((0, 17.0, 4), 14.5, 17.5, 14, 2.0, 2.0)  # foramen magnum
    sc.paint_layers(h, [cavity], [(10.0, 0.0, 0.0), (38.0, 4.0, 2.5), (29.0, 3.0, 13.0)])  # CSF, grey, white matter
    for s in (-1, 1):
        sc.paint(h, [supell((s * 9, -5, 55), (7, 22, 8))], 8.0)  # lateral ventricles
    parts: list[_Part] = [skull, cut(fm)]
    # occipital condyles, clivus, mastoids
    for s in (-1, 1):
        parts.append(supell((s * 15.0, 3.0, 3.5), (6.0, 11.0, 5.0), 2.2, blend=3.0))  # condyle
        parts.append(supell((s * 50.0, 12.0, -6.0), (9.0, 12.0, 16.0), 2.0, blend=5.0))  # mastoid
        parts.append(capsule((s * 45.0, 8.0, 4.0), (s * 14.0, -18.0, 14.0), 7.0, 4.0, blend=4.0))  # petrous ridge
    parts.append(capsule((0, -4.5, 2.0), (0, -24.0, 34.0), 4.0, 6.0, (2.2, 1, 1), blend=4.0))  # clivus
    sc.paint_bone(h, parts, cort, canc, 1.6, tex=40.0)
    for s in (-1, 1):
        sc.paint(h, [supell((s * 50.0, 10.0, 0.0), (5.0, 7.0, 9.0))], -700.0, tex=250.0)  # mastoid air cells
    if not neck:
        # orbits: globes in orbital fat, below the anterior fossa
        for s in (-1, 1):
            sc.paint(h, [supell((s * 32, -78, 46), (17, 18, 16))], -90.0, tex=6.0)
            sc.paint(h, [supell((s * 32, -86, 46), (12, 12, 12))], 12.0)
            sc.paint_bone(h, [supell((s * 32, -74, 62), (18, 20, 3))], cort, canc, 1.0)  # orbital roof
    # face: maxilla with palate and sinuses, nasal cavity, mandible, teeth
    sc.paint_bone(h, [supcyl((0, -58, -18), 24, 30, 3.5, 2.5, 1.5)], cort, canc, 1.2)  # hard palate
    sc.paint(h, [supcyl((0, -62, 4), 13, 30, 17, 2.2, 4.0)], -1000.0)  # nasal cavity
    for s in (-1, 1):  # inferior and middle turbinates fill most of it
        sc.paint(h, [capsule((s * 9, -40, -8), (s * 9, -82, -8), 4.5, scale=(1, 1, 1.6))], 35.0)
        sc.paint(h, [capsule((s * 9, -45, 7), (s * 10, -78, 9), 3.5, scale=(1, 1, 1.5))], 35.0)
    sc.paint(h, [supell((0, -30, -3), (11, 8, 11))], -1000.0)  # nasopharynx
    for s in (-1, 1):
        sinus = supell((s * 30, -62, 8), (14, 17, 17))
        sc.paint_bone(h, [sinus], cort, cort * 0.8, 1.0, tex=0.0)
        sc.paint(h, [sinus], -1000.0, inset=1.4)
    sc.paint_bone(h, [supcyl((0, -58, 5), 0.9, 30, 15, 2.0, 0.4)], cort * 0.45, cort * 0.45, 0.9)  # septum
    arch_up = bezier((-28, -35, -22), (0, -100, -22), (28, -35, -22), 10)
    sc.paint_bone(h, tube(arch_up, 4.5, (1, 1, 1.7)), cort, canc, 1.3)
    man = []
    for s in (-1, 1):
        man += tube([(s * 50, -14, 4), (s * 48, -20, -18), (s * 46, -24, -40)], 4.5, (0.75, 1.6, 1.0))
        man += tube([(s * 46, -24, -40), (s * 40, -48, -48), (s * 24, -74, -52)], 5.0, (0.9, 1.0, 2.2))
        man += tube([(s * 24, -74, -52), (0, -84, -52)], 6.0, (1.0, 1.0, 2.0))
    sc.paint_bone(h, man, cort, canc, 1.8, tex=40.0)
    enamel = 2400.0 + rng.uniform(-300, 500)
    teeth_up = bezier((-25, -40, -28), (0, -104, -28), (25, -40, -28), 14)
    teeth_lo = bezier((-24, -44, -36), (0, -100, -36), (24, -44, -36), 14)
    sc.paint(h, [supell(p, (3.0, 3.5, 5.0)) for p in teeth_up[1:] + teeth_lo[1:]], enamel)


def _paint_viscera(sc: _Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu, artery: float,
                   vein: float) -> None:
    L = skel.levels
    h = skel.head

    def front(n: str, off: float, u: float = 0.0, dw: float = 0.0) -> np.ndarray:
        lv = L[n]
        return lv.frame.at((u, -lv.D / 2 - off, dw))

    # airway: nasopharynx -> oropharynx -> larynx -> trachea (centre points, half width, half AP)
    air = [(skel.c1.at((0, -24, 0)), 14, 7), (front("C2", 11), 16, 6.5), (front("C3", 12), 15, 7),
           (front("C4", 20), 12, 11), (front("C5", 24), 7, 9), (front("C6", 22), 9, 8), (front("C7", 22), 9, 8.5),
           (front("T1", 24), 9, 8.5), (front("T2", 27), 9, 8.5), (front("T3", 30), 9, 8.5)]
    for (p0, w0, d0), (p1, w1, d1) in zip(air[:-1], air[1:], strict=True):
        r = (d0 + d1) / 2
        sc.paint(IDENTITY, [capsule(p0, p1, r, scale=((w0 + w1) / 2 / r, 1, 1))], -1000.0)
    # epiglottis/vallecula air pocket anterior at C3
    sc.paint(IDENTITY, [supell(front("C3", 30), (10, 4, 6))], -1000.0)
    # thyroid cartilage (partly calcified) and cricoid
    calc = rng.uniform(80, 400)
    for s in (-1, 1):
        sc.paint(IDENTITY, [capsule(front("C4", 38, s * 2), front("C5", 24, s * 19), 1.6, scale=(1, 1, 6))],
                 calc, tex=40.0)
    sc.paint(IDENTITY, [torus(front("C6", 22), 11.0, 1.8, 3.0)], calc * 0.8, tex=30.0)
    # hyoid (U opening posteriorly)
    hy = bezier(front("C3", 18, 19, -4), front("C3", 52, 0, -4), front("C3", 18, -19, -4), 8)
    sc.paint_bone(IDENTITY, tube(hy, 2.2, (1, 1, 1.6)), bone.cortical * 0.8, bone.cancellous, 0.8)
    # esophagus behind the airway from C6 down, with a little air
    eso = [front("C6", 5), front("C7", 5), front("T1", 6), front("T2", 6), front("T3", 6)]
    sc.paint(IDENTITY, tube(eso, 6.0, (1.6, 1, 1)), 40.0)
    if rng.random() < 0.6:
        sc.paint(IDENTITY, tube(eso[1:], 1.5, (2, 1, 1)), -1000.0)
    # thyroid lobes
    for s in (-1, 1):
        sc.paint(IDENTITY, [supell(front("C7", 20, s * 17, 4), (8, 10, 22))], 95.0 + (vein - 40) * 0.4, tex=5.0)
    # carotid sheaths: fat, carotid, jugular
    for s in (-1, 1):
        path = [h.at((s * 26, -12, -5))] + [front(n, 8 if n in ("C2", "C3") else 14, s * (22 + 2 * i))
                                            for i, n in enumerate(("C2", "C3", "C4", "C5", "C6", "C7", "T1"))]
        mid = [p + np.array([s * 4.0, 1.0, 0.0]) for p in path]
        sc.paint(IDENTITY, tube(mid, 6.5, (1.7, 1, 1)), -70.0, tex=8.0)
        sc.paint(IDENTITY, tube(path, 3.4), artery)
        jug = [p + np.array([s * 8.0, 2.0, 0.0]) for p in path]
        sc.paint(IDENTITY, tube(jug, 4.5, (1.3, 1, 1)), vein)


# --------------------------------------------------------------------------- DICOM

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_INTERCEPT = -1024.0


def _uid(seed: int, *parts: object) -> str:
    """A deterministic UID: "2.25." + the decimal of a UUID taken from sha256(seed, parts)."""
    digest = hashlib.sha256(repr(("spine-node heldout ct", seed) + parts).encode()).digest()
    return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)


def write_dicom(case: HeldoutCt, folder: Path, *, seed: int, body_part: str = "CSPINE") -> list[Path]:
    """Write `case` as a CT Image Storage series, one explicit VR little endian file per slice (slice 0 first)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    if case.hu.ndim != 3:
        raise ValueError(f"case.hu has shape {case.hu.shape}; expected (z, y, x)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = case.hu.shape
    dz, dy, dx = (float(v) for v in case.spacing)
    # the study is the seed's patient; the series and its frame of reference are this very volume (one seed
    # written with other arguments is another series, never the same UIDs for other pixels)
    content = hashlib.sha256(np.ascontiguousarray(case.hu).tobytes()).hexdigest()[:32]
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series", case.kind, content)
    frame_uid = _uid(seed, "frame", content)
    pixels = np.clip(np.rint(case.hu - _INTERCEPT), 0, 4095).astype(np.int16)
    x0, y0, z0 = case.origin_mm
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = _uid(seed, "sop", case.kind, content, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "spine-node heldout phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "HELDOUT CT"
        ds.SeriesDescription = f"heldout {case.kind}"
        ds.PatientName = f"HELDOUT^{seed}"
        ds.PatientID = f"HELDOUT-{seed}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = body_part
        if not body_part:
            ds.Laterality = ""  # type 2C: with no body part the validator cannot rule a paired organ out
        ds.SliceThickness = f"{case.slice_thickness_mm:.4g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{x0:.6g}", f"{y0:.6g}", f"{z0 - k * dz:.6g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z0 - k * dz:.6g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SpacingBetweenSlices = f"{dz:.6g}"
        ds.WindowCenter = "400"
        ds.WindowWidth = "2000"
        ds.RescaleIntercept = f"{_INTERCEPT:.0f}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = pixels[k].tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Time the held-out CT generator, or write cases as DICOM series.")
    parser.add_argument("--bench", type=int, default=0, help="time N cases (seeds 0..N-1)")
    parser.add_argument("--write", type=Path, help="write --count cases from --seed as DICOM series under this folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--spacing", default="1.0,0.7,0.7", help="z,y,x mm")
    parser.add_argument("--kind", default="cspine", choices=KINDS)
    args = parser.parse_args(argv)
    spacing = tuple(float(v) for v in args.spacing.split(","))
    if len(spacing) != 3:
        parser.error(f"--spacing {args.spacing!r}: expected three mm values z,y,x")
    if args.write is not None:
        for seed in range(args.seed, args.seed + args.count):
            case = generate(seed, kind=args.kind, spacing=spacing)  # type: ignore[arg-type]
            folder = args.write / f"{args.kind}-{seed}"
            paths = write_dicom(case, folder, seed=seed, body_part="CSPINE" if args.kind == "cspine" else "")
            print(f"{folder}: {len(paths)} slices, levels {','.join(case.levels_in_field) or '-'}, "
                  f"fractures {case.fractures or '-'}")
    if not args.bench:
        return
    generate(0, kind=args.kind, fov_mm=(40.0, 20.0))  # warm up imports and caches
    cpu, wall = [], []
    for seed in range(args.bench):
        w0, c0 = time.perf_counter(), time.process_time()
        case = generate(seed, kind=args.kind, spacing=spacing)  # type: ignore[arg-type]
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        print(f"seed {seed}: {case.hu.shape} cpu {cpu[-1]:.2f} s wall {wall[-1]:.2f} s fractures {case.fractures}")
    print(f"median cpu {float(np.median(cpu)):.2f} s, wall {float(np.median(wall)):.2f} s")


if __name__ == "__main__":
    _main()
