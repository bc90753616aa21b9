"""The admin CLI against a live node."""

from __future__ import annotations

import subprocess

from tests.dicom_factory import write_study
from tests.nodeproc import NodeProcess, wait_for
from tests.peers import dcmtk


def test_status_series_audit_and_routes_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'node.db'}"
    study = write_study(tmp_path / "in", series=2, per_series=2)
    with NodeProcess(tmp_path / "node", url) as node:
        push = subprocess.run([dcmtk("storescu"), "-aet", "CT01", "-aec", "SPINE_NODE", "+sd",
                               "127.0.0.1", str(node.port), str(tmp_path / "in")],
                              capture_output=True, text=True, timeout=120)
        assert push.returncode == 0, push.stderr
        wait_for(lambda: "routed" in node.cli("series", "list", "--state", "routed").stdout, timeout=60)

        status = node.cli("status")
        assert "up" in status.stdout and "C-ECHO ok" in status.stdout
        assert "routed: 1" in status.stdout and "skipped: 1" in status.stdout
        assert "queued: 1" in status.stdout

        listing = node.cli("series", "list", "--limit", "10").stdout
        for series_uid in study:
            assert series_uid[:12] in listing

        audit = node.cli("audit", "tail", "-n", "50").stdout
        assert "series.complete" in audit and "series.skipped" in audit and "job.created" in audit

        routes = node.cli("routes", "test", str(tmp_path / "in")).stdout
        assert "ct-cspine-fracture" in routes and "none: skipped" in routes

    # Node stopped: status says so and exits non-zero.
    down = node.cli("status", check=False)
    assert down.returncode == 1 and "down" in down.stdout


def test_bad_config_gives_a_clear_error_and_exit_code_2(tmp_path):
    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}",
                       env={"SPINE_NODE_DICOM__AE_TITLE": "A_TITLE_FAR_TOO_LONG_FOR_DICOM"})
    result = node.cli("serve", check=False)
    assert result.returncode == 2
    assert "dicom.ae_title" in result.stderr and "1-16" in result.stderr


def test_database_without_schema_is_reported(tmp_path):
    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path / 'empty.db'}")
    result = node.cli("series", "list", check=False)
    assert result.returncode == 2 and "spine-node db upgrade" in result.stderr
