"""Negative cases for the held-out CT generator: CT series that are not cervical spines.

"head" (vault, brain, skull base, face; nothing below the foramen magnum), "chest" (T2-T10,
ribs, lungs, heart, aorta, sternum, scapulae), "abdomen" (T12-L5, liver, spleen, kidneys,
bowel with gas, psoas, aorta, the top of the iliac wings), "air", "water" (a 200 mm water
cylinder in a 3 mm acrylic wall on a couch) and "noise". Labels are all 0.
"""

from __future__ import annotations

import numpy as np

from . import ct
from .ct import IDENTITY, BoneHu, HeldoutCt, Skeleton, capsule, supcyl, supell, tube


def generate_negative(kind: str, seed: int, rng: np.random.Generator, nrng: np.random.Generator, skel: Skeleton,
                      bone: BoneHu, *, spacing: tuple[float, float, float], fov_mm: tuple[float, float] | None,
                      size_scale: float, rotation_deg: tuple[float, float, float], hu_offset: float, hu_scale: float,
                      noise_hu: float | None, slice_thickness_mm: float | None) -> HeldoutCt:
    L = skel.levels
    if kind == "head":
        top, bot = skel.head.at((0, 10, 137)), skel.head.at((0, 10, 10))
        centre = skel.head.at((0, -5, 60))
        fov_default = (200.0, 240.0)
    elif kind == "chest":
        top, bot = L["T2"].frame.at((0, 0, 10)), L["T10"].frame.at((0, 0, -11))
        centre = L["T6"].frame.at((0, -40, 0))
        fov_default = (240.0, 300.0)
    elif kind == "abdomen":
        top, bot = L["T12"].frame.at((0, 0, 12)), L["L5"].frame.at((0, 0, -30))
        centre = L["L3"].frame.at((0, -30, 0))
        fov_default = (240.0, 300.0)
    else:  # phantoms without anatomy: a 150-250 mm long stack at the head end
        length = rng.uniform(150, 250)
        centre = L["C4"].frame.o.copy()
        top, bot = centre + np.array([0, 0, length / 2]), centre - np.array([0, 0, length / 2])
        fov_default = (180.0, 260.0)
    geo = ct._Geometry.build(rng, spacing, fov_mm, size_scale, rotation_deg, top, bot, rng.uniform(0, 8),
                             rng.uniform(0, 8), skel, fov_default, centre=centre)
    sc = geo.scene(slice_thickness_mm)
    if kind == "head":
        _head(sc, skel, rng, bone)
    elif kind == "chest":
        _chest(sc, skel, rng, bone)
    elif kind == "abdomen":
        _abdomen(sc, skel, rng, bone)
    elif kind == "water":
        _water(sc, geo, rng)
    elif kind == "noise":
        sc.hu[...] = nrng.uniform(-1024, 3071, size=sc.hu.shape).astype(np.float32)
        sc.tex[...] = 0
    return geo.acquire(sc, nrng, kind, {}, (), hu_offset, hu_scale, noise_hu, slice_thickness_mm)


def _head(sc: ct._Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu) -> None:
    h = skel.head
    scalp = supell(h.at((0, 5, 40)), (76, 100, 96))
    face = supell(h.at((0, -62, -25)), (52, 40, 42), blend=18.0)
    scalp.coarse = face.coarse = 4
    sc.paint_layers(IDENTITY, [scalp, face], [(-80.0, 6.0, 0.0), (45.0, 4.0, 2.5)])
    ct._paint_head(sc, skel, rng, bone, neck=False)


def _torso(sc: ct._Scene, skel: Skeleton, rng: np.random.Generator, rows: list[tuple[float, float, float, float,
                                                                                         float]]) -> None:
    fat = rng.uniform(8, 25)
    sc.set_width(rows)
    outer = ct._column(skel, rows)
    sc.paint(IDENTITY, [outer], -95.0, tex=8.0)
    sc.paint(IDENTITY, [ct._column(skel, rows, inset=fat, post_extra=5)], 48.0, tex=6.0)
    inner = ct._column(skel, rows, inset=fat + 14)
    sc.paint(IDENTITY, [inner], -85.0, tex=10.0)  # visceral fat; organs are painted into it


def _rows(skel: Skeleton, names: list[str], half_w: float, half_ap: float, ant: float) -> list[tuple[float, float,
                                                                                                     float, float,
                                                                                                     float]]:
    out = []
    for n in names:
        lv = skel.levels[n]
        out.append((float(lv.frame.o[2]), float(lv.frame.o[1]) - ant, half_w, half_ap, 2.4))
    return out


def _chest(sc: ct._Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu) -> None:
    L = skel.levels
    names = ["T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10", "T11", "T12"]
    hw, ap = rng.uniform(150, 180), rng.uniform(100, 125)
    _torso(sc, skel, rng, _rows(skel, names, hw, ap, ap - rng.uniform(80, 95)))  # 80-95 mm behind the bodies
    for s in (-1, 1):
        lung = supell(L["T6"].frame.at((s * 68, -25, -5)), (hw - 85, ap - 30, 120), 2.3)
        lung.coarse = 3
        sc.paint(IDENTITY, [lung], -850.0, tex=45.0)
    heart = supell(L["T8"].frame.at((18, -75, 5)), (62, 50, 55))
    sc.paint_layers(IDENTITY, [heart], [(-90.0, 8.0, -4.0), (42.0, 3.0, 0.0)])
    aorta = [L["T4"].frame.at((0, -60, 15)), L["T3"].frame.at((10, -40, -10)), L["T4"].frame.at((16, -12, 0)),
             L["T6"].frame.at((18, -8, 0)), L["T10"].frame.at((12, -6, 0))]
    sc.paint(IDENTITY, tube(aorta, 13.0), 42.0)
    sc.paint(IDENTITY, tube([L["T2"].frame.at((0, -30, 0)), L["T5"].frame.at((0, -35, 0))], 8.0), -1000.0)  # trachea
    for s in (-1, 1):
        sc.paint(IDENTITY, [capsule(L["T5"].frame.at((s * 4, -36, 0)), L["T7"].frame.at((s * 30, -30, -10)), 6.0)],
                 -1000.0)  # main bronchi
    ct._paint_spine(sc, skel, bone, {}, ["T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9", "T10"], labelled=False,
                    atlas=False)
    for n in names[1:10]:
        lv = L[n]
        number = int(n[1:])
        for s in (-1, 1):
            pts = ct._rib_points(lv, s, number, rng)
            sc.paint_bone(lv.frame, tube(pts[:-1], 3.8, (1, 1, 1.5), blend=1.0), bone.cortical, bone.cancellous, 0.9)
    for n in names[1:10]:  # costal cartilage towards the sternum
        lv = L[n]
        for s in (-1, 1):
            pts = ct._rib_points(lv, s, int(n[1:]), rng)
            ster = np.array([s * 14.0, pts[-1][1] - 10, pts[-1][2] - 4])
            sc.paint(lv.frame, tube([pts[-2], pts[-1], ster], 3.5, (1, 1, 1.5)), 120.0, tex=10.0)
    t5 = L["T5"].frame
    front = float(ct._rib_points(L["T5"], 1, 5, np.random.default_rng(0))[-1][1]) - 12
    sternum = supcyl((0, front, -10), 16, 6, 75, 2.2, 2.0)
    sc.paint_bone(t5, [sternum], bone.cortical, bone.cancellous, 1.0)
    for s in (-1, 1):
        # scapula: a plate behind the upper ribs, turned about 35 degrees from the coronal plane
        fr = ct.Frame(t5.at((s * 85, 50, 20)), t5.F @ ct._rot("z", -s * 30))
        sc.paint_bone(fr, [supcyl((0, 0, 0), 35, 2.5, 65, 2.5, 1.5)], bone.cortical, bone.cancellous, 1.0)


def _abdomen(sc: ct._Scene, skel: Skeleton, rng: np.random.Generator, bone: BoneHu) -> None:
    L = skel.levels
    names = ["T11", "T12", "L1", "L2", "L3", "L4", "L5"]
    hw, ap = rng.uniform(140, 175), rng.uniform(100, 130)
    _torso(sc, skel, rng, _rows(skel, names, hw, ap, ap - rng.uniform(85, 100)))
    liver = supell(L["T12"].frame.at((-65, -55, 10)), (75, 80, 75), 2.2)
    liver.coarse = 3
    sc.paint(IDENTITY, [liver], 58.0, tex=4.0)
    sc.paint(IDENTITY, [supell(L["T12"].frame.at((70, 10, 0)), (30, 50, 55))], 48.0, tex=4.0)  # spleen
    for s in (-1, 1):
        kidney = supell(L["L2"].frame.at((s * 62, 5, 0)), (28, 32, 55))
        sc.paint_layers(IDENTITY, [kidney], [(-95.0, 6.0, -6.0), (32.0, 3.0, 0.0)])
        psoas = tube([L["L1"].frame.at((s * 25, 5, 0)), L["L3"].frame.at((s * 35, 0, 0)),
                      L["L5"].frame.at((s * 45, -5, 0))], 12.0, (1.3, 1, 1))
        sc.paint(IDENTITY, psoas, 50.0, tex=5.0)
    sc.paint(IDENTITY, tube([L["T12"].frame.at((8, -25, 0)), L["L4"].frame.at((6, -30, 0))], 11.0), 42.0)  # aorta
    # bowel loops: soft-tissue tubes with gas pockets
    for _ in range(int(rng.integers(6, 11))):
        c = L[str(rng.choice(["L1", "L2", "L3", "L4"]))].frame.at((rng.uniform(-90, 90), rng.uniform(-110, -40),
                                                                    rng.uniform(-20, 20)))
        d = rng.normal(size=3) * 30
        sc.paint(IDENTITY, [capsule(c - d, c + d, rng.uniform(10, 16))], 35.0, tex=6.0)
        if rng.random() < 0.7:
            sc.paint(IDENTITY, [capsule(c - d * 0.7, c + d * 0.7, rng.uniform(3, 9))], -1000.0)
    ct._paint_spine(sc, skel, bone, {}, names, labelled=False, atlas=False)
    for s in (-1, 1):
        # iliac wing: a curved plate flaring laterally and forwards from the sacroiliac region
        fr = ct.Frame(L["L5"].frame.at((s * 70, 5, -25)), L["L5"].frame.F @ ct._rot("z", s * 40))
        sc.paint_bone(fr, [supcyl((0, 0, 0), 45, 5, 28, 2.5, 2.5)], bone.cortical, bone.cancellous, 1.5)


def _water(sc: ct._Scene, geo: ct._Geometry, rng: np.random.Generator) -> None:
    radius = rng.uniform(90, 110) / geo.scale
    c = geo.C
    top, bot = c + np.array([0, 0, 400]), c - np.array([0, 0, 400])
    sc.paint(IDENTITY, [capsule(top, bot, radius + 3)], 120.0)  # acrylic wall
    sc.paint(IDENTITY, [capsule(top, bot, radius)], 0.0)
    couch = supcyl(c + np.array([0, radius + 25, 0]), 220, 8, 400, 2.0, 2.0)
    sc.paint(IDENTITY, [couch], -300.0)


ct.NEGATIVE_GENERATOR = generate_negative
