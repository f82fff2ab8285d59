"""The configuration loader: typed values, env overrides, errors that name the bad key."""

from pathlib import Path

import pytest

from dicomnode.config import Config, ConfigError, from_mapping, home, load, read_secret

LISTENERS = Path(__file__).resolve().parents[2] / "listeners"


@pytest.mark.parametrize("name", sorted(p.name for p in LISTENERS.glob("*.toml")))
def test_shipped_listener_configs_are_valid(name):
    config = load(LISTENERS / name, environ={})
    assert isinstance(config, Config)


def test_defaults_resolve_against_home():
    config = load(None, environ={})
    assert config.resolve(config.segmentation.model_dir) == home() / "models" / "segmentation"
    assert config.destinations[0].kind == "folder"


def test_environment_overrides_file_values():
    config = from_mapping({"node": {"port": 104}}, environ={"DICOMNODE_NODE__PORT": "11113"})
    assert config.node.port == 11113


@pytest.mark.parametrize(
    "data, environ, fragment",
    [
        ({"node": {"prot": 1}}, {}, "node.prot: unknown key"),
        ({"nodes": {}}, {}, "nodes: unknown section"),
        ({"node": {"port": "abc"}}, {}, "node.port: expected int"),
        ({"completion": {"gap_policy": "maybe"}}, {}, "completion.gap_policy: 'maybe' is not one of"),
        ({}, {"DICOMNODE_NODE__PORT": "x"}, "node.port: expected int"),
        ({}, {"DICOMNODE_NOPE__PORT": "1"}, "unknown section 'nope'"),
        ({"destinations": [{"kind": "stow", "url": "ftp://x"}]}, {}, "destinations[0].url"),
        ({"destinations": [{"kind": "cstore", "host": "h"}]}, {}, "needs ae_title, host and port"),
        ({"destinations": [{"kind": "fax"}]}, {}, "destinations[0].kind"),
    ],
)
def test_errors_name_the_bad_key(data, environ, fragment):
    with pytest.raises(ConfigError) as info:
        from_mapping(data, environ=environ)
    assert fragment in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = \n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.toml")


def test_secrets_come_from_environment_or_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PACS_PW", "s3cret")
    assert read_secret("PACS_PW", "") == "s3cret"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert read_secret("", str(secret)) == "from-file"
    assert read_secret("", "") is None
    monkeypatch.delenv("PACS_PW")
    with pytest.raises(ConfigError, match="PACS_PW"):
        read_secret("PACS_PW", "")


def test_calling_ae_whitelist_from_toml_or_environment():
    from_toml = from_mapping({"node": {"allowed_calling_aes": ["PACS", "CT1"]}}, environ={})
    assert from_toml.node.allowed_calling_aes == ("PACS", "CT1")
    from_env = from_mapping({}, environ={"DICOMNODE_NODE__ALLOWED_CALLING_AES": "PACS,CT1"})
    assert from_env.node.allowed_calling_aes == ("PACS", "CT1")
    assert Config().node.require_called_ae and Config().node.allowed_calling_aes == ()
