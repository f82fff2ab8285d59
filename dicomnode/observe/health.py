"""``/healthz``: is the node able to do its work (EDGE: opens TCP connections)?

Four checks, each ``ok`` or the reason it is not:

- ``listener``: the DICOM listener's thread runs;
- ``index``: the index and the job database answer a query;
- ``runner``: the job runner's thread runs and its last turn did not fail;
- ``destination:<name>``: a folder destination is a writable folder; a STOW-RS or C-STORE
  destination accepts a TCP connection on its host and port (within 3 s). Nothing is sent:
  a load balancer that asks every second must not load the PACS.

The answer is cached for a few seconds for the same reason.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config, DestinationConfig

#: A check: ``""`` when all is well, else why not.
Check = Callable[[], str]

#: Seconds a health answer is reused, and the TCP connect timeout of a destination check.
CACHE_SECONDS = 5.0
CONNECT_SECONDS = 3.0


@dataclass(frozen=True)
class Health:
    #: Check name -> ``""`` (ok) or the reason it failed.
    checks: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return not any(self.checks.values())

    def as_json(self, *, reasons: bool) -> dict[str, object]:
        """``{"status": "ok"|"failing", "checks": {name: "ok"|reason|"failing"}}``; reasons
        (host names, errors) only for an authorised caller."""
        shown = {name: ("ok" if not why else (why if reasons else "failing"))
                 for name, why in self.checks.items()}
        return {"status": "ok" if self.ok else "failing", "checks": shown}


class HealthChecks:
    """Runs the checks, at most once per :data:`CACHE_SECONDS`."""

    def __init__(self, checks: Mapping[str, Check], *, clock: Callable[[], float] = time.monotonic):
        self.checks = dict(checks)
        self.clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, Health] | None = None

    def run(self) -> Health:
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last[0] < CACHE_SECONDS:
                return self._last[1]
            health = Health({name: _safely(check) for name, check in self.checks.items()})
            self._last = (now, health)
            return health


def _safely(check: Check) -> str:
    try:
        return check()
    except Exception as exc:  # a check that fails is a failing check, not a failing server
        return f"{type(exc).__name__}: {exc}"


def thread_check(thread: Callable[[], threading.Thread | None], what: str) -> Check:
    """Ok while the thread ``thread()`` returns is alive."""
    def check() -> str:
        current = thread()
        return "" if current is not None and current.is_alive() else f"the {what} is not running"
    return check


def destination_checks(config: Config) -> dict[str, Check]:
    """One check per configured destination, named ``destination:<name>``."""
    return {f"destination:{d.name}": _destination_check(config, d) for d in config.destinations}


def _destination_check(config: Config, d: DestinationConfig) -> Check:
    if d.kind == "folder":
        folder = config.resolve(d.path)
        return lambda: _writable_folder(folder)
    host, port = destination_address(d)
    return lambda: _accepts_connections(host, port)


def destination_address(d: DestinationConfig) -> tuple[str, int]:
    """The host and TCP port a STOW-RS or C-STORE destination is reached on."""
    if d.kind == "cstore":
        return d.host, d.port
    url = urllib.parse.urlsplit(d.url)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _writable_folder(folder: Path) -> str:
    # The folder is created by the first delivery: its nearest existing parent must be
    # writable until then.
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return f"{folder} is not a writable folder"
    return ""


def _accepts_connections(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            return ""
    except OSError as exc:
        return f"{host}:{port} does not accept connections: {exc.strerror or exc}"


def database_check(pings: Sequence[Callable[[], None]]) -> Check:
    """Ok when every ``ping`` returns (each raises when its database cannot be read)."""
    def check() -> str:
        for ping in pings:
            try:
                ping()
            except Exception as exc:
                return f"database not readable: {exc}"
        return ""
    return check
