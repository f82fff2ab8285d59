"""The TotalSegmentator example CT was anonymised with blank dataset UIDs (SOP Instance, Study,
Series; only the file meta keeps the SOP Instance UID). No PACS holds such files and the node
refuses them; tests that need the series itself give the UIDs back, pixel data untouched."""

from __future__ import annotations

from collections.abc import Sequence

import pydicom
from pydicom import Dataset


def restore_uids(datasets: Sequence[Dataset], seed: str) -> list[Dataset]:
    """Fill blank SOP Class/Instance UIDs from the file meta and Study/Series UIDs from ``seed``."""
    study = pydicom.uid.generate_uid(entropy_srcs=[seed, "study"])
    series = pydicom.uid.generate_uid(entropy_srcs=[seed, "series"])
    for ds in datasets:
        ds.SOPClassUID = ds.SOPClassUID or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.SOPInstanceUID or ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = ds.StudyInstanceUID or study
        ds.SeriesInstanceUID = ds.SeriesInstanceUID or series
    return list(datasets)
