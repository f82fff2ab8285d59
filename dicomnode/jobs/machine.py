"""Job states, the events that move them, and the retry backoff (PURE).

The transition table is the whole behaviour, in the manner of pynetdicom's association FSM:
a job can only move along an edge listed here, and every move is journalled with a reason.

::

    PENDING --start--> RUNNING --reported--> DELIVERING --delivered--> DELIVERED
      ^  ^                |  |  |                 |  |
      |  |                |  |  |                 |  \\--temporary failure--> RETRY_WAIT --due--> DELIVERING
      |  |                |  |  |                 \\--permanent failure--> FAILED
      |  |                |  |  \\--temporary failure (disk full)--> RETRY_WAIT --rerun--> PENDING
      |  |                |  \\--refused / error / interrupted too often--> FAILED
      |  \\--resume--------/      (a crash or a failed step interrupted the analysis)
      \\--retry (by a person)-- FAILED, RETRY_WAIT

A job found RUNNING or DELIVERING at start-up was interrupted by a crash: ``resume`` puts it
back where its durable state allows (the analysis reruns; a delivery repeats with the same
UIDs, which the destination treats as the same instances). The runner counts every start of
an analysis, so a series that crashes the node is failed after ``[jobs] max_attempts`` starts
instead of being resumed for ever. A job waiting after a temporary failure is ``due`` again
for delivery when its results are saved, and ``rerun`` (analysed again) when they are not.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DELIVERING = "delivering"
    RETRY_WAIT = "retry_wait"
    DELIVERED = "delivered"
    FAILED = "failed"


class JobEvent(str, enum.Enum):
    START = "start"
    REPORTED = "reported"
    DELIVERED = "delivered"
    TEMPORARY_FAILURE = "temporary_failure"
    PERMANENT_FAILURE = "permanent_failure"
    DUE = "due"
    RESUME = "resume"
    RERUN = "rerun"
    RETRY = "retry"


TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.PENDING, JobEvent.START): JobState.RUNNING,
    (JobState.PENDING, JobEvent.PERMANENT_FAILURE): JobState.FAILED,
    (JobState.RUNNING, JobEvent.REPORTED): JobState.DELIVERING,
    (JobState.RUNNING, JobEvent.TEMPORARY_FAILURE): JobState.RETRY_WAIT,
    (JobState.RUNNING, JobEvent.PERMANENT_FAILURE): JobState.FAILED,
    (JobState.RUNNING, JobEvent.RESUME): JobState.PENDING,
    (JobState.DELIVERING, JobEvent.DELIVERED): JobState.DELIVERED,
    (JobState.DELIVERING, JobEvent.TEMPORARY_FAILURE): JobState.RETRY_WAIT,
    (JobState.DELIVERING, JobEvent.PERMANENT_FAILURE): JobState.FAILED,
    (JobState.DELIVERING, JobEvent.RESUME): JobState.DELIVERING,
    (JobState.RETRY_WAIT, JobEvent.DUE): JobState.DELIVERING,
    (JobState.RETRY_WAIT, JobEvent.RERUN): JobState.PENDING,
    (JobState.RETRY_WAIT, JobEvent.RETRY): JobState.PENDING,
    (JobState.FAILED, JobEvent.RETRY): JobState.PENDING,
}

#: States in which nothing more happens without a person.
FINAL_STATES = frozenset({JobState.DELIVERED, JobState.FAILED})


class IllegalTransition(ValueError):
    """An event that the table does not allow in the job's current state."""


def next_state(state: JobState, event: JobEvent) -> JobState:
    """The state after ``event``; raises :class:`IllegalTransition` when there is no edge."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"no transition from {state.value} on {event.value}") from None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff for temporary delivery failures.

    The delay before attempt ``n`` (1-based count of failures so far) is
    ``min(initial * factor**(n-1), maximum)``; after ``give_up_after_seconds`` since the
    first failure the job fails for good, so nothing retries forever.
    """

    initial_seconds: float = 10.0
    factor: float = 2.0
    maximum_seconds: float = 3600.0
    give_up_after_seconds: float = 86400.0

    def delay(self, failures: int) -> float:
        return min(self.initial_seconds * self.factor ** max(failures - 1, 0), self.maximum_seconds)

    def exhausted(self, first_failure_at: float, now: float) -> bool:
        return now - first_failure_at >= self.give_up_after_seconds
