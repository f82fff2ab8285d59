"""The composition root: the one place that builds the node's EDGE objects and wires them.

``Node(config).start()`` opens the spool, the index, the audit trail and the job store under
``config.node.data_dir``, starts the DICOM listener, the job runner thread and (``[http]``) the
status page with ``/metrics`` and ``/healthz``; ``stop()`` shuts them down. The listener and the
runner report to the metrics and the audit trail through one observer. Everything below this
module receives its collaborators ready-made.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from dicomnode.config import Config
from dicomnode.deliver import make_destination
from dicomnode.filemodes import make_node_private
from dicomnode.jobs.remote import RUNNER_KINDS, CeleryRunner, RemoteJobs
from dicomnode.jobs.runner import Runner
from dicomnode.jobs.store import JobStore
from dicomnode.observe.audit import AuditTrail
from dicomnode.observe.events import Observers
from dicomnode.observe.health import HealthChecks, database_check, destination_checks, thread_check
from dicomnode.observe.http import StatusServer, load_secret
from dicomnode.observe.metrics import NodeMetrics, NodeState
from dicomnode.observe.page import ListenerState
from dicomnode.pipeline import Pipeline
from dicomnode.receive import routable_sop_classes, start_listener
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool

log = logging.getLogger(__name__)


class Node:
    """A running dicomnode: listener + spool + index + jobs + runner."""

    def __init__(self, config: Config, *, pipeline: Pipeline | None = None) -> None:
        self.config = config
        self.data_dir: Path = config.resolve(config.node.data_dir)
        # Before anything is written: the umask makes every file the node (and SQLite)
        # creates private, and an old install's looser data folder is tightened.
        make_node_private(config)
        self.spool = Spool(self.data_dir / "spool")
        self.index = Index(self.data_dir / "index.sqlite")
        self.jobs = JobStore(self.data_dir / "jobs.sqlite")
        self.audit = AuditTrail(self.data_dir / "index.sqlite")
        self.metrics = NodeMetrics()
        self.observer = Observers([self.metrics, self.audit])
        self.runner = self._make_runner(pipeline)
        self.remote = RemoteJobs(self.runner) if isinstance(self.runner, CeleryRunner) else None
        self.metrics.declare_destinations(tuple(d.name for d in config.destinations))
        self.metrics.watch(NodeState(job_counts=self.jobs.counts,
                                     spool_free_bytes=self._spool_free_bytes,
                                     associations_open=self._associations_open))
        self._stop = threading.Event()
        self._server = None
        self._thread: threading.Thread | None = None
        self.status = self._status_server() if config.http.enabled else None

    def start(self) -> None:
        # Before the listener opens: a temporary file now can only be a write a crash cut off
        # (never acknowledged, so the sender still has the instance).
        removed = self.spool.remove_temporary_files()
        if removed:
            log.warning("removed %d unacknowledged partial file(s) left by a crash", removed)
        # Spooled files without an index row (answered Out of Resources when the index could
        # not be written): indexed now, so that their series complete.
        self.index.index_orphans(self.spool.root, routable_sop_classes(self.config))
        self._server = start_listener(self.config, self.spool, self.index,
                                      observer=self.observer)
        log.info(
            "listening as %s on %s:%d; data in %s",
            self.config.node.ae_title, self.config.node.host, self.port, self.data_dir,
        )
        self._thread = threading.Thread(
            target=self.runner.run_forever, args=(self._stop,), name="dicomnode-runner", daemon=True
        )
        self._thread.start()
        if self.status is not None:
            self.status.start()
        if self.runner.pipeline is not None:
            self.runner.pipeline.warm_up()

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the one the OS chose for port 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.status is not None:
            self.status.stop()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.runner.pipeline is not None:
            self.runner.pipeline.close()
        self.index.close()
        self.audit.close()
        self.jobs.close()

    def _make_runner(self, pipeline: Pipeline | None) -> Runner:
        """The runner ``[runner] kind`` names (:data:`~dicomnode.jobs.remote.RUNNER_KINDS`):
        the pipeline in this process, or Celery workers."""
        config = self.config
        return RUNNER_KINDS[config.runner.kind].from_config(
            config, pipeline=pipeline, index=self.index, jobs=self.jobs,
            destinations=[make_destination(d, calling_ae_title=config.node.ae_title)
                          for d in config.destinations],
            results_root=self.data_dir / "results", observer=self.observer)

    # -- what the status page, /metrics and /healthz read ---------------------------------
    def _status_server(self) -> StatusServer:
        checks = {
            "listener": thread_check(self._listener_thread, "DICOM listener"),
            "index": database_check([self.index.ping, self.jobs.ping]),
            "runner": self._runner_check,
            **destination_checks(self.config),
        }
        return StatusServer(self.config, jobs=self.jobs, audit=self.audit, metrics=self.metrics,
                            health=HealthChecks(checks), listener=self._listener_state,
                            secret=load_secret(self.data_dir / "status.key"), clock=time.time,
                            remote=self.remote)

    def _listener_thread(self) -> threading.Thread | None:
        server = self._server
        return server.serve_thread if server is not None else None

    def _runner_check(self) -> str:
        if self._thread is None or not self._thread.is_alive():
            return "the job runner is not running"
        return f"the runner's last turn failed: {self.runner.loop_error}" if self.runner.loop_error else ""

    def _associations_open(self) -> int:
        server = self._server
        return server.receiver.associations_open if server is not None and server.receiver else 0

    def _spool_free_bytes(self) -> int:
        return shutil.disk_usage(self.spool.root).free

    def _listener_state(self) -> ListenerState:
        node = self.config.node
        return ListenerState(ae_title=node.ae_title, address=f"{node.host}:{self.port}",
                             tls=node.tls, associations_open=self._associations_open(),
                             spool_free_bytes=self._spool_free_bytes(),
                             last_instance_at=self.metrics.last_instance_at)
