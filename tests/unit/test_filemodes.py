"""File modes of what the node writes (``dicomnode.filemodes``): owner only, or one group."""

from __future__ import annotations

import grp
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomnode import filemodes
from dicomnode.config import Config, DestinationConfig, NodeConfig
from dicomnode.errors import ConfigError
from dicomnode.filemodes import FileModes, ensure_private_folder, make_node_private
from dicomnode.spool.store import write_atomically


@pytest.fixture(autouse=True)
def restore_umask() -> Iterator[None]:
    """The modes are process-wide: give the test process its own back afterwards."""
    umask, applied = os.umask(0o022), filemodes._applied
    yield
    os.umask(umask)
    filemodes._applied = applied


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def own_group() -> str:
    return grp.getgrgid(os.getegid()).gr_name


def node_config(data_dir: Path, file_group: str = "", **destination: object) -> Config:
    destinations = (DestinationConfig(**destination),) if destination else ()  # type: ignore[arg-type]
    return Config(node=NodeConfig(data_dir=data_dir, file_group=file_group),
                  destinations=destinations)


def test_owner_only_by_default():
    modes = FileModes.for_group("")
    assert (modes.umask, modes.file, modes.folder) == (0o077, 0o600, 0o700)


def test_a_group_by_name_or_number():
    group = own_group()
    by_name, by_number = FileModes.for_group(group), FileModes.for_group(str(os.getegid()))
    assert by_name.gid == by_number.gid == os.getegid()
    assert (by_name.umask, by_name.file, by_name.folder) == (0o027, 0o640, 0o2750)


def test_an_unknown_group_names_the_key():
    with pytest.raises(ConfigError, match=r"node\.file_group: no group 'no-such-group'"):
        FileModes.for_group("no-such-group")


def test_a_fresh_data_folder_and_what_is_created_in_it_are_private(tmp_path):
    data_dir = tmp_path / "var" / "node"
    make_node_private(node_config(data_dir, kind="folder", path=tmp_path / "out"))
    (data_dir / "spool" / "1.2").mkdir(parents=True)
    (data_dir / "index.sqlite").write_bytes(b"")  # as SQLite creates it: 0666 less the umask
    write_atomically(data_dir / "spool" / "1.2" / "3.dcm", [b"DICM"])
    assert mode(data_dir) == mode(data_dir / "spool" / "1.2") == mode(tmp_path / "out") == 0o700
    assert mode(data_dir / "index.sqlite") == mode(data_dir / "spool" / "1.2" / "3.dcm") == 0o600


def test_with_a_group_files_are_group_readable_and_folders_pass_the_group_on(tmp_path):
    group = own_group()
    data_dir = tmp_path / "node"
    make_node_private(node_config(data_dir, group))
    (data_dir / "results" / "job").mkdir(parents=True)
    write_atomically(data_dir / "results" / "job" / "sr.dcm", [b"DICM"])
    for folder in (data_dir, data_dir / "results" / "job"):
        assert mode(folder) == 0o2750 and folder.stat().st_gid == os.getegid()
    assert mode(data_dir / "results" / "job" / "sr.dcm") == 0o640


def test_an_old_install_is_tightened_with_one_warning(tmp_path, caplog):
    data_dir = tmp_path / "node"
    (data_dir / "spool" / "1.2").mkdir(parents=True, mode=0o755)
    (data_dir / "jobs.sqlite").write_bytes(b"")
    os.chmod(data_dir, 0o755)
    os.chmod(data_dir / "spool", 0o755)
    os.chmod(data_dir / "jobs.sqlite", 0o644)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    (data_dir / "elsewhere").symlink_to(shared)
    with caplog.at_level(logging.WARNING, logger="dicomnode.filemodes"):
        make_node_private(node_config(data_dir))
    assert mode(data_dir) == mode(data_dir / "spool") == 0o700
    assert mode(data_dir / "jobs.sqlite") == 0o600
    assert mode(shared) == 0o755  # a symbolic link's target is not the node's to change
    (record,) = caplog.records
    assert f"{data_dir} 0755" in record.getMessage()
    assert f"{data_dir / 'jobs.sqlite'} 0644" in record.getMessage()


def test_a_private_install_gives_no_warning(tmp_path, caplog):
    make_node_private(node_config(tmp_path / "node"))
    with caplog.at_level(logging.WARNING, logger="dicomnode.filemodes"):
        make_node_private(node_config(tmp_path / "node"))
    assert caplog.records == []


def test_a_data_folder_that_cannot_be_created_names_the_key(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"node\.data_dir: cannot create .*a-file/node"):
        make_node_private(node_config(tmp_path / "a-file" / "node"))


def test_a_folder_destination_that_is_a_file_names_the_key(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.path: cannot create"):
        make_node_private(node_config(tmp_path / "node", kind="folder", path=tmp_path / "out"))


def test_an_existing_folder_is_given_the_folder_mode(tmp_path):
    (tmp_path / "out").mkdir(mode=0o777)
    os.chmod(tmp_path / "out", 0o777)
    assert ensure_private_folder(tmp_path / "out", FileModes(), "--out") == [f"{tmp_path / 'out'} 0777"]
    assert mode(tmp_path / "out") == 0o700


def test_a_data_folder_given_as_a_link_is_made_private_where_it_points(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chmod(volume, 0o755)
    (tmp_path / "node").symlink_to(volume)
    make_node_private(node_config(tmp_path / "node"))
    assert mode(volume) == 0o700
