"""``dicomnode features``: measure every lesion of a cohort CSV, resumably.

:func:`compute_features` loads each row of a cohort (:mod:`dicomnode.cohort`) and measures
its lesion with :class:`~dicomnode.analyse.measure.Measurer`, the code path the node uses,
in a pool of ``workers`` processes. It writes

- ``<out>``: one row per measured cohort row, in cohort order: ``case_id``, then ``roi``
  and ``mask_label`` when the cohort uses them, then every feature (values written with
  ``repr``, so reading them back gives the same floats; ``nan`` where a feature could not
  be computed);
- ``<out>.warnings.csv``: ``case_id, roi, mask_label, line, severity, message``, one line per
  warning of a measured row (``severity`` "warning": the features are there, some may be
  NaN) and per row that failed (``severity`` "error": no features; the message says why).

Each measured row is also kept in ``<out>.cache/`` as a small JSON file written atomically
(temporary file, then rename), keyed by the measurer's fingerprint, the row and the size and
modification time of its input files. A rerun, e.g. after an interruption, measures only the
rows whose file is missing or stale; a changed protocol or a changed input file is measured
again. Failed rows are not cached: they are tried again on the next run.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pydicom.config
import SimpleITK as sitk
from tqdm import tqdm

from dicomnode.analyse.measure import Measurer
from dicomnode.cohort import DICOMWEB_PREFIX, CohortRow, DicomwebSource, load_case, read_cohort
from dicomnode.config import AssemblyConfig, Config
from dicomnode.errors import DicomNodeError

log = logging.getLogger(__name__)

#: Bump when the cache file layout changes: older files are then measured again.
CACHE_SCHEMA = "dicomnode-features-cache/1"
WARNINGS_FIELDS = ("case_id", "roi", "mask_label", "line", "severity", "message")


@dataclass(frozen=True)
class FailedRow:
    """A cohort row that could not be measured, and why."""

    row: CohortRow
    reason: str


@dataclass(frozen=True)
class FeatureRunSummary:
    """What one :func:`compute_features` run did.

    Attributes
    ----------
    rows:
        Rows in the cohort.
    computed, cached:
        Rows measured by this run, and rows taken from the cache.
    failures:
        Rows that could not be measured, in cohort order (they are not in ``out_csv``).
    warnings:
        Warnings of measured rows (all are in ``warnings_csv``).
    """

    out_csv: Path
    warnings_csv: Path
    rows: int
    computed: int
    cached: int
    failures: tuple[FailedRow, ...]
    warnings: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        measured = self.computed + self.cached
        lines = [(
            f"features of {measured} of {self.rows} row(s) written to {self.out_csv} "
            f"({self.computed} measured now, {self.cached} from the cache, "
            f"{self.seconds:.1f} s); {self.warnings} warning(s) in {self.warnings_csv}"
        )]
        if self.failures:
            lines.append(f"{len(self.failures)} row(s) FAILED (not in {self.out_csv.name}):")
            lines += [f"  {f.reason}" for f in self.failures]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Outcome:
    """One row's result as it travels back from a worker: features, or why there are none."""

    index: int
    values: tuple[float, ...] = ()
    warnings: tuple[str, ...] = ()
    error: str = ""
    seconds: float = 0.0


def compute_features(
    cohort_csv: Path,
    out_csv: Path,
    *,
    config: Config,
    workers: int = 2,
    progress: bool = True,
    dicomweb: DicomwebSource | None = None,
) -> FeatureRunSummary:
    """Measure the lesion of every cohort row; write ``out_csv`` and its warnings file.

    Parameters
    ----------
    cohort_csv:
        The cohort (see ``docs/cohorts.md``); relative paths in it are relative to its folder.
    out_csv:
        Features file to write; ``<out_csv>.warnings.csv`` and the cache folder
        ``<out_csv>.cache/`` go next to it.
    config:
        ``[radiomics]`` and ``[regional]`` choose the features, ``[assembly]`` the checks a
        DICOM series must pass.
    workers:
        Processes measuring rows at the same time (each uses one core).
    progress:
        Show a progress bar on stderr.
    dicomweb:
        Server for ``dicomweb:`` references.

    Returns
    -------
    FeatureRunSummary
        Counts and the failed rows; a failed row never stops the others.

    Raises
    ------
    CohortError
        The cohort file itself is unusable (the message names line and column).
    """
    started = time.monotonic()
    cohort_csv, out_csv = Path(cohort_csv), Path(out_csv)
    rows = read_cohort(cohort_csv)
    base_dir = cohort_csv.resolve().parent
    measurer = Measurer.from_config(config)
    cache = _Cache(out_csv.with_name(out_csv.name + ".cache"), measurer)
    keys = [cache.key(row, base_dir) for row in rows]
    results = _from_cache(cache, rows, keys)
    todo = [index for index in range(len(rows)) if index not in results]
    log.info("%d of %d row(s) found in the cache; measuring %d", len(results), len(rows),
             len(todo))
    job = _Job(config, base_dir, dicomweb, pydicom.config.settings.reading_validation_mode)
    for outcome in _run(job, [rows[i] for i in todo], todo, workers, progress):
        if not outcome.error:
            cache.write(rows[outcome.index], keys[outcome.index], outcome)
        results[outcome.index] = outcome
    failures = tuple(FailedRow(rows[i], results[i].error) for i in sorted(results)
                     if results[i].error)
    warnings_csv = out_csv.with_name(out_csv.name + ".warnings.csv")
    ordered = [results[i] for i in range(len(rows))]
    _write_features(out_csv, rows, ordered, measurer.feature_names)
    _write_warnings(warnings_csv, rows, ordered)
    return FeatureRunSummary(
        out_csv=out_csv,
        warnings_csv=warnings_csv,
        rows=len(rows),
        computed=sum(1 for i in todo if not results[i].error),
        cached=len(rows) - len(todo),
        failures=failures,
        warnings=sum(len(o.warnings) for o in ordered if not o.error),
        seconds=time.monotonic() - started,
    )


# --------------------------------------------------------------------------------------------
# Measuring, in worker processes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What every worker needs besides the row (picklable: sent once per worker)."""

    config: Config
    base_dir: Path
    dicomweb: DicomwebSource | None
    #: The caller's pydicom validation mode: the CLI silences odd-but-harmless values, and a
    #: spawned worker would otherwise warn about them once per element per slice.
    reading_validation_mode: int

    @property
    def assembly(self) -> AssemblyConfig:
        return self.config.assembly


_worker: tuple[_Job, Measurer] | None = None


def _start_worker(job: _Job) -> None:
    # One measurer per process; SimpleITK's own threads would only fight the pool for cores.
    global _worker
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    pydicom.config.settings.reading_validation_mode = job.reading_validation_mode
    _worker = (job, Measurer.from_config(job.config))


def _start_pool_worker(job: _Job) -> None:
    # Ctrl-C reaches the whole process group; only the main process should act on it (stop
    # handing out rows), while a worker finishes its row instead of dying mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    # The rows are the parallelism here: no pool of radiomics processes per worker as well.
    radiomics = dataclasses.replace(job.config.radiomics, workers=1)
    _start_worker(dataclasses.replace(job, config=dataclasses.replace(job.config, radiomics=radiomics)))


def _exit_with_parent(poll_seconds: float = 1.0) -> None:
    """End this worker when the process that started it dies (kill -9 of ``features``).

    Nothing in concurrent.futures ends a worker whose parent was killed: orphans of a killed
    run were found still alive long after it. An orphan is re-parented, which changes
    ``os.getppid()``; the parent's PID comes from multiprocessing, since the parent may already
    be gone while this worker imports.
    """
    parent = multiprocessing.parent_process()
    if parent is None:  # not a pool worker
        return

    def watch() -> None:
        while os.getppid() == parent.pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _measure_row(index: int, row: CohortRow) -> _Outcome:
    """Load and measure one row; any failure becomes the outcome's ``error``, never a raise."""
    assert _worker is not None, "worker not started"
    job, measurer = _worker
    started = time.monotonic()
    try:
        case = load_case(row, base_dir=job.base_dir, dicomweb=job.dicomweb, assembly=job.assembly)
        features = measurer.measure_arrays(
            case.hu, case.mask, case.spacing_zyx, organ_mask=case.organ_mask
        )
    except DicomNodeError as exc:
        return _Outcome(index, error=_naming_row(row, str(exc)))
    except Exception as exc:  # one row's bug must not cost the other rows their features
        log.exception("%s: internal error", row.description)
        reason = f"internal error: {type(exc).__name__}: {exc}"
        return _Outcome(index, error=_naming_row(row, reason))
    return _Outcome(index, features.values, features.warnings,
                    seconds=time.monotonic() - started)


def _naming_row(row: CohortRow, message: str) -> str:
    """``message`` starting with the row's name (load_case's errors already do)."""
    named = message.startswith(row.description)
    return message if named else f"{row.description}: {message}"


def _run(
    job: _Job, rows: Sequence[CohortRow], indices: Sequence[int], workers: int, progress: bool
) -> Iterator[_Outcome]:
    """Outcomes of ``rows`` (cohort positions ``indices``) as they finish, with a progress bar."""
    with tqdm(total=len(rows), desc="features", unit="row", disable=not progress) as bar:
        if workers <= 1 or len(rows) <= 1:
            outcomes = _run_here(job, rows, indices)
        else:
            outcomes = _run_in_pool(job, rows, indices, min(workers, len(rows)))
        for outcome in outcomes:
            yield outcome
            bar.update()


def _run_here(job: _Job, rows: Sequence[CohortRow], indices: Sequence[int]) -> Iterator[_Outcome]:
    if rows:
        _start_worker(job)
    for index, row in zip(indices, rows, strict=True):
        yield _measure_row(index, row)


def _run_in_pool(
    job: _Job, rows: Sequence[CohortRow], indices: Sequence[int], workers: int
) -> Iterator[_Outcome]:
    # "spawn": a forked child may inherit ITK/OpenMP thread pools in a locked state.
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_start_pool_worker,
        initargs=(job,),
    ) as pool:
        futures = {
            pool.submit(_measure_row, i, row): (i, row)
            for i, row in zip(indices, rows, strict=True)
        }
        try:
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool:
                    index, row = futures[future]
                    reason = "the worker process measuring this row died (out of memory?)"
                    yield _Outcome(index, error=_naming_row(row, reason))
        finally:
            # Interrupted: drop the rows not started; finished ones are in the cache.
            for future in futures:
                future.cancel()


# --------------------------------------------------------------------------------------------
# The cache: one JSON file per row
# --------------------------------------------------------------------------------------------


class _Cache:
    """``<out>.cache/<case>-<hash>.json``: one measured row, valid for one key.

    The key covers the measurer's fingerprint, everything the row says about its inputs and
    the size and modification time of its input files, so a changed protocol or a rewritten
    mask is measured again; ``dicomweb:`` inputs are identified by their UIDs alone.
    """

    def __init__(self, folder: Path, measurer: Measurer) -> None:
        self.folder = folder
        self.fingerprint = measurer.fingerprint
        self.n_features = len(measurer.feature_names)

    def key(self, row: CohortRow, base_dir: Path) -> str:
        identity = {
            "fingerprint": self.fingerprint,
            "row": [row.case_id, row.roi, row.mask_label, row.image, row.mask, row.organ_mask],
            "files": [_file_stamp(ref, base_dir) for ref in (row.image, row.mask, row.organ_mask)],
        }
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def path(self, row: CohortRow) -> Path:
        lesion = json.dumps([row.case_id, row.roi, row.mask_label]).encode()
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", row.case_id)[:60]
        return self.folder / f"{readable}-{hashlib.sha256(lesion).hexdigest()[:12]}.json"

    def read(self, row: CohortRow, key: str, index: int) -> _Outcome | None:
        """The cached outcome, or ``None`` when missing, unreadable or made for another key."""
        try:
            data = json.loads(self.path(row).read_text(encoding="utf-8"))
            if data["schema"] != CACHE_SCHEMA or data["key"] != key:
                return None
            values = tuple(float(v) for v in data["values"])
            warnings = tuple(str(w) for w in data["warnings"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if len(values) != self.n_features:
            return None
        return _Outcome(index, values, warnings, seconds=float(data.get("seconds", 0.0)))

    def write(self, row: CohortRow, key: str, outcome: _Outcome) -> None:
        data: dict[str, Any] = {
            "schema": CACHE_SCHEMA,
            "key": key,
            "fingerprint": self.fingerprint,
            "case_id": row.case_id,
            "roi": row.roi,
            "mask_label": row.mask_label,
            "image": row.image,
            "mask": row.mask,
            "organ_mask": row.organ_mask,
            "seconds": round(outcome.seconds, 3),
            "warnings": list(outcome.warnings),
            "values": [repr(v) for v in outcome.values],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path(row), json.dumps(data, indent=1))


def _from_cache(
    cache: _Cache, rows: Sequence[CohortRow], keys: Sequence[str]
) -> dict[int, _Outcome]:
    """Outcomes of the rows whose cache file is valid, by position in the cohort."""
    found = {}
    for index, (row, key) in enumerate(zip(rows, keys, strict=True)):
        outcome = cache.read(row, key, index)
        if outcome is not None:
            found[index] = outcome
    return found


def _file_stamp(reference: str | None, base_dir: Path) -> list[Any]:
    """Size and modification time of a local input (every file of a folder), to detect edits."""
    if reference is None or reference.startswith(DICOMWEB_PREFIX):
        return []
    path = Path(reference).expanduser()
    path = path if path.is_absolute() else base_dir / path
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamps: list[list[Any]] = []
    for file in files:
        try:
            stat = file.stat()
        except OSError:
            stamps.append([str(file), None])
            continue
        stamps.append([str(file), stat.st_size, stat.st_mtime_ns])
    return stamps


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it: never half a file."""
    # Only the main process writes, so its pid makes the name unique; unlike mkstemp, open()
    # gives the file the permissions the umask allows.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _lesion_columns(rows: Sequence[CohortRow]) -> list[str]:
    """``roi`` and ``mask_label`` where some row of the cohort uses them."""
    columns = []
    if any(row.roi is not None for row in rows):
        columns.append("roi")
    if any(row.mask_label is not None for row in rows):
        columns.append("mask_label")
    return columns


def _lesion_cells(row: CohortRow, columns: Sequence[str]) -> list[str]:
    label = "" if row.mask_label is None else str(row.mask_label)
    values = {"roi": row.roi or "", "mask_label": label}
    return [values[c] for c in columns]


def _write_features(
    path: Path, rows: Sequence[CohortRow], outcomes: Sequence[_Outcome], names: Sequence[str]
) -> None:
    columns = _lesion_columns(rows)
    lines = [["case_id", *columns, *names]]
    lines += [
        [row.case_id, *_lesion_cells(row, columns), *(repr(v) for v in outcome.values)]
        for row, outcome in zip(rows, outcomes, strict=True)
        if not outcome.error
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, _csv_text(lines))


def _write_warnings(path: Path, rows: Sequence[CohortRow], outcomes: Sequence[_Outcome]) -> None:
    lines: list[Sequence[Any]] = [WARNINGS_FIELDS]
    for row, outcome in zip(rows, outcomes, strict=True):
        lesion = [row.case_id, *_lesion_cells(row, ("roi", "mask_label")), row.line]
        if outcome.error:
            lines.append([*lesion, "error", outcome.error])
        else:
            lines += [[*lesion, "warning", message] for message in outcome.warnings]
    _write_atomically(path, _csv_text(lines))


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()
