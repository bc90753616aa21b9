"""A real PACS (Orthanc) pushes a study to the node with C-STORE."""

from __future__ import annotations

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from spine_node.node.audit import Series
from tests.dicom_factory import dataset_bytes, write_study
from tests.nodeproc import NodeProcess, wait_for
from tests.orthanc import Orthanc


def test_orthanc_sends_study_to_node(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    study = write_study(tmp_path / "in", series=1, per_series=3)
    with NodeProcess(tmp_path / "node", url) as node, \
            Orthanc(tmp_path / "orthanc", {"node": ("SPINE_NODE", "127.0.0.1", node.port)}) as pacs:
        for files in study.values():
            for f in files:
                pacs.upload(f)
        study_id = pacs.get("/studies")[0]
        job = pacs.post("/modalities/node/store", {"Resources": [study_id], "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
        engine = create_engine(url)

        def routed():  # type: ignore[no-untyped-def]
            with Session(engine) as session:
                rows = list(session.scalars(select(Series)))
            return rows and rows[0].state == "routed" and rows
        rows = wait_for(routed, timeout=60)
        engine.dispose()
        assert rows[0].instance_count == 3 and rows[0].calling_ae_title == "ORTHANC"
        series_uid, files = next(iter(study.items()))
        stored = sorted((node.data_dir / "spool" / rows[0].study_uid / series_uid).glob("*.dcm"))
        assert len(stored) == 3
        assert sorted(dataset_bytes(p) for p in stored) == sorted(dataset_bytes(p) for p in files)
