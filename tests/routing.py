"""A PACS that auto-routes CT to the node: Orthanc's Lua rule and what tests do around it.

Shared by the end-to-end and character-set tests: send a study to the PACS as a modality
would, then wait for the node's job and read back what the PACS holds.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import requests

from nodeproc import NodeProcess, query
from orthanc import Orthanc

STORESCU = "/usr/bin/storescu"
WAIT_SECONDS = 420

# Orthanc's auto-routing, as a hospital would write it: every stable CT series goes to the node.
ROUTE_CT = """
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'CT' then
    RestApiPost('/modalities/node/store', '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
  end
end
"""


# The same, with the corrections loop: radiologists' RTSTRUCTs and SEGs go to the node too.
ROUTE_CT_AND_SEGMENTATIONS = """
function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'CT' or modality == 'SEG' or modality == 'RTSTRUCT' then
    RestApiPost('/modalities/node/store', '{"Resources":["' .. seriesId .. '"],"Synchronous":false}')
  end
end
"""


def store_to_pacs(pacs: Orthanc, files: list[Path], *options: str) -> None:
    run = subprocess.run(
        [STORESCU, *options, "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *map(str, files)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"},
    )
    assert run.returncode == 0, run.stderr


def node_jobs(work: Path, study_uid: str) -> list[tuple[str, str]]:
    """(state, reason) of the node's jobs for a study, read from its job database."""
    return query(work / "node" / "jobs.sqlite",
                 "SELECT state, reason FROM jobs WHERE study_uid = ? ORDER BY created_at",
                 (study_uid,))


def series_in_study(pacs: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Datasets Orthanc holds for a study, by modality: the results (SEG, SR, key images OT,
    PDF DOC) downloaded, the CT only listed."""
    query = {"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    found = requests.post(f"{pacs.http_url}/tools/find", json=query, auth=pacs.auth, timeout=10).json()
    out: dict[str, list[pydicom.Dataset]] = {}
    for series in found:
        modality = series["MainDicomTags"].get("Modality", "")
        if modality in {"SEG", "SR", "OT", "DOC"}:
            out.setdefault(modality, []).extend(pacs.download(i) for i in series["Instances"])
        else:
            out.setdefault(modality, [])
    return out


def wait_for_outcome(pacs: Orthanc, node: NodeProcess, work: Path, study_uid: str, *, want_seg: bool | None):
    """Wait until the node's job for the study ended and Orthanc holds its results."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        jobs = node_jobs(work, study_uid)
        if any(state == "failed" for state, _ in jobs):
            return jobs, series_in_study(pacs, study_uid)
        if any(state == "delivered" for state, _ in jobs):
            held = series_in_study(pacs, study_uid)
            if "SR" in held and (not want_seg or "SEG" in held):
                return jobs, held
        time.sleep(1)
    raise AssertionError(f"no outcome for study within {WAIT_SECONDS} s; jobs {node_jobs(work, study_uid)}\n"
                         f"node log:\n{node.log_tail()}\nOrthanc log:\n{pacs.log_tail()}")
