from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spine_node.node.config import load_settings, redact_url, unknown_env_names, validate_ae_title
from spine_node.node.errors import ConfigError
from tests.peers import postgres_database


def test_embedded_defaults_need_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.broker_url == "filesystem://"
    assert settings.dicom.port == 11112
    assert settings.routes, "default routes exist"


def test_toml_file_and_env_override(tmp_path, monkeypatch):
    config = tmp_path / "node.toml"
    config.write_text(
        '[dicom]\nae_title = "MY_NODE"\nport = 4242\nallowed_calling_ae_titles = ["PACS"]\n'
        '[[dispatch.destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4243\n'
    )
    monkeypatch.setenv("SPINE_NODE_DICOM__PORT", "5555")
    settings = load_settings(config)
    assert settings.dicom.ae_title == "MY_NODE"
    assert settings.dicom.port == 5555  # env beats file
    assert settings.dispatch.destinations[0].ae_title == "ORTHANC"
    assert settings.dicom.calling_ae_allowed("PACS")
    assert not settings.dicom.calling_ae_allowed("INTRUDER")


@pytest.mark.parametrize(
    "toml, needle",
    [
        ('[dicom]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "dicom.ae_title"),
        ('[dicom]\nport = 70000\n', "invalid port 70000"),
        ('[dicom]\nallowed_hosts = ["not-an-ip"]\n', "not-an-ip"),
        ('database_url = "mysql://x"\n', "unsupported database_url"),
        ('[assembly]\nquiet_period_s = -1\n', "quiet_period_s"),
        ('[[routes]]\nname = "r"\npipelines = ["Bad Name"]\n', "Bad Name"),
        ('[[routes]]\nname = "r"\npipelines = ["x"]\nmatch = {sop_class_uid = ["1.2.a"]}\n', "1.2.a"),
        ('unknown_key = 1\n', "unknown_key"),
    ],
)
def test_bad_config_names_the_value(tmp_path, toml, needle):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert needle in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_ae_title_rules():
    assert validate_ae_title(" PACS ") == "PACS"
    for bad in ["", "    ", "A" * 17, "BACK\\SLASH", "TAB\t"]:
        with pytest.raises(ValueError):
            validate_ae_title(bad)


def test_redact_url_hides_password():
    assert redact_url("postgresql://user:secret@db/x") == "postgresql://user:***@db/x"
    assert "secret" not in redact_url("redis://:secret@host:6379/0")


# --- unknown keys and variables, through the real CLI ------------------------------------

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``spine-node ARGS`` in ``cwd``, with no SPINE_NODE_* setting from the caller's environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    return subprocess.run([sys.executable, "-m", "spine_node.node.cli", *args], cwd=cwd,
                          env={**clean, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "toml, key, section, suggestion",
    [
        ("[dicom]\nprot = 12000\n", "prot", "[dicom]", "port"),
        ('[dicom]\nae_tilte = "NODE"\n', "ae_tilte", "[dicom]", "ae_title"),
        ("[storage]\nmin_fre_mb = 100\n", "min_fre_mb", "[storage]", "min_free_mb"),
        ("[dicom.tls]\nenabeld = true\n", "enabeld", "[dicom.tls]", "enabled"),
        ('[[routes]]\nname = "r"\npipelines = ["xray-fracture"]\nmacth = {modality = ["CR"]}\n',
         "macth", "[[routes]] #1", "match"),
        ('[[dispatch.destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nprto = 1\n',
         "prto", "[[dispatch.destinations]] #1", "port"),
        ("[dicomm]\nport = 104\n", "dicomm", "at the top level", "dicom"),
    ],
)
def test_an_unknown_key_stops_with_one_line_naming_it_and_its_section(tmp_path, toml, key, section,
                                                                      suggestion):
    config = tmp_path / "node.toml"
    config.write_text(toml)
    done = run_cli("--config", str(config), "serve", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"unknown key {key!r}" in lines[0] and section in lines[0]
    assert f"did you mean {suggestion!r}" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "spine-node-data").exists()


def test_unknown_environment_variables_are_named_in_a_warning_not_an_error(tmp_path):
    done = run_cli("pipelines", "list", cwd=tmp_path,
                   env={"SPINE_NODE_DICOM__PROT": "104", "SPINE_NODE_NOSUCH": "1",
                        "SPINE_NODE_DICOM__PORT": "1104", "SPINE_NODE_REQUIRE_PEERS": "1"})
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "SPINE_NODE_" in line]
    assert len(warning) == 1
    named = warning[0].split("set nothing: ", 1)[1].split("; nested", 1)[0]
    assert named == "SPINE_NODE_DICOM__PROT (did you mean SPINE_NODE_DICOM__PORT?), SPINE_NODE_NOSUCH"


def test_unknown_environment_variables_do_not_reach_the_settings(monkeypatch):
    monkeypatch.setenv("SPINE_NODE_DICOM__PROT", "104")
    monkeypatch.setenv("SPINE_NODE_DICOM__PORT", "1104")
    settings = load_settings()
    assert settings.dicom.port == 1104
    assert unknown_env_names() == ["SPINE_NODE_DICOM__PROT"]


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgresql_urls_mean_psycopg2(scheme):
    settings = load_settings(database_url=f"{scheme}://user@db.example:5432/node")
    assert settings.database_url == "postgresql+psycopg2://user@db.example:5432/node"
    explicit = load_settings(database_url="postgresql+psycopg2://user@db/node")
    assert explicit.database_url == "postgresql+psycopg2://user@db/node"


@pytest.mark.postgres
def test_a_plain_postgresql_url_migrates_and_serves_the_cli(tmp_path):
    with postgres_database() as url:
        plain = url.replace("postgresql+psycopg2://", "postgresql://", 1)
        assert plain.startswith("postgresql://")
        env = {"SPINE_NODE_DATABASE_URL": plain}
        upgraded = run_cli("db", "upgrade", cwd=tmp_path, env=env)
        assert upgraded.returncode == 0, upgraded.stderr
        listed = run_cli("series", "list", cwd=tmp_path, env=env)
        assert listed.returncode == 0, listed.stderr
