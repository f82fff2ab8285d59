"""docs/deploy.md, run: every code block of the deployment guide against the real thing.

The blocks are read from the guide itself (each follows a ``<!-- snippet: NAME -->`` line), so
the page cannot drift from what is tested, and a block without a test fails
:func:`test_every_block_of_the_guide_is_tested`. What a test machine needs is changed, and
only that (:meth:`Machine.adjust`): ``/etc/dicomnode``, ``/var/lib/dicomnode`` and the other
system paths become folders under a temporary root, ``/opt/dicomnode/venv/bin`` the folder of
the Python running the tests, the example hosts loopback on free ports. The node is started the
way systemd starts it: the unit's ``ExecStartPre=`` then ``ExecStart=`` command lines, with
its ``Environment=`` and ``EnvironmentFile=``, in its ``WorkingDirectory=``; and stopped the way
``KillMode=mixed`` stops it (SIGTERM to the main process, then at most ``TimeoutStopSec``).
The PACS is a real Orthanc with the guide's configuration keys and Lua rule.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import cache
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomnode import config as node_config
from dicomnode.phantom import make_phantom_study, write_study
from listener import STORESCU, storescu
from nodeproc import REPO, NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from pki import OPENSSL, make_pki
from routing import ROUTE_CT, ROUTE_CT_AND_SEGMENTATIONS, series_in_study, store_to_pacs
from tcpproxy import HoldingProxy

DOC = REPO / "docs" / "deploy.md"
DOCKER = REPO / "docker"
#: The shipped files that the guide shows whole.
SHIPPED = {
    "dicomnode.sysusers": DOCKER / "systemd" / "dicomnode.sysusers",
    "dicomnode.service": DOCKER / "systemd" / "dicomnode.service",
    "orthanc.json": DOCKER / "orthanc" / "orthanc.json",
    "route-ct.lua": DOCKER / "orthanc" / "route-ct.lua",
}
#: Every block of the guide, by the test (or tests) that run it.
TESTED = {
    "dicomnode.sysusers": "test_sysusers_creates_the_service_user",
    "node.toml": "test_check_config_passes_with_the_secrets_and_names_the_missing_one",
    "secrets.env": "test_a_ct_sent_to_orthanc_comes_back_as_a_report",
    "route-ct.lua": "test_a_ct_sent_to_orthanc_comes_back_as_a_report",
    "orthanc.json": "test_a_ct_sent_to_orthanc_comes_back_as_a_report",
    "pacs-cstore.toml": "test_the_cstore_destination_passes_check_config",
    "dicomnode.service": "test_the_unit_verifies_and_is_hardened (and every node started here)",
    "journald.conf": "test_the_journald_retention_uses_keys_journald_knows",
    "upgrade.sh": "test_an_upgrade_with_a_job_in_flight",
    "backup.sh": "test_backups_of_a_running_node_are_consistent",
    "restore.sh": "test_a_backup_restores_into_the_data_folder",
    "prometheus.yml": "test_prometheus_scrapes_the_metrics_with_the_token",
    "healthz.sh": "test_the_health_check_follows_the_destination",
}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SYSTEMD_SYSUSERS = shutil.which("systemd-sysusers")
JOURNALD = next((p for p in (Path("/lib/systemd/systemd-journald"),
                             Path("/usr/lib/systemd/systemd-journald")) if p.exists()), None)
CURL = shutil.which("curl")
#: The program of the unit's command lines, and the Python environment it lives in.
VENV_BIN = "/opt/dicomnode/venv/bin/"
#: How long the node may take to load its models and listen (2 busy cores).
START_SECONDS = 180


# --------------------------------------------------------------------------- the guide
@cache
def snippets() -> dict[str, str]:
    """The guide's marked blocks, by name."""
    found: dict[str, str] = {}
    pattern = re.compile(r"^<!-- snippet: ([\w.-]+) -->\n```[^\n]*\n(.*?)^```$", re.M | re.S)
    for match in pattern.finditer(DOC.read_text(encoding="utf-8")):
        assert match.group(1) not in found, f"two blocks named {match.group(1)}"
        found[match.group(1)] = match.group(2)
    return found


def snippet(name: str) -> str:
    return snippets()[name]


def unit() -> dict[str, dict[str, list[str]]]:
    """The unit's settings: section -> key -> values, in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in snippet("dicomnode.service").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key: str) -> str:
    """The one value of ``key`` in ``[Service]``."""
    (value,) = unit()["Service"][key]
    return value


def environment_file(text: str) -> dict[str, str]:
    """``KEY=value`` lines of an ``EnvironmentFile=`` (comments and blank lines skipped)."""
    pairs = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def seconds(value: str) -> float:
    """A systemd time span without unit or in seconds (``60``, ``5s``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s?", value)
    assert match, f"not a time span in seconds: {value}"
    return float(match.group(1))


def node_toml() -> dict:
    return tomllib.loads(snippet("node.toml"))


# --------------------------------------------------------------------------- the machine
class Machine:
    """A temporary root with the guide's files where the guide puts them, and the node
    started and stopped as the unit says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node_port, self.http_port = free_port(), free_port()
        self.etc = self.path("/etc/dicomnode")
        self.data_dir = self.path(node_toml()["node"]["data_dir"])
        self.pacs: Orthanc | None = None
        #: Where the node's STOW-RS goes instead of the PACS itself (a proxy), when set.
        self.stow_url = ""
        self.node: NodeProcess | None = None
        self.stops: list[float] = []
        self.proxies: list[HoldingProxy] = []
        # /etc/dicomnode as the guide lays it out, the certificates from a throw-away CA.
        (self.etc / "tls").mkdir(parents=True)
        (root / "pki").mkdir()
        pki = make_pki(root / "pki", key_password="unused")
        for name, source in (("node.crt", "server.crt"), ("node.key", "server.key"),
                             ("ca.crt", "ca.crt")):
            shutil.copy(pki[source], self.etc / "tls" / name)
        self.ca = pki["ca.crt"]
        secrets = self.path(service("EnvironmentFile"))
        secrets.write_text(snippet("secrets.env"), encoding="utf-8")
        secrets.chmod(0o600)
        self.config = self.etc / "node.toml"
        self.config.write_text(self.adjust(snippet("node.toml")), encoding="utf-8")

    def path(self, system_path: str) -> Path:
        """Where a path of the guide lies under the temporary root."""
        assert system_path.startswith("/"), system_path
        return self.root / system_path.lstrip("/")

    def adjust(self, text: str) -> str:
        """The guide's text with system paths under the temporary root, the program of the
        unit in this Python's folder, and the example hosts on loopback."""
        replacements = {
            VENV_BIN: str(Path(sys.executable).parent) + "/",
            # Loopback, where the node lets credentials go over plain http.
            "https://pacs.example.org/dicom-web": self.stow_url or (
                self.pacs.dicomweb_url if self.pacs else "http://127.0.0.1:9/dicom-web"),
            "dicomnode.example.org:11180": f"localhost:{self.http_port}",
        }
        for system_path in ("/etc/dicomnode", "/var/lib/dicomnode", "/var/cache/dicomnode",
                            "/srv/backup/dicomnode", "/etc/prometheus"):
            replacements[system_path] = str(self.path(system_path))
        for old, new in replacements.items():
            text = text.replace(old, new)
        return text

    def secrets(self) -> dict[str, str]:
        return environment_file(self.path(service("EnvironmentFile")).read_text())

    def environment(self, *, with_secrets: bool = True) -> dict[str, str]:
        """The node's environment under the unit: ``Environment=``, ``EnvironmentFile=``; and
        the listener and status page on loopback at free ports (the documented overrides)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        for assignment in unit()["Service"].get("Environment", []):
            for item in shlex.split(assignment):
                key, _, value = item.partition("=")
                env[key] = self.adjust(value)
        if with_secrets:
            env.update(self.secrets())
        env.update(DICOMNODE_NODE__HOST="127.0.0.1", DICOMNODE_NODE__PORT=str(self.node_port),
                   DICOMNODE_HTTP__HOST="127.0.0.1", DICOMNODE_HTTP__PORT=str(self.http_port))
        return env

    def command(self, key: str) -> list[str]:
        """``ExecStartPre=`` or ``ExecStart=`` as an argument list (no prefixes like ``-``)."""
        line = service(key)
        assert line[0] not in "-@+!:", f"{key} has a prefix the test does not emulate"
        return shlex.split(self.adjust(line))

    def check_config(self, *, with_secrets: bool = True) -> subprocess.CompletedProcess[str]:
        """The unit's ``ExecStartPre=``."""
        return subprocess.run(self.command("ExecStartPre"),
                              env=self.environment(with_secrets=with_secrets),
                              cwd=self.working_directory(), capture_output=True, text=True,
                              timeout=120)

    def working_directory(self) -> Path:
        """``WorkingDirectory=``, made first as systemd makes ``StateDirectory=``."""
        folder = self.path(service("WorkingDirectory"))
        folder.mkdir(parents=True, exist_ok=True, mode=int(service("StateDirectoryMode"), 8))
        return folder

    # -- systemctl start / stop
    def start(self, **overrides: str) -> NodeProcess:
        """``systemctl start dicomnode``: ``ExecStartPre=``, then ``ExecStart=`` until the
        listener answers. Under umask 022: the node makes its files private itself. In a
        process group of its own, as in the unit's control group."""
        checked = self.check_config()
        assert checked.returncode == 0, checked.stderr
        node = NodeProcess(self.config, self.node_port, self.root / "node.log")
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen(
                self.command("ExecStart"), env={**self.environment(), **overrides},
                cwd=self.working_directory(), stdout=log, stderr=subprocess.STDOUT, umask=0o022,
                start_new_session=True)
        self.node = node
        wait_until(lambda: listening(self.node_port) or node.process.poll() is not None,
                   START_SECONDS, "the node to listen", node)
        assert node.process.poll() is None, node.log_tail()
        return node

    def stop(self) -> float:
        """``systemctl stop dicomnode`` with ``KillMode=mixed``: SIGTERM to the main process;
        the seconds it took to exit (at most ``TimeoutStopSec``, with exit status 0)."""
        assert service("KillMode") == "mixed" and service("KillSignal") == "SIGTERM"
        node, self.node = self.node, None
        assert node is not None and node.process is not None
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        try:
            code = node.process.wait(seconds(service("TimeoutStopSec")))
        except subprocess.TimeoutExpired:
            node.kill()
            raise AssertionError(f"the node outlived TimeoutStopSec:\n{node.log_tail()}") from None
        took = time.monotonic() - started
        assert code == 0, f"exit status {code}:\n{node.log_tail()}"
        self.stops.append(took)
        return took

    # -- what the node holds
    def job_states(self, study_uid: str) -> list[tuple[str, str, str]]:
        return query(self.data_dir / "jobs.sqlite",
                     "SELECT id, state, reason FROM jobs WHERE study_uid = ? ORDER BY created_at",
                     (study_uid,))

    def run_as_node_user(self, words: list[str]) -> subprocess.CompletedProcess[str]:
        """A ``sudo -u dicomnode ...`` line: the command, as the test's user."""
        return subprocess.run([self.adjust(w) for w in words], capture_output=True, text=True,
                              timeout=120, env=self.environment(with_secrets=False))

    def play(self, script: str, *, before_stop: Callable[[], None] = lambda: None) -> list[str]:
        """Run an administrator's block line by line; the output of each command run.

        ``sudo -u dicomnode CMD``: CMD as the test's user; ``sudo systemctl stop|start
        dicomnode``: :meth:`stop` / :meth:`start`; ``sudo .../pip install``: not run (nothing
        newer to install). Any other line fails the test: the block would not be tested.
        """
        outputs = []
        for line in script.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            if words[:3] == ["sudo", "-u", service("User")]:
                done = self.run_as_node_user(words[3:])
                assert done.returncode == 0, f"{line}\n{done.stderr}"
                outputs.append(done.stdout)
            elif words == ["sudo", "systemctl", "stop", "dicomnode"]:
                before_stop()
                print(f"\nstopped in {self.stop():.1f} s")
            elif words == ["sudo", "systemctl", "start", "dicomnode"]:
                self.start()
            elif words[:3] == ["sudo", VENV_BIN + "pip", "install"]:
                pass
            else:
                raise AssertionError(f"test_deploy does not know how to play {line!r}")
        return outputs


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def phantom(seed: int, folder: Path, shape: tuple[int, int, int] = (16, 64, 64)) -> str:
    """A synthetic CT series written to ``folder``; its Study Instance UID."""
    study = make_phantom_study(seed, shape=shape, spacing=(2.5, 2.0, 2.0))
    write_study(study, folder)
    return str(study.datasets[0].StudyInstanceUID)


def sr_count(pacs: Orthanc, study_uid: str) -> int:
    return len(series_in_study(pacs, study_uid).get("SR", []))


def needs(*tools: tuple[object, str]) -> None:
    missing = [why for present, why in tools if not present]
    if missing:
        pytest.skip("needs " + ", ".join(missing))


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Machine:
    needs((Path(OPENSSL).exists(), "openssl"))
    return Machine(tmp_path_factory.mktemp("deploy"))


class GuideOrthanc(Orthanc):
    """The test Orthanc (tests/orthanc.py) run with the guide's keys and Lua rule: the
    modality at the test node, StableAge 2 s, RemoteAccessAllowed false (loopback only)."""

    def __init__(self, workdir: Path, fragment: dict, node_port: int) -> None:
        (name, peer), = fragment["DicomModalities"].items()
        assert Path(fragment["LuaScripts"][0]).name == "route-ct.lua"
        super().__init__(workdir, users=fragment["RegisteredUsers"],
                         lua_script=snippet("route-ct.lua"),
                         modalities={name: (peer["AET"], "127.0.0.1", node_port)},
                         stable_age=2, aet=fragment["DicomAet"])
        self.fragment = fragment

    def config(self) -> dict:
        config = super().config()
        for key, value in self.fragment.items():
            config.setdefault(key, value)  # a key tests/orthanc.py does not set itself
        return config


@pytest.fixture(scope="module")
def deployment(machine: Machine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """The machine with Orthanc (the guide's keys and rule) and the node running."""
    needs((ORTHANC.exists() and DICOMWEB_PLUGIN.exists(), "orthanc and orthanc-dicomweb"),
          (STORESCU.exists(), "dcmtk"))
    machine.pacs = GuideOrthanc(tmp_path_factory.mktemp("orthanc"),
                                json.loads(snippet("orthanc.json")), machine.node_port)
    machine.pacs.start()
    machine.config.write_text(machine.adjust(snippet("node.toml")), encoding="utf-8")
    try:
        machine.start()
        yield machine
    finally:
        if machine.node is not None:
            machine.node.stop()
        for proxy in machine.proxies:
            proxy.close()
        machine.pacs.stop()


# --------------------------------------------------------------------------- static checks
def test_every_block_of_the_guide_is_tested() -> None:
    text = DOC.read_text(encoding="utf-8")
    fences = re.findall(r"^```", text, re.M)
    assert len(fences) == 2 * len(snippets()), "a block of docs/deploy.md has no snippet marker"
    assert set(snippets()) == set(TESTED)
    # ... and each is read by a test of this module.
    source = Path(__file__).read_text(encoding="utf-8")
    for name in TESTED:
        assert source.count(f'snippet("{name}")') >= 1, f"no test reads {name}"


def test_the_shipped_files_are_the_guide_s_blocks() -> None:
    for name, path in SHIPPED.items():
        assert path.read_text(encoding="utf-8") == snippet(name), f"{path} differs from the guide"


def test_the_lua_rules_are_the_ones_the_tests_load() -> None:
    def code(path: Path) -> str:
        lines = path.read_text(encoding="utf-8").splitlines()
        return "\n".join(line for line in lines if not line.startswith("--")).strip()

    assert code(DOCKER / "orthanc" / "route-ct.lua") == ROUTE_CT.strip()
    assert code(DOCKER / "orthanc" / "route-ct-and-segmentations.lua") == \
        ROUTE_CT_AND_SEGMENTATIONS.strip()


def test_the_pieces_fit_together() -> None:
    """The names one block uses are the ones the others define."""
    toml = node_toml()
    secrets = environment_file(snippet("secrets.env"))
    fragment = json.loads(snippet("orthanc.json"))
    (stow,) = [d for d in toml["destinations"] if d["kind"] == "stow"]
    # The unit: its user, its secrets, its data folder, its configuration.
    assert service("User") == service("Group") == "dicomnode"
    assert service("EnvironmentFile") == "/etc/dicomnode/secrets.env"
    assert snippet("secrets.env").startswith("# " + service("EnvironmentFile"))
    data_dir = toml["node"]["data_dir"]
    assert data_dir == "/var/lib/" + service("StateDirectory")
    assert data_dir == service("ReadWritePaths") == service("WorkingDirectory")
    for key in ("ExecStartPre", "ExecStart"):
        assert shlex.split(service(key))[-2:] == ["--config", "/etc/dicomnode/node.toml"]
    assert shlex.split(service("ExecStartPre"))[:2] == [VENV_BIN + "dicomnode", "check-config"]
    assert shlex.split(service("ExecStart"))[:2] == [VENV_BIN + "dicomnode", "serve"]
    assert service("Restart") == "on-failure"
    # The node waits up to 30 s for a job step in progress before it exits.
    assert seconds(service("TimeoutStopSec")) > 30
    # Every secret the configuration names is in the secrets file, none in the TOML.
    named = [toml["http"]["token_env"], stow["password_env"]]
    assert sorted(named) == sorted(secrets)
    assert not any(value in snippet("node.toml") for value in secrets.values())
    # The PACS knows the node by the node's AE title and the node's user by its password;
    # the node admits the PACS's AE title.
    (peer,) = fragment["DicomModalities"].values()
    assert peer["AET"] == toml["node"]["ae_title"] and peer["Port"] == toml["node"]["port"]
    assert toml["node"]["allowed_calling_aes"] == [fragment["DicomAet"]]
    assert fragment["RegisteredUsers"] == {stow["username"]: secrets[stow["password_env"]]}
    assert Path(fragment["LuaScripts"][0]).name in {p.name for p in SHIPPED.values()}
    # The backup script names the databases the node keeps, in its data folder.
    assert f"data={data_dir}\n" in snippet("backup.sh")


@pytest.mark.skipif(SYSTEMD_SYSUSERS is None, reason="needs systemd-sysusers (systemd)")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc" / "sysusers.d").mkdir(parents=True)
    (tmp_path / "etc" / "sysusers.d" / "dicomnode.conf").write_text(snippet("dicomnode.sysusers"))
    done = subprocess.run([SYSTEMD_SYSUSERS, f"--root={tmp_path}"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    name, _, uid, gid, _, home, shell = users[service("User")]
    assert service("Group") in groups
    assert int(uid) < 1000 and home == node_toml()["node"]["data_dir"]
    assert shell.endswith("/nologin")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (systemd)")
def test_the_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    # systemd-analyze verify insists that the programs exist: the one under test.
    program = str(Path(sys.executable).parent / "dicomnode")
    assert Path(program).exists()
    unit_file = tmp_path / "dicomnode.service"
    unit_file.write_text(snippet("dicomnode.service").replace(VENV_BIN + "dicomnode", program))
    verified = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_file)], capture_output=True,
                              text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    rated = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(unit_file)],
                           capture_output=True, text=True, timeout=60)
    assert rated.returncode == 0, rated.stderr
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", rated.stdout).group(1))
    print(f"\nsystemd-analyze security: exposure {level}")
    assert level < 2.5
    # The figure the guide gives is the one measured.
    claimed = re.search(r"rates it ([\d.]+)", DOC.read_text(encoding="utf-8"))
    assert claimed and float(claimed.group(1)) == level


@pytest.mark.skipif(JOURNALD is None or SYSTEMD_ANALYZE is None, reason="needs systemd")
def test_the_journald_retention_uses_keys_journald_knows() -> None:
    binary = JOURNALD.read_bytes()
    lines = [line for line in snippet("journald.conf").splitlines() if line.strip()]
    assert lines[0] == "[Journal]"
    settings = dict(line.split("=", 1) for line in lines[1:])
    for key in settings:
        assert f"Journal.{key}".encode() in binary, f"journald does not know {key}"
    assert settings["Storage"] in {"volatile", "persistent", "auto", "none"}
    assert re.fullmatch(r"\d+[KMGT]?", settings["SystemMaxUse"])
    parsed = subprocess.run([SYSTEMD_ANALYZE, "timespan", settings["MaxRetentionSec"]],
                            capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr


# --------------------------------------------------------------------------- configuration
def test_check_config_passes_with_the_secrets_and_names_the_missing_one(machine: Machine) -> None:
    checked = machine.check_config()
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stdout
    refused = machine.check_config(with_secrets=False)
    assert refused.returncode == 1
    assert "http.token_env" in refused.stderr and "DICOMNODE_STATUS_TOKEN" in refused.stderr


def test_the_cstore_destination_passes_check_config(machine: Machine, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(machine.adjust(snippet("node.toml") + "\n" + snippet("pacs-cstore.toml")))
    env = machine.environment()
    checked = subprocess.run([*machine.command("ExecStartPre")[:-1], str(config)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    loaded = node_config.load(config, env)
    cstore = loaded.destinations[-1]
    assert [d.kind for d in loaded.destinations] == ["stow", "cstore"]
    assert cstore.tls and cstore.port == 2762 and cstore.ae_title == "PACS"


# --------------------------------------------------------------------------- the running node
@pytest.mark.orthanc
@pytest.mark.slow
def test_a_ct_sent_to_orthanc_comes_back_as_a_report(deployment: Machine, tmp_path: Path) -> None:
    m = deployment
    pacs = m.pacs
    # GuideOrthanc runs with exactly the guide's keys, but for what a test machine changes.
    fragment = json.loads(snippet("orthanc.json"))
    expected = {**fragment, "StableAge": 2, "RemoteAccessAllowed": False,
                "LuaScripts": [str(pacs.workdir / "script.lua")],
                "DicomModalities": {"node": {"AET": "DICOMNODE", "Host": "127.0.0.1",
                                             "Port": m.node_port}}}
    actual = pacs.config()
    assert {key: actual[key] for key in expected} == expected
    study_uid = phantom(10_301, tmp_path / "ct")
    # The node admits the PACS's AE title only.
    refused = storescu(m.node_port, "-aet", "STORESCU", "+sd", tmp_path / "ct")
    assert refused.returncode != 0 and "calling ae title not recognized" in refused.stderr.lower()
    store_to_pacs(pacs, sorted((tmp_path / "ct").iterdir()))
    wait_until(lambda: [s for _, s, _ in m.job_states(study_uid)] == ["delivered"], 300,
               "the routed series' job to be delivered", m.node)
    wait_until(lambda: sr_count(pacs, study_uid) == 1, 30, "the SR in Orthanc", m.node)
    # Files private to the node's user, though it started under umask 022.
    assert (m.data_dir.stat().st_mode & 0o777) == 0o700
    for db in ("index.sqlite", "jobs.sqlite"):
        assert ((m.data_dir / db).stat().st_mode & 0o777) == 0o600
    # The font cache went where the unit's Environment= puts it.
    cache_dir = Path(m.environment()["MPLCONFIGDIR"])
    assert list(cache_dir.glob("fontlist-*.json")), f"no font cache in {cache_dir}"


@pytest.mark.orthanc
@pytest.mark.slow
@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_the_health_check_follows_the_destination(deployment: Machine) -> None:
    m = deployment
    command = m.adjust(snippet("healthz.sh"))

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)

    healthy = check()
    assert healthy.returncode == 0, healthy.stderr
    assert json.loads(healthy.stdout)["status"] == "ok"
    m.pacs.stop()
    try:
        wait_until(lambda: check().returncode == 22, 30, "/healthz to fail without the PACS",
                   m.node, poll=1)
    finally:
        m.pacs.start()
    wait_until(lambda: check().returncode == 0, 30, "/healthz to recover", m.node, poll=1)


@pytest.mark.orthanc
@pytest.mark.slow
def test_prometheus_scrapes_the_metrics_with_the_token(deployment: Machine) -> None:
    m = deployment
    (job,) = yaml.safe_load(m.adjust(snippet("prometheus.yml")))["scrape_configs"]
    auth, tls = job["authorization"], job["tls_config"]
    # Prometheus reads the token from the file, trimmed; and the CA that signed the node.
    token_file, ca_file = Path(auth["credentials_file"]), Path(tls["ca_file"])
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(m.secrets()["DICOMNODE_STATUS_TOKEN"] + "\n")
    shutil.copy(m.ca, ca_file)
    (target,) = job["static_configs"][0]["targets"]
    url = f"{job['scheme']}://{target}{job.get('metrics_path', '/metrics')}"
    token = token_file.read_text().strip()
    scheme = auth.get("type", "Bearer")
    answer = requests.get(url, headers={"Authorization": f"{scheme} {token}"},
                          verify=str(ca_file), timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(answer.text)}
    assert any(name.startswith("dicomnode_") for name in names), sorted(names)
    wrong = requests.get(url, headers={"Authorization": f"{scheme} not-the-token"},
                         verify=str(ca_file), timeout=10)
    assert wrong.status_code == 401


@pytest.mark.orthanc
@pytest.mark.slow
def test_backups_of_a_running_node_are_consistent(deployment: Machine, tmp_path: Path) -> None:
    m = deployment
    script = tmp_path / "backup.sh"
    script.write_text(m.adjust(snippet("backup.sh")))
    backups = m.path("/srv/backup/dicomnode")

    def back_up() -> Path:
        before = set(backups.glob("*")) if backups.exists() else set()
        time.sleep(1)  # the script names each backup by the second
        done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        (made,) = set(backups.glob("*")) - before
        return made

    study_uid = phantom(10_302, tmp_path / "ct", shape=(48, 64, 64))
    sending = subprocess.Popen([str(STORESCU), "-aet", "ORTHANC", "-aec", "DICOMNODE",
                                "127.0.0.1", str(m.node_port), "+sd", str(tmp_path / "ct")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    copies = []
    while not copies or [s for _, s, _ in m.job_states(study_uid)] != ["delivered"]:
        copies.append(back_up())
        assert len(copies) < 200, m.node.log_tail()
    assert sending.wait(60) == 0, sending.stdout.read()
    final = back_up()
    live_uids = {uid for (uid,) in query(m.data_dir / "index.sqlite",
                                         "SELECT sop_instance_uid FROM instances")}
    for copy in [*copies, final]:
        for db in ("index.sqlite", "jobs.sqlite"):
            with closing(sqlite3.connect(copy / db)) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with closing(sqlite3.connect(copy / "index.sqlite")) as conn:
            rows = conn.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
        assert {uid for uid, _ in rows} <= live_uids
        with tarfile.open(copy / "files.tar") as archive:
            members = set(archive.getnames())
        assert "status.key" in members
        assert not any(Path(name).name.startswith(".") for name in members)
        for _, path in rows:  # every instance the index names is in the archive
            assert str(Path(path).relative_to(m.data_dir)) in members
    print(f"\n{len(copies)} backups while the node received and analysed the series")
    # The last copy is the node's state: the same instances, the same delivered job.
    with closing(sqlite3.connect(final / "index.sqlite")) as conn:
        copied_uids = {uid for (uid,) in conn.execute("SELECT sop_instance_uid FROM instances")}
    assert copied_uids == live_uids
    copy_config = write_config(
        tmp_path / "copy.toml", port=0, data_dir=final,
        destinations=[{"kind": "folder", "path": tmp_path / "unused"}])
    listed = subprocess.run([sys.executable, "-m", "dicomnode", "jobs", "--json", "--config",
                             str(copy_config)], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    copied = {(j["id"], j["state"]) for j in json.loads(listed.stdout)}
    live = {(j["id"], j["state"]) for j in m.node.jobs()}
    assert copied == live and (m.job_states(study_uid)[0][0], "delivered") in copied


@pytest.mark.orthanc
@pytest.mark.slow
def test_a_backup_restores_into_the_data_folder(deployment: Machine, tmp_path: Path) -> None:
    m = deployment
    if m.node is None:
        m.start()
    script = tmp_path / "backup.sh"
    script.write_text(m.adjust(snippet("backup.sh")))
    backups = m.path("/srv/backup/dicomnode")
    before = set(backups.glob("*")) if backups.exists() else set()
    time.sleep(1)  # one backup a second
    done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (backup,) = set(backups.glob("*")) - before
    jobs = {(j["id"], j["state"]) for j in m.node.jobs()}
    instances = set(query(m.data_dir / "index.sqlite",
                          "SELECT sop_instance_uid, path FROM instances"))
    in_pacs = len(m.pacs.instance_ids())
    (placeholder,) = set(re.findall(r"/srv/backup/dicomnode/(\w+)/", snippet("restore.sh")))
    m.play(snippet("restore.sh").replace(placeholder, backup.name))
    assert {(j["id"], j["state"]) for j in m.node.jobs()} == jobs
    assert set(query(m.data_dir / "index.sqlite",
                     "SELECT sop_instance_uid, path FROM instances")) == instances
    assert all(Path(path).is_file() for _, path in instances)
    time.sleep(node_toml().get("completion", {}).get("quiet_seconds", 5) + 3)
    assert len(m.pacs.instance_ids()) == in_pacs  # nothing delivered twice


@pytest.mark.orthanc
@pytest.mark.slow
def test_an_upgrade_with_a_job_in_flight(deployment: Machine, tmp_path: Path) -> None:
    """The job is delivering when the node is stopped: a proxy holds back the PACS's answer
    to its STOW-RS request (Orthanc has stored the objects, the node does not know it). The
    node waits 30 s for the step, exits, and after the start delivers the same objects again."""
    m = deployment
    (stow,) = [d for d in node_toml()["destinations"] if d["kind"] == "stow"]
    assert stow["timeout_seconds"] > 30  # the request outlives the node's 30 s of grace
    proxy = HoldingProxy(m.pacs.http_port)
    m.proxies.append(proxy)
    m.stop()
    m.stow_url = f"{proxy.url}/dicom-web"
    m.config.write_text(m.adjust(snippet("node.toml")), encoding="utf-8")
    m.start()
    proxy.hold("response")
    study_uid = phantom(10_303, tmp_path / "ct")
    sent = storescu(m.node_port, "-aet", "ORTHANC", "+sd", tmp_path / "ct")
    assert sent.returncode == 0, sent.stderr
    assert proxy.response_held.wait(300), m.node.log_tail()
    at_sigterm: list[str] = []
    listings = m.play(snippet("upgrade.sh"), before_stop=lambda: at_sigterm.extend(
        s for _, s, _ in m.job_states(study_uid)))
    ((job_id, _, _),) = m.job_states(study_uid)
    assert at_sigterm == ["delivering"]
    assert job_id in listings[0] and "delivering" in listings[0]
    # The node gave the step its 30 s, then exited (0) well before TimeoutStopSec.
    assert 29 < m.stops[-1] < seconds(service("TimeoutStopSec")) - 10
    proxy.release()  # the held exchange is dropped; from now on the proxy passes through
    wait_until(lambda: [s for _, s, _ in m.job_states(study_uid)] == ["delivered"], 300,
               "the job to be delivered after the restart", m.node)
    assert job_id in listings[-1]
    # Sent again, with the same UIDs: Orthanc holds the objects once.
    assert proxy.forwarded >= 2
    assert sr_count(m.pacs, study_uid) == 1


@pytest.mark.orthanc
@pytest.mark.slow
def test_why_the_unit_stops_the_main_process_only(deployment: Machine, tmp_path: Path) -> None:
    """systemd's default ``KillMode=control-group`` sends SIGTERM to every process of the
    service: the radiomics workers die with the node and the job in progress fails (as the
    guide says); ``dicomnode retry`` then runs it again."""
    m = deployment
    m.stop()
    # Radiomics worker processes whatever the number of cores here.
    node = m.start(DICOMNODE_RADIOMICS__WORKERS="2")
    study_uid = phantom(10_304, tmp_path / "ct", shape=(48, 128, 128))
    sent = storescu(m.node_port, "-aet", "ORTHANC", "+sd", tmp_path / "ct")
    assert sent.returncode == 0, sent.stderr
    wait_until(lambda: [s for _, s, _ in m.job_states(study_uid)] == ["running"], 120,
               "the job to run", node, poll=0.02)
    os.killpg(node.process.pid, signal.SIGTERM)  # KillMode=control-group
    assert node.process.wait(seconds(service("TimeoutStopSec"))) == 0
    m.node = None
    ((job_id, state, reason),) = m.job_states(study_uid)
    assert state == "failed" and "radiomics worker process died" in reason, reason
    retried = m.run_as_node_user([VENV_BIN + "dicomnode", "retry", job_id, "--config",
                                  "/etc/dicomnode/node.toml"])
    assert retried.returncode == 0, retried.stderr
    m.start()
    wait_until(lambda: [s for _, s, _ in m.job_states(study_uid)] == ["delivered"], 300,
               "the retried job to be delivered", m.node)


@pytest.mark.orthanc
@pytest.mark.slow
def test_sigterm_stops_the_idle_node_well_within_timeoutstopsec(deployment: Machine) -> None:
    m = deployment
    if m.node is None:
        m.start()
    took = m.stop()
    print(f"\nidle node stopped in {took:.1f} s")
    assert took < seconds(service("TimeoutStopSec")) / 4
