"""The worker loop: takes complete series as jobs and drives each job through its states (EDGE).

One loop, two duties, each a small method a test can call with its own clock:

- :meth:`Runner.take_complete_series` asks the completion rule about every series with new
  instances and turns the ready ones into jobs (the snapshot of spooled files they cover);
- :meth:`Runner.work_once` moves the oldest runnable job one whole step: analysis and report
  (ending in DELIVERING or FAILED), or a delivery attempt (DELIVERED, RETRY_WAIT or FAILED).

Every failure becomes a job state with a reason, never a silent drop; the spooled inputs are
never deleted by the runner, so a failed job can be retried by a person (``dicomnode retry``).

Faults of the node's own storage end in a state an operator can act on:

- a file that cannot be read or written (disk full, I/O error) while reading the inputs or
  saving the results moves the job to RETRY_WAIT with the reason and the delivery backoff
  (FAILED when waiting cannot help, or once the analysis was started ``[jobs] max_attempts``
  times); a partly saved result is removed, so the next attempt starts clean;
- a series larger than ``[jobs] max_voxels`` fails before its pixel data is read;
- a step that fails half-way because the job database cannot be written leaves its job
  RUNNING or DELIVERING; the next turn of the loop treats it as a crash would be treated at
  start-up (:meth:`Runner.recover`), so no job stays there;
- every start of an analysis is counted in the job database before it runs, so a series that
  crashes the node (out of memory, say) fails after ``[jobs] max_attempts`` starts instead of
  being resumed on every restart.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom

from dicomnode.analyse.supplied import SEGMENTATION_MODALITIES, is_segmentation, referenced_series
from dicomnode.config import Config
from dicomnode.deliver import Destination
from dicomnode.errors import DicomNodeError, InputRejected
from dicomnode.jobs.machine import Backoff, JobEvent, JobState
from dicomnode.jobs.store import Job, JobStore
from dicomnode.observe.events import Observer
from dicomnode.pipeline import Outcome, Pipeline
from dicomnode.report import summary_json
from dicomnode.results import (
    discard,
    is_complete,
    load_datasets,
    remove_temporary_files,
    save,
    waiting_can_fix,
)
from dicomnode.series.completion import SeriesState, Verdict, evaluate
from dicomnode.spool.index import Index
from dicomnode.types import DeliveryResult, SeriesKey

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class StorageFailure(DicomNodeError):
    """A file of the node's own could not be read or written (disk full, I/O error), or is
    gone; ``retryable`` when waiting may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable

    @classmethod
    def of(cls, what: str, exc: OSError) -> "StorageFailure":
        """``what`` failed with ``exc``: retryable as :func:`dicomnode.results.waiting_can_fix`
        says."""
        return cls(f"{what}: {exc.strerror or exc}", retryable=waiting_can_fix(exc))


class Runner:
    """Creates jobs from complete series and works them; see the module docstring."""

    def __init__(
        self,
        config: Config,
        *,
        index: Index,
        jobs: JobStore,
        destinations: Sequence[Destination],
        pipeline: Pipeline | None,
        results_root: Path,
        clock: Clock = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        #: Told of each job created, its stage timings and every delivery (metrics, audit).
        self.observer = observer if observer is not None else Observer()
        self.index = index
        self.jobs = jobs
        self.destinations = tuple(destinations)
        self.pipeline = pipeline
        self.results_root = results_root
        self.clock = clock
        #: Whether the next turn of the loop must first resume interrupted jobs.
        self._recovery_due = True
        #: Why the last turn of the loop failed, ``""`` when it did not (``/healthz``).
        self.loop_error = ""
        #: Spooled segmentation file -> the series it references (read once per file).
        self._referenced: dict[Path, frozenset[str]] = {}
        #: When the earliest series that was not ready at the last check can be (clock time).
        self._next_due: float | None = None
        d = config.delivery
        self.backoff = Backoff(
            initial_seconds=d.retry_initial_seconds,
            factor=d.retry_factor,
            maximum_seconds=d.retry_max_seconds,
            give_up_after_seconds=d.give_up_after_seconds,
        )

    @classmethod
    def from_config(cls, config: Config, *, pipeline: Pipeline | None, **parts: Any) -> Runner:
        """The embedded runner: the pipeline in this process (loaded now when not given: a
        missing or broken model stops the node at start-up with the reason, instead of
        failing every job later)."""
        return cls(config, pipeline=pipeline if pipeline is not None else Pipeline.from_config(config),
                   **parts)

    def result_folder(self, job: Job) -> Path:
        return self.results_root / job.id

    # -- start-up, and after a step that failed half-way
    def recover(self) -> None:
        """Resume what was interrupted: at start-up (a crash) or after a loop error (a step
        that could not record its outcome). Nothing is being worked on when it is called."""
        removed = remove_temporary_files(self.results_root)
        if removed:
            log.warning("removed %d partial result file(s) left by an interrupted save", removed)
        self.resume_interrupted()
        self.deliver_interrupted()

    def resume_interrupted(self) -> list[Job]:
        """Put jobs whose analysis was interrupted back to PENDING, or fail those whose
        analysis was started ``[jobs] max_attempts`` times already."""
        limit = self.config.jobs.max_attempts
        resumed = []
        for job in self.jobs.all((JobState.RUNNING,)):
            if job.analysis_starts >= limit:
                reason = (f"analysis started {job.analysis_starts} times (jobs.max_attempts = "
                          f"{limit}), the last one interrupted: the node crashed or was killed "
                          "while analysing it; not retried: see the log; `dicomnode retry` "
                          "runs it again")
                log.error("job %s failed: %s", job.id, reason)
                resumed.append(self._move(job, JobEvent.PERMANENT_FAILURE, reason))
                continue
            log.warning("job %s was interrupted while running (start %d of at most %d); "
                        "it will run again", job.id, job.analysis_starts, limit)
            resumed.append(self._move(job, JobEvent.RESUME, "resumed after an interruption"))
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
        taken: set[SeriesKey] = set()  # contours a CT's job took earlier in this turn
        self._next_due = None
        for state in pending:
            if state.key in taken:
                continue
            verdict = evaluate(state, now, self.config.completion)
            if not verdict.ready:
                self._note_due(state, now)
                continue
            if self._is_segmentation(state.key):
                job = self._take_supplied(state, now)
            else:
                job = self._take_ct(state, verdict, pending, now, taken)
            if job is not None:
                created.append(job)
        return created

    def _note_due(self, state: SeriesState, now: float) -> None:
        """Remember when a series that is not ready yet can next change its verdict: the end
        of its quiet period (then of its gap timeout), so the loop checks it then."""
        if not state.new_instances:
            return
        completion = self.config.completion
        due = state.last_arrival + completion.quiet_seconds
        if due <= now:
            due = state.last_arrival + completion.gap_timeout_seconds
        if due > now and (self._next_due is None or due < self._next_due):
            self._next_due = due

    def _take_ct(self, state: SeriesState, verdict: Verdict, pending: Sequence[SeriesState],
                 now: float, taken: set[SeriesKey]) -> Job | None:
        """A job for a complete CT series, with the contours drawn on it that are here (their
        series are added to ``taken``: they make no job of their own)."""
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
        job = self._job_for(state, inputs, warnings, now)
        taken.update(s.key for s in supplied)
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
        job = self._job_for(state, [*self.index.instance_paths(cts[0].key), *paths], (), now)
        self.index.mark_taken(state.key, len(paths))
        log.info("job %s: supplied segmentation series %s for CT series %s", job.id,
                 state.key.series_uid, cts[0].key.series_uid)
        return job

    def _job_for(self, state: SeriesState, inputs: list[Path], warnings: tuple[str, ...],
                 now: float) -> Job:
        """A new job for this snapshot of the series, or the one made for it already when
        marking the series taken failed afterwards (the index could not be written): a job
        created after the series' last arrival, with the same inputs, covers it."""
        latest = self.jobs.latest(state.key)
        if (latest is not None and latest.created_at >= state.last_arrival
                and set(latest.inputs) == set(inputs)):
            return latest
        job = self.jobs.create(state.key, inputs, warnings=warnings, now=now)
        self.observer.job_created(job.id, job.key, len(job.inputs))
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
        if job.state is JobState.RETRY_WAIT:
            job = self._due(job)
        if job.state is JobState.PENDING:
            job = self._analyse(job)
        if job.state is JobState.DELIVERING:
            job = self._deliver(job)
        return job

    def deliver_interrupted(self) -> list[Job]:
        """Repeat deliveries that a crash interrupted (same files, same UIDs)."""
        return [self._deliver(job) for job in self.jobs.all((JobState.DELIVERING,))]

    def _due(self, job: Job) -> Job:
        """A waiting job whose time has come: its delivery is tried again when its results
        are saved, else its analysis runs again."""
        if is_complete(self.result_folder(job)):
            return self._move(job, JobEvent.DUE, "retrying delivery")
        return self._move(job, JobEvent.RERUN, "retrying the analysis")

    def _analyse(self, job: Job) -> Job:
        job = self._move(job, JobEvent.START, "analysing")  # counts the start, durably
        seconds: dict[str, float] = {}  # stage timings of this attempt, kept with the job
        try:
            outcome = self._run_pipeline(job, seconds)
            started = time.perf_counter()
            self._save(job, outcome)
            seconds["save"] = time.perf_counter() - started
        except StorageFailure as exc:
            return self._storage_failed(job, exc, seconds)
        except DicomNodeError as exc:
            log.error("job %s failed: %s", job.id, exc)
            return self._move(job, JobEvent.PERMANENT_FAILURE, str(exc), seconds=seconds)
        except Exception as exc:  # the job, not the node, fails on a bug; inputs are kept
            log.exception("job %s failed with an internal error", job.id)
            return self._move(
                job, JobEvent.PERMANENT_FAILURE, f"internal error: {type(exc).__name__}: {exc}",
                seconds=seconds,
            )
        lesions = len(outcome.analysis.segmentation.lesions)
        return self._move(
            job, JobEvent.REPORTED, f"{lesions} lesion(s) reported",
            warnings=tuple(outcome.analysis.warnings) or job.warnings, seconds=seconds,
        )

    def _run_pipeline(self, job: Job, seconds: dict[str, float]) -> Outcome:
        """:func:`run_pipeline` on the job's spooled inputs, with the report it replaces."""
        return run_pipeline(self.pipeline, self.config, job, job.inputs, seconds,
                            predecessors=lambda ct: self.earlier_reports(job, ct))

    def _save(self, job: Job, outcome: Outcome) -> None:
        """Write the job's results into a clean folder (an interrupted earlier attempt may
        have left part of its own); on failure nothing of them is left."""
        folder = self.result_folder(job)
        try:
            discard(folder)
            save(folder, outcome.reports, summary_json(outcome.analysis, outcome.reports))
        except OSError as exc:
            self._discard_quietly(folder)
            raise StorageFailure.of("cannot save results", exc) from exc

    def _discard_quietly(self, folder: Path) -> None:
        """Remove a partly saved result; a folder that cannot be removed either is only
        logged, since the next save removes it first and fails with the reason if it still
        cannot."""
        try:
            discard(folder)
        except OSError as exc:
            log.warning("cannot remove the partial result %s: %s", folder, exc.strerror or exc)

    def _storage_failed(self, job: Job, failure: StorageFailure,
                        seconds: dict[str, float] | None = None) -> Job:
        """RETRY_WAIT with the backoff while waiting can help and the analysis may start
        again (``jobs.max_attempts``); FAILED otherwise, with the reason."""
        limit = self.config.jobs.max_attempts
        if failure.retryable and job.analysis_starts < limit:
            delay = self.backoff.delay(job.analysis_starts)
            log.warning("job %s: %s; the analysis runs again in %.0f s", job.id, failure, delay)
            return self._move(job, JobEvent.TEMPORARY_FAILURE, str(failure),
                              next_attempt_at=self.clock() + delay, seconds=seconds)
        reason = str(failure)
        if failure.retryable:
            reason += (f" (analysis started {job.analysis_starts} times, jobs.max_attempts = "
                       f"{limit}); `dicomnode retry` runs it again")
        log.error("job %s failed: %s", job.id, reason)
        return self._move(job, JobEvent.PERMANENT_FAILURE, reason, seconds=seconds)

    def earlier_reports(self, job: Job, ct: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
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
        try:
            return [pydicom.dcmread(self.result_folder(newest) / "sr.dcm")]
        except OSError as exc:
            raise StorageFailure.of(f"cannot read the report of job {newest.id}", exc) from exc

    def _deliver(self, job: Job) -> Job:
        started = time.perf_counter()
        try:
            datasets = self._saved_results(job)
        except StorageFailure as exc:
            return self._delivery_failed(job, str(exc), retryable=exc.retryable)
        results = [send(d, datasets) for d in self.destinations]
        return self.record_delivery(job, results, {"deliver": time.perf_counter() - started})

    def record_delivery(self, job: Job, results: Sequence[DeliveryResult],
                        seconds: dict[str, float]) -> Job:
        """The job after these delivery attempts (here or on a worker): delivered, waiting
        for a retry, or failed."""
        for result in results:
            self.observer.delivery_attempted(job.id, job.key, result.destination, result)
        failed = [r for r in results if not r.ok]
        if not failed:
            names = ", ".join(r.destination for r in results)
            log.info("job %s delivered to %s in %.1f s", job.id, names, seconds["deliver"])
            return self._move(job, JobEvent.DELIVERED, f"delivered to {names}", seconds=seconds)
        reason = "; ".join(_describe(r) for r in failed)
        return self._delivery_failed(job, reason, retryable=all(r.retryable for r in failed),
                                     seconds=seconds)

    def _saved_results(self, job: Job) -> list[pydicom.Dataset]:
        """The job's saved report objects; raises :class:`StorageFailure` when they cannot be
        read, and a permanent one when they are gone (a retry analyses the series again)."""
        folder = self.result_folder(job)
        try:
            datasets = load_datasets(folder) if is_complete(folder) else []
        except OSError as exc:
            raise StorageFailure.of("cannot read the saved results", exc) from exc
        if not datasets:
            raise StorageFailure(f"the saved results are missing from {folder}; "
                                 "`dicomnode retry` analyses the series again", retryable=False)
        return datasets

    def _delivery_failed(self, job: Job, reason: str, *, retryable: bool,
                         seconds: dict[str, float] | None = None) -> Job:
        """RETRY_WAIT with the backoff for a failure that waiting can fix, until the backoff
        gives up; FAILED otherwise."""
        if retryable:
            now = self.clock()
            first = job.first_failure_at if job.first_failure_at is not None else now
            if not self.backoff.exhausted(first, now):
                delay = self.backoff.delay(job.attempts + 1)
                log.warning("job %s: delivery failed (%s); retry in %.0f s", job.id, reason, delay)
                return self._move(
                    job, JobEvent.TEMPORARY_FAILURE, reason,
                    next_attempt_at=now + delay, count_failure=True, seconds=seconds,
                )
            reason = f"gave up after {now - first:.0f} s of temporary failures: {reason}"
        log.error("job %s: delivery failed for good: %s", job.id, reason)
        return self._move(job, JobEvent.PERMANENT_FAILURE, reason, count_failure=True,
                          seconds=seconds)

    def _move(self, job: Job, event: JobEvent, reason: str, **changes) -> Job:
        """One journalled transition, timed by the runner's clock; the stage timings it
        records go to the observer."""
        moved = self.jobs.transition(job.id, event, reason, now=self.clock(), **changes)
        if changes.get("seconds"):
            self.observer.stages_timed(changes["seconds"])
        return moved

    # -- the loop
    def step(self) -> Job | None:
        """One turn of the loop: recover what is interrupted (at the first turn, and after a
        turn that failed), take complete series, advance one job. Returns the job worked on,
        ``None`` when there was nothing to do or the turn failed; never raises."""
        try:
            if self._recovery_due:
                self.recover()
                self._recovery_due = False
            self.take_complete_series()
            job = self.work_once()
        except Exception as exc:  # keep the node alive; the error is logged with its traceback
            log.exception("runner loop error; what it interrupted is resumed at the next turn")
            self._recovery_due = True
            self.loop_error = f"{type(exc).__name__}: {exc}"
            return None
        self.loop_error = ""
        return job

    def run_forever(self, stop: threading.Event, poll_seconds: float = 0.5) -> None:
        while not stop.is_set():
            if self.step() is None:
                stop.wait(self.idle_wait(poll_seconds))

    def idle_wait(self, poll_seconds: float) -> float:
        """Seconds to wait before the next turn when there was nothing to do: ``poll_seconds``,
        or less when a waiting series' quiet period ends sooner (a series is then taken when
        its quiet period ends, not up to a poll later)."""
        if self._next_due is None:
            return poll_seconds
        return min(poll_seconds, max(0.01, self._next_due - self.clock()))


def run_pipeline(pipeline: Pipeline, config: Config, job: Job, inputs: Sequence[Path],
                 seconds: dict[str, float], *,
                 predecessors: Callable[[list[pydicom.Dataset]], list[pydicom.Dataset]]) -> Outcome:
    """Check the size of the job's series from the headers of ``inputs`` (its spooled files,
    or a worker's copies), then read and analyse it; the time of each stage goes into
    ``seconds``. When a supplied segmentation is measured, ``predecessors(ct)`` gives the
    earlier reports the new one replaces."""
    started = time.perf_counter()
    check_volume_size(read_headers(inputs), config.jobs.max_voxels)
    datasets = read_inputs(inputs)
    seconds["read"] = time.perf_counter() - started
    ct = [ds for ds in datasets if not is_segmentation(ds)]
    supplied = len(ct) < len(datasets)
    outcome = pipeline.run(
        datasets,
        uid_seed=job.id,
        # A supplied segmentation's job is keyed by its own series; the CT is analysed.
        key=_series_key(ct[0]) if supplied and ct else job.key,
        allow_gaps=bool(job.warnings),
        progress=lambda stage: log.info("job %s: %s", job.id, stage),
        predecessors=predecessors(ct) if supplied else (),
    )
    seconds.update(outcome.seconds)
    return outcome


def send(destination: Destination, datasets: Sequence[pydicom.Dataset]) -> DeliveryResult:
    """One delivery attempt. A destination answers every failure with a result; one that
    raises has a bug, which fails this job for good instead of the loop repeating it."""
    try:
        return destination.send(datasets)
    except Exception as exc:
        log.exception("destination %s raised instead of answering", destination.name)
        return DeliveryResult(destination.name,
                              error=f"internal error: {type(exc).__name__}: {exc}")


def read_headers(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """The headers (everything before the pixel data) of a job's spooled instances; errors
    as :func:`read_inputs`."""
    return [_read_spooled(path, stop_before_pixels=True) for path in paths]


def read_inputs(paths: Sequence[Path]) -> list[pydicom.Dataset]:
    """The spooled instances of a job, whole.

    Raises
    ------
    InputRejected
        A file is missing or is not readable DICOM; the message names it.
    StorageFailure
        A file could not be read for another reason (an I/O error).
    """
    return [_read_spooled(path) for path in paths]


def _read_spooled(path: Path, *, stop_before_pixels: bool = False) -> pydicom.Dataset:
    """One spooled instance, every value converted.

    pydicom raises many exception types on malformed data (an unknown VR raises
    NotImplementedError, for one); each is a fact about the input, not a bug of the node.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
        for _ in ds.iterall():  # pydicom converts values lazily: meet bad ones here, named
            pass
    except Exception as exc:  # noqa: BLE001 - see the docstring
        if _is_disk_fault(exc):
            # A fault of the disk, not of the input: it may read another time.
            raise StorageFailure.of(f"cannot read spooled instance {path.name}", exc) from exc
        raise InputRejected(
            f"spooled instance {path.name} cannot be read: {type(exc).__name__}: "
            f"{without_values(str(exc))}"
        ) from None
    return ds


def _is_disk_fault(exc: Exception) -> bool:
    """An operating-system error reading an existing file. pydicom also raises OSError for
    malformed data ("No tag to read at file position ..."), but without an errno."""
    return (isinstance(exc, OSError) and exc.errno is not None
            and not isinstance(exc, FileNotFoundError))


#: A quoted value in an exception's text: 'x', "x", b'x' or b"x".
_QUOTED = re.compile(r"""(?<!\w)b?(['"])(?:\\.|(?!\1).)*\1""")


def without_values(text: str) -> str:
    """``text`` with every quoted value replaced by ``'...'``: pydicom's exceptions quote the
    raw value they could not parse, which may be a name or patient ID (never logged)."""
    return _QUOTED.sub("'...'", text)


def check_volume_size(headers: Sequence[pydicom.Dataset], max_voxels: int) -> None:
    """Refuse a job whose images hold more than ``max_voxels`` voxels (``[jobs] max_voxels``)
    before their pixel data is read: rows x columns x frames, summed over the images.

    Raises
    ------
    InputRejected
        Too many voxels, or a size element that is not a number; the message says which.
    """
    images = [ds for ds in headers if not is_segmentation(ds)]
    try:
        sizes = [(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0),
                  int(ds.get("NumberOfFrames") or 1)) for ds in images]
    except (TypeError, ValueError) as exc:
        raise InputRejected(f"Rows, Columns or NumberOfFrames is not a number: {exc}") from None
    voxels = sum(rows * cols * frames for rows, cols, frames in sizes)
    if voxels > max_voxels:
        slices = sum(frames for _, _, frames in sizes)
        rows, cols = max(r for r, _, _ in sizes), max(c for _, c, _ in sizes)
        raise InputRejected(
            f"series too large: {voxels:,} voxels ({slices} slices of up to {rows} x {cols}), "
            f"more than jobs.max_voxels = {max_voxels:,}; not analysed"
        )


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
