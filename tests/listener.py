"""The listener alone, in the test process, and dcmtk's SCUs pointed at it (test helpers).

:func:`listeners` starts ``dicomnode.receive.start_listener`` servers on free loopback ports
with chosen ``NodeConfig`` options; ``tests/conftest.py`` offers it as the ``start_node``
fixture.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config, NodeConfig, SegmentationConfig
from dicomnode.receive import start_listener
from dicomnode.spool.index import Index
from dicomnode.spool.store import Spool

STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
AE_TITLE = "DICOMNODE"


@dataclass
class Node:
    port: int
    spool: Spool
    index: Index


@contextmanager
def listeners(folder: Path) -> Iterator[Callable[..., Node]]:
    """Start listeners (NodeConfig options as arguments) under ``folder``; stop them after."""
    servers = []

    def start(non_ct: str = "reject", segmentation_source: str = "auto",
              **node_options: object) -> Node:
        work = folder / f"node{len(servers)}"
        spool, index = Spool(work / "spool"), Index(work / "index.sqlite")
        config = Config(node=NodeConfig(ae_title=AE_TITLE, host="127.0.0.1", port=0,
                                        non_ct=non_ct, **node_options),
                        segmentation=SegmentationConfig(source=segmentation_source))
        server = start_listener(config, spool, index)
        servers.append((server, index))
        return Node(server.server_address[1], spool, index)

    try:
        yield start
    finally:
        for server, index in servers:
            server.shutdown()
            index.close()


def storescu(port: int, *arguments: Path | str) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu: options and files after the address."""
    return subprocess.run(
        [str(STORESCU), "-aec", AE_TITLE, "127.0.0.1", str(port), *map(str, arguments)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
    )


def echoscu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ECHOSCU), *options, "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=30,
    )
