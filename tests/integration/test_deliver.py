"""Destinations against real servers: Orthanc (STOW-RS, C-STORE), small local HTTP stubs, folders.

What is checked is what the job runner relies on: per-instance outcomes, and ``retryable``
telling a temporary failure (nothing listening, timeout, 5xx, 429) from a permanent one (wrong
password, study mismatch, bad part), with the server's failure reason in the message.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.config import DestinationConfig
from dicomnode.deliver import make_destination
from listener import AE_TITLE
from orthanc import Orthanc, free_port
from pki import OPENSSL, Pki, make_pki
from tcpproxy import HoldingProxy

PASSWORD = "correct-horse-battery"
PATIENT_NAME = "Deliverytest^Secret"


def ct_instance(study: str, series: str, number: int = 1) -> Dataset:
    """A small CT image of one study and series, ready to be stored anywhere."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID = PATIENT_NAME, "P-DELIVER"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.InstanceNumber = "CT", number
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 8, 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    return ds


@pytest.fixture
def instances() -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [ct_instance(study, series, k) for k in (1, 2)]


def stow(url: str, **options: object) -> DestinationConfig:
    return DestinationConfig(
        **{"kind": "stow", "name": "pacs", "url": url, "timeout_seconds": 5.0, **options}
    )  # type: ignore[arg-type]


def messages(result) -> str:
    return " ".join([result.error, *(o.reason for o in result.outcomes)])


# -- STOW-RS against Orthanc ----------------------------------------------------------------


@pytest.mark.orthanc
def test_stow_stores_every_instance(orthanc: Orthanc, instances):
    result = make_destination(stow(orthanc.dicomweb_url)).send(instances)
    assert result.ok, messages(result)
    assert [o.sop_instance_uid for o in result.outcomes] == [ds.SOPInstanceUID for ds in instances]
    assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID for ds in instances}
    (study,) = orthanc.studies()
    (series,) = orthanc.series_of_study(study)
    stored = orthanc.download(orthanc.instances_of_series(series)[0])
    assert stored.SeriesInstanceUID == instances[0].SeriesInstanceUID


@pytest.mark.orthanc
def test_stow_basic_auth_from_environment(orthanc_factory, instances, monkeypatch):
    server = orthanc_factory(users={"node": PASSWORD})
    monkeypatch.setenv("DICOMNODE_TEST_PACS_PASSWORD", PASSWORD)
    cfg = stow(server.dicomweb_url, username="node", password_env="DICOMNODE_TEST_PACS_PASSWORD")
    result = make_destination(cfg).send(instances)
    assert result.ok, messages(result)
    assert server.sop_instance_uids() == {ds.SOPInstanceUID for ds in instances}


@pytest.mark.orthanc
def test_stow_wrong_password_is_a_permanent_failure(orthanc_factory, instances, tmp_path):
    server = orthanc_factory(users={"node": PASSWORD})
    secret = tmp_path / "pacs-password"
    secret.write_text("not-the-password\n", encoding="utf-8")
    cfg = stow(server.dicomweb_url, username="node", password_file=str(secret))
    result = make_destination(cfg).send(instances)
    assert not result.ok and not result.retryable
    assert "401" in messages(result)
    assert "not-the-password" not in messages(result)
    assert server.sop_instance_uids() == set()


@pytest.fixture(scope="module")
def https_pki(tmp_path_factory) -> Pki:
    if not Path(OPENSSL).exists():
        pytest.skip("the openssl command is not installed")
    return make_pki(tmp_path_factory.mktemp("pki"), key_password="unused")


@pytest.fixture
def https_front(https_pki: Pki) -> Callable[[Orthanc], HoldingProxy]:
    """An HTTPS front end (the test CA's server certificate) to an Orthanc's HTTP port.

    Orthanc 1.10's own HTTPS (CivetWeb with OpenSSL 3) crashes on the first request here, and
    hospitals commonly terminate TLS in front of the PACS anyway.
    """
    proxies: list[HoldingProxy] = []

    def front(server: Orthanc) -> HoldingProxy:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(https_pki["server.crt"], https_pki["server.key"])
        proxies.append(HoldingProxy(server.http_port, tls=context))
        return proxies[-1]

    yield front
    for proxy in proxies:
        proxy.close()


@pytest.mark.orthanc
def test_stow_over_https_with_basic_auth_from_a_file(orthanc_factory, instances, https_pki,
                                                      https_front, tmp_path):
    server = orthanc_factory(users={"node": PASSWORD})
    url = https_front(server).url + "/dicom-web"
    secret = tmp_path / "pacs-password"
    secret.write_text(PASSWORD + "\n", encoding="utf-8")
    cfg = stow(url, username="node", password_file=str(secret), ca_file=https_pki["ca.crt"])
    result = make_destination(cfg).send(instances)
    assert result.ok, messages(result)
    assert server.sop_instance_uids() == {ds.SOPInstanceUID for ds in instances}


@pytest.mark.orthanc
def test_stow_to_an_untrusted_https_server_fails_for_good_and_sends_nothing(
        orthanc_factory, instances, https_front):
    server = orthanc_factory()  # the node is not given the test CA: the certificate is unknown
    front = https_front(server)
    result = make_destination(stow(front.url + "/dicom-web")).send(instances)
    assert not result.ok and not result.retryable
    assert "TLS failure" in messages(result) and "certificate verify failed" in messages(result)
    assert front.forwarded == 0 and server.sop_instance_uids() == set()


@pytest.mark.orthanc
def test_stow_study_mismatch_is_permanent_with_the_failure_reason(orthanc: Orthanc, instances):
    stray = ct_instance(generate_uid(), generate_uid())
    result = make_destination(stow(orthanc.dicomweb_url)).send([*instances, stray])
    assert not result.ok and not result.retryable
    outcomes = {o.sop_instance_uid: o for o in result.outcomes}
    assert all(outcomes[ds.SOPInstanceUID].ok for ds in instances)
    assert "0x0110" in outcomes[stray.SOPInstanceUID].reason  # PS3.18 processing failure
    assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID for ds in instances}


@pytest.mark.orthanc
def test_stow_bad_part_fails_alone_and_permanently(orthanc: Orthanc, instances):
    bad = ct_instance(instances[0].StudyInstanceUID, instances[0].SeriesInstanceUID)
    del bad.SOPInstanceUID  # Orthanc cannot index an instance without one: HTTP 400
    result = make_destination(stow(orthanc.dicomweb_url)).send([instances[0], bad])
    assert not result.ok and not result.retryable
    good, broken = result.outcomes
    assert good.ok and not broken.ok and "400" in broken.reason
    assert orthanc.sop_instance_uids() == {instances[0].SOPInstanceUID}


def test_stow_nothing_listening_is_retryable(instances):
    result = make_destination(stow(f"http://127.0.0.1:{free_port()}/dicom-web")).send(instances)
    assert not result.ok and result.retryable
    assert "cannot connect" in result.error


# -- STOW-RS against small HTTP stubs (statuses Orthanc will not produce on demand) ---------


class Stub(http.server.BaseHTTPRequestHandler):
    """Answers every POST with ``status`` after ``delay`` seconds; records request headers."""

    status = 200
    delay = 0.0
    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(dict(self.headers))
        time.sleep(self.delay)
        body = json.dumps({"00081199": {"vr": "SQ", "Value": []}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stub_server() -> Iterator[Callable[..., str]]:
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(status: int = 200, delay: float = 0.0) -> str:
        handler = type("Handler", (Stub,), {"status": status, "delay": delay, "seen": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        start.handler = handler  # type: ignore[attr-defined]
        return f"http://127.0.0.1:{server.server_address[1]}/dicom-web"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("status", "retryable"), [(503, True), (500, True), (429, True), (408, True), (404, False)]
)
def test_stow_status_classification(stub_server, instances, status, retryable):
    result = make_destination(stow(stub_server(status))).send(instances)
    assert not result.ok
    assert result.retryable is retryable
    assert str(status) in messages(result)


def test_stow_timeout_is_retryable(stub_server, instances):
    cfg = stow(stub_server(delay=3.0), timeout_seconds=0.5)
    result = make_destination(cfg).send(instances)
    assert not result.ok and result.retryable
    assert "within 0.5 s" in result.error


def test_stow_bearer_token_from_environment(stub_server, instances, monkeypatch):
    url = stub_server(status=200)
    monkeypatch.setenv("DICOMNODE_TEST_TOKEN", "tok-123")
    make_destination(stow(url, token_env="DICOMNODE_TEST_TOKEN")).send(instances)
    (headers,) = stub_server.handler.seen  # type: ignore[attr-defined]
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["Content-Type"].startswith('multipart/related; type="application/dicom"')


def test_stow_missing_secret_is_a_permanent_failure(instances, monkeypatch):
    monkeypatch.delenv("DICOMNODE_TEST_UNSET", raising=False)
    cfg = stow("http://127.0.0.1:9/dicom-web", username="node", password_env="DICOMNODE_TEST_UNSET")
    result = make_destination(cfg).send(instances)
    assert not result.ok and not result.retryable
    assert "DICOMNODE_TEST_UNSET" in result.error


# -- folder --------------------------------------------------------------------------------


def test_folder_writes_readable_part10_files(tmp_path, instances):
    destination = make_destination(
        DestinationConfig(kind="folder", name="out", path=tmp_path / "out")
    )
    for _ in range(2):  # a retried delivery rewrites the same files
        result = destination.send(instances)
        assert result.ok, messages(result)
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(files) == 2
    for ds in instances:
        path = (
            tmp_path
            / "out"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )
        read = pydicom.dcmread(path)
        assert (
            read.SOPInstanceUID == ds.SOPInstanceUID
            and read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        )
    assert not list((tmp_path / "out").rglob("*.tmp"))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_folder_refuses_a_uid_that_would_escape_the_folder(tmp_path, instances):
    evil = instances[0].copy()
    evil.StudyInstanceUID = "../../etc"
    result = make_destination(DestinationConfig(kind="folder", path=tmp_path / "out")).send(
        [evil, instances[1]]
    )
    assert not result.ok and not result.retryable
    assert "not a valid UID" in result.outcomes[0].reason and result.outcomes[1].ok
    assert not (tmp_path / "etc").exists()


# -- C-STORE -------------------------------------------------------------------------------


@pytest.mark.orthanc
def test_cstore_to_orthanc(orthanc: Orthanc, instances):
    cfg = DestinationConfig(
        kind="cstore", name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
    )
    result = make_destination(cfg, calling_ae_title="DICOMNODE").send(instances)
    assert result.ok, messages(result)
    assert orthanc.sop_instance_uids() == {ds.SOPInstanceUID for ds in instances}


def test_cstore_nothing_listening_is_retryable(instances):
    cfg = DestinationConfig(
        kind="cstore", ae_title="PACS", host="127.0.0.1", port=free_port(), timeout_seconds=5
    )
    result = make_destination(cfg).send(instances)
    assert not result.ok and result.retryable
    assert "association" in result.error


def tls_peer(start_node, pki: Pki):
    """A listener (this project's own SCP) that requires TLS client certificates from the CA."""
    return start_node(tls_cert_file=pki["server.crt"], tls_key_file=pki["server.key"],
                      tls_ca_file=pki["ca.crt"], tls_require_client_cert=True)


def tls_cstore(peer, pki: Pki, **options: object) -> DestinationConfig:
    settings = {"ca_file": pki["ca.crt"], "tls_cert_file": pki["client.crt"],
                "tls_key_file": pki["client.key"], **options}
    return DestinationConfig(kind="cstore", name="peer", ae_title=AE_TITLE, host="127.0.0.1",
                             port=peer.port, tls=True, timeout_seconds=10, **settings)


def stored_instances(peer) -> int:
    return sum(state.instance_count for state in peer.index.pending_series())


def test_cstore_over_tls_with_a_client_certificate(start_node, https_pki, instances):
    peer = tls_peer(start_node, https_pki)
    result = make_destination(tls_cstore(peer, https_pki)).send(instances)
    assert result.ok, messages(result)
    assert stored_instances(peer) == len(instances)


def test_cstore_to_a_tls_peer_that_is_not_trusted_stores_nothing(start_node, https_pki, instances):
    peer = tls_peer(start_node, https_pki)
    result = make_destination(tls_cstore(peer, https_pki, ca_file="")).send(instances)  # system CAs
    assert not result.ok and "TLS handshake failed" in result.error
    assert stored_instances(peer) == 0


def test_cstore_with_an_unreadable_client_key_fails_for_good(start_node, https_pki, instances,
                                                             tmp_path):
    peer = tls_peer(start_node, https_pki)
    cfg = tls_cstore(peer, https_pki, tls_key_file=str(tmp_path / "missing.key"))
    result = make_destination(cfg).send(instances)
    assert not result.ok and not result.retryable and "TLS set-up" in result.error
    assert stored_instances(peer) == 0
