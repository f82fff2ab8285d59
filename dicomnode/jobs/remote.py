"""Jobs worked by Celery workers: the node's side (EDGE).

With ``[runner] kind = "celery"`` the node still receives, spools, decides completion and keeps
every job's state; :class:`CeleryRunner` sends each runnable job to the broker as a task
(``dicomnode.run_job``, by name: the node does not import the worker's code), and
:class:`RemoteJobs` answers the workers over the node's HTTP server (``/internal/...``, bearer
token ``[runner] worker_token_*``):

- ``claim``: what to do with a job now. Pending: its analysis starts (counted, as in the
  embedded runner); running: a worker died or the broker gave the task again, so it starts
  again (until ``[jobs] max_attempts``); delivering: deliver the saved results; anything
  else: nothing (the task was a duplicate);
- ``inputs``: the spooled instances of the series (or the worker reads the same spool folder);
- ``results``: the saved results a worker made, into the job's result folder, then
  ``REPORTED``; or the saved results for a delivery;
- ``failed`` / ``delivered``: the analysis failed (the reason; temporary or not), or the
  delivery's outcome per destination (the same backoff as the embedded runner).

Nothing is lost and nothing is sent twice with different content: the task is acknowledged
only after it finished (``acks_late``), a killed worker's task is given to another one, the
job's UIDs come from its id, so a repeated analysis writes the same objects, and a report for a
job that moved on meanwhile is refused (409).
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dicomnode.analyse.supplied import is_segmentation
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError
from dicomnode.jobs.machine import JobEvent, JobState
from dicomnode.jobs.runner import Runner, StorageFailure, read_headers
from dicomnode.jobs.store import Job
from dicomnode.results import discard, is_complete
from dicomnode.types import DeliveryResult, InstanceOutcome

log = logging.getLogger(__name__)

#: The Celery task a job becomes (implemented by :mod:`dicomnode.worker`).
TASK_NAME = "dicomnode.run_job"


class Conflict(DicomNodeError):
    """The request does not fit the job's state (answered 409)."""


class CeleryRunner(Runner):
    """The embedded runner's bookkeeping (jobs from complete series, recovery, backoff), with
    each job's work sent to Celery workers instead of done here."""

    def __init__(self, *args: Any, app: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = app
        #: (job id, state, updated_at) of each task sent: a job is sent again only once it
        #: has moved on (a retry, a resumed run).
        self._sent: set[tuple[str, str, float]] = set()
        #: Why the last sending failed (the broker is down), ``""`` when it did not.
        self.dispatch_error = ""

    @classmethod
    def from_config(cls, config: Config, *, pipeline: Any = None, **parts: Any) -> CeleryRunner:
        """The runner that sends jobs to the broker; the workers load the models."""
        from dicomnode.worker import make_app

        return cls(config, pipeline=None, app=make_app(config), **parts)

    def step(self) -> Job | None:
        job = super().step()
        if self.dispatch_error:  # /healthz says so; the jobs wait, sent at a later turn
            self.loop_error = self.dispatch_error
        return job

    def work_once(self) -> Job | None:
        """Send every runnable job that has not been sent in its present state; ``None`` when
        there was nothing to send. A broker that cannot be reached stops the round: the jobs
        stay where they are (a failed turn would resume the jobs the workers are running)."""
        sent = None
        now = self.clock()
        for job in self.jobs.all((JobState.PENDING, JobState.DELIVERING, JobState.RETRY_WAIT)):
            if job.state is JobState.RETRY_WAIT:
                if job.next_attempt_at is None or job.next_attempt_at > now:
                    continue
                job = self._due(job)
            stamp = (job.id, job.state.value, job.updated_at)
            if stamp in self._sent:
                continue
            try:
                self._dispatch(job)
            except Exception as exc:  # kombu's errors for an unreachable broker vary
                if not self.dispatch_error:
                    log.warning("cannot reach the broker (%s); jobs wait until it is back", exc)
                self.dispatch_error = f"broker unreachable: {exc}"
                return sent
            if self.dispatch_error:
                log.info("the broker is back")
                self.dispatch_error = ""
            self._sent.add(stamp)
            sent = job
        return sent

    def deliver_interrupted(self) -> list[Job]:
        """Deliveries a crash interrupted are sent to the workers like any other."""
        return []

    def _dispatch(self, job: Job) -> None:
        # retry=False: with the broker down this raises at once (the loop logs it and tries
        # again at its next turn) instead of holding the runner.
        self.app.send_task(TASK_NAME, args=[job.id], queue=self.config.runner.queue, retry=False)
        log.info("job %s (%s) sent to the workers", job.id, job.state.value)


class RemoteJobs:
    """What the node's HTTP server does for the workers (see the module docstring)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.jobs = runner.jobs

    def claim(self, job_id: str, worker: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job.state is JobState.RUNNING:
            # The worker that had it died, or the broker gave it again: start over, counted.
            if job.analysis_starts >= self.runner.config.jobs.max_attempts:
                self.runner._move(job, JobEvent.PERMANENT_FAILURE, (
                    f"analysis started {job.analysis_starts} times (jobs.max_attempts), the "
                    "last one interrupted: a worker died while analysing it"))
                return {"action": "none", "state": JobState.FAILED.value}
            job = self.runner._move(job, JobEvent.RESUME, f"given to {worker} again")
        if job.state is JobState.PENDING:
            job = self.runner._move(job, JobEvent.START, f"analysing on {worker}")
            return {"action": "analyse", "inputs": [str(p) for p in job.inputs],
                    "key": [job.key.study_uid, job.key.series_uid],
                    "warnings": list(job.warnings),
                    "predecessors": [_encoded(ds) for ds in self._predecessors(job)]}
        if job.state is JobState.DELIVERING:
            return {"action": "deliver"}
        return {"action": "none", "state": job.state.value}

    def input_path(self, job_id: str, number: int) -> Path:
        job = self.jobs.get(job_id)
        if not 0 <= number < len(job.inputs):
            raise KeyError(f"job {job_id} has {len(job.inputs)} inputs")
        return job.inputs[number]

    def store_results(self, job_id: str, archive: bytes, meta: dict[str, Any]) -> Job:
        """A worker's results (a tar of the result folder) become the job's; ``REPORTED``."""
        job = self._in(job_id, JobState.RUNNING)
        folder = self.runner.result_folder(job)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder.parent))
        except OSError as exc:
            raise StorageFailure.of("cannot save the results a worker sent", exc) from exc
        try:
            unpack_results(archive, staging)
            if not is_complete(staging):
                raise Conflict("the results have no summary: incomplete upload")
            discard(folder)
            staging.rename(folder)
        except OSError as exc:
            raise StorageFailure.of("cannot save the results a worker sent", exc) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.runner._move(job, JobEvent.REPORTED, str(meta.get("reason", "reported")),
                                 warnings=tuple(meta.get("warnings", ())) or job.warnings,
                                 seconds=dict(meta.get("seconds", {})))

    def results_archive(self, job_id: str) -> bytes:
        job = self._in(job_id, JobState.DELIVERING)
        folder = self.runner.result_folder(job)
        if not is_complete(folder):
            raise Conflict(f"the saved results of job {job_id} are missing")
        return pack_folder(folder)

    def failed(self, job_id: str, reason: str, *, retryable: bool,
               seconds: dict[str, float]) -> Job:
        job = self._in(job_id, JobState.RUNNING)
        if retryable:
            return self.runner._storage_failed(job, StorageFailure(reason, retryable=True), seconds)
        log.error("job %s failed on a worker: %s", job.id, reason)
        return self.runner._move(job, JobEvent.PERMANENT_FAILURE, reason, seconds=seconds)

    def delivered(self, job_id: str, results: Sequence[dict[str, Any]],
                  seconds: dict[str, float]) -> Job:
        job = self._in(job_id, JobState.DELIVERING)
        return self.runner.record_delivery(job, [_result(r) for r in results], seconds)

    def _in(self, job_id: str, state: JobState) -> Job:
        job = self.jobs.get(job_id)
        if job.state is not state:
            raise Conflict(f"job {job_id} is {job.state.value}, not {state.value}")
        return job

    def _predecessors(self, job: Job) -> list[Any]:
        headers = read_headers(job.inputs)
        ct = [ds for ds in headers if not is_segmentation(ds)]
        if len(ct) == len(headers):
            return []
        return self.runner.earlier_reports(job, ct)


def _encoded(ds: Any) -> str:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _result(data: dict[str, Any]) -> DeliveryResult:
    return DeliveryResult(
        destination=str(data["destination"]), retryable=bool(data.get("retryable")),
        error=str(data.get("error", "")),
        outcomes=tuple(InstanceOutcome(str(o["sop_instance_uid"]), bool(o["ok"]),
                                       str(o.get("reason", ""))) for o in data.get("outcomes", ())))


def result_as_json(result: DeliveryResult) -> dict[str, Any]:
    """A delivery result as a worker reports it (the inverse of ``_result``)."""
    return {"destination": result.destination, "retryable": result.retryable,
            "error": result.error,
            "outcomes": [{"sop_instance_uid": o.sop_instance_uid, "ok": o.ok, "reason": o.reason}
                         for o in result.outcomes]}


def pack_folder(folder: Path) -> bytes:
    """A result folder as the tar the node and the workers exchange."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                tar.add(path, arcname=path.name)
    return buffer.getvalue()


def unpack_results(archive: bytes, folder: Path) -> None:
    """A result tar into ``folder``: plain files only, no paths: nothing a worker sends lands outside ``folder``."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if not member.isfile() or name != member.name or name.startswith("."):
                raise Conflict(f"unexpected entry {member.name!r} in the results")
            data = tar.extractfile(member)
            assert data is not None
            (folder / name).write_bytes(data.read())


#: ``[runner] kind`` -> the runner class (each built by its ``from_config``).
RUNNER_KINDS: dict[str, type[Runner]] = {"embedded": Runner, "celery": CeleryRunner}
