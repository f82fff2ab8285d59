"""PACS outage: results wait in retry_wait while Orthanc is down and arrive once it is back.

The node runs as its own process with a STOW-RS destination; Orthanc is stopped before the
series reaches the node and started again (same ports, same storage) once the job has failed
to deliver at least once. The test prints how long delivery took after Orthanc came back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.phantom import make_phantom_study, write_study
from listener import STORESCU, storescu
from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port


def jobs(data_dir: Path) -> list[tuple[str, str, int]]:
    return query(data_dir / "jobs.sqlite", "SELECT state, reason, attempts FROM jobs")


@pytest.mark.skipif(not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists() and STORESCU.exists()),
                    reason="needs orthanc, orthanc-dicomweb and dcmtk")
def test_results_are_kept_and_delivered_once_the_pacs_is_back(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    port, data_dir = free_port(), tmp_path / "node"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url,
                       "timeout_seconds": 5}],
        completion={"quiet_seconds": 2},
        delivery={"retry_initial_seconds": 1, "retry_factor": 2, "retry_max_seconds": 4},
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        pacs.stop()  # the PACS goes down before the study arrives
        phantom = make_phantom_study(10_200, shape=(16, 64, 64), spacing=(2.5, 2.0, 2.0))
        write_study(phantom, tmp_path / "ct")
        sent = storescu(port, "+sd", tmp_path / "ct")
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: any(s == "retry_wait" and attempts >= 2
                               for s, _, attempts in jobs(data_dir)),
                   120, "two failed delivery attempts", node)
        ((state, reason, _),) = jobs(data_dir)
        assert "connect" in reason  # the reason says the PACS could not be reached
        pacs.start()
        seconds = wait_until(lambda: [s for s, _, _ in jobs(data_dir)] == ["delivered"],
                             120, "delivery after the PACS came back", node)
        print(f"\ndelivered {seconds:.1f} s after Orthanc came back")
        modalities = sorted(pacs.download(i).Modality for i in pacs.instance_ids())
        assert modalities.count("SR") == 1 and modalities.count("SEG") <= 1
        assert "CT" not in modalities  # only the results went to the PACS
    finally:
        node.stop()
        pacs.stop()
