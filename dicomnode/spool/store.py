"""The spool: one DICOM Part 10 file per received instance, durable before acknowledgement (EDGE).

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Each file holds
the File Meta Information and the data set exactly as the sender encoded it (PS3.10 7.1): the
node never decodes and re-encodes what it received, so compressed pixel data stays compressed
and nothing the sender wrote is lost.

Durability: the bytes go to a temporary file in ``.incoming`` on the same file system, the file is fsynced,
renamed over the final name (atomic on POSIX), and the folder is fsynced so the rename itself
survives a power cut. Only then may the C-STORE be answered with Success, which tells the
sender it may consider the instance delivered (PS3.4 Annex B). A reader never sees a
partial file under a final name; a crash leaves at most a hidden ``.*.tmp`` file, or a data
set still arriving in ``<root>/.incoming/`` (:meth:`Spool.open_incoming`, :meth:`Spool.adopt`:
the listener streams large data sets to disk instead of holding them in memory), which
:meth:`Spool.remove_temporary_files` clears at start-up.

Duplicates (the same SOP Instance UID received again):

- identical bytes: nothing is written (:attr:`Outcome.DUPLICATE`); PACS resend whole series
  after a timeout, and a resend must cost neither a write nor reprocessing;
- different bytes: the newest copy replaces the old one (:attr:`Outcome.REPLACED`) and the
  caller records the replacement in the index and logs a warning. Keeping both would make two
  files claim one identity, and the latest copy is what the sender now holds. The most common
  cause is a sender that transcoded the instance for this association (Orthanc does, by the
  peer's accepted transfer syntaxes), so a replacement alone does not trigger reprocessing:
  corrected content comes with new SOP Instance UIDs under DICOM's identity rules.

Every UID is checked against the UID grammar (PS3.5 9.1: digits and dots, at most 64
characters) before it becomes part of a path, so no value a sender chooses can leave the spool
(``..``, ``/``, NUL, empty components are all refused).
"""

from __future__ import annotations

import enum
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicomnode.errors import InputRejected
from dicomnode.filemodes import private_file_mode, private_folder_mode
from dicomnode.types import SeriesKey

#: PS3.5 9.1: components of digits separated by dots. Leading zeros in a component break the
#: grammar too, but old scanners write them; they are harmless in a path, so they are allowed.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_UID_MAX_LENGTH = 64
_TEMP_SUFFIX = ".tmp"
_INCOMING = ".incoming"
_READ_CHUNK = 1 << 20

#: Bytes-like values the spool writes (``bytes``, ``bytearray``, ``memoryview``).
Buffer = bytes | bytearray | memoryview


class Outcome(enum.Enum):
    """What :meth:`Spool.write` did."""

    NEW = "new"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


@dataclass(frozen=True)
class Stored:
    """Where an instance now lies in the spool and how it got there."""

    path: Path
    outcome: Outcome


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID that is safe to use as a file name (PS3.5 9.1)."""
    return 0 < len(value) <= _UID_MAX_LENGTH and _UID.fullmatch(value) is not None


def check_uid(value: str, name: str) -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`InputRejected` naming it."""
    if not is_valid_uid(value):
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise InputRejected(f"{name} {shown!r} is not a valid UID", dimse_status=0xA900)
    return value


class Spool:
    """Durable, idempotent store of received instances under ``root``.

    Thread-safe: writes of different instances are independent files; two concurrent writes of
    the same SOP Instance UID each rename a complete file into place and the later one wins.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Folders known to exist durably: saves two syscalls per instance on the hot path.
        self._durable_dirs: set[Path] = set()

    def path_for(self, key: SeriesKey, sop_instance_uid: str) -> Path:
        """The spool path of an instance; raises :class:`InputRejected` for an invalid UID."""
        study = check_uid(key.study_uid, "StudyInstanceUID")
        series = check_uid(key.series_uid, "SeriesInstanceUID")
        sop = check_uid(sop_instance_uid, "SOPInstanceUID")
        return self.root / study / series / f"{sop}.dcm"

    def write(
        self, key: SeriesKey, sop_instance_uid: str, content: Buffer | Sequence[Buffer]
    ) -> Stored:
        """Store one instance durably and atomically.

        Parameters
        ----------
        key, sop_instance_uid:
            Identity of the instance; each UID is validated before it names a file.
        content:
            The whole Part 10 file, as one buffer or as pieces written in order (for example
            the preamble and File Meta Information, then the data set as received), so that a
            large data set need not be copied to be joined.

        Returns
        -------
        Stored
            The final path and whether the instance was new, an identical duplicate (nothing
            written) or a replacement of different content.

        Raises
        ------
        InputRejected
            A UID is not valid (nothing written).
        OSError
            The file could not be written durably (disk full, I/O error, permissions); no
            partial file is left under the final name.
        """
        self.path_for(key, sop_instance_uid)  # refuse a bad UID before anything is written
        parts = [content] if isinstance(content, (bytes, bytearray, memoryview)) else list(content)
        f, incoming = self.open_incoming()
        try:
            with f:
                for part in parts:
                    f.write(part)
            return self.adopt(key, sop_instance_uid, incoming)
        finally:
            incoming.unlink(missing_ok=True)  # gone already unless something failed

    def open_incoming(self) -> tuple[BinaryIO, Path]:
        """A new private file (0600) for a data set still arriving, and its path.

        It lies on the spool's own file system, so :meth:`adopt` moves it into place by a
        rename, whatever its size.
        """
        folder = self.root / _INCOMING
        folder.mkdir(mode=private_folder_mode(), exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, suffix=".part")
        os.fchmod(fd, private_file_mode())  # node.file_group's, once adopted into the spool
        return os.fdopen(fd, "wb", buffering=_READ_CHUNK), Path(name)

    def adopt(self, key: SeriesKey, sop_instance_uid: str, incoming: Path) -> Stored:
        """Move a complete Part 10 file from :meth:`open_incoming` into the spool durably.

        As :meth:`write` (same outcomes and errors) for content that is already in a file;
        ``incoming`` is gone afterwards unless an error is raised.
        """
        final = self.path_for(key, sop_instance_uid)
        self._ensure_durable_dir(final.parent)
        same = _same_content(final, incoming)
        if same:
            incoming.unlink()
            return Stored(final, Outcome.DUPLICATE)
        _fsync_file(incoming)
        try:
            os.replace(incoming, final)
        except FileNotFoundError:
            if not incoming.exists():
                raise
            self._durable_dirs -= {final.parent, final.parent.parent}
            self._ensure_durable_dir(final.parent)
            os.replace(incoming, final)
        _fsync_dir(final.parent)
        return Stored(final, Outcome.NEW if same is None else Outcome.REPLACED)

    def remove_temporary_files(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many were removed.

        Call at start-up only: during operation a temporary file may belong to a write in
        progress.
        """
        removed = 0
        for tmp in (*self.root.glob(f"*/*/.*{_TEMP_SUFFIX}"), *(self.root / _INCOMING).glob("*")):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def _ensure_durable_dir(self, directory: Path) -> None:
        """Create the study and series folders, fsyncing each parent that gained an entry."""
        if directory in self._durable_dirs:
            return
        for folder in (directory.parent, directory):
            if folder in self._durable_dirs:
                continue
            try:
                folder.mkdir()
            except FileExistsError:
                pass
            else:
                _fsync_dir(folder.parent)
            self._durable_dirs.add(folder)


def write_atomically(final: Path, parts: Sequence[Buffer]) -> None:
    """Write ``parts`` to a temporary sibling, fsync, rename it to ``final``, fsync the folder."""
    # mkstemp creates the file 0600 whatever the umask: the spool holds patient data. With
    # node.file_group set, that group may read it too (see dicomnode.filemodes).
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), private_file_mode())
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def _same_content(path: Path, other: Path) -> bool | None:
    """``None`` if ``path`` does not exist, else whether it holds what ``other`` holds."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None
    with f, other.open("rb") as g:
        if os.fstat(f.fileno()).st_size != os.fstat(g.fileno()).st_size:
            return False
        while True:
            chunk = f.read(_READ_CHUNK)
            if chunk != g.read(_READ_CHUNK):
                return False
            if not chunk:
                return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
