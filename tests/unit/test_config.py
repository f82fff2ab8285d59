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
        ({"destinations": [{"kind": "stow", "url": "http://x", "tls": True}]}, {},
         "destinations[0].tls: only a cstore destination"),
        ({"destinations": [{"kind": "cstore", "ae_title": "P", "host": "h", "port": 1,
                            "tls": True, "tls_cert_file": "c.crt"}]}, {},
         "give both tls_cert_file and tls_key_file"),
        ({"destinations": [{"kind": "cstore", "ae_title": "P", "host": "h", "port": 1,
                            "tls_cert_file": "c.crt", "tls_key_file": "c.key"}]}, {},
         "destinations[0].tls_cert_file: set tls = true"),
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


@pytest.mark.parametrize(
    "node, fragment",
    [
        ({"tls_cert_file": "node.crt"}, "node.tls_key_file: TLS needs both"),
        ({"tls_key_file": "node.key"}, "node.tls_cert_file: TLS needs both"),
        ({"tls_ca_file": "ca.crt"}, "node.tls_ca_file: set only with"),
        (
            {"tls_cert_file": "n.crt", "tls_key_file": "n.key", "tls_require_client_cert": True},
            "node.tls_require_client_cert: needs tls_ca_file",
        ),
        (
            {"tls_cert_file": "n.crt", "tls_key_file": "n.key", "tls_key_password_env": "PW",
             "tls_key_password_file": "/run/secrets/pw"},
            "not both",
        ),
        ({"tls_cert_file": "n.crt", "tls_key_file": "n.key", "tls_min_version": "1.1"},
         "node.tls_min_version: '1.1' is not one of"),
    ],
)
def test_tls_settings_that_do_not_fit_together_name_the_key(node, fragment):
    with pytest.raises(ConfigError) as info:
        from_mapping({"node": node}, environ={})
    assert fragment in str(info.value)


def test_tls_is_off_by_default_and_on_with_certificate_and_key():
    from dicomnode.receive import server_tls_context

    assert not Config().node.tls and server_tls_context(Config()) is None
    config = from_mapping({}, environ={"DICOMNODE_NODE__TLS_CERT_FILE": "n.crt",
                                       "DICOMNODE_NODE__TLS_KEY_FILE": "n.key",
                                       "DICOMNODE_NODE__TLS_REQUIRE_CLIENT_CERT": "true",
                                       "DICOMNODE_NODE__TLS_CA_FILE": "ca.crt"})
    assert config.node.tls and config.node.tls_require_client_cert


def test_missing_or_unreadable_tls_files_stop_start_up_naming_the_key(tmp_path):
    from dicomnode.receive import server_tls_context

    missing = from_mapping(
        {"node": {"tls_cert_file": str(tmp_path / "absent.crt"), "tls_key_file": "n.key"}},
        environ={},
    )
    with pytest.raises(ConfigError, match=r"node\.tls_cert_file: .*absent\.crt does not exist"):
        server_tls_context(missing)
    garbage = tmp_path / "node.crt"
    garbage.write_text("not a certificate\n")
    not_pem = from_mapping(
        {"node": {"tls_cert_file": str(garbage), "tls_key_file": str(garbage)}}, environ={}
    )
    with pytest.raises(ConfigError, match=r"node\.tls_cert_file: no PEM certificate"):
        server_tls_context(not_pem)


def stow(**keys: object) -> dict:
    return {"destinations": [{"kind": "stow", "name": "pacs", **keys}]}


@pytest.mark.parametrize(
    "data, fragment",
    [
        (stow(url="https://pacs:99999/dicom-web"), "destinations[0].url: the port must be a number in 1..65535"),
        (stow(url="https://pacs:0/dicom-web"), "destinations[0].url: the port must be"),
        (stow(url="https://pacs:https/dicom-web"), "destinations[0].url: the port must be"),
        (stow(url="https:///dicom-web"), "destinations[0].url: a stow destination needs an http(s)"),
        (stow(url="https://[::1/dicom-web"), "destinations[0].url: not a valid URL"),
        (stow(url="https://pa\ncs/dicom-web"), "destinations[0].url: contains spaces or control"),
        (stow(url="https://node:s3cret@pacs/dicom-web"), "destinations[0].url: no user or password in the URL"),
        (stow(url="http://pacs/dicom-web", username="node", password_env="PW"),
         "destinations[0].url: username over plain http:// would cross the network in clear: use "
         "an https:// URL (or, on a network you trust, destinations[0].allow_insecure_credentials"),
        (stow(url="http://pacs.example.org/dicom-web", token_file="/run/secrets/token"),
         "destinations[0].url: token_file over plain http://"),
        ({"destinations": [{"kind": "folder", "allow_insecure_credentials": True}]},
         "destinations[0].allow_insecure_credentials: only a stow destination uses it"),
        ({"destinations": [{"kind": "cstore", "ae_title": "PACS", "host": "pacs", "port": 99999}]},
         "destinations[0].port: must lie in 1..65535, got 99999"),
        ({"destinations": [{"kind": "cstore", "ae_title": "PACS", "host": "pacs", "port": -104}]},
         "destinations[0].port: must lie in 1..65535"),
        ({"node": {"port": 99999}}, "node.port: must lie in 0..65535"),
    ],
)
def test_bad_urls_ports_and_clear_text_credentials_are_refused(data, fragment):
    with pytest.raises(ConfigError) as info:
        from_mapping(data, environ={})
    assert fragment in str(info.value)
    assert "s3cret" not in str(info.value)  # a URL's password is never echoed


@pytest.mark.parametrize(
    "keys",
    [
        {"url": "https://pacs.example.org:8443/dicom-web", "username": "node", "password_env": "PW"},
        {"url": "http://pacs.example.org/dicom-web"},  # no credentials: nothing to leak
        {"url": "http://pacs/dicom-web", "token_env": "T", "allow_insecure_credentials": True},
        # Loopback traffic never reaches the network (a local TLS front end, a test PACS).
        {"url": "http://127.0.0.1:8042/dicom-web", "username": "node", "password_file": "/pw"},
        {"url": "http://localhost/dicom-web", "token_env": "T"},
        {"url": "http://[::1]:8042/dicom-web", "username": "node", "password_env": "PW"},
    ],
)
def test_https_no_credentials_an_explicit_allowance_or_loopback_pass(keys):
    (destination,) = from_mapping(stow(**keys), environ={}).destinations
    assert destination.url == keys["url"]


def test_every_kind_the_configuration_accepts_has_its_class():
    """Destinations and runners are registries (kind -> class): a kind the schema allows but
    no class serves would fail only when a node starts."""
    import typing

    from dicomnode.config import DestinationConfig, RunnerConfig
    from dicomnode.deliver.base import DESTINATION_KINDS
    from dicomnode.jobs.remote import RUNNER_KINDS

    def kinds(cls: type) -> set[str]:
        return set(typing.get_args(typing.get_type_hints(cls)["kind"]))

    assert kinds(DestinationConfig) == set(DESTINATION_KINDS)
    assert kinds(RunnerConfig) == set(RUNNER_KINDS)
    for target in DESTINATION_KINDS.values():
        module, name = target.split(":")
        assert hasattr(__import__(module, fromlist=[name]), name), target


def test_relative_paths_are_resolved_once_against_the_home(tmp_path, monkeypatch):
    """Whatever the working directory, every stage gets absolute paths: the listener's TLS
    files, a destination's CA and secret files, model folders, the data folder."""
    from dicomnode.config import home

    monkeypatch.chdir(tmp_path)
    config = from_mapping({
        "node": {"data_dir": "var/x", "tls_cert_file": "tls/n.crt", "tls_key_file": "tls/n.key"},
        "http": {"token_file": "secrets/status"},
        "destinations": [{"kind": "stow", "url": "https://pacs/dicom-web", "ca_file": "ca.pem",
                          "token_file": "secrets/pacs"}],
    })
    assert config.node.data_dir == home() / "var/x"
    assert config.node.tls_cert_file == str(home() / "tls/n.crt")
    assert config.http.token_file == str(home() / "secrets/status")
    (destination,) = config.destinations
    assert (destination.ca_file, destination.token_file) == (
        str(home() / "ca.pem"), str(home() / "secrets/pacs"))
    assert config.segmentation.model_dir == home() / "models/segmentation"
    absolute = from_mapping({"node": {"data_dir": str(tmp_path)}})
    assert absolute.node.data_dir == tmp_path
