"""Crash safety: kill -9 the node process at several points, restart it, lose nothing.

Each trial runs the real node (``python -m dicomnode serve``) with a STOW-RS destination on a
real Orthanc, kills it with SIGKILL at one point of the flow, starts it again on the same
data directory, and checks that every acknowledged instance is still there, that the job
finishes, and that Orthanc ends up with exactly one SR (and at most one SEG) for the series.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port

from dicomnode.phantom import make_phantom_study, write_study

STORESCU = Path("/usr/bin/storescu")
SLICES = 80
pytestmark = pytest.mark.skipif(
    not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists() and STORESCU.exists()),
    reason="needs orthanc, orthanc-dicomweb and dcmtk",
)


def job_states(data_dir: Path) -> list[str]:
    return [s for (s,) in query(data_dir / "jobs.sqlite", "SELECT state FROM jobs")]


def kill_9(node: NodeProcess) -> None:
    assert node.process is not None
    node.process.kill()  # SIGKILL: no handler, no cleanup, no flush
    node.process.wait(timeout=10)
    node.process = None


def send(port: int, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(STORESCU), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


@pytest.mark.parametrize("kill_point", ["arriving", "running", "delivering"])
def test_kill_9_loses_nothing_and_duplicates_nothing(tmp_path: Path, kill_point: str) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    port, data_dir = free_port(), tmp_path / "node"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url,
                       "timeout_seconds": 5}],
        # Long enough for the re-sent series to arrive before the restarted node's quiet
        # period ends: a truncated stack is complete-looking and would be taken on its own.
        completion={"quiet_seconds": 5},
        delivery={"retry_initial_seconds": 1, "retry_factor": 2, "retry_max_seconds": 2},
    )
    phantom = make_phantom_study(10_300, shape=(SLICES, 128, 128), spacing=(2.5, 1.5, 1.5))
    folder = tmp_path / "ct"
    write_study(phantom, folder)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        if kill_point == "arriving":
            sender = send(port, folder)
            index = data_dir / "index.sqlite"
            wait_until(lambda: query(index, "SELECT count(*) FROM instances")[0][0] >= 10
                       if index.exists() else False, 60, "the first instances", node, poll=0.05)
            kill_9(node)
            output, _ = sender.communicate(timeout=60)
            successes = output.count("Received Store Response (Success)")
            assert sender.returncode != 0 and 0 < successes < SLICES, "not killed mid-series"
        elif kill_point == "running":
            sender = send(port, folder)
            assert sender.wait(timeout=120) == 0
            wait_until(lambda: "running" in job_states(data_dir), 60, "a running job", node,
                       poll=0.05)
            kill_9(node)
        else:
            pacs.stop()  # delivery fails and is retried: kill the node in the middle of it
            sender = send(port, folder)
            assert sender.wait(timeout=120) == 0
            wait_until(lambda: query(data_dir / "jobs.sqlite",
                                     "SELECT attempts FROM jobs WHERE attempts >= 1"),
                       120, "a failed delivery attempt", node)
            kill_9(node)
            pacs.start()
        if kill_point == "arriving":
            stored = query(data_dir / "index.sqlite", "SELECT path FROM instances")
            assert len(stored) >= successes  # every acknowledged instance survived the kill
            for (path,) in stored:
                assert pydicom.dcmread(path).SOPInstanceUID  # complete, readable files
        node.start()
        if kill_point == "arriving":  # the PACS sends the series again, as it would
            assert send(port, folder).wait(timeout=120) == 0
        wait_until(lambda: job_states(data_dir)[-1:] == ["delivered"], 240, "delivery", node)
        instances = query(data_dir / "index.sqlite", "SELECT count(*) FROM instances")[0][0]
        assert instances == SLICES
        modalities = [pacs.download(i).Modality for i in pacs.instance_ids()]
        assert modalities.count("SR") == 1 and modalities.count("SEG") <= 1, modalities
    finally:
        node.stop()
        pacs.stop()
