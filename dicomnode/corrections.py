"""The corrections loop: every segmentation the node was given (a radiologist's RTSTRUCT, or our
SEG corrected in a viewer and sent back) is a training pair with its CT (EDGE: reads the job
store, the results and the spool).

``dicomnode cohort export --out cohort.csv`` writes them as a cohort CSV (``docs/cohorts.md``)
that ``dicomnode train segmentation --cohort`` takes. The node keeps every received instance in
its spool, so the rows point at the spooled files themselves; nothing is copied. Where a CT
series was corrected more than once, only the newest correction is a pair (the earlier ones
were replaced by the person who made them).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicomnode.analyse.supplied import is_segmentation
from dicomnode.jobs.machine import JobState
from dicomnode.jobs.store import Job, JobStore


@dataclass(frozen=True)
class TrainingPair:
    """A CT series (its spool folder) and the segmentation someone drew on it."""

    case_id: str  # the CT's Series Instance UID: unique, and no patient data
    image: Path
    mask: Path
    kind: str  # "SEG" or "RTSTRUCT"
    rois: tuple[str, ...]  # RTSTRUCT ROI names (one cohort row each); empty for a SEG
    job_id: str


def training_pairs(jobs: JobStore, results_root: Path) -> list[TrainingPair]:
    """The newest supplied segmentation of each CT series, from the delivered jobs."""
    newest: dict[str, tuple[float, TrainingPair]] = {}
    for job in jobs.all((JobState.DELIVERED,)):
        pair = _pair_of(job, results_root / job.id / "summary.json")
        if pair is not None and job.created_at >= newest.get(pair.case_id, (-1.0, pair))[0]:
            newest[pair.case_id] = (job.created_at, pair)
    return [pair for _, pair in sorted(newest.values(), key=lambda item: item[0])]


def _pair_of(job: Job, summary_path: Path) -> TrainingPair | None:
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    source = summary.get("segmentation_source") or {}
    if source.get("kind") not in ("SEG", "RTSTRUCT"):
        return None
    ct_paths = []
    mask = None
    for path in job.inputs:
        if not path.exists():
            return None  # the spool was cleaned: the pair is gone
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if str(header.SOPInstanceUID) == source.get("sop_instance_uid"):
            mask = path
        elif not is_segmentation(header):
            ct_paths.append(path)
    if mask is None or not ct_paths:
        return None
    rois = tuple(source.get("names", ())) if source["kind"] == "RTSTRUCT" else ()
    return TrainingPair(case_id=str(summary["series_instance_uid"]), image=ct_paths[0].parent,
                        mask=mask, kind=source["kind"], rois=rois, job_id=job.id)


def write_cohort(pairs: list[TrainingPair], out: Path) -> int:
    """Write ``pairs`` as a cohort CSV (absolute paths); returns the number of rows."""
    rows = [(pair.case_id, str(pair.image), str(pair.mask), roi)
            for pair in pairs for roi in (pair.rois or ("",))]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("case_id", "image", "mask", "roi"))
        writer.writerows(rows)
    return len(rows)
