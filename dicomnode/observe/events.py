"""What the node's parts report while they work, and the fan-out to whoever listens (PURE).

The listener and the job runner call an :class:`Observer`; the node gives them one that passes
each event on to the metrics (:mod:`.metrics`) and the audit trail (:mod:`.audit`). An observer
that fails is logged and skipped: reporting must never refuse an instance or fail a job.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dicomnode.types import DeliveryResult, SeriesKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssociationSummary:
    """One association as it ended: who sent, from where, what was stored and refused."""

    id: str
    calling_ae: str
    peer: str
    #: "released", "aborted" or "closed".
    how: str
    seconds: float
    stored: int
    refused: int
    bytes: int
    #: The series of the instances stored, with how many of each.
    series: Mapping[SeriesKey, int]


class Observer:
    """Receives the node's events; every method does nothing unless overridden."""

    def association_accepted(self, calling_ae: str, peer: str) -> None:
        """An association was negotiated."""

    def association_rejected(self, calling_ae: str, peer: str, reason: str) -> None:
        """An association request was refused (AE title policy)."""

    def association_ended(self, summary: AssociationSummary) -> None:
        """An accepted association ended (released, aborted or its connection closed)."""

    def instance_stored(self, nbytes: int, at: float) -> None:
        """An instance was stored and acknowledged (``at``: seconds since the epoch)."""

    def instance_refused(self, cause: str) -> None:
        """A C-STORE was answered with a failure status; ``cause`` is one of :data:`CAUSES`."""

    def job_created(self, job_id: str, key: SeriesKey, instances: int) -> None:
        """A complete series became a job."""

    def stages_timed(self, seconds: Mapping[str, float]) -> None:
        """A job's stages ran, in these wall-clock seconds."""

    def delivery_attempted(self, job_id: str, key: SeriesKey, destination: str,
                           result: DeliveryResult) -> None:
        """The results of job ``job_id`` (series ``key``) were sent to ``destination``,
        successfully or not."""

    def job_retried(self, job_id: str, who: str) -> None:
        """A person re-queued a job (``who``: the user or where the request came from)."""


#: Why a C-STORE was refused: the label values of ``dicomnode_instances_refused_total``.
CAUSES = ("disk_full", "too_large", "unreadable", "invalid", "rejected", "storage_error",
          "index_error", "internal_error")


class Observers(Observer):
    """Passes every event to each of ``observers``; one that raises is logged and skipped."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self.observers = tuple(observers)

    def _each(self, method: str, *args: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args)
            except Exception:  # reporting must not break receiving or a job
                log.exception("%s.%s failed", type(observer).__name__, method)

    def association_accepted(self, calling_ae: str, peer: str) -> None:
        self._each("association_accepted", calling_ae, peer)

    def association_rejected(self, calling_ae: str, peer: str, reason: str) -> None:
        self._each("association_rejected", calling_ae, peer, reason)

    def association_ended(self, summary: AssociationSummary) -> None:
        self._each("association_ended", summary)

    def instance_stored(self, nbytes: int, at: float) -> None:
        self._each("instance_stored", nbytes, at)

    def instance_refused(self, cause: str) -> None:
        self._each("instance_refused", cause)

    def job_created(self, job_id: str, key: SeriesKey, instances: int) -> None:
        self._each("job_created", job_id, key, instances)

    def stages_timed(self, seconds: Mapping[str, float]) -> None:
        self._each("stages_timed", seconds)

    def delivery_attempted(self, job_id: str, key: SeriesKey, destination: str,
                           result: DeliveryResult) -> None:
        self._each("delivery_attempted", job_id, key, destination, result)

    def job_retried(self, job_id: str, who: str) -> None:
        self._each("job_retried", job_id, who)
