"""DICOM TLS on the listener, against dcmtk ``storescu +tls`` and ``echoscu +tls`` (receive.py).

The test makes its own PKI with the ``openssl`` command: a CA, a server certificate for
localhost / 127.0.0.1, a client certificate signed by the CA, and a client certificate from
another ("rogue") CA that the node does not trust.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE

from dicomnode.config import Config, NodeConfig
from dicomnode.errors import ConfigError
from dicomnode.phantom import make_phantom_study, write_study
from dicomnode.receive import server_tls_context, start_listener
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool
from listener import AE_TITLE, DCMTK_ENV, ECHOSCU, Node, echoscu, storescu
from pki import OPENSSL, Pki, make_pki

VERIFICATION = "1.2.840.10008.1.1"
KEY_PASSWORD = "correct horse battery staple"
SLICES = 3

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not Path(OPENSSL).exists():
        pytest.skip("the openssl command is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"), key_password=KEY_PASSWORD)


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    phantom = make_phantom_study(10_400, shape=(SLICES, 32, 32), spacing=(2.5, 3.0, 3.0),
                                 n_lesions=1)
    return write_study(phantom, tmp_path_factory.mktemp("ct"))


@pytest.fixture
def start_tls_node(start_node: Callable[..., Node], pki: Pki) -> Callable[..., Node]:
    """A listener with the server certificate and the test CA; NodeConfig options on top."""

    def start(**options: object) -> Node:
        settings: dict[str, object] = {
            "tls_cert_file": pki["server.crt"],
            "tls_key_file": pki["server.key"],
            "tls_ca_file": pki["ca.crt"],
            **options,
        }
        return start_node(**settings)

    return start


def client(pki: Pki, name: str = "client") -> list[str]:
    """dcmtk options: TLS with this client key and certificate, trusting the test CA."""
    return ["+tls", pki[f"{name}.key"], pki[f"{name}.crt"], "+cf", pki["ca.crt"]]


def stored(node: Node) -> int:
    return len(list(node.spool.root.rglob("*.dcm")))


def assert_nothing_stored(node: Node) -> None:
    assert stored(node) == 0
    assert node.index.pending_series() == []


def closing_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "dicomnode.receive" and r.getMessage().startswith("association ")]


# -- dcmtk over TLS -------------------------------------------------------------------------------


def test_storescu_over_tls_stores_and_the_log_names_the_client(
    start_tls_node: Callable[..., Node], pki: Pki, ct_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.receive")
    node = start_tls_node()
    done = storescu(node.port, *client(pki), *ct_files)
    assert done.returncode == 0, done.stdout + done.stderr
    (state,) = node.index.pending_series()
    assert state.instance_count == SLICES and stored(node) == SLICES

    echo = echoscu(node.port, "-aec", AE_TITLE, *client(pki))
    assert echo.returncode == 0, echo.stdout + echo.stderr

    lines = closing_lines(caplog)
    assert len(lines) == 2
    assert all("TLSv1.3" in line and "client certificate CN 'storescu-client'" in line
               for line in lines), lines
    assert f"{SLICES} stored" in lines[0]


def test_plain_tcp_is_refused_and_the_node_still_serves(
    start_tls_node: Callable[..., Node], pki: Pki, ct_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = start_tls_node()
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        plain = storescu(node.port, *ct_files)
    assert plain.returncode != 0
    assert_nothing_stored(node)
    assert "TLS handshake with 127.0.0.1:" in caplog.text
    assert echoscu(node.port, "-aec", AE_TITLE).returncode != 0

    done = storescu(node.port, *client(pki), *ct_files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stored(node) == SLICES


def test_a_client_that_does_not_trust_the_node_certificate_gives_up(
    start_tls_node: Callable[..., Node], pki: Pki, ct_files: list[Path]
) -> None:
    node = start_tls_node()
    # No +cf: dcmtk verifies the server's certificate (-rc, its default) against no CA.
    done = storescu(node.port, "+tls", pki["client.key"], pki["client.crt"], *ct_files)
    assert done.returncode != 0
    assert "certificate verify failed" in done.stdout + done.stderr
    assert_nothing_stored(node)


def test_a_certificate_from_another_ca_is_refused_even_when_not_required(
    start_tls_node: Callable[..., Node], pki: Pki, ct_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.receive")
    node = start_tls_node()  # tls_ca_file set, tls_require_client_cert false
    rogue = storescu(node.port, *client(pki, "rogue"), *ct_files)
    assert rogue.returncode != 0
    assert_nothing_stored(node)
    assert "certificate verify failed" in caplog.text

    # A client without a certificate is accepted here (anonymous TLS, +tla), and logged so.
    anonymous = storescu(node.port, "+tla", "+cf", pki["ca.crt"], *ct_files)
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    assert stored(node) == SLICES
    (line,) = closing_lines(caplog)
    assert "TLSv1.3, no client certificate" in line


def test_required_client_certificate_refuses_untrusted_and_anonymous_clients(
    start_tls_node: Callable[..., Node], pki: Pki, ct_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = start_tls_node(tls_require_client_cert=True)
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        rogue = storescu(node.port, *client(pki, "rogue"), *ct_files)
        anonymous = storescu(node.port, "+tla", "+cf", pki["ca.crt"], *ct_files)
    assert rogue.returncode != 0 and anonymous.returncode != 0
    assert_nothing_stored(node)
    assert "certificate verify failed" in caplog.text
    assert "peer did not return a certificate" in caplog.text

    done = storescu(node.port, *client(pki), *ct_files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stored(node) == SLICES


def test_a_peer_that_connects_and_stalls_does_not_hold_up_others(
    start_tls_node: Callable[..., Node], pki: Pki
) -> None:
    # pynetdicom's own server handshakes on its accepting thread: there, this idle connection
    # would block every later association until it closed.
    node = start_tls_node()
    with socket.create_connection(("127.0.0.1", node.port)):
        done = subprocess.run(
            [str(ECHOSCU), "-aec", AE_TITLE, *client(pki), "127.0.0.1",
             str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=20,
        )
    assert done.returncode == 0, done.stdout + done.stderr


def test_trusted_peers_that_stall_after_the_handshake_are_closed_and_others_served(
    start_tls_node: Callable[..., Node], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    # Ten TLS connections with a trusted client certificate, each sending the first 6 bytes
    # of an A-ASSOCIATE-RQ: before the connection guard they locked every sender out.
    node = start_tls_node(association_request_seconds=2)
    context = _client_context(pki, ssl.TLSVersion.TLSv1_3)
    stalled = []
    for _ in range(10):
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", node.port)),
                                  server_hostname="localhost")
        tls.sendall(struct.pack(">BBL", 0x01, 0, 200))
        stalled.append(tls)
    caplog.set_level(logging.WARNING, logger="dicomnode.receive")
    try:
        done = subprocess.run(
            [str(ECHOSCU), "-aec", AE_TITLE, *client(pki), "127.0.0.1", str(node.port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=20,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        stalled[-1].settimeout(10)
        assert stalled[-1].recv(1) == b""  # closed by the node at its deadline
    finally:
        for tls in stalled:
            tls.close()
    assert any("node.association_request_seconds" in r.getMessage() for r in caplog.records)


# -- TLS versions, with Python's ssl and pynetdicom ----------------------------------------------


def _client_context(pki: Pki, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca.crt"])
    context.maximum_version = maximum
    context.load_cert_chain(pki["client.crt"], pki["client.key"])
    return context


def test_tls_1_2_carries_dicom_with_forward_secret_aead_suites(
    start_tls_node: Callable[..., Node], pki: Pki
) -> None:
    node = start_tls_node(tls_require_client_cert=True)
    context = _client_context(pki, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", node.port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.2"
            name = tls.cipher()[0]
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AE_TITLE,
                         tls_args=(context, "localhost"))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_minimum_version_1_3_refuses_a_tls_1_2_client(
    start_tls_node: Callable[..., Node], pki: Pki
) -> None:
    node = start_tls_node(tls_min_version="1.3")
    context = _client_context(pki, ssl.TLSVersion.TLSv1_2)
    with socket.create_connection(("127.0.0.1", node.port)) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="localhost")


# -- start-up checks -------------------------------------------------------------------------------


def _tls_config(**options: object) -> Config:
    return Config(node=NodeConfig(host="127.0.0.1", port=0, **options))  # type: ignore[arg-type]


def test_a_key_that_does_not_match_the_certificate_stops_start_up(pki: Pki) -> None:
    config = _tls_config(tls_cert_file=pki["client.crt"], tls_key_file=pki["server.key"])
    with pytest.raises(ConfigError, match=r"node\.tls_key_file: .* does not match"):
        server_tls_context(config)


def test_encrypted_key_needs_its_password(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"tls_cert_file": pki["server.crt"], "tls_key_file": pki["server-encrypted.key"]}
    with pytest.raises(ConfigError, match=r"node\.tls_key_file: .*tls_key_password_env"):
        server_tls_context(_tls_config(**options))  # and never a prompt on the terminal

    monkeypatch.setenv("DICOMNODE_TEST_KEY_PASSWORD", KEY_PASSWORD)
    from_env = _tls_config(**options, tls_key_password_env="DICOMNODE_TEST_KEY_PASSWORD")
    assert isinstance(server_tls_context(from_env), ssl.SSLContext)
    secret = tmp_path / "key-password"
    secret.write_text(KEY_PASSWORD + "\n")
    assert server_tls_context(_tls_config(**options, tls_key_password_file=str(secret)))

    monkeypatch.setenv("DICOMNODE_TEST_KEY_PASSWORD", "wrong")
    with pytest.raises(ConfigError, match=r"node\.tls_key_file: .*configured password"):
        server_tls_context(from_env)
    monkeypatch.delenv("DICOMNODE_TEST_KEY_PASSWORD")
    with pytest.raises(ConfigError, match=r"node\.tls_key_password_env: .*not set"):
        server_tls_context(from_env)


def test_bad_tls_files_stop_the_listener_before_it_binds(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    config = _tls_config(tls_cert_file=pki["server.crt"], tls_key_file=pki["server.key"],
                         tls_ca_file=str(not_pem))
    index = Index(tmp_path / "index.sqlite")
    try:
        with pytest.raises(ConfigError, match=r"node\.tls_ca_file: no PEM certificate"):
            start_listener(config, Spool(tmp_path / "spool"), index)
    finally:
        index.close()
    bad_key = _tls_config(tls_cert_file=pki["server.crt"], tls_key_file=str(not_pem))
    with pytest.raises(ConfigError, match=r"node\.tls_key_file: .*not a readable PEM private key"):
        server_tls_context(bad_key)
