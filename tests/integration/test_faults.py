"""Faults end in a state an operator can act on, on the real node (``python -m dicomnode serve``).

- the results disk is full (a small tmpfs, filled): the job waits in ``retry_wait`` with the
  reason, fails after ``[jobs] max_attempts`` analysis starts, leaves no temporary or partial
  file, and ``dicomnode retry`` delivers it once space is freed;
- the destination folder's disk is full: the delivery waits with the reason and completes by
  itself once space is freed, without a temporary file left behind;
- a series that gets the node killed (a segmenter that SIGKILLs its own process, as the
  kernel's out-of-memory killer would): after ``max_attempts`` starts the restarted node fails
  the job with the reason instead of crash-looping, and ``dicomnode retry`` runs it again;
- spooled files the index does not know (a store answered Out of Resources after the file was
  written) are indexed at start-up and their series is processed.

The tmpfs tests mount file systems, so they need root; without it they skip (and fail under
``CI=true``, see ``tests/conftest.py``).
"""

from __future__ import annotations

import errno
import getpass
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from dicomnode.phantom import make_phantom_study, write_study
from listener import STORESCU, storescu
from nodeproc import REPO, NodeProcess, query, wait_until, write_config
from orthanc import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not STORESCU.exists(), reason="needs dcmtk's storescu"),
]

TESTS = Path(__file__).resolve().parents[1]
#: Objects of one delivered result of the phantom below (the U-Net finds one lesion).
DELIVERED_MODALITIES = ["DOC", "OT", "SEG", "SR"]
#: The plug-in of the crash-loop test: segments like ``segment_plugin`` unless the file
#: ``kill-the-node`` lies next to it; then it SIGKILLs the node, as the OOM killer would.
KILLING_PLUGIN = '''
import os
import signal
import time
from pathlib import Path

from segment_plugin import DenseThings

KILL = Path(__file__).with_name("kill-the-node")


class KillsTheNode(DenseThings):
    def segment(self, volume):
        if KILL.exists():
            time.sleep(2)  # lets the test see the node listening before it dies
            os.kill(os.getpid(), signal.SIGKILL)
        return super().segment(volume)


def make(section, config):
    return KillsTheNode()
'''


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[Path], Path]]:
    """Mount 8 MB tmpfs file systems (a result of the phantom takes about 2 MB), unmounted
    afterwards; skip where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs",
                              str(folder)], capture_output=True, text=True)
        if run.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root): {run.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; returns it (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def files_on(disk: Path) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))


def start_node(tmp_path: Path, out: Path, **sections: dict) -> tuple[NodeProcess, Path]:
    """The node with a folder destination ``out``, short quiet period and retries; and the
    phantom CT it is sent."""
    port = free_port()
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=tmp_path / "node",
        destinations=[{"kind": "folder", "name": "archive", "path": out}],
        completion={"quiet_seconds": 1},
        delivery={"retry_initial_seconds": 1, "retry_factor": 2, "retry_max_seconds": 2},
        **sections,
    )
    phantom = make_phantom_study(32001, shape=(16, 64, 64), spacing=(2.5, 3.0, 3.0))
    write_study(phantom, tmp_path / "series")
    return NodeProcess(config, port, tmp_path / "node.log").start(), tmp_path / "series"


def send(node: NodeProcess, series: Path) -> None:
    sent = storescu(node.port, *sorted(series.iterdir()))
    assert sent.returncode == 0, sent.stderr


def journal(data_dir: Path) -> list[tuple[str, str]]:
    """``(to_state, reason)`` of every transition of the node's only job."""
    return query(data_dir / "jobs.sqlite", "SELECT to_state, reason FROM journal ORDER BY rowid")


def state_is(data_dir: Path, state: str) -> bool:
    return bool(query(data_dir / "jobs.sqlite", "SELECT 1 FROM jobs WHERE state = ?", (state,)))


def retry(node: NodeProcess, job_id: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dicomnode", "retry", job_id, "--config", str(node.config)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def delivered_modalities(out: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(p).Modality) for p in out.rglob("*.dcm"))


def test_a_full_results_disk_fails_with_the_reason_and_retry_delivers(tmp_path, small_disk):
    results = small_disk(tmp_path / "node" / "results")
    filler = fill(results)
    out = tmp_path / "archive"
    node, series = start_node(tmp_path, out, jobs={"max_attempts": 2})
    data_dir = tmp_path / "node"
    try:
        send(node, series)
        wait_until(lambda: state_is(data_dir, "failed"), 120, "the job to fail", node)
        no_space = "cannot save results: No space left on device"
        assert journal(data_dir) == [
            ("pending", "series complete"),
            ("running", "analysing"),
            ("retry_wait", no_space),
            ("pending", "retrying the analysis"),
            ("running", "analysing"),
            ("failed", f"{no_space} (analysis started 2 times, jobs.max_attempts = 2); "
                       "`dicomnode retry` runs it again"),
        ]
        assert files_on(results) == ["filler"]  # no temporary file, no partial result
        assert delivered_modalities(out) == []

        filler.unlink()  # the administrator frees space
        (job,) = node.jobs()
        retry(node, job["id"][:8])
        wait_until(lambda: state_is(data_dir, "delivered"), 120, "the retried delivery", node)
        assert delivered_modalities(out) == DELIVERED_MODALITIES
        assert not [name for name in files_on(results) if name.endswith(".tmp")]
        assert ("pending", f"retry requested on the command line by {getpass.getuser()}") in \
            journal(data_dir)
    finally:
        node.stop()


def test_a_full_destination_disk_waits_and_delivers_once_space_is_freed(tmp_path, small_disk):
    out = small_disk(tmp_path / "archive")
    filler = fill(out)
    node, series = start_node(tmp_path, out)
    data_dir = tmp_path / "node"
    try:
        send(node, series)
        wait_until(lambda: query(data_dir / "jobs.sqlite",
                                 "SELECT 1 FROM jobs WHERE attempts >= 2"),
                   120, "two failed delivery attempts", node)
        waits = [reason for state, reason in journal(data_dir) if state == "retry_wait"]
        assert waits and all("No space left on device" in reason for reason in waits)
        assert [p for p in out.rglob("*") if p.is_file()] == [filler]  # no temporary file

        filler.unlink()
        wait_until(lambda: state_is(data_dir, "delivered"), 60, "the delivery", node)
        assert delivered_modalities(out) == DELIVERED_MODALITIES
        assert not [name for name in files_on(out) if name.endswith(".tmp")]
    finally:
        node.stop()


def test_a_series_that_kills_the_node_fails_after_max_attempts(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "killing_plugin.py").write_text(textwrap.dedent(KILLING_PLUGIN))
    kill = tmp_path / "plugins" / "kill-the-node"
    kill.touch()
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'plugins'}{os.pathsep}{TESTS}")
    out = tmp_path / "archive"
    node, series = start_node(tmp_path, out, segmentation={"plugin": "killing_plugin:make"})
    data_dir = tmp_path / "node"
    try:
        send(node, series)
        for restart in range(3):  # jobs.max_attempts = 3 (the default)
            assert node.process.wait(timeout=120) == -9, node.log_tail()
            starts = query(data_dir / "jobs.sqlite", "SELECT analysis_starts FROM jobs")
            assert starts == [(restart + 1,)]
            node.start()
        wait_until(lambda: state_is(data_dir, "failed"), 60, "the job to fail", node)
        (job,) = node.jobs()
        assert job["reason"] == (
            "analysis started 3 times (jobs.max_attempts = 3), the last one interrupted: the "
            "node crashed or was killed while analysing it; not retried: see the log; "
            "`dicomnode retry` runs it again")
        assert node.process.poll() is None  # the node lives on, and runs the job no more
        assert [state for state, _ in journal(data_dir)].count("running") == 3

        kill.unlink()  # whatever killed the node is fixed
        retry(node, job["id"])
        wait_until(lambda: state_is(data_dir, "delivered"), 120, "the retried delivery", node)
        assert "SR" in delivered_modalities(out)
    finally:
        node.stop()


def test_spooled_files_the_index_does_not_know_are_processed_after_a_restart(tmp_path):
    phantom = make_phantom_study(32001, shape=(16, 64, 64), spacing=(2.5, 3.0, 3.0))
    spool = tmp_path / "node" / "spool"
    for ds in phantom.datasets:  # written and fsynced, but never indexed
        path = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "archive"
    node, _ = start_node(tmp_path, out)
    data_dir = tmp_path / "node"
    try:
        wait_until(lambda: state_is(data_dir, "delivered"), 120, "the delivery", node)
        assert "indexed 16 spooled instance(s) that the index did not know" in node.log_tail()
        assert query(data_dir / "index.sqlite",
                     "SELECT count(*), min(association_id) FROM instances") == [(16, "reconciled")]
        assert delivered_modalities(out) == DELIVERED_MODALITIES
    finally:
        node.stop()
