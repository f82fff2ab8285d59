"""A permanent delivery failure fails the job at once with its reason; a person fixes the cause
and re-queues the job with ``dicomnode retry``; ``dicomnode jobs`` shows each step.

The real node (its own process) delivers by STOW-RS to a real Orthanc that requires a
password, read from a file that first holds the wrong one (HTTP 401: permanent, never retried
on its own).
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from dicomnode.phantom import make_phantom_study, write_study
from listener import STORESCU, storescu
from nodeproc import REPO, NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

PASSWORD = "correct horse battery staple"


def dicomnode(config: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", *arguments, "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_failed_delivery_is_kept_with_its_reason_and_retried_on_request(tmp_path):
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists() and STORESCU.exists()):
        pytest.skip("needs Orthanc with the DICOMweb plugin and dcmtk")
    secret = tmp_path / "pacs-password"
    secret.write_text("wrong password\n", encoding="utf-8")
    with Orthanc(tmp_path / "orthanc", users={"node": PASSWORD}) as pacs:
        port = free_port()
        config = write_config(
            tmp_path / "node.toml", port=port, data_dir=tmp_path / "node",
            destinations=[{"kind": "stow", "name": "pacs", "url": pacs.dicomweb_url,
                           "username": "node", "password_file": secret}],
            completion={"quiet_seconds": 1},
            delivery={"retry_initial_seconds": 1, "retry_max_seconds": 2},
        )
        node = NodeProcess(config, port, tmp_path / "node.log").start()
        try:
            phantom = make_phantom_study(32001, shape=(16, 64, 64), spacing=(2.5, 3.0, 3.0))
            files = write_study(phantom, tmp_path / "series")
            sent = storescu(port, *files)
            assert sent.returncode == 0, sent.stderr

            jobs_db = tmp_path / "node" / "jobs.sqlite"
            wait_until(lambda: query(jobs_db, "SELECT 1 FROM jobs WHERE state = 'failed'"),
                       180, "the job to fail", node)
            (job,) = node.jobs()
            assert job["state"] == "failed" and "401" in job["reason"]
            assert job["attempts"] == 1  # permanent: failed at once, no retry loop
            time.sleep(3)  # longer than retry_max_seconds: still failed, still one attempt
            (job,) = node.jobs()
            assert (job["state"], job["attempts"]) == ("failed", 1)
            listing = dicomnode(config, "jobs")
            assert listing.returncode == 0
            assert job["id"] in listing.stdout and "failed" in listing.stdout
            assert "401" in listing.stdout and "wrong password" not in listing.stdout

            secret.write_text(PASSWORD + "\n", encoding="utf-8")  # the administrator's fix
            retried = dicomnode(config, "retry", job["id"][:8])
            assert retried.returncode == 0, retried.stderr
            wait_until(lambda: query(jobs_db, "SELECT 1 FROM jobs WHERE state = 'delivered'"),
                       180, "the retried job to be delivered", node)
            journal = dicomnode(config, "jobs", "-v").stdout
            assert "failed -> pending: retry requested on the command line" in journal
            trail = json.loads(dicomnode(config, "audit", "--json").stdout)
            # Who asked is on record, beside the two deliveries it caused.
            assert [(e["event"], e["actor"]) for e in trail if e["job_id"] == job["id"]][1:] == [
                ("delivery_failed", "dicomnode"), ("retried", f"{getpass.getuser()} (command line)"),
                ("delivered", "dicomnode")]
            again = dicomnode(config, "retry", job["id"])  # a delivered job is not re-queued
            assert again.returncode != 0 and "delivered" in again.stderr
        finally:
            node.stop()
        srs = requests.post(f"{pacs.http_url}/tools/find", auth=pacs.auth, timeout=30,
                            json={"Level": "Instance", "Query": {"Modality": "SR"}}).json()
        assert len(srs) == 1
        assert "wrong password" not in node.log_path.read_text()
        assert PASSWORD not in node.log_path.read_text()
