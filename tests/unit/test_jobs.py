"""Job state machine, store and backoff: every move journalled, no illegal edge."""

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
