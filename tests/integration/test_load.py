"""Load: eight modalities send eight patients' series at once to the real node process.

Every instance must be stored, every series processed, and every SEG and SR must belong to
the patient and study it was made from (no cross-talk between concurrent associations).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicomnode.phantom import make_phantom_study, write_study
from nodeproc import NodeProcess, query, write_config
from orthanc import free_port

STORESCU = Path("/usr/bin/storescu")
SENDERS = 8
SHAPE, SPACING = (16, 64, 64), (2.5, 2.0, 2.0)


def job_states(data_dir: Path) -> list[tuple[str, str, str]]:
    return query(data_dir / "jobs.sqlite", "SELECT study_uid, state, reason FROM jobs")


@pytest.mark.skipif(not STORESCU.exists(), reason="dcmtk storescu is not installed")
def test_eight_concurrent_associations_are_all_stored_and_processed(tmp_path: Path) -> None:
    port, data_dir, results = free_port(), tmp_path / "node", tmp_path / "results"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "folder", "name": "results", "path": results}],
        completion={"quiet_seconds": 2},
    )
    studies = {}
    for k in range(SENDERS):
        phantom = make_phantom_study(10_100 + k, shape=SHAPE, spacing=SPACING, n_lesions=1,
                                     patient_id=f"LOAD-{k}", patient_name=f"Load^Patient{k}")
        folder = tmp_path / f"sender{k}"
        write_study(phantom, folder)
        studies[phantom.datasets[0].StudyInstanceUID] = (f"LOAD-{k}", folder)
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        senders = [
            subprocess.Popen(
                [str(STORESCU), "-aet", f"MODALITY{k}", "-aec", "DICOMNODE", "127.0.0.1",
                 str(port), "+sd", str(folder)],
                env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True,
            )
            for k, (_, folder) in enumerate(studies.values())
        ]
        for sender in senders:
            output, _ = sender.communicate(timeout=120)
            assert sender.returncode == 0, output
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = job_states(data_dir)
            if len(states) == SENDERS and all(s in ("delivered", "failed") for _, s, _ in states):
                break
            time.sleep(1)
        states = job_states(data_dir)
    finally:
        node.stop()
    assert sorted(study for study, _, _ in states) == sorted(studies), node.log_tail()
    assert all(state == "delivered" for _, state, _ in states), states
    stored = list((data_dir / "spool").rglob("*.dcm"))
    assert len(stored) == SENDERS * SHAPE[0]  # no instance lost
    for study_uid, (patient_id, _) in studies.items():
        outputs = [pydicom.dcmread(p) for p in (results / study_uid).rglob("*.dcm")]
        assert {ds.Modality for ds in outputs} >= {"SR"}, f"no SR for {patient_id}"
        for ds in outputs:
            assert ds.PatientID == patient_id and ds.StudyInstanceUID == study_uid
