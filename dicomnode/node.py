"""The composition root: the one place that builds the node's EDGE objects and wires them.

``Node(config).start()`` opens the spool, the index and the job store under
``config.node.data_dir``, starts the DICOM listener and the job runner thread; ``stop()`` shuts
both down. Everything below this module receives its collaborators ready-made.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dicomnode.config import Config
from dicomnode.deliver import make_destination
from dicomnode.filemodes import make_node_private
from dicomnode.jobs.runner import Runner
from dicomnode.jobs.store import JobStore
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
        self.runner = Runner(
            config,
            index=self.index,
            jobs=self.jobs,
            destinations=[make_destination(d) for d in config.destinations],
            # Loaded before the listener opens: a missing or broken model stops the node at
            # start-up with the reason, instead of failing every job later.
            pipeline=pipeline if pipeline is not None else Pipeline.from_config(config),
            results_root=self.data_dir / "results",
        )
        self._stop = threading.Event()
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Before the listener opens: a temporary file now can only be a write a crash cut off
        # (never acknowledged, so the sender still has the instance).
        removed = self.spool.remove_temporary_files()
        if removed:
            log.warning("removed %d unacknowledged partial file(s) left by a crash", removed)
        # Spooled files without an index row (answered Out of Resources when the index could
        # not be written): indexed now, so that their series complete.
        self.index.index_orphans(self.spool.root, routable_sop_classes(self.config))
        self._server = start_listener(self.config, self.spool, self.index)
        log.info(
            "listening as %s on %s:%d; data in %s",
            self.config.node.ae_title, self.config.node.host, self.port, self.data_dir,
        )
        self._thread = threading.Thread(
            target=self.runner.run_forever, args=(self._stop,), name="dicomnode-runner", daemon=True
        )
        self._thread.start()
        self.runner.pipeline.warm_up()

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the one the OS chose for port 0)."""
        if self._server is None:
            return self.config.node.port
        return int(self._server.server_address[1])

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        self.runner.pipeline.close()
        self.index.close()
        self.jobs.close()
