"""Who may read what the node writes: its user only, or also one group (EDGE).

Everything the node writes holds patient data: spooled instances, the SQLite index and job
store, result objects, the folder destination's files. So files are created 0600 and folders
0700; with ``node.file_group`` set (a service account's group, say a backup or PACS import
user), 0640 and 0750, owned by that group, and folders setgid so that what is created inside
them inherits the group.

Why a process umask rather than a mode at each place that creates a file: the node does not
create all of them itself. SQLite creates its database and its ``-wal`` and ``-shm`` files,
pathlib and the spool create folders, and a mode given at one call site is forgotten at the
next. The umask (0o077, or 0o027 with a group) is set once, in :func:`make_node_private`
before the spool, index and job store are opened, and covers every creation in the process.
The exceptions are files made by :func:`tempfile.mkstemp`, always 0600 whatever the umask,
and folders made with an explicit mode: their makers ask :func:`private_file_mode` and
:func:`private_folder_mode`, so that the group may read them as well.

A node upgraded from a version that wrote 0644/0755 is tightened at start-up: the data
folder, its direct entries and each folder destination get the modes above, with one
WARNING naming what was readable by others. Deeper entries are not walked (the spool may
hold millions of files): they lie inside a folder others can no longer enter. (When
``node.file_group`` is set on an existing install, give the older entries that group once:
``chgrp -R``.) Symbolic links are not followed: their targets are not the node's to change.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dicomnode.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileModes:
    """Modes for the node's files and folders: owner only (``gid`` None) or one group too."""

    group: str = ""
    gid: int | None = None

    @classmethod
    def for_group(cls, group: str) -> FileModes:
        """The modes of ``node.file_group`` (a group name or number; empty: owner only).

        Raises
        ------
        ConfigError
            No such group on this machine.
        """
        if not group:
            return cls()
        try:
            entry = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"node.file_group: no group {group!r} on this machine") from None
        return cls(group, entry.gr_gid)

    @property
    def umask(self) -> int:
        return 0o077 if self.gid is None else 0o027

    @property
    def file(self) -> int:
        return 0o600 if self.gid is None else 0o640

    @property
    def folder(self) -> int:
        # setgid: files and folders created inside take the folder's group (Linux, BSD).
        return 0o700 if self.gid is None else 0o2750


#: The modes last applied to this process (owner only until :func:`apply`).
_applied = FileModes()


def apply(modes: FileModes) -> None:
    """Set the process umask for ``modes``; every file and folder created afterwards gets it."""
    global _applied
    os.umask(modes.umask)
    _applied = modes


def private_file_mode() -> int:
    """The mode for a file made by :func:`tempfile.mkstemp` (0600, or 0640 with a group)."""
    return _applied.file


def private_folder_mode() -> int:
    """The mode for a folder made with an explicit mode (0700, or 0750 with a group); the
    setgid bit comes from the parent folder."""
    return _applied.folder & 0o777


def make_node_private(config: Config) -> None:
    """Apply ``node.file_group``'s modes and make the data folder and folder destinations private.

    Call before anything is written under ``node.data_dir``. Creates missing folders with
    private modes and tightens existing ones, logging one WARNING when something was
    readable by other users.

    Raises
    ------
    ConfigError
        An unknown ``node.file_group``; a data folder or folder destination that cannot be
        created, written or made private (the message names the key).
    """
    modes = FileModes.for_group(config.node.file_group)
    apply(modes)
    data_dir = config.resolve(config.node.data_dir)
    loosened = ensure_private_folder(data_dir, modes, "node.data_dir")
    for entry in sorted(data_dir.iterdir()):
        loosened += _set_modes(entry, modes, "node.data_dir")
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"node.data_dir: {data_dir} is not writable by this user")
    for i, destination in enumerate(config.destinations):
        if destination.kind == "folder":
            loosened += ensure_private_folder(
                config.resolve(destination.path), modes, f"destinations[{i}].path")
    if loosened:
        log.warning("other users could read patient data here; made private (%s): %s",
                    _describe(modes), ", ".join(loosened))


def ensure_private_folder(path: Path, modes: FileModes, key: str) -> list[str]:
    """Create ``path`` (and missing parents) or give an existing one the folder modes.

    Returns
    -------
    list of str
        ``"<path> <old mode>"`` when the folder existed and others could read it; else empty.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot create {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{key}: {path} is not a folder")
    return _set_modes(path.resolve(), modes, key)  # the folder a configured link points to


def _set_modes(path: Path, modes: FileModes, key: str) -> list[str]:
    """Give one file or folder the modes and group of ``modes`` (symbolic links are left)."""
    try:
        st = path.lstat()
    except FileNotFoundError:  # a -wal file that a running node's SQLite just removed
        return []
    if stat.S_ISLNK(st.st_mode):
        return []
    wanted = modes.folder if stat.S_ISDIR(st.st_mode) else modes.file
    old = stat.S_IMODE(st.st_mode)
    if modes.gid is not None and st.st_gid != modes.gid:
        try:
            os.chown(path, -1, modes.gid)
        except OSError as exc:
            raise ConfigError(
                f"node.file_group: cannot give {path} to group {modes.group!r}: "
                f"{exc.strerror} (the node's user must be a member of it)") from None
    if old != wanted:
        try:
            os.chmod(path, wanted)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot make {path} private: {exc.strerror} "
                              "(is it owned by another user?)") from None
    return [f"{path} {old:04o}"] if old & 0o777 & ~wanted else []


def _describe(modes: FileModes) -> str:
    if modes.gid is None:
        return "files 0600, folders 0700"
    return f"files 0640, folders 2750, group {modes.group}"
