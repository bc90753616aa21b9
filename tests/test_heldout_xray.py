"""Held-out radiograph generator (inference/heldout/xray.py): determinism, masks, findings,
acquisition knobs and DICOM validity (dciodvfy)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from spine_node.inference.heldout import xray
from tests.peers import tool

SPACING = 0.3  # mm: coarser than the 0.15 mm default keeps the module fast; geometry is the same


@functools.cache
def gen(seed: int, **kwargs: object) -> xray.HeldoutRadiograph:
    """generate() at SPACING unless told otherwise, once per argument set in this module."""
    kwargs.setdefault("pixel_spacing_mm", SPACING)
    return xray.generate(seed, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lat_pair() -> tuple[xray.HeldoutRadiograph, xray.HeldoutRadiograph]:
    return gen(11, view="LAT", fracture=False, dislocation=False), gen(11, view="LAT", fracture=True, dislocation=False)


def test_same_seed_same_radiograph() -> None:
    a = xray.generate(7, view="AP", pixel_spacing_mm=SPACING)
    b = xray.generate(7, view="AP", pixel_spacing_mm=SPACING)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.structures, b.structures)
    assert np.array_equal(a.tissues, b.tissues)
    assert (a.fracture, a.dislocation, a.levels) == (b.fracture, b.dislocation, b.levels)
    c = gen(8, view="AP")
    assert not np.array_equal(a.image, c.image)


def test_image_format_and_views_share_the_patient() -> None:
    ap = gen(5, view="AP", fracture=True, dislocation=True)
    lat = gen(5, view="LAT", fracture=True, dislocation=True)
    for rad in (ap, lat):
        assert rad.image.dtype == np.uint16 and rad.image.max() <= 4095
        assert rad.structures.shape == rad.image.shape == rad.tissues.shape
        assert rad.fracture and rad.dislocation
    assert ap.finding_levels == lat.finding_levels
    assert set(np.unique(lat.structures)) == {0, 1, 2, 3, 4, 5}
    assert set(np.unique(ap.structures)) == {0, 1, 2, 3}
    assert {"C3", "C4", "C5", "C6"} <= set(lat.levels)


@pytest.mark.parametrize("view", ["AP", "LAT"])
def test_masks_align_with_the_image(view: str) -> None:
    rad = gen(3, view=view)
    img = rad.image.astype(float)
    bone, soft, beam = (img[rad.tissues == k].mean() for k in (1, 2, 3))
    assert bone > soft > beam
    # vertebral bodies are brighter than the band of soft tissue just outside them
    body = rad.structures == 1
    ring = ndimage.binary_dilation(body, iterations=int(4 / rad.pixel_spacing_mm[0])) & ~body
    ring &= ((rad.structures == 0) | (rad.structures >= 3)) & (rad.tissues != 0)
    assert img[body].mean() > img[ring].mean()


def test_lateral_regions_sit_where_anatomy_puts_them() -> None:
    rad = gen(3, view="LAT")
    cols = {k: np.nonzero(rad.structures == k)[1].mean() for k in (1, 2, 4, 5)}
    # anterior is the side the patient faces: prevertebral > body > canal > posterior elements
    sign = -1.0 if rad.facing == "left" else 1.0
    order = sorted((1, 2, 4, 5), key=lambda k: sign * cols[k])
    assert order == [2, 4, 1, 5]


def test_fracture_changes_the_image_only_near_the_spine(lat_pair) -> None:
    normal, broken = lat_pair
    assert not normal.fracture and broken.fracture
    diff = np.abs(normal.image.astype(int) - broken.image.astype(int))
    spine = (normal.structures == 1) | (broken.structures == 1)
    dist_mm = ndimage.distance_transform_edt(~spine) * normal.pixel_spacing_mm[0]
    assert diff[dist_mm < 3].max() > 100
    assert diff[dist_mm > 30].max() <= 3
    assert not np.array_equal(normal.structures, broken.structures)


def test_dislocation_translates_the_column_above() -> None:
    normal = gen(12, view="LAT", fracture=False, dislocation=False)
    moved = gen(12, view="LAT", fracture=False, dislocation=True)
    assert moved.dislocation and not normal.dislocation
    level = moved.finding_levels["dislocation"]
    assert level in moved.levels
    # the skull base moves with the column: the top of the image changes, not only the level
    diff = np.abs(normal.image.astype(int) - moved.image.astype(int))
    assert diff[: diff.shape[0] // 4].max() > 100


def test_forcing_off_reports_no_finding() -> None:
    for seed in (0, 1):
        rad = gen(seed, view="LAT", fracture=False, dislocation=False, p_fracture=1.0, p_dislocation=1.0)
        assert not rad.fracture and not rad.dislocation and not rad.finding_levels


def test_fov_scale_shrinks_the_anatomy_in_pixels() -> None:
    near = gen(4, view="LAT", fov_scale=1.0)
    wide = gen(4, view="LAT", fov_scale=1.5)
    assert wide.image.shape == near.image.shape
    assert wide.pixel_spacing_mm[0] == pytest.approx(near.pixel_spacing_mm[0] * 1.5)
    ratio = (wide.structures == 1).sum() / (near.structures == 1).sum()
    assert 0.3 < ratio < 0.6  # area scales by 1 / 1.5 ** 2 = 0.44


def test_photons_set_the_noise() -> None:
    def noise(rad: xray.HeldoutRadiograph) -> float:
        img = rad.image.astype(float)
        hp = img - ndimage.uniform_filter(img, 5)
        region = ndimage.binary_erosion(rad.tissues == 2, iterations=6) & (rad.structures == 0)
        return float(hp[region].std())

    low = noise(gen(6, view="AP", photons=3e2))
    high = noise(gen(6, view="AP", photons=1e5))
    assert low > 3 * high


def test_rotation_turns_image_and_masks_together() -> None:
    straight = gen(9, view="AP", rotation_deg=0.0)
    turned = gen(9, view="AP", rotation_deg=15.0)
    rows, cols = np.nonzero(turned.structures == 1)
    # the column of bodies leans: columns and rows of body pixels correlate
    assert abs(np.corrcoef(rows, cols)[0, 1]) > 0.5
    rows0, cols0 = np.nonzero(straight.structures == 1)
    assert abs(np.corrcoef(rows0, cols0)[0, 1]) < 0.3
    img = turned.image.astype(float)
    assert img[turned.structures == 1].mean() > img[turned.tissues == 2].mean()


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="'OBLIQUE'"):
        gen(1, view="OBLIQUE")
    with pytest.raises(ValueError, match="'knee'"):
        gen(1, kind="knee")
    with pytest.raises(ValueError, match="-3"):
        xray.generate(-3)
    with pytest.raises(ValueError, match="'MR'"):
        xray.write_dicom(gen(1, view="AP"), Path("unused.dcm"), seed=1, modality="MR")


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_dicom_round_trip_and_dciodvfy(tmp_path: Path, modality: str) -> None:
    dciodvfy = tool("dciodvfy", "dicom3tools")
    rad = gen(2, view="LAT")
    path = xray.write_dicom(rad, tmp_path / f"{modality}.dcm", seed=2, modality=modality)
    ds = pydicom.dcmread(path)
    assert np.array_equal(ds.pixel_array, rad.image)
    assert ds.Modality == modality
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(list(rad.pixel_spacing_mm))
    assert ds.ViewPosition in ("LL", "RL")
    assert str(ds.PatientName) == "HELDOUT^2"
    assert ds.StudyInstanceUID.startswith("2.25.")
    if modality == "CR":
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(rad.pixel_spacing_mm))
    check = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True, timeout=120)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_dicom_uids_are_deterministic_and_views_share_a_study(tmp_path: Path) -> None:
    ap = xray.write_dicom(gen(3, view="AP"), tmp_path / "ap.dcm", seed=3)
    lat = xray.write_dicom(gen(3, view="LAT"), tmp_path / "lat.dcm", seed=3)
    again = xray.write_dicom(gen(3, view="AP"), tmp_path / "ap2.dcm", seed=3)
    a, b, c = (pydicom.dcmread(p) for p in (ap, lat, again))
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.SOPInstanceUID == c.SOPInstanceUID
    assert a.ViewPosition == "AP"


def test_dicom_missing_view_and_spacing(tmp_path: Path) -> None:
    rad = gen(3, view="AP")
    dx = pydicom.dcmread(xray.write_dicom(rad, tmp_path / "dx.dcm", seed=3, view_position="", write_spacing=False))
    assert "ViewPosition" not in dx and "ImagerPixelSpacing" not in dx
    cr = pydicom.dcmread(xray.write_dicom(rad, tmp_path / "cr.dcm", seed=3, modality="CR", view_position="",
                                          write_spacing=False, body_part="NECK"))
    assert cr.ViewPosition == "" and "PixelSpacing" not in cr and cr.BodyPartExamined == "NECK"


@pytest.mark.parametrize("view", ["AP", "LAT"])
def test_lumbar_levels_labels_and_findings(view: str) -> None:
    rad = gen(21, view=view, kind="lspine", pixel_spacing_mm=0.3, fracture=True, dislocation=False)
    assert {"L1", "L2", "L3", "L4", "L5"} <= set(rad.levels)
    assert rad.fracture and rad.finding_levels["fracture"] in ("T12", "L1", "L2", "L3", "L4", "L5")
    expected = {0, 1, 2, 3, 4} if view == "LAT" else {0, 1, 2, 3}  # no prevertebral label below the neck
    assert set(np.unique(rad.structures)) == expected
    img = rad.image.astype(float)
    assert img[rad.structures == 1].mean() > img[rad.tissues == 2].mean()


@pytest.mark.parametrize("kind", ["chest", "hand", "noise", "ct_slice", "blank"])
def test_negatives_have_no_spine(kind: str) -> None:
    rad = gen(4, view="AP", kind=kind, pixel_spacing_mm=0.3, fracture=True, dislocation=True)
    assert rad.kind == kind and rad.image.dtype == np.uint16 and rad.image.max() <= 4095
    assert not rad.structures.any()
    assert not rad.fracture and not rad.dislocation and rad.levels == ()
    assert rad.image.std() > 1.0
    if kind in ("chest", "hand"):
        assert {1, 2, 3} <= set(np.unique(rad.tissues))
        img = rad.image.astype(float)
        assert img[rad.tissues == 1].mean() > img[rad.tissues == 3].mean()
    if kind == "ct_slice":
        assert rad.image.shape == (512, 512)
        assert rad.image.min() < 100 and rad.image.max() > 1900  # air and cortical bone in HU + 1024


def test_write_set_pairs_dicom_and_truth(tmp_path: Path) -> None:
    import json

    out = xray.write_set(tmp_path / "set", range(3, 4), kind="cspine", pixel_spacing_mm=0.4)
    truth = [json.loads(line) for line in (out / "truth.jsonl").read_text().splitlines()]
    assert [t["view"] for t in truth] == ["AP", "LAT"]
    for t in truth:
        ds = pydicom.dcmread(out / t["file"])
        masks = np.load(out / t["file"].replace(".dcm", ".npz"))
        assert masks["structures"].shape == ds.pixel_array.shape
        assert ds.BodyPartExamined == "CSPINE" and t["kind"] == "cspine"
    assert pydicom.dcmread(out / truth[0]["file"]).StudyInstanceUID == pydicom.dcmread(
        out / truth[1]["file"]).StudyInstanceUID
