"""Synthetic phantoms: anatomy labels, HU ranges, DRRs and DICOM round trips."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from spine_node.inference import phantoms
from tests.peers import tool


@pytest.fixture(scope="module")
def phantom() -> phantoms.Phantom:
    return phantoms.generate(11, fractures={"C5": "wedge", "C2": "crack"}, dislocation="C4")


def test_same_seed_same_phantom() -> None:
    a, b = phantoms.generate(3), phantoms.generate(3)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.vertebrae == b.vertebrae
    assert not np.array_equal(a.hu, phantoms.generate(4).hu)


def test_labels_and_hounsfield_ranges(phantom: phantoms.Phantom) -> None:
    assert phantom.shape == (80, 64, 64) and phantom.spacing == (2.0, 2.0, 2.0)
    present = set(np.unique(phantom.labels).tolist())
    assert set(range(1, 8)) <= present  # C1..C7
    params = phantom.params
    assert 700 <= params["cortical_hu"] <= 1000 and 200 <= params["cancellous_hu"] <= 300
    hu, st = phantom.hu, phantom.structures
    assert hu.min() >= -1024 and hu.max() <= 3071
    assert np.median(hu[:, :2, :2]) < -900  # air in the corner
    for code, low, high in ((7, -20, 60), (6, 50, 130), (8, 20, 80)):
        # Interior voxels of soft structures (away from bone, blurred edges included).
        assert low <= np.median(hu[st == code]) <= high, phantoms.STRUCTURES[code]
    body_voxels = hu[st == 1]
    assert np.percentile(body_voxels, 95) > 600  # cortical shell
    assert 150 < np.percentile(body_voxels, 5) < 450  # cancellous core
    # C1 has no body; C2 carries the dens.
    assert not ((phantom.labels == 1) & (st == 1)).any()
    assert ((phantom.labels == 2) & (st == 10)).any()
    for code in (2, 3, 4, 5):
        assert (st == code).any(), phantoms.STRUCTURES[code]


def test_findings_are_labelled(phantom: phantoms.Phantom) -> None:
    assert phantom.fractures().tolist() == [0, 1, 0, 0, 1, 0, 0]
    assert phantom.dislocations().tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert phantom.vertebra("C5").fracture == "wedge" and phantom.vertebra("C2").fracture == "crack"
    intact = phantoms.generate(11, fractures={}, dislocation=None, p_dislocation=0.0)
    assert not intact.fractured and not intact.dislocated
    # The wedge removes bone from the C5 body.
    c5 = lambda p: ((p.labels == 5) & (p.structures == 1)).sum()  # noqa: E731
    assert c5(phantom) < c5(intact) * 0.95


def test_random_findings_rates() -> None:
    drawn = [phantoms.generate(seed) for seed in range(100, 124)]
    assert 4 <= sum(p.fractured for p in drawn) <= 20
    with pytest.raises(ValueError, match="C1 has no body"):
        phantoms.generate(1, fractures={"C1": "wedge"})


def test_radiographic_findings() -> None:
    """The X-ray classifiers' cohort: findings a radiograph shows, never at C1."""
    assert np.array_equal(phantoms.generate(7).hu,
                          phantoms.generate(7, radiographic_findings=False).hu)
    drawn = [phantoms.generate(seed, radiographic_findings=True) for seed in range(400, 440)]
    fractured = [v for p in drawn for v in p.vertebrae if v.fractured]
    assert 10 <= sum(p.fractured for p in drawn) <= 30
    assert {v.fracture for v in fractured} == {"wedge", "crack"}
    assert "C1" not in {v.name for v in fractured}
    for p in drawn:
        if p.dislocated:
            assert 4.0 <= p.params["dislocation_mm"] <= 8.0
            assert 1.0 <= abs(p.params["dislocation_lateral_mm"]) <= 3.0
    # A compression loses much more of the body than the CT cohort's anterior wedge.
    def c5_body(**findings: object) -> int:
        p = phantoms.generate(11, p_dislocation=0.0, **findings)  # type: ignore[arg-type]
        return int(((p.labels == 5) & (p.structures == 1)).sum())

    intact = c5_body(fractures={})
    ct_wedge = c5_body(fractures={"C5": "wedge"})
    compression = c5_body(fractures={"C5": "wedge"}, radiographic_findings=True)
    assert compression < 0.85 * intact and compression < ct_wedge
    # A crack is a thin, nearly transverse gap right across the body (so that both the AP
    # and the LAT beam run along it), filled with haematoma.
    p = phantoms.generate(12, p_dislocation=0.0, radiographic_findings=True,
                          fractures={"C4": "crack"}, shape=(160, 128, 128), spacing=1.0)
    gap = np.argwhere((p.labels == 4) & (p.structures == 1) & (p.hu < 140))
    body = np.argwhere((p.labels == 4) & (p.structures == 1))
    assert len(gap) > 100
    z, y, x = gap.T
    assert np.ptp(y) > 0.7 * np.ptp(body[:, 1]) and np.ptp(x) > 0.7 * np.ptp(body[:, 2])
    tilt = np.linalg.lstsq(np.c_[y, x, np.ones_like(y)], z, rcond=None)
    assert np.abs(tilt[0][:2]).max() < 0.35  # transverse, give or take the lordosis
    residual = z - np.c_[y, x, np.ones_like(y)] @ tilt[0]
    assert residual.std() < 2.0


def test_thoracolumbar_region() -> None:
    lumbar = phantoms.generate(5, region="lumbar")
    assert set(np.unique(lumbar.labels)) - {0} == {20, 21, 22, 23, 24}
    assert lumbar.body_part == "LSPINE"
    assert lumbar.hu[lumbar.structures == 1].mean() > 250


def test_drr_views_and_masks(phantom: phantoms.Phantom) -> None:
    ap = phantom.radiograph("AP")
    lat = phantoms.drr(phantom.hu, phantom.spacing, "LAT", structures=phantom.structures,
                       labels=phantom.labels)
    nz, ny, nx = phantom.shape
    assert ap.image.shape == (nz, nx) and lat.image.shape == (nz, ny)
    assert ap.image.dtype == np.float32 and 0 <= ap.image.min() and ap.image.max() <= 1
    assert ap.structure_names == {1: "vertebral_body", 2: "pedicle", 3: "spinous_process"}
    assert lat.structure_names == {1: "vertebral_body", 2: "posterior_elements",
                                   3: "intervertebral_disc", 4: "spinal_canal",
                                   5: "prevertebral_soft_tissue"}
    assert ap.structures is not None and lat.structures is not None
    assert set(np.unique(ap.structures)) == {0, 1, 2, 3}
    assert set(np.unique(lat.structures)) == {0, 1, 2, 3, 4, 5}
    for view in (ap, lat):
        assert set(np.unique(view.tissue)) == {1, 2, 3}
        masks = view.masks()
        assert {"bone", "soft_tissue", "open_beam"} <= set(masks)
        # Bone attenuates more than soft tissue, open beam least.
        assert (view.line_integral[masks["bone"]].mean()
                > view.line_integral[masks["soft_tissue"]].mean()
                > view.line_integral[masks["open_beam"]].mean())
        assert view.levels is not None and set(range(2, 8)) <= set(np.unique(view.levels))
    noisy = phantom.radiograph("AP", photons=1e4, rng=np.random.default_rng(0))
    assert not np.array_equal(noisy.image, ap.image)


def test_ct_series_round_trip(phantom: phantoms.Phantom, tmp_path: Path) -> None:
    paths = phantoms.write_ct_series(phantom, tmp_path / "ct")
    assert len(paths) == phantom.shape[0]
    datasets = [pydicom.dcmread(p) for p in paths]
    first = datasets[0]
    assert first.SOPClassUID == phantoms.CT_IMAGE_STORAGE and first.Modality == "CT"
    assert first.BodyPartExamined == "CSPINE" and str(first.PatientName).startswith("PHANTOM^")
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(paths)
    assert [float(ds.PixelSpacing[0]) for ds in datasets[:1]] == [2.0]
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), -phantom.spacing[0])
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in datasets])
    assert np.abs(volume - np.clip(np.rint(phantom.hu), -1024, 3071)).max() == 0
    again = phantoms.write_ct_series(phantom, tmp_path / "again")
    assert [p.name for p in again] == [p.name for p in paths]  # UIDs derive from the seed


def test_radiograph_round_trip(phantom: phantoms.Phantom, tmp_path: Path) -> None:
    lat = phantom.radiograph("LAT")
    for modality, sop_class in (("DX", phantoms.DX_PRESENTATION_STORAGE),
                                ("CR", phantoms.CR_IMAGE_STORAGE)):
        path = phantoms.write_radiograph(lat, tmp_path / modality, modality=modality,
                                         seed=phantom.seed)
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == sop_class and ds.Modality == modality
        assert ds.ViewPosition == "LL" and ds.BodyPartExamined == "CSPINE"
        assert ds.pixel_array.shape == lat.image.shape
        assert np.abs(ds.pixel_array / 4095.0 - lat.image).max() <= 0.5 / 4095 + 1e-6


@pytest.mark.parametrize("modality", ["CT", "DX", "CR"])
def test_dciodvfy_accepts_objects(phantom: phantoms.Phantom, tmp_path: Path, modality: str) -> None:
    dciodvfy = tool("dciodvfy", "dicom3tools")
    if modality == "CT":
        path = phantoms.write_ct_series(phantom, tmp_path)[40]
    else:
        path = phantoms.write_radiograph(phantom.radiograph("AP"), tmp_path, modality=modality,
                                         seed=phantom.seed)
    result = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    report = result.stdout + result.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    warnings = [line for line in report.splitlines() if line.startswith("Warning")
                and "Value dubious" not in line]
    assert not errors, report
    assert not warnings, report


def test_varied_anatomy_is_its_own_stream() -> None:
    """Domain randomisation changes proportions and densities, never the findings or the
    pose drawn from the seed, and is reproducible."""
    plain = phantoms.generate(21, context=True)
    varied = phantoms.generate(21, context=True, varied_anatomy=True)
    again = phantoms.generate(21, context=True, varied_anatomy=True)
    assert np.array_equal(varied.hu, again.hu) and np.array_equal(varied.labels, again.labels)
    assert [(v.name, v.fracture, v.dislocation) for v in plain.vertebrae if v.name.startswith("C")] == \
        [(v.name, v.fracture, v.dislocation) for v in varied.vertebrae if v.name.startswith("C")]
    assert plain.params["rotation_deg"] == varied.params["rotation_deg"]
    assert not np.array_equal(plain.labels, varied.labels)
    cortical = [phantoms.generate(s, varied_anatomy=True).params["cortical_hu"] for s in range(12)]
    assert 450 <= min(cortical) and max(cortical) <= 1800 and max(cortical) - min(cortical) > 400
    for level in range(1, 8):  # every cervical vertebra still drawn and labelled
        assert (varied.labels == level).sum() > 50
    # Dense neighbours are unlabelled: no label outside the bone the vertebrae own.
    labelled = varied.labels > 0
    assert np.isin(varied.structures[labelled], [1, 2, 3, 4, 5, 9, 10, 11, 12, 13]).mean() > 0.97


def test_posterior_detail_gives_pillars_and_sloping_processes() -> None:
    """posterior_detail adds articular pillars C2-T1 behind the pedicles and lets the
    spinous processes slope down and reach further: the vertebrae get taller and deeper
    (front to back) while pose, findings and everything drawn before stay as they were."""
    kw: dict[str, Any] = dict(context=True, varied_anatomy=True, fractures={})
    plain = phantoms.generate(5, **kw)
    detailed = phantoms.generate(5, posterior_detail=True, **kw)
    assert [v.center_mm for v in plain.vertebrae] == [v.center_mm for v in detailed.vertebrae]
    assert plain.params["rotation_deg"] == detailed.params["rotation_deg"]
    assert not (plain.structures == 15).any()

    def extent(ph: phantoms.Phantom, label: int, axis: int) -> float:
        index = np.nonzero(ph.labels == label)[axis]
        return float(index.max() - index.min() + 1) * ph.spacing[axis]

    for label in range(2, 8):  # C2..C7 own their pillars
        assert ((detailed.labels == label) & (detailed.structures == 15)).sum() > 20, label
    assert not ((detailed.labels == 1) & (detailed.structures == 15)).any()  # C1: lateral masses
    for label in (4, 5, 6, 7):
        assert extent(detailed, label, 0) > extent(plain, label, 0) + 4.0  # processes slope down
    assert extent(detailed, 7, 2) > extent(plain, 7, 2)  # longer transverse processes
    with pytest.raises(ValueError, match="part of varied_anatomy"):
        phantoms.generate(5, posterior_detail=True)


@pytest.mark.parametrize("region", ["thoracic", "lumbar"])
def test_a_dislocation_always_has_a_vertebra_below(region: str) -> None:
    """Regions that draw nothing below their levels never dislocate the lowest one (it has
    nothing to slide over; drawing one used to crash), and a forced one is refused."""
    for seed in range(40):
        ph = phantoms.generate(seed, region=region, p_dislocation=1.0, spacing=4.0)
        order = list(ph.vertebrae)
        moved = [i for i, v in enumerate(order) if v.dislocation]
        assert moved and all(i < len(order) - 1 for i in moved)
    with pytest.raises(ValueError):
        phantoms.generate(0, region=region, dislocation=list(phantoms.REGIONS[region])[-1])


@pytest.mark.parametrize("pattern", phantoms.C2_PATTERNS)
def test_forced_c2_patterns_break_c2(pattern: str) -> None:
    """The CT cohort's forced C2 patterns open a fracture gap (soft tissue inside C2's
    outline) where an intact C2 has none, and are refused off C2 or off the CT cohort."""
    kwargs = dict(spacing=1.0, shape=(100, 110, 110), varied_fractures=True, noise_hu=1.0)
    gaps = []
    for fractures in ({}, {"C2": pattern}):
        ph = phantoms.generate(7, fractures=fractures, **kwargs)  # type: ignore[arg-type]
        c2 = ph.labels == 2
        gaps.append(int((c2 & (ph.hu < 120)).sum()))
        assert [v.fracture for v in ph.vertebrae if v.name == "C2"] == (
            ["crack"] if fractures else [None])
    assert gaps[1] > 5 * gaps[0] + 50, gaps
    with pytest.raises(ValueError, match="C2 patterns"):
        phantoms.generate(7, fractures={"C5": pattern}, varied_fractures=True)
    with pytest.raises(ValueError, match="C2 patterns"):
        phantoms.generate(7, fractures={"C2": pattern})


def test_local_cracks_stay_in_one_part_of_the_vertebra_and_draw_on_their_own_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An incomplete fracture (``local_cracks``) changes the image only within its ball
    (plus the blur) and opens a gap there; each level draws on its own stream, so the rest
    of the phantom, and every level whose crack is local at both shares, is the same for
    any share."""
    kwargs = dict(spacing=0.8, shape=(160, 130, 130), varied_fractures=True, noise_hu=1.0,
                  fractures={"C3": "crack", "C5": "crack", "C6": "crack"})
    drawn = phantoms._local_crack
    balls: dict[str, tuple[np.ndarray, float]] = {}
    closed = [False]

    def spy(rng: np.random.Generator, item: object, ls: object) -> None:
        drawn(rng, item, ls)  # type: ignore[arg-type]
        balls[item.name] = item.crack_ball  # type: ignore[attr-defined]
        if closed[0]:  # the same crack with no gap and no shift: an intact vertebra
            normal, offset, _, _ = item.crack  # type: ignore[attr-defined]
            item.crack = (normal, offset, 0.0, 0.0)  # type: ignore[attr-defined]

    monkeypatch.setattr(phantoms, "_local_crack", spy)
    some_local_some_not = False
    for seed in (3, 4, 5):
        through = phantoms.generate(seed, **kwargs)  # type: ignore[arg-type]
        local = phantoms.generate(seed, local_cracks=1.0, **kwargs)  # type: ignore[arg-type]
        assert set(balls) == {"C3", "C5", "C6"}
        closed[0] = True
        intact = phantoms.generate(seed, local_cracks=1.0, **kwargs)  # type: ignore[arg-type]
        closed[0] = False
        broken = np.isin(local.labels, (3, 5, 6)) | np.isin(through.labels, (3, 5, 6))
        outside = ~ndimage.binary_dilation(broken, iterations=4)
        assert np.array_equal(through.labels[outside], local.labels[outside])
        assert np.allclose(through.hu[outside], local.hu[outside], atol=1.0)
        for name, label in (("C3", 3), ("C5", 5), ("C6", 6)):
            centre, radius = balls[name]
            own = ndimage.binary_dilation(local.labels == label, iterations=3)
            changed = own & (np.abs(local.hu - intact.hu) > 30)
            assert changed.sum() > 10, (seed, name)
            # Mostly a gap; the shifted side adds a little bone where it moves over.
            assert (local.hu[changed] < intact.hu[changed]).mean() > 0.6
            points = np.argwhere(changed) * 0.8
            assert float(np.ptp(points, axis=0).max()) <= 2 * radius + 4.0, (seed, name)
        balls.clear()
        half = phantoms.generate(seed, local_cracks=0.5, **kwargs)  # type: ignore[arg-type]
        for name, label in (("C3", 3), ("C5", 5), ("C6", 6)):
            region = ndimage.binary_dilation(half.labels == label, iterations=2)
            same = np.allclose(half.hu[region], local.hu[region], atol=1.0)
            assert same == (name in balls), (seed, name)  # local at 0.5: as at 1.0
        some_local_some_not |= 0 < len(balls) < 3
        balls.clear()
    assert some_local_some_not


def test_fracture_patterns_name_what_each_draw_took() -> None:
    """params["fracture_patterns"] gives each fractured level's pattern, finer than its
    kind where the draw says more (a plain C2 line at the base of the dens, the dens
    types, hangman's, burst-like), and draws nothing: the phantom is the one it was."""
    seen: dict[str, set[str]] = {}
    for seed in range(40):
        ph = phantoms.generate(seed, p_fracture=0.0, fractures={"C2": "crack"})
        seen.setdefault("plain", set()).add(ph.params["fracture_patterns"]["C2"])
        assert set(ph.params["fracture_patterns"]) == {"C2"}
        varied = phantoms.generate(seed, p_fracture=0.0, varied_fractures=True,
                                   fractures={"C2": "dens" if seed % 2 else "hangman"})
        seen.setdefault("varied", set()).add(varied.params["fracture_patterns"]["C2"])
    assert seen["plain"] == {"crack", "dens base"}
    assert seen["varied"] == {"dens II", "dens III", "hangman"}
    fractured = phantoms.generate(8600171)  # C1 and C2 broken
    assert fractured.params["fracture_patterns"] == {"C1": "crack", "C2": "dens base"}
    assert set(fractured.params["fracture_patterns"]) == {v.name for v in fractured.vertebrae
                                                           if v.fractured}
