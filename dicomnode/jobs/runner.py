"""The worker loop: takes complete series as jobs and drives each job through its states (EDGE).

One loop, two duties, each a small method a test can call with its own clock:

- :meth:`Runner.take_complete_series` asks the completion rule about every series with new
  instances and turns the ready ones into jobs (the snapshot of spooled files they cover);
- :meth:`Runner.work_once` moves the oldest runnable job one whole step: analysis and report
  (ending in DELIVERING or FAILED), or a delivery attempt (DELIVERED, RETRY_WAIT or FAILED).

Every failure becomes a job state with a reason, never a silent drop; the spooled inputs are
never deleted by the runner, so a failed job can be retried by a person (``dicomnode retry``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from dicomnode.config import Config
from dicomnode.deliver import Destination
from dicomnode.errors import DicomNodeError, InputRejected
from dicomnode.jobs.machine import Backoff, JobEvent, JobState
from dicomnode.jobs.store import Job, JobStore
from dicomnode.pipeline import Pipeline
from dicomnode.report import summary_json
from dicomnode.results import load_datasets, save
from dicomnode.series.completion import evaluate
from dicomnode.spool.index import Index
from dicomnode.types import DeliveryResult

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Runner:
    """Creates jobs from complete series and works them; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        index: Index,
        jobs: JobStore,
        destinations: Sequence[Destination],
        pipeline: Pipeline,
        results_root: Path,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.index = index
        self.jobs = jobs
        self.destinations = tuple(destinations)
        self.pipeline = pipeline
        self.results_root = results_root
        self.clock = clock
        d = config.delivery
        self.backoff = Backoff(
            initial_seconds=d.retry_initial_seconds,
            factor=d.retry_factor,
            maximum_seconds=d.retry_max_seconds,
            give_up_after_seconds=d.give_up_after_seconds,
        )

    def result_folder(self, job: Job) -> Path:
        return self.results_root / job.id

    # -- start-up
    def resume_interrupted(self) -> list[Job]:
        """Put jobs that a crash left RUNNING back to PENDING (deliveries simply repeat)."""
        resumed = []
        for job in self.jobs.all((JobState.RUNNING,)):
            resumed.append(self._move(job, JobEvent.RESUME, "resumed after restart"))
            log.warning("job %s was interrupted while running; it will run again", job.id)
        return resumed

    # -- duty 1: completion
    def take_complete_series(self) -> list[Job]:
        now = self.clock()
        created = []
        for state in self.index.pending_series():
            verdict = evaluate(state, now, self.config.completion)
            if not verdict.ready:
                continue
            paths = self.index.instance_paths(state.key)
            warnings = (verdict.warning,) if verdict.warning else ()
            job = self.jobs.create(state.key, paths, warnings=warnings, now=now)
            self.index.mark_taken(state.key, len(paths))
            log.info("job %s: series complete (%d instances): %s", job.id, len(paths), verdict.reason)
            if verdict.fail:
                job = self._move(job, JobEvent.PERMANENT_FAILURE, verdict.reason)
                log.error("job %s failed: %s", job.id, verdict.reason)
            created.append(job)
        return created

    # -- duty 2: jobs
    def work_once(self) -> Job | None:
        """Advance the oldest runnable job by one step; ``None`` when there was nothing to do."""
        job = self.jobs.next_runnable(self.clock())
        if job is None:
            return None
        if job.state is JobState.PENDING:
            job = self._analyse(job)
        elif job.state is JobState.RETRY_WAIT:
            job = self._move(job, JobEvent.DUE, "retrying delivery")
        if job.state is JobState.DELIVERING:
            job = self._deliver(job)
        return job

    def deliver_interrupted(self) -> list[Job]:
        """Repeat deliveries that a crash interrupted (same files, same UIDs)."""
        return [self._deliver(job) for job in self.jobs.all((JobState.DELIVERING,))]

    def _analyse(self, job: Job) -> Job:
        job = self._move(job, JobEvent.START, "analysing")
        try:
            datasets = read_inputs(job.inputs)
            outcome = self.pipeline.run(
                datasets,
                uid_seed=job.id,
                key=job.key,
                allow_gaps=bool(job.warnings),
                progress=lambda stage: log.info("job %s: %s", job.id, stage),
            )
        except DicomNodeError as exc:
            log.error("job %s failed: %s", job.id, exc)
            return self._move(job, JobEvent.PERMANENT_FAILURE, str(exc))
        except Exception as exc:  # the job, not the node, fails on a bug; inputs are kept
            log.exception("job %s failed with an internal error", job.id)
            return self._move(
                job, JobEvent.PERMANENT_FAILURE, f"internal error: {type(exc).__name__}: {exc}"
            )
        save(self.result_folder(job), outcome.reports, summary_json(outcome.analysis, outcome.reports))
        lesions = len(outcome.analysis.segmentation.lesions)
        return self._move(
            job, JobEvent.REPORTED, f"{lesions} lesion(s) reported",
            warnings=tuple(outcome.analysis.warnings) or job.warnings,
        )

    def _deliver(self, job: Job) -> Job:
        datasets = load_datasets(self.result_folder(job))
        results = [d.send(datasets) for d in self.destinations]
        failed = [r for r in results if not r.ok]
        if not failed:
            names = ", ".join(r.destination for r in results)
            log.info("job %s delivered to %s", job.id, names)
            return self._move(job, JobEvent.DELIVERED, f"delivered to {names}")
        reason = "; ".join(_describe(r) for r in failed)
        if all(r.retryable for r in failed):
            now = self.clock()
            first = job.first_failure_at if job.first_failure_at is not None else now
            if not self.backoff.exhausted(first, now):
                delay = self.backoff.delay(job.attempts + 1)
                log.warning("job %s: delivery failed (%s); retry in %.0f s", job.id, reason, delay)
                return self._move(
                    job, JobEvent.TEMPORARY_FAILURE, reason,
                    next_attempt_at=now + delay, count_failure=True,
                )
            reason = f"gave up after {now - first:.0f} s of temporary failures: {reason}"
        log.error("job %s: delivery failed for good: %s", job.id, reason)
        return self._move(job, JobEvent.PERMANENT_FAILURE, reason, count_failure=True)

    def _move(self, job: Job, event: JobEvent, reason: str, **changes) -> Job:
        """One journalled transition, timed by the runner's clock."""
        return self.jobs.transition(job.id, event, reason, now=self.clock(), **changes)

    # -- the loop
    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        self.resume_interrupted()
        self.deliver_interrupted()
        while not stop.is_set():
            try:
                self.take_complete_series()
                worked = self.work_once()
            except Exception:  # keep the node alive; the error is logged with its traceback
                log.exception("runner loop error")
                worked = None
            if worked is None:
                stop.wait(poll_seconds)


def read_inputs(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """The spooled instances of a job; a missing or unreadable file fails the job, named.

    pydicom raises many exception types on malformed data (an unknown VR raises
    NotImplementedError, for one); each is a fact about the input, not a bug of the node.
    """
    datasets = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            for _ in ds.iterall():  # pydicom converts values lazily: meet bad ones here, named
                pass
            datasets.append(ds)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise InputRejected(
                f"spooled instance {path.name} cannot be read: {type(exc).__name__}: {exc}"
            ) from None
    return datasets


def _describe(result: DeliveryResult) -> str:
    bad = [o for o in result.outcomes if not o.ok]
    detail = result.error or "; ".join(f"{o.sop_instance_uid}: {o.reason}" for o in bad)
    return f"{result.destination}: {detail}"
