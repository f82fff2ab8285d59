"""Seeing the node: metrics from events, the append-only audit trail, the status page's HTML,
and the HTTP(S) server's access rules, driven without a listener (issue 14, part 1)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sqlite3
import ssl
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.config import ConfigError, from_mapping
from dicomnode.jobs.machine import JobEvent
from dicomnode.jobs.store import JobStore
from dicomnode.observe.audit import AuditTrail
from dicomnode.observe.events import AssociationSummary, Observer, Observers
from dicomnode.observe.health import HealthChecks
from dicomnode.observe.http import Credentials, StatusServer, load_secret, patient_label
from dicomnode.observe.metrics import NodeMetrics, NodeState
from dicomnode.observe.page import JobRow, ListenerState, PatientLabel, job_page, status_page
from dicomnode.types import DeliveryResult, InstanceOutcome, SeriesKey

KEY = SeriesKey("1.2.3", "1.2.3.4")
OTHER = SeriesKey("1.2.3", "1.2.3.5")


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, as Prometheus would parse it."""
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_count_what_the_events_say():
    metrics = NodeMetrics()
    metrics.watch(NodeState(job_counts=lambda: {"pending": 2, "retry_wait": 1, "delivered": 5},
                            spool_free_bytes=lambda: 123456, associations_open=lambda: 3))
    metrics.declare_destinations(("pacs",))
    for size in (100, 250):
        metrics.instance_stored(size, at=1000.0 + size)
    metrics.instance_refused("too_large")
    metrics.association_accepted("CT1", "10.0.0.1:5000")
    metrics.association_rejected("EVIL", "10.0.0.9:5000", "calling AE title")
    metrics.stages_timed({"segment": 2.0, "report": 0.3})
    metrics.delivery_attempted("j1", KEY, "pacs", DeliveryResult("pacs", error="timeout"))
    metrics.delivery_attempted("j1", KEY, "pacs", DeliveryResult(
        "pacs", outcomes=(InstanceOutcome("1.2", ok=True),)))
    got = samples(metrics)
    assert got[("dicomnode_instances_received_total", ())] == 2
    assert got[("dicomnode_received_bytes_total", ())] == 350
    assert got[("dicomnode_last_instance_received_timestamp_seconds", ())] == 1250.0
    assert got[("dicomnode_instances_refused_total", (("reason", "too_large"),))] == 1
    assert got[("dicomnode_instances_refused_total", (("reason", "disk_full"),))] == 0
    assert got[("dicomnode_associations_total", (("outcome", "accepted"),))] == 1
    assert got[("dicomnode_associations_total", (("outcome", "rejected"),))] == 1
    assert got[("dicomnode_associations_open", ())] == 3
    assert got[("dicomnode_stage_duration_seconds_count", (("stage", "segment"),))] == 1
    assert got[("dicomnode_stage_duration_seconds_sum", (("stage", "report"),))] == 0.3
    assert got[("dicomnode_delivery_attempts_total", (("destination", "pacs"),))] == 2
    assert got[("dicomnode_delivery_failures_total", (("destination", "pacs"),))] == 1
    assert got[("dicomnode_jobs", (("state", "delivered"),))] == 5
    assert got[("dicomnode_queue_depth", ())] == 3  # pending + waiting for a retry
    assert got[("dicomnode_spool_free_bytes", ())] == 123456
    assert not [name for name, _ in got if name.endswith("_created")]


def test_two_nodes_in_one_process_do_not_share_counters():
    first, second = NodeMetrics(), NodeMetrics()
    first.instance_stored(10, at=1.0)
    assert samples(second)[("dicomnode_instances_received_total", ())] == 0


def test_an_observer_that_fails_does_not_stop_the_others(caplog):
    class Broken(Observer):
        def instance_stored(self, nbytes: int, at: float) -> None:
            raise RuntimeError("disk on fire")

    metrics = NodeMetrics()
    Observers([Broken(), metrics]).instance_stored(5, 1.0)
    assert samples(metrics)[("dicomnode_instances_received_total", ())] == 1
    assert "Broken.instance_stored failed" in caplog.text


# -- audit -------------------------------------------------------------------------------------
def test_the_audit_trail_records_who_sent_what_and_where_it_went(tmp_path):
    audit = AuditTrail(tmp_path / "index.sqlite", clock=iter(range(100, 200)).__next__)
    audit.association_ended(AssociationSummary(
        id="a1", calling_ae="CT1", peer="10.0.0.1:40000", how="released", seconds=1.0, stored=3,
        refused=0, bytes=300, series={KEY: 2, OTHER: 1}))
    audit.job_created("job1", KEY, 2)
    audit.delivery_attempted("job1", KEY, "pacs", DeliveryResult(
        "pacs", outcomes=(InstanceOutcome("9.1", ok=True), InstanceOutcome("9.2", ok=True))))
    audit.delivery_attempted("job1", KEY, "pacs", DeliveryResult("pacs", error="503", retryable=True))
    audit.job_retried("job1", "alice")
    rows = audit.query()
    assert [r.event for r in rows] == ["received", "received", "job_created", "delivered",
                                       "delivery_failed", "retried"]
    assert rows[0].actor == "CT1@10.0.0.1" and rows[0].detail["instances"] == 2
    assert (rows[1].series_uid, rows[1].detail["instances"]) == (OTHER.series_uid, 1)
    assert rows[3].destination == "pacs" and rows[3].detail["sop_instance_uids"] == ["9.1", "9.2"]
    assert rows[4].detail == {"error": "503", "retryable": True, "sop_instance_uids": []}
    assert rows[5].actor == "alice"
    assert [r.event for r in audit.query(job_id="job")] == ["job_created", "delivered",
                                                           "delivery_failed", "retried"]
    assert [r.event for r in audit.query(event="received", study_uid=KEY.study_uid)] == [
        "received", "received"]
    assert [r.at for r in audit.query(since=103, until=105)] == [103, 104]
    assert [r.seq for r in audit.query(limit=2)] == [rows[4].seq, rows[5].seq]  # the newest


def test_the_audit_trail_cannot_be_rewritten(tmp_path):
    db = tmp_path / "index.sqlite"
    AuditTrail(db).job_retried("job1", "alice")
    with sqlite3.connect(db) as conn:
        for statement in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(statement)
    assert [r.actor for r in AuditTrail(db).query()] == ["alice"]


# -- the page ----------------------------------------------------------------------------------
LABEL = PatientLabel(initials="D.J.", hash="abcd1234", name="Doe, Jane", patient_id="MRN77")


def row(state: str = "failed", reason: str = "too few slices") -> JobRow:
    return JobRow(id="0123456789abcdef", state=state, reason=reason, created_at=1e9,
                  updated_at=1e9 + 5, instances=12, series_uid=KEY.series_uid,
                  study_uid=KEY.study_uid, patient=LABEL, seconds={"segment": 2.5}, attempts=0)


LISTENER = ListenerState(ae_title="DICOMNODE", address="127.0.0.1:11112", tls=False,
                         associations_open=1, spool_free_bytes=5 * 2**30, last_instance_at=1e9)


def test_the_status_page_names_patients_only_to_an_authorised_viewer():
    anonymous = status_page(LISTENER, [row()], {"failed": 1}, authorised=False, now=1e9 + 60)
    signed_in = status_page(LISTENER, [row()], {"failed": 1}, authorised=True, now=1e9 + 60)
    assert "Doe" not in anonymous and "MRN77" not in anonymous and "D.J. #abcd1234" in anonymous
    assert "Doe, Jane, ID MRN77" in signed_in
    assert "segment 2.5 s" in anonymous and "60 s ago" in anonymous
    assert 'http-equiv="refresh"' in anonymous  # the list follows the jobs by itself


def test_the_pages_escape_what_they_show():
    evil = row(reason='<script>alert("x")</script>')
    page = status_page(LISTENER, [evil], {}, authorised=False, now=1e9)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<script>" not in job_page(evil, [], [], authorised=True, retry_token="t")


@pytest.mark.parametrize("state, button", [("failed", True), ("retry_wait", True),
                                           ("delivered", False), ("running", False)])
def test_retry_is_offered_when_a_person_can_help(state, button):
    page = job_page(row(state), [], [], authorised=True, retry_token="tok")
    assert ('id="retry"' in page) == button
    assert ('name="token" value="tok"' in page) == button


# -- access ------------------------------------------------------------------------------------
def test_credentials_recognise_a_token_and_a_user(monkeypatch):
    monkeypatch.setenv("T", "s3cret")
    monkeypatch.setenv("P", "pa:ss")
    config = from_mapping({"http": {"token_env": "T", "username": "alice", "password_env": "P"}})
    credentials = Credentials.from_config(config)
    basic = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    assert credentials.who("Bearer s3cret") == "token"
    assert credentials.who(basic) == "alice"
    assert credentials.who("Bearer wrong") == ""
    assert credentials.who("Basic " + base64.b64encode(b"alice:nope").decode()) == ""
    assert credentials.who("Basic !!!") == "" and credentials.who("") == ""


@pytest.mark.parametrize("http, message", [
    ({"host": "0.0.0.0"}, "http.host: '0.0.0.0' is reachable from other machines"),
    ({"username": "alice"}, "http.username: basic authentication needs"),
    ({"token_env": "A", "token_file": "/b"}, "http.token_env: give token_env or token_file"),
    ({"tls_cert_file": "/x.crt"}, "http.tls_key_file: TLS needs both"),
    ({"port": 70000}, "http.port: must lie in 0..65535"),
])
def test_http_settings_are_checked_at_start_up(http, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_mapping({"http": http})


def test_a_missing_secret_names_its_key():
    config = from_mapping({"http": {"token_file": "/nonexistent/token"}})
    with pytest.raises(ConfigError, match=r"http\.token_file: "):
        Credentials.from_config(config)


# -- the server --------------------------------------------------------------------------------
def spooled_ct(folder: Path, name: str = "Doe^Jane", patient_id: str = "MRN77") -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"
    ds.PatientName, ds.PatientID = name, patient_id
    path = folder / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class Served:
    """A status server over a job store and an audit trail in ``tmp_path``."""

    def __init__(self, tmp_path: Path, http: dict, health: dict | None = None) -> None:
        self.config = from_mapping({"node": {"data_dir": str(tmp_path)}, "http": {"port": 0, **http}})
        self.jobs = JobStore(tmp_path / "jobs.sqlite")
        self.audit = AuditTrail(tmp_path / "index.sqlite")
        self.job = self.jobs.create(KEY, [spooled_ct(tmp_path)])
        self.server = StatusServer(
            self.config, jobs=self.jobs, audit=self.audit, metrics=NodeMetrics(),
            health=HealthChecks(health or {"index": lambda: ""}),
            listener=lambda: LISTENER, secret=load_secret(tmp_path / "status.key"),
            clock=time.time)
        self.server.start()

    def request(self, path: str, *, data: dict | None = None, auth: str = "",
                context: ssl.SSLContext | None = None) -> tuple[int, str, dict]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.server.url + path.lstrip("/"), data=body)
        if auth:
            request.add_header("Authorization", auth)
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                             _NoRedirect())
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.read().decode(), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    def close(self) -> None:
        self.server.stop()
        self.jobs.close()
        self.audit.close()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # the test reads the 303 itself
        return None


@pytest.fixture
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("STATUS_PASSWORD", "hunter2")
    started: list[Served] = []

    def start(**http) -> Served:
        started.append(Served(tmp_path, http))
        return started[-1]

    yield start
    for s in started:
        s.close()


BASIC = "Basic " + base64.b64encode(b"alice:hunter2").decode()
WITH_USER = {"username": "alice", "password_env": "STATUS_PASSWORD"}


def test_this_machine_sees_the_page_without_names(served):
    s = served()
    code, page, _ = s.request("/")
    assert code == 200 and s.job.id in page
    assert "Doe" not in page and "MRN77" not in page and "D.J. #" in page
    code, body, _ = s.request("/api/jobs")
    assert code == 200 and json.loads(body)[0]["id"] == s.job.id and "Doe" not in body


def test_credentials_show_names_and_wrong_ones_are_refused(served):
    s = served(**WITH_USER)
    assert "Doe, Jane, ID MRN77" in s.request("/", auth=BASIC)[1]
    code, _, headers = s.request("/", auth="Basic " + base64.b64encode(b"alice:guess").decode())
    assert code == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert s.request(f"/jobs/{s.job.id}")[0] == 200  # this machine, anonymously


def test_retry_needs_the_page_token_and_credentials_when_configured(served):
    s = served(**WITH_USER)
    s.jobs.transition(s.job.id, JobEvent.PERMANENT_FAILURE, "too few slices")
    page = s.request(f"/jobs/{s.job.id}", auth=BASIC)[1]
    token = page.split('name="token" value="')[1].split('"')[0]
    path = f"/jobs/{s.job.id}/retry"
    assert s.request(path, data={"token": token})[0] == 401  # anonymous: not allowed to act
    assert s.request(path, data={"token": "forged"}, auth=BASIC)[0] == 403
    code, _, headers = s.request(path, data={"token": token}, auth=BASIC)
    assert code == 303 and headers["Location"] == f"/jobs/{s.job.id}"
    assert s.jobs.get(s.job.id).state.value == "pending"
    assert "retry requested by alice" in s.jobs.get(s.job.id).reason
    assert [(r.event, r.actor) for r in s.audit.query()] == [("retried", "alice")]
    assert s.request(path, data={"token": token}, auth=BASIC)[0] == 409  # pending: nothing to retry


def test_metrics_and_an_unknown_path(served):
    s = served()
    code, text, headers = s.request("/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "dicomnode_instances_received_total 0.0" in text
    assert s.request("/nowhere")[0] == 404


def test_healthz_fails_with_a_failing_check_and_keeps_reasons_for_the_authorised(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("STATUS_PASSWORD", "hunter2")
    s = Served(tmp_path, WITH_USER, health={"index": lambda: "",
                                            "destination:pacs": lambda: "pacs:4242 refused"})
    try:
        code, body, _ = s.request("/healthz")
        assert code == 503
        assert json.loads(body) == {"status": "failing",
                                    "checks": {"index": "ok", "destination:pacs": "failing"}}
        assert json.loads(s.request("/healthz", auth=BASIC)[1])["checks"][
            "destination:pacs"] == "pacs:4242 refused"
    finally:
        s.close()


def test_healthz_caches_its_answer():
    calls = []
    clock = iter([0.0, 1.0, 10.0]).__next__
    checks = HealthChecks({"x": lambda: calls.append(1) or ""}, clock=clock)
    for _ in range(3):
        assert checks.run().ok
    assert len(calls) == 2  # the second call within 5 s reused the first answer


def test_https_with_the_listeners_tls_keys(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from pki import make_pki

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki", key_password="pw")
    monkeypatch.setenv("KEY_PASSWORD", "pw")
    s = Served(tmp_path, {"tls_cert_file": pki["server.crt"],
                          "tls_key_file": pki["server-encrypted.key"],
                          "tls_key_password_env": "KEY_PASSWORD"})
    try:
        assert s.server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=pki["ca.crt"])
        assert s.request("/", context=trusted)[0] == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            s.request("/", context=ssl.create_default_context())
    finally:
        s.close()


def test_a_stalled_client_does_not_block_the_page(served):
    import socket

    s = served()
    stalled = [socket.create_connection(("127.0.0.1", s.server.port)) for _ in range(20)]
    try:
        for sock in stalled:
            sock.sendall(b"GET / HT")  # and nothing more
        assert s.request("/")[0] == 200
    finally:
        for sock in stalled:
            sock.close()


def test_patient_label_is_keyed_and_needs_no_name(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    path = spooled_ct(folder)
    first, again = patient_label((path,), b"k1"), patient_label((path,), b"k1")
    assert first == again and first.initials == "D.J." and len(first.hash) == 8
    assert patient_label((path,), b"k2").hash != first.hash  # another node, another hash
    assert patient_label((tmp_path / "gone.dcm",), b"k1") == PatientLabel("", "")


def test_load_secret_is_made_once_with_the_nodes_file_modes(tmp_path):
    previous = os.umask(0o077)  # what make_node_private sets without a file_group
    try:
        key = load_secret(tmp_path / "status.key")
    finally:
        os.umask(previous)
    assert load_secret(tmp_path / "status.key") == key and len(key) == 32
    assert (tmp_path / "status.key").stat().st_mode & 0o777 == 0o600


def test_the_server_thread_never_keeps_the_process_alive(served):
    served()
    threads = [t for t in threading.enumerate() if t.name == "dicomnode-http"]
    assert threads and all(t.daemon for t in threads)


def test_the_node_calls_a_dicom_destination_with_its_own_ae_title(tmp_path):
    from dicomnode.node import Node

    config = from_mapping({
        "node": {"ae_title": "RESEARCH_NODE", "data_dir": str(tmp_path), "port": 0},
        "http": {"port": 0},
        "destinations": [{"kind": "cstore", "name": "pacs", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": 4242}]})
    unused = types.SimpleNamespace(close=lambda: None)  # no job runs: the pipeline is not used
    node = Node(config, pipeline=unused)
    try:
        assert [d.calling_ae_title for d in node.runner.destinations] == ["RESEARCH_NODE"]
    finally:
        node.stop()
