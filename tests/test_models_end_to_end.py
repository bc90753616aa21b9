"""The demo X-ray models end to end: storescu -> serve (default routes, embedded worker,
the committed ONNX weights) -> SEG + SR stored in Orthanc, each valid per dciodvfy.

The phantom is drawn from a seed no training run used. This checks the plumbing and the
objects; model quality is measured in tests/test_xray_models.py.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from node.audit import Job
from tests.nodeproc import NodeProcess, wait_for
from tests.orthanc import Orthanc
from tests.peers import dcmtk, tool

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
XRAY_PIPELINES = {"xray-fracture", "xray-spine-seg", "xray-tissue-seg", "xray-cspine-classify",
                  "xray-pair-classify"}


def test_xray_study_gets_every_pipeline_and_results_reach_the_pacs(tmp_path):
    phantoms = pytest.importorskip("inference.phantoms")
    seed = 77_000_001
    phantom = phantoms.generate(seed, region="cervical")
    for view, modality in (("AP", "DX"), ("LAT", "CR")):
        image = phantom.radiograph(view, photons=1e4, rng=np.random.default_rng(seed))
        phantoms.write_radiograph(image, tmp_path / "in" / view, view=view, modality=modality, seed=seed)

    url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProcess(tmp_path / "node", url)
    with Orthanc(tmp_path / "orthanc") as pacs:
        node.env.update({
            "SPINE_NODE_WORKER__EMBEDDED": "true",
            "SPINE_NODE_DISPATCH__DESTINATIONS": json.dumps([{
                "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                "port": pacs.dicom_port}]),
        })
        with node:
            push = subprocess.run([dcmtk("storescu"), "-aet", "XRAY01", "-aec", "SPINE_NODE", "+sd",
                                   "+r", "127.0.0.1", str(node.port), str(tmp_path / "in")],
                                  capture_output=True, text=True, timeout=120)
            assert push.returncode == 0, push.stderr
            engine = create_engine(url)

            def finished():  # type: ignore[no-untyped-def]
                with Session(engine) as session:
                    jobs = list(session.scalars(select(Job)))
                return len(jobs) == 9 and all(j.state in ("succeeded", "failed") for j in jobs) and jobs
            jobs = wait_for(finished, timeout=300, interval=1)
            engine.dispose()
            assert {j.pipeline for j in jobs} == XRAY_PIPELINES
            assert [j for j in jobs if j.state != "succeeded"] == [], [(j.pipeline, j.error) for j in jobs]
            assert all(j.backend and j.backend.startswith("onnxruntime") for j in jobs)

            def results_in_pacs():  # type: ignore[no-untyped-def]
                found = [i for i in pacs.instances() if i.get("Modality") in ("SEG", "SR")]
                return len(found) >= 9 and found
            found = wait_for(results_in_pacs, timeout=120, interval=1)
            assert {i["SOPClassUID"] for i in found if i["Modality"] == "SEG"} == {SEG}

    results = sorted((node.data_dir / "results").rglob("*.dcm"))
    assert len(results) >= 9
    dciodvfy = tool("dciodvfy", "dicom3tools")
    for path in results:
        check = subprocess.run([dciodvfy, "-new", str(path)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if "Error" in line]
        assert check.returncode == 0 and not errors, (path.name, errors)
