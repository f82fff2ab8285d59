"""The few header elements of a received data set, read without decoding the rest (PURE).

Receiving needs a dozen elements of each instance (UIDs, Modality, InstanceNumber, geometry,
Rows, Columns) and nothing after Columns (0028,0011). They are found by walking element
headers (PS3.5 7), never by decoding the data set: pixel data and everything after it are
never touched, whether the data set is in memory (:func:`read_header`) or in a file that is
read only as far as needed (:func:`read_header_from_file`). A Deflated Explicit VR Little
Endian data set (PS3.5 A.5) is inflated as a stream: only the header's bytes are kept, and the
rest is inflated in bounded chunks just to measure it against a limit, so a deflate bomb costs
CPU time, not memory.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicomnode.types import SeriesKey

# The elements read from each data set (PS3.3 C.12.1, C.7.3.1, C.7.6.1, C.7.6.2, C.7.6.3).
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_MODALITY = 0x00080060
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_INSTANCE_NUMBER = 0x00200013
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_WANTED_TAGS = frozenset(
    (
        _SOP_CLASS_UID,
        _SOP_INSTANCE_UID,
        _MODALITY,
        _STUDY_UID,
        _SERIES_UID,
        _INSTANCE_NUMBER,
        _IMAGE_POSITION,
        _IMAGE_ORIENTATION,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
    )
)
#: Every wanted element precedes this one, so reading stops after it.
_LAST_HEADER_TAG = _COLUMNS

_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF

#: A file is read (or inflated) in growing prefixes until the walk passes Columns: most CT
#: headers lie in the first 64 KB; elements before Columns larger than this are refused.
_FIRST_PREFIX = 64 * 1024
MAX_HEADER_BYTES = 16 * 2**20
_INFLATE_CHUNK = 1 << 20


class InstanceTooLarge(ValueError):
    """A deflated data set inflates to more than the limit."""


class HeaderUnreadable(ValueError):
    """The start of a data set could not be parsed."""


@dataclass(frozen=True)
class InstanceHeader:
    """The few elements of a received data set that receiving needs.

    Empty strings stand for absent UIDs; ``None`` for absent or unparsable optional values.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str = ""
    instance_number: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    rows: int | None = None
    cols: int | None = None
    frames: int = 1

    @property
    def key(self) -> SeriesKey:
        return SeriesKey(self.study_uid, self.series_uid)

    @property
    def position_along_normal(self) -> float | None:
        """ImagePositionPatient projected on the slice normal (PS3.3 C.7.6.2.1.1), in mm.

        ``None`` for a multi-frame instance (its positions are per frame) or when position or
        orientation is missing or degenerate.
        """
        if self.frames > 1 or self.position is None or self.orientation is None:
            return None
        row, col = self.orientation[:3], self.orientation[3:]
        normal = (
            row[1] * col[2] - row[2] * col[1],
            row[2] * col[0] - row[0] * col[2],
            row[0] * col[1] - row[1] * col[0],
        )
        length = math.sqrt(sum(n * n for n in normal))
        if length < 1e-6:
            return None
        return sum(p * n for p, n in zip(self.position, normal)) / length

    @property
    def orientation_text(self) -> str | None:
        if self.orientation is None:
            return None
        return ",".join(f"{c:.6f}" for c in self.orientation)


def read_header(data_set: bytes | bytearray | memoryview, transfer_syntax: str) -> InstanceHeader:
    """Read :class:`InstanceHeader` from an encoded data set in memory.

    The elements are located by walking element headers only (sequences are skipped by their
    lengths or delimiters, PS3.5 7.5), and the walk stops at the first element after Columns
    (0028,0011). On a real CT slice this takes 0.15 ms against 0.57 ms for pydicom's
    ``read_dataset`` with the same ``stop_when``. pydicom still reads whatever the walk does
    not expect, for example an explicit VR transfer syntax whose data set is implicitly
    encoded, which pydicom detects and tolerates. A deflated data set is inflated first.

    Raises
    ------
    HeaderUnreadable
        The elements before (0028,0011) are not a valid encoding in ``transfer_syntax``.
    """
    syntax = UID(transfer_syntax)
    buffer = memoryview(data_set)
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            buffer = memoryview(zlib.decompress(buffer, -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise HeaderUnreadable(f"cannot inflate the deflated data set: {exc}") from exc
    walked = _walk(buffer, syntax.is_implicit_VR, syntax.is_little_endian, at_end=True)
    assert walked is not None  # at_end: the walk always ends in values or an error
    return _header_from_values(walked, syntax.is_little_endian)


def read_header_from_file(
    path: Path, offset: int, transfer_syntax: str, *, max_inflated_bytes: int | None = None
) -> InstanceHeader:
    """Read :class:`InstanceHeader` from the data set that starts at ``offset`` in ``path``.

    Reads growing prefixes (64 KB first) until the walk passes Columns, so a data set of any
    size costs about one small read. A deflated data set is inflated as a stream; with
    ``max_inflated_bytes`` the rest of it is then inflated in 1 MB chunks, kept nowhere, to
    check its inflated size.

    Raises
    ------
    HeaderUnreadable
        As :func:`read_header`; elements before Columns beyond :data:`MAX_HEADER_BYTES`
        are judged as if the data set ended there.
    InstanceTooLarge
        The deflated data set inflates to more than ``max_inflated_bytes``.
    """
    syntax = UID(transfer_syntax)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    with open(path, "rb") as f:
        f.seek(offset)
        stream: _Readable = f
        if syntax == DeflatedExplicitVRLittleEndian:
            stream = _Inflater(f)
        prefix, want = bytearray(), _FIRST_PREFIX
        while True:
            prefix += stream.read(want - len(prefix))
            # The whole data set, or as much as a header may take: judge what is there.
            last_try = len(prefix) < want or want >= MAX_HEADER_BYTES
            walked = _walk(memoryview(prefix), implicit, little, at_end=last_try)
            if walked is not None:
                break
            want *= 4
        if isinstance(stream, _Inflater) and max_inflated_bytes is not None:
            stream.check_size(max_inflated_bytes)
    return _header_from_values(walked, little)


def _walk(
    buffer: memoryview, implicit: bool, little: bool, *, at_end: bool
) -> dict[int, bytes] | None:
    """Header values of ``buffer``; ``None`` when it is a prefix too short to tell."""
    try:
        values, complete = _ElementWalker(implicit=implicit, little_endian=little).header_values(
            buffer
        )
    except _Truncated as exc:
        if not at_end:
            return None
        return _header_values_encoded_the_other_way(buffer, implicit, little, exc)
    except _UnexpectedEncoding:
        if not at_end:
            return None  # perhaps an element header cut by the prefix's end
        return _header_values_with_pydicom(buffer, implicit, little)
    if not complete and not at_end:
        return None
    return values


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...  # pragma: no cover - a protocol


class _Inflater:
    """Reads a raw deflate stream (PS3.5 A.5) inflated, holding at most one chunk."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.inflated = 0
        self._pending = b""

    def read(self, size: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < size:
                piece = self._inflate(size - len(out))
                if not piece:
                    break
                out += piece
        except zlib.error as exc:
            raise HeaderUnreadable(f"cannot inflate the deflated data set: {exc}") from exc
        return bytes(out)

    def check_size(self, limit: int) -> None:
        """Inflate the rest, discarding it: refuse a data set larger than ``limit``, or whose
        deflate stream is corrupt or cut short (as a cut uncompressed data set is refused)."""
        try:
            while self._inflate(_INFLATE_CHUNK):
                if self.inflated > limit:
                    raise InstanceTooLarge(
                        f"deflated data set inflates to more than {limit / 2**20:.0f} MB"
                    )
        except zlib.error as exc:
            raise HeaderUnreadable(f"cannot inflate the deflated data set: {exc}") from exc
        if not self.inflater.eof:
            raise HeaderUnreadable("the deflated data set ends before its deflate stream does")

    def _inflate(self, size: int) -> bytes:
        """Up to ``size`` inflated bytes; ``b""`` at the end of the stream (or of the file,
        when the stream was cut short: the walk then finds the data set truncated)."""
        while not self.inflater.eof:
            if not self._pending:
                self._pending = self.source.read(_INFLATE_CHUNK)
                if not self._pending:
                    return b""
            piece = self.inflater.decompress(self._pending, size)
            self._pending = self.inflater.unconsumed_tail
            self.inflated += len(piece)
            if piece:
                return piece
        return b""


def _header_values_encoded_the_other_way(
    buffer: memoryview, implicit: bool, little: bool, truncated: _Truncated
) -> dict[int, bytes]:
    """Header values of a data set whose walk ran past its end.

    Either the data set was cut short (refused: pydicom would read the part that arrived and
    call it complete), or its VR explicitness is not the transfer syntax's, which misreads
    lengths; only the second is readable, by walking it the other way.
    """
    try:
        return _ElementWalker(implicit=not implicit, little_endian=little).header_values(buffer)[0]
    except _UnexpectedEncoding:
        raise HeaderUnreadable(f"truncated: {truncated}") from None


class _UnexpectedEncoding(Exception):
    """The element walk met something it does not handle; pydicom gets a try."""


class _Truncated(_UnexpectedEncoding):
    """An element's value runs past the end of the data set."""


class _ElementWalker:
    """Finds the header elements of an encoded data set by walking element headers (PS3.5 7)."""

    _LONG_VRS = frozenset(
        (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
    )
    _SHORT_VRS = frozenset(
        (
            b"AE",
            b"AS",
            b"AT",
            b"CS",
            b"DA",
            b"DS",
            b"DT",
            b"FD",
            b"FL",
            b"IS",
            b"LO",
            b"LT",
            b"PN",
            b"SH",
            b"SL",
            b"SS",
            b"ST",
            b"TM",
            b"UI",
            b"UL",
            b"US",
        )
    )

    def __init__(self, *, implicit: bool, little_endian: bool) -> None:
        order = "<" if little_endian else ">"
        self.implicit = implicit
        self._tag_vr_short = struct.Struct(order + "HH2sH")
        self._tag_length = struct.Struct(order + "HHI")
        self._length = struct.Struct(order + "I")

    def header_values(self, buffer: memoryview) -> tuple[dict[int, bytes], bool]:
        """Raw values of the wanted top-level elements up to (0028,0011), and whether the
        walk reached an element after it (else it met the end of ``buffer`` first)."""
        found: dict[int, bytes] = {}
        position, end = 0, len(buffer)
        try:
            while position < end:
                tag, vr, length, position = self._element(buffer, position, self.implicit)
                if tag > _LAST_HEADER_TAG:
                    return found, True
                if length == _UNDEFINED_LENGTH:
                    position = self._skip_sequence(buffer, position, self.implicit or vr == b"UN")
                    continue
                if position + length > end:
                    raise _Truncated(
                        f"({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data set"
                    )
                if tag in _WANTED_TAGS:
                    found[tag] = bytes(buffer[position : position + length])
                position += length
        except (struct.error, RecursionError) as exc:
            raise _UnexpectedEncoding(str(exc)) from exc
        return found, False

    def _element(
        self, buffer: memoryview, position: int, implicit: bool
    ) -> tuple[int, bytes, int, int]:
        """Tag, VR (empty if implicit), value length and value offset of one element."""
        group, element, vr, short_length = self._tag_vr_short.unpack_from(buffer, position)
        tag = group << 16 | element
        # Items and delimiters (group FFFE) carry no VR in either encoding (PS3.5 7.5).
        if implicit or group == 0xFFFE:
            return tag, b"", self._length.unpack_from(buffer, position + 4)[0], position + 8
        if vr in self._LONG_VRS:
            return tag, vr, self._length.unpack_from(buffer, position + 8)[0], position + 12
        if vr in self._SHORT_VRS:
            return tag, vr, short_length, position + 8
        raise _UnexpectedEncoding(f"unknown VR {bytes(vr)!r} in ({group:04X},{element:04X})")

    def _skip_sequence(self, buffer: memoryview, position: int, implicit: bool) -> int:
        """Offset after an undefined-length sequence's delimiter (PS3.5 7.5.2).

        ``implicit`` is also true inside an explicit VR UN of undefined length, whose content
        is Implicit VR Little Endian (PS3.5 6.2.2).
        """
        while True:
            group, element, length = self._tag_length.unpack_from(buffer, position)
            position += 8
            tag = group << 16 | element
            if tag == _SEQUENCE_DELIMITER:
                return position
            if tag != _ITEM:
                raise _UnexpectedEncoding(f"({group:04X},{element:04X}) where an item was expected")
            if length == _UNDEFINED_LENGTH:
                position = self._skip_item(buffer, position, implicit)
            else:
                position += length

    def _skip_item(self, buffer: memoryview, position: int, implicit: bool) -> int:
        """Offset after an undefined-length item's delimiter."""
        while True:
            tag, vr, length, position = self._element(buffer, position, implicit)
            if tag == _ITEM_DELIMITER:
                return position
            if length == _UNDEFINED_LENGTH:
                position = self._skip_sequence(buffer, position, implicit or vr == b"UN")
            else:
                position += length
            if position > len(buffer):
                raise _UnexpectedEncoding("item runs past the end of the data set")


def _header_values_with_pydicom(
    buffer: memoryview, implicit: bool, little: bool
) -> dict[int, bytes]:
    """Raw values of the header elements, read by pydicom (the lenient, slower path)."""
    try:
        ds = read_dataset(
            io.BytesIO(buffer),
            implicit,
            little,
            stop_when=_past_header,
            specific_tags=list(_WANTED_TAGS),
        )
        raw = {tag: ds.get_item(tag) for tag in _WANTED_TAGS if tag in ds}
        return {tag: bytes(element.value or b"") for tag, element in raw.items()}
    except Exception as exc:  # pydicom raises many types on malformed input
        raise HeaderUnreadable(f"{type(exc).__name__}: {exc}") from exc


def _header_from_values(raw: dict[int, bytes], little_endian: bool) -> InstanceHeader:
    """Interpret raw header values; malformed optional values become ``None``.

    Malformed geometry is assembly's problem (it refuses the series with a reason); receiving
    must still store the instance.
    """
    positions = _decimals(raw, _IMAGE_POSITION, 3)
    orientation = _decimals(raw, _IMAGE_ORIENTATION, 6)
    return InstanceHeader(
        sop_class_uid=_string(raw, _SOP_CLASS_UID),
        sop_instance_uid=_string(raw, _SOP_INSTANCE_UID),
        study_uid=_string(raw, _STUDY_UID),
        series_uid=_string(raw, _SERIES_UID),
        modality=_string(raw, _MODALITY),
        instance_number=_integer(raw, _INSTANCE_NUMBER),
        position=positions,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        rows=_unsigned_short(raw, _ROWS, little_endian),
        cols=_unsigned_short(raw, _COLUMNS, little_endian),
        frames=_integer(raw, _NUMBER_OF_FRAMES) or 1,
    )


def _past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_HEADER_TAG


def _string(raw: dict[int, bytes], tag: int) -> str:
    """A text value (UI, CS, IS, DS) without its padding; non-ASCII bytes become U+FFFD."""
    value = raw.get(tag)
    return "" if value is None else value.decode("ascii", "replace").strip(" \x00")


def _integer(raw: dict[int, bytes], tag: int) -> int | None:
    """An IS value (PS3.5 6.2), or ``None`` if absent or malformed."""
    try:
        return int(_string(raw, tag))
    except ValueError:
        return None


def _decimals(raw: dict[int, bytes], tag: int, count: int) -> tuple[float, ...] | None:
    """``count`` finite DS values (PS3.5 6.2), or ``None`` if absent or malformed."""
    try:
        numbers = tuple(float(v) for v in _string(raw, tag).split("\\"))
    except ValueError:
        return None
    if len(numbers) != count or not all(math.isfinite(n) for n in numbers):
        return None
    return numbers


def _unsigned_short(raw: dict[int, bytes], tag: int, little_endian: bool) -> int | None:
    value = raw.get(tag)
    if value is None or len(value) != 2:
        return None
    return int.from_bytes(value, "little" if little_endian else "big")
