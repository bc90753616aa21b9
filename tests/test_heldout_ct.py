"""The held-out CT phantom generator (inference/heldout/ct.py): anatomy, labels, fractures, acquisition knobs
and the DICOM series it writes (checked by dciodvfy)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_node.inference.heldout.ct import CERVICAL, LABEL_OF, LEVELS, HeldoutCt, generate, write_dicom
from tests.peers import tool

COARSE = (2.0, 1.4, 1.4)


def _centroid_mm(case: HeldoutCt, label: int) -> np.ndarray:
    """Label centroid in patient coordinates (x, y, z) mm."""
    k, j, i = np.nonzero(case.labels == label)
    dz, dy, dx = case.spacing
    x0, y0, z0 = case.origin_mm
    return np.array([x0 + i.mean() * dx, y0 + j.mean() * dy, z0 - k.mean() * dz])


def test_same_seed_same_case_other_seed_other_case() -> None:
    a = generate(7, spacing=COARSE, fov_mm=(120, 60))
    b = generate(7, spacing=COARSE, fov_mm=(120, 60))
    c = generate(8, spacing=COARSE, fov_mm=(120, 60))
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert a.fractures == b.fractures and a.origin_mm == b.origin_mm
    assert a.hu.dtype == np.float32 and a.labels.dtype == np.uint8 and a.hu.shape == a.labels.shape
    assert not np.array_equal(a.hu, c.hu)


@pytest.mark.parametrize(("z_range", "expected"), [
    (("C3", "C7"), ("C3", "C4", "C5", "C6", "C7")),
    (("skull_base", "T2"), CERVICAL),
    (("C1", "C4"), ("C1", "C2", "C3", "C4")),
])
def test_levels_in_field_and_labels_follow_z_range(z_range: tuple[str, str], expected: tuple[str, ...]) -> None:
    for seed in (1, 2):
        case = generate(seed, spacing=COARSE, z_range=z_range, p_fracture=0)
        assert case.levels_in_field == expected
        present = {int(v) for v in np.unique(case.labels)} - {0}
        assert present <= set(range(1, len(LEVELS) + 1))
        # every level in the field is labelled, and no label lies two levels beyond either end
        assert {LABEL_OF[n] for n in expected} <= present
        first, last = LABEL_OF[expected[0]], LABEL_OF[z_range[1]]
        assert min(present) >= first - 1 and max(present) <= last + 1
        # slice 0 is the most superior: label numbers grow towards the feet
        top = np.argmax((case.labels == LABEL_OF[expected[0]]).any(axis=(1, 2)))
        bottom = np.argmax((case.labels == LABEL_OF[expected[-1]]).any(axis=(1, 2)))
        assert top < bottom


def test_c1_is_a_ring_without_a_body_and_the_dens_rises_through_it() -> None:
    case = generate(3, z_range=("skull_base", "C3"), fov_mm=(110, 0.0 + 80), p_fracture=0)
    c1, c2 = case.labels == LABEL_OF["C1"], case.labels == LABEL_OF["C2"]
    enclosed = 0
    for k in np.nonzero(c1.any(axis=(1, 2)) & c2.any(axis=(1, 2)))[0]:
        j2, i2 = np.nonzero(c2[k])
        mid = int(round(i2.mean()))
        cols = slice(mid - 2, mid + 3)
        ys1 = np.nonzero(c1[k][:, cols].any(axis=1))[0]
        ys2 = np.nonzero(c2[k][:, cols].any(axis=1))[0]
        if ys1.size == 0 or ys2.size == 0:
            continue
        if ys1.min() < ys2.min() and ys2.max() < ys1.max():
            # anterior arch in front of the dens, posterior arch behind it, no C1 bone in between
            between = c1[k][ys2.min():ys2.max() + 1, cols]
            assert not between.any()
            enclosed += 1
    assert enclosed >= 3, "the dens should pass through the C1 ring over several slices"
    # the dens is dense bone
    assert np.median(case.hu[c2]) > 250


@pytest.mark.parametrize("kind", ["compression", "line", "burst", "teardrop", "spinous"])
def test_forced_fracture_changes_voxels_only_near_its_level(kind: str) -> None:
    args = dict(spacing=COARSE, z_range=("C2", "T1"), fov_mm=(120.0, 130.0))
    intact = generate(11, fractures={}, **args)  # type: ignore[arg-type]
    broken = generate(11, fractures={"C5": kind}, **args)  # type: ignore[arg-type]
    assert intact.fractures == {} and broken.fractures == {"C5": kind}
    changed = np.abs(broken.hu - intact.hu) > 5
    assert changed.sum() > 30
    near = (intact.labels == LABEL_OF["C5"]) | (broken.labels == LABEL_OF["C5"])
    k, j, i = np.nonzero(near)
    margin = (5, 8, 8)  # voxels: ~10 mm, room for the displaced fragment and the disc above
    box = np.zeros_like(near)
    box[max(k.min() - margin[0], 0):k.max() + margin[0] + 1, max(j.min() - margin[1], 0):j.max() + margin[1] + 1,
        max(i.min() - margin[2], 0):i.max() + margin[2] + 1] = True
    assert not (changed & ~box).any()
    others = (intact.labels != LABEL_OF["C5"]) & (broken.labels != LABEL_OF["C5"])
    assert np.array_equal(intact.labels[others & ~box], broken.labels[others & ~box])


def test_jefferson_and_dens_fractures_break_c1_and_c2() -> None:
    args = dict(spacing=(1.0, 0.7, 0.7), z_range=("skull_base", "C3"), fov_mm=(100.0, 70.0))
    intact = generate(5, fractures={}, **args)  # type: ignore[arg-type]
    broken = generate(5, fractures={"C1": "jefferson", "C2": "dens"}, **args)  # type: ignore[arg-type]
    for level in ("C1", "C2"):
        lab = LABEL_OF[level]
        was_bone = (intact.labels == lab) & (intact.hu > 300)
        now_soft = broken.hu < 150
        assert (was_bone & now_soft).sum() > 20, f"{level}: no fracture gap through bone"
    # the C1 lateral masses spread: the ring's label grows wider
    w0 = np.ptp(np.nonzero(intact.labels == 1)[2])
    w1 = np.ptp(np.nonzero(broken.labels == 1)[2])
    assert w1 > w0


def test_drawn_fractures_lie_in_the_field() -> None:
    for seed in range(5):
        args = dict(spacing=(3.0, 2.0, 2.0), z_range=("C3", "C7"))
        case = generate(seed, p_fracture=1.0, **args)  # type: ignore[arg-type]
        assert 1 <= len(case.fractures) <= 2
        assert set(case.fractures) <= set(case.levels_in_field)  # T1 is not in a field that ends at C7
        assert generate(seed, p_fracture=0.0, **args).fractures == {}  # type: ignore[arg-type]


def test_noise_and_slice_thickness() -> None:
    args = dict(spacing=(1.0, 1.0, 1.0), z_range=("C4", "C6"), fov_mm=(120.0, 40.0), p_fracture=0)
    clean = generate(13, noise_hu=0.0, **args)  # type: ignore[arg-type]
    noisy = generate(13, noise_hu=20.0, **args)  # type: ignore[arg-type]
    air = clean.hu < -990
    assert air.mean() > 0.05 and clean.hu[air].std() < 3
    assert 12 < (noisy.hu - clean.hu)[air].std() < 40
    thick = generate(13, noise_hu=0.0, slice_thickness_mm=3.0, **args)  # type: ignore[arg-type]
    assert thick.slice_thickness_mm == 3.0 and clean.slice_thickness_mm == 1.0
    assert thick.hu.shape == clean.hu.shape and np.array_equal(thick.labels, clean.labels)
    # a thicker slice profile removes detail along z (the curvature along z, not smooth ramps)
    curv = lambda hu: float(np.abs(np.diff(hu, n=2, axis=0)).mean())  # noqa: E731
    assert curv(thick.hu) < 0.6 * curv(clean.hu)


@pytest.mark.parametrize("kind", ["head", "chest", "abdomen", "air", "water", "noise"])
def test_negatives_have_no_cervical_labels(kind: str) -> None:
    case = generate(4, kind=kind, spacing=(3.0, 2.0, 2.0))
    assert case.kind == kind and case.levels_in_field == () and case.fractures == {}
    assert not (case.labels > 0).any()
    hu = case.hu
    if kind == "air":
        assert np.median(hu) < -950
    elif kind == "water":
        centre = hu[:, hu.shape[1] // 2 - 5:hu.shape[1] // 2 + 5, hu.shape[2] // 2 - 5:hu.shape[2] // 2 + 5]
        assert abs(float(np.median(centre))) < 15
    elif kind == "noise":
        assert hu.std() > 500
    else:
        assert (hu > 700).mean() > 0.002, "bone expected"
        assert (hu < -900).mean() > 0.02, "air expected"


def test_hu_offset_and_scale() -> None:
    args = dict(spacing=COARSE, z_range=("C3", "C5"), noise_hu=0.0, p_fracture=0)
    base = generate(6, **args)  # type: ignore[arg-type]
    shifted = generate(6, hu_offset=100.0, **args)  # type: ignore[arg-type]
    scaled = generate(6, hu_scale=1.1, **args)  # type: ignore[arg-type]
    ok = (base.hu > -900) & (base.hu < 2700)
    assert np.allclose(shifted.hu[ok] - base.hu[ok], 100.0, atol=1e-3)
    assert np.allclose(scaled.hu[ok], base.hu[ok] * 1.1, atol=1e-2)
    assert np.array_equal(base.labels, shifted.labels)


def test_size_scale_grows_the_anatomy() -> None:
    args = dict(spacing=COARSE, z_range=("C3", "C7"), fov_mm=(200.0, 150.0), p_fracture=0)
    small = generate(9, **args)  # type: ignore[arg-type]
    large = generate(9, size_scale=1.25, **args)  # type: ignore[arg-type]
    ratio = (large.labels == LABEL_OF["C5"]).sum() / (small.labels == LABEL_OF["C5"]).sum()
    assert 1.25**3 * 0.85 < ratio < 1.25**3 * 1.15
    d_small = np.linalg.norm(_centroid_mm(small, 3) - _centroid_mm(small, 7))
    d_large = np.linalg.norm(_centroid_mm(large, 3) - _centroid_mm(large, 7))
    assert d_large / d_small == pytest.approx(1.25, rel=0.05)


def test_rotation_turns_the_spine_and_its_labels() -> None:
    args = dict(spacing=COARSE, z_range=("C2", "T1"), fov_mm=(180.0, 150.0), p_fracture=0, noise_hu=0.0)
    straight = generate(12, **args)  # type: ignore[arg-type]
    pitched = generate(12, rotation_deg=(20, 0, 0), **args)  # type: ignore[arg-type]
    yawed = generate(12, rotation_deg=(0, 0, 25), **args)  # type: ignore[arg-type]

    def sagittal_angle(case: HeldoutCt) -> float:
        v = _centroid_mm(case, 3) - _centroid_mm(case, 7)
        return math.degrees(math.atan2(v[2], v[1]))

    assert abs((sagittal_angle(pitched) - sagittal_angle(straight)) - 20) < 3

    def axial_orientation(case: HeldoutCt) -> float:
        # orientation of C5's in-plane second moment tensor (mod 180): turns exactly with a yaw
        k, j, i = np.nonzero(case.labels == LABEL_OF["C5"])
        x, y = i * case.spacing[2], j * case.spacing[1]
        x, y = x - x.mean(), y - y.mean()
        return math.degrees(0.5 * math.atan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))

    turn = (axial_orientation(yawed) - axial_orientation(straight)) % 180
    assert min(abs(turn - 25), abs(turn - 155)) < 4
    for case in (pitched, yawed):
        assert np.median(case.hu[case.labels > 0]) > 250, "labels must follow the rotated bone"


def test_dicom_round_trip_and_dciodvfy(tmp_path: Path) -> None:
    case = generate(21, spacing=(1.5, 0.8, 0.8), fov_mm=(90.0, 24.0), slice_thickness_mm=2.0, fractures={})
    paths = write_dicom(case, tmp_path, seed=21)
    assert len(paths) == case.hu.shape[0]
    again = write_dicom(case, tmp_path / "again", seed=21)
    assert [pydicom.dcmread(p).SOPInstanceUID for p in paths] == [pydicom.dcmread(p).SOPInstanceUID for p in again]
    dss = sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))
    vol = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in dss])
    assert np.abs(vol - case.hu).max() <= 0.5 + 1e-3
    first = dss[0]
    assert first.Modality == "CT" and first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert str(first.PatientName) == "HELDOUT^21" and first.BodyPartExamined == "CSPINE"
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(first.SliceThickness) == 2.0 and float(first.SpacingBetweenSlices) == 1.5
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.8]
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert np.allclose(np.diff(z), -1.5) and z[0] == pytest.approx(case.origin_mm[2], abs=1e-3)
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == len(dss)
    assert first.StudyInstanceUID.startswith("2.25.")
    dciodvfy = tool("dciodvfy", "dicom3tools")
    warnings = 0
    for p in (paths[0], paths[len(paths) // 2], paths[-1]):
        out = subprocess.run([dciodvfy, "-new", str(p)], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text
        assert not [line for line in text.splitlines() if line.startswith("Error")], text
        warnings += sum(line.startswith("Warning") for line in text.splitlines())
    print(f"dciodvfy warnings over 3 files: {warnings}")
    # another volume from the same seed is another series of the same study; an empty body part is allowed
    other = generate(21, spacing=(1.5, 0.8, 0.8), fov_mm=(90.0, 3.0), hu_offset=50.0, fractures={})
    other_paths = write_dicom(other, tmp_path / "other", seed=21, body_part="")
    ds = pydicom.dcmread(other_paths[0])
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.SeriesInstanceUID != first.SeriesInstanceUID
    assert ds.BodyPartExamined == ""
    out = subprocess.run([dciodvfy, "-new", str(other_paths[0])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Error" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="kind='mri'"):
        generate(0, kind="mri")
    with pytest.raises(ValueError, match="z_range"):
        generate(0, z_range=("T1", "C3"))
    with pytest.raises(ValueError, match="C4='dens'"):
        generate(0, fractures={"C4": "dens"})
