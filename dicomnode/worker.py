"""``dicomnode worker``: a Celery worker that analyses and delivers jobs for a node (EDGE).

With ``[runner] kind = "celery"`` the node sends each job to the broker as the task
``dicomnode.run_job(job_id)`` (see :mod:`dicomnode.jobs.remote`). A worker, started with the
node's configuration file on this or another machine:

1. claims the job from the node (``POST /internal/jobs/<id>/claim``): analyse, deliver, or
   nothing (a duplicate);
2. to analyse, reads the series: from the spool folder itself when it can see the node's files
   (same machine, or a shared mount), else over HTTP from the node; runs the same pipeline as
   the embedded runner, with the same UIDs (seeded by the job's id); sends the results back;
3. delivers the results to the configured destinations and tells the node the outcome; the
   node keeps the job's state, its backoff and its audit trail.

One task at a time per worker process (the ``solo`` pool: one process per GPU or CPU budget;
start more workers for more). Tasks are acknowledged when they end (``acks_late``): a worker
killed mid-job leaves its task to another worker once ``[runner] redelivery_seconds`` have
passed (Redis) or at once (RabbitMQ, which sees the connection close). The node cannot be
reached: the task is tried again later, with a growing delay.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from celery import Celery

from dicomnode.config import Config, read_secret
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.jobs.machine import JobState
from dicomnode.jobs.remote import TASK_NAME, pack_folder, result_as_json, unpack_results
from dicomnode.jobs.runner import run_pipeline, send
from dicomnode.jobs.store import Job
from dicomnode.types import SeriesKey

log = logging.getLogger(__name__)

#: Seconds to wait for the node's HTTP answers (uploads of a few MB included).
NODE_TIMEOUT = 120


def broker_url(config: Config) -> str:
    """``[runner] broker_url`` with the password from ``broker_password_env`` / ``_file``."""
    runner = config.runner
    password = read_secret(runner.broker_password_env, runner.broker_password_file)
    if not password:
        return runner.broker_url
    url = urllib.parse.urlsplit(runner.broker_url)
    user = urllib.parse.quote(url.username or "", safe="")
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{url.hostname}"
    netloc += f":{url.port}" if url.port else ""
    return urllib.parse.urlunsplit(url._replace(netloc=netloc))


def make_app(config: Config) -> Celery:
    """The Celery app of a node and its workers (the node only sends through it)."""
    app = Celery("dicomnode", broker=broker_url(config), set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=config.runner.queue,
        task_ignore_result=True,
        broker_transport_options={"visibility_timeout": config.runner.redelivery_seconds},
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


class NodeUnreachable(Exception):
    """The node did not answer: the task is tried again later."""


class JobMovedOn(Exception):
    """The node answered 409: the job is no longer where this task found it."""


class NodeClient:
    """The node's ``/internal`` HTTP API, as a worker calls it."""

    def __init__(self, config: Config) -> None:
        runner = config.runner
        token = read_secret(runner.worker_token_env, runner.worker_token_file)
        if not token:
            raise ConfigError("runner.worker_token_env: the worker token is empty")
        self.base = (runner.node_url or _default_node_url(config)).rstrip("/") + "/internal/"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        ca = config.http.tls_ca_file or None
        if ca:
            self.session.verify = str(config.resolve(Path(ca)))

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(method, self.base + path, timeout=NODE_TIMEOUT,
                                            **kwargs)
        except requests.RequestException as exc:
            raise NodeUnreachable(f"{self.base}: {exc}") from exc
        if response.status_code == 409:
            raise JobMovedOn(response.text.strip())
        if response.status_code >= 500:
            raise NodeUnreachable(f"{self.base}{path}: HTTP {response.status_code}")
        response.raise_for_status()
        return response

    def claim(self, job_id: str, worker: str) -> dict[str, Any]:
        return self._call("POST", f"jobs/{job_id}/claim", json={"worker": worker}).json()

    def input_file(self, job_id: str, number: int, path: Path) -> None:
        path.write_bytes(self._call("GET", f"jobs/{job_id}/inputs/{number}").content)

    def put_results(self, job_id: str, archive: bytes, meta: dict[str, Any]) -> None:
        self._call("PUT", f"jobs/{job_id}/results", data=archive,
                   headers={"X-Dicomnode-Meta": json.dumps(meta)})

    def get_results(self, job_id: str) -> bytes:
        return self._call("GET", f"jobs/{job_id}/results").content

    def failed(self, job_id: str, reason: str, *, retryable: bool,
               seconds: dict[str, float]) -> None:
        self._call("POST", f"jobs/{job_id}/failed",
                   json={"reason": reason, "retryable": retryable, "seconds": seconds})

    def delivered(self, job_id: str, results: Sequence[dict[str, Any]],
                  seconds: dict[str, float]) -> None:
        self._call("POST", f"jobs/{job_id}/delivered", json={"results": list(results),
                                                             "seconds": seconds})


def _default_node_url(config: Config) -> str:
    http = config.http
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"{'https' if http.tls else 'http'}://{host}:{http.port}/"


class Work:
    """What one worker process does with a job (the pipeline is loaded once per process)."""

    def __init__(self, config: Config, *, client: NodeClient | None = None,
                 pipeline: Any = None) -> None:
        from dicomnode.deliver import make_destination
        from dicomnode.pipeline import Pipeline

        self.config = config
        self.client = client or NodeClient(config)
        self.pipeline = pipeline if pipeline is not None else Pipeline.from_config(config)
        self.destinations = [make_destination(d, calling_ae_title=config.node.ae_title)
                             for d in config.destinations]
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job_id: str) -> str:
        """Claim the job and do what the node says; returns what was done."""
        try:
            claim = self.client.claim(job_id, self.name)
            action = claim["action"]
            with tempfile.TemporaryDirectory(prefix="dicomnode-worker-") as tmp:
                if action == "analyse":
                    self._analyse(job_id, claim, Path(tmp))
                elif action == "deliver":
                    folder = Path(tmp) / "results"
                    folder.mkdir()
                    unpack_results(self.client.get_results(job_id), folder)
                    self._deliver(job_id, folder)
            return action
        except JobMovedOn as exc:
            log.info("job %s moved on meanwhile (%s): nothing to do", job_id, exc)
            return "none"

    def _analyse(self, job_id: str, claim: dict[str, Any], tmp: Path) -> None:
        from dicomnode.report import summary_json
        from dicomnode.results import save, waiting_can_fix

        log.info("job %s: analysing", job_id)
        seconds: dict[str, float] = {}
        job = Job(id=job_id, key=SeriesKey(*claim["key"]), state=JobState.RUNNING, reason="",
                  inputs=(), warnings=tuple(claim["warnings"]), attempts=0,
                  first_failure_at=None, next_attempt_at=None, created_at=0.0, updated_at=0.0)
        predecessors = [pydicom.dcmread(_bytes_io(p)) for p in claim["predecessors"]]
        folder = tmp / "results"
        try:
            inputs = self._inputs(job_id, claim["inputs"], tmp / "inputs")
            outcome = run_pipeline(self.pipeline, self.config, job, inputs, seconds,
                                   predecessors=lambda ct: predecessors)
            started = time.perf_counter()
            folder.mkdir()
            save(folder, outcome.reports, summary_json(outcome.analysis, outcome.reports))
            seconds["save"] = time.perf_counter() - started
        except DicomNodeError as exc:
            log.error("job %s failed: %s", job_id, exc)
            self.client.failed(job_id, str(exc), retryable=False, seconds=seconds)
            return
        except OSError as exc:
            self.client.failed(job_id, f"worker {self.name}: {exc.strerror or exc}",
                               retryable=waiting_can_fix(exc), seconds=seconds)
            return
        except Exception as exc:  # the job, not the worker, fails on a bug
            log.exception("job %s failed with an internal error", job_id)
            self.client.failed(job_id, f"internal error: {type(exc).__name__}: {exc}",
                               retryable=False, seconds=seconds)
            return
        lesions = len(outcome.analysis.segmentation.lesions)
        self.client.put_results(job_id, pack_folder(folder), {
            "reason": f"{lesions} lesion(s) reported on {self.name}",
            "warnings": list(outcome.analysis.warnings), "seconds": seconds})
        self._deliver(job_id, folder)

    def _inputs(self, job_id: str, paths: Sequence[str], folder: Path) -> list[Path]:
        """The series' files: the node's own when this worker can read them, else copies."""
        local = [Path(p) for p in paths]
        if all(os.access(p, os.R_OK) for p in local):
            return local
        folder.mkdir()
        copies = []
        for number in range(len(paths)):
            copy = folder / f"{number:05d}.dcm"
            self.client.input_file(job_id, number, copy)
            copies.append(copy)
        return copies

    def _deliver(self, job_id: str, folder: Path) -> None:
        from dicomnode.results import load_datasets

        started = time.perf_counter()
        datasets = load_datasets(folder)
        results = [send(d, datasets) for d in self.destinations]
        self.client.delivered(job_id, [result_as_json(r) for r in results],
                              {"deliver": time.perf_counter() - started})
        log.info("job %s: delivery reported (%s)", job_id,
                 ", ".join(f"{r.destination} {'ok' if r.ok else 'failed'}" for r in results))


def _bytes_io(encoded: str) -> io.BytesIO:
    return io.BytesIO(base64.b64decode(encoded))


_work: Work | None = None


def register_tasks(app: Celery, config: Config) -> None:
    """The worker's task: run one job (the node only sends it, by name)."""

    @app.task(name=TASK_NAME, bind=True, acks_late=True, autoretry_for=(NodeUnreachable,),
              retry_backoff=5, retry_backoff_max=300, max_retries=None)
    def run_job(task: Any, job_id: str) -> str:
        global _work
        if _work is None:
            _work = Work(config)
        return _work.run(job_id)


def run_worker(config: Config, *, loglevel: str = "INFO") -> None:
    """Run a worker until it is stopped (SIGTERM: after the task at hand)."""
    app = make_app(config)
    register_tasks(app, config)
    app.worker_main(["worker", f"--loglevel={loglevel}", "--pool=solo", "--concurrency=1",
                     f"--queues={config.runner.queue}", "--without-gossip", "--without-mingle",
                     f"--hostname=dicomnode-{os.getpid()}@%h"])
