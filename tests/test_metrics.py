"""The Prometheus endpoint of a live ``serve``, and the helpers workers call."""

from __future__ import annotations

import subprocess

from prometheus_client import REGISTRY

from spine_node.node import metrics
from tests.dicom_factory import write_study
from tests.nodeproc import NodeProcess
from tests.peers import dcmtk, free_port
from tests.test_serve_processes import scrape


def test_refused_instances_and_associations_are_counted(tmp_path):
    write_study(tmp_path / "in", seed="refused", series=1, per_series=3)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    metrics_port = free_port()
    env = {
        "SPINE_NODE_METRICS_PORT": str(metrics_port),
        # A free-space floor no disk meets: every instance is answered 0xA700.
        "SPINE_NODE_STORAGE__MIN_FREE_MB": str(1 << 40),
        "SPINE_NODE_DICOM__ALLOWED_CALLING_AE_TITLES": '["MODALITY"]',
    }
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        before = scrape(metrics_port)
        assert before[("spine_node_instances_received_total", ())] == 0
        assert before[("spine_node_database_up", ())] == 1
        subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "+sd", "--no-halt",
                        "127.0.0.1", str(node.port), str(tmp_path / "in")],
                       capture_output=True, text=True, timeout=60)
        bad = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "SPINE_NODE",
                              "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0
        after = scrape(metrics_port)
    assert after[("spine_node_instances_refused_total", (("status", "0xA700"),))] == 3
    assert after[("spine_node_instances_received_total", ())] == 0
    assert after[("spine_node_associations_total", (("outcome", "accepted"),))] == 1
    assert after[("spine_node_associations_total", (("outcome", "rejected"),))] == 1
    assert after[("spine_node_jobs", (("state", "queued"),))] == 0


def test_observe_inference_and_dispatch_failure():
    labels = {"model": "test-model", "backend": "onnxruntime"}
    count = REGISTRY.get_sample_value("spine_node_inference_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("spine_node_inference_seconds_sum", labels) or 0.0
    metrics.observe_inference("test-model", "onnxruntime", 0.3)
    assert REGISTRY.get_sample_value("spine_node_inference_seconds_count", labels) == count + 1
    assert abs(REGISTRY.get_sample_value("spine_node_inference_seconds_sum", labels) - total - 0.3) < 1e-9
    bucket = REGISTRY.get_sample_value("spine_node_inference_seconds_bucket", {**labels, "le": "0.5"})
    assert bucket is not None and bucket >= 1
    failures = REGISTRY.get_sample_value("spine_node_dispatch_failures_total", {"destination": "pacs"}) or 0.0
    metrics.observe_dispatch_failure("pacs")
    assert REGISTRY.get_sample_value("spine_node_dispatch_failures_total", {"destination": "pacs"}) == failures + 1


def test_dead_process_files_are_dropped(tmp_path):
    (tmp_path / "counter_999999999.db").write_bytes(b"")
    (tmp_path / "counter_1.db").write_bytes(b"")  # pid 1 is alive
    metrics.prepare_multiprocess_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_1.db"]


def test_worker_inference_and_dispatch_failures_reach_the_endpoint(tmp_path):
    """An embedded worker shares serve's metrics folder: its observations are scraped too."""
    import json

    from tests.nodeproc import wait_for

    write_study(tmp_path / "in", seed="worker-metrics", series=1, per_series=3)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    metrics_port = free_port()
    env = {
        "SPINE_NODE_METRICS_PORT": str(metrics_port),
        "SPINE_NODE_WORKER__EMBEDDED": "true",
        "SPINE_NODE_WORKER__PIPELINE_MODULES": '["tests.pipelines_for_tests"]',
        "SPINE_NODE_ROUTES": json.dumps([{"name": "ct", "match": {"modality": ["CT"]},
                                          "pipelines": ["test-bone-threshold"]}]),
        # Nothing listens there: every send fails and is counted.
        "SPINE_NODE_DISPATCH__DESTINATIONS": json.dumps([{
            "name": "nowhere", "ae_title": "NOWHERE", "host": "127.0.0.1", "port": free_port()}]),
        "SPINE_NODE_DISPATCH__BACKOFF_INITIAL_S": "0.5",
    }
    with NodeProcess(tmp_path / "node", url, env=env) as node:
        push = subprocess.run([dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_NODE", "+sd",
                               "127.0.0.1", str(node.port), str(tmp_path / "in")],
                              capture_output=True, text=True, timeout=60)
        assert push.returncode == 0, push.stderr

        def observed():  # type: ignore[no-untyped-def]
            samples = scrape(metrics_port)
            failures = samples.get(("spine_node_dispatch_failures_total", (("destination", "nowhere"),)), 0)
            return failures >= 1 and samples
        samples = wait_for(observed, timeout=180, interval=1)
    runs = {labels: value for (name, labels), value in samples.items()
            if name == "spine_node_inference_seconds_count"}
    assert sum(runs.values()) == 1
    (labels, _count), = runs.items()
    assert dict(labels)["model"] == "test-bone-threshold"
    assert samples[("spine_node_jobs", (("state", "succeeded"),))] == 1
    assert samples[("spine_node_instances_received_total", ())] == 3
