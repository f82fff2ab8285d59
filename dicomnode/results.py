"""Result files of one analysed series: ``seg.dcm`` (when there is a lesion), ``sr.dcm`` and
``summary.json`` in one folder (EDGE).

The job runner writes them into the job's folder before delivery starts, so a crash during
delivery resends exactly the same objects (same UIDs); ``dicomnode process`` writes them into
the folder the user named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset

from dicomnode.spool.store import write_atomically
from dicomnode.types import ReportSet


@dataclass(frozen=True)
class ResultFiles:
    folder: Path
    sr: Path
    summary: Path
    seg: Path | None = None
    key_images: tuple[Path, ...] = ()
    pdf: Path | None = None


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either nothing or all of it, durably, readable by
    the node's user only (the results hold patient data): the spool's own atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (data,))


def _encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


#: File names of the objects of one result, in delivery order (SEG first, so that the PACS
#: holds it before the SR that references it).
SEG_FILE, SR_FILE, PDF_FILE = "seg.dcm", "sr.dcm", "report-pdf.dcm"
KEY_IMAGE_FILE, KEY_IMAGE_GLOB = "key-image-{:03d}.dcm", "key-image-*.dcm"


def save(folder: Path, reports: ReportSet, summary: dict[str, Any]) -> ResultFiles:
    """Write the report objects and the JSON summary into ``folder``."""

    def write(name: str, ds: Dataset) -> Path:
        atomic_write(folder / name, _encode(ds))
        return folder / name

    seg_path = write(SEG_FILE, reports.seg) if reports.seg is not None else None
    sr_path = write(SR_FILE, reports.sr)
    key_images = tuple(write(KEY_IMAGE_FILE.format(k), ds)
                       for k, ds in enumerate(reports.key_images, start=1))
    pdf_path = write(PDF_FILE, reports.pdf) if reports.pdf is not None else None
    summary_path = folder / "summary.json"
    atomic_write(summary_path, json.dumps(summary, indent=2).encode("utf-8"))
    return ResultFiles(folder=folder, sr=sr_path, summary=summary_path, seg=seg_path,
                       key_images=key_images, pdf=pdf_path)


def load_datasets(folder: Path) -> list[Dataset]:
    """The report objects saved in ``folder``, in delivery order (SEG first)."""
    names = [SEG_FILE, SR_FILE, *sorted(p.name for p in folder.glob(KEY_IMAGE_GLOB)), PDF_FILE]
    return [pydicom.dcmread(folder / name) for name in names if (folder / name).exists()]
