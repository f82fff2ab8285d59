"""Result files of one analysed series: ``seg.dcm`` (when there is a lesion), ``sr.dcm`` and
``summary.json`` in one folder (EDGE).

The job runner writes them into the job's folder before delivery starts, so a crash during
delivery resends exactly the same objects (same UIDs); ``dicomnode process`` writes them into
the folder the user named.

Each file is written atomically (a hidden temporary file renamed into place, removed again
when the write fails), and ``summary.json`` last: a folder with a summary holds a complete
result (:func:`is_complete`). What a failed save or a killed node leaves behind is removed by
:func:`discard` (the job's whole folder) and :func:`remove_temporary_files` (at start-up).
"""

from __future__ import annotations

import errno
import json
import shutil
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


#: Write errors that waiting cannot fix; anything else (disk full, I/O error, a network mount
#: gone away) may succeed later.
PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
)
SUMMARY_FILE = "summary.json"
_TEMPORARY_GLOB = "*/.*.tmp"


def waiting_can_fix(exc: OSError) -> bool:
    """Whether a failed read or write of a file may succeed later (see :data:`PERMANENT_ERRNOS`)."""
    return exc.errno not in PERMANENT_ERRNOS


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
    """Write the report objects and the JSON summary (last) into ``folder``.

    Raises
    ------
    OSError
        A file could not be written (disk full, I/O error); the files written before it stay,
        without a summary.
    """

    def write(name: str, ds: Dataset) -> Path:
        atomic_write(folder / name, _encode(ds))
        return folder / name

    seg_path = write(SEG_FILE, reports.seg) if reports.seg is not None else None
    sr_path = write(SR_FILE, reports.sr)
    key_images = tuple(write(KEY_IMAGE_FILE.format(k), ds)
                       for k, ds in enumerate(reports.key_images, start=1))
    pdf_path = write(PDF_FILE, reports.pdf) if reports.pdf is not None else None
    summary_path = folder / SUMMARY_FILE
    atomic_write(summary_path, json.dumps(summary, indent=2).encode("utf-8"))
    return ResultFiles(folder=folder, sr=sr_path, summary=summary_path, seg=seg_path,
                       key_images=key_images, pdf=pdf_path)


def load_datasets(folder: Path) -> list[Dataset]:
    """The report objects saved in ``folder``, in delivery order (SEG first)."""
    names = [SEG_FILE, SR_FILE, *sorted(p.name for p in folder.glob(KEY_IMAGE_GLOB)), PDF_FILE]
    return [pydicom.dcmread(folder / name) for name in names if (folder / name).exists()]


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a whole saved result (its summary is written last)."""
    return (folder / SUMMARY_FILE).is_file()


def discard(folder: Path) -> None:
    """Remove a result folder and everything in it (nothing when it does not exist).

    Raises
    ------
    OSError
        Something in it could not be removed.
    """
    if folder.exists():
        shutil.rmtree(folder)


def remove_temporary_files(root: Path) -> int:
    """Delete the temporary files that a killed node left in the result folders under
    ``root``; returns how many. Call only while no result is being written."""
    removed = 0
    for tmp in root.glob(_TEMPORARY_GLOB):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
