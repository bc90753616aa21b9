from __future__ import annotations

import pytest

from spine_node.node.config import load_settings, redact_url, validate_ae_title
from spine_node.node.errors import ConfigError


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
