"""The real node as a separate process (``python -m dicomnode serve``), for integration tests."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from orthanc import terminate

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, *, port: int, data_dir: Path, destinations: list[dict], **sections: dict) -> Path:
    """Write a listener TOML for a test node (values are plain strings, numbers or paths)."""

    def value(v: object) -> str:
        return json.dumps(str(v) if isinstance(v, Path) else v)

    # The status page on a free port: test nodes run side by side.
    sections.setdefault("http", {"port": 0})
    lines = ["[node]", f"port = {port}", f"data_dir = {value(data_dir)}"]
    lines += [f"{k} = {value(v)}" for k, v in sections.pop("node", {}).items()]
    for name, table in sections.items():
        lines += [f"[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    for d in destinations:
        lines += ["[[destinations]]"] + [f"{k} = {value(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class NodeProcess:
    """``dicomnode serve --config CONFIG`` in its own process, logging to ``log_path``."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dicomnode", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"node did not listen within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        terminate(process, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the node (no signal handler, no cleanup, no flush) and reap it."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(timeout)

    def jobs(self) -> list[dict]:
        """``dicomnode jobs --json`` for this node's configuration."""
        run = subprocess.run(
            [sys.executable, "-m", "dicomnode", "jobs", "--json", "--config", str(self.config)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        if run.returncode != 0:
            raise RuntimeError(run.stderr)
        return json.loads(run.stdout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` in one of a node's SQLite files (none while the file does not exist)."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until(condition: Callable[[], object], timeout: float, what: str, node: NodeProcess,
               poll: float = 0.1) -> float:
    """Seconds until ``condition()`` held; an AssertionError with the node's log tail after
    ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}:\n{node.log_tail()}")
