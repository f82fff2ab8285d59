"""The node's Prometheus metrics (prometheus_client), served at ``/metrics``.

Counters and histograms follow the events (:class:`NodeMetrics` is an
:class:`~dicomnode.observe.events.Observer`); what is a state rather than an event (jobs by
state, the queue, free spool disk, associations open) is read when Prometheus scrapes, from the
callables the node hands over (:meth:`NodeMetrics.watch`). Each node has its own registry, so
that tests and several nodes in one process never share counters. Counters start at zero when
the node starts, as Prometheus expects of a restarted target.

Metrics (all prefixed ``dicomnode_``):

- ``instances_received_total``, ``received_bytes_total``: instances stored and acknowledged;
- ``instances_refused_total{reason}``: C-STORE failures by cause (:data:`~.events.CAUSES`);
- ``associations_total{outcome}``: accepted or rejected; ``associations_open``;
- ``last_instance_received_timestamp_seconds``;
- ``jobs{state}``: jobs in each state; ``queue_depth``: jobs waiting to run (pending or waiting
  for a retry); ``jobs_created_total``;
- ``stage_duration_seconds{stage}``: a histogram per pipeline stage (read ... deliver);
- ``delivery_attempts_total{destination}``, ``delivery_failures_total{destination}``;
- ``spool_free_bytes``: free space on the spool's file system.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from dicomnode.observe.events import CAUSES, AssociationSummary, Observer
from dicomnode.types import DeliveryResult, SeriesKey

__all__ = ["CONTENT_TYPE", "NodeMetrics", "NodeState"]

#: The text format every Prometheus version reads (2.x does not know 1.0.0).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# No ``*_created`` sample beside each counter: Prometheus does not use them, and they double the
# page a person reads.
disable_created_metrics()

#: Stage durations from a tenth of a second (assembly) to minutes (a large series on a CPU).
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class NodeState:
    """Where the scrape-time figures come from."""

    #: Number of jobs in each state (state name -> count).
    job_counts: Callable[[], Mapping[str, int]]
    #: Free bytes on the spool's file system.
    spool_free_bytes: Callable[[], int]
    #: Associations open now.
    associations_open: Callable[[], int]


#: Job states that are waiting to run (the queue).
QUEUED_STATES = ("pending", "retry_wait")


class NodeMetrics(Observer):
    """The node's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("dicomnode_instances_received", "Instances stored and acknowledged",
                                registry=r)
        self.received_bytes = Counter("dicomnode_received_bytes",
                                      "Bytes of the instances stored", registry=r)
        self.refused = Counter("dicomnode_instances_refused",
                               "C-STORE requests answered with a failure status, by cause",
                               ["reason"], registry=r)
        self.associations = Counter("dicomnode_associations",
                                    "Association requests, by outcome", ["outcome"], registry=r)
        self.last_received = Gauge("dicomnode_last_instance_received_timestamp_seconds",
                                   "When the last instance was stored (seconds since the epoch)",
                                   registry=r)
        self.jobs_created = Counter("dicomnode_jobs_created", "Complete series taken as jobs",
                                    registry=r)
        self.stage_seconds = Histogram("dicomnode_stage_duration_seconds",
                                       "Wall-clock seconds of each pipeline stage of a job",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.delivery_attempts = Counter("dicomnode_delivery_attempts",
                                         "Deliveries of a job's results, by destination",
                                         ["destination"], registry=r)
        self.delivery_failures = Counter("dicomnode_delivery_failures",
                                         "Deliveries that failed, by destination",
                                         ["destination"], registry=r)
        #: When the last instance was stored (seconds since the epoch), for the status page.
        self.last_instance_at: float | None = None
        # Every label value from the start, so that a rate over a cause that never happened
        # reads 0 instead of no data.
        for cause in CAUSES:
            self.refused.labels(reason=cause)
        for outcome in ("accepted", "rejected"):
            self.associations.labels(outcome=outcome)

    def watch(self, state: NodeState) -> None:
        """Report ``state`` at every scrape."""
        self.registry.register(_StateCollector(state))

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def declare_destinations(self, names: tuple[str, ...]) -> None:
        """Show each destination's counters at 0 before its first delivery."""
        for name in names:
            self.delivery_attempts.labels(destination=name)
            self.delivery_failures.labels(destination=name)

    # -- events ------------------------------------------------------------------------------
    def association_accepted(self, calling_ae: str, peer: str) -> None:
        self.associations.labels(outcome="accepted").inc()

    def association_rejected(self, calling_ae: str, peer: str, reason: str) -> None:
        self.associations.labels(outcome="rejected").inc()

    def association_ended(self, summary: AssociationSummary) -> None:
        pass  # the open count is read from the listener at scrape time

    def instance_stored(self, nbytes: int, at: float) -> None:
        self.received.inc()
        self.received_bytes.inc(nbytes)
        self.last_received.set(at)
        self.last_instance_at = at

    def instance_refused(self, cause: str) -> None:
        self.refused.labels(reason=cause if cause in CAUSES else "internal_error").inc()

    def job_created(self, job_id: str, key: SeriesKey, instances: int) -> None:
        self.jobs_created.inc()

    def stages_timed(self, seconds: Mapping[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage=stage).observe(value)

    def delivery_attempted(self, job_id: str, key: SeriesKey, destination: str,
                           result: DeliveryResult) -> None:
        self.delivery_attempts.labels(destination=destination).inc()
        if not result.ok:
            self.delivery_failures.labels(destination=destination).inc()


class _StateCollector(Collector):
    """Jobs by state, the queue, free spool disk and open associations, read at scrape time."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        counts = dict(self.state.job_counts())
        jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in each state", labels=["state"])
        for name, count in sorted(counts.items()):
            jobs.add_metric([name], count)
        yield jobs
        yield GaugeMetricFamily("dicomnode_queue_depth",
                                "Jobs waiting to run (pending or waiting for a retry)",
                                value=sum(counts.get(s, 0) for s in QUEUED_STATES))
        yield GaugeMetricFamily("dicomnode_spool_free_bytes",
                                "Free bytes on the spool's file system",
                                value=self.state.spool_free_bytes())
        yield GaugeMetricFamily("dicomnode_associations_open", "Associations open now",
                                value=self.state.associations_open())
