"""The admin CLI against a live node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dicom_factory import write_study
from tests.nodeproc import NodeProcess, wait_for
from tests.peers import dcmtk, free_port


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


# --- exits, options and messages ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``spine-node ARGS`` in ``cwd``, with no SPINE_NODE_* setting from the caller's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    return subprocess.run([sys.executable, "-m", "spine_node.node.cli", *args], cwd=cwd,
                          env={**clean, "PYTHONPATH": str(REPO), "COLUMNS": "250", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed with exit 2 (no traceback)."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@pytest.fixture
def node_folder(tmp_path: Path) -> Path:
    """A node folder with a migrated SQLite database and a config naming it."""
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "node.toml").write_text(
        f'database_url = "sqlite:///{folder / "node.db"}"\n[storage]\ndata_dir = "{folder / "data"}"\n'
        '[[routes]]\nname = "my-ct-route"\npipelines = ["ct-cspine-fracture"]\nmatch = { modality = ["CT"] }\n')
    done = run_cli("db", "upgrade", "--config", str(folder / "node.toml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.parametrize("command", [("serve",), ("status",), ("series", "list"), ("audit", "tail"),
                                     ("jobs", "list"), ("dispatch", "list"), ("pipelines", "list"),
                                     ("models", "list"), ("db", "upgrade"), ("worker",)])
def test_config_after_the_subcommand_is_used(tmp_path, command):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nprot = 1\n")
    done = run_cli(*command, "--config", str(bad), cwd=tmp_path)
    assert "unknown key 'prot' in [dicom]" in one_error_line(done)


def test_config_before_or_after_the_subcommand_and_the_later_one_wins(tmp_path, node_folder):
    config = str(node_folder / "node.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nprot = 1\n")
    for args in (("--config", config, "pipelines", "list"), ("pipelines", "list", "-c", config),
                 ("--config", str(bad), "pipelines", "list", "--config", config)):
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        assert "my-ct-route" in done.stdout, args
    assert "--config" in run_cli("serve", "--help", cwd=tmp_path).stdout


def test_missing_things_exit_2_with_one_line(tmp_path, node_folder):
    env = {"SPINE_NODE_CONFIG": str(node_folder / "node.toml")}
    assert "job 999 does not exist" in one_error_line(run_cli("jobs", "show", "999", cwd=tmp_path, env=env))
    assert "no model 'nope'" in one_error_line(run_cli("models", "show", "nope", cwd=tmp_path, env=env))
    line = one_error_line(run_cli("series", "list", "--state", "bogus", cwd=tmp_path, env=env))
    assert "'bogus'" in line and "receiving, complete, routed, skipped" in line
    line = one_error_line(run_cli("audit", "tail", "--kind", "bogus", cwd=tmp_path, env=env))
    assert "'bogus'" in line and "job.started" in line and "dispatch.dead" in line
    for kind in ("job", "job.", "job.started", "series.complete"):
        assert run_cli("audit", "tail", "--kind", kind, cwd=tmp_path, env=env).returncode == 0, kind
    assert "routed" in run_cli("series", "list", "--help", cwd=tmp_path).stdout
    assert "dispatch.retried" in run_cli("audit", "tail", "--help", cwd=tmp_path).stdout


def test_a_read_only_command_elsewhere_creates_no_database(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for command in (("status",), ("series", "list"), ("jobs", "list"), ("audit", "tail")):
        line = one_error_line(run_cli(*command, cwd=elsewhere))
        assert "no database yet" in line and "spine-node serve" in line
    assert list(elsewhere.iterdir()) == []


DATABASE_COMMANDS = (("status",), ("series", "list"), ("audit", "tail"), ("jobs", "list"),
                     ("jobs", "show", "1"), ("jobs", "retry", "1"), ("jobs", "cancel", "1"),
                     ("jobs", "queues"), ("dispatch", "list"), ("dispatch", "retry", "1"),
                     ("db", "upgrade"))


@pytest.mark.parametrize("url, commands", [
    ("postgresql://postgres@127.0.0.1:{port}/nothing", DATABASE_COMMANDS),  # nothing listens there
    ("postgresql+nodriver://postgres@127.0.0.1/x", (("status",), ("jobs", "retry", "1"))),  # no such driver
    ("sqlite:///{folder}/not-a-database.db", (("series", "list"), ("db", "upgrade"))),  # not SQLite
])
def test_database_errors_are_one_line(tmp_path, url, commands):
    (tmp_path / "not-a-database.db").write_text("plain text, not SQLite")
    url = url.format(port=free_port(), folder=tmp_path)
    env = {"SPINE_NODE_DATABASE_URL": url, "SPINE_NODE_STORAGE__DATA_DIR": str(tmp_path / "data")}
    for command in commands:
        line = one_error_line(run_cli(*command, cwd=tmp_path, env=env))
        assert "cannot use database" in line, (command, line)


def test_a_route_naming_an_unknown_pipeline_stops_serve_and_routes_test(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[[routes]]\nname = "typo"\npipelines = ["ct-cspine-fractur"]\n'
                      'match = { modality = ["CT"] }\n')
    for command in (("serve",), ("routes", "test", str(config)), ("pipelines", "list")):
        done = run_cli(*command, "--config", str(config), cwd=tmp_path)
        line = one_error_line(done) if command != ("pipelines", "list") else done.stderr.strip()
        assert done.returncode == 2
        assert "route 'typo'" in line and "'ct-cspine-fractur'" in line, command
        if command != ("pipelines", "list"):
            assert "known pipelines: ct-cspine-fracture, " in line
    assert not (tmp_path / "spine-node-data").exists()


def test_serve_checks_pipelines_of_site_modules_too(tmp_path):
    routes = '[{"name": "site", "match": {"modality": ["CT"]}, "pipelines": ["test-bone-threshold"]}]'
    line = one_error_line(run_cli("serve", cwd=tmp_path, env={"SPINE_NODE_ROUTES": routes}))
    assert "route 'site' names unknown pipeline(s) 'test-bone-threshold'" in line
    line = one_error_line(run_cli("serve", cwd=tmp_path, env={
        "SPINE_NODE_ROUTES": routes, "SPINE_NODE_WORKER__PIPELINE_MODULES": '["no_such_site_module"]'}))
    assert "cannot import worker.pipeline_modules entry 'no_such_site_module'" in line
    # With the module, the route is valid and serve starts (test_metrics, test_end_to_end).


def test_pipelines_list_shows_models_and_routes(tmp_path):
    done = run_cli("pipelines", "list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") >= 3}
    assert "cspine-ct-vertebra-seg" in rows["ct-cspine-fracture"]
    assert "cspine-ct-fracture" in rows["ct-cspine-fracture"]
    assert "ct-cervical-spine" in rows["ct-cspine-fracture"]  # the default route
    assert "xray-fracture-mobilenet" in rows["xray-fracture"]
    # A site plug-in module registers its own pipelines.
    done = run_cli("pipelines", "list", cwd=tmp_path,
                   env={"SPINE_NODE_WORKER__PIPELINE_MODULES": '["tests.pipelines_for_tests"]'})
    assert "test-bone-threshold" in done.stdout


def test_serve_output_has_no_celery_banner_or_security_warning(tmp_path):
    node = NodeProcess(tmp_path / "node", f"sqlite:///{tmp_path / 'node.db'}",
                       env={"SPINE_NODE_WORKER__EMBEDDED": "true"})
    with node:
        wait_for(lambda: " ready." in node.log(), timeout=120)
    log = node.log()
    assert "spine-node listening as SPINE_NODE" in log
    assert "SecurityWarning" not in log and "superuser" not in log
    assert "[tasks]" not in log and "-------------- " not in log  # Celery's banner
