"""Analysis and delivery on Celery workers: a real node, a real Redis broker and two
``dicomnode worker`` processes on loopback (issue 14, part 2).

- two workers share the jobs of series sent one after the other;
- a worker killed with SIGKILL in the middle of a job: another worker runs it again, and
  Orthanc gets exactly one result set (one SEG, one SR, the same UIDs);
- the broker killed and brought back: the node says so on ``/healthz``, keeps the job, and
  sends it once the broker is back; the job is delivered.
"""

from __future__ import annotations

import os
import signal
import time

import pydicom
import pytest

from cluster import REDELIVERY_SECONDS, STORESCU, Cluster, Redis, phantom_files
from routing import series_in_study


@pytest.fixture
def redis(tmp_path):
    if not STORESCU.exists():
        pytest.skip("dcmtk's storescu is not installed (Debian package dcmtk)")
    server = Redis(tmp_path / "redis").start()
    yield server
    server.kill()


@pytest.fixture
def cluster(tmp_path, redis):
    started: list[Cluster] = []

    def start(destination: dict | None = None) -> Cluster:
        started.append(Cluster(tmp_path, redis, destination or {
            "kind": "folder", "name": "results", "path": str(tmp_path / "results")}))
        return started[-1]

    yield start
    for c in started:
        c.stop()


def analysed_by(c: Cluster, job_id: str) -> list[int]:
    return [n for n in range(len(c.workers))
            if f"job {job_id}: analysing".encode() in c.worker_log(n)]


def test_two_workers_share_the_jobs(cluster, tmp_path):
    c = cluster()
    c.start_worker()
    c.start_worker()
    for seed in (10001, 10002, 10003):
        c.send(phantom_files(tmp_path / f"ct{seed}", seed))
    jobs = c.wait_for(3)
    workers = {n for job in jobs for n in analysed_by(c, job["id"])}
    assert workers == {0, 1}, "both workers should have analysed a job"
    for job in jobs:
        assert len(analysed_by(c, job["id"])) == 1  # each job analysed once
        assert set(job["seconds"]) >= {"read", "segment", "radiomics", "report", "save", "deliver"}
    results = [pydicom.dcmread(p) for p in (tmp_path / "results").rglob("*.dcm")]
    assert sum(ds.Modality == "SEG" for ds in results) == 3
    assert sum(ds.Modality == "SR" for ds in results) == 3
    status, health = c.health()
    assert status == 200, health


def test_a_worker_killed_mid_job_leaves_it_to_another_and_orthanc_gets_one_result_set(
        cluster, orthanc, tmp_path):
    orthanc.start()
    c = cluster({"kind": "stow", "name": "pacs", "url": orthanc.dicomweb_url})
    c.start_worker()
    c.start_worker()
    c.send(phantom_files(tmp_path / "ct", 10004))
    deadline = time.monotonic() + 60
    while not (c.jobs() and analysed_by(c, c.jobs()[0]["id"])):
        assert time.monotonic() < deadline, c.node.log_tail()
        time.sleep(0.05)
    (job,) = c.jobs()
    (first,) = analysed_by(c, job["id"])
    os.kill(c.workers[first].pid, signal.SIGKILL)  # mid-job: no clean-up, no acknowledgement
    c.workers[first].wait(10)
    assert c.jobs()[0]["state"] == "running"
    # The other worker, running all along, takes it once the broker gives the task again.
    c.wait_for(1, timeout=REDELIVERY_SECONDS + 120)
    assert analysed_by(c, job["id"]) == sorted([first, 1 - first])
    assert "running -> pending: given to" in c.journals()  # the node saw the restart
    study = pydicom.dcmread(next((tmp_path / "ct").iterdir())).StudyInstanceUID
    held = series_in_study(orthanc, study)
    assert len(held["SEG"]) == 1 and len(held["SR"]) == 1, {k: len(v) for k, v in held.items()}


def test_the_broker_down_and_back(cluster, redis, tmp_path):
    c = cluster()
    c.start_worker()
    redis.kill()
    c.send(phantom_files(tmp_path / "ct", 10005))
    deadline = time.monotonic() + 60
    while True:
        status, health = c.health()
        if status == 503 and health["checks"]["runner"] == "failing":
            break
        assert time.monotonic() < deadline, (status, health, c.node.log_tail())
        time.sleep(0.5)
    assert [j["state"] for j in c.jobs()] == ["pending"]  # kept, waiting for the broker
    redis.start()
    c.wait_for(1, timeout=180)
    assert c.health()[0] == 200
    assert b"cannot reach the broker" in (tmp_path / "node.log").read_bytes()
