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

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from dicomnode.analyse.supplied import SEGMENTATION_MODALITIES, is_segmentation, referenced_series
from dicomnode.config import Config
from dicomnode.deliver import Destination
from dicomnode.errors import DicomNodeError, InputRejected
from dicomnode.jobs.machine import Backoff, JobEvent, JobState
from dicomnode.jobs.store import Job, JobStore
from dicomnode.pipeline import Pipeline
from dicomnode.report import summary_json
from dicomnode.results import load_datasets, save
from dicomnode.series.completion import SeriesState, Verdict, evaluate
from dicomnode.spool.index import Index
from dicomnode.types import DeliveryResult, SeriesKey

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
        #: Spooled segmentation file -> the series it references (read once per file).
        self._referenced: dict[Path, frozenset[str]] = {}
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
        """Turn every series the completion rule calls ready into a job.

        A CT series becomes a job for the model, or, when an RTSTRUCT or SEG drawn on it is
        already here (``[segmentation] source`` "auto" or "supplied"), a job that measures
        that. An RTSTRUCT or SEG series waits until the CT it references is complete, then
        becomes a job of its own (a radiologist's correction of an earlier result); our own
        SEG coming back from the PACS is recognised and left alone.
        """
        now = self.clock()
        created = []
        pending = self.index.pending_series()
        for state in pending:
            verdict = evaluate(state, now, self.config.completion)
            if not verdict.ready:
                continue
            if self._is_segmentation(state.key):
                job = self._take_supplied(state, now)
            else:
                job = self._take_ct(state, verdict, pending, now)
            if job is not None:
                created.append(job)
        return created

    def _take_ct(self, state: SeriesState, verdict: Verdict, pending: Sequence[SeriesState],
                 now: float) -> Job | None:
        paths = self.index.instance_paths(state.key)
        supplied: list[SeriesState] = []
        if self.config.segmentation.source != "model":
            supplied = [s for s in pending if self._is_segmentation(s.key)
                        and state.key.series_uid in self._references(s.key)]
        if not supplied and self.config.segmentation.source == "supplied":
            self.index.mark_taken(state.key, len(paths))
            log.info("series %s complete; waiting for an RTSTRUCT or SEG drawn on it "
                     "([segmentation] source = supplied)", state.key.series_uid)
            return None
        inputs = [*paths, *(p for s in supplied for p in self.index.instance_paths(s.key))]
        warnings = (verdict.warning,) if verdict.warning else ()
        job = self.jobs.create(state.key, inputs, warnings=warnings, now=now)
        self.index.mark_taken(state.key, len(paths))
        for s in supplied:
            self.index.mark_taken(s.key, s.instance_count)
        log.info("job %s: series complete (%d instances%s): %s", job.id, len(paths),
                 f", with {len(supplied)} supplied segmentation series" if supplied else "",
                 verdict.reason)
        if verdict.fail:
            job = self._move(job, JobEvent.PERMANENT_FAILURE, verdict.reason)
            log.error("job %s failed: %s", job.id, verdict.reason)
        return job

    def _take_supplied(self, state: SeriesState, now: float) -> Job | None:
        """A job for an RTSTRUCT/SEG series once its CT is complete; ``None`` while waiting."""
        cts = [ct for uid in sorted(self._references(state.key))
               if (ct := self.index.find_series(uid)) is not None
               and ct.instance_count and ct.new_instances == 0]
        if not cts:  # polled until the CT is complete: checks only what the index knows
            log.debug("series %s waits for the CT it was drawn on", state.key.series_uid)
            return None
        paths = self.index.instance_paths(state.key)
        if {self._header(p).SOPInstanceUID for p in paths} <= self._our_seg_uids():
            self.index.mark_taken(state.key, len(paths))
            log.info("series %s is a SEG this node wrote, back from the PACS: not measured",
                     state.key.series_uid)
            return None
        job = self.jobs.create(state.key, [*self.index.instance_paths(cts[0].key), *paths],
                               now=now)
        self.index.mark_taken(state.key, len(paths))
        log.info("job %s: supplied segmentation series %s for CT series %s", job.id,
                 state.key.series_uid, cts[0].key.series_uid)
        return job

    def _is_segmentation(self, key: SeriesKey) -> bool:
        modalities = self.index.series_modalities(key)
        return bool(modalities) and modalities <= set(SEGMENTATION_MODALITIES)

    def _references(self, key: SeriesKey) -> set[str]:
        """The image series a segmentation series was drawn on; each file's header is read
        once (a series waiting for its CT is asked on every poll)."""
        uids: set[str] = set()
        for path in self.index.instance_paths(key):
            if path not in self._referenced:
                self._referenced[path] = frozenset(referenced_series(self._header(path)))
            uids |= self._referenced[path]
        return uids

    @staticmethod
    def _header(path: Path) -> pydicom.Dataset:
        return pydicom.dcmread(path, stop_before_pixels=True)

    def _our_seg_uids(self) -> set[str]:
        """SOP Instance UIDs of the SEGs this node wrote (from each result's summary)."""
        uids = set()
        for summary in self.results_root.glob("*/summary.json"):
            seg = _read_summary(summary).get("outputs", {}).get("seg") or {}
            if seg.get("sop_instance_uid"):
                uids.add(seg["sop_instance_uid"])
        return uids

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
            ct = [ds for ds in datasets if not is_segmentation(ds)]
            supplied = len(ct) < len(datasets)
            outcome = self.pipeline.run(
                datasets,
                uid_seed=job.id,
                # A supplied segmentation's job is keyed by its own series; the CT is analysed.
                key=_series_key(ct[0]) if supplied and ct else job.key,
                allow_gaps=bool(job.warnings),
                progress=lambda stage: log.info("job %s: %s", job.id, stage),
                predecessors=self._earlier_reports(job, ct) if supplied else (),
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

    def _earlier_reports(self, job: Job, ct: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
        """The newest SR this node delivered for the same CT series before ``job``: a
        corrected segmentation's report replaces it (Predecessor Documents Sequence)."""
        if not ct:
            return []
        series_uid = str(ct[0].SeriesInstanceUID)
        earlier = [
            other for other in self.jobs.all((JobState.DELIVERED,))
            if other.id != job.id and other.created_at <= job.created_at
            and _read_summary(self.result_folder(other) / "summary.json").get(
                "series_instance_uid") == series_uid
        ]
        if not earlier:
            return []
        newest = max(earlier, key=lambda other: other.created_at)
        log.info("job %s replaces the report of job %s", job.id, newest.id)
        return [pydicom.dcmread(self.result_folder(newest) / "sr.dcm")]

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


def _series_key(ds: pydicom.Dataset) -> SeriesKey:
    return SeriesKey(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")))


def _read_summary(path: Path) -> dict:
    """A result's summary.json, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _describe(result: DeliveryResult) -> str:
    bad = [o for o in result.outcomes if not o.ok]
    detail = result.error or "; ".join(f"{o.sop_instance_uid}: {o.reason}" for o in bad)
    return f"{result.destination}: {detail}"
