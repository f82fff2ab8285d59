"""A dicomnode cluster on loopback for tests and benchmarks: a Redis broker, a node with
``[runner] kind = "celery"`` and ``dicomnode worker`` processes (test helper)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomnode.phantom import make_phantom_study
from nodeproc import NodeProcess, write_config
from orthanc import free_port, terminate

REPO = Path(__file__).resolve().parents[1]
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
STORESCU = Path("/usr/bin/storescu")
TOKEN = "worker-token-for-tests"
#: A killed worker's task goes to the other worker after this long (Redis' visibility timeout).
REDELIVERY_SECONDS = 8


class Redis:
    """redis-server on a free loopback port, appending to a file so that a restart keeps the
    queue (as a production broker must)."""

    def __init__(self, folder: Path) -> None:
        if not Path(REDIS).exists():
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        self.folder = folder
        folder.mkdir()
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Redis:
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--save", ""],
            stdout=open(self.folder / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if b"Ready to accept connections" in (self.folder / "redis.log").read_bytes():
                return self
            time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Cluster:
    """A node with ``[runner] kind = "celery"`` and its workers, sharing one config file."""

    def __init__(self, work: Path, redis: Redis, destination: dict, **sections: dict) -> None:
        self.work = work
        self.http_port, self.dicom_port = free_port(), free_port()
        os.environ["DICOMNODE_TEST_WORKER_TOKEN"] = TOKEN
        self.config = write_config(
            work / "node.toml", port=self.dicom_port, data_dir=work / "node",
            destinations=[destination], **({"completion": {"quiet_seconds": 1}} | sections),
            http={"port": self.http_port},
            runner={"kind": "celery", "broker_url": redis.url,
                    "worker_token_env": "DICOMNODE_TEST_WORKER_TOKEN",
                    "redelivery_seconds": REDELIVERY_SECONDS},
        )
        self.node = NodeProcess(self.config, self.dicom_port, work / "node.log").start()
        self.workers: list[subprocess.Popen] = []
        self.url = f"http://127.0.0.1:{self.http_port}/"

    def start_worker(self) -> int:
        number = len(self.workers)
        log = open(self.work / f"worker{number}.log", "ab")
        self.workers.append(subprocess.Popen(
            [sys.executable, "-m", "dicomnode", "worker", "--config", str(self.config)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while b" ready." not in self.worker_log(number):
            if time.monotonic() > deadline or self.workers[number].poll() is not None:
                raise RuntimeError(f"worker {number} did not start:\n"
                                   f"{self.worker_log(number)[-3000:].decode()}")
            time.sleep(0.2)
        return number

    def worker_log(self, number: int) -> bytes:
        return (self.work / f"worker{number}.log").read_bytes()

    def send(self, files: list[Path]) -> None:
        run = subprocess.run([str(STORESCU), "-aec", "DICOMNODE", "127.0.0.1",
                              str(self.dicom_port), *map(str, files)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr

    def jobs(self) -> list[dict]:
        with urllib.request.urlopen(self.url + "api/jobs", timeout=10) as response:
            return json.loads(response.read())

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "healthz", timeout=20) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_for(self, count: int, state: str = "delivered", timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs()
            if len(jobs) >= count and all(j["state"] == state for j in jobs):
                return jobs
            time.sleep(0.5)
        logs = "\n".join(self.worker_log(n)[-2000:].decode() for n in range(len(self.workers)))
        raise AssertionError(f"jobs did not all reach {state}: {self.jobs()}\n"
                             f"{self.node.log_tail()}\n{logs}")

    def journals(self) -> str:
        """``dicomnode jobs -v``: every job's journal."""
        return subprocess.run(
            [sys.executable, "-m", "dicomnode", "jobs", "-v", "--config", str(self.config)],
            capture_output=True, text=True, check=True, cwd=REPO).stdout

    def stop(self) -> None:
        for worker in self.workers:
            terminate(worker, 30)
        self.node.stop()


def phantom_files(folder: Path, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for number, ds in enumerate(make_phantom_study(seed).datasets):
        path = folder / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
