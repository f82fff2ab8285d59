"""A small, seeded mutation fuzzer over encoded CT instances (test helper and command line).

The fuzzer damages the bytes of a Part 10 data set as it goes on the wire, never a pydicom
object: a pydicom object can only hold what pydicom can write, and the damage that matters
(a length field that lies, a VR that changes the header layout, a data set cut mid-element)
cannot be expressed that way. The File Meta Information is left intact, so pynetdicom can
still pick the presentation context and the Affected SOP Instance UID from it and send the
damaged data set bytes as they are (``pynetdicom._config.STORE_SEND_CHUNKED_DATASET``).

Valid seeds:

- synthetic CT series from :func:`dicomnode.phantom.make_phantom_study` (64 x 64 slices, so the
  real pipeline is quick), encoded in Explicit VR Little Endian, Implicit VR Little Endian and
  Deflated Explicit VR Little Endian, one transfer syntax per series;
- when ``../shared/data`` is there (see its MANIFEST.md), a few real series: slices of the
  IBSI sarcoma CT (Implicit VR Little Endian, a real vendor's header) and of four patients of
  the sarcoma cohort (JPEG-LS lossless: damage reaches the decoder). They come after the
  synthetic series, so a corpus index means the same instance with or without them.

Mutations, one per damaged instance, each recorded with its parameters:

``bitflip``   1-8 bits flipped, half of them in the header (before the pixel data);
``truncate``  the data set cut at a random offset (half the time inside the header);
``length``    an element's length field (any depth) set to a chosen or random value;
``vr``        an explicit VR replaced by another (or an unknown one), either keeping the
              bytes behind it (a 2-byte/4-byte length layout confusion) or re-laid out;
``duplicate`` a top-level element repeated next to itself, elsewhere (out of order) or at
              the end;
``remove``    a top-level element dropped;
``uid``       a top-level UID value damaged (a digit changed, a letter, empty, over 64
              characters, a leading zero, "..", a path, a NUL, spaces), the structure kept.

For a deflated series, ``bitflip`` and ``truncate`` hit the compressed stream half the time
(layer ``wire``); otherwise the inflated data set is damaged and deflated again.

Everything derives from one seed: the corpus plan (series, sources, transfer syntaxes, which
slices are damaged) and, per instance, a ``random.Random(f"{seed}/{index}")``. So one case
is replayed from ``(seed, index)`` alone::

    python tests/fuzz.py show --seed 12006 --index 1234 --out case.dcm
    python tests/fuzz.py show --seed 12006 --index 1234 --send 127.0.0.1:11112
    python tests/fuzz.py plan --seed 12006
"""

from __future__ import annotations

import argparse
import copy
import functools
import random
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

DEFAULT_SEED = 12006  # issue 12, item 6
#: The synthetic part alone holds at least this many damaged instances.
MIN_MUTATED = 2000
SLICES = 20
SHAPE = (64, 64)
SPACING = (2.5, 3.0, 3.0)
SYNTHETIC_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                      DeflatedExplicitVRLittleEndian)

#: Series profiles: how many of a series' slices are damaged. Clean series are controls
#: (they must be delivered); light ones should mostly still be analysed; heavy ones mostly not.
PROFILES = (("clean", 0.08), ("light", 0.17), ("heavy", 0.75))
KINDS = (("bitflip", 22), ("truncate", 14), ("length", 16), ("vr", 12), ("duplicate", 10),
         ("remove", 12), ("uid", 14))

#: Real series (when the shared data is there): (name, folder under shared/data, first slice,
#: profile). Their profile is fixed, not drawn: a few damaged slices in some (real data read
#: through by the whole pipeline), most slices damaged in others (the JPEG-LS decoder and a
#: real vendor's header under damage).
REAL_SOURCES = (
    ("ibsi-sts-001-a", "ibsi_sts_001/dicom/CT/image", 12, "light"),
    ("ibsi-sts-001-b", "ibsi_sts_001/dicom/CT/image", 36, "heavy"),
    ("sts-003-jpegls", "sts_cohort/STS_003/CT/image", 15, "light"),
    ("sts-004-jpegls", "sts_cohort/STS_004/CT/image", 15, "heavy"),
    ("sts-005-jpegls", "sts_cohort/STS_005/CT/image", 10, "heavy"),
    ("sts-006-jpegls", "sts_cohort/STS_006/CT/image", 10, "light"),
)
REAL_SLICES = 14

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
SHORT_VRS = (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
             b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US")
ODD_VRS = (b"ZZ", b"\x00\x00", b"ob", b"  ", b"\xff\xff")  # not VRs at all
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010


# ------------------------------------------------------------------------------ element walker
@dataclass(frozen=True)
class Element:
    """Where one encoded data element lies in a (little endian) data set."""

    offset: int  # first byte of the tag
    tag: int
    vr: bytes | None  # None in implicit VR
    length_offset: int
    length_size: int  # 2 or 4 bytes
    length: int  # as encoded; UNDEFINED for undefined length
    value_offset: int
    end: int  # first byte after the element (after its delimiter for undefined length)
    depth: int  # 0: top level; 1: inside an item of a top-level sequence; ...

    def name(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


class Malformed(ValueError):
    """The bytes are not a well-formed data set (the walker stops there)."""


def walk(data: bytes, implicit: bool, *, lenient: bool = False) -> list[Element]:
    """Every element of ``data`` (nested ones too, parents before children), in order.

    ``lenient``: return what was found before the first malformed element instead of raising
    (a mutation may walk bytes an earlier one already broke)."""
    out: list[Element] = []
    try:
        end = _walk_elements(data, 0, len(data), implicit, 0, out)
        if end != len(data):
            raise Malformed(f"stray bytes at {end}")
    except (Malformed, struct.error):
        if not lenient:
            raise
    return [e for e in out if e is not None]  # a parent cut short by the error has no entry


def _is_sequence(tag: int, vr: bytes | None) -> bool:
    if vr is not None:
        return vr == b"SQ"
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:  # a private or unknown tag: only undefined length says "sequence"
        return False


def _walk_elements(data: bytes, pos: int, end: int, implicit: bool, depth: int,
                   out: list[Element]) -> int:
    """Elements from ``pos`` to ``end``, or to an item delimiter (returns the offset after it)."""
    while pos < end:
        if pos + 8 > end:
            raise Malformed(f"element header at {pos} runs past {end}")
        group, number = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | number
        if tag == ITEM_END:
            return pos + 8
        if implicit:
            vr, length_offset, size = None, pos + 4, 4
        else:
            vr = bytes(data[pos + 4:pos + 6])
            length_offset, size = (pos + 8, 4) if vr in LONG_VRS else (pos + 6, 2)
        length = int.from_bytes(data[length_offset:length_offset + size], "little")
        value = length_offset + size
        slot = len(out)
        out.append(None)  # type: ignore[arg-type]  # the parent before its children
        if length == UNDEFINED and size == 4:
            fragments = tag == PIXEL_DATA  # encapsulated pixel data: items are fragments
            # UN of undefined length holds implicit VR items (PS3.5 6.2.2).
            item_implicit = implicit or vr == b"UN"
            element_end = _walk_items(data, value, end, item_implicit, depth + 1, out,
                                      fragments=fragments)
        else:
            element_end = value + length
            if element_end > end:
                raise Malformed(f"{tag:08X} at {pos} runs past {end}")
            if length and _is_sequence(tag, vr):
                _walk_items(data, value, element_end, implicit, depth + 1, out, fragments=False)
        out[slot] = Element(pos, tag, vr, length_offset, size, length, value, element_end, depth)
        pos = element_end
    return pos


def _walk_items(data: bytes, pos: int, end: int, implicit: bool, depth: int,
                out: list[Element], *, fragments: bool) -> int:
    """Items of a sequence (or pixel data fragments) up to ``end`` or a sequence delimiter."""
    while pos < end:
        if pos + 8 > end:
            raise Malformed(f"item header at {pos} runs past {end}")
        tag, length = struct.unpack_from("<II", data, pos)
        tag = (tag & 0xFFFF) << 16 | tag >> 16  # (group, element) as two little-endian halves
        if tag == SEQUENCE_END:
            return pos + 8
        if tag != ITEM:
            raise Malformed(f"expected an item at {pos}, found {tag:08X}")
        value = pos + 8
        if fragments:
            pos = value + length
        elif length == UNDEFINED:
            pos = _walk_elements(data, value, end, implicit, depth, out)
        else:
            _walk_elements(data, value, value + length, implicit, depth, out)
            pos = value + length
        if pos > end:
            raise Malformed(f"item at {value - 8} runs past {end}")
    return pos


def header_end(elements: list[Element], size: int) -> int:
    """Where the top-level pixel data's value starts (the header is what comes before)."""
    for element in elements:
        if element.tag == PIXEL_DATA and element.depth == 0:
            return element.value_offset
    return size


# ------------------------------------------------------------------------------ mutations
@dataclass(frozen=True)
class Mutation:
    """One damage and what it took to make it (enough to explain and to replay it)."""

    kind: str
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}: " + ", ".join(f"{k}={v}" for k, v in self.params.items())


def _pick_kind(rng: random.Random, implicit: bool) -> str:
    kinds = [(k, w) for k, w in KINDS if not (implicit and k == "vr")]  # implicit VR has no VR
    return rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def bitflip(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Flip 1-8 bits; each lands in the header with probability 1/2 (pixels are most bytes)."""
    head = header_end(walk(data, implicit, lenient=True), len(data)) or len(data)
    out = bytearray(data)
    flips = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4, 8))):
        offset = rng.randrange(head) if rng.random() < 0.5 else rng.randrange(len(data))
        bit = rng.randrange(8)
        out[offset] ^= 1 << bit
        flips.append((offset, bit))
    return bytes(out), Mutation("bitflip", {"flips": flips})


def truncate(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Cut the data set short (half the time inside the header)."""
    head = header_end(walk(data, implicit, lenient=True), len(data)) or len(data)
    at = rng.randrange(head) if rng.random() < 0.5 else rng.randrange(len(data))
    return data[:at], Mutation("truncate", {"at": at, "of": len(data)})


def length(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Set one element's length field (any depth) to a value chosen to hurt a parser."""
    element = rng.choice(walk(data, implicit, lenient=True))
    size, old = element.length_size, element.length
    top = (1 << (8 * size)) - 1
    remaining = len(data) - element.value_offset
    choices = [0, 1, old + 1, max(old - 1, 0), old + 2, 2 * old + 2, remaining + 2,
               top - 1, top, rng.randrange(top + 1)]
    new = min(rng.choice(choices), top)
    out = (data[:element.length_offset] + _le(new, size)
           + data[element.length_offset + size:])
    return out, Mutation("length", {"tag": element.name(), "depth": element.depth,
                                    "at": element.length_offset, "size": size,
                                    "old": old, "new": new})


def vr_swap(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Replace an explicit VR: "raw" keeps the bytes behind it (the length layout may no
    longer match), "relayout" re-encodes the header in the new VR's layout."""
    element = rng.choice(walk(data, implicit, lenient=True))
    # Sorted: a frozenset's order changes with PYTHONHASHSEED, and replay must not.
    new_vr = rng.choice((*sorted(LONG_VRS), *SHORT_VRS, *ODD_VRS) if rng.random() < 0.85
                        else ODD_VRS)
    mode = rng.choice(("raw", "relayout"))
    value = data[element.value_offset:element.end]
    long_layout = new_vr in LONG_VRS or new_vr not in SHORT_VRS  # unknown VRs: 4-byte (PS3.5 6.2)
    if mode == "relayout" and element.length != UNDEFINED and (long_layout or len(value) <= 0xFFFF):
        tag = data[element.offset:element.offset + 4]
        header = (tag + new_vr + b"\x00\x00" + _le(element.length, 4) if long_layout
                  else tag + new_vr + _le(element.length, 2))
        out = data[:element.offset] + header + data[element.value_offset:]
    else:
        mode = "raw"
        out = data[:element.offset + 4] + new_vr + data[element.offset + 6:]
    return out, Mutation("vr", {"tag": element.name(), "depth": element.depth,
                                "old": element.vr.decode("latin-1") if element.vr else None,
                                "new": new_vr.decode("latin-1"), "mode": mode})


def _top_level(data: bytes, implicit: bool) -> list[Element]:
    return [e for e in walk(data, implicit, lenient=True) if e.depth == 0]


def duplicate(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Repeat a top-level element next to itself, at another element boundary, or at the end."""
    elements = _top_level(data, implicit)
    element = rng.choice(elements)
    raw = data[element.offset:element.end]
    where = rng.choice(("adjacent", "elsewhere", "end"))
    at = {"adjacent": element.end, "end": len(data),
          "elsewhere": rng.choice(elements).offset}[where]
    return data[:at] + raw + data[at:], Mutation("duplicate", {"tag": element.name(),
                                                                "where": where, "at": at})


def remove(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Drop a top-level element altogether."""
    element = rng.choice(_top_level(data, implicit))
    return (data[:element.offset] + data[element.end:],
            Mutation("remove", {"tag": element.name(), "at": element.offset}))


UID_DAMAGE = ("digit", "letter", "empty", "overlong", "leading-zero", "double-dot", "path",
              "nul", "spaces")


def _damage_uid(uid: str, how: str, rng: random.Random) -> str:
    digits = [k for k, c in enumerate(uid) if c.isdigit()]
    if not digits:
        return "1" if how == "digit" else "x"
    k = rng.choice(digits)
    if how == "digit":  # still a valid UID (unless it makes a leading zero), another identity
        return uid[:k] + str((int(uid[k]) + rng.randrange(1, 10)) % 10) + uid[k + 1:]
    if how == "letter":
        return uid[:k] + rng.choice("abcxyzABC") + uid[k + 1:]
    if how == "empty":
        return ""
    if how == "overlong":
        return uid + "." + "1234567890" * 4
    if how == "leading-zero":
        return uid.replace(".", ".0", 1)
    if how == "double-dot":
        return uid.replace(".", "..", 1)
    if how == "path":
        return "../../" + uid
    if how == "nul":
        return uid[:k] + "\x00" + uid[k:]
    return " " + uid + " "  # spaces


def uid_damage(data: bytes, implicit: bool, rng: random.Random) -> tuple[bytes, Mutation]:
    """Damage a top-level UID's value; its length field follows, so the structure holds."""
    uids = [e for e in _top_level(data, implicit) if e.length != UNDEFINED
            and (e.vr == b"UI" if e.vr is not None else _dictionary_vr(e.tag) == "UI")]
    if not uids:  # nothing to damage: fall back to a bit flip
        return bitflip(data, implicit, rng)
    element = rng.choice(uids)
    old = data[element.value_offset:element.end].decode("latin-1").rstrip("\x00 ")
    how = rng.choice(UID_DAMAGE)
    new = _damage_uid(old, how, rng).encode("latin-1")
    if len(new) % 2:
        new += b"\x00"  # UI pads with NUL to an even length (PS3.5 6.2)
    out = (data[:element.length_offset] + _le(len(new), element.length_size) + new
           + data[element.end:])
    return out, Mutation("uid", {"tag": element.name(), "how": how, "old": old,
                                 "new": new.decode("latin-1")})


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


MUTATORS = {"bitflip": bitflip, "truncate": truncate, "length": length, "vr": vr_swap,
            "duplicate": duplicate, "remove": remove, "uid": uid_damage}


def deflate(data: bytes) -> bytes:
    """Raw deflate (no zlib header), as Deflated Explicit VR Little Endian wants (PS3.5 A.5)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def inflate(data: bytes) -> bytes:
    return zlib.decompress(data, -15)


def mutate(body: bytes, syntax: str, rng: random.Random) -> tuple[bytes, Mutation]:
    """One mutation of the data set bytes ``body`` (as sent in ``syntax``)."""
    implicit = syntax == ImplicitVRLittleEndian
    kind = _pick_kind(rng, implicit)
    if syntax != DeflatedExplicitVRLittleEndian:
        return MUTATORS[kind](body, implicit, rng)
    if kind in ("bitflip", "truncate") and rng.random() < 0.5:
        out, mutation = MUTATORS[kind](body, False, rng)  # the compressed stream itself
        layer = "wire"
    else:
        out, mutation = MUTATORS[kind](inflate(body), False, rng)
        out, layer = deflate(out), "inflated"
    return out, Mutation(mutation.kind, {"layer": layer, **mutation.params})


# ------------------------------------------------------------------------------ encoding
def encode_body(ds: Dataset, syntax: str) -> bytes:
    """The data set's bytes as they go on the wire in ``syntax`` (no File Meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    body = buffer.getvalue()
    return deflate(body) if syntax == DeflatedExplicitVRLittleEndian else body


def part10(sop_class: str, sop_instance: str, syntax: str, body: bytes) -> bytes:
    """Preamble, DICM, an intact File Meta Information, then ``body`` as it is."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return bytes(128) + b"DICM" + buffer.getvalue() + body


def data_set_bytes(part10_file: bytes) -> bytes:
    """What follows the File Meta Information of a Part 10 file (its group length says where)."""
    group_length = struct.unpack_from("<I", part10_file, 128 + 4 + 8)[0]  # (0002,0000) UL
    return part10_file[128 + 4 + 12 + group_length:]


# ------------------------------------------------------------------------------ the corpus
@dataclass(frozen=True)
class SeriesPlan:
    """One series of the corpus: where its slices come from and which are damaged."""

    number: int
    source: str  # "phantom" or a REAL_SOURCES name
    syntax: str
    slices: int
    profile: str
    mutated: frozenset[int]  # slice numbers
    first_index: int  # corpus index of its first slice


@dataclass(frozen=True)
class Case:
    """One instance of the corpus: the file to send and what was done to it."""

    seed: int
    index: int
    series: int
    slice: int
    syntax: str
    sop_class: str
    sop_instance: str  # as the File Meta (and so the C-STORE request) names it
    series_uid: str  # of the valid slice (damage may have changed it in ``data``)
    mutation: Mutation | None
    data: bytes  # the whole Part 10 file

    @property
    def kind(self) -> str:
        return self.mutation.kind if self.mutation else "valid"

    def replay_command(self) -> str:
        return f"python tests/fuzz.py show --seed {self.seed} --index {self.index} --out case.dcm"


def _profile(rng: random.Random, slices: int, profile: str = "") -> tuple[str, frozenset[int]]:
    """A series' profile (drawn unless given) and the slice numbers it damages."""
    profile = profile or rng.choices([p for p, _ in PROFILES], [w for _, w in PROFILES])[0]
    count = {"clean": 0, "light": rng.randint(1, 3), "heavy": slices - rng.randint(0, 3)}[profile]
    return profile, frozenset(rng.sample(range(slices), count))


def plan(seed: int, real_root: Path | None = None) -> list[SeriesPlan]:
    """The series of the corpus: synthetic ones until at least MIN_MUTATED damaged instances,
    then (when ``real_root`` holds them) the real ones."""
    series: list[SeriesPlan] = []
    index = mutated = 0
    while mutated < MIN_MUTATED:
        number = len(series)
        rng = random.Random(f"{seed}/series/{number}")
        profile, damaged = _profile(rng, SLICES)
        syntax = SYNTHETIC_SYNTAXES[number % len(SYNTHETIC_SYNTAXES)]
        series.append(SeriesPlan(number, "phantom", syntax, SLICES, profile, damaged, index))
        index += SLICES
        mutated += len(damaged)
    if real_root is not None:
        for name, folder, _, profile in REAL_SOURCES:
            if not (real_root / folder).is_dir():
                continue
            number = len(series)
            rng = random.Random(f"{seed}/series/{number}")
            profile, damaged = _profile(rng, REAL_SLICES, profile)
            syntax = str(_real_files(real_root / folder)[0].file_meta.TransferSyntaxUID)
            series.append(SeriesPlan(number, name, syntax, REAL_SLICES, profile, damaged, index))
            index += REAL_SLICES
    return series


def real_root_if_present() -> Path | None:
    """``../shared/data`` when it holds at least one of the real sources, else ``None``."""
    if any((SHARED_DATA / folder).is_dir() for _, folder, _, _ in REAL_SOURCES):
        return SHARED_DATA
    return None


@functools.lru_cache(maxsize=8)
def _real_files(folder: Path) -> tuple[Dataset, ...]:
    """A real CT series' slices, ordered along the slice normal (z)."""
    datasets = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    return tuple(sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2])))


def _source_datasets(seed: int, entry: SeriesPlan, real_root: Path | None) -> list[Dataset]:
    """The series' valid slices, with UIDs of their own (no two fuzz series share one)."""
    entropy = [str(seed), str(entry.number), "dicomnode fuzz"]
    patient_id = f"FUZZ-{seed}-{entry.number:03d}"
    if entry.source == "phantom":
        from dicomnode.phantom import make_phantom_study  # numpy/scipy: only when building

        phantom_seed = random.Random(f"{seed}/phantom/{entry.number}").randrange(10**4, 10**9)
        phantom = make_phantom_study(
            phantom_seed, shape=(entry.slices, *SHAPE), spacing=SPACING, n_lesions=1,
            patient_id=patient_id, study_uid=generate_uid(entropy_srcs=[*entropy, "study"]),
            series_uid=generate_uid(entropy_srcs=[*entropy, "series"]))
        return [copy.deepcopy(ds) for ds in phantom.datasets]
    if real_root is None:
        raise ValueError(f"series {entry.number} is real ({entry.source}): no shared data")
    folder, first = next((f, k) for name, f, k, _ in REAL_SOURCES if name == entry.source)
    slices = _real_files(real_root / folder)[first:first + entry.slices]
    datasets = [copy.deepcopy(ds) for ds in slices]
    study, series = (generate_uid(entropy_srcs=[*entropy, what]) for what in ("study", "series"))
    frame = generate_uid(entropy_srcs=[*entropy, "frame"])
    for k, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "instance", str(k)])
        ds.PatientID = patient_id
    return datasets


def series_cases(seed: int, entry: SeriesPlan, real_root: Path | None = None) -> list[Case]:
    """Every instance of one planned series, damaged where the plan says."""
    cases = []
    for k, ds in enumerate(_source_datasets(seed, entry, real_root)):
        index = entry.first_index + k
        body = encode_body(ds, entry.syntax)
        mutation = None
        if k in entry.mutated:
            body, mutation = mutate(body, entry.syntax, random.Random(f"{seed}/{index}"))
        data = part10(str(ds.SOPClassUID), str(ds.SOPInstanceUID), entry.syntax, body)
        cases.append(Case(seed, index, entry.number, k, entry.syntax, str(ds.SOPClassUID),
                          str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), mutation, data))
    return cases


def corpus(seed: int, real_root: Path | None = None) -> Iterator[list[Case]]:
    """The whole corpus, one list of cases per series."""
    for entry in plan(seed, real_root):
        yield series_cases(seed, entry, real_root)


def replay(seed: int, index: int, real_root: Path | None = None) -> Case:
    """The one case at ``index`` of the corpus of ``seed`` (only its series is built)."""
    for entry in plan(seed, real_root):
        if entry.first_index <= index < entry.first_index + entry.slices:
            return series_cases(seed, entry, real_root)[index - entry.first_index]
    raise IndexError(f"the corpus of seed {seed} has no instance {index}")


# ------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="build one case, describe it, optionally write it")
    show.add_argument("--seed", type=int, default=DEFAULT_SEED)
    show.add_argument("--index", type=int, required=True)
    show.add_argument("--out", type=Path, help="write the Part 10 file here")
    show.add_argument("--send", metavar="HOST:PORT",
                      help="also C-STORE it, bytes as built, to a node (called AE DICOMNODE)")
    listing = commands.add_parser("plan", help="list the corpus' series")
    listing.add_argument("--seed", type=int, default=DEFAULT_SEED)
    for command in (show, listing):
        command.add_argument("--no-real", action="store_true", help="synthetic series only")
    args = parser.parse_args(argv)
    real_root = None if args.no_real else real_root_if_present()
    if args.command == "plan":
        for entry in plan(args.seed, real_root):
            print(f"series {entry.number:3d}  index {entry.first_index:5d}+{entry.slices:<3d} "
                  f"{entry.source:15s} {entry.profile:6s} {len(entry.mutated):2d} damaged  "
                  f"{pydicom.uid.UID(entry.syntax).name}")
        return 0
    case = replay(args.seed, args.index, real_root)
    print(f"seed {case.seed} index {case.index}: series {case.series} slice {case.slice}, "
          f"{pydicom.uid.UID(case.syntax).name}, SOP Instance {case.sop_instance}")
    print(case.mutation.describe() if case.mutation else "valid (not damaged)")
    if args.out:
        args.out.write_bytes(case.data)
        print(f"wrote {args.out} ({len(case.data)} bytes)")
    if args.send:
        host, port = args.send.rsplit(":", 1)
        print(f"C-STORE to {host}:{port}: {send_raw(case, host, int(port))}")
    return 0


def send_raw(case: Case, host: str, port: int, called_ae: str = "DICOMNODE") -> str:
    """C-STORE one case with its data set bytes as built (pynetdicom does not re-encode a file
    it sends in chunks); the response status, or why there is none."""
    import tempfile

    from pynetdicom import AE, _config

    ae = AE(ae_title="FUZZREPLAY")
    ae.add_requested_context(case.sop_class, case.syntax)
    with tempfile.NamedTemporaryFile(suffix=".dcm") as file:
        file.write(case.data)
        file.flush()
        chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
        try:
            assoc = ae.associate(host, port, ae_title=called_ae)
            if not assoc.is_established:
                return "association refused"
            response = assoc.send_c_store(file.name)
            if assoc.is_established:
                assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = chunked
    return f"0x{int(response.Status):04X}" if "Status" in response else "no response"


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # ``python tests/fuzz.py`` from a checkout
    sys.exit(main())
