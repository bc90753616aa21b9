"""Receive end to end: DCMTK echoscu/storescu push to a live `spine-node serve`."""

from __future__ import annotations

import subprocess

from spine_node.node.audit import Association, AuditEvent, Job, Series
from tests.dicom_factory import dataset_bytes, write_study
from tests.nodeproc import NodeProcess, table_rows, wait_for
from tests.peers import dcmtk


def test_storescu_study_arrives_byte_identical_and_is_routed(tmp_path, database_url):
    study = write_study(tmp_path / "in", series=2, per_series=4)
    with NodeProcess(tmp_path / "node", database_url) as node:
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                               "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                               "+sd", "127.0.0.1", str(node.port), str(tmp_path / "in")],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr

        spool = node.data_dir / "spool"
        for series_uid, files in study.items():
            for original in files:
                from pydicom import dcmread

                ds = dcmread(original, stop_before_pixels=True)
                stored = spool / ds.StudyInstanceUID / series_uid / f"{ds.SOPInstanceUID}.dcm"
                assert stored.is_file(), stored
                assert dataset_bytes(stored) == dataset_bytes(original)
                assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID

        def routed():  # type: ignore[no-untyped-def]
            rows = table_rows(database_url, Series)
            return len(rows) == 2 and all(r.state in ("routed", "skipped") for r in rows) and rows
        rows = {r.series_uid: r for r in wait_for(routed, timeout=60)}
        uids = list(study)
        assert rows[uids[0]].instance_count == 4 and rows[uids[0]].state == "routed"
        assert rows[uids[1]].state == "skipped"  # a chest CT matches no spine route
        assert rows[uids[0]].calling_ae_title == "MODALITY"

        jobs = table_rows(database_url, Job)
        assert [(j.series_uid, j.pipeline, j.state) for j in jobs] == [
            (uids[0], "ct-cspine-fracture", "queued")]

        def released():  # type: ignore[no-untyped-def]
            return [a for a in table_rows(database_url, Association) if a.state == "released"]
        assocs = wait_for(lambda: len(released()) >= 2 and released())
        store_assoc = max(assocs, key=lambda a: a.instances_received)
        assert store_assoc.instances_received == 8 and store_assoc.calling_ae_title == "MODALITY"
        kinds = {e.kind for e in table_rows(database_url, AuditEvent)}
        assert {"series.complete", "series.skipped", "job.created"} <= kinds

        # Re-sending the same instances replaces them: counts do not double.
        again = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                                "+sd", "127.0.0.1", str(node.port), str(tmp_path / "in")],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0
        rows = {r.series_uid: r for r in wait_for(routed, timeout=60)}
        assert rows[uids[0]].instance_count == 4
        assert len(list((spool / rows[uids[0]].study_uid / uids[0]).glob("*.dcm"))) == 4


def test_unknown_calling_ae_is_rejected(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_DICOM__ALLOWED_CALLING_AE_TITLES": '["MODALITY"]'}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        ok = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                             "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "SPINE_NODE",
                              "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        assert "Rejected" in bad.stderr or "rejected" in bad.stderr.lower()
        rejected = wait_for(lambda: [a for a in table_rows(url, Association) if a.state == "rejected"])
        assert rejected[0].calling_ae_title == "INTRUDER"
        assert rejected[0].reason == "calling AE title not allowed"


def test_host_not_on_allowlist_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    env = {"SPINE_NODE_DICOM__ALLOWED_HOSTS": '["10.99.0.0/16"]'}
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        bad = subprocess.run([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "SPINE_NODE",
                              "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        rejected = wait_for(lambda: [a for a in table_rows(url, Association) if a.state == "rejected"])
        assert rejected[0].reason == "host not allowed" and rejected[0].peer_host == "127.0.0.1"
        assert node.proc is not None and node.proc.poll() is None, "node keeps running"
