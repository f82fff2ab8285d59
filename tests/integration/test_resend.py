"""A series sent twice: one result set by default, a second one (with new UIDs) when configured.

PACS re-send whole series after timeouts and users re-send studies by hand, so an identical
resend must not produce a second SEG and SR, unless ``completion.resent_series = "reprocess"``
asks for it. Then the new results must carry new UIDs: a PACS such as Orthanc keeps the first
copy of a UID it already holds, so reused UIDs would make the new results vanish.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from dicomnode.phantom import make_phantom_study, write_study
from listener import STORESCU, storescu
from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

QUIET_SECONDS = 2


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists() and STORESCU.exists()):
        pytest.skip("needs Orthanc with the DICOMweb plugin and dcmtk")
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as orthanc:
        yield orthanc


def start_node(work: Path, pacs: Orthanc, resent_series: str) -> NodeProcess:
    port = free_port()
    config = write_config(
        work / "node.toml", port=port, data_dir=work / "node",
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
        completion={"quiet_seconds": QUIET_SECONDS, "resent_series": resent_series},
    )
    return NodeProcess(config, port, work / "node.log").start()


def send(node: NodeProcess, files: list[Path]) -> None:
    run = storescu(node.port, *files)
    assert run.returncode == 0, run.stderr


def delivered_jobs(node: NodeProcess, work: Path) -> list[str]:
    return [job_id for (job_id,) in query(work / "node" / "jobs.sqlite",
                                          "SELECT id FROM jobs WHERE state = 'delivered'")]


def results_in_pacs(pacs: Orthanc, study_uid: str) -> dict[str, set[tuple[str, str]]]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG and SR instances Orthanc holds."""
    found = requests.post(f"{pacs.http_url}/tools/find", auth=pacs.auth, timeout=30, json={
        "Level": "Instance", "Expand": True, "RequestedTags": ["SeriesInstanceUID"],
        "Query": {"StudyInstanceUID": study_uid, "Modality": "SEG\\SR"}}).json()
    out: dict[str, set[tuple[str, str]]] = {"SEG": set(), "SR": set()}
    for instance in found:
        ds = pacs.download(instance["ID"])
        out[ds.Modality].add((ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def series_files(tmp_path: Path, seed: int) -> tuple[str, list[Path]]:
    phantom = make_phantom_study(seed, shape=(16, 64, 64), spacing=(2.5, 3.0, 3.0))
    files = write_study(phantom, tmp_path / "series")
    return str(phantom.datasets[0].StudyInstanceUID), files


def test_a_resent_series_makes_no_second_result_set_by_default(pacs, tmp_path):
    node = start_node(tmp_path, pacs, "ignore")
    try:
        study_uid, files = series_files(tmp_path, 31001)
        send(node, files)
        wait_until(lambda: delivered_jobs(node, tmp_path), 180, "the first job", node)
        send(node, files)
        time.sleep(QUIET_SECONDS * 3)  # long past the quiet period that would start a job
        assert len(query(tmp_path / "node" / "jobs.sqlite", "SELECT id FROM jobs")) == 1
    finally:
        node.stop()
    held = results_in_pacs(pacs, study_uid)
    assert len(held["SR"]) == 1 and len(held["SEG"]) <= 1


def test_a_resent_series_is_reprocessed_with_new_uids_when_configured(pacs, tmp_path):
    node = start_node(tmp_path, pacs, "reprocess")
    try:
        study_uid, files = series_files(tmp_path, 31002)
        send(node, files)
        wait_until(lambda: delivered_jobs(node, tmp_path), 180, "the first job", node)
        first = results_in_pacs(pacs, study_uid)
        send(node, files)
        wait_until(lambda: len(delivered_jobs(node, tmp_path)) == 2, 180, "the second job", node)
        assert "processed again" in node.log_path.read_text()
    finally:
        node.stop()
    second = results_in_pacs(pacs, study_uid)
    assert len(first["SR"]) == 1 and len(second["SR"]) == 2
    assert len(second["SEG"]) == 2 * len(first["SEG"])
    for modality in ("SEG", "SR"):
        series = {series_uid for series_uid, _ in second[modality]}
        instances = {sop_uid for _, sop_uid in second[modality]}
        assert len(series) == len(instances) == len(second[modality])  # all new UIDs
