"""Crash safety: kill -9 the node process at several points, restart it, lose nothing.

Each trial runs the real node (``python -m dicomnode serve``) with a STOW-RS destination on a
real Orthanc, kills it with SIGKILL at one point of the flow, starts it again on the same
data directory, and checks that every acknowledged instance is still there, that the job
finishes, and that Orthanc ends up with exactly one SEG and one SR for the series.

Kill points: while the series arrives, while its job runs, while a failed delivery waits for
its retry, and inside a STOW-RS request, through a proxy (:mod:`tcpproxy`) that holds the
exchange (a) before Orthanc sees the request and (b) after Orthanc stored the instances and
answered, before the answer reaches the node. Run with ``pytest -s`` for the trial count and
how long after each restart the delivery completed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from sarcoma import held_out_series
from tcpproxy import HoldingProxy, body

STORESCU = Path("/usr/bin/storescu")
#: A held-out sarcoma patient of 68 slices: the real model finds its tumour, so every trial
#: has a SEG and an SR to deliver.
CASE, SLICES = "STS_006", 68
pytestmark = pytest.mark.skipif(
    not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists() and STORESCU.exists()),
    reason="needs orthanc, orthanc-dicomweb and dcmtk",
)

#: (kill point, seconds from the restart until the job was delivered, of which the restarted
#: node took this many to listen), for the summary.
TRIALS: list[tuple[str, float, float]] = []


@pytest.fixture(scope="module", autouse=True)
def trial_summary() -> Iterator[None]:
    yield
    print(f"\nkill -9 trials run: {len(TRIALS)}")
    for point, seconds, starting in TRIALS:
        print(f"  killed {point}: delivered {seconds:.1f} s after the restart"
              f" (listening after {starting:.1f} s)")


def job_states(data_dir: Path) -> list[str]:
    return [s for (s,) in query(data_dir / "jobs.sqlite", "SELECT state FROM jobs")]


def send(port: int, folder: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(STORESCU), "-v", "-aec", "DICOMNODE", "127.0.0.1", str(port), "+sd", str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def crash_node(tmp_path: Path, stow_url: str, *, quiet_seconds: float = 5,
               timeout_seconds: float = 5) -> tuple[NodeProcess, Path, Path]:
    """A node delivering to ``stow_url`` with short retries, not started yet; its data
    directory; and a folder with a real sarcoma CT (its tumour gives a SEG) to send it."""
    port, data_dir = free_port(), tmp_path / "node"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "stow", "name": "orthanc", "url": stow_url,
                       "timeout_seconds": timeout_seconds}],
        completion={"quiet_seconds": quiet_seconds},
        delivery={"retry_initial_seconds": 1, "retry_factor": 2, "retry_max_seconds": 2},
    )
    folder = tmp_path / "ct"
    assert len(held_out_series(CASE, folder, decompress=True)) == SLICES
    return NodeProcess(config, port, tmp_path / "node.log"), data_dir, folder


def restart_until_delivered(node: NodeProcess, data_dir: Path, kill_point: str,
                            resend: Path | None = None) -> float:
    """Start the killed node again (the PACS re-sending ``resend`` if given); seconds from
    the restart until its job is delivered, recorded for the summary."""
    restarted = time.monotonic()
    node.start()
    starting = time.monotonic() - restarted
    if resend is not None:
        assert send(node.port, resend).wait(timeout=120) == 0
    wait_until(lambda: job_states(data_dir)[-1:] == ["delivered"], 240, "delivery", node)
    seconds = time.monotonic() - restarted
    TRIALS.append((kill_point, seconds, starting))
    print(f"\nkilled {kill_point}: delivered {seconds:.1f} s after the restart"
          f" (listening after {starting:.1f} s)")
    return seconds


def assert_spool_complete(data_dir: Path) -> None:
    """Every instance of the series is in the index, as a complete, readable file."""
    stored = query(data_dir / "index.sqlite", "SELECT path FROM instances")
    assert len(stored) == SLICES
    for (path,) in stored:
        assert pydicom.dcmread(path).SOPInstanceUID


def reports(datasets: list[pydicom.Dataset]) -> list[tuple[str, str]]:
    """``(Modality, SOPInstanceUID)`` of each report object, sorted."""
    return sorted((str(ds.Modality), str(ds.SOPInstanceUID)) for ds in datasets)


#: One job's report objects, sorted by Modality: the PDF, the key image of its one lesion, the
#: SEG and the SR.
REPORT_MODALITIES = ["DOC", "OT", "SEG", "SR"]


def saved_reports(data_dir: Path) -> list[tuple[str, str]]:
    """The report objects the node saved for delivery (``results/<job>/*.dcm``)."""
    return reports([pydicom.dcmread(p) for p in sorted((data_dir / "results").glob("*/*.dcm"))])


def orthanc_reports(pacs: Orthanc) -> list[tuple[str, str]]:
    return reports([pacs.download(i) for i in pacs.instance_ids()])


@pytest.mark.parametrize("kill_point", ["arriving", "running", "delivering"])
def test_kill_9_loses_nothing_and_duplicates_nothing(tmp_path: Path, kill_point: str) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    # When killed while arriving: a quiet period long enough for the re-sent series to arrive
    # before the restarted node's ends, since a truncated stack is complete-looking and would
    # be taken on its own.
    quiet_seconds = 5 if kill_point == "arriving" else 1
    node, data_dir, folder = crash_node(tmp_path, pacs.dicomweb_url, quiet_seconds=quiet_seconds)
    node.start()
    try:
        if kill_point == "arriving":
            sender = send(node.port, folder)
            index = data_dir / "index.sqlite"
            wait_until(lambda: query(index, "SELECT count(*) FROM instances")[0][0] >= 10
                       if index.exists() else False, 60, "the first instances", node, poll=0.05)
            node.kill()
            output, _ = sender.communicate(timeout=60)
            successes = output.count("Received Store Response (Success)")
            assert sender.returncode != 0 and 0 < successes < SLICES, "not killed mid-series"
        elif kill_point == "running":
            sender = send(node.port, folder)
            assert sender.wait(timeout=120) == 0
            wait_until(lambda: "running" in job_states(data_dir), 60, "a running job", node,
                       poll=0.05)
            node.kill()
        else:
            pacs.stop()  # delivery fails and is retried: kill the node in the middle of it
            sender = send(node.port, folder)
            assert sender.wait(timeout=120) == 0
            wait_until(lambda: query(data_dir / "jobs.sqlite",
                                     "SELECT attempts FROM jobs WHERE attempts >= 1"),
                       120, "a failed delivery attempt", node)
            node.kill()
            pacs.start()
        if kill_point == "arriving":
            stored = query(data_dir / "index.sqlite", "SELECT path FROM instances")
            assert len(stored) >= successes  # every acknowledged instance survived the kill
            for (path,) in stored:
                assert pydicom.dcmread(path).SOPInstanceUID  # complete, readable files
        restart_until_delivered(node, data_dir, kill_point,
                                resend=folder if kill_point == "arriving" else None)
        assert_spool_complete(data_dir)
        assert job_states(data_dir) == ["delivered"]
        modalities = [modality for modality, _ in orthanc_reports(pacs)]
        assert modalities == REPORT_MODALITIES
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.parametrize("hold", ["request", "response"])
def test_kill_9_inside_a_stow_request(tmp_path: Path, hold: str) -> None:
    """Kill the node while its STOW-RS request is in flight, held by a proxy: ``request``,
    sent but not forwarded (Orthanc never sees it); ``response``, Orthanc stored the
    objects and answered but the node never gets the answer. The restarted node delivers
    again with the same UIDs: one SEG, SR, key image and PDF in Orthanc, no duplicate."""
    pacs = Orthanc(tmp_path / "orthanc").start()
    proxy = HoldingProxy(pacs.http_port).hold(hold)
    # The first request is held: stow.py sends a job's objects in one request, and were they sent
    # apart, the second would never start. A long client timeout: the node must still be
    # waiting for its answer when it is killed.
    node, data_dir, folder = crash_node(tmp_path, f"{proxy.url}/dicom-web", quiet_seconds=1,
                                        timeout_seconds=120)
    node.start()
    try:
        assert send(node.port, folder).wait(timeout=120) == 0
        held = proxy.request_held if hold == "request" else proxy.response_held
        wait_until(held.is_set, 240, f"a STOW-RS {hold} held by the proxy", node, poll=0.02)
        node.kill()

        # The node died inside its first delivery attempt, not knowing how it ended.
        jobs = query(data_dir / "jobs.sqlite", "SELECT state, attempts FROM jobs")
        assert jobs == [("delivering", 0)], jobs
        assert_spool_complete(data_dir)
        sent = saved_reports(data_dir)
        assert [modality for modality, _ in sent] == REPORT_MODALITIES, sent
        [request] = proxy.requests
        assert request.startswith(b"POST "), request[:200]
        in_request = [(m, uid) for m, uid in sent if uid.encode() in body(request)]
        assert in_request, "the held request carries none of the saved report objects"
        if hold == "request":
            assert proxy.forwarded == 0 and pacs.instance_ids() == []  # Orthanc never saw it
        else:  # Orthanc stored what the request carried, and answered that it had
            assert proxy.forwarded == 1 and proxy.responses[0].startswith(b"HTTP/1.1 200 ")
            assert orthanc_reports(pacs) == in_request

        proxy.release()  # the held exchange is dropped; from now on the proxy passes through
        restart_until_delivered(node, data_dir, f"inside a STOW-RS request (held {hold})")
        assert job_states(data_dir) == ["delivered"]
        # The restarted node sent each object once more (same UIDs), whether in one request
        # or several, and every request went through.
        again = [body(r) for r in proxy.requests[1:]]
        assert proxy.forwarded == len(again) + (hold == "response")
        assert all(sum(uid.encode() in b for b in again) == 1 for _, uid in sent), sent
        assert_spool_complete(data_dir)
        # Each object once, and the very objects the killed node was sending.
        assert orthanc_reports(pacs) == sent
    finally:
        node.stop()
        proxy.close()
        pacs.stop()
