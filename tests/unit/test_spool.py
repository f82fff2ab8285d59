"""The spool: atomic, fsynced, idempotent, path-safe (dicomnode.spool.store)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from dicomnode.errors import InputRejected
from dicomnode.spool.store import Outcome, Spool, is_valid_uid
from dicomnode.types import SeriesKey

KEY = SeriesKey("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.2")
SOP = "1.2.826.0.1.3680043.8.498.1.2.3"
CONTENT = b"\x00" * 128 + b"DICM" + bytes(range(256)) * 40


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_write_puts_the_exact_bytes_under_study_series_sop(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    stored = spool.write(KEY, SOP, CONTENT)
    assert stored.outcome is Outcome.NEW
    assert stored.path == tmp_path / KEY.study_uid / KEY.series_uid / f"{SOP}.dcm"
    assert stored.path.read_bytes() == CONTENT
    assert files_under(tmp_path) == [stored.path]  # no temporary file left behind


def test_pieces_are_written_in_order_without_joining(tmp_path: Path) -> None:
    header, body = CONTENT[:200], memoryview(CONTENT)[200:]
    stored = Spool(tmp_path).write(KEY, SOP, (header, body))
    assert stored.path.read_bytes() == CONTENT


def test_file_is_private_to_the_node(tmp_path: Path) -> None:
    stored = Spool(tmp_path).write(KEY, SOP, CONTENT)
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o600  # patient data


def test_file_is_fsynced_before_the_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: Path) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    spool = Spool(tmp_path)
    spool.write(KEY, SOP, CONTENT)  # creates the study and series folders
    assert events[-3:] == ["fsync file", "rename", "fsync dir"]
    events.clear()
    spool.write(KEY, SOP + ".1", CONTENT)  # folders known: exactly one file and one folder sync
    assert events == ["fsync file", "rename", "fsync dir"]


def test_identical_duplicate_is_a_no_op(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.write(KEY, SOP, CONTENT)
    inode = first.path.stat().st_ino
    again = spool.write(KEY, SOP, (CONTENT[:10], CONTENT[10:]))
    assert again.outcome is Outcome.DUPLICATE and again.path == first.path
    assert first.path.stat().st_ino == inode  # not rewritten


def test_different_content_replaces_the_old_copy(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write(KEY, SOP, CONTENT)
    newer = CONTENT[:-1] + b"\x01"
    replaced = spool.write(KEY, SOP, newer)
    assert replaced.outcome is Outcome.REPLACED
    assert replaced.path.read_bytes() == newer
    shorter = spool.write(KEY, SOP, CONTENT[:100])
    assert shorter.outcome is Outcome.REPLACED and shorter.path.read_bytes() == CONTENT[:100]
    assert len(files_under(tmp_path)) == 1


@pytest.mark.parametrize(
    "bad",
    [
        "../../../etc/passwd",
        "1.2/../../3",
        "1.2.3/4",
        "..",
        "",
        "1.2.",
        ".1.2",
        "1..2",
        "1.2\x00.3",
        "1.2.3 ",
        "1.2.3a",
        "/abs/1.2",
        "1." + "2" * 63,  # 65 characters
    ],
)
def test_malicious_or_invalid_uids_never_reach_the_file_system(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "spool"
    spool = Spool(root)
    for key, sop in (
        (SeriesKey(bad, KEY.series_uid), SOP),
        (SeriesKey(KEY.study_uid, bad), SOP),
        (KEY, bad),
    ):
        with pytest.raises(InputRejected) as raised:
            spool.write(key, sop, CONTENT)
        assert raised.value.dimse_status == 0xA900
    assert files_under(tmp_path) == []
    assert list(root.iterdir()) == []


def test_uid_grammar() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2")
    assert is_valid_uid("1.2.0.3")
    assert is_valid_uid("1.2." + "3" * 60)  # 64 characters
    assert not is_valid_uid("1.2." + "3" * 61)


def test_failed_write_leaves_nothing_under_the_final_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.write(KEY, SOP + ".9", CONTENT)  # the folders exist

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        spool.write(KEY, SOP, CONTENT)
    assert [p.name for p in files_under(tmp_path)] == [f"{SOP}.9.dcm"]


def test_folder_removed_behind_the_spools_back_is_created_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.write(KEY, SOP, CONTENT).path
    first.unlink()
    first.parent.rmdir()
    first.parent.parent.rmdir()
    assert spool.write(KEY, SOP, CONTENT).path.read_bytes() == CONTENT


def test_remove_temporary_files_clears_what_a_crash_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.write(KEY, SOP, CONTENT).path
    leftover = kept.parent / f".{SOP}.abc123.tmp"
    leftover.write_bytes(CONTENT[:10])
    assert spool.remove_temporary_files() == 1
    assert files_under(tmp_path) == [kept]
