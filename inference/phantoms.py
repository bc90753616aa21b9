"""Synthetic spine phantoms: CT volumes in Hounsfield units, radiographs, DICOM writers.

The project trains its demo weights on these phantoms, because no spine images can be
shipped. A phantom is drawn from a seed, so every volume, label and DICOM UID is
reproducible. Anatomy is built from simple solids (elliptic cylinders, capsules,
ellipsoids) placed along a curved spine and rasterised in each vertebra's own frame:

* vertebral bodies with a cortical shell and a cancellous core, concave end plates;
* posterior elements: pedicles, laminae, spinous and transverse processes; C1 is a ring
  (anterior arch, lateral masses, posterior arch) without a body, C2 carries the dens;
* intervertebral discs, the spinal canal (CSF and cord), prevertebral soft tissue, the
  airway, neck or trunk soft tissue with a fat layer, air around the patient;
* variation: size, lordosis/kyphosis curve, small rotations, tissue densities, noise;
* per-vertebra findings: a fracture (a crack plane through the bone, or a compression
  wedge with anterior height loss) and a dislocation (translation of a vertebra and every
  vertebra above it).

Array axes are ``(z, y, x)``: ``z`` runs from head to feet (slice 0 is the most superior),
``y`` from anterior to posterior and ``x`` from the patient's right to left, so the
arrays map onto DICOM patient coordinates (LPS) with axial slices of orientation
``[1, 0, 0, 0, 1, 0]``.

Vertebra labels follow the RSNA 2022 cervical spine segmentations: C1..C7 are 1..7,
T1..T12 are 8..19 and L1..L5 are 20..24; 0 is everything else.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
)
#: Vertebra name -> voxel label (RSNA numbering).
LEVEL_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(LEVELS)}
CERVICAL: tuple[str, ...] = LEVELS[:7]

REGIONS: dict[str, tuple[str, ...]] = {
    "cervical": CERVICAL,
    "thoracic": LEVELS[7:19],
    "lumbar": LEVELS[19:],
    "thoracolumbar": LEVELS[16:],  # T10..L5
    "spine": LEVELS,
}

#: 3-D structure codes in :attr:`Phantom.structures`.
STRUCTURES: dict[int, str] = {
    1: "vertebral_body",
    2: "pedicle",
    3: "lamina",
    4: "spinous_process",
    5: "transverse_process",
    6: "intervertebral_disc",
    7: "spinal_canal",
    8: "prevertebral_soft_tissue",
    9: "c1_anterior_arch",
    10: "dens",
    11: "c1_lateral_mass",
    12: "c1_posterior_arch",
    13: "other_bone",
    14: "rib",
    15: "articular_pillar",
}
_BONE_CODES = (1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15)

#: Radiograph structure maps: view -> label value -> structure key (encoder keys).
AP_STRUCTURES: dict[int, str] = {1: "vertebral_body", 2: "pedicle", 3: "spinous_process"}
LAT_STRUCTURES: dict[int, str] = {
    1: "vertebral_body",
    2: "posterior_elements",
    3: "intervertebral_disc",
    4: "spinal_canal",
    5: "prevertebral_soft_tissue",
}
TISSUES: dict[int, str] = {1: "bone", 2: "soft_tissue", 3: "open_beam"}

# Which 3-D codes make up each 2-D structure, and the order they are painted in
# (later wins where projections overlap).
_AP_SOURCES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (1, (1, 10)),
    (3, (4,)),
    (2, (2,)),
)
_LAT_SOURCES: tuple[tuple[int, tuple[int, ...]], ...] = (
    (5, (8,)),
    (2, (2, 3, 4, 5, 11, 12, 15)),
    (4, (7,)),
    (3, (6,)),
    (1, (1, 10)),
)

FRACTURE_KINDS = ("crack", "wedge")
#: Forced CT fracture patterns of C2 (``generate(fractures={"C2": "dens"},
#: varied_fractures=True)``): drawn as a "crack" with the pattern's geometry (see
#: :func:`_c2_pattern`), so the vertebra's ``fracture`` is "crack".
C2_PATTERNS = ("dens", "hangman")
_CHUNK_VOXELS = 400_000  # local coordinates computed per slab of at most this many voxels
MU_WATER_PER_MM = 0.02  # linear attenuation of water near 70 keV effective energy


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _LevelShape:
    """Sizes (mm) of one vertebra type; half-widths unless named otherwise."""

    a: float  # body half-width (lateral)
    b: float  # body half-depth (antero-posterior)
    h: float  # body height
    canal_w: float  # canal half-width
    canal_d: float  # canal half-depth
    pedicle_len: float
    lamina_len: float
    spinous_len: float
    spinous_drop: float  # how far the spinous tip sits below its base
    transverse_len: float
    pedicle_r: float
    disc: float  # height of the disc below this vertebra
    prevertebral: float  # prevertebral soft tissue thickness


def _interp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _level_shape(name: str) -> _LevelShape:
    kind, number = name[0], int(name[1:])
    if kind == "C":
        t = (number - 2) / 5.0 if number >= 2 else 0.0
        return _LevelShape(
            a=_interp(8.5, 11.5, t), b=_interp(7.5, 8.5, t), h=16.0 if number == 2 else
            _interp(12.5, 14.0, t), canal_w=_interp(11.5, 11.0, t), canal_d=7.0,
            pedicle_len=5.5, lamina_len=9.0, spinous_len=_interp(11.0, 22.0, t) if number > 2
            else 14.0, spinous_drop=_interp(2.0, 6.0, t), transverse_len=_interp(7.0, 10.0, t),
            pedicle_r=2.6, disc=_interp(4.5, 5.5, t),
            prevertebral=4.0 if number <= 4 else _interp(8.0, 13.0, (number - 5) / 2.0),
        )
    if kind == "T":
        t = (number - 1) / 11.0
        return _LevelShape(
            a=_interp(12.5, 18.0, t), b=_interp(9.0, 14.5, t), h=_interp(15.5, 22.0, t),
            canal_w=_interp(8.5, 9.5, t), canal_d=8.0, pedicle_len=_interp(7.0, 9.0, t),
            lamina_len=11.0, spinous_len=_interp(24.0, 26.0, t),
            spinous_drop=_interp(14.0, 8.0, t), transverse_len=_interp(20.0, 10.0, t),
            pedicle_r=_interp(3.0, 4.0, t), disc=_interp(4.5, 7.0, t), prevertebral=6.0,
        )
    t = (number - 1) / 4.0
    return _LevelShape(
        a=_interp(20.0, 25.0, t), b=_interp(15.5, 17.5, t), h=_interp(24.5, 26.5, t),
        canal_w=_interp(11.0, 12.5, t), canal_d=9.0, pedicle_len=9.0, lamina_len=12.0,
        spinous_len=_interp(22.0, 20.0, t), spinous_drop=4.0, transverse_len=_interp(20.0, 24.0, t),
        pedicle_r=_interp(4.5, 6.5, t), disc=_interp(9.0, 11.0, t), prevertebral=8.0,
    )


@dataclass(frozen=True)
class Vertebra:
    """Where one vertebra of a phantom lies and what happened to it."""

    name: str
    label: int
    center_mm: tuple[float, float, float]  # (z, y, x) in array millimetres
    fracture: str | None = None  # None, "crack" or "wedge"
    dislocation: bool = False  # displaced (with all above it) over the vertebra below

    @property
    def fractured(self) -> bool:
        return self.fracture is not None


@dataclass
class Phantom:
    """A synthetic spine CT volume with its ground truth.

    Attributes
    ----------
    hu:
        ``(z, y, x)`` float32 volume in Hounsfield units.
    spacing:
        ``(z, y, x)`` voxel size in millimetres.
    labels:
        ``(z, y, x)`` uint8 vertebra labels (:data:`LEVEL_LABELS`), 0 elsewhere.
    structures:
        ``(z, y, x)`` uint8 structure codes (:data:`STRUCTURES`), 0 elsewhere.
    vertebrae:
        Every vertebra drawn (also partly visible ones), top to bottom.
    """

    seed: int
    region: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    labels: np.ndarray
    structures: np.ndarray
    vertebrae: tuple[Vertebra, ...]
    body_part: str = "CSPINE"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def vertebra(self, name: str) -> Vertebra:
        for vertebra in self.vertebrae:
            if vertebra.name == name:
                return vertebra
        raise KeyError(f"phantom has no vertebra {name!r}")

    def fractures(self, names: Sequence[str] = CERVICAL) -> np.ndarray:
        """0/1 fracture target per vertebra in ``names`` (absent vertebrae count as 0)."""
        present = {v.name: v for v in self.vertebrae}
        return np.array([int(n in present and present[n].fractured) for n in names], np.int64)

    def dislocations(self, names: Sequence[str] = CERVICAL) -> np.ndarray:
        present = {v.name: v for v in self.vertebrae}
        return np.array([int(n in present and present[n].dislocation) for n in names], np.int64)

    @property
    def fractured(self) -> bool:
        return any(v.fractured for v in self.vertebrae)

    @property
    def dislocated(self) -> bool:
        return any(v.dislocation for v in self.vertebrae)

    def radiograph(self, view: str, **kwargs: Any) -> Projection:
        """A DRR of this phantom (``"AP"`` or ``"LAT"``) with its structure masks."""
        return drr(self.hu, self.spacing, view, structures=self.structures,
                   labels=self.labels, **kwargs)


def _rot_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    # Axes are (x, y, z): a rotation in the y-z (sagittal) plane.
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# Solids: each returns the signed depth inside (mm, > 0 inside) for local points q (N, 3)
# given as columns u (lateral), v (antero-posterior, + posterior), w (+ inferior).


def _capsule(q: np.ndarray, p0: Sequence[float], p1: Sequence[float], r: float) -> np.ndarray:
    a0, a1, a2 = (float(x) for x in p0)
    d0, d1, d2 = (float(y) - float(x) for x, y in zip(p0, p1, strict=True))
    length2 = max(d0 * d0 + d1 * d1 + d2 * d2, 1e-9)
    du, dv, dw = q[:, 0] - a0, q[:, 1] - a1, q[:, 2] - a2
    t = np.clip((du * d0 + dv * d1 + dw * d2) / length2, 0.0, 1.0)
    du -= t * d0
    dv -= t * d1
    dw -= t * d2
    return r - np.sqrt(du * du + dv * dv + dw * dw)


def _ellipsoid(q: np.ndarray, c: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    s = np.asarray(semi, dtype=np.float64)
    rho = np.sqrt((((q - np.asarray(c)) / s) ** 2).sum(axis=1))
    return (1.0 - rho) * float(s.min())


def _sheared_block(q: np.ndarray, c: Sequence[float], semi: Sequence[float],
                   slope_deg: float) -> np.ndarray:
    """A rounded box (super-ellipsoid, exponent 4) whose top and bottom faces slope down
    posteriorly by ``slope_deg`` while its sides stay vertical: an articular pillar, whose
    facet joints face up and back. Along any vertical line it is ``2 * semi[2]`` tall."""
    u = (q[:, 0] - float(c[0])) / float(semi[0])
    dy = q[:, 1] - float(c[1])
    v = dy / float(semi[1])
    w = (q[:, 2] - float(c[2]) - dy * float(np.tan(np.deg2rad(slope_deg)))) / float(semi[2])
    rho = (u ** 4 + v ** 4 + w ** 4) ** 0.25
    return (1.0 - rho) * float(min(semi))


def _elliptic_cylinder(q: np.ndarray, cu: float, cv: float, au: float, av: float,
                       w0: float, w1: float) -> np.ndarray:
    rho = np.sqrt(((q[:, 0] - cu) / au) ** 2 + ((q[:, 1] - cv) / av) ** 2)
    radial = (1.0 - rho) * min(au, av)
    vertical = np.minimum(q[:, 2] - w0, w1 - q[:, 2])
    return np.minimum(radial, vertical)


def _body(q: np.ndarray, a: float, b: float, h: float, concavity: float,
          wedge_loss: float, crush: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Vertebral body; the top end plate sinks by ``wedge_loss * h`` at the front, and by
    ``crush`` = (everywhere, extra at the centre) fractions of ``h`` in a compression."""
    rho2 = (q[:, 0] / a) ** 2 + (q[:, 1] / b) ** 2
    radial = (1.0 - np.sqrt(rho2)) * min(a, b)
    dish = concavity * np.clip(1.0 - rho2, 0.0, 1.0)
    anterior = np.clip((1.0 - q[:, 1] / b) / 2.0, 0.0, 1.0)
    top = -h / 2 + dish + wedge_loss * h * anterior
    if crush != (0.0, 0.0):
        top = top + h * (crush[0] + crush[1] * np.clip(1.0 - rho2, 0.0, 1.0))
    bottom = h / 2 - dish
    return np.minimum(radial, np.minimum(q[:, 2] - top, bottom - q[:, 2]))


#: Where the textbook C1's transverse process tips sit (mm off the midline, before its scale).
_C1_TRANSVERSE_MM = 30.0


@dataclass
class _Placed:
    name: str
    label: int
    shape: _LevelShape
    center: np.ndarray  # (x, y, z) mm
    rotation: np.ndarray  # local -> array frame, axes (x, y, z)
    fracture: str | None = None
    wedge_loss: float = 0.0
    crush: tuple[float, float] = (0.0, 0.0)  # see _body
    crack: tuple[np.ndarray, float, float, float] | None = None  # normal, offset, width, shift
    #: Unit direction of the crack's shift (in the crack plane); None: the default tangent.
    slide_direction: np.ndarray | None = None
    dislocation: bool = False
    #: the crack cuts the posterior elements too (pedicles, laminae), not only the body/ring
    crack_posterior: bool = False
    #: a second fracture line without displacement (e.g. the second break of a C1 ring)
    crack2: tuple[np.ndarray, float, float] | None = None  # normal, offset, width
    #: An incomplete fracture (:func:`_local_crack`): the crack and its shift stop at this
    #: ball (centre in the vertebra's frame, radius mm); None: the plane cuts right through.
    crack_ball: tuple[np.ndarray, float] | None = None
    ribs: bool = False
    #: Anatomical variation (:class:`_Variation`): bifid spinous process, C1 ring and
    #: dens size factors.
    bifid: bool = False
    c1_scale: float = 1.0
    dens_scale: tuple[float, float] = (1.0, 1.0)  # length, radius
    #: Articular pillars (``posterior_detail``): (facet slope deg, half-width, half-depth mm).
    pillars: tuple[float, float, float] | None = None
    c1_transverse: float = _C1_TRANSVERSE_MM  # C1's transverse process tips (mm off the midline)


@dataclass(frozen=True)
class _Variation:
    """Domain randomisation of the anatomy and its densities (``varied_anatomy=True``).

    Drawn from its own random stream (seeded from the phantom's seed), so phantoms drawn
    without it stay as they were. The ranges cover adult anatomy and scanners rather than
    one textbook spine: body proportions, disc heights (narrowed in spondylosis), canal
    size, process lengths, a bifid or single spinous process, C1 ring and dens size;
    cortical 450-1800 HU over cancellous 90-450 HU (osteoporotic to dense) with a
    trabecular texture; muscle with fat planes; neck width; unlabelled dense neighbours
    (hyoid, calcified laryngeal cartilage, contrast-filled or calcified arteries) that a
    model must not take for vertebrae.
    """

    factors: dict[str, float]
    jitter: float
    narrowed: dict[str, float]
    c1_scale: float
    dens_scale: tuple[float, float]
    bifid: bool
    curve_mm: float
    cortical: float
    cancellous: float
    cortex_mm: float
    trabecular_hu: float
    soft: float
    fat: float
    muscle_texture_hu: float
    neck_scale: tuple[float, float]
    hyoid: bool
    larynx_hu: float | None
    arteries_hu: float | None
    seed: int
    #: ``posterior_detail``: spinous processes sloping down by this angle (degrees below
    #: the horizontal; None: the textbook drop), lengthened by (C2 and C7-T3, C3-C6)
    #: factors, and articular pillars (facet slope deg, half-width, half-depth mm).
    spinous_slope_deg: float | None = None
    spinous_long: tuple[float, float] = (1.0, 1.0)
    pillars: tuple[float, float, float] | None = None
    #: ``posterior_detail``: transverse processes longer by (C2-C6, C7, C1) factors.
    transverse_long: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @classmethod
    def draw(cls, seed: int, names: Sequence[str], posterior: bool = False) -> _Variation:
        extra: dict[str, Any] = {}
        if posterior:
            # Its own stream, so the draws below are the same with or without it.
            p = np.random.default_rng([seed, 0x5A19]).uniform
            extra = dict(spinous_slope_deg=float(p(12.0, 42.0)),
                         spinous_long=(float(p(1.1, 1.6)), float(p(0.95, 1.4))),
                         pillars=(float(p(28.0, 55.0)), float(p(3.5, 5.5)), float(p(4.0, 6.5))),
                         transverse_long=(float(p(1.25, 1.75)), float(p(1.5, 2.0)),
                                          float(p(1.1, 1.35))))
        rng = np.random.default_rng([seed, 0x5A17])
        u = rng.uniform
        factors = {"a": u(0.82, 1.2), "b": u(0.82, 1.2), "h": u(0.85, 1.2), "disc": u(0.65, 1.4),
                   "canal_w": u(0.9, 1.3), "canal_d": u(0.9, 1.35), "pedicle_len": u(0.8, 1.3),
                   "lamina_len": u(0.8, 1.25), "spinous_len": u(0.7, 1.3),
                   "spinous_drop": u(0.5, 1.6), "transverse_len": u(0.7, 1.3),
                   "pedicle_r": u(0.8, 1.3), "prevertebral": u(0.7, 1.5)}
        discs = [n for n in names if n.startswith("C") and n not in ("C1",)]
        narrowed: dict[str, float] = {}
        if discs and rng.random() < 0.4:
            for name in rng.choice(discs, size=int(rng.integers(1, min(3, len(discs)) + 1)),
                                   replace=False):
                narrowed[str(name)] = float(u(0.3, 0.65))
        return cls(
            factors={k: float(v) for k, v in factors.items()}, jitter=float(u(0.0, 0.08)),
            narrowed=narrowed, c1_scale=float(u(0.85, 1.2)),
            dens_scale=(float(u(0.8, 1.3)), float(u(0.8, 1.2))), bifid=bool(rng.random() < 0.5),
            curve_mm=float(u(-3.0, 16.0)), cortical=float(u(450.0, 1800.0)),
            cancellous=float(u(90.0, 450.0)), cortex_mm=float(u(0.6, 2.2)),
            trabecular_hu=float(u(0.0, 90.0)), soft=float(u(20.0, 70.0)),
            fat=float(u(-130.0, -60.0)), muscle_texture_hu=float(u(0.0, 25.0)),
            neck_scale=(float(u(0.85, 1.3)), float(u(0.85, 1.25))),
            hyoid=bool(rng.random() < 0.7),
            larynx_hu=float(u(150.0, 700.0)) if rng.random() < 0.5 else None,
            arteries_hu=(float(u(250.0, 500.0)) if rng.random() < 0.2
                         else float(u(600.0, 1200.0)) if rng.random() < 0.2 else None),
            seed=int(seed), **extra,
        )

    def shape(self, name: str, ls: _LevelShape) -> _LevelShape:
        rng = np.random.default_rng([self.seed, 0x5A18, LEVEL_LABELS[name]])
        values = {}
        for key, value in ls.__dict__.items():
            factor = self.factors.get(key, 1.0) * float(rng.uniform(1 - self.jitter, 1 + self.jitter))
            if key == "h" and name == "C2":
                factor *= self.dens_scale[0] ** 0.5
            if key == "disc" and name in self.narrowed:
                factor *= self.narrowed[name]
            values[key] = value * factor
        if self.spinous_slope_deg is not None and name != "C1":
            # Real spinous processes slope down and back: C2's (bifid, massive) nearly
            # straight back, steeper down the neck, the upper thoracic ones steepest; C2's,
            # C7's (vertebra prominens) and the thoracic ones the longest.
            long_ = name in ("C2", "C7") or name.startswith("T")
            length = min(values["spinous_len"] * self.spinous_long[0 if long_ else 1], 48.0)
            slope = (self.spinous_slope_deg * _SPINOUS_SLOPE_SHARE.get(name, 1.0)
                     + (12.0 if name.startswith("T") else 0.0) + float(rng.uniform(-5.0, 5.0)))
            values["spinous_len"] = length
            values["spinous_drop"] = length * float(np.tan(np.deg2rad(min(slope, 60.0))))
            if name.startswith("C"):
                # Real cervical transverse processes span 50-60 mm tip to tip, C7's ~70.
                values["transverse_len"] *= self.transverse_long[1 if name == "C7" else 0]
        return _LevelShape(**values)


#: Share of a spine's spinous-process slope (``posterior_detail``) each level takes.
_SPINOUS_SLOPE_SHARE = {"C2": 0.4, "C3": 0.7, "C4": 0.8, "C5": 0.9}


def _pick_fractures(rng: np.random.Generator, names: Sequence[str], p_fracture: float,
                    cervical: bool, skip: Sequence[str] = ()) -> list[str]:
    if rng.random() >= p_fracture:
        return []
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    if cervical:
        weights = np.array([0.10, 0.25, 0.08, 0.08, 0.12, 0.17, 0.20])
    else:
        weights = np.ones(len(names))
    weights = weights[: len(names)].copy()
    weights[[i for i, name in enumerate(names) if name in skip]] = 0.0
    weights = weights / weights.sum()
    count = min(count, int((weights > 0).sum()))
    chosen = rng.choice(len(names), size=min(count, len(names)), replace=False, p=weights)
    return [names[int(i)] for i in sorted(chosen)]


def generate(
    seed: int,
    *,
    region: str = "cervical",
    shape: tuple[int, int, int] | None = None,
    spacing: float | tuple[float, float, float] | None = None,
    p_fracture: float = 0.5,
    p_dislocation: float = 0.15,
    fractures: dict[str, str] | None = None,
    dislocation: str | None = None,
    noise_hu: float | None = None,
    radiographic_findings: bool = False,
    context: bool = False,
    size_scale: float | None = None,
    pose_deg: tuple[float, float, float] | None = None,
    varied_fractures: bool = False,
    varied_anatomy: bool = False,
    posterior_detail: bool = False,
    airway_hu: float = -1000.0,
    local_cracks: float = 0.0,
) -> Phantom:
    """Draw a phantom from ``seed``.

    Parameters
    ----------
    seed:
        Everything random (anatomy, pose, findings, noise) is drawn from it.
    region:
        ``"cervical"`` (C1..C7, with the skull base above and T1-T2 below, unlabelled
        context for stage 1 is kept as labels 8-9), ``"thoracic"``, ``"lumbar"``,
        ``"thoracolumbar"`` (T10..L5) or ``"spine"`` (C1..L5).
    shape, spacing:
        Output grid ``(z, y, x)`` and voxel size in mm. Defaults: cervical
        ``(80, 64, 64)`` at 2 mm; other regions fit the levels at 3 mm. For a clinical
        grid use e.g. ``shape=(200, 512, 512), spacing=(0.8, 0.3, 0.3)`` (cervical).
    p_fracture, p_dislocation:
        Chance that the phantom has at least one fracture / one dislocation.
    fractures, dislocation:
        Force findings instead: ``{"C5": "wedge", "C2": "crack"}`` and a level name;
        give ``fractures={}`` for a phantom without fractures.
    noise_hu:
        Standard deviation of the added noise (default: drawn from 8..20 HU).
    radiographic_findings:
        Draw only findings that a plain radiograph shows, as in X-ray datasets whose
        labels were read from the radiographs: no C1 ring fractures (mostly occult on
        plain films); compressions that lose 25-50 % of the body height at the front
        and at the centre; cracks as displaced, nearly transverse fracture lines through
        a C2-C7 body (a 2.5-4 mm gap and a 1.5-3 mm step-off, sharp on the AP and the
        LAT view); dislocations of 4-8 mm anterior and 1-3 mm lateral translation. The
        default draws the CT cohort: cracks in every orientation, milder anterior wedges
        and C1 ring fractures, many of them invisible on a radiograph. The same seed
        gives a different phantom in each cohort.
    context:
        Cervical only: the anatomy around the neck as a real scan shows it - T1-T3 with
        their ribs (the first rib marks T1), the shoulders and lung apices around them, and
        the cranium with brain above the skull base, so a field of view may start and stop
        anywhere from the skull to T3. The default keeps the classic phantom (T1-T2, an
        occipital plate and the mandible).
    size_scale:
        Patient size factor (default drawn from 0.9..1.08).
    pose_deg:
        Head/neck rotation (axial, lateral bend, flexion) in degrees (default drawn within
        +-6, +-4, +-5).
    varied_fractures:
        CT cohort only: fracture lines 1.2-3.5 mm wide that may run through the posterior
        elements too (pedicles, laminae: e.g. a hangman's fracture of C2), two breaks of
        the C1 ring (Jefferson) as well as one, and compressions that lose height centrally
        as well as anteriorly (burst-like).
    varied_anatomy:
        Domain randomisation for training (:class:`_Variation`): vertebra proportions,
        discs, canal, processes (bifid or not), C1 ring and dens size, curve, bone
        densities and texture, muscle texture, neck width and dense unlabelled neighbours
        (hyoid, laryngeal cartilage, arteries). Drawn from a stream of its own, so the
        rest of the phantom (pose, findings, noise) is the same with or without it.
    posterior_detail:
        With ``varied_anatomy``: posterior elements closer to real ones - articular pillars
        C2-T1 (columns behind the pedicles with facet joints sloping down and back 28-55
        degrees), spinous processes sloping down 12-42 degrees at C6-C7 (C2 0.4 of that,
        C3-C5 0.7-0.9, thoracic 12 more), C2's, C7's and the thoracic ones 1.1-1.6 times
        longer, and cervical transverse processes 1.25-2 times longer (C1's 1.1-1.35).
        Drawn from a stream of its own: the rest of the phantom is the same with or
        without it.
    airway_hu:
        Cervical only: what fills the pharynx and trachea (default air, -1000 HU). Values
        near soft tissue make the airway faint or invisible: domain randomisation for a
        model that must not tell a lateral from a frontal radiograph by the airway alone
        (the view gate did: with the airway filled it read 11 of 30 lateral views as AP).
        Draws nothing: the rest of the phantom is the same.
    local_cracks:
        With ``varied_fractures``: the share of C2-C7 fracture lines drawn as incomplete
        fractures confined to one part of the vertebra (:func:`_local_crack`: one pedicle,
        lamina, articular pillar, transverse or spinous process, a corner of the body or
        part of it) instead of a plane through the whole bone. Drawn from a stream of its
        own per level, so the rest of the phantom (which levels are broken included) is
        the same for any share; 0 draws nothing.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {sorted(REGIONS)}")
    rng = np.random.default_rng(seed)
    cervical = region == "cervical"
    names = list(REGIONS[region])
    drawn = list(names)
    if cervical:
        drawn += ["T1", "T2", "T3"] if context else ["T1", "T2"]
    elif region == "thoracolumbar":
        drawn = ["T9", *drawn]

    if spacing is None:
        spacing = 2.0 if cervical else 3.0
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * 3
    sz, sy, sx = (float(s) for s in spacing)
    if min(sz, sy, sx) <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")

    scale = float(rng.uniform(0.9, 1.08))
    if size_scale is not None:
        scale = float(size_scale)
    shapes = {n: _level_shape(n) for n in drawn}
    if posterior_detail and not varied_anatomy:
        raise ValueError("posterior_detail is part of varied_anatomy: pass both")
    variation = _Variation.draw(seed, drawn, posterior=posterior_detail) if varied_anatomy else None
    if variation is not None:
        shapes = {n: variation.shape(n, ls) for n, ls in shapes.items()}

    # Lengths along the spine (mm), top to bottom: centre of each vertebra.
    centres_s: dict[str, float] = {}
    s = 0.0
    previous: str | None = None
    for name in drawn:
        ls = shapes[name]
        if name == "C1":
            s = 5.0
        elif name == "C2":
            # The C1 ring (10 mm tall) sits around the dens, above the C2 body.
            c1_half = 5.0 * (variation.c1_scale if variation is not None else 1.0)
            s = centres_s["C1"] + (c1_half + 3.0 + ls.h / 2) * scale
        elif previous is None:
            s = ls.h / 2 * scale
        else:
            prev = shapes[previous]
            s = centres_s[previous] + (prev.h / 2 + prev.disc + ls.h / 2) * scale
        centres_s[name] = s
        previous = name
    length = centres_s[drawn[-1]] + shapes[drawn[-1]].h / 2 * scale

    if shape is None:
        if cervical and context:
            shape = (int(np.ceil(260.0 / sz)), int(np.ceil(170.0 / sy)), int(np.ceil(170.0 / sx)))
        elif cervical:
            shape = (80, 64, 64)
        else:
            widest = max(shapes[n].a for n in drawn)
            nz = int(np.ceil((length + 40.0) / sz))
            ny = int(np.ceil((7.0 * widest + 60.0) / sy))
            nx = int(np.ceil((8.0 * widest + 80.0) / sx))
            shape = (nz, ny, nx)
    nz, ny, nx = (int(n) for n in shape)
    extent = np.array([nx * sx, ny * sy, nz * sz])  # (x, y, z) mm

    # Pose: where the spine sits, its curve and small rotations.
    top_margin = float(rng.uniform(10.0, 16.0)) if cervical else float(rng.uniform(12.0, 25.0))
    if cervical and context:
        top_margin += 60.0  # room for the cranium above the skull base
    if not cervical and length + 2 * top_margin < extent[2]:
        top_margin = (extent[2] - length) / 2 + float(rng.uniform(-5, 5))
    body_y = extent[1] / 2 + (float(rng.uniform(4.0, 10.0)) if cervical else 20.0)
    centre_x = extent[0] / 2 + float(rng.uniform(-4.0, 4.0))
    curve = float(rng.uniform(3.0, 10.0))  # lordosis (cervical, lumbar) / kyphosis (thoracic)
    if variation is not None:
        curve = variation.curve_mm  # from kyphotic (straightened, reversed) to deep lordosis
    span = max(length, 1.0)
    axial = np.deg2rad(rng.uniform(-6.0, 6.0))
    lateral = np.deg2rad(rng.uniform(-4.0, 4.0))
    flexion = np.deg2rad(rng.uniform(-5.0, 5.0))
    if pose_deg is not None:
        axial, lateral, flexion = (float(np.deg2rad(a)) for a in pose_deg)
    r_global = _rot_z(axial) @ _rot_y(lateral) @ _rot_x(flexion)
    pivot = np.array([centre_x, body_y, top_margin + span / 2])

    def curve_offset(s_mm: float) -> tuple[float, float]:
        phase = np.pi * s_mm / span
        sign = -1.0  # lordosis: the middle of the curve bows anteriorly (-y)
        if not cervical and region != "lumbar":
            sign = 1.0 if region == "thoracic" else -1.0
        return sign * curve * np.sin(phase), sign * curve * np.pi / span * np.cos(phase)

    # Findings.
    if fractures is None:
        fractured = _pick_fractures(rng, names, p_fracture, cervical,
                                    skip=("C1",) if radiographic_findings else ())
        fracture_kind = {}
        for name in fractured:
            if name == "C1":
                fracture_kind[name] = "crack"
            else:
                p_wedge = 0.5 if radiographic_findings else 0.3 if cervical else 0.6
                fracture_kind[name] = "wedge" if rng.random() < p_wedge else "crack"
    else:
        for name, kind in fractures.items():
            if kind in C2_PATTERNS and (name != "C2" or not varied_fractures):
                raise ValueError(f"bad forced fracture {name}={kind}: {', '.join(C2_PATTERNS)} are "
                                 "C2 patterns of the CT cohort (varied_fractures=True)")
            if name not in names or kind not in FRACTURE_KINDS + C2_PATTERNS:
                raise ValueError(f"bad forced fracture {name}={kind}: level in {names}, kind in "
                                 f"{FRACTURE_KINDS}")
            if name == "C1" and kind == "wedge":
                raise ValueError("C1 has no body to wedge; use 'crack'")
        fracture_kind = dict(fractures)
    if dislocation is None:
        candidates = [n for n in names if n != "C1"]
        dislocated = str(rng.choice(candidates)) if rng.random() < p_dislocation else None
        if dislocated == drawn[-1]:
            # The lowest vertebra drawn has none below to slide over (thoracic and lumbar
            # regions draw nothing below their levels): the joint above it instead.
            dislocated = drawn[-2]
    else:
        if dislocation not in names or dislocation == "C1" or dislocation == drawn[-1]:
            raise ValueError(f"bad forced dislocation level {dislocation!r}")
        dislocated = dislocation
    shift_mm = lateral_mm = 0.0
    if dislocated and radiographic_findings:
        shift_mm = float(rng.uniform(4.0, 8.0))
        lateral_mm = float(rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 3.0))
    elif dislocated:
        shift_mm = float(rng.uniform(3.5, 7.0))

    placed: list[_Placed] = []
    #: each fractured level's pattern: its kind ("crack", "wedge"), or finer where the
    #: draw says more ("dens base", "dens II", "dens III", "hangman", "burst")
    patterns: dict[str, str] = {}
    for name in drawn:
        ls = shapes[name]
        s_mm = centres_s[name]
        dy, slope = curve_offset(s_mm)
        tilt = np.arctan(slope) + np.deg2rad(rng.uniform(-2.5, 2.5))
        jitter = (_rot_z(np.deg2rad(rng.uniform(-2.0, 2.0)))
                  @ _rot_y(np.deg2rad(rng.uniform(-1.5, 1.5))))
        local_centre = np.array([0.0, dy, s_mm - span / 2]) + pivot
        centre = r_global @ (local_centre - pivot) + pivot
        rotation = r_global @ _rot_x(-tilt) @ jitter
        size = scale * float(rng.uniform(0.96, 1.04))
        ls = _LevelShape(**{k: v * size for k, v in ls.__dict__.items()})
        item = _Placed(name, LEVEL_LABELS[name], ls, centre, rotation,
                       ribs=context and name.startswith("T"))
        if variation is not None:
            item.bifid = variation.bifid and name in ("C2", "C3", "C4", "C5", "C6")
            item.c1_scale, item.dens_scale = variation.c1_scale, variation.dens_scale
            if variation.pillars is not None and name in _PILLAR_LEVELS:
                item.pillars = variation.pillars
            item.c1_transverse = _C1_TRANSVERSE_MM * variation.transverse_long[2]
        kind = fracture_kind.get(name)
        if kind is not None:
            patterns[name] = kind
        if kind == "wedge" and radiographic_findings:
            # Compression: the top end plate sinks everywhere, more at the centre and most
            # at the front (25-50 % of the height there), so the AP view shows it too.
            everywhere = float(rng.uniform(0.05, 0.15))
            item.fracture, item.wedge_loss = "wedge", float(rng.uniform(0.20, 0.35))
            item.crush = (everywhere, float(rng.uniform(0.10, 0.20)))
        elif kind == "wedge" and varied_fractures and rng.random() < 0.4:
            # Burst-like: the end plate sinks centrally and everywhere, less at the front.
            patterns[name] = "burst"
            item.fracture, item.wedge_loss = "wedge", float(rng.uniform(0.0, 0.15))
            item.crush = (float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.1, 0.25)))
        elif kind == "wedge":
            item.fracture, item.wedge_loss = "wedge", float(rng.uniform(0.22, 0.45))
        elif kind == "crack" and radiographic_findings and name != "C1":
            # A displaced, nearly transverse fracture line through the body: the plane
            # holds both beam directions (x for LAT, y for AP) within 7 degrees.
            item.fracture = "crack"
            normal = np.array([rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12), 1.0])
            normal = normal / np.linalg.norm(normal)
            offset = float(rng.uniform(-0.3, 0.3) * ls.h / 2)
            item.crack = (normal, offset, float(rng.uniform(2.5, 4.0)),
                          float(rng.uniform(1.5, 3.0)))
            first = np.cross(normal, [1.0, 0.0, 0.0])
            first /= np.linalg.norm(first)
            angle = float(rng.uniform(0.0, 2.0 * np.pi))
            item.slide_direction = (np.cos(angle) * first
                                    + np.sin(angle) * np.cross(normal, first))
        elif kind in C2_PATTERNS:
            patterns[name] = _c2_pattern(rng, item, ls, kind)
        elif kind == "crack" and varied_fractures:
            _varied_crack(rng, item, ls)
            if local_cracks > 0 and name.startswith("C") and name != "C1":
                own = np.random.default_rng([seed, 0x10CA1, LEVEL_LABELS[name]])
                if own.random() < local_cracks:
                    _local_crack(own, item, ls)
        elif kind == "crack":
            item.fracture = "crack"
            if name == "C1":
                normal = np.array([1.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.2)])
                offset = float(rng.choice([-1, 1]) * rng.uniform(3.0, 8.0))
            elif name == "C2" and rng.random() < 0.5:
                normal = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3), 1.0])
                offset = -ls.h / 2 - float(rng.uniform(1.0, 3.0))  # base of the dens
                patterns[name] = "dens base"
            else:
                axis = int(rng.integers(0, 3))
                normal = rng.uniform(-0.35, 0.35, size=3)
                normal[axis] = 1.0
                extent_axis = (ls.a, ls.b, ls.h / 2)[axis]
                offset = float(rng.uniform(-0.4, 0.4) * extent_axis)
            normal = normal / np.linalg.norm(normal)
            item.crack = (normal, offset, float(rng.uniform(2.0, 3.5)),
                          float(rng.uniform(0.0, 1.5)))
        placed.append(item)

    if dislocated:
        index = drawn.index(dislocated)
        below = placed[index + 1]
        shift = below.rotation @ np.array([lateral_mm, -shift_mm, 0.0])
        for item in placed[: index + 1]:
            item.center = item.center + shift
        placed[index].dislocation = True

    hu, labels, structures, params = _rasterise(
        rng, placed, (nz, ny, nx), (sz, sy, sx), cervical, region, body_y, centre_x,
        top_margin, dislocated, shift_mm, context=context, variation=variation,
        airway_hu=airway_hu,
    )
    sigma = float(noise_hu) if noise_hu is not None else float(rng.uniform(8.0, 20.0))
    blur = [0.6 / s for s in (sz, sy, sx)]
    hu = ndimage.gaussian_filter(hu, blur, mode="nearest")
    for k in range(hu.shape[0]):
        hu[k] += rng.normal(0.0, sigma, size=hu.shape[1:]).astype(np.float32)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    params.update(fracture_patterns=patterns, scale=scale, curve_mm=curve, noise_hu=sigma,
                  dislocation_mm=shift_mm, dislocation_lateral_mm=lateral_mm,
                  radiographic_findings=radiographic_findings,
                  rotation_deg=[float(np.rad2deg(x)) for x in (axial, lateral, flexion)])

    vertebrae = tuple(
        Vertebra(
            name=item.name,
            label=item.label,
            center_mm=(float(item.center[2]), float(item.center[1]), float(item.center[0])),
            fracture=item.fracture,
            dislocation=item.dislocation,
        )
        for item in placed
        if (labels == item.label).any()
    )
    body_parts = {"cervical": "CSPINE", "thoracic": "TSPINE", "lumbar": "LSPINE"}
    body_part = body_parts.get(region, "SPINE")
    return Phantom(seed=seed, region=region, hu=hu.astype(np.float32), spacing=(sz, sy, sx),
                   labels=labels, structures=structures, vertebrae=vertebrae,
                   body_part=body_part, params=params)


_Solid = tuple[int, bool, Callable[[np.ndarray], np.ndarray]]


def _parts(item: _Placed) -> list[_Solid]:
    """Bone solids of one vertebra: (structure code, cut by a crack, depth function)."""
    ls = item.shape
    a, b, h = ls.a, ls.b, ls.h
    pr = ls.pedicle_r
    ped_x = ls.canal_w + 0.4 * pr
    ped_end = b + ls.pedicle_len
    lam_end = ped_end + ls.lamina_len * 0.8
    lam_r = 0.75 * pr

    def capsule(code: int, cut: bool, p0: Sequence[float], p1: Sequence[float],
                r: float) -> _Solid:
        return code, cut, partial(_capsule, p0=p0, p1=p1, r=r)

    parts: list[_Solid] = []
    if item.name == "C1":
        k = item.c1_scale
        front = -b - 3.0 * k
        parts.append(capsule(9, True, (-7.0 * k, front, 0.0), (7.0 * k, front, 0.0), 2.6 * k))
        for s in (-1.0, 1.0):
            parts += [
                capsule(9, True, (s * 7.0 * k, front, 0), (s * 13.0 * k, -b + 3.0 * k, 0), 2.6 * k),
                (11, True, partial(_ellipsoid, c=(s * 14.5 * k, 0.5 * k, 0.0),
                                   semi=(5.5 * k, 8.0 * k, 5.0 * k))),
                capsule(12, True, (s * 15.0 * k, 5.0 * k, 0.0), (s * 10.0 * k, b + 15.0 * k, 0.5),
                        2.8 * k),
                capsule(12, True, (s * 10.0 * k, b + 15.0 * k, 0.5), (0.0, b + 20.0 * k, 1.0), 2.8 * k),
                capsule(5, False, (s * 16.0 * k, 0.0, 0.0), (s * item.c1_transverse * k, 1.0, 1.0),
                        3.0 * k),
            ]
        return parts

    parts.append((1, True, partial(_body, a=a, b=b, h=h, concavity=0.9,
                                   wedge_loss=item.wedge_loss, crush=item.crush)))
    if item.name == "C2":
        length, radius = item.dens_scale
        parts.append(capsule(10, True, (0.0, -1.5, -h / 2 + 2.0), (0.0, -1.5, -h / 2 - 13.0 * length),
                             4.8 * radius))
    for s in (-1.0, 1.0):
        root = (s * 0.75 * a, 0.75 * b, 0.0)
        parts.append(capsule(2, False, root, (s * ped_x, ped_end, 0.0), pr))
        for dw in (-0.22 * h, 0.22 * h):
            lamina = ((s * ped_x, ped_end, dw), (0.0, lam_end, dw + 1.0))
            parts.append(capsule(3, False, *lamina, lam_r))
        tip = (s * (ped_x + ls.transverse_len), 0.35 * b, 0.0)
        parts.append(capsule(5, False, (s * 0.8 * a, 0.2 * b, -0.1 * h), tip, 0.85 * pr))
    spinous_tip = (0.0, lam_end + ls.spinous_len, ls.spinous_drop)
    if item.bifid:
        # Two tubercles splitting from the middle of the process (C2-C6 in most people).
        mid = (0.0, lam_end + 0.45 * ls.spinous_len, 0.45 * ls.spinous_drop)
        parts.append(capsule(4, False, (0.0, lam_end - 1.0, 0.0), mid, 0.95 * pr))
        for s in (-1.0, 1.0):
            tip = (s * (2.0 + 0.12 * ls.spinous_len), spinous_tip[1], spinous_tip[2])
            parts.append(capsule(4, False, mid, tip, 0.75 * pr))
    else:
        parts.append(capsule(4, False, (0.0, lam_end - 1.0, 0.0), spinous_tip, 0.95 * pr))
    if item.pillars is not None:
        parts += _pillars(item, ped_x, ped_end)
    if item.ribs:
        parts += _ribs(item.name, (ped_x + ls.transverse_len, 0.35 * b))
    return parts


#: Levels that get articular pillars with ``posterior_detail`` (C1 has lateral masses).
_PILLAR_LEVELS = ("C2", "C3", "C4", "C5", "C6", "C7", "T1")


def _pillars(item: _Placed, ped_x: float, ped_end: float) -> list[_Solid]:
    """The articular pillars behind the pedicles: a column on each side, one vertebra tall
    (disc included) less a facet joint space, its facets sloping down and back. C2 has
    only the inferior half (its superior facets sit on the body, beside the dens); the
    cervico-thoracic facets of T1 stand steeper."""
    assert item.pillars is not None
    slope, half_w, half_d = item.pillars
    ls = item.shape
    half_h = (ls.h + ls.disc) / 2 - 0.8
    centre_z = 0.0
    if item.name == "C2":
        half_h = (ls.h + ls.disc) / 4 - 0.4
        centre_z = (ls.h + ls.disc) / 4
    elif item.name == "T1":
        slope = min(slope + 20.0, 70.0)
    solids: list[_Solid] = []
    for s in (-1.0, 1.0):
        centre = (s * (ped_x + 0.4 * half_w), ped_end + 0.3 * half_d, centre_z)
        solids.append((15, False, partial(_sheared_block, c=centre, semi=(half_w, half_d, half_h),
                                          slope_deg=slope)))
    return solids


def _ribs(name: str, tip: tuple[float, float]) -> list[_Solid]:
    """A pair of ribs from the transverse process tips: an arc running back, out, then
    forwards and down (the first rib, of T1, is the shortest and most curved)."""
    number = int(name[1:])
    rx = {1: 46.0, 2: 56.0}.get(number, 64.0)
    ry = {1: 40.0, 2: 46.0}.get(number, 52.0)
    radius = 3.2 if number == 1 else 2.8
    phis = np.linspace(0.3 * np.pi, (0.88 if number == 1 else 0.8) * np.pi, 6)
    solids: list[_Solid] = []
    for s in (-1.0, 1.0):
        points = [(s * tip[0], tip[1], 0.0)]
        points += [(s * rx * float(np.sin(p)), ry * float(np.cos(p)) + 4.0,
                    22.0 * float(p - phis[0]) / np.pi) for p in phis]
        for p0, p1 in zip(points[:-1], points[1:], strict=True):
            solids.append((14, False, partial(_capsule, p0=p0, p1=p1, r=radius)))
    return solids


def _varied_crack(rng: np.random.Generator, item: _Placed, ls: _LevelShape) -> None:
    """A CT fracture line as :func:`generate` documents for ``varied_fractures``."""
    item.fracture = "crack"
    width = float(rng.uniform(1.2, 3.5))
    slide = float(rng.uniform(0.0, 2.0))
    if item.name == "C1":
        # Ring breaks, one or two (Jefferson), anywhere around the ring.
        angles = rng.uniform(0.0, 2.0 * np.pi, size=2)
        normals = [np.array([np.cos(a), np.sin(a), rng.uniform(-0.2, 0.2)]) for a in angles]
        normals = [n / np.linalg.norm(n) for n in normals]
        offset = float(rng.choice([-1, 1]) * rng.uniform(3.0, 9.0))
        item.crack = (normals[0], offset, width, slide)
        if rng.random() < 0.5:
            item.crack2 = (normals[1], float(rng.choice([-1, 1]) * rng.uniform(3.0, 9.0)), width)
        item.crack_posterior = True
        return
    if item.name == "C2" and rng.random() < 0.35:
        # Through both pedicles / pars (hangman's) or the base of the dens.
        if rng.random() < 0.5:
            normal = np.array([rng.uniform(-0.15, 0.15), 1.0, rng.uniform(-0.3, 0.3)])
            offset = ls.b + float(rng.uniform(1.0, 4.0))
            item.crack_posterior = True
        else:
            normal = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3), 1.0])
            offset = -ls.h / 2 - float(rng.uniform(1.0, 3.0))
        item.crack = (normal / np.linalg.norm(normal), offset, width, slide)
        return
    axis = int(rng.integers(0, 3))
    normal = rng.uniform(-0.4, 0.4, size=3)
    normal[axis] = 1.0
    extent_axis = (ls.a, ls.b, ls.h / 2)[axis]
    item.crack = (normal / np.linalg.norm(normal), float(rng.uniform(-0.45, 0.45) * extent_axis),
                  width, slide)
    item.crack_posterior = bool(rng.random() < 0.4)


#: Where an incomplete fracture (:func:`_local_crack`) sits, and how often.
LOCAL_CRACK_SITES: dict[str, float] = {
    "pedicle": 0.15, "lamina": 0.15, "pillar": 0.1, "spinous": 0.15, "transverse": 0.1,
    "corner": 0.15, "body": 0.2}


def _local_crack(rng: np.random.Generator, item: _Placed, ls: _LevelShape) -> None:
    """An incomplete, barely displaced fracture confined to one part of the vertebra.

    Many real cervical fractures do not cross the whole bone: one pedicle or lamina, an
    articular pillar or facet, a transverse or spinous process (clay-shoveler's), a
    corner of the body (teardrop) or part of the body. The crack is a plane through a
    point of that part, across it (tilted up to ~20 degrees), 1.5-3 mm wide, and it and
    its 0-1.5 mm shift stop at a ball of 5-10 mm around the point (``crack_ball``; the
    shift tapers to nothing over the ball's outer half)."""
    a, b, h = ls.a, ls.b, ls.h
    ped_x = ls.canal_w + 0.4 * ls.pedicle_r
    ped_end = b + ls.pedicle_len
    lam_end = ped_end + ls.lamina_len * 0.8
    side = float(rng.choice([-1.0, 1.0]))
    sites = list(LOCAL_CRACK_SITES)
    weights = np.array([LOCAL_CRACK_SITES[k] for k in sites])
    site = sites[int(rng.choice(len(sites), p=weights / weights.sum()))]
    t = float(rng.uniform(0.3, 0.7))
    radius = float(rng.uniform(5.0, 7.5))
    if site == "pedicle":
        root, end = np.array([side * 0.75 * a, 0.75 * b, 0.0]), np.array([side * ped_x, ped_end, 0.0])
        centre, along = root + t * (end - root), end - root
    elif site == "lamina":
        root, end = np.array([side * ped_x, ped_end, 0.0]), np.array([0.0, lam_end, 1.0])
        centre = root + t * (end - root) + np.array([0.0, 0.0, rng.uniform(-0.22, 0.22) * h])
        along = end - root
    elif site == "pillar":
        centre = np.array([side * ped_x, ped_end, rng.uniform(-0.3, 0.3) * h])
        along = np.array([0.0, 0.0, 1.0])
        radius = float(rng.uniform(6.0, 8.0))
    elif site == "spinous":
        t = float(rng.uniform(0.3, 0.8))
        centre = np.array([0.0, lam_end + t * ls.spinous_len, t * ls.spinous_drop])
        along = np.array([0.0, ls.spinous_len, ls.spinous_drop])
    elif site == "transverse":
        root = np.array([side * 0.8 * a, 0.2 * b, -0.1 * h])
        end = np.array([side * (ped_x + ls.transverse_len), 0.35 * b, 0.0])
        centre, along = root + t * (end - root), end - root
    elif site == "corner":
        vertical = float(rng.choice([-1.0, 1.0], p=[0.3, 0.7]))  # mostly the lower corner
        centre = np.array([rng.uniform(-0.3, 0.3) * a, -0.75 * b, vertical * 0.35 * h])
        along = np.array([0.0, 0.6, -vertical * 0.8])
    else:
        centre = np.array([rng.uniform(-0.5, 0.5) * a, rng.uniform(-0.5, 0.5) * b,
                           rng.uniform(-0.3, 0.3) * h])
        along = rng.normal(size=3)
        radius = float(rng.uniform(6.0, 10.0))
    normal = along / np.linalg.norm(along) + rng.uniform(-0.35, 0.35, size=3)
    normal = normal / np.linalg.norm(normal)
    item.fracture = "crack"
    item.crack = (normal, float(normal @ centre), float(rng.uniform(1.5, 3.0)),
                  float(rng.uniform(0.0, 1.5)))
    item.crack2 = None
    item.slide_direction = None
    item.crack_ball = (centre, radius)
    item.crack_posterior = True


def _c2_pattern(rng: np.random.Generator, item: _Placed, ls: _LevelShape, pattern: str) -> str:
    """A forced C2 fracture pattern (:data:`C2_PATTERNS`), wider in form than the ones
    :func:`_varied_crack` draws at random: training sees each often enough to learn it.

    * ``"dens"``: type II through the base of the dens (two in three) or type III into the
      top of the body, the plane tilted up to 25 degrees forwards or backwards and 12
      sideways, the dens displaced 0-3 mm in any direction within the plane;
    * ``"hangman"``: both pars/pedicles broken behind the body (the plane 1-5 mm behind
      it, tilted up to 25 degrees), the body and dens slid 0-3.5 mm forwards and down
      from the arch (traumatic spondylolisthesis) or not displaced.
    """
    item.fracture = "crack"
    width = float(rng.uniform(1.0, 3.0))
    if pattern == "dens":
        tilt = np.radians(rng.uniform(-25.0, 25.0))
        side = np.radians(rng.uniform(-12.0, 12.0))
        normal = np.array([np.sin(side), np.sin(tilt), np.cos(tilt) * np.cos(side)])
        if type_ii := rng.random() < 2 / 3:
            offset = -ls.h / 2 - float(rng.uniform(0.5, 3.5))  # type II: base of the dens
        else:
            offset = -ls.h / 2 + float(rng.uniform(1.5, 5.0))  # type III: into the body
        normal = normal / np.linalg.norm(normal)
        item.crack = (normal, offset, width, float(rng.uniform(0.0, 3.0)))
        direction = np.cross(normal, [np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a), 0.0])
        item.slide_direction = direction / np.linalg.norm(direction)
        return "dens II" if type_ii else "dens III"
    if pattern != "hangman":
        raise ValueError(f"unknown C2 pattern {pattern!r}; expected one of {C2_PATTERNS}")
    tilt = np.radians(rng.uniform(-25.0, 25.0))
    normal = np.array([rng.uniform(-0.15, 0.15), np.cos(tilt), np.sin(tilt)])
    normal = normal / np.linalg.norm(normal)
    offset = ls.b + float(rng.uniform(1.0, 5.0))
    # The arch side (y beyond the plane) moves back and up relative to the body: the body
    # has slipped forwards and down.
    slip = np.array([0.0, 1.0, -rng.uniform(0.0, 0.5)])
    item.crack = (normal, offset, width, float(rng.uniform(0.0, 3.5)))
    item.slide_direction = slip / np.linalg.norm(slip)
    item.crack_posterior = True
    return "hangman"


def _rasterise(
    rng: np.random.Generator,
    placed: list[_Placed],
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    cervical: bool,
    region: str,
    body_y: float,
    centre_x: float,
    top_margin: float,
    dislocated: str | None,
    shift_mm: float,
    context: bool = False,
    variation: _Variation | None = None,
    airway_hu: float = -1000.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    nz, ny, nx = shape
    sz, sy, sx = spacing
    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    structures = np.zeros(shape, dtype=np.uint8)

    cortical = float(rng.uniform(700.0, 1000.0))
    cancellous = float(rng.uniform(200.0, 300.0))
    soft = float(rng.uniform(35.0, 50.0))
    fat = float(rng.uniform(-120.0, -80.0))
    disc_hu = float(rng.uniform(70.0, 95.0))
    cortex_mm = float(rng.uniform(1.0, 1.6))
    haematoma = float(rng.uniform(45.0, 75.0))
    if variation is not None:
        cortical, cancellous, cortex_mm = variation.cortical, variation.cancellous, variation.cortex_mm
        soft, fat = variation.soft, variation.fat
    params: dict[str, Any] = dict(cortical_hu=cortical, cancellous_hu=cancellous, soft_hu=soft,
                                  fat_hu=fat, disc_hu=disc_hu, cortex_mm=cortex_mm)

    # Body outline: neck or trunk, an ellipse per slice with a fat layer, drawn in the
    # array frame (it moves little with the small spine rotations).
    ys = (np.arange(ny) + 0.5) * sy
    xs = (np.arange(nx) + 0.5) * sx
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if cervical:
        semi_x, semi_y = float(rng.uniform(50.0, 58.0)), float(rng.uniform(46.0, 54.0))
        centre_y = body_y - float(rng.uniform(8.0, 14.0))
    else:
        widest = max(p.shape.a for p in placed)
        semi_x, semi_y = 5.5 * widest + 20, 4.5 * widest + 10
        centre_y = body_y - 1.2 * widest
    fat_mm = float(rng.uniform(3.0, 9.0))
    if variation is not None and cervical:
        semi_x, semi_y = semi_x * variation.neck_scale[0], semi_y * variation.neck_scale[1]
    rho = np.sqrt(((xx - centre_x) / semi_x) ** 2 + ((yy - centre_y) / semi_y) ** 2)
    inside = rho <= 1.0
    muscle = rho <= 1.0 - fat_mm / min(semi_x, semi_y)
    plane = np.where(muscle, soft, np.where(inside, fat, -1000.0)).astype(np.float32)
    if region in ("thoracic", "spine"):
        params["lungs"] = True
    hu[:] = plane[None]
    if context:
        _shoulders_and_lung_apices(hu, placed, spacing, centre_x, centre_y, semi_x, semi_y,
                                   soft, fat, fat_mm)
    if region in ("thoracic", "spine", "thoracolumbar"):
        # Lungs beside the thoracic spine (down to about T11).
        thoracic = [p for p in placed if p.name.startswith("T") and int(p.name[1:]) <= 11]
        if thoracic:
            z_lo = min(p.center[2] for p in thoracic) - 10.0
            z_hi = max(p.center[2] for p in thoracic)
            zs = (np.arange(nz) + 0.5) * sz
            for side in (-1.0, 1.0):
                lung = (((xx - (centre_x + side * 0.5 * semi_x)) / (0.38 * semi_x)) ** 2
                        + ((yy - (centre_y - 0.1 * semi_y)) / (0.7 * semi_y)) ** 2) <= 1.0
                for k in np.nonzero((zs >= z_lo) & (zs <= z_hi))[0]:
                    hu[k][lung] = -850.0

    def local_box(item: _Placed, reach: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array([[cx, cy, cz] for cx in (reach[0], reach[1])
                            for cy in (reach[2], reach[3]) for cz in (reach[4], reach[5])])
        world = corners @ item.rotation.T + item.center
        lo, hi = world.min(axis=0), world.max(axis=0)
        step = np.array([sx, sy, sz])
        size = np.array([nx, ny, nz])
        i0 = np.clip(np.floor(lo / step - 0.5).astype(int), 0, size)
        i1 = np.clip(np.ceil(hi / step + 0.5).astype(int), 0, size)
        return i0, i1

    boxes = []
    for item in placed:
        ls = item.shape
        reach = np.array([
            -(ls.canal_w + ls.transverse_len + 12.0), ls.canal_w + ls.transverse_len + 12.0,
            -ls.b - ls.prevertebral - 16.0,
            ls.b + ls.pedicle_len + ls.lamina_len + ls.spinous_len + 6.0,
            -ls.h / 2 - ls.disc - 18.0, ls.h / 2 + ls.disc + ls.spinous_drop + 6.0,
        ])
        if item.name == "C1" and item.c1_transverse > _C1_TRANSVERSE_MM:
            # (Only then: the textbook box clips a scaled-up C1's transverse tips a little,
            # which phantoms drawn without posterior_detail keep, so recipes reproduce.)
            side = max(reach[1], item.c1_transverse * item.c1_scale + 6.0)
            reach[0], reach[1] = -side, side
        if item.ribs:
            reach[0], reach[1] = -80.0, 80.0
            reach[2] = min(reach[2], -62.0)
            reach[5] = max(reach[5], 40.0)
        boxes.append(local_box(item, reach))

    def each_chunk() -> Iterator[tuple[_Placed, tuple[slice, ...], np.ndarray]]:
        """Every vertebra's bounding box in z slabs of bounded size (clinical grids are big),
        with the local coordinates of the slab's voxel centres."""
        for item, (i0, i1) in zip(placed, boxes, strict=True):
            plane = max(int((i1[1] - i0[1]) * (i1[0] - i0[0])), 1)
            slab = max(1, _CHUNK_VOXELS // plane)
            ys = (np.arange(i0[1], i1[1]) + 0.5) * sy
            xs = (np.arange(i0[0], i1[0]) + 0.5) * sx
            for z0 in range(int(i0[2]), int(i1[2]), slab):
                z1 = min(z0 + slab, int(i1[2]))
                # local = (point - centre) @ rotation, summed per axis without a meshgrid.
                zs = (np.arange(z0, z1) + 0.5) * sz
                dx, dy, dz = xs - item.center[0], ys - item.center[1], zs - item.center[2]
                r = item.rotation
                q = np.empty((z1 - z0, len(ys), len(xs), 3), dtype=np.float32)
                for j in range(3):
                    q[..., j] = ((dx[None, None, :] * r[0, j] + dy[None, :, None] * r[1, j])
                                 + dz[:, None, None] * r[2, j])
                box = (slice(z0, z1), slice(i0[1], i1[1]), slice(i0[0], i1[0]))
                yield item, box, q.reshape(-1, 3)

    # Pass 1: soft structures (canal, prevertebral tissue, airway), then discs.
    for item, box, q in each_chunk():
        ls = item.shape
        sub_hu = hu[box].reshape(-1)
        sub_st = structures[box].reshape(-1)
        half = ls.h / 2 + ls.disc / 2 + 0.8
        if item.name == "C1":
            half = 7.0
        canal_v = ls.b + ls.canal_d + 0.5
        canal = _elliptic_cylinder(q, 0.0, canal_v, ls.canal_w, ls.canal_d, -half, half) > 0
        cord = _elliptic_cylinder(q, 0.0, canal_v, 0.55 * ls.canal_w, 0.6 * ls.canal_d,
                                  -half, half) > 0
        sub_hu[canal] = 15.0
        sub_hu[cord] = 35.0
        sub_st[canal] = 7
        if item.name != "C1":
            pre = ((np.abs(q[:, 0]) < 0.8 * ls.a) & (q[:, 1] > -ls.b - ls.prevertebral)
                   & (q[:, 1] < -ls.b + 1.0) & (np.abs(q[:, 2]) <= half))
            sub_hu[pre] = soft + 5.0
            sub_st[pre] = 8
            if cervical:
                airway_v = -ls.b - ls.prevertebral - 6.0
                airway = _elliptic_cylinder(q, 0.0, airway_v, 9.0, 6.0, -half, half) > 0
                sub_hu[airway] = airway_hu
                sub_st[airway & (sub_st == 8)] = 0
        hu[box] = sub_hu.reshape(hu[box].shape)
        structures[box] = sub_st.reshape(structures[box].shape)
    for item, box, q in each_chunk():
        ls = item.shape
        if item.name == "C1" or item is placed[-1]:
            continue
        sub_hu = hu[box].reshape(-1)
        sub_st = structures[box].reshape(-1)
        depth = _elliptic_cylinder(q, 0.0, 0.0, 0.95 * ls.a, 0.95 * ls.b, ls.h / 2 - 1.5,
                                   ls.h / 2 + ls.disc + 1.5)
        disc = depth > 0
        sub_hu[disc] = np.where(depth[disc] < 1.5, disc_hu + 25.0, disc_hu)
        sub_st[disc] = 6
        hu[box] = sub_hu.reshape(hu[box].shape)
        structures[box] = sub_st.reshape(structures[box].shape)

    # Pass 2: bone, which wins over everything.
    for item, box, q in each_chunk():
        parts = _parts(item)
        depth = np.full(q.shape[0], -np.inf)
        code = np.zeros(q.shape[0], dtype=np.uint8)
        q_shifted = q
        side = np.zeros(q.shape[0], dtype=bool)
        crack_band = np.zeros(q.shape[0], dtype=bool)
        if item.crack is not None:
            normal, offset, width, slide = item.crack
            signed = q @ normal - offset
            side = signed > 0
            crack_band = np.abs(signed) < width / 2
            if item.crack2 is not None:
                normal2, offset2, width2 = item.crack2
                crack_band |= np.abs(q @ normal2 - offset2) < width2 / 2
            shift = np.full(q.shape[0], slide)
            if item.crack_ball is not None:
                # The crack stops at the ball; its shift tapers to nothing over the ball's
                # outer half, so the bone does not step where the crack ends.
                ball_centre, ball_radius = item.crack_ball
                distance = np.linalg.norm(q - ball_centre, axis=1)
                inside = distance < ball_radius
                crack_band &= inside
                side &= inside
                shift *= np.clip(2.0 * (1.0 - distance / ball_radius), 0.0, 1.0)
            if item.slide_direction is not None:
                tangent = item.slide_direction
            else:
                tangent = np.cross(normal, [0.0, 0.0, 1.0] if abs(normal[2]) < 0.9
                                   else [1.0, 0.0, 0.0])
                tangent /= np.linalg.norm(tangent)
            q_shifted = q - shift[:, None] * tangent
        for structure, cuttable, solid in parts:
            d = solid(q)
            cuttable = cuttable or (item.crack_posterior and structure != 14)
            if cuttable and item.crack is not None:
                d = np.where(side, solid(q_shifted), d)
                d = np.where(crack_band, -1.0, d)
            better = d > depth
            depth = np.where(better, d, depth)
            code = np.where(better, structure, code)
        bone = depth > 0
        if not bone.any():
            continue
        sub_hu = hu[box].reshape(-1)
        sub_st = structures[box].reshape(-1)
        sub_lb = labels[box].reshape(-1)
        core = cancellous
        value = np.where(depth < cortex_mm, cortical, core)
        if item.wedge_loss > 0:
            # Compacted trabecular bone under the depressed end plate.
            top_third = q[:, 2] < -item.shape.h / 6
            value = np.where((code == 1) & top_third & (depth >= cortex_mm), core + 150.0, value)
        sub_hu[bone] = value[bone]
        if item.crack is not None:
            # Haematoma and soft tissue fill the fracture gap inside the bone outline.
            normal, offset, width, _ = item.crack
            gap = crack_band & (depth <= 0) & (depth > -0.6 * width - 1.0)
            inside_outline = np.zeros_like(gap)
            for code_, cuttable, solid in parts:
                if cuttable or (item.crack_posterior and code_ != 14):
                    inside_outline |= solid(q) > 0
            gap &= inside_outline
            sub_hu[gap] = haematoma
            sub_lb[gap] = item.label
            sub_st[gap] = code[gap] if gap.any() else sub_st[gap]
        sub_st[bone] = code[bone]
        sub_lb[bone & (code != 14)] = item.label  # ribs are not part of the vertebra's label
        hu[box] = sub_hu.reshape(hu[box].shape)
        structures[box] = sub_st.reshape(structures[box].shape)
        labels[box] = sub_lb.reshape(labels[box].shape)

    if cervical:
        _skull_base_and_mandible(rng, hu, structures, placed[0], spacing, cortical,
                                 cranium=context)
    if variation is not None:
        _vary_tissue(variation, hu, structures, placed, spacing, cervical)
    return hu, labels, structures, params


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian noise smoothed to ``sigma_vox`` and scaled back to unit deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / max(float(field.std()), 1e-6)


def _vary_tissue(variation: _Variation, hu: np.ndarray, structures: np.ndarray,
                 placed: list[_Placed], spacing: tuple[float, float, float], cervical: bool) -> None:
    """Textures and unlabelled dense neighbours of :class:`_Variation` (in place)."""
    rng = np.random.default_rng([variation.seed, 0x5A19])
    shape = hu.shape
    step = np.asarray(spacing, float)
    bone = np.isin(structures, _BONE_CODES)
    # Trabecular texture in the cancellous core (the cortex keeps its density).
    if variation.trabecular_hu > 0:
        core = bone & (hu < 0.5 * (variation.cortical + variation.cancellous))
        texture = _smooth_noise(rng, shape, np.maximum(0.7 / step, 0.35))
        hu[core] += (variation.trabecular_hu * texture[core]).astype(np.float32)
    # Muscle with fat planes: a low-frequency field over soft tissue, its troughs fat.
    soft = (structures == 0) & (hu > -30.0) & (hu < 110.0)
    if variation.muscle_texture_hu > 0 and soft.any():
        field = _smooth_noise(rng, shape, np.maximum(3.0 / step, 0.5))
        hu[soft] += (variation.muscle_texture_hu * field[soft]).astype(np.float32)
        planes = soft & (field > 1.9)
        hu[planes] = variation.fat
    if not cervical:
        return
    free = (structures == 0) | (structures == 8)
    zz = (np.arange(shape[0]) + 0.5) * step[0]
    yy, xx = np.meshgrid((np.arange(shape[1]) + 0.5) * step[1], (np.arange(shape[2]) + 0.5) * step[2],
                         indexing="ij")
    by_name = {p.name: p for p in placed}

    def at(name: str) -> tuple[float, float, float] | None:
        item = by_name.get(name)
        return None if item is None else (float(item.center[0]), float(item.center[1]), float(item.center[2]))

    def paint(mask2d: np.ndarray, z_lo: float, z_hi: float, value: float) -> None:
        for k in np.nonzero((zz >= z_lo) & (zz <= z_hi))[0]:
            where = mask2d & free[k]
            hu[k][where] = value
            if value > 200:  # calcified or contrast-filled: other bone for the radiographs
                structures[k][where] = 13

    c3, c5, c6 = at("C3"), at("C5"), at("C6")
    if variation.hyoid and c3 is not None:
        # Hyoid: a thin bony U in front of the airway at C3.
        cx, cy, cz = c3
        depth = float(rng.uniform(32.0, 45.0))
        arc = np.sqrt(((xx - cx) / float(rng.uniform(14.0, 20.0))) ** 2 + ((yy - (cy - depth + 12.0)) / 14.0) ** 2)
        paint((np.abs(arc - 1.0) < 0.12) & (yy < cy - depth + 14.0), cz - 2.0, cz + 2.0,
              variation.cortical * 0.7)
    if variation.larynx_hu is not None and c5 is not None:
        # Thyroid cartilage, calcified: a shield of two plates in front of the larynx.
        cx, cy, cz = c5
        apex = cy - float(rng.uniform(38.0, 48.0))
        for side in (-1.0, 1.0):
            plate = (np.abs((yy - apex) - 1.0 * side * (xx - cx)) < 1.2) & (side * (xx - cx) >= 0) \
                & (np.abs(xx - cx) < 17.0)
            paint(plate, cz - 12.0, cz + 8.0, variation.larynx_hu)
    if variation.arteries_hu is not None and c6 is not None:
        # Carotid arteries beside the spine (contrast-filled or calcified walls).
        top = at("C2") or c3 or c6
        cx, cy, _ = c6
        for side in (-1.0, 1.0):
            ax, ay = cx + side * float(rng.uniform(18.0, 26.0)), cy - float(rng.uniform(14.0, 22.0))
            r = float(rng.uniform(2.5, 4.0))
            ring = np.hypot(xx - ax, yy - ay)
            vessel = ring < r if variation.arteries_hu < 550 else (ring < r) & (ring > r - 1.0)
            paint(vessel, top[2] - 10.0, c6[2] + 25.0, variation.arteries_hu)


def _skull_base_and_mandible(rng: np.random.Generator, hu: np.ndarray, structures: np.ndarray,
                             atlas: _Placed, spacing: tuple[float, float, float],
                             cortical: float, cranium: bool = False) -> None:
    """Unlabelled bone around the upper cervical spine: occiput above C1, the mandible."""
    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    cx, cy, cz = atlas.center
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * sy, (np.arange(nx) + 0.5) * sx, indexing="ij")
    bottom = cz - float(rng.uniform(8.5, 11.0))
    mandible_z = cz + float(rng.uniform(18.0, 26.0))
    # Occipital bone: a plate sloping up posteriorly, with the foramen magnum.
    behind = np.clip(yy - cy, 0, None)
    outline = ((xx - cx) / 45.0) ** 2 + ((yy - cy - 10.0) / 40.0) ** 2 <= 1.0
    outline &= ((xx - cx) / 15.0) ** 2 + ((yy - cy - 6.0) / 17.0) ** 2 > 1.0
    # Mandible: a U-shaped bar in front of C2-C3.
    arc = np.sqrt(((xx - cx) / 38.0) ** 2 + ((yy - (cy - 12.0)) / 42.0) ** 2)
    bar = (np.abs(arc - 1.0) < 0.09) & (yy < cy - 12.0)
    for k in range(nz):
        z = (k + 0.5) * sz
        plate = outline & (z <= bottom - 0.15 * behind) & (z >= bottom - 6.0 - 0.25 * behind)
        mandible = bar if abs(z - mandible_z) < 6.0 else None
        for mask, value in ((plate, cortical - 100.0), (mandible, cortical)):
            if mask is None or not mask.any():
                continue
            free = mask & ((structures[k] == 0) | (structures[k] == 8))
            hu[k][free] = value
            structures[k][free] = 13
    if cranium:
        _cranium(rng, hu, structures, (cx, cy), bottom, spacing, cortical)


# ------------------------------------------------------------------------ radiographs


def _shoulders_and_lung_apices(hu: np.ndarray, placed: list[_Placed],
                               spacing: tuple[float, float, float], centre_x: float,
                               centre_y: float, semi_x: float, semi_y: float, soft: float,
                               fat: float, fat_mm: float) -> None:
    """Below the neck the body widens into the shoulders, and the lung apices rise
    beside T1 (air-filled, about -850 HU)."""
    t1 = next((p for p in placed if p.name == "T1"), None)
    if t1 is None:
        return
    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * sy, (np.arange(nx) + 0.5) * sx, indexing="ij")
    z_t1 = float(t1.center[2])
    for k in range(nz):
        z = (k + 0.5) * sz
        grow = float(np.clip((z - (z_t1 - 30.0)) / 35.0, 0.0, 1.0))
        if grow <= 0.0:
            continue
        wide_x, wide_y = semi_x * (1.0 + 0.9 * grow), semi_y * (1.0 + 0.25 * grow)
        rho = np.sqrt(((xx - centre_x) / wide_x) ** 2 + ((yy - centre_y) / wide_y) ** 2)
        plane = np.where(rho <= 1.0 - fat_mm / min(wide_x, wide_y), soft,
                         np.where(rho <= 1.0, fat, -1000.0)).astype(np.float32)
        lung_grow = float(np.clip((z - (z_t1 - 8.0)) / 30.0, 0.0, 1.0))
        if lung_grow > 0.0:
            for side in (-1.0, 1.0):
                lx = 0.3 * wide_x * lung_grow + 1e-3
                ly = 0.55 * wide_y * lung_grow + 1e-3
                lung = (((xx - (centre_x + side * 0.5 * wide_x)) / lx) ** 2
                        + ((yy - centre_y) / ly) ** 2) <= 1.0
                plane[lung] = -850.0
        hu[k] = plane


def _cranium(rng: np.random.Generator, hu: np.ndarray, structures: np.ndarray,
             centre: tuple[float, float], bottom: float, spacing: tuple[float, float, float],
             cortical: float) -> None:
    """The skull above the skull base: scalp, a cortical shell and brain inside it."""
    nz, ny, nx = hu.shape
    sz, sy, sx = spacing
    cx, cy = centre
    yy, xx = np.meshgrid((np.arange(ny) + 0.5) * sy, (np.arange(nx) + 0.5) * sx, indexing="ij")
    semi = np.array([float(rng.uniform(62.0, 72.0)), float(rng.uniform(78.0, 90.0)), 80.0])
    cz = bottom - 40.0
    shell = float(rng.uniform(5.0, 8.0))
    brain = float(rng.uniform(28.0, 40.0))
    for k in range(nz):
        z = (k + 0.5) * sz
        if z > bottom - 3.0:
            break
        fz = 1.0 - ((z - cz) / semi[2]) ** 2
        if fz <= 0.05:
            continue
        ax, ay = semi[0] * np.sqrt(fz), semi[1] * np.sqrt(fz)
        rho = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - (cy - 10.0)) / ay) ** 2)
        rim = min(ax, ay)
        outside = rho > 1.0 + 5.0 / rim
        bone = (rho <= 1.0) & (rho > 1.0 - shell / rim)
        inner = rho <= 1.0 - shell / rim
        free = structures[k] == 0
        hu[k][outside & free] = -1000.0
        hu[k][(~outside) & (rho > 1.0) & free] = 40.0
        hu[k][bone & free] = cortical - 150.0
        hu[k][inner & free] = brain
        structures[k][bone & free] = 13


@dataclass
class Projection:
    """A digitally reconstructed radiograph and its 2-D ground truth.

    Attributes
    ----------
    image:
        Float32 in [0, 1], bone bright (log of the attenuation, scaled).
    line_integral:
        The attenuation line integral (dimensionless) per pixel.
    pixel_spacing:
        ``(row, column)`` spacing in mm.
    view:
        ``"AP"`` or ``"LAT"``.
    structures, structure_names:
        Label map of the view's structures (:data:`AP_STRUCTURES` or
        :data:`LAT_STRUCTURES`); 0 is background. ``None`` without 3-D structures.
    tissue, tissue_names:
        Label map 1 bone / 2 soft_tissue / 3 open_beam (every pixel has one).
    levels:
        Projected vertebral bodies labelled with their level (:data:`LEVEL_LABELS`).
    """

    image: np.ndarray
    line_integral: np.ndarray
    pixel_spacing: tuple[float, float]
    view: str
    structures: np.ndarray | None
    structure_names: dict[int, str]
    tissue: np.ndarray
    tissue_names: dict[int, str]
    levels: np.ndarray | None = None

    def masks(self) -> dict[str, np.ndarray]:
        """Boolean mask per structure key and tissue key."""
        out: dict[str, np.ndarray] = {}
        if self.structures is not None:
            names = self.structure_names.items()
            out.update({name: self.structures == value for value, name in names})
        out.update({name: self.tissue == value for value, name in self.tissue_names.items()})
        return out


_VIEW_AXIS = {"AP": 1, "PA": 1, "LAT": 2, "LL": 2, "RL": 2}


def drr(
    volume_hu: np.ndarray,
    spacing: Sequence[float],
    axis: str | int = "AP",
    *,
    structures: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    photons: float | None = None,
    rng: np.random.Generator | None = None,
    max_integral: float = 4.0,
) -> Projection:
    """Project a ``(z, y, x)`` HU volume into a radiograph (parallel beam).

    Parameters
    ----------
    volume_hu, spacing:
        The volume and its ``(z, y, x)`` voxel size in mm.
    axis:
        ``"AP"`` (integrate along y; image rows = z, columns = x, patient right on the
        left) or ``"LAT"`` (integrate along x; columns = y, anterior on the left), or the
        array axis 1 or 2.
    structures, labels:
        Optional 3-D structure codes and vertebra labels, projected into the view's
        label maps.
    photons:
        Unattenuated photon count per pixel for quantum noise; ``None``: no noise.
    max_integral:
        Line integral mapped to 1.0 in :attr:`Projection.image`.
    """
    if isinstance(axis, str):
        view = axis.upper()
        if view not in _VIEW_AXIS:
            raise ValueError(f"unknown view {axis!r}; expected AP or LAT")
        view = "AP" if _VIEW_AXIS[view] == 1 else "LAT"
        along = _VIEW_AXIS[view]
    else:
        if axis not in (1, 2):
            raise ValueError(f"axis must be 1 (AP) or 2 (LAT), got {axis}")
        along = int(axis)
        view = "AP" if along == 1 else "LAT"
    sz, sy, sx = (float(s) for s in spacing)
    step = sy if along == 1 else sx
    mu = np.clip(MU_WATER_PER_MM * (1.0 + volume_hu.astype(np.float64) / 1000.0), 0.0, None)
    integral = mu.sum(axis=along) * step
    if photons is not None:
        rng = rng or np.random.default_rng(0)
        counts = rng.poisson(photons * np.exp(-integral)).astype(np.float64)
        integral = -np.log(np.maximum(counts, 0.5) / photons)
    image = np.clip(integral / max_integral, 0.0, 1.0).astype(np.float32)
    pixel_spacing = (sz, sx if along == 1 else sy)

    body = (volume_hu > -500).any(axis=along)
    struct_map: np.ndarray | None = None
    level_map: np.ndarray | None = None
    names = AP_STRUCTURES if view == "AP" else LAT_STRUCTURES
    if structures is not None:
        bone = np.isin(structures, _BONE_CODES).any(axis=along)
        struct_map = np.zeros(image.shape, dtype=np.uint8)
        for value, codes in (_AP_SOURCES if view == "AP" else _LAT_SOURCES):
            struct_map[np.isin(structures, codes).any(axis=along)] = value
        if labels is not None:
            in_body = np.where(np.isin(structures, (1, 10)), labels, 0)
            level_map = in_body.max(axis=along).astype(np.uint8)
    else:
        bone = (volume_hu > 300).any(axis=along)
    tissue = np.full(image.shape, 3, dtype=np.uint8)
    tissue[body] = 2
    tissue[bone] = 1
    return Projection(image=image, line_integral=integral.astype(np.float32),
                      pixel_spacing=pixel_spacing, view=view, structures=struct_map,
                      structure_names=dict(names), tissue=tissue, tissue_names=dict(TISSUES),
                      levels=level_map)


# ---------------------------------------------------------------------------- DICOM

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1440.1"  # informational only
_FIXED_DATE = _dt.date(2024, 1, 15)
# DICOM CID 4010 (DX View), SNOMED CT.
_VIEW_CODES = {
    "AP": ("399348003", "antero-posterior"),
    "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
}


def _uid(*parts: object) -> str:
    """A UUID-derived ``2.25.`` UID from ``parts``: the same phantom gets the same UIDs."""
    digest = hashlib.sha256("\x1f".join(("spine-node-phantom", *(str(p) for p in parts))).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def _base_dataset(sop_class: str, sop_instance: str, *, seed: int, patient_name: str | None,
                  patient_id: str | None, study_uid: str, series_uid: str, modality: str,
                  series_number: int, series_description: str, body_part: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "SPINE_NODE"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    day = _FIXED_DATE + _dt.timedelta(days=seed % 365)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "101500"
    ds.AccessionNumber = f"PH{seed % 10**10:010d}"
    ds.Modality = modality
    ds.Manufacturer = "spine-node phantoms"
    ds.ManufacturerModelName = "synthetic"
    ds.InstitutionName = "spine-node"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Synthetic spine phantom (not a patient)"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name or f"PHANTOM^{seed}"
    ds.PatientID = patient_id or f"PHANTOM-{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{seed % 10**8}"
    ds.SeriesNumber = series_number
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "spine-node"
    return ds


def write_ct_series(
    phantom: Phantom,
    folder: Path | str,
    *,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    body_part: str | None = None,
    origin_mm: tuple[float, float, float] | None = None,
) -> list[Path]:
    """Write ``phantom`` as a CT Image Storage series, one file per slice.

    Slice ``k`` of the phantom (head first) gets ``ImagePositionPatient`` z =
    ``origin_z - k * spacing_z`` and ``InstanceNumber`` ``k + 1``. UIDs are derived from
    the seed, so the same phantom always gets the same UIDs. Returns the paths, in slice
    order.
    """
    from pydicom.uid import ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seed = phantom.seed
    study_uid = study_uid or _uid(seed, "study")
    series_uid = series_uid or _uid(seed, "ct-series", series_number)
    frame_uid = _uid(seed, "frame-of-reference")
    sz, sy, sx = phantom.spacing
    nz, ny, nx = phantom.shape
    if origin_mm is None:
        origin_mm = (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, 0.0)
    x0, y0, z0 = origin_mm
    stored = np.clip(np.rint(phantom.hu) + 1024, 0, 4095).astype(np.uint16)
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = _uid(seed, "ct-slice", series_number, k)
        ds = _base_dataset(CT_IMAGE_STORAGE, sop_uid, seed=seed, patient_name=patient_name,
                           patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                           modality="CT", series_number=series_number,
                           series_description=f"Phantom CT {phantom.region}",
                           body_part=body_part or phantom.body_part)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [f"{x0:.4f}", f"{y0:.4f}", f"{z0 - k * sz:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z0 - k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.SliceThickness = f"{sz:.6g}"
        ds.KVP = "120"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "500"
        ds.WindowWidth = "2000"
        ds.ConvolutionKernel = "BONE"
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        paths.append(path)
    log.debug("wrote phantom CT series %s (%d slices)", series_uid, nz)
    return paths


def write_radiograph(
    image: np.ndarray | Projection,
    folder: Path | str,
    view: str = "AP",
    modality: str = "DX",
    *,
    seed: int = 0,
    pixel_spacing: tuple[float, float] | None = None,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int | None = None,
    body_part: str = "CSPINE",
) -> Path:
    """Write one radiograph as DX (For Presentation) or CR and return the file path.

    ``image`` is a float array in [0, 1] (bone bright) or a :class:`Projection`; it is
    stored as 12-bit MONOCHROME2. UIDs derive from ``seed``, ``view`` and ``modality``.
    """
    if isinstance(image, Projection):
        pixel_spacing = pixel_spacing or image.pixel_spacing
        view = image.view
        pixels = image.image
    else:
        pixels = np.asarray(image, dtype=np.float32)
    view = view.upper()
    modality = modality.upper()
    if view not in ("AP", "LAT", "PA", "LL", "RL"):
        raise ValueError(f"view {view!r}: expected AP or LAT")
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality {modality!r}: expected DX or CR")
    if pixels.ndim != 2:
        raise ValueError(f"radiograph must be 2-D, got shape {pixels.shape}")
    pixel_spacing = pixel_spacing or (0.2, 0.2)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    view_position = "LL" if view == "LAT" else view
    series_number = series_number or (2 if view_position == "AP" else 3)
    study_uid = study_uid or _uid(seed, "study")
    series_uid = series_uid or _uid(seed, modality, view_position, "series", series_number)
    sop_uid = _uid(seed, modality, view_position, "image", series_number)
    sop_class = DX_PRESENTATION_STORAGE if modality == "DX" else CR_IMAGE_STORAGE
    ds = _base_dataset(sop_class, sop_uid, seed=seed, patient_name=patient_name,
                       patient_id=patient_id, study_uid=study_uid, series_uid=series_uid,
                       modality=modality, series_number=series_number,
                       series_description=f"Phantom {modality} {view_position}",
                       body_part=body_part)
    stored = np.clip(np.rint(np.clip(pixels, 0.0, 1.0) * 4095.0), 0, 4095).astype(np.uint16)
    rows, cols = stored.shape
    ds.InstanceNumber = 1
    ds.ViewPosition = view_position
    ds.PatientOrientation = ["L", "F"] if view_position in ("AP", "PA") else ["P", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.KVP = "80"
    ds.ImagerPixelSpacing = [f"{pixel_spacing[0]:.6g}", f"{pixel_spacing[1]:.6g}"]
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if modality == "DX":
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        ds.ImageLaterality = "U"
        ds.DetectorType = "DIRECT"
        ds.PixelSpacing = ds.ImagerPixelSpacing
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "projection geometry of the synthetic phantom"
        from pydicom.dataset import Dataset

        region = Dataset()
        if body_part == "CSPINE":
            region.CodeValue, region.CodeMeaning = "122494005", "Cervical spine"
        else:
            region.CodeValue, region.CodeMeaning = "421060004", "Spine"
        region.CodingSchemeDesignator = "SCT"
        ds.AnatomicRegionSequence = [region]
        ds.PositionerType = ""
        view_code = Dataset()
        view_code.CodeValue, view_code.CodeMeaning = _VIEW_CODES[view_position]
        view_code.CodingSchemeDesignator = "SCT"
        view_code.ViewModifierCodeSequence = []
        ds.ViewCodeSequence = [view_code]
        ds.AcquisitionContextSequence = []
    else:
        ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PixelData = stored.tobytes()
    path = folder / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
