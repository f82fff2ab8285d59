"""Folder destination: ``<folder>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.

Each file is a DICOM Part 10 file (PS3.10 Section 7) written atomically (temporary file, fsync,
rename, fsync of the folder), so a reader never sees half a file and a crash never leaves one.
Writing the same instance again replaces the file with identical content: a retried job is
idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import UID

from dicomnode.config import DestinationConfig, home
from dicomnode.deliver.base import from_outcomes, part10, sop_instance_uid
from dicomnode.results import atomic_write, waiting_can_fix
from dicomnode.types import DeliveryResult, InstanceOutcome


class FolderDestination:
    """Write each instance as a file under ``cfg.path`` (relative paths: under the project home)."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.name = cfg.name
        self.root = cfg.path if cfg.path.is_absolute() else home() / cfg.path

    def send(self, datasets: Sequence[Dataset]) -> DeliveryResult:
        return from_outcomes(self.name, [self._write(ds) for ds in datasets])

    def path_for(self, ds: Dataset) -> Path:
        """Where ``ds`` goes; ``ValueError`` when a UID is not a valid UID.

        The UIDs come from received data, so they are checked before they become path
        components: a valid UID holds only digits and dots and cannot leave the folder.
        """
        parts = []
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = UID(str(ds.get(keyword, "")))
            if not value.is_valid:
                raise ValueError(f"{keyword} {str(value)[:64]!r} is not a valid UID")
            parts.append(str(value))
        return self.root.joinpath(*parts[:2], f"{parts[2]}.dcm")

    def _write(self, ds: Dataset) -> tuple[InstanceOutcome, bool]:
        """Write one instance: ``(outcome, failure_is_temporary)``."""
        uid = sop_instance_uid(ds)
        try:
            path = self.path_for(ds)
            data = part10(ds)
        except (ValueError, AttributeError) as exc:
            return InstanceOutcome(uid, ok=False, reason=f"cannot encode: {exc}"), False
        try:
            atomic_write(path, data)
        except OSError as exc:
            reason = f"cannot write {path}: {exc.strerror or exc}"
            return InstanceOutcome(uid, ok=False, reason=reason), waiting_can_fix(exc)
        return InstanceOutcome(uid, ok=True), False
