"""Result files of one analysed series: ``seg.dcm`` (when there is a lesion), ``sr.dcm`` and
``summary.json`` in one folder (EDGE).

The job runner writes them into the job's folder before delivery starts, so a crash during
delivery resends exactly the same objects (same UIDs); ``dicomnode process`` writes them into
the folder the user named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset

from dicomnode.types import ReportSet


@dataclass(frozen=True)
class ResultFiles:
    folder: Path
    sr: Path
    summary: Path
    seg: Path | None = None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either nothing or all of it, durably.

    Temporary file in the same folder, fsync, rename, fsync of the folder: the rename is
    atomic on POSIX and the folder fsync makes the new name survive a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def save(folder: Path, reports: ReportSet, summary: dict[str, Any]) -> ResultFiles:
    """Write the report objects and the JSON summary into ``folder``."""
    seg_path = None
    if reports.seg is not None:
        seg_path = folder / "seg.dcm"
        atomic_write(seg_path, _encode(reports.seg))
    sr_path = folder / "sr.dcm"
    atomic_write(sr_path, _encode(reports.sr))
    summary_path = folder / "summary.json"
    atomic_write(summary_path, json.dumps(summary, indent=2).encode("utf-8"))
    return ResultFiles(folder=folder, sr=sr_path, summary=summary_path, seg=seg_path)


def load_datasets(folder: Path) -> list[Dataset]:
    """The report objects saved in ``folder`` (SEG first), for delivery."""
    return [pydicom.dcmread(folder / name) for name in ("seg.dcm", "sr.dcm") if (folder / name).exists()]
