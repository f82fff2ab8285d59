"""Job state machine, store and backoff: every move journalled, no illegal edge."""

import sqlite3
from pathlib import Path

import pytest

from dicomnode.jobs.machine import Backoff, IllegalTransition, JobEvent, JobState, next_state
from dicomnode.jobs.store import JobStore
from dicomnode.types import SeriesKey

KEY = SeriesKey("1.2.3", "1.2.3.4")


def test_happy_path_and_illegal_edges():
    assert next_state(JobState.PENDING, JobEvent.START) is JobState.RUNNING
    assert next_state(JobState.RUNNING, JobEvent.REPORTED) is JobState.DELIVERING
    assert next_state(JobState.DELIVERING, JobEvent.DELIVERED) is JobState.DELIVERED
    with pytest.raises(IllegalTransition):
        next_state(JobState.DELIVERED, JobEvent.START)
    with pytest.raises(IllegalTransition):
        next_state(JobState.PENDING, JobEvent.DELIVERED)


def test_backoff_grows_caps_and_gives_up():
    b = Backoff(initial_seconds=10, factor=2, maximum_seconds=60, give_up_after_seconds=100)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    assert not b.exhausted(0, 99)
    assert b.exhausted(0, 100)


def test_store_journals_every_transition(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(KEY, [tmp_path / "a.dcm"], now=1.0)
    assert job.state is JobState.PENDING
    store.transition(job.id, JobEvent.START, "analysing", now=2.0)
    store.transition(job.id, JobEvent.REPORTED, "1 lesion", now=3.0)
    job = store.transition(job.id, JobEvent.TEMPORARY_FAILURE, "HTTP 503", now=4.0,
                           next_attempt_at=14.0, count_failure=True)
    assert job.state is JobState.RETRY_WAIT and job.attempts == 1 and job.first_failure_at == 4.0
    assert store.next_runnable(now=10.0) is None
    assert store.next_runnable(now=14.0).id == job.id
    states = [(e.from_state, e.to_state, e.reason) for e in store.journal(job.id)]
    assert states == [
        (None, "pending", "series complete"),
        ("pending", "running", "analysing"),
        ("running", "delivering", "1 lesion"),
        ("delivering", "retry_wait", "HTTP 503"),
    ]


def test_store_keeps_the_stage_timings_of_the_latest_attempt(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(KEY, [])
    store.transition(job.id, JobEvent.START, "analysing")
    store.transition(job.id, JobEvent.REPORTED, "1 lesion", seconds={"read": 0.5, "report": 2})
    job = store.transition(job.id, JobEvent.TEMPORARY_FAILURE, "HTTP 503", count_failure=True,
                           next_attempt_at=0.0, seconds={"deliver": 1.25})
    assert job.seconds == {"read": 0.5, "report": 2.0, "deliver": 1.25}
    job = store.transition(job.id, JobEvent.DUE, "retrying delivery", seconds={"deliver": 0.75})
    assert JobStore(tmp_path / "jobs.sqlite").get(job.id).seconds["deliver"] == 0.75  # persisted
    store.transition(job.id, JobEvent.TEMPORARY_FAILURE, "HTTP 503", next_attempt_at=0.0)
    store.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    # A new analysis starts with no figures of the one before.
    assert store.transition(job.id, JobEvent.START, "analysing").seconds == {}


def test_illegal_transition_changes_nothing(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(KEY, [])
    with pytest.raises(IllegalTransition):
        store.transition(job.id, JobEvent.DELIVERED)
    assert store.get(job.id).state is JobState.PENDING
    assert len(store.journal(job.id)) == 1


def test_store_survives_reopen_and_finds_by_prefix(tmp_path: Path):
    db = tmp_path / "jobs.sqlite"
    job = JobStore(db).create(KEY, [tmp_path / "x.dcm"], warnings=("gap",))
    reopened = JobStore(db)
    found = reopened.find(job.id[:6])
    assert found.inputs == (tmp_path / "x.dcm",) and found.warnings == ("gap",)
    with pytest.raises(KeyError):
        reopened.find("zzzz")


def test_storage_faults_and_waits_have_edges_an_operator_can_use():
    # A disk full while saving results waits; when due, the analysis runs again.
    assert next_state(JobState.RUNNING, JobEvent.TEMPORARY_FAILURE) is JobState.RETRY_WAIT
    assert next_state(JobState.RETRY_WAIT, JobEvent.RERUN) is JobState.PENDING
    assert next_state(JobState.RETRY_WAIT, JobEvent.DUE) is JobState.DELIVERING
    # A person may re-queue a waiting job at once, as a failed one.
    assert next_state(JobState.RETRY_WAIT, JobEvent.RETRY) is JobState.PENDING
    assert next_state(JobState.FAILED, JobEvent.RETRY) is JobState.PENDING
    with pytest.raises(IllegalTransition):
        next_state(JobState.RUNNING, JobEvent.RETRY)  # the runner is on it


def test_store_counts_analysis_starts_and_a_retry_resets_them(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(KEY, [])
    for _ in range(2):  # started, interrupted, resumed, started again
        job = store.transition(job.id, JobEvent.START, "analysing")
        job = store.transition(job.id, JobEvent.RESUME, "resumed")
    assert job.analysis_starts == 2 and job.state is JobState.PENDING
    job = store.transition(job.id, JobEvent.START, "analysing")
    job = store.transition(job.id, JobEvent.PERMANENT_FAILURE, "interrupted too often")
    assert JobStore(tmp_path / "jobs.sqlite").get(job.id).analysis_starts == 3  # persisted
    job = store.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    assert job.analysis_starts == 0 and job.state is JobState.PENDING


def test_a_database_of_an_older_version_gains_the_new_column(tmp_path: Path):
    db = tmp_path / "jobs.sqlite"
    with sqlite3.connect(db) as old:  # the schema before analysis_starts, with one job
        old.executescript("""
            CREATE TABLE jobs (id TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
                series_uid TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
                inputs TEXT NOT NULL, warnings TEXT NOT NULL DEFAULT '[]',
                attempts INTEGER NOT NULL DEFAULT 0, first_failure_at REAL,
                next_attempt_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
            INSERT INTO jobs (id, study_uid, series_uid, state, inputs, created_at, updated_at)
                VALUES ('0123456789abcdef', '1.2.3', '1.2.3.4', 'running', '[]', 1.0, 1.0);
        """)
    store = JobStore(db)
    job = store.get("0123456789abcdef")
    assert job.state is JobState.RUNNING and job.analysis_starts == 0 and job.seconds == {}
    store.transition(job.id, JobEvent.RESUME, "resumed")
    assert store.transition(job.id, JobEvent.START, "analysing").analysis_starts == 1


def test_a_transition_the_full_database_refuses_changes_nothing(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.create(KEY, [])
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.transition(job.id, JobEvent.START, "x" * 100_000)
    assert store.get(job.id).state is JobState.PENDING and len(store.journal(job.id)) == 1
    store._conn.execute("PRAGMA max_page_count = 1073741823")  # space freed
    assert store.transition(job.id, JobEvent.START, "analysing").state is JobState.RUNNING
