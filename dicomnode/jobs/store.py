"""Jobs and their transition journal in SQLite (EDGE).

One row per job holds its current state, the reason of its last transition, its inputs (the
spooled instance paths of the series snapshot it was created from) and its retry bookkeeping:
``attempts`` and ``first_failure_at`` count failed deliveries (the backoff), and
``analysis_starts`` counts the starts of its analysis, persisted by the very transition that
starts it, so that a start a crash cut short is counted too. A person's ``retry`` resets it.
``seconds`` holds how long each stage of its latest attempt took (reading the inputs, the
pipeline's stages, saving, delivering), written with the transition that ends the stage.
Every transition also appends a journal row: the audit trail that ``dicomnode jobs`` shows.

A database written by an older version gains the newer columns when it is opened.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.jobs.machine import JobEvent, JobState, next_state
from dicomnode.types import SeriesKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    inputs TEXT NOT NULL,
    warnings TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    analysis_starts INTEGER NOT NULL DEFAULT 0,
    seconds TEXT NOT NULL DEFAULT '{}',
    first_failure_at REAL,
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS journal (
    job_id TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""

#: Columns added since the first schema, as ``ALTER TABLE jobs ADD COLUMN`` clauses.
_ADDED_COLUMNS = {
    "analysis_starts": "analysis_starts INTEGER NOT NULL DEFAULT 0",
    "seconds": "seconds TEXT NOT NULL DEFAULT '{}'",
}


@dataclass(frozen=True)
class Job:
    """A job as stored. ``inputs`` are the spooled files of the series snapshot; ``seconds``
    the wall-clock seconds of each stage of its latest attempt, in the order they ran
    (``read``, ``assemble``, ``segment``, ``radiomics``, ``predict``, ``report``, ``save``,
    ``deliver``)."""

    id: str
    key: SeriesKey
    state: JobState
    reason: str
    inputs: tuple[Path, ...]
    warnings: tuple[str, ...]
    attempts: int
    first_failure_at: float | None
    next_attempt_at: float | None
    created_at: float
    updated_at: float
    analysis_starts: int = 0
    seconds: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JournalEntry:
    at: float
    from_state: str | None
    to_state: str
    reason: str


class JobStore:
    """Thread-safe job table; every state change goes through :meth:`transition`."""

    def __init__(self, db_path: Path) -> None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._add_missing_columns()
        self._lock = threading.Lock()

    def _add_missing_columns(self) -> None:
        """Bring a database written by an older version up to the current schema."""
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {definition}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def create(
        self, key: SeriesKey, inputs: list[Path], *, warnings: tuple[str, ...] = (), now: float | None = None
    ) -> Job:
        now = time.time() if now is None else now
        job_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT INTO jobs (id, study_uid, series_uid, state, inputs, warnings, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, key.study_uid, key.series_uid, JobState.PENDING.value,
                 json.dumps([str(p) for p in inputs]), json.dumps(list(warnings)), now, now),
            )
            self._journal(job_id, None, JobState.PENDING, "series complete", now)
            self._conn.execute("COMMIT")
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            cols = [d[0] for d in self._conn.execute("SELECT * FROM jobs LIMIT 0").description]
        if row is None:
            raise KeyError(f"no job {job_id!r}")
        return _job_from_row(dict(zip(cols, row)))

    def find(self, prefix: str) -> Job:
        """The job whose id starts with ``prefix`` (ids may be abbreviated on the command line)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM jobs WHERE id LIKE ? || '%'", (prefix,)
            ).fetchall()
        if len(rows) != 1:
            raise KeyError(f"{'no' if not rows else 'more than one'} job matches {prefix!r}")
        return self.get(rows[0][0])

    def all(self, states: tuple[JobState, ...] = ()) -> list[Job]:
        query = "SELECT * FROM jobs"
        params: tuple[str, ...] = ()
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(s.value for s in states)
        with self._lock:
            cur = self._conn.execute(query + " ORDER BY created_at", params)
            cols = [d[0] for d in cur.description]
            rows = cur.fetchall()
        return [_job_from_row(dict(zip(cols, r))) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state, zeros included)."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state.value: 0 for state in JobState} | {state: n for state, n in rows}

    def recent(self, limit: int = 100) -> list[Job]:
        """The ``limit`` jobs changed last, newest first."""
        with self._lock:
            cur = self._conn.execute("SELECT * FROM jobs ORDER BY updated_at DESC, rowid DESC"
                                     " LIMIT ?", (limit,))
            cols = [d[0] for d in cur.description]
            rows = cur.fetchall()
        return [_job_from_row(dict(zip(cols, r))) for r in rows]

    def ping(self) -> None:
        """Raise ``sqlite3.Error`` when the database cannot be read."""
        with self._lock:
            self._conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    def latest(self, key: SeriesKey) -> Job | None:
        """The newest job of a series, or ``None`` when it has none."""
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs WHERE study_uid = ? AND series_uid = ?"
                " ORDER BY created_at DESC, rowid DESC LIMIT 1",
                (key.study_uid, key.series_uid),
            )
            cols = [d[0] for d in cur.description]
            row = cur.fetchone()
        return None if row is None else _job_from_row(dict(zip(cols, row)))

    def next_runnable(self, now: float | None = None) -> Job | None:
        """The oldest job that can be worked on now: pending, or waiting and due."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._conn.execute(
                "SELECT * FROM jobs WHERE state = ? OR (state = ? AND next_attempt_at <= ?)"
                " ORDER BY created_at LIMIT 1",
                (JobState.PENDING.value, JobState.RETRY_WAIT.value, now),
            )
            cols = [d[0] for d in cur.description]
            row = cur.fetchone()
        return None if row is None else _job_from_row(dict(zip(cols, row)))

    def transition(
        self,
        job_id: str,
        event: JobEvent,
        reason: str = "",
        *,
        now: float | None = None,
        next_attempt_at: float | None = None,
        count_failure: bool = False,
        warnings: tuple[str, ...] | None = None,
        seconds: Mapping[str, float] | None = None,
    ) -> Job:
        """Move a job along one edge of the table and journal it, atomically.

        ``START`` counts one more analysis start and clears the stage timings of the attempt
        before; ``RETRY`` (a person's) clears the time of the first failure and the count of
        analysis starts. ``seconds`` are stage timings to record (added to those of the
        attempt, a stage timed again replaces its earlier figure).

        Raises
        ------
        IllegalTransition
            The table has no such edge from the job's state; nothing changes.
        sqlite3.Error
            The database could not be written (disk full, I/O error); nothing changes.
        """
        now = time.time() if now is None else now
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute(
                    "SELECT state, first_failure_at, seconds FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                if row is None:
                    raise KeyError(f"no job {job_id!r}")
                current = JobState(row[0])
                target = next_state(current, event)
                first_failure = row[1]
                if count_failure and first_failure is None:
                    first_failure = now
                if event is JobEvent.RETRY:
                    first_failure = None
                timings = {} if event is JobEvent.START else json.loads(row[2] or "{}")
                timings.update({k: round(float(v), 3) for k, v in (seconds or {}).items()})
                self._conn.execute(
                    "UPDATE jobs SET state = ?, reason = ?, updated_at = ?, next_attempt_at = ?,"
                    " first_failure_at = ?, attempts = attempts + ?,"
                    " analysis_starts = CASE WHEN ? THEN 0 ELSE analysis_starts + ? END,"
                    " warnings = COALESCE(?, warnings), seconds = ? WHERE id = ?",
                    (target.value, reason, now, next_attempt_at, first_failure, int(count_failure),
                     event is JobEvent.RETRY, int(event is JobEvent.START),
                     None if warnings is None else json.dumps(list(warnings)),
                     json.dumps(timings), job_id),
                )
                self._journal(job_id, current, target, reason, now)
                self._conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed for want of space may have rolled back already.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return self.get(job_id)

    def journal(self, job_id: str) -> list[JournalEntry]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, from_state, to_state, reason FROM journal WHERE job_id = ? ORDER BY rowid",
                (job_id,),
            ).fetchall()
        return [JournalEntry(*r) for r in rows]

    def _journal(self, job_id: str, from_state: JobState | None, to_state: JobState, reason: str, now: float) -> None:
        self._conn.execute(
            "INSERT INTO journal (job_id, at, from_state, to_state, reason) VALUES (?, ?, ?, ?, ?)",
            (job_id, now, None if from_state is None else from_state.value, to_state.value, reason),
        )


def _job_from_row(row: dict) -> Job:
    return Job(
        id=row["id"],
        key=SeriesKey(row["study_uid"], row["series_uid"]),
        state=JobState(row["state"]),
        reason=row["reason"],
        inputs=tuple(Path(p) for p in json.loads(row["inputs"])),
        warnings=tuple(json.loads(row["warnings"])),
        attempts=row["attempts"],
        first_failure_at=row["first_failure_at"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        analysis_starts=row["analysis_starts"],
        seconds=json.loads(row["seconds"] or "{}"),
    )
