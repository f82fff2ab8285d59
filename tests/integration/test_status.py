"""The status page, ``/metrics``, ``/healthz`` and the audit trail of a real ``dicomnode
serve``, fed by dcmtk's storescu (issue 14, part 1).

- ``/metrics`` is scraped after a CT series and a broken instance were sent: the counters
  match what was sent, what was stored and what the job did;
- ``dicomnode audit`` shows who sent the series, the job it became and where it was
  delivered;
- headless Chromium watches the status page while a series goes through (the job appears and
  moves to delivered), then opens a failed job and presses Retry: the job is queued again, the
  journal and the audit trail say who asked. Screenshots are kept as test artefacts in
  ``$DICOMNODE_TEST_ARTIFACTS/status`` (default ``test-artifacts/status`` in the checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from dicomnode.phantom import make_phantom_study
from listener import STORESCU
from nodeproc import NodeProcess, write_config
from orthanc import free_port
from viewer import STATUS_PROBE, probe, require_browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DICOMNODE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "status"
AE = "DICOMNODE"


def require_storescu() -> None:
    if not STORESCU.exists():
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")


class StatusNode:
    """``dicomnode serve`` with its status page on a free port, a folder destination."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.http_port = free_port()
        self.dicom_port = free_port()
        config = write_config(
            work / "node.toml", port=self.dicom_port, data_dir=work / "node",
            destinations=[{"kind": "folder", "name": "results", "path": work / "results"}],
            completion={"quiet_seconds": 1}, http={"port": self.http_port},
        )
        self.config = config
        self.process = NodeProcess(config, self.dicom_port, work / "node.log").start()
        self.url = f"http://127.0.0.1:{self.http_port}/"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def jobs(self) -> list[dict]:
        return json.loads(self.get("/api/jobs")[1])

    def wait_for_jobs(self, count: int, states: tuple[str, ...], timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if len(jobs) >= count and all(j["state"] in states for j in jobs):
                return jobs
            time.sleep(0.5)
        raise AssertionError(f"jobs did not reach {states}: {self.jobs()}\n"
                             f"{self.process.log_tail()}")

    def send(self, files: list[Path]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(STORESCU), "-aec", AE, "127.0.0.1", str(self.dicom_port),
                               *map(str, files)], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def node(tmp_path):
    require_storescu()
    started = StatusNode(tmp_path)
    yield started
    started.stop()


def phantom_files(folder: Path, seed: int, *, slices: int | None = None) -> list[Path]:
    folder.mkdir(parents=True)
    datasets = list(make_phantom_study(seed).datasets)[:slices]
    paths = []
    for number, ds in enumerate(datasets):
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def scrape(node: StatusNode) -> dict[tuple[str, tuple], float]:
    code, text = node.get("/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_audit_match_what_was_sent(node, tmp_path):
    series = phantom_files(tmp_path / "ct", 10001)
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(series[0])
    del ds.SeriesInstanceUID  # the node must refuse it (0xA900), and count why
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(broken, enforce_file_format=True)

    before = time.time()
    assert node.send(series).returncode == 0
    node.send([broken])  # answered 0xA900: counted below
    (job,) = node.wait_for_jobs(1, ("delivered",))

    metrics = scrape(node)
    spooled = [p for p in (tmp_path / "node" / "spool").rglob("*.dcm")]
    assert metrics[("dicomnode_instances_received_total", ())] == len(series) == len(spooled)
    assert metrics[("dicomnode_received_bytes_total", ())] == sum(p.stat().st_size for p in spooled)
    assert metrics[("dicomnode_instances_refused_total", (("reason", "invalid"),))] == 1
    assert sum(v for (name, _), v in metrics.items()
               if name == "dicomnode_instances_refused_total") == 1
    assert metrics[("dicomnode_associations_total", (("outcome", "accepted"),))] == 2
    assert metrics[("dicomnode_associations_open", ())] == 0
    assert before <= metrics[("dicomnode_last_instance_received_timestamp_seconds", ())] <= time.time()
    assert metrics[("dicomnode_jobs_created_total", ())] == 1
    assert metrics[("dicomnode_jobs", (("state", "delivered"),))] == 1
    assert metrics[("dicomnode_queue_depth", ())] == 0
    assert metrics[("dicomnode_delivery_attempts_total", (("destination", "results"),))] == 1
    assert metrics[("dicomnode_delivery_failures_total", (("destination", "results"),))] == 0
    for stage in ("read", "assemble", "segment", "radiomics", "predict", "report", "save",
                  "deliver"):
        assert metrics[("dicomnode_stage_duration_seconds_count", (("stage", stage),))] == 1
        assert metrics[("dicomnode_stage_duration_seconds_sum", (("stage", stage),))] == \
            pytest.approx(job["seconds"][stage], abs=1e-3)  # stored in ms
    assert metrics[("dicomnode_spool_free_bytes", ())] > 0

    code, health = node.get("/healthz")
    assert code == 200 and json.loads(health)["status"] == "ok"

    audit = json.loads(subprocess.run(
        [sys.executable, "-m", "dicomnode", "audit", "--json", "--config", str(node.config)],
        capture_output=True, text=True, check=True, cwd=REPO).stdout)
    events = [(e["event"], e["actor"]) for e in audit]
    assert events == [("received", "STORESCU@127.0.0.1"), ("job_created", "dicomnode"),
                      ("delivered", "dicomnode")]
    received, created, delivered = audit
    study = pydicom.dcmread(series[0]).StudyInstanceUID
    assert received["detail"]["instances"] == len(series) and received["study_uid"] == study
    assert created["job_id"] == delivered["job_id"] == job["id"]
    assert delivered["destination"] == "results"
    written = {pydicom.dcmread(p).SOPInstanceUID
               for p in (tmp_path / "results").rglob("*.dcm")}
    assert set(delivered["detail"]["sop_instance_uids"]) == written
    for entry in audit:  # IDs to find a study, never the patient's name
        assert "Phantom" not in json.dumps(entry)


def test_a_browser_follows_a_job_to_delivered_and_retries_a_failed_one(node, tmp_path):
    require_browser()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ct = phantom_files(tmp_path / "ct", 10002)
    short = phantom_files(tmp_path / "short", 10003, slices=4)  # too few slices: it fails

    assert node.send(ct).returncode == 0
    (first,) = node.wait_for_jobs(1, ("pending", "running", "delivering", "delivered"), timeout=60)
    watched = probe({"url": node.url, "outDir": str(ARTIFACTS), "name": "status",
                     "timeoutMs": 120000, "steps": [
                         {"kind": "goto", "path": "/", "shot": "1-job-listed"},
                         {"kind": "waitFor",
                          "selector": f'tr[data-job="{first["id"]}"][data-state="delivered"]',
                          "shot": "2-delivered"},
                     ]}, script=STATUS_PROBE, timeout=240)
    assert not watched["pageErrors"] and not watched["consoleErrors"]

    assert node.send(short).returncode == 0
    jobs = node.wait_for_jobs(2, ("delivered", "failed"))
    (failed,) = [j for j in jobs if j["state"] == "failed"]
    retried = probe({"url": node.url, "outDir": str(ARTIFACTS), "name": "retry",
                     "timeoutMs": 60000, "steps": [
                         {"kind": "goto", "path": "/",
                          "shot": "1-failed-listed"},
                         {"kind": "click", "selector": f'tr[data-job="{failed["id"]}"] a',
                          "shot": "2-failed-job"},
                         {"kind": "text", "selector": "#reason", "as": "before"},
                         {"kind": "text", "selector": "#audit", "as": "audit"},
                         {"kind": "click", "selector": "#retry", "shot": "3-after-retry"},
                         {"kind": "text", "selector": "#journal", "as": "journal"},
                     ]}, script=STATUS_PROBE, timeout=120)
    assert not retried["pageErrors"] and not retried["consoleErrors"]
    assert retried["steps"][-2]["url"].endswith(f"/jobs/{failed['id']}")  # back on its page
    assert failed["reason"] in retried["texts"]["before"]
    # How the series came, then the job: one trail on the job's page.
    assert "received" in retried["texts"]["audit"] and "STORESCU@127.0.0.1" in retried["texts"]["audit"]
    assert "job_created" in retried["texts"]["audit"]
    assert "retry requested by local user (127.0.0.1) on the status page" in \
        retried["texts"]["journal"]
    # Queued again and analysed again: it fails again, for the same reason.
    again = node.wait_for_jobs(2, ("delivered", "failed"))
    assert [j["state"] for j in again if j["id"] == failed["id"]] == ["failed"]
    audit = json.loads(subprocess.run(
        [sys.executable, "-m", "dicomnode", "audit", "--json", "--event", "retried",
         "--config", str(node.config)], capture_output=True, text=True, check=True,
        cwd=REPO).stdout)
    assert [(e["job_id"], e["actor"]) for e in audit] == [
        (failed["id"], "local user (127.0.0.1)")]
    for name in ("status-1-job-listed", "status-2-delivered", "retry-2-failed-job",
                 "retry-3-after-retry"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
