"""The demo X-ray models end to end: storescu -> serve (default routes, embedded worker,
the committed ONNX weights) -> SEG + SR stored in Orthanc, each valid per dciodvfy.

The phantom is drawn from a seed no training run used. This checks the plumbing and the
objects; model quality is measured in tests/test_xray_models.py.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from spine_node.node.audit import Job
from tests.nodeproc import NodeProcess, wait_for
from tests.orthanc import Orthanc
from tests.peers import dcmtk, tool

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
XRAY_PIPELINES = {"xray-fracture", "xray-spine-seg", "xray-tissue-seg", "xray-cspine-classify",
                  "xray-pair-classify"}


def test_xray_study_gets_every_pipeline_and_results_reach_the_pacs(tmp_path):
    phantoms = pytest.importorskip("spine_node.inference.phantoms")
    seed = 77_000_001
    phantom = phantoms.generate(seed, region="cervical")
    for view, modality in (("AP", "DX"), ("LAT", "CR")):
        image = phantom.radiograph(view, photons=1e4, rng=np.random.default_rng(seed))
        phantoms.write_radiograph(image, tmp_path / "in" / view, view=view, modality=modality, seed=seed)

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node.with_worker_dispatching_to(pacs.ae_title, pacs.dicom_port)
        with node:
            push = subprocess.run([dcmtk("storescu"), "-aet", "XRAY01", "-aec", "SPINE_NODE", "+sd",
                                   "+r", "127.0.0.1", str(node.port), str(tmp_path / "in")],
                                  capture_output=True, text=True, timeout=120)
            assert push.returncode == 0, push.stderr
            engine = create_engine(url)

            def finished():  # type: ignore[no-untyped-def]
                with Session(engine) as session:
                    jobs = list(session.scalars(select(Job)))
                # Two series (AP, LAT) x four single-image pipelines, less the cervical
                # classifier on AP (it reads lateral views only), plus one pair job: 8.
                return len(jobs) == 8 and all(j.state in ("succeeded", "failed") for j in jobs) and jobs
            jobs = wait_for(finished, timeout=300, interval=1)
            engine.dispose()
            assert {j.pipeline for j in jobs} == XRAY_PIPELINES
            assert [j for j in jobs if j.state != "succeeded"] == [], [(j.pipeline, j.error) for j in jobs]
            assert all(j.backend and j.backend.startswith("onnxruntime") for j in jobs)

            def results_in_pacs():  # type: ignore[no-untyped-def]
                found = [i for i in pacs.instances() if i.get("Modality") in ("SEG", "SR")]
                return len(found) >= 8 and found
            found = wait_for(results_in_pacs, timeout=120, interval=1)
            assert {i["SOPClassUID"] for i in found if i["Modality"] == "SEG"} == {SEG}

    results = sorted((node.data_dir / "results").rglob("*.dcm"))
    assert len(results) >= 8
    dciodvfy = tool("dciodvfy", "dicom3tools")
    for path in results:
        check = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line]
        assert check.returncode == 0 and not errors, (path.name, errors)


def test_cervical_ct_two_stage_pipeline_end_to_end(tmp_path):
    phantoms = pytest.importorskip("spine_node.inference.phantoms")
    seed = 77_000_002
    phantom = phantoms.generate(seed, region="cervical", fractures={"C5": "wedge"})
    files = phantoms.write_ct_series(phantom, tmp_path / "in", body_part="CSPINE")

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node.with_worker_dispatching_to(pacs.ae_title, pacs.dicom_port)
        with node:
            push = subprocess.run([dcmtk("storescu"), "-aet", "CT01", "-aec", "SPINE_NODE", "+sd",
                                   "127.0.0.1", str(node.port), str(tmp_path / "in")],
                                  capture_output=True, text=True, timeout=300)
            assert push.returncode == 0, push.stderr
            engine = create_engine(url)

            def finished():  # type: ignore[no-untyped-def]
                with Session(engine) as session:
                    jobs = list(session.scalars(select(Job)))
                return jobs and all(j.state in ("succeeded", "failed") for j in jobs) and jobs
            jobs = wait_for(finished, timeout=300, interval=1)
            engine.dispose()
            assert [(j.pipeline, j.state, j.error) for j in jobs] == [("ct-cspine-fracture", "succeeded", None)]
            assert jobs[0].model_name and jobs[0].backend.startswith("onnxruntime")

            def results_in_pacs():  # type: ignore[no-untyped-def]
                found = [i for i in pacs.instances() if i.get("Modality") in ("SEG", "SR")]
                return len(found) >= 2 and found
            found = wait_for(results_in_pacs, timeout=120, interval=1)
            assert {i["Modality"] for i in found} == {"SEG", "SR"}

    from highdicom.seg import segread
    from pydicom import dcmread

    by_modality: dict[str, list] = {}
    for path in sorted((node.data_dir / "results").rglob("*.dcm")):
        by_modality.setdefault(str(dcmread(path, stop_before_pixels=True).Modality), []).append(path)
    assert len(by_modality["SEG"]) == 1 and len(by_modality["SR"]) == 1
    seg = segread(by_modality["SEG"][0])
    labels = {str(item.SegmentLabel) for item in seg.SegmentSequence}
    assert {f"C{n} vertebra" for n in range(1, 8)} <= labels, labels
    # One source image per slice: every stored SEG frame points at one of the sent slices.
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    referenced = {str(ref.ReferencedSOPInstanceUID)
                  for frame in seg.PerFrameFunctionalGroupsSequence
                  for item in frame.DerivationImageSequence
                  for ref in item.SourceImageSequence}
    assert referenced and referenced <= sent
    report = dcmread(by_modality["SR"][0])
    texts = [str(e.value) for e in report.iterall() if e.keyword in ("TextValue", "SeriesDescription")]
    assert any("NOT FOR CLINICAL USE" in t.upper() for t in texts), texts


def test_every_committed_model_card_validates_against_its_graph():
    import os
    import sys

    from tests.nodeproc import REPO

    out = subprocess.run([sys.executable, "-m", "spine_node.node.cli", "models", "validate"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("cspine-ct-vertebra-seg", "cspine-ct-fracture", "xray-spine-unet-ap", "xray-tissue-xnet"):
        assert name in out.stdout
