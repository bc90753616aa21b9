"""End to end with a real PACS: Orthanc -> node -> worker -> SEG + SR back in Orthanc.

The pipeline here is the test-only bone-threshold pipeline (its outputs are computed
from the pixels); the seed-model pipelines have their own end-to-end tests.
"""

from __future__ import annotations

import json

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from spine_node.node.audit import Dispatch, Job
from tests.dicom_factory import write_study
from tests.nodeproc import NodeProcess, wait_for
from tests.orthanc import Orthanc

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22",
              "1.2.840.10008.5.1.4.1.1.88.33"}


def test_orthanc_study_comes_back_with_seg_and_sr(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    study = write_study(tmp_path / "in", series=1, per_series=4)
    node = NodeProcess(tmp_path / "node", url)
    with Orthanc(tmp_path / "orthanc", {"node": ("SPINE_NODE", "127.0.0.1", node.port)}) as pacs:
        node.with_worker_dispatching_to(pacs.ae_title, pacs.dicom_port)
        node.env.update({
            "SPINE_NODE_WORKER__PIPELINE_MODULES": '["tests.pipelines_for_tests"]',
            "SPINE_NODE_ROUTES": json.dumps([{"name": "ct", "match": {"modality": ["CT"]},
                                              "pipelines": ["test-bone-threshold"]}]),
        })
        with node:
            for files in study.values():
                for f in files:
                    pacs.upload(f)
            study_id = pacs.get("/studies")[0]
            pacs.post("/modalities/node/store", {"Resources": [study_id], "Synchronous": True})

            def results_in_pacs():  # type: ignore[no-untyped-def]
                found = [i for i in pacs.instances() if i.get("SOPClassUID") in SR_CLASSES | {SEG}]
                return len(found) >= 2 and found
            found = wait_for(results_in_pacs, timeout=180, interval=1)
            study_uid = next(iter(pacs.instances()))["StudyInstanceUID"]
            assert {i["SOPClassUID"] for i in found} & {SEG}
            assert {i["SOPClassUID"] for i in found} & SR_CLASSES
            assert all(i["StudyInstanceUID"] == study_uid for i in found)

            engine = create_engine(url)

            def dispatches_settled():  # type: ignore[no-untyped-def]
                # Orthanc holds the objects as soon as each C-STORE lands; the node marks a
                # dispatch sent only after the association ends, a moment later.
                with Session(engine) as session:
                    rows = list(session.scalars(select(Dispatch)))
                return rows if rows and all(d.state == "sent" for d in rows) else None
            wait_for(dispatches_settled, timeout=30, interval=0.5)
            with Session(engine) as session:
                jobs = list(session.scalars(select(Job)))
                dispatches = list(session.scalars(select(Dispatch)))
            engine.dispose()
            assert [(j.pipeline, j.state) for j in jobs] == [("test-bone-threshold", "succeeded")]
            assert jobs[0].backend and jobs[0].timings
            assert dispatches and all(d.state == "sent" for d in dispatches)
            status = node.cli("status").stdout
            assert "succeeded: 1" in status and "live workers" in status
