"""Reading the receiving header from a file: only as far as needed, deflated data as a
stream, and a limit on what a deflated data set may inflate to."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicomnode.receive.header import (
    HeaderUnreadable,
    InstanceTooLarge,
    read_header,
    read_header_from_file,
)

META = b"M" * 40  # the file offset of the data set is what matters, not what precedes it


def encoded(*, implicit: bool = False, before_columns: int = 0, pixels: int = 8) -> bytes:
    """A CT data set; ``before_columns`` bytes of a private OB element precede Rows."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [0, 0, 12.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if before_columns:
        ds.add_new(0x00090010, "LO", "BIG")
        ds.add_new(0x00091001, "OB", bytes(before_columns))
    ds.Rows, ds.Columns = 512, 256
    ds.BitsAllocated = 16
    ds.PixelData = bytes(pixels)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def in_file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "instance.part"
    path.write_bytes(META + data)
    return path


@pytest.mark.parametrize("implicit", [False, True])
def test_the_file_header_equals_the_in_memory_header(tmp_path: Path, implicit: bool) -> None:
    data = encoded(implicit=implicit, pixels=3 * 2**20)
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    from_file = read_header_from_file(in_file(tmp_path, data), len(META), syntax)
    assert from_file == read_header(data, syntax)
    assert (from_file.rows, from_file.cols, from_file.instance_number) == (512, 256, 7)
    assert from_file.position_along_normal == 12.5


def test_a_header_beyond_the_first_read_is_found_by_reading_further(tmp_path: Path) -> None:
    data = encoded(before_columns=300 * 1024)
    header = read_header_from_file(in_file(tmp_path, data), len(META), ExplicitVRLittleEndian)
    assert (header.rows, header.cols) == (512, 256)


def test_a_data_set_cut_before_columns_is_unreadable(tmp_path: Path) -> None:
    data = encoded(before_columns=300 * 1024)
    with pytest.raises(HeaderUnreadable, match="truncated"):
        read_header_from_file(in_file(tmp_path, data[:200 * 1024]), len(META),
                              ExplicitVRLittleEndian)


def test_a_deflated_data_set_is_read_as_a_stream_within_its_limit(tmp_path: Path) -> None:
    data = encoded(pixels=4 * 2**20)
    path = in_file(tmp_path, deflate(data))
    header = read_header_from_file(path, len(META), DeflatedExplicitVRLittleEndian,
                                   max_inflated_bytes=5 * 2**20)
    assert header == read_header(data, ExplicitVRLittleEndian)


def test_a_deflate_bomb_over_the_limit_is_refused(tmp_path: Path) -> None:
    bomb = deflate(encoded(pixels=64 * 2**20))
    assert len(bomb) < 2**20
    with pytest.raises(InstanceTooLarge, match="more than 16 MB"):
        read_header_from_file(in_file(tmp_path, bomb), len(META),
                              DeflatedExplicitVRLittleEndian, max_inflated_bytes=16 * 2**20)


def test_a_corrupt_deflate_stream_is_unreadable(tmp_path: Path) -> None:
    stream = bytearray(deflate(encoded()))
    stream[5:40] = b"\xff" * 35
    with pytest.raises(HeaderUnreadable):
        read_header_from_file(in_file(tmp_path, bytes(stream)), len(META),
                              DeflatedExplicitVRLittleEndian, max_inflated_bytes=2**20)


def test_an_empty_data_set_has_an_empty_header(tmp_path: Path) -> None:
    header = read_header_from_file(in_file(tmp_path, b""), len(META), ExplicitVRLittleEndian)
    assert header.sop_instance_uid == "" and header.rows is None


def test_an_element_header_split_by_the_first_read_is_read_whole(tmp_path: Path) -> None:
    # Pad so that the Rows element header straddles the 64 KB boundary of the first read.
    data = encoded(before_columns=1)
    rows_at = data.index(struct.pack("<HH", 0x0028, 0x0010))
    pad = 64 * 1024 - rows_at - 3
    data = encoded(before_columns=1 + pad + (pad % 2))
    header = read_header_from_file(in_file(tmp_path, data), len(META), ExplicitVRLittleEndian)
    assert (header.rows, header.cols) == (512, 256)


def test_a_deflated_data_set_cut_short_is_unreadable(tmp_path: Path) -> None:
    stream = deflate(encoded(pixels=2**20))
    with pytest.raises(HeaderUnreadable, match="ends before its deflate stream"):
        read_header_from_file(in_file(tmp_path, stream[: len(stream) // 2]), len(META),
                              DeflatedExplicitVRLittleEndian, max_inflated_bytes=2**22)
