"""Held-out spine radiographs for evaluation: analytic projection of 3-D primitives.

This generator shares no code and no primitives with ``inference/phantoms.py`` (the
training phantoms, voxel CT volumes projected into DRRs). Here each patient is a list of
3-D primitives, each an ellipsoid or an elliptic cylinder cut by two planes, with a
cortical shell (outer primitive at the cortical attenuation, inner one subtracting the
difference to the trabecular value). A radiograph is the exact line integral through every
primitive along the beam (a quadratic per pixel, no voxels), Beer-Lambert attenuation, a
blurred scatter fraction, detector blur, Poisson noise and a log transform to 12-bit stored
values (MONOCHROME2, bone bright).

Anatomy (dimensions from the literature, scaled by one per-patient factor):

- cervical (``kind="cspine"``): C1 (anterior arch, lateral masses, posterior arch), C2
  (body and dens), C3-C7 and T1-T2 with bodies (elliptic cylinders: width 16-26 mm, depth
  15-18 mm, height 13.5-16 mm), 4-5.5 mm discs, uncinate processes, pedicles, articular
  pillars with 45 degree facets, laminae, spinous processes (bifid C2-C6, long C7/T1),
  transverse processes; a 17 mm canal; lordosis 5-35 degrees; skull vault and base,
  mastoids, palate, teeth, mandible, hyoid; neck, head and face soft tissue; an airway
  whose posterior wall lies 3-5 mm in front of C2-C4 and 12-18 mm in front of C5-C7;
  shoulders (soft tissue, humeral heads, clavicles) over C7-T1 on the lateral view,
  upper thorax and lung apices.
- lumbar (``kind="lspine"``): T11-L5 and S1 (bodies 38-51 mm wide, 28-37 mm deep, 23-28 mm
  high; 7-12 mm discs, L4-L5 tallest), pedicles seen end-on on AP (8 mm at L1 to 13 mm at
  L5), articular columns, laminae, spinous and transverse processes (L3 longest), lordosis
  35-60 degrees concentrated low, sacral slope 30-48 degrees, sacrum S2-S5 and alae, iliac
  wings with the crest near L4-L5, acetabula and femoral heads, floating ribs, abdomen,
  buttocks and 6-21 bowel gas bubbles; 85 % of the cervical attenuation (higher kVp).
- negatives: ``"chest"`` (PA chest: thorax, lungs cut by the heart, twelve rib pairs,
  clavicles, thoracic spine), ``"hand"`` (radius, ulna, carpals, metacarpals, phalanges),
  ``"noise"`` (uniform noise), ``"ct_slice"`` (a 512 x 512 axial CT slice in HU + 1024:
  body, fat, bowel gas, vertebral body, canal and arch) and ``"blank"`` (an exposure with
  nothing in the beam). Their ``structures`` are all 0 and they have no findings; chest and
  hand have tissue labels, a blank is all open beam, noise and CT slices are all 0.

Views: ``"LAT"`` (beam left-right; the patient faces either side of the image) and
``"AP"`` (beam anterior-posterior, patient's right on the image left), of the same patient
and findings for one seed; acquisition details (field, collimation, scatter, markers,
processing) are drawn per view.

Findings (drawn from their own random stream, so forcing one changes the image only where
it is): ``fracture`` is either a compression (anterior height loss 20-50 %, wedge on LAT,
height loss on AP, a sclerotic band under the collapsed endplate) or a displaced fracture
line through a body (2-4 mm gap, 1-3 mm anterior step-off and up to 1 mm lateral shift);
``dislocation`` is a 3-8 mm anterior translation of one vertebra and everything above it
(1-3 mm lateral on AP). The flags say what the image shows: a finding whose vertebra is
outside the exposed field is reported False.

Every bone of a patient is scaled by one bone density factor (0.7-1.15: osteopenic to
dense). Distractors a real film has: degenerated discs (35-60 % height at 1-3 levels in about a
third of patients) with anterior osteophytes (labelled as body), earrings, necklaces,
dental fillings and abdominal clips (steel, no tissue label).

Acquisition: ``pixel_spacing_mm`` is the detector pixel at ``fov_scale=1``; the image keeps
its matrix when ``fov_scale`` changes and its pixel spacing becomes
``pixel_spacing_mm * fov_scale`` (a wider field, anatomy smaller in pixels), which is what
``HeldoutRadiograph.pixel_spacing_mm`` reports. Magnification (source-image over
source-object distance) is 1.10 on LAT and 1.08 on AP (lumbar 1.15 and 1.12; negatives
1.05), so a 5 mm cervical translation measures 5.5 mm on a lateral detector. ``photons``
is the mean count per pixel in the open beam; noise is Poisson (Anscombe-transformed
normal draws from a fixed per-pixel stream, so a change in one region leaves the noise
elsewhere unchanged), then blurred a little as light spreads in the scintillator. Collimation edges (outside the
field: 0.5 % transmission, bright), lead "L"/"R" markers (tissues label 0), the anode heel
effect (+-12 % across the field), scintillator blur of the noise, faint anti-scatter grid
lines (30 % of images), a turn of the patient by up to 6 degrees about the vertical axis,
and processing (dynamic range compression, unsharp mask,
window offset and gain) are drawn per image.

Masks (same geometry as the image; rotation, facing and field applied to both, blur and
noise to neither), ``structures``:

- LAT: 1 vertebral body (C2 with its dens and every body below it, T1-T2 included; T11-S1
  on lumbar, osteophytes included), 2 posterior elements (pedicles, pillars or articular
  processes, laminae, spinous and transverse processes, all of C1), 3 disc (the
  quadrilateral between adjacent endplates), 4 spinal canal (posterior body wall to
  spinolaminar line, where no bone of 1-2 projects), 5 prevertebral soft tissue (anterior
  body line to airway, C2-C7; cervical only);
- AP: 1 vertebral body, 2 pedicle, 3 spinous process (2 and 3 drawn over 1).

``tissues``: 1 bone (more than 0.2 mm of bone on the ray), 2 soft tissue (more than 1 mm on the ray), 3 open
beam, 0 outside the collimated field and under lead markers.

Speed (``OMP_NUM_THREADS=1 python -m inference.heldout.xray --bench 4``, 2-core development
machine shared with other work, so CPU time is the figure that holds): a cervical radiograph of
about 1400-1550 x 1160-1260 pixels takes 0.62 s of CPU (median of 8, max 0.93 s; wall 1.6 s
at a load average of 11); a lumbar one at 0.15 mm (about 2450 x 1860) 1.7 s.
``python -m inference.heldout.xray --out DIR --seeds 0 100`` writes AP + LAT DICOM files,
``.npz`` masks and ``truth.jsonl`` (see ``write_set``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

VIEWS = ("AP", "LAT")
SPINE_KINDS = ("cspine", "lspine")
NEGATIVE_KINDS = ("chest", "hand", "noise", "ct_slice", "blank")
KINDS = SPINE_KINDS + NEGATIVE_KINDS

# Linear attenuation (1/mm) at an effective energy near 45 keV. Bone and air are given as the
# excess over the soft tissue they displace, because every bone lies inside soft tissue.
MU_SOFT = 0.022
MU_CORTICAL = 0.075
MU_TRABECULAR = 0.022
MU_AIR = -MU_SOFT
MU_LUNG = -0.017
MU_ENAMEL = 0.16
MU_METAL = 0.8  # steel jewellery, dental fillings, clips
MU_LEAD_TRANSMISSION = 0.02

MAGNIFICATION = {("cspine", "LAT"): 1.10, ("cspine", "AP"): 1.08, ("lspine", "LAT"): 1.15, ("lspine", "AP"): 1.12}

# Stored value = offset + gain * (-ln(counts / photons)); 12-bit.
MAX_STORED = 4095


@dataclass
class HeldoutRadiograph:
    """One evaluation radiograph with its ground truth."""

    image: np.ndarray  # uint16 (rows, cols), MONOCHROME2 (bone bright), 12-bit
    pixel_spacing_mm: tuple[float, float]  # detector (row, col) spacing, as Imager Pixel Spacing
    view: str  # "AP" or "LAT"
    kind: str  # "cspine", "lspine" or a negative kind
    structures: np.ndarray  # uint8 (rows, cols), labels in the module docstring
    tissues: np.ndarray  # uint8 (rows, cols): 1 bone, 2 soft tissue, 3 open beam, 0 neither
    fracture: bool
    dislocation: bool
    levels: tuple[str, ...]
    finding_levels: dict[str, str] = field(default_factory=dict)  # "fracture"/"dislocation" -> level
    facing: str = ""  # LAT: "left" or "right" (side of the image the patient faces)


# ---------------------------------------------------------------------------------------
# geometry


def _rx(phi: float) -> np.ndarray:
    """Sagittal tilt: local z' leans anteriorly (+y) by phi radians."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def _ry(psi: float) -> np.ndarray:
    """Coronal tilt: local z' leans to the patient's left (+x) by psi radians."""
    c, s = math.cos(psi), math.sin(psi)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _frame(axis: np.ndarray | list[float], up: np.ndarray | list[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Rotation whose local y' is ``axis`` and local z' is as close to ``up`` as possible."""
    ey = np.asarray(axis, dtype=float)
    ey = ey / np.linalg.norm(ey)
    ez = np.asarray(up, dtype=float) - np.dot(up, ey) * ey
    if np.linalg.norm(ez) < 1e-6:
        ez = np.array([1.0, 0.0, 0.0]) - ey[0] * ey
    ez = ez / np.linalg.norm(ez)
    ex = np.cross(ey, ez)
    return np.stack([ex, ey, ez], axis=1)


@dataclass
class _Prim:
    """Ellipsoid (``cyl=False``) or elliptic cylinder along local z', cut by two planes.

    Planes: z' <= top[0] + top[1] * y' and z' >= bot[0] + bot[1] * y' (infinite: no cut; a
    cylinder needs both).
    """

    c: np.ndarray
    R: np.ndarray
    s: np.ndarray
    mu: float
    cyl: bool = False
    top: tuple[float, float] = (math.inf, 0.0)
    bot: tuple[float, float] = (-math.inf, 0.0)
    tag: str = ""  # structure tag of an outer surface ("" for none)
    tissue: int = 0  # 1 bone outline, 2 soft tissue outline, 0 neither
    group: int = -1  # vertebra index it moves with (dislocation), -1 fixed
    bone: bool = False  # scaled by the patient's bone density (the inner parts of bones too)

    def corners(self) -> np.ndarray:
        sx, sy = float(self.s[0]), float(self.s[1])
        if self.cyl:
            zs = []
            for yy in (-sy, sy):
                zs.append(self.top[0] + self.top[1] * yy if math.isfinite(self.top[0]) else self.s[2])
                zs.append(self.bot[0] + self.bot[1] * yy if math.isfinite(self.bot[0]) else -self.s[2])
            z0, z1 = min(zs), max(zs)
        else:
            z0, z1 = -float(self.s[2]), float(self.s[2])
        local = np.array([[x, y, z] for x in (-sx, sx) for y in (-sy, sy) for z in (z0, z1)])
        return self.c[None, :] + local @ self.R.T


def _shell(c: np.ndarray, R: np.ndarray, s: list[float] | np.ndarray, t: float, *, tag: str = "",
           group: int = -1, mu_outer: float = MU_CORTICAL, mu_inner: float = MU_TRABECULAR) -> list[_Prim]:
    """A bone ellipsoid: cortical outer, trabecular inside ``t`` mm deeper."""
    s = np.asarray(s, dtype=float)
    prims = [_Prim(np.asarray(c, float), R, s, mu_outer, tag=tag, tissue=1, group=group, bone=True)]
    inner = s - t
    if np.all(inner > 0.3):
        prims.append(_Prim(np.asarray(c, float), R, inner, mu_inner - mu_outer, group=group, bone=True))
    return prims


def _plane_in_frame(c: np.ndarray, R: np.ndarray, point: np.ndarray, normal: np.ndarray) -> tuple[float, float]:
    """A world plane as z' = a + b * y' in the frame (c, R) (its x' slope is dropped)."""
    p = R.T @ (point - c)
    n = R.T @ normal
    if abs(n[2]) < 1e-6:
        raise ValueError(f"plane normal {normal} lies in the frame's x'y' plane; expected a plane across z'")
    b = -n[1] / n[2]
    return float(p[2] - b * p[1]), float(b)


def _polyline(points: list[np.ndarray], semi: list[tuple[float, float]] | tuple[float, float], t: float, *,
              mu_outer: float = MU_CORTICAL, mu_inner: float = MU_TRABECULAR, tag: str = "", group: int = -1,
              tissue: int = 1, up: tuple[float, float, float] = (0.0, 0.0, 1.0), up_frame: bool = False) -> list[_Prim]:
    """A bent rod (rib, clavicle, mandible, airway): elliptic cylinders joined on bisecting planes,
    so that neighbours neither overlap nor gap (no beads where ellipsoid chains would overlap)."""
    pts = [np.asarray(p, dtype=float) for p in points]
    axes = [(b - a) / np.linalg.norm(b - a) for a, b in zip(pts[:-1], pts[1:], strict=True)]
    semis = semi if isinstance(semi, list) else [semi] * len(axes)
    prims: list[_Prim] = []
    for i, ez in enumerate(axes):
        c = (pts[i] + pts[i + 1]) / 2
        half = float(np.linalg.norm(pts[i + 1] - pts[i])) / 2
        bend = axes[i + 1] if i + 1 < len(axes) else (axes[i - 1] if i > 0 else np.asarray(up, dtype=float))
        if up_frame:  # keep the semi-axes facing ``up`` (the airway's AP depth)
            bend = np.asarray(up, dtype=float)
        ey = bend - np.dot(bend, ez) * ez
        if np.linalg.norm(ey) < 1e-6:
            ey = np.asarray(up, dtype=float) - np.dot(up, ez) * ez
        if np.linalg.norm(ey) < 1e-6:
            ey = np.array([1.0, 0.0, 0.0]) - ez[0] * ez
        ey = ey / np.linalg.norm(ey)
        R = np.stack([np.cross(ey, ez), ey, ez], axis=1)
        top = _plane_in_frame(c, R, pts[i + 1], ez + axes[i + 1]) if i + 1 < len(axes) else (half, 0.0)
        bot = _plane_in_frame(c, R, pts[i], axes[i - 1] + ez) if i > 0 else (-half, 0.0)
        sa, sb = semis[i]
        prims.append(_Prim(c, R, np.array([sa, sb, half]), mu_outer, cyl=True, top=top, bot=bot, tag=tag,
                           tissue=tissue, group=group, bone=tissue == 1))
        if mu_inner != mu_outer and sa - t > 0.3 and sb - t > 0.3:
            prims.append(_Prim(c, R, np.array([sa - t, sb - t, half]), mu_inner - mu_outer, cyl=True, top=top,
                               bot=bot, group=group, bone=tissue == 1))
    return prims


@dataclass
class _Vertebra:
    name: str
    c: np.ndarray  # body centre (world mm)
    R: np.ndarray  # body frame
    w: float  # body width (LR)
    d: float  # body depth (AP)
    h: float  # body height
    canal: float  # AP canal diameter (posterior wall to spinolaminar line)
    prevert: float = 0.0  # prevertebral soft tissue thickness in front of it
    index: int = 0
    top_cut: tuple[float, float] | None = None  # body top plane after a compression (a, b)
    bot_cut: tuple[float, float] | None = None
    fracture: dict[str, float | str] | None = None
    airway: tuple[float, float] = (0.0, 0.0)  # (LR, AP) semi-axes of the airway in front of it

    def local(self, p: list[float] | np.ndarray) -> np.ndarray:
        return self.c + self.R @ np.asarray(p, dtype=float)

    def corner(self, where: str) -> np.ndarray:
        """Body corners in world mm: 'ta' top-anterior, 'tp', 'ba', 'bp'."""
        y = self.d / 2 if where[1] == "a" else -self.d / 2
        if where[0] == "t":
            a, b = self.top_cut if self.top_cut else (self.h / 2, 0.0)
        else:
            a, b = self.bot_cut if self.bot_cut else (-self.h / 2, 0.0)
        return self.local([0.0, y, a + b * y])


# ---------------------------------------------------------------------------------------
# cervical anatomy

# name, body width, depth, height (mm), canal AP, spinous length, spinous angle (deg below horizontal)
_CERVICAL = [
    ("T2", 27.0, 20.0, 17.0, 14.5, 30.0, 50.0),
    ("T1", 26.0, 18.0, 16.0, 15.0, 28.0, 40.0),
    ("C7", 22.0, 17.0, 14.5, 15.5, 25.0, 30.0),
    ("C6", 20.0, 16.5, 13.5, 16.5, 16.0, 25.0),
    ("C5", 18.0, 16.0, 13.5, 17.0, 12.0, 22.0),
    ("C4", 17.0, 15.5, 13.5, 17.0, 11.0, 20.0),
    ("C3", 16.0, 15.0, 13.5, 17.0, 11.0, 20.0),
    ("C2", 17.0, 15.5, 15.0, 16.5, 16.0, 18.0),
]
# disc height above each of the bodies listed above (mm); C2 has none (C1 has no body)
_CERVICAL_DISC = {"T2": 4.0, "T1": 4.5, "C7": 5.0, "C6": 5.5, "C5": 5.5, "C4": 5.0, "C3": 4.5}
# prevertebral soft tissue (mm) in front of each body
_PREVERT = {"C2": 3.5, "C3": 4.5, "C4": 5.5, "C5": 12.0, "C6": 15.0, "C7": 16.0, "T1": 16.0, "T2": 16.0}


@dataclass
class _Patient:
    kind: str
    vertebrae: list[_Vertebra]
    prims: list[_Prim]
    facing_left: bool
    centre: np.ndarray  # world point the field centres on
    fov_rows_mm: float
    fov_aspect: float  # cols / rows
    lat_shift_mm: float = -8.0  # LAT field centre behind ``centre`` (on the canal rather than the bodies)
    moved_from: int = -1  # dislocation: vertebrae with index >= this moved (and groups above)
    finding_levels: dict[str, str] = field(default_factory=dict)
    masks2d: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)


def _build_column(rng: np.random.Generator, table: list[tuple], discs: dict[str, float], scale: float,
                  lordosis_deg: float, incline_deg: float, coronal_deg: float, power: float = 1.0,
                  narrowing: dict[str, float] | None = None) -> list[_Vertebra]:
    """Stack bodies bottom-up along a curve whose tilt falls by ``lordosis_deg`` from bottom to top
    (``power`` < 1 puts more of it low in the column, as in the lumbar spine)."""
    n = len(table)
    phis = [math.radians(incline_deg + lordosis_deg / 2 - lordosis_deg * (i / (n - 1)) ** power) for i in range(n)]
    psis = [math.radians(coronal_deg * math.sin(math.pi * i / (n - 1))) for i in range(n)]
    p = np.zeros(3)
    out: list[_Vertebra] = []
    for i, (name, w, d, h, canal, *_rest) in enumerate(table):
        jitter = rng.uniform(0.95, 1.05, size=3)
        w, d, h = w * scale * jitter[0], d * scale * jitter[1], h * scale * jitter[2]
        R = _rx(phis[i]) @ _ry(psis[i])
        c = p + R @ np.array([0.0, 0.0, h / 2])
        out.append(_Vertebra(name, c, R, w, d, h, canal * scale * rng.uniform(0.93, 1.07), index=i))
        top = p + R @ np.array([0.0, 0.0, h])
        if name in discs and i + 1 < n:
            mid = _rx((phis[i] + phis[i + 1]) / 2) @ _ry((psis[i] + psis[i + 1]) / 2)
            height = discs[name] * scale * rng.uniform(0.85, 1.15) * (narrowing or {}).get(name, 1.0)
            p = top + mid @ np.array([0.0, 0.0, height])
        else:
            p = top
    return out


def _draw_narrowing(rng: np.random.Generator, names: list[str], p: float) -> dict[str, float]:
    """Degenerated discs (named by the body below them): 1-3 of ``names`` at 35-60 % height."""
    if rng.random() >= p:
        return {}
    picks = rng.choice(names, size=int(rng.integers(1, min(3, len(names)) + 1)), replace=False)
    return {str(name): float(rng.uniform(0.35, 0.6)) for name in picks}


def _osteophytes(column: list[_Vertebra], narrowing: dict[str, float], rng: np.random.Generator,
                 scale: float) -> list[_Prim]:
    """Anterior lips of bone at the corners beside a narrowed disc (part of the body, label 1)."""
    prims: list[_Prim] = []
    for i, v in enumerate(column):
        if v.name not in narrowing or i + 1 >= len(column):
            continue
        for u, corner, dz in ((v, "ta", -1.0), (column[i + 1], "ba", 1.0)):
            size = rng.uniform(1.0, 2.5) * scale
            c = u.corner(corner) + u.R @ np.array([0.0, size * 0.6, dz * size * 0.6])
            prims.append(_Prim(c, u.R, np.array([u.w * 0.3, size, size * 0.8]), MU_CORTICAL * 0.8, tag="body",
                               tissue=1, group=u.index))
    return prims


def _metal(rng: np.random.Generator, spots: list[tuple[np.ndarray, float]], p: float) -> list[_Prim]:
    """Foreign bodies (earrings, necklace beads, clips): small, very dense, no tissue label."""
    prims: list[_Prim] = []
    for centre, size in spots:
        if rng.random() < p:
            prims.append(_ell(centre, list(rng.uniform(0.4, 1.0, size=3) * size), MU_METAL))
    return prims


def _body_prims(v: _Vertebra, t: float, group: int) -> list[_Prim]:
    top = v.top_cut if v.top_cut else (v.h / 2, 0.0)
    bot = v.bot_cut if v.bot_cut else (-v.h / 2, 0.0)
    s = np.array([v.w / 2, v.d / 2, v.h / 2])
    outer = _Prim(v.c.copy(), v.R, s, MU_CORTICAL, cyl=True, top=top, bot=bot, tag="body", tissue=1, group=group,
                  bone=True)
    inner = _Prim(v.c.copy(), v.R, s - np.array([t, t, 0.0]), MU_TRABECULAR - MU_CORTICAL, cyl=True,
                  top=(top[0] - t * 0.8, top[1]), bot=(bot[0] + t * 0.8, bot[1]), group=group, bone=True)
    return [outer, inner]


def _arch_prims(v: _Vertebra, spinous_len: float, spinous_deg: float, scale: float, rng: np.random.Generator,
                *, bifid: bool, thoracic: bool) -> list[_Prim]:
    """Pedicles, pillars, laminae, spinous and transverse processes of a C2-T2 vertebra."""
    g = v.index
    prims: list[_Prim] = []
    y_wall = -v.d / 2
    y_sl = y_wall - v.canal
    half_canal_w = (12.5 if not thoracic else 10.0) * scale
    for side in (-1.0, 1.0):
        # pedicle: from the posterolateral body corner backwards and outwards (cervical 45 deg)
        angle = math.radians(45.0 if not thoracic else 15.0)
        axis = np.array([side * math.sin(angle), -math.cos(angle), 0.0])
        pc = np.array([side * (half_canal_w + 2.5 * scale), y_wall - 3.0 * scale, 0.12 * v.h])
        prims += _shell(v.local(pc), v.R @ _frame(axis), [2.7 * scale, 5.0 * scale, 3.6 * scale], 0.8,
                        tag="pedicle", group=g)
        # articular pillar: a parallelogram on LAT, facets sloping down posteriorly
        pillar_c = np.array([side * (half_canal_w + 5.0 * scale), y_wall - 0.42 * v.canal, 0.0])
        slope = 0.9 if not thoracic else 0.3
        reach = v.h / 2 + 2.0 * scale
        pr = _Prim(v.local(pillar_c), v.R, np.array([5.0, 6.0, 9.0]) * scale, MU_CORTICAL * 0.75, cyl=True,
                   top=(reach, slope), bot=(-reach, slope), tag="pillar", tissue=1, group=g)
        prims.append(pr)
        # lamina: from pillar to the midline spinolaminar junction
        a = np.array([side * (half_canal_w + 3.0 * scale), y_wall - 0.6 * v.canal, 0.0])
        b = np.array([0.0, y_sl, -0.5 * scale])
        prims += _shell(v.local((a + b) / 2), v.R @ _frame(b - a),
                        [1.8 * scale, np.linalg.norm(b - a) / 2 + 1.0, 5.0 * scale], 0.7, tag="lamina", group=g)
        # transverse process
        tc = np.array([side * (v.w / 2 + 6.5 * scale), -0.3 * v.d if not thoracic else y_wall - 5 * scale, 0.0])
        tl = 6.0 if not thoracic else 11.0
        prims += _shell(v.local(tc), v.R @ _frame([side, 0.0, 0.0]), [2.5 * scale, tl * scale, 3.0 * scale], 0.6,
                        tag="transverse", group=g, mu_outer=MU_CORTICAL * 0.6, mu_inner=MU_TRABECULAR * 0.6)
        if not thoracic and v.name != "C2":
            # uncinate process: lip on the lateral top of the body
            uc = np.array([side * (v.w / 2 - 1.2 * scale), 0.0, v.h / 2])
            prims.append(_Prim(v.local(uc), v.R, np.array([1.5, v.d / 2 - 2.0, 2.5]) * np.array([scale, 1, scale]),
                               MU_CORTICAL * 0.6, tag="uncinate", tissue=1, group=g))
    # spinous process, pointing down and back
    alpha = math.radians(spinous_deg + rng.uniform(-5, 5))
    axis = np.array([0.0, -math.cos(alpha), -math.sin(alpha)])
    length = spinous_len * scale * rng.uniform(0.9, 1.1)
    sc = np.array([0.0, y_sl, 0.0]) + axis * length / 2
    thick = 4.0 if v.name == "C2" else 2.5
    prims += _shell(v.local(sc), v.R @ _frame(axis, [0.0, 0.0, 1.0]),
                    [thick * scale, length / 2 + 1.5, (5.0 if v.name == "C2" else 3.5) * scale], 0.8,
                    tag="spinous", group=g)
    if bifid:
        for side in (-1.0, 1.0):
            tip = np.array([side * 3.0 * scale, 0.0, 0.0]) + np.array([0.0, y_sl, 0.0]) + axis * length
            prims += _shell(v.local(tip), v.R, [2.4 * scale, 3.0 * scale, 3.0 * scale], 0.6, tag="spinous", group=g)
    return prims


def _ell(c: np.ndarray | list[float], s: list[float], mu: float, R: np.ndarray | None = None, *, tissue: int = 0,
         tag: str = "", group: int = -1) -> _Prim:
    return _Prim(np.asarray(c, dtype=float), np.eye(3) if R is None else R, np.asarray(s, dtype=float), mu,
                 tissue=tissue, tag=tag, group=group)


def _cspine_patient(rng: np.random.Generator, size_scale: float) -> _Patient:
    scale = size_scale * rng.uniform(0.92, 1.08)
    lordosis = rng.uniform(5.0, 35.0)
    incline = rng.uniform(-4.0, 10.0)
    coronal = rng.uniform(-4.0, 4.0)
    narrowing = _draw_narrowing(rng, ["C3", "C4", "C5", "C6", "C7"], 0.35)
    column = _build_column(rng, _CERVICAL, _CERVICAL_DISC, scale, lordosis, incline, coronal, narrowing=narrowing)
    by = {v.name: v for v in column}
    for v in column:
        v.prevert = _PREVERT[v.name] * scale * rng.uniform(0.85, 1.15)
    prims: list[_Prim] = []
    # C2 dens and the atlas sit on top of C2
    c2 = by["C2"]
    top_group = len(column)  # C1, skull and face move with C2 on a dislocation above C3
    dens_c = c2.local([0.0, 0.5, c2.h / 2 + 7.5 * scale])
    dens = _shell(dens_c, c2.R, [5.0 * scale, 5.0 * scale, 9.0 * scale], 1.0, tag="dens", group=c2.index)
    c1_z = c2.R @ np.array([0.0, 0.0, 1.0])
    c1_centre = dens_c + c1_z * 3.0 * scale
    adi = rng.uniform(1.5, 3.0) * scale
    ant_arch = c1_centre + c2.R @ np.array([0.0, 5.0 * scale + adi + 4.0 * scale, 0.0])
    c1: list[_Prim] = []
    c1 += _shell(ant_arch, c2.R, [7.0 * scale, 4.0 * scale, 5.5 * scale], 1.0, tag="arch", group=top_group)
    for side in (-1.0, 1.0):
        lm = c1_centre + c2.R @ np.array([side * 19.0 * scale, -2.0 * scale, -1.0 * scale])
        c1 += _shell(lm, c2.R, [7.0 * scale, 9.5 * scale, 8.0 * scale], 1.2, tag="arch", group=top_group)
        bar = c1_centre + c2.R @ np.array([side * 12.0 * scale, -20.0 * scale, 0.0])
        c1 += _shell(bar, c2.R @ _frame([side * 0.55, -1.0, 0.0]), [2.5 * scale, 11.0 * scale, 4.0 * scale], 0.7,
                     tag="arch", group=top_group)
        tp = c1_centre + c2.R @ np.array([side * 34.0 * scale, -3.0 * scale, 0.0])
        c1 += _shell(tp, c2.R, [7.0 * scale, 4.5 * scale, 4.0 * scale], 0.8, tag="arch", group=top_group)
    post_tub = c1_centre + c2.R @ np.array([0.0, -31.0 * scale, -1.0 * scale])
    c1 += _shell(post_tub, c2.R, [5.0 * scale, 4.0 * scale, 5.0 * scale], 0.8, tag="arch", group=top_group)
    prims += dens + c1
    for v, row in zip(column, _CERVICAL, strict=True):
        name, *_dims, spinous_len, spinous_deg = row
        prims += _arch_prims(v, spinous_len, spinous_deg, scale, rng, bifid=name in ("C2", "C3", "C4", "C5", "C6"),
                             thoracic=name.startswith("T"))
    # airway (built after the findings, see _add_airway): wider in the pharynx than the trachea
    for v in column:
        v.airway = ((12.0 if v.name in ("C2", "C3", "C4") else 9.0) * scale,
                    (7.0 if v.name in ("C2", "C3", "C4", "C5") else 8.0) * scale)
    # nasopharynx above C2
    naso = c1_centre + c2.R @ np.array([0.0, 5.0 * scale + adi + 8.0 * scale + 4.0 * scale + 8.0 * scale,
                                        16.0 * scale])
    prims.append(_ell(naso, [14.0 * scale, 8.0 * scale, 22.0 * scale], MU_AIR, c2.R, group=top_group))
    # skull, skull base, face
    head: list[_Prim] = []
    skull_c = c1_centre + np.array([0.0, -8.0, 92.0]) * scale
    # vault: a 6 mm bone shell around brain (soft tissue)
    head += _shell(skull_c, _rx(math.radians(rng.uniform(-10, 10))), [72 * scale, 95 * scale, 88 * scale],
                   6.0 * scale, mu_inner=0.0)
    head += [_ell(c1_centre + np.array([0.0, 14.0, 27.0]) * scale, [38 * scale, 28 * scale, 7 * scale],
                  MU_CORTICAL * 0.7, _rx(math.radians(35)), tissue=1)]
    for side in (-1.0, 1.0):
        head.append(_ell(c1_centre + np.array([side * 46.0, -8.0, 18.0]) * scale, [9 * scale, 10 * scale, 13 * scale],
                         MU_CORTICAL * 0.45, tissue=1))
        head.append(_ell(c1_centre + np.array([side * 30.0, 6.0, 36.0]) * scale, [8 * scale, 26 * scale, 8 * scale],
                         MU_CORTICAL * 0.9, _frame([side * 0.7, 1.0, 0.0]), tissue=1))
    palate_c = c1_centre + np.array([0.0, 48.0, 8.0]) * scale
    head.append(_ell(palate_c, [20 * scale, 26 * scale, 3.5 * scale], MU_CORTICAL * 0.8, tissue=1))
    # teeth along the dental arch, upper and lower rows (mouth closed)
    arch_r = 24.0 * scale
    arch_c = c1_centre + np.array([0.0, 48.0, 0.0]) * scale
    for row_dz in (2.0, -8.0):
        for k in range(7):
            th = math.radians(-75 + 150 * k / 6)
            tc = arch_c + np.array([arch_r * math.sin(th), arch_r * math.cos(th) - 4 * scale, row_dz * scale])
            head.append(_ell(tc, [3.5 * scale, 4.0 * scale, 5.0 * scale], MU_ENAMEL, tissue=1))
    # mandible: rami and a U-shaped body, angle at about C2-C3
    angle_z = float(c2.corner("ba")[2]) + rng.uniform(-6, 4) * scale
    for side in (-1.0, 1.0):
        angle_p = np.array([side * 44.0 * scale, float(c2.corner("ta")[1]) + 18.0 * scale, angle_z])
        condyle = c1_centre + np.array([side * 48.0, 8.0, 26.0]) * scale
        notch = (angle_p + condyle) / 2 + np.array([0.0, 6.0 * scale, 0.0])
        head += _polyline([angle_p, notch, condyle], (3.0 * scale, 13.0 * scale), 1.5, up=(0.0, 1.0, 0.0))
        chin = np.array([0.0, arch_c[1] + 22.0 * scale, angle_z - 8.0 * scale])
        body_pts = []
        for f in np.linspace(0.0, 1.0, 5):
            pt = angle_p * (1 - f) + chin * f
            pt[0] = side * 44.0 * scale * (1 - f) ** 0.7
            body_pts.append(pt)
        head += _polyline(body_pts, (4.0 * scale, 12.0 * scale), 1.5)
    hyoid_c = by["C3"].local([0.0, by["C3"].d / 2 + 32.0 * scale, -2.0 * scale])
    hyoid = [_ell(hyoid_c, [11 * scale, 4 * scale, 3 * scale], MU_CORTICAL * 0.7, tissue=1)]
    for side in (-1.0, 1.0):
        hyoid.append(_ell(hyoid_c + np.array([side * 13.0, -8.0, 2.0]) * scale, [3 * scale, 11 * scale, 2 * scale],
                          MU_CORTICAL * 0.6, _frame([side * 0.5, -1.0, 0.3]), tissue=1))
    # soft tissue: head, face, neck, shoulders, thorax
    head.append(_ell(skull_c + np.array([0.0, 8.0, 0.0]) * scale, [78 * scale, 102 * scale, 96 * scale],
                     MU_SOFT, tissue=2))
    # lower face in front of the neck (overlapping it little: soft tissue is a union, not a sum)
    head.append(_ell(c1_centre + np.array([0.0, 68.0, -4.0]) * scale, [48 * scale, 34 * scale, 42 * scale],
                     MU_SOFT, tissue=2))
    for p in head:
        p.group = top_group
    prims += head + hyoid
    c4 = by["C4"]
    neck_c = np.array([0.0, float(c4.corner("ta")[1]) - 14.0 * scale, float(c4.c[2])])
    neck_semi = np.array([rng.uniform(52, 62), rng.uniform(55, 66), 1.0]) * scale
    # the neck ends at C1 in a half-ellipsoid dome that fades into the head: no step edge
    neck_top = float(c1_centre[2] - neck_c[2])
    prims.append(_Prim(neck_c, np.eye(3), neck_semi, MU_SOFT, cyl=True, top=(neck_top, 0.0),
                       bot=(-400.0, 0.0), tissue=2))
    prims.append(_Prim(neck_c + np.array([0.0, 0.0, neck_top]), np.eye(3),
                       np.array([neck_semi[0], neck_semi[1], 70.0 * scale]), MU_SOFT, bot=(0.0, 0.0), tissue=2))
    c7, t1 = by["C7"], by["T1"]
    # shoulder soft tissue tops out between C6 and T1 (depressed shoulders show C7)
    shoulder_z = float(c7.c[2]) + rng.uniform(-70.0, -35.0) * scale
    for side in (-1.0, 1.0):
        sc_ = np.array([side * 150.0 * scale, float(c7.c[1]) - 5.0 * scale, shoulder_z])
        prims.append(_ell(sc_, [58 * scale, 55 * scale, 50 * scale], MU_SOFT, tissue=2))
        prims += _shell(sc_ + np.array([side * 22.0, 2.0, -5.0]) * scale, np.eye(3), [24 * scale] * 3, 2.0)
        # clavicle from the sternal notch to the acromion
        a = np.array([side * 22.0 * scale, float(t1.corner("ta")[1]) + 38.0 * scale, float(t1.c[2]) - 18.0 * scale])
        b = np.array([side * 148.0 * scale, float(c7.c[1]) - 8.0 * scale, shoulder_z + 40.0 * scale])
        pts = [a * (1 - f) + b * f + np.array([0.0, 12.0 * scale * math.sin(math.pi * f), 0.0])
               for f in np.linspace(0.0, 1.0, 6)]
        prims += _polyline(pts, (5.5 * scale, 5.0 * scale), 1.5)
        # scapula: a thin plate behind the upper thorax
        prims += _shell(np.array([side * 95.0 * scale, float(t1.c[1]) - 55.0 * scale, shoulder_z - 70.0 * scale]),
                        _frame([side * 0.8, 0.6, 0.0]), [3.5 * scale, 50.0 * scale, 70.0 * scale], 1.2)
    thorax_c = np.array([0.0, float(t1.corner("ta")[1]) - 5.0 * scale, float(t1.c[2]) - 165.0 * scale])
    prims.append(_ell(thorax_c, [150 * scale, 100 * scale, 180 * scale], MU_SOFT, tissue=2))
    for side in (-1.0, 1.0):
        prims.append(_ell(thorax_c + np.array([side * 58.0, 10.0, 70.0]) * scale, [48 * scale, 60 * scale, 100 * scale],
                          MU_LUNG))
    prims += _osteophytes(column, narrowing, rng, scale)
    # jewellery and dental work: earrings, necklace beads, fillings
    spots = [(c1_centre + np.array([side * 62.0, 12.0, -2.0]) * scale, 3.0 * scale) for side in (-1.0, 1.0)]
    spots += [(arch_c + np.array([side * 20.0, -8.0, -3.0]) * scale, 3.5 * scale) for side in (-1.0, 1.0)]
    if rng.random() < 0.15:
        z = float(by["C7"].c[2]) - 10.0 * scale
        for k in range(16):
            th = 2 * math.pi * k / 16
            spots.append((np.array([neck_semi[0] * 1.02 * math.sin(th), neck_c[1] + neck_semi[1] * 1.02 * math.cos(th),
                                    z + 25.0 * scale * math.cos(th)]), 2.5 * scale))
    prims += _metal(rng, spots, 0.25)
    centre = (c1_centre + by["C7"].c) / 2
    return _Patient("cspine", column, prims, facing_left=bool(rng.random() < 0.5), centre=centre,
                    fov_rows_mm=float(rng.uniform(200.0, 240.0)), fov_aspect=float(rng.uniform(0.8, 0.86)))


# ---------------------------------------------------------------------------------------
# lumbar anatomy

# name, body width, depth, height (mm), canal AP, spinous length, spinous angle (deg below horizontal)
_LUMBAR = [
    ("S1", 50.0, 37.0, 28.0, 16.0, 18.0, 20.0),
    ("L5", 51.0, 36.0, 26.0, 17.0, 22.0, 5.0),
    ("L4", 49.0, 35.0, 27.0, 16.0, 28.0, 5.0),
    ("L3", 47.0, 34.0, 27.0, 16.0, 30.0, 5.0),
    ("L2", 44.0, 32.0, 26.0, 17.0, 30.0, 8.0),
    ("L1", 42.0, 30.0, 25.0, 17.0, 28.0, 10.0),
    ("T12", 40.0, 29.0, 24.0, 17.0, 26.0, 20.0),
    ("T11", 38.0, 28.0, 23.0, 16.0, 26.0, 35.0),
]
_LUMBAR_DISC = {"S1": 11.0, "L5": 12.0, "L4": 11.0, "L3": 10.0, "L2": 9.0, "L1": 8.0, "T12": 7.0}
_LUMBAR_TRANSVERSE = {"L1": 15.0, "L2": 20.0, "L3": 27.0, "L4": 23.0, "L5": 20.0, "T12": 8.0, "T11": 10.0}


def _lumbar_arch_prims(v: _Vertebra, spinous_len: float, spinous_deg: float, scale: float,
                       rng: np.random.Generator) -> list[_Prim]:
    """Lumbar pedicles (seen end-on on AP), facets, laminae, spinous and transverse processes."""
    g = v.index
    prims: list[_Prim] = []
    y_wall = -v.d / 2
    y_sl = y_wall - v.canal
    level = int(v.name[1]) if v.name.startswith("L") else 0
    pw = (7.0 + 1.2 * level) * scale  # pedicle width, L1 8 mm to L5 13 mm
    for side in (-1.0, 1.0):
        converge = math.radians(8.0 + 4.0 * level)
        axis = np.array([-side * math.sin(converge), -math.cos(converge), 0.0])
        pc = np.array([side * (v.w / 2 - 0.12 * v.w - pw / 2 + 2.0), y_wall - 6.0 * scale, 0.18 * v.h])
        prims += _shell(v.local(pc), v.R @ _frame(axis), [pw / 2, 9.0 * scale, 7.5 * scale], 1.6, tag="pedicle",
                        group=g)
        # articular processes: a column each side, the facet joints between neighbours
        fc = np.array([side * (v.w / 2 - 0.12 * v.w + 2.0 * scale), y_wall - 0.75 * v.canal, 0.05 * v.h])
        reach = v.h / 2 + 3.0 * scale
        prims.append(_Prim(v.local(fc), v.R, np.array([6.5, 7.5, 9.0]) * scale, MU_CORTICAL * 0.7, cyl=True,
                           top=(reach, 0.15), bot=(-reach, 0.15), tag="pillar", tissue=1, group=g))
        a = fc + np.array([-side * 2.0 * scale, -2.0 * scale, -0.1 * v.h])
        b = np.array([0.0, y_sl - 1.0 * scale, -0.1 * v.h])
        prims += _shell(v.local((a + b) / 2), v.R @ _frame(b - a), [3.5 * scale, np.linalg.norm(b - a) / 2 + 2.0,
                                                                    10.0 * scale], 1.2, tag="lamina", group=g)
        tl = _LUMBAR_TRANSVERSE.get(v.name, 0.0) * scale
        if tl > 0:
            tc = np.array([side * (v.w / 2 - 0.12 * v.w + tl / 2 + 4.0 * scale), y_wall - 8.0 * scale, 0.1 * v.h])
            prims += _shell(v.local(tc), v.R @ _frame([side, -0.15, -0.1]), [4.0 * scale, tl / 2 + 3.0, 5.0 * scale],
                            1.0, tag="transverse", group=g)
    alpha = math.radians(spinous_deg + rng.uniform(-4, 4))
    axis = np.array([0.0, -math.cos(alpha), -math.sin(alpha)])
    length = spinous_len * scale * rng.uniform(0.9, 1.1)
    sc = np.array([0.0, y_sl, -0.1 * v.h]) + axis * length / 2
    prims += _shell(v.local(sc), v.R @ _frame(axis, [0.0, 0.0, 1.0]), [4.0 * scale, length / 2 + 2.0, 10.0 * scale],
                    1.2, tag="spinous", group=g)
    return prims


def _lspine_patient(rng: np.random.Generator, size_scale: float) -> _Patient:
    scale = size_scale * rng.uniform(0.92, 1.08)
    lordosis = rng.uniform(35.0, 60.0)
    sacral_slope = rng.uniform(30.0, 48.0)
    coronal = rng.uniform(-6.0, 6.0)
    narrowing = _draw_narrowing(rng, ["S1", "L5", "L4", "L3"], 0.4)
    column = _build_column(rng, _LUMBAR, _LUMBAR_DISC, scale, lordosis, sacral_slope - lordosis / 2, coronal,
                           power=0.6, narrowing=narrowing)
    by = {v.name: v for v in column}
    prims: list[_Prim] = []
    for v, row in zip(column, _LUMBAR, strict=True):
        name, *_dims, spinous_len, spinous_deg = row
        prims += _lumbar_arch_prims(v, spinous_len, spinous_deg, scale, rng)
    s1 = by["S1"]
    # sacrum S2-S5 below S1, fused, curving backwards; alae beside S1
    top = s1.local([0.0, 0.0, -s1.h / 2])
    phi = math.asin(float(s1.R[1, 2]))
    for k, (w, d, h) in enumerate([(40, 30, 22), (32, 24, 18), (24, 18, 14), (16, 12, 10)]):
        phi += math.radians(rng.uniform(8.0, 14.0))
        R = _rx(phi)
        c = top - R @ np.array([0.0, 0.0, h * scale / 2])
        seg = _Vertebra(f"S{k + 2}", c, R, w * scale, d * scale, h * scale, 10.0)
        prims += [pp for pp in _body_prims(seg, 1.0, -1)]
        for pp in prims[-2:]:
            pp.tag = ""
        prims += _shell(seg.local([0.0, -seg.d / 2 - 8.0 * scale, 0.0]), R, [10 * scale, 5 * scale, h * scale / 2],
                        1.0)
        top = c - R @ np.array([0.0, 0.0, h * scale / 2])
    for side in (-1.0, 1.0):
        # sacral ala: a flat wing of mostly trabecular bone beside S1
        prims += _shell(s1.local([side * (s1.w / 2 + 18.0 * scale), -8.0 * scale, -6.0 * scale]), s1.R,
                        [22 * scale, 18 * scale, 14 * scale], 1.0, mu_outer=MU_CORTICAL * 0.6)
        # iliac wing: a broad thin plate from the sacroiliac joint up to a crest at L4-L5
        crest_z = float(by["L4"].corner("bp")[2]) + rng.uniform(-10.0, 10.0) * scale
        wing_c = np.array([side * 88.0 * scale, float(s1.c[1]) - 5.0 * scale, crest_z - 55.0 * scale])
        wing_R = _frame([side * 0.45, 1.0, 0.0])
        prims += _shell(wing_c, wing_R, [7.0 * scale, 72.0 * scale, 58.0 * scale], 2.0,
                        mu_inner=MU_TRABECULAR * 0.5)
        # acetabular roof, femoral head, ischium and pubis
        hip = np.array([side * 92.0 * scale, float(s1.c[1]) + 45.0 * scale, float(s1.c[2]) - 115.0 * scale])
        prims += _shell(hip + np.array([side * 5.0, 0.0, 22.0]) * scale, np.eye(3), [30 * scale, 28 * scale,
                                                                                     12 * scale], 2.0)
        prims += _shell(hip, np.eye(3), [24 * scale] * 3, 2.0)
        prims += _shell(hip + np.array([side * 10.0, -5.0, -12.0]) * scale, np.eye(3), [9 * scale, 9 * scale,
                                                                                        22 * scale], 1.5)
        prims += _shell(hip + np.array([-side * 45.0, 25.0, -25.0]) * scale, _frame([side, 0.3, 0.0]),
                        [8 * scale, 42 * scale, 8 * scale], 1.5)
    # floating ribs on T11 and T12, curving out and down
    for name in ("T11", "T12"):
        v = by[name]
        for side in (-1.0, 1.0):
            start = v.local([side * (v.w / 2 + 8.0 * scale), -v.d / 2 - 6.0 * scale, 0.0])
            length = (120.0 if name == "T12" else 170.0) * scale
            pts = []
            for f in np.linspace(0.0, 1.0, 6):
                ang = math.radians(20 + 70 * f)
                pts.append(start + np.array([side * math.sin(ang) * length * f * 0.8,
                                             math.cos(ang) * length * f * 0.6 - 12.0 * scale * f,
                                             -length * f * 0.35]))
            prims += _polyline(pts, (4.5 * scale, 6.0 * scale), 1.2, group=v.index)
    # soft tissue: abdomen, pelvis and buttocks, bowel gas
    l3 = by["L3"]
    depth = rng.uniform(95.0, 130.0) * scale
    abd_c = np.array([0.0, float(l3.corner("ta")[1]) + depth - 2 * depth * 0.55, float(l3.c[2])])
    prims.append(_Prim(abd_c, np.eye(3), np.array([rng.uniform(140, 175) * scale, depth, 1.0]), MU_SOFT, cyl=True,
                       top=(350.0, 0.0), bot=(-400.0, 0.0), tissue=2))
    for side in (-1.0, 1.0):
        prims.append(_ell(np.array([side * 40.0 * scale, float(s1.c[1]) - 70.0 * scale, float(s1.c[2]) - 90 * scale]),
                          [80 * scale, 60 * scale, 80 * scale], MU_SOFT, tissue=2))
    n_gas = int(rng.integers(6, 22))
    z_lo, z_hi = float(s1.c[2]) - 60.0 * scale, float(by["L1"].c[2]) + 20.0 * scale
    for _ in range(n_gas):
        frame_loop = rng.random() < 0.5  # colon along the frame, small bowel centrally
        x = rng.choice([-1.0, 1.0]) * rng.uniform(80, 120) if frame_loop else rng.uniform(-80, 80)
        gc = np.array([x * scale, float(l3.corner("ta")[1]) + rng.uniform(10, 90) * scale, rng.uniform(z_lo, z_hi)])
        semi = rng.uniform(6.0, 28.0, size=3) * scale
        semi[1] = min(semi[1], 25.0 * scale)
        prims.append(_ell(gc, list(semi), MU_AIR, _rx(rng.uniform(-1, 1)) @ _ry(rng.uniform(-1, 1))))
    prims += _osteophytes(column, narrowing, rng, scale)
    # an umbilical piercing or surgical clips
    spots = [(abd_c + np.array([0.0, depth - 4.0 * scale, -20.0 * scale]), 3.0 * scale)]
    front = float(l3.corner("ta")[1])
    spots += [(np.array([rng.uniform(-60, 60) * scale, front + rng.uniform(20, 80) * scale, rng.uniform(z_lo, z_hi)]),
               3.5 * scale) for _ in range(3)]
    prims += _metal(rng, spots, 0.12)
    centre = by["L3"].c + np.array([0.0, 0.0, -10.0]) * scale
    return _Patient("lspine", column, prims, facing_left=bool(rng.random() < 0.5), centre=centre,
                    fov_rows_mm=float(rng.uniform(330.0, 400.0)), fov_aspect=float(rng.uniform(0.62, 0.8)),
                    lat_shift_mm=-(by["L3"].d / 2 + 12.0 * scale))


# ---------------------------------------------------------------------------------------
# negatives: chest, hand (rendered like the spine), noise, CT slice, blank

_THORACIC = [(f"T{12 - i}", 26.0 + 1.2 * (11 - i), 22.0 + (11 - i) * 0.8, 17.0 + (11 - i) * 0.6, 15.0, 25.0, 45.0)
             for i in range(12)]


def _chest_patient(rng: np.random.Generator, size_scale: float) -> _Patient:
    """PA chest: thorax, lungs cut by the heart, twelve rib pairs, clavicles, thoracic spine."""
    scale = size_scale * rng.uniform(0.9, 1.1)
    column = _build_column(rng, _THORACIC, {name: 5.0 for name, *_ in _THORACIC}, scale, -rng.uniform(20, 45),
                           rng.uniform(-5, 5), rng.uniform(-5, 5))
    prims: list[_Prim] = []
    for v in column:
        prims += _body_prims(v, 1.0 * scale, -1)
        prims += _shell(v.local([0.0, -v.d / 2 - v.canal - 10.0 * scale, -6.0 * scale]),
                        v.R @ _frame([0.0, -0.6, -0.8]), [3 * scale, 14 * scale, 4 * scale], 0.8)
    top = column[-1].c
    semi_x, semi_y = rng.uniform(135, 165) * scale, rng.uniform(95, 120) * scale
    mid_z = float(top[2]) - 150.0 * scale
    body_c = np.array([0.0, float(top[1]) + 40.0 * scale, mid_z])
    prims.append(_Prim(body_c, np.eye(3), np.array([semi_x, semi_y, 1.0]), MU_SOFT, cyl=True,
                       top=(170.0 * scale, 0.0), bot=(-400.0, 0.0), tissue=2))
    for side in (-1.0, 1.0):
        prims.append(_ell(body_c + np.array([side * 0.45 * semi_x, 0.0, 30.0 * scale]),
                          [0.42 * semi_x, 0.8 * semi_y, 125.0 * scale], MU_LUNG))
        prims.append(_ell(np.array([side * (semi_x + 10.0), float(top[1]), float(top[2]) + 20.0 * scale]),
                          [55 * scale, 60 * scale, 50 * scale], MU_SOFT, tissue=2))
        a = np.array([side * 20.0 * scale, float(top[1]) + 70.0 * scale, float(top[2]) - 10.0 * scale])
        b = np.array([side * 0.95 * semi_x, float(top[1]) + 10.0 * scale, float(top[2]) + 15.0 * scale])
        prims += _polyline([a * (1 - f) + b * f + np.array([0.0, 12.0 * scale * math.sin(math.pi * f), 0.0])
                            for f in np.linspace(0.0, 1.0, 6)], (5.5 * scale, 5.0 * scale), 1.5)
    # heart: soft tissue where the left lung would be (cancels the lung there), diaphragm domes via the lungs
    heart_c = body_c + np.array([25.0, 15.0, -55.0]) * scale
    prims.append(_ell(heart_c, [65 * scale, 50 * scale, 60 * scale], -MU_LUNG * 0.9))
    # ribs: each a chain around the thorax, sloping down towards the front
    for i, v in enumerate(reversed(column)):  # T1 first
        rib_z = float(v.c[2])
        radius_x = semi_x * (0.55 + 0.4 * min(i, 6) / 6)
        radius_y = semi_y * (0.6 + 0.35 * min(i, 6) / 6)
        for side in (-1.0, 1.0):
            pts = [np.array([side * radius_x * math.sin(t), float(v.c[1]) - radius_y * 0.25
                             - radius_y * 0.55 * math.cos(t) + radius_y * 0.3,
                             rib_z - 55.0 * scale * (t / math.pi) ** 1.3])
                   for t in np.linspace(0.05, math.pi * 0.88, 12)]
            prims += _polyline(pts, (3.0 * scale, 5.5 * scale), 1.0)
    return _Patient("chest", [], prims, facing_left=bool(rng.random() < 0.5), centre=body_c + np.array([0, 0, 20.0]),
                    fov_rows_mm=float(rng.uniform(360.0, 430.0)), fov_aspect=float(rng.uniform(0.85, 1.0)))


def _hand_patient(rng: np.random.Generator, size_scale: float) -> _Patient:
    """PA hand: radius and ulna, carpals, metacarpals, phalanges in soft tissue, fingers spread."""
    scale = size_scale * rng.uniform(0.85, 1.1)
    prims: list[_Prim] = []
    wrist = np.array([0.0, 0.0, 0.0])
    # forearm and palm soft tissue (the hand lies flat: its thickness runs along the AP beam)
    prims.append(_ell(wrist + np.array([0.0, 0.0, -90.0]) * scale, [32 * scale, 20 * scale, 100 * scale], MU_SOFT,
                      tissue=2))
    prims.append(_ell(wrist + np.array([0.0, 0.0, 50.0]) * scale, [45 * scale, 16 * scale, 50 * scale], MU_SOFT,
                      tissue=2))
    for side, off in ((-1.0, 10.0), (1.0, 12.0)):
        prims += _shell(wrist + np.array([side * off, 0.0, -70.0]) * scale, np.eye(3),
                        [(11.0 if side > 0 else 7.0) * scale, 8 * scale, 60 * scale], 2.0)
    for k in range(8):
        cx = (-18 + 12 * (k % 4)) * scale
        cz = (12 + 14 * (k // 4)) * scale
        prims += _shell(wrist + np.array([cx, 0.0, cz]), np.eye(3), [6 * scale, 6 * scale, 6.5 * scale], 1.0)
    spread = rng.uniform(0.0, 0.25)
    lengths = [(45, 32, 0, 22), (64, 40, 24, 18), (64, 45, 28, 19), (58, 42, 26, 18), (52, 33, 18, 17)]
    for i, (meta, prox, middle, distal) in enumerate(lengths):
        base_x = (-24 + 13 * i) * scale if i else -30 * scale
        angle = (i - 2) * spread + (-0.55 if i == 0 else 0.0)
        direction = np.array([math.sin(angle), 0.0, math.cos(angle)])
        p = wrist + np.array([base_x, 0.0, 32.0 * scale])
        for j, length in enumerate((meta, prox, middle, distal)):
            if length == 0:
                continue
            length *= scale
            c = p + direction * length / 2
            width = (5.0 if j == 0 else 4.5 - 0.7 * j) * scale
            R = _frame(direction, [0.0, 1.0, 0.0])
            prims += _shell(c, R, [width, length / 2, width * 0.8], 1.0)
            prims.append(_ell(c, [width + 5.0 * scale, length / 2 + 3.0, width + 3.0 * scale], MU_SOFT, R, tissue=2))
            p = p + direction * (length + 1.5 * scale)
    return _Patient("hand", [], prims, facing_left=bool(rng.random() < 0.5), centre=np.array([0.0, 0.0, 30.0]) * scale,
                    fov_rows_mm=float(rng.uniform(240.0, 300.0)), fov_aspect=float(rng.uniform(0.75, 0.85)))


def _flat(kind: str, seed: int, view: str, pixel_spacing_mm: float, fov_scale: float,
          photons: float) -> HeldoutRadiograph:
    """Images that are not radiographs of anatomy: uniform noise, an axial CT slice, a blank exposure."""
    rng = np.random.default_rng([seed, 5, VIEWS.index(view)])
    tissues: np.ndarray
    if kind == "ct_slice":
        n = 512
        spacing = float(rng.uniform(0.6, 0.9)) * fov_scale
        yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2) * spacing
        hu = np.full((n, n), -1000.0, np.float32)
        ax, ay = rng.uniform(140, 175), rng.uniform(100, 125)
        body = (xx / ax) ** 2 + (yy / ay) ** 2 <= 1
        hu[body] = -100.0  # subcutaneous fat
        hu[(xx / (ax - 12)) ** 2 + (yy / (ay - 12)) ** 2 <= 1] = 40.0
        for _ in range(int(rng.integers(3, 10))):  # bowel gas
            gx, gy, r = rng.uniform(-90, 90), rng.uniform(-70, 10), rng.uniform(6, 22)
            hu[(xx - gx) ** 2 + (yy - gy) ** 2 <= r * r] = -1000.0
        cy = ay - 60.0  # vertebral body centre, posterior third of the body
        vb = (xx / 22.0) ** 2 + ((yy - cy) / 17.0) ** 2
        hu[vb <= 1] = 1000.0
        hu[vb <= 0.85] = 220.0
        canal = xx ** 2 + (yy - cy - 28.0) ** 2 <= 10.0 ** 2
        ring = (xx ** 2 + (yy - cy - 28.0) ** 2 <= 17.0 ** 2) & ~canal
        hu[ring & (yy > cy + 12)] = 700.0
        hu[(np.abs(xx) <= 4) & (yy > cy + 40) & (yy < cy + 68)] = 700.0
        hu[canal] = 20.0
        hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
        image = np.clip(np.rint(hu + 1024.0), 0, MAX_STORED).astype(np.uint16)
        tissues = np.zeros((n, n), np.uint8)
        return HeldoutRadiograph(image, (spacing, spacing), view, kind, np.zeros((n, n), np.uint8), tissues, False,
                                 False, ())
    rows = int(round(rng.uniform(200, 240) / pixel_spacing_mm))
    cols = int(round(rows * rng.uniform(0.8, 0.86)))
    spacing = pixel_spacing_mm * fov_scale
    if kind == "noise":
        mean, spread = rng.uniform(800, 3000), rng.uniform(100, 900)
        image = np.clip(rng.uniform(mean - spread, mean + spread, (rows, cols)), 0, MAX_STORED)
        tissues = np.zeros((rows, cols), np.uint8)
    else:  # blank: an exposure with nothing in the beam
        counts = photons + math.sqrt(photons) * rng.standard_normal((rows, cols))
        p = np.log(photons / np.maximum(counts, 0.5))
        image = np.clip(rng.uniform(80, 250) + rng.uniform(360, 420) * p, 0, MAX_STORED)
        tissues = np.full((rows, cols), 3, np.uint8)
    return HeldoutRadiograph(np.rint(image).astype(np.uint16), (spacing, spacing), view, kind,
                             np.zeros((rows, cols), np.uint8), tissues, False, False, ())


# ---------------------------------------------------------------------------------------
# findings


def _apply_findings(pat: _Patient, rng: np.random.Generator, *, fracture: bool, dislocation: bool,
                    candidates: list[str]) -> None:
    """Compression / displaced fracture line and translation, drawn the same way whatever is applied."""
    by = {v.name: v for v in pat.vertebrae}
    frac_level = candidates[int(rng.integers(len(candidates)))]
    frac_kind = "compression" if rng.random() < 0.55 else "line"
    loss = rng.uniform(0.20, 0.50)
    post_ratio = rng.uniform(0.0, 0.35)
    cut_at = rng.uniform(-0.25, 0.25)
    cut_slope = rng.uniform(-0.25, 0.25)
    gap = rng.uniform(2.0, 4.0)
    step = rng.uniform(1.0, 3.0)
    step_lat = rng.uniform(-1.0, 1.0)
    disl_level = candidates[int(rng.integers(len(candidates)))]
    shift = rng.uniform(3.0, 8.0)
    shift_lat = rng.uniform(1.0, 3.0) * (1.0 if rng.random() < 0.5 else -1.0)
    if fracture:
        v = by[frac_level]
        pat.finding_levels["fracture"] = frac_level
        if frac_kind == "compression":
            pat.finding_levels["fracture_type"] = "compression"
            v.fracture = {"kind": "compression", "loss": loss, "post_ratio": post_ratio}
            # anterior height loss; the top endplate drops (the column above keeps its place)
            z_ant = -v.h / 2 + v.h * (1 - loss)
            z_post = -v.h / 2 + v.h * (1 - loss * post_ratio)
            v.top_cut = ((z_ant + z_post) / 2, (z_ant - z_post) / v.d)
        else:
            pat.finding_levels["fracture_type"] = "displaced line"
            v.fracture = {"kind": "line", "cut": cut_at * v.h, "slope": cut_slope, "gap": gap, "step": step,
                          "step_lat": step_lat}
    if dislocation:
        v = by[disl_level]
        pat.finding_levels["dislocation"] = disl_level
        pat.moved_from = v.index
        move = v.R @ np.array([shift_lat, shift, 0.0])
        moved_groups = {u.index for u in pat.vertebrae if u.index >= v.index} | {len(pat.vertebrae)}
        for p in pat.prims:
            if p.group in moved_groups:
                p.c = p.c + move
        for u in pat.vertebrae:
            if u.index >= v.index:
                u.c = u.c + move


def _turn(pat: _Patient, rot: np.ndarray) -> None:
    """Rotate the whole patient (primitives and vertebra frames) about its field centre."""
    o = pat.centre
    for prim in pat.prims:
        prim.c = o + rot @ (prim.c - o)
        prim.R = rot @ prim.R
    for v in pat.vertebrae:
        v.c = o + rot @ (v.c - o)
        v.R = rot @ v.R


def _add_airway(pat: _Patient) -> None:
    """Air column in front of the prevertebral tissue, through the (possibly moved) vertebrae."""
    col = [v for v in pat.vertebrae if v.airway[0] > 0]
    if not col:
        return
    pts = [v.local([0.0, v.d / 2 + v.prevert + v.airway[1], 0.0]) for v in col]
    low, high = col[0], col[-1]
    pts.insert(0, pts[0] - low.R[:, 2] * 70.0)
    pts.append(pts[-1] + high.R[:, 2] * (high.h / 2 + 8.0))
    semis = [col[0].airway] + [col[min(i, len(col) - 1)].airway for i in range(len(col))]
    pat.prims += _polyline(pts, semis, 0.0, mu_outer=MU_AIR, mu_inner=MU_AIR, tissue=0, up=(0.0, 1.0, 0.0),
                           up_frame=True)


def _add_bodies(pat: _Patient) -> None:
    """Vertebral bodies, built last so that they carry the fracture and the translation."""
    for v in pat.vertebrae:
        t = 1.0
        frac = v.fracture
        if frac is None or frac["kind"] == "compression":
            pat.prims += _body_prims(v, t, v.index)
        if frac is None:
            continue
        if frac["kind"] == "compression":
            assert v.top_cut is not None
            a, b = v.top_cut
            # impacted trabeculae: a dense band under the collapsed endplate; buckled anterior cortex
            pat.prims.append(_Prim(v.c.copy(), v.R, np.array([v.w / 2 - t, v.d / 2 - t, 1.0]), MU_TRABECULAR * 1.6,
                                   cyl=True, top=(a - t, b), bot=(a - t - 3.0, b), group=v.index, bone=True))
            z_ant = a + b * v.d / 2
            pat.prims.append(_Prim(v.local([0.0, v.d / 2 - 0.3, z_ant - 1.5]), v.R,
                                   np.array([v.w / 2 - 1.0, 1.0, 1.6]), MU_CORTICAL * 0.35, tag="body", tissue=1,
                                   group=v.index))
            continue
        cut, slope, gap = float(frac["cut"]), float(frac["slope"]), float(frac["gap"])
        lower = _Vertebra(v.name, v.c.copy(), v.R, v.w, v.d, v.h, v.canal, index=v.index)
        lower.top_cut = (cut - gap / 2, slope)
        shift = v.R @ np.array([float(frac["step_lat"]), float(frac["step"]), 0.0])
        upper = _Vertebra(v.name, v.c + shift, v.R, v.w, v.d, v.h, v.canal, index=v.index)
        # the upper fragment moves rigidly: its fracture surface is the same plane in its own frame
        upper.bot_cut = (cut + gap / 2, slope)
        for part in (lower, upper):
            prims = _body_prims(part, t, v.index)
            # no cortex on the fracture surface: the inner cylinder reaches the cut
            if part is lower:
                prims[1].top = lower.top_cut
            else:
                prims[1].bot = upper.bot_cut
            pat.prims += prims


# ---------------------------------------------------------------------------------------
# projection


class _Grid:
    """Pixel <-> in-plane world coordinates (a, b): LAT a = y (anterior), AP a = x (left); b = z."""

    def __init__(self, rows: int, cols: int, spacing: float, magnification: float, centre_ab: tuple[float, float],
                 rotation_deg: float, flip: bool) -> None:
        self.rows, self.cols = rows, cols
        m = magnification
        th = math.radians(rotation_deg)
        cos, sin = math.cos(th), math.sin(th)
        f = -1.0 if flip else 1.0
        # detector (u right, w up) = spacing * (col - cc, rc - row); patient (a, b) = rot(u, w) / m + centre
        rot = np.array([[cos, -sin], [sin, cos]])
        det = np.array([[spacing, 0.0], [0.0, -spacing]])
        self.A = (np.diag([f, 1.0]) @ rot @ det) / m
        cc, rc = (cols - 1) / 2, (rows - 1) / 2
        self.o = np.array(centre_ab) - self.A @ np.array([cc, rc])
        self.Ainv = np.linalg.inv(self.A)

    def to_pixel(self, ab: np.ndarray) -> np.ndarray:
        """(n, 2) world (a, b) -> (n, 2) (col, row)."""
        return (ab - self.o[None, :]) @ self.Ainv.T

    def window(self, ab: np.ndarray, pad: int = 2) -> tuple[slice, slice] | None:
        px = self.to_pixel(ab)
        c0, r0 = np.floor(px.min(axis=0)).astype(int) - pad
        c1, r1 = np.ceil(px.max(axis=0)).astype(int) + pad
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, self.cols), min(r1, self.rows)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def coords(self, win: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None]
        cols = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :]
        A = self.A.astype(np.float32)
        a = A[0, 0] * cols + A[0, 1] * rows + np.float32(self.o[0])
        b = A[1, 0] * cols + A[1, 1] * rows + np.float32(self.o[1])
        return a, b


def _path_length(p: _Prim, view: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact chord length (mm) of the beam through primitive ``p`` at in-plane points (a, b)."""
    ia, ib = (1, 0) if view == "LAT" else (0, 1)  # world axis shown horizontally, beam axis
    R = p.R
    da = a - np.float32(p.c[ia])
    db = b - np.float32(p.c[2])
    off = -float(p.c[ib])
    q = [np.float32(R[ia, k]) * da + np.float32(R[2, k]) * db + np.float32(R[ib, k] * off) for k in range(3)]
    d = R[ib, :]  # beam direction in local coordinates
    s = p.s
    cut = math.isfinite(p.top[0]) or math.isfinite(p.bot[0])
    if not p.cyl:
        qn = [q[k] / np.float32(s[k]) for k in range(3)]
        dn = d / s
        A = float(np.dot(dn, dn))
        B = qn[0] * np.float32(dn[0]) + qn[1] * np.float32(dn[1]) + qn[2] * np.float32(dn[2])
        C = qn[0] * qn[0] + qn[1] * qn[1] + qn[2] * qn[2] - 1.0
        D = B * B - np.float32(A) * C
        if not cut:
            return np.float32(2.0 / A) * np.sqrt(np.maximum(D, 0.0))
    else:
        qn0, qn1 = q[0] / np.float32(s[0]), q[1] / np.float32(s[1])
        dn0, dn1 = d[0] / s[0], d[1] / s[1]
        A = max(dn0 * dn0 + dn1 * dn1, 1e-9)  # a rod along the beam: its planes bound the chord
        B = qn0 * np.float32(dn0) + qn1 * np.float32(dn1)
        C = qn0 * qn0 + qn1 * qn1 - 1.0
        D = B * B - np.float32(A) * C
    sq = np.sqrt(np.maximum(D, 0.0))
    lo = (-B - sq) / np.float32(A)
    hi = (-B + sq) / np.float32(A)
    valid = D > 0
    for (p0, p1), sign in ((p.top, 1.0), (p.bot, -1.0)):
        if not math.isfinite(p0):
            continue
        # sign * (z' - p1 y') <= sign * p0, along the ray z' - p1 y' = (q2 - p1 q1) + t (d2 - p1 d1)
        k = sign * (d[2] - p1 * d[1])
        rhs = np.float32(sign) * (np.float32(p0) - (q[2] - np.float32(p1) * q[1]))
        if k > 1e-9:
            hi = np.minimum(hi, rhs / np.float32(k))
        elif k < -1e-9:
            lo = np.maximum(lo, rhs / np.float32(k))
        else:
            valid &= rhs >= 0
    return np.where(valid, np.maximum(hi - lo, 0.0), np.float32(0.0)).astype(np.float32)


def _fill_convex(mask: np.ndarray, grid: _Grid, pts_ab: np.ndarray, label: int, only_zero: bool = True) -> None:
    """Paint the convex polygon with world vertices ``pts_ab`` (n, 2) into ``mask``."""
    win = grid.window(pts_ab, pad=1)
    if win is None:
        return
    px = grid.to_pixel(pts_ab)
    rows = np.arange(win[0].start, win[0].stop)[:, None].astype(np.float64)
    cols = np.arange(win[1].start, win[1].stop)[None, :].astype(np.float64)
    # orientation-independent: inside when on the same side of every edge
    n = len(px)
    signs = []
    for i in range(n):
        x0, y0 = px[i]
        x1, y1 = px[(i + 1) % n]
        signs.append((x1 - x0) * (rows - y0) - (y1 - y0) * (cols - x0))
    pos = np.logical_and.reduce([s >= 0 for s in signs])
    neg = np.logical_and.reduce([s <= 0 for s in signs])
    inside = pos | neg
    sub = mask[win]
    if only_zero:
        inside &= sub == 0
    sub[inside] = label


_LAT_LABEL = {"body": 1, "dens": 1, "uncinate": 1, "pedicle": 2, "pillar": 2, "lamina": 2, "spinous": 2,
              "transverse": 2, "arch": 2}
_AP_LABEL = {"body": 1, "dens": 1, "uncinate": 1, "pedicle": 2, "spinous": 3}


def _render(pat: _Patient, view: str, grid: _Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Line integral (sum of mu * L), structure labels, bone and soft-tissue footprints."""
    total = np.zeros((grid.rows, grid.cols), np.float32)
    labels = _LAT_LABEL if view == "LAT" else _AP_LABEL
    footprints = {k: np.zeros((grid.rows, grid.cols), bool) for k in set(labels.values())}
    bone = np.zeros((grid.rows, grid.cols), bool)
    soft = np.zeros((grid.rows, grid.cols), bool)
    ia = 1 if view == "LAT" else 0
    for p in pat.prims:
        ab = p.corners()[:, [ia, 2]]
        win = grid.window(ab)
        if win is None:
            continue
        a, b = grid.coords(win)
        length = _path_length(p, view, a, b)
        total[win] += np.float32(p.mu) * length
        label = labels.get(p.tag, 0)
        if label:
            footprints[label][win] |= length > 0
        if p.tissue == 1:
            bone[win] |= length > 0.2
        elif p.tissue == 2:
            soft[win] |= length > 1.0
    structures = np.zeros((grid.rows, grid.cols), np.uint8)
    if view == "LAT":
        for label in (1, 2):
            structures[footprints[label] & (structures == 0)] = label
        _lat_regions(pat, grid, structures)
    else:
        for label in (2, 3, 1):
            structures[footprints[label] & (structures == 0)] = label
    return total, structures, bone, soft


def _lat_regions(pat: _Patient, grid: _Grid, structures: np.ndarray) -> None:
    """Discs, canal and prevertebral tissue as polygons between body corners (LAT only)."""
    col = pat.vertebrae  # bottom-up
    ab = lambda p: np.array([p[1], p[2]])  # noqa: E731 - world (y, z) of a LAT point
    for lo, hi in zip(col[:-1], col[1:], strict=True):
        quad = np.array([ab(hi.corner("ba")), ab(hi.corner("bp")), ab(lo.corner("tp")), ab(lo.corner("ta"))])
        _fill_convex(structures, grid, quad, 3)
    # canal: posterior wall to the spinolaminar line, one quad per body and per disc
    def wall(v: _Vertebra, top: bool) -> tuple[np.ndarray, np.ndarray]:
        p = v.corner("tp" if top else "bp")
        back = p - v.R[:, 1] * v.canal
        return ab(p), ab(back)

    for i, v in enumerate(col):
        (t0, t1), (b0, b1) = wall(v, True), wall(v, False)
        _fill_convex(structures, grid, np.array([t0, t1, b1, b0]), 4)
        if i + 1 < len(col):
            (u0, u1) = wall(col[i + 1], False)
            _fill_convex(structures, grid, np.array([u0, u1, t1, t0]), 4)
    # prevertebral soft tissue C2-C7
    cerv = [v for v in col if v.name.startswith("C") and v.prevert > 0]
    for i, v in enumerate(cerv):
        ta, ba = v.corner("ta"), v.corner("ba")
        fwd = v.R[:, 1]
        quad = np.array([ab(ta), ab(ta + fwd * v.prevert), ab(ba + fwd * v.prevert), ab(ba)])
        _fill_convex(structures, grid, quad, 5)
        if i + 1 < len(cerv):
            u = cerv[i + 1]
            ub = u.corner("ba")
            quad = np.array([ab(ub), ab(ub + u.R[:, 1] * u.prevert), ab(ta + fwd * v.prevert), ab(ta)])
            _fill_convex(structures, grid, quad, 5)


# ---------------------------------------------------------------------------------------
# acquisition

_LETTERS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
}


def _letter_mask(letter: str, height_px: int) -> np.ndarray:
    bitmap = np.array([[ch == "1" for ch in row] for row in _LETTERS[letter]], dtype=np.uint8)
    k = max(1, height_px // 7)
    return np.kron(bitmap, np.ones((k, k), dtype=np.uint8)).astype(bool)


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    r, c = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:r, :c].reshape(r // f, f, c // f, f).mean(axis=(1, 3))


def _interp_axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation indices and weights, half-pixel centres, edges clamped."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def _upsample(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a smooth, small image to ``shape`` (separable, numpy only)."""
    r0, r1, wr = _interp_axis(shape[0], small.shape[0])
    c0, c1, wc = _interp_axis(shape[1], small.shape[1])
    small = small.astype(np.float32)
    rows = small[r0] * (1 - wr)[:, None] + small[r1] * wr[:, None]
    return rows[:, c0] * (1 - wc)[None, :] + rows[:, c1] * wc[None, :]


def _blur_in_field(x: np.ndarray, field_mask: np.ndarray, sigma_px: float, f: int) -> np.ndarray:
    """Gaussian blur of ``x`` over the exposed field only (normalised convolution, computed on
    an f-times smaller grid): processing leaves no halo along the collimator edges."""
    fm = field_mask.astype(np.float32)
    num = ndimage.gaussian_filter(_block_mean(x * fm, f), sigma=sigma_px / f, mode="nearest")
    den = ndimage.gaussian_filter(_block_mean(fm, f), sigma=sigma_px / f, mode="nearest")
    out = _upsample((num / np.maximum(den, 1e-3)).astype(np.float32), x.shape)
    return np.where(field_mask, out, x)


def _expose(line_integral: np.ndarray, *, spacing: float, photons: float, blur_px: float,
            rng: np.random.Generator, noise_rng: np.random.Generator,
            field_mask: np.ndarray, lead: np.ndarray) -> np.ndarray:
    """Beer-Lambert, scatter, blur, Poisson noise, log and 12-bit processing."""
    primary = np.exp(-line_integral, dtype=np.float32)
    # anode heel effect: up to +-12 % exposure from one edge to the other, along rows or columns
    heel = np.float32(rng.uniform(-0.12, 0.12))
    if rng.random() < 0.5:
        primary *= (1 + heel * np.linspace(-1, 1, primary.shape[0], dtype=np.float32))[:, None]
    else:
        primary *= (1 + heel * np.linspace(-1, 1, primary.shape[1], dtype=np.float32))[None, :]
    primary[~field_mask] *= 0.005
    primary[lead] *= MU_LEAD_TRANSMISSION
    # scatter: a broad blur (sigma ~ 30 mm) of what the tissue scatters, ~ P exp(-P) (none from the open beam)
    f = 8
    small = _block_mean(primary * line_integral, f)
    spr = rng.uniform(0.3, 1.0)
    scatter = _upsample(ndimage.gaussian_filter(small, sigma=30.0 / (spacing * f), mode="nearest"), primary.shape)
    scatter *= field_mask
    expected = primary + np.float32(spr) * scatter.astype(np.float32)
    sigma = math.hypot(0.5, blur_px)
    expected = ndimage.gaussian_filter(expected, sigma=sigma, mode="nearest")
    lam = np.maximum(expected * np.float32(photons), 0.0)
    z = noise_rng.standard_normal(lam.shape, dtype=np.float32)
    # Anscombe: 2 sqrt(N + 3/8) ~ Normal(2 sqrt(lam + 3/8), 1); exact enough above ~4 counts
    counts = np.square(np.sqrt(lam + 0.375) + 0.5 * z) - 0.375
    # not rounded: an energy-integrating detector, and a tiny change of lam stays a tiny change
    counts = np.maximum(counts, 0.5)
    # light spread in the scintillator blurs the noise too (correlated, not white, noise)
    counts = ndimage.gaussian_filter(counts, sigma=rng.uniform(0.3, 0.8), mode="nearest")
    if rng.random() < 0.3:
        # stationary anti-scatter grid: faint lines every 2-4 pixels along rows or columns
        period = rng.uniform(2.2, 4.0)
        lines = 1 - np.float32(rng.uniform(0.003, 0.012)) * (np.cos(
            2 * np.pi * np.arange(counts.shape[1] if rng.random() < 0.5 else counts.shape[0]) / period) > 0.6)
        counts = counts * (lines[None, :] if lines.size == counts.shape[1] else lines[:, None]).astype(np.float32)
    p = np.log(np.float32(photons) / counts.astype(np.float32))
    # processing as on a DX workstation: dynamic range compression (subtract part of a 15 mm
    # blur, so neck and shoulders both show), then an unsharp mask, then a linear map to 12 bits
    inside = p[field_mask]
    ref = float(np.median(inside)) if inside.size else float(np.median(p))
    broad = _blur_in_field(p, field_mask, 15.0 / spacing, 8)
    p = p - np.float32(rng.uniform(0.45, 0.75)) * (broad - np.float32(ref))
    amount = rng.uniform(0.0, 0.8)
    if amount > 0.05:
        p = p + np.float32(amount) * (p - _blur_in_field(p, field_mask, 3.0 / spacing, 4))
    gain = rng.uniform(360.0, 420.0)
    offset = rng.uniform(80.0, 250.0)
    return np.clip(np.rint(offset + gain * p), 0, MAX_STORED).astype(np.uint16)


def _collimation(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    field = np.ones((rows, cols), bool)
    if rng.random() < 0.8:
        t, b = (rng.uniform(0.0, 0.1, size=2) * rows).astype(int)
        left, right = (rng.uniform(0.0, 0.12, size=2) * cols).astype(int)
        field[:t, :] = False
        field[rows - b:, :] = False
        field[:, :left] = False
        field[:, cols - right:] = False
    return field


# ---------------------------------------------------------------------------------------
# public API


def _rngs(seed: int, view: str) -> tuple[np.random.Generator, ...]:
    v = VIEWS.index(view) + 1
    return (np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2]),
            np.random.default_rng([seed, 3, v]), np.random.default_rng([seed, 4, v]))


def generate(seed: int, *, view: str = "LAT", kind: str = "cspine", p_fracture: float = 0.35,
             p_dislocation: float = 0.15, fracture: bool | None = None, dislocation: bool | None = None,
             pixel_spacing_mm: float = 0.15, fov_scale: float = 1.0, photons: float = 3e4, blur_px: float = 0.0,
             rotation_deg: float = 0.0, size_scale: float = 1.0) -> HeldoutRadiograph:
    """One held-out radiograph; the same seed gives the same patient and findings in every view."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed {seed!r}: expected a non-negative integer")
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: expected one of {VIEWS}")
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    if not 0.03 <= pixel_spacing_mm <= 1.0:
        raise ValueError(f"pixel_spacing_mm {pixel_spacing_mm}: expected 0.03-1.0 mm")
    if not 0.3 <= fov_scale <= 4.0:
        raise ValueError(f"fov_scale {fov_scale}: expected 0.3-4.0")
    if photons <= 0:
        raise ValueError(f"photons {photons}: expected > 0")
    if blur_px < 0:
        raise ValueError(f"blur_px {blur_px}: expected >= 0")
    if not 0.3 <= size_scale <= 3.0:
        raise ValueError(f"size_scale {size_scale}: expected 0.3-3.0")
    if kind in ("noise", "ct_slice", "blank"):
        return _flat(kind, seed, view, pixel_spacing_mm, fov_scale, photons)
    rng_anat, rng_find, rng_acq, rng_noise = _rngs(seed, view)
    draw_fracture = rng_find.random() < p_fracture
    draw_dislocation = rng_find.random() < p_dislocation
    has_fracture = draw_fracture if fracture is None else bool(fracture)
    has_dislocation = draw_dislocation if dislocation is None else bool(dislocation)
    if kind == "cspine":
        pat = _cspine_patient(rng_anat, size_scale)
        candidates = ["C2", "C3", "C4", "C5", "C6", "C7"]
    elif kind == "lspine":
        pat = _lspine_patient(rng_anat, size_scale)
        candidates = ["T12", "L1", "L2", "L3", "L4", "L5"]
    else:  # chest, hand: anatomy without spine labels or findings
        pat = _chest_patient(rng_anat, size_scale) if kind == "chest" else _hand_patient(rng_anat, size_scale)
        candidates = []
        has_fracture = has_dislocation = False
        for prim in pat.prims:
            prim.tag = ""
    if candidates:
        _apply_findings(pat, rng_find, fracture=has_fracture, dislocation=has_dislocation, candidates=candidates)
    _add_airway(pat)
    _add_bodies(pat)
    # bone density of this patient (osteopenic to dense), drawn after the anatomy it scales
    density = rng_anat.uniform(0.7, 1.15)
    for prim in pat.prims:
        if prim.bone or prim.tissue == 1:
            prim.mu *= density
    # positioning: the patient turned a few degrees about the vertical axis, differently per view
    # (doubled contours of pillars, mandible and ribs, as on real films)
    yaw = math.radians(rng_acq.uniform(-6.0, 6.0))
    _turn(pat, np.array([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0],
                         [0.0, 0.0, 1.0]]))
    spacing_eff = pixel_spacing_mm * fov_scale
    rows = int(round(pat.fov_rows_mm / pixel_spacing_mm))
    cols = int(round(pat.fov_rows_mm * pat.fov_aspect / pixel_spacing_mm))
    jitter = rng_acq.uniform(-10.0, 10.0, size=2)
    ia = 1 if view == "LAT" else 0
    centre_ab = (float(pat.centre[ia]) + jitter[0] + (pat.lat_shift_mm if view == "LAT" else 0.0),
                 float(pat.centre[2]) + jitter[1])
    # LAT: a = anterior; a patient facing the image left has a growing to the left
    grid = _Grid(rows, cols, spacing_eff, MAGNIFICATION.get((kind, view), 1.05), centre_ab, rotation_deg,
                 flip=view == "LAT" and pat.facing_left)
    total, structures, bone, soft = _render(pat, view, grid)
    if kind in ("lspine", "chest"):
        total *= np.float32(0.85)  # 85-90 kVp for the abdomen: every attenuation a little lower
    field = _collimation(rows, cols, rng_acq)
    lead = np.zeros((rows, cols), bool)
    if rng_acq.random() < 0.6:
        letter = "L" if rng_acq.random() < 0.5 else "R"
        glyph = _letter_mask(letter, int(12.0 / spacing_eff))
        fr, fc = np.nonzero(field)
        r0 = int(fr.min() + 0.04 * rows)
        c0 = int(fc.min() + 0.04 * cols) if rng_acq.random() < 0.5 else int(fc.max() - 0.04 * cols - glyph.shape[1])
        gr, gc = min(glyph.shape[0], rows - r0), min(glyph.shape[1], cols - c0)
        if gr > 0 and gc > 0 and c0 >= 0:
            lead[r0:r0 + gr, c0:c0 + gc] = glyph[:gr, :gc]
    image = _expose(total, spacing=spacing_eff, photons=photons, blur_px=blur_px, rng=rng_acq,
                    noise_rng=rng_noise, field_mask=field, lead=lead)
    tissues = np.full((rows, cols), 3, np.uint8)
    tissues[soft] = 2
    tissues[bone] = 1
    tissues[~field | lead] = 0
    structures[~field] = 0
    # what the image shows: levels whose body centre is in the exposed field
    visible = []
    for v in reversed(pat.vertebrae):  # top-down
        col, row = grid.to_pixel(np.array([[v.c[ia], v.c[2]]]))[0]
        if 0 <= row < rows and 0 <= col < cols and field[int(row), int(col)]:
            visible.append(v.name)
    c1_seen = kind == "cspine" and "C2" in visible
    levels = tuple((["C1"] if c1_seen else []) + visible)
    shown_fracture = has_fracture and pat.finding_levels.get("fracture") in visible
    shown_dislocation = has_dislocation and pat.finding_levels.get("dislocation") in visible
    return HeldoutRadiograph(image=image, pixel_spacing_mm=(spacing_eff, spacing_eff), view=view, kind=kind,
                             structures=structures, tissues=tissues, fracture=bool(shown_fracture),
                             dislocation=bool(shown_dislocation), levels=levels,
                             finding_levels={k: v for k, v in pat.finding_levels.items()},
                             facing=("left" if pat.facing_left else "right") if view == "LAT" else "")


# ---------------------------------------------------------------------------------------
# DICOM

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
_REGION = {"cspine": ("122494005", "Cervical spine"), "lspine": ("122496007", "Lumbar spine"),
           "chest": ("51185008", "Thorax"), "hand": ("85562004", "Hand")}


def heldout_uid(seed: int, *parts: str) -> str:
    """A deterministic 2.25 UID from the seed and a purpose."""
    digest = hashlib.sha256(("heldout-xray/" + "/".join([str(seed), *parts])).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def write_dicom(rad: HeldoutRadiograph, path: Path, *, seed: int, study_uid: str | None = None,
                modality: str = "DX", view_position: str | None = None, body_part: str = "CSPINE",
                write_spacing: bool = True) -> Path:
    """Write ``rad`` as a DX (For Presentation) or CR image; returns ``path``.

    ``view_position=None`` derives ViewPosition from the view (AP, or LL/RL by the side
    facing the image); ``""`` leaves it out (DX) or empty (CR, where it is Type 2).
    ``write_spacing=False`` drops Imager Pixel Spacing, which makes a DX non-conformant on
    purpose (it is Type 1 there) to test readers that need a spacing.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    if modality not in ("DX", "CR"):
        raise ValueError(f"modality {modality!r}: expected 'DX' or 'CR'")
    if rad.image.dtype != np.uint16 or rad.image.ndim != 2:
        raise ValueError(f"image {rad.image.dtype} {rad.image.shape}: expected a 2-D uint16 array")
    sop_class = DX_FOR_PRESENTATION if modality == "DX" else CR_IMAGE
    tag = f"{rad.kind}/{rad.view}/{modality}"
    sop_uid = heldout_uid(seed, tag, "instance")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.229792930915263917326437315432165539874"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or heldout_uid(seed, "study")
    ds.SeriesInstanceUID = heldout_uid(seed, tag, "series")
    ds.PatientName = f"HELDOUT^{seed}"
    ds.PatientID = f"HELDOUT-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(seed % 10**16)
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.SeriesNumber = 1 if rad.view == "AP" else 2
    ds.InstanceNumber = 1
    ds.Manufacturer = "spine-node heldout"
    ds.BodyPartExamined = body_part
    if view_position is None:
        view_position = "AP" if rad.view == "AP" else ("RL" if rad.facing == "left" else "LL")
    # row direction (left to right) and column direction (top to bottom) in patient terms
    if rad.view == "AP":
        ds.PatientOrientation = ["L", "F"]
    else:
        ds.PatientOrientation = ["P" if rad.facing == "left" else "A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rad.image.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    lo, hi = np.percentile(rad.image, [1.0, 99.0])
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{max(hi - lo, 1.0):.1f}"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    spacing = [f"{rad.pixel_spacing_mm[0]:.6g}", f"{rad.pixel_spacing_mm[1]:.6g}"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.ImageLaterality = "U"
        code, meaning = _REGION.get(rad.kind, _REGION["cspine"])
        region = Dataset()
        region.CodeValue = code
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = meaning
        ds.AnatomicRegionSequence = Sequence([region])
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1  # higher values: less X-ray intensity (bone bright)
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.AcquisitionContextSequence = Sequence([])
        ds.PositionerType = "COLUMN"
        if write_spacing:
            ds.ImagerPixelSpacing = spacing
        if view_position:
            ds.ViewPosition = view_position
    else:
        ds.ViewPosition = view_position
        if write_spacing:
            ds.ImagerPixelSpacing = spacing
            ds.PixelSpacing = spacing  # at the detector, as many CR writers do
    ds.PixelData = np.ascontiguousarray(rad.image).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _bench(n: int, kind: str) -> None:
    """Wall and CPU time per radiograph (CPU time is what a busy machine does not inflate)."""
    wall, cpu = [], []
    shape: tuple[int, ...] = ()
    for seed in range(n):
        for view in VIEWS:
            t0, c0 = time.perf_counter(), time.process_time()
            rad = generate(seed, view=view, kind=kind)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            shape = rad.image.shape
    print(f"{kind}: {len(wall)} radiographs, last {shape}: wall median {np.median(wall):.3f} s "
          f"(max {max(wall):.3f}), CPU median {np.median(cpu):.3f} s (max {max(cpu):.3f})")


def write_set(out: Path, seeds: range, *, kind: str = "cspine", modality: str = "DX", **kwargs: object) -> Path:
    """AP and LAT of each seed as DICOM (one study per seed) plus ``truth.npz`` per image
    (structures, tissues) and one ``truth.jsonl`` line per image (flags, levels, spacing)."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body_part = {"cspine": "CSPINE", "lspine": "LSPINE", "chest": "CHEST", "hand": "HAND"}.get(kind, "")
    with open(out / "truth.jsonl", "w", encoding="utf-8") as lines:
        for seed in seeds:
            for view in VIEWS:
                rad = generate(seed, view=view, kind=kind, **kwargs)  # type: ignore[arg-type]
                stem = f"{kind}-{seed}-{view}"
                write_dicom(rad, out / f"{stem}.dcm", seed=seed, modality=modality, body_part=body_part)
                np.savez_compressed(out / f"{stem}.npz", structures=rad.structures, tissues=rad.tissues)
                lines.write(json.dumps({"file": f"{stem}.dcm", "seed": seed, "view": view, "kind": kind,
                                        "fracture": rad.fracture, "dislocation": rad.dislocation,
                                        "levels": list(rad.levels), "finding_levels": rad.finding_levels,
                                        "pixel_spacing_mm": list(rad.pixel_spacing_mm)}) + "\n")
    logger.info("wrote %d seeds of %s to %s", len(seeds), kind, out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=int, nargs="?", const=5, help="time N seeds x 2 views")
    parser.add_argument("--kind", default="cspine", choices=KINDS)
    parser.add_argument("--out", type=Path, help="write AP + LAT DICOM and truth files of --seeds here")
    parser.add_argument("--seeds", type=int, nargs=2, default=(0, 10), metavar=("FIRST", "STOP"))
    parser.add_argument("--modality", default="DX", choices=("DX", "CR"))
    args = parser.parse_args()
    if args.bench:
        _bench(args.bench, args.kind)
    if args.out:
        write_set(args.out, range(*args.seeds), kind=args.kind, modality=args.modality)
