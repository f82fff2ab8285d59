"""The bad-input corpus: odd, broken and hostile input sent to the real node.

One node process (``python -m dicomnode serve``) delivers to a real Orthanc by STOW-RS. Each
case builds its files here (from a small phantom, then damaged with pydicom, by byte surgery,
or transcoded with dcmtk), sends them with pynetdicom (file bytes sent exactly as written, so a
broken file reaches the node broken), and checks the outcome documented in
``docs/bad-input.md``:

- the DIMSE status of every C-STORE (or that the SCU could not even send, when the node
  rejects the presentation context during association negotiation);
- the job(s) the node made for the case's series: delivered (and the SR is in Orthanc) or
  failed with the reason; or no job at all;
- a line in the node's log.

Across all cases: every instance the node acknowledged is in its index (nothing silently
dropped), the node answers C-ECHO after every case, and it still processes a clean series at
the end. The documentation's table and the cases here are checked against each other.
"""

from __future__ import annotations

import copy
import functools
import re
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicomfiles import enhanced_ct
from dicomnode.phantom import make_phantom_study
from dicomnode.receive import encode_file_meta
from listener import AE_TITLE, ECHOSCU, echoscu
from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "bad-input.md"
NO_CONTEXT = "no presentation context"  # the SCU could not send: the node rejected the context
ABORTED = "aborted by the sender"
SLICES = 12
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"  # a transfer syntax the node does not negotiate


# ------------------------------------------------------------------------------ building cases
def phantom_series(seed: int, slices: int = SLICES, *, shape: tuple[int, int] = (48, 48),
                   spacing: tuple[float, float, float] = (2.5, 3.0, 3.0),
                   patient_id: str | None = None, study_uid: str | None = None) -> list[Dataset]:
    """Fresh copies of a small phantom's slices; each seed is its own study and series."""
    phantom = make_phantom_study(
        seed, shape=(slices, *shape), spacing=spacing, n_lesions=1,
        patient_id=patient_id or f"BAD-{seed}", study_uid=study_uid,
    )
    return [copy.deepcopy(ds) for ds in phantom.datasets]


def save(folder: Path, datasets: list[Dataset], prefix: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(datasets):
        path = folder / f"{prefix}{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def save_raw(path: Path, ds: Dataset, *, meta_syntax: str, implicit: bool,
             meta_uid: str | None = None) -> Path:
    """File Meta announcing ``meta_syntax`` (and ``meta_uid`` as the instance, if given) in
    front of ``ds`` encoded as ``implicit`` says."""
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    pydicom.filewriter.write_dataset(body, ds)
    meta = ds.file_meta  # the data set itself may have lost its UIDs
    path.write_bytes(encode_file_meta(meta.MediaStorageSOPClassUID,
                                      meta_uid or meta.MediaStorageSOPInstanceUID, meta_syntax)
                     + body.getvalue())
    return path


def pixel_data_offset(data: bytes) -> int:
    """Offset of the top-level (7FE0,0010) element in an Explicit VR Little Endian file."""
    return data.rindex(b"\xe0\x7f\x10\x00OW")


def dcmtk(tool: str, *args: str) -> None:
    run = subprocess.run([f"/usr/bin/{tool}", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{tool}: {run.stderr}"


def transcoded(folder: Path, seed: int, tool: str, *options: str) -> list[Path]:
    """A phantom series transcoded by a dcmtk tool (dcmconv, dcmcrle, dcmcjpeg)."""
    out = []
    for path in save(folder / "plain", phantom_series(seed)):
        target = folder / path.name
        dcmtk(tool, *options, str(path), str(target))
        out.append(target)
    return out


@dataclass
class Send:
    """One association: files sent in order; ``abort_during`` cuts the last one short."""

    files: list[Path]
    abort_during_last: bool = False


@dataclass(frozen=True)
class Case:
    """One corpus entry; ``job`` lists the expected final job states (sorted), ``()`` for none."""

    name: str
    build: Callable[[Path, int], list[Send]]
    statuses: dict[int | str, int]
    job: tuple[str, ...] = ()
    reason: str = ""  # in a failed job's reason, or in a delivered job's warnings
    log: str = ""  # in a line of the node's log about the case


def one(folder: Path, datasets: list[Dataset]) -> list[Send]:
    return [Send(save(folder, datasets))]


def damaged_slice(seed: int, damage: Callable[[Dataset], None], index: int = 5) -> list[Dataset]:
    datasets = phantom_series(seed)
    damage(datasets[index])
    return datasets


def byte_surgery(folder: Path, seed: int, surgery: Callable[[bytes], bytes],
                 index: int = 5) -> list[Send]:
    paths = save(folder, phantom_series(seed))
    paths[index].write_bytes(surgery(paths[index].read_bytes()))
    return [Send(paths)]


def lone(folder: Path, seed: int, change: Callable[[Dataset], None]) -> list[Send]:
    """A single instance (its own series), changed by ``change`` and written as is."""
    ds = phantom_series(seed, 1)[0]
    change(ds)
    return [Send([save_raw(folder / "lone.dcm", ds, meta_syntax=ExplicitVRLittleEndian,
                           implicit=False)])]


def affected_uid_differs(folder: Path, seed: int) -> list[Send]:
    """The C-STORE request names another SOP Instance UID than the data set holds."""
    ds = phantom_series(seed, 1)[0]
    return [Send([save_raw(folder / "lone.dcm", ds, meta_syntax=ExplicitVRLittleEndian,
                           implicit=False, meta_uid=generate_uid())])]


def _padded_uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def set_attr(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def delete(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def rgb(ds: Dataset) -> None:
    grey = ds.pixel_array.astype(np.uint16)
    ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0


def build_enhanced(folder: Path, seed: int) -> list[Send]:
    phantom = make_phantom_study(seed, shape=(SLICES, 48, 48), spacing=(2.5, 3.0, 3.0),
                                 n_lesions=1, patient_id=f"BAD-{seed}")
    ds = enhanced_ct(phantom, np.arange(SLICES)[::-1])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    return one(folder, [ds])


def build_duplicate_position(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    datasets[6].ImagePositionPatient = datasets[5].ImagePositionPatient
    return one(folder, datasets)


def build_missing_type_2(folder: Path, seed: int) -> list[Send]:
    """Type 2 patient and study attributes dropped altogether, as some anonymisers do."""
    datasets = phantom_series(seed)
    for ds in datasets:
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "AccessionNumber", "StudyID", "ReferringPhysicianName"):
            if keyword in ds:
                delattr(ds, keyword)
    return one(folder, datasets)


def build_localizer(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed, 3)
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return one(folder, datasets)


def build_tilt(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    for k, ds in enumerate(datasets):  # positions step along y as well: a 15-degree tilt
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + k * 2.5 * np.tan(np.radians(15)), z]
    return one(folder, datasets)


def build_variable_spacing(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    z0 = float(datasets[0].ImagePositionPatient[2])
    steps = [0, 2.5, 5, 7.5, 10, 11.25, 12.5, 13.75, 15, 17.5, 20, 22.5]  # 2.5 mm, then 1.25 mm
    for ds, step in zip(datasets, steps):
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z0 + step]
    return one(folder, datasets)


def build_gap(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    return one(folder, datasets[:5] + datasets[6:])


def build_replaced(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    first = save(folder, datasets)
    changed = copy.deepcopy(datasets[4])
    changed.PixelData = (changed.pixel_array + 7).astype(changed.pixel_array.dtype).tobytes()
    again = save(folder, [changed], prefix="again-")
    return [Send(first), Send(again)]


def build_interleaved(folder: Path, seed: int) -> list[Send]:
    a, b = phantom_series(seed), phantom_series(seed + 1, patient_id=f"BAD-{seed}",
                                                  study_uid=None)
    for ds in b:  # same patient and study, another series
        ds.StudyInstanceUID = a[0].StudyInstanceUID
    mixed = [ds for pair in zip(a, b) for ds in pair]
    return one(folder, mixed)


def build_two_patients(folder: Path, seed: int) -> list[Send]:
    return one(folder, phantom_series(seed) + phantom_series(seed + 1))


def build_long_series(folder: Path, seed: int) -> list[Send]:
    return one(folder, phantom_series(seed, 400, shape=(24, 24), spacing=(0.6, 6.0, 6.0)))


def build_private_tags(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    rng = np.random.default_rng(seed)
    for ds in datasets:
        block = ds.private_block(0x0029, "BAD INPUT CORPUS", create=True)
        for element in range(0x00, 0xF0):
            block.add_new(element, "LO", f"private value {element}")
        block.add_new(0xF0, "OB", rng.bytes(1 << 20))  # 1 MB of vendor data
        inner = Dataset()
        inner.add_new(0x00291010, "LO", "BAD INPUT CORPUS")
        inner.add_new(0x00291011, "SQ", Sequence([Dataset() for _ in range(3)]))
        block.add_new(0xF1, "SQ", Sequence([inner]))
    return one(folder, datasets)


def build_private_un_sequence(folder: Path, seed: int) -> list[Send]:
    """A private sequence sent as VR UN of undefined length, as some routers forward them."""
    datasets = phantom_series(seed)
    for ds in datasets:
        ds.add(DataElement(0x00090010, "LO", "ROUTER"))
        inner = Dataset()
        inner.add_new(0x00091001, "LO", "nested")
        ds.add(DataElement(0x00091002, "SQ", Sequence([inner])))
    paths = save(folder, datasets)
    for path in paths:
        data = path.read_bytes()
        tag = b"\x09\x00\x02\x10SQ"
        at = data.index(tag)
        # Explicit VR SQ and UN share the 4-byte length layout; with undefined length, UN's
        # content is implicit VR little endian, which pydicom wrote (PS3.5 6.2.2).
        data = data[:at] + b"\x09\x00\x02\x10UN" + data[at + 6:]
        path.write_bytes(data)
    return [Send(paths)]


def build_aborted(folder: Path, seed: int) -> list[Send]:
    datasets = phantom_series(seed)
    # The last slice carries 256 KB of padding so it spans many PDUs (the node's max_pdu is set).
    datasets[-1].add_new(0x00091000, "OB", bytes(256 * 1024))
    datasets[-1].add_new(0x00090010, "LO", "PADDING")
    return [Send(save(folder, datasets), abort_during_last=True)]


def build_implicit_in_explicit(folder: Path, seed: int) -> list[Send]:
    return [Send([save_raw(folder / f"{k:04d}.dcm", ds, meta_syntax=ExplicitVRLittleEndian,
                           implicit=True) for k, ds in enumerate(phantom_series(seed))])]


def unknown_vr(data: bytes) -> bytes:
    tag = b"\x08\x00\x30\x10LO"  # StudyDescription
    at = data.index(tag)
    return data[:at] + b"\x08\x00\x30\x10ZZ" + data[at + 6:]


def wrong_vr_instance_number(ds: Dataset) -> None:
    del ds.InstanceNumber
    ds.add(DataElement(0x00200013, "UL", 6))  # IS by the dictionary, sent as a binary UL


def truncate_in_header(data: bytes) -> bytes:
    return data[: data.index(b"\x20\x00\x32\x00DS") + 10]  # cut inside ImagePositionPatient


def truncate_in_pixels(data: bytes) -> bytes:
    return data[: pixel_data_offset(data) + 12 + 1000]


def odd_length_value(data: bytes) -> bytes:
    """StudyDescription "ODD" with its odd length kept (PS3.5 7.1.1 requires even)."""
    tag = b"\x08\x00\x30\x10LO"
    at = data.index(tag)
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[:at] + tag + (3).to_bytes(2, "little") + b"ODD" + data[at + 8 + length:]


def huge_matrix(ds: Dataset) -> None:
    ds.Rows, ds.Columns = 65535, 65535  # 8 GB of pixels claimed, 4.6 KB sent


def non_ct_sop_class(ds: Dataset) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"


def build_unsupported_syntax(folder: Path, seed: int) -> list[Send]:
    ds = phantom_series(seed, 1)[0]  # the pixels are not really HTJ2K: the node never sees them
    return [Send([save_raw(folder / "lone.dcm", ds, meta_syntax=HTJ2K_LOSSLESS, implicit=False)])]


def build_sop_class_mismatch(folder: Path, seed: int) -> list[Send]:
    ds = phantom_series(seed, 1)[0]
    path = save_raw(folder / "lone.dcm", ds, meta_syntax=ExplicitVRLittleEndian, implicit=False)
    data = path.read_bytes()  # the data set says MR; the file meta (and so the context) says CT
    body_at = data.index(b"\x08\x00\x16\x00UI")
    body = data[body_at:].replace(_padded_uid(CTImageStorage), _padded_uid(MRImageStorage), 1)
    path.write_bytes(data[:body_at] + body)
    return [Send([path])]


OK = 0x0000
A700, A900, C000 = 0xA700, 0xA900, 0xC000

CASES: list[Case] = [
    # -- broken files
    Case("truncated-in-header", lambda f, s: byte_surgery(f, s, truncate_in_header),
         {OK: 11, C000: 1}, ("delivered",), "", "with 0xC000: unreadable data set"),
    Case("truncated-in-pixel-data", lambda f, s: byte_surgery(f, s, truncate_in_pixels),
         {OK: 12}, ("failed",), "pixel data is 1000 bytes", "pixel data is 1000 bytes"),
    Case("missing-pixel-data", lambda f, s: one(f, damaged_slice(s, delete("PixelData"))),
         {OK: 12}, ("failed",), "has no pixel data", "has no pixel data"),
    Case("pixel-data-too-short",
         lambda f, s: one(f, damaged_slice(s, lambda ds: setattr(ds, "PixelData", ds.PixelData[:-512]))),
         {OK: 12}, ("failed",), "pixel data is 4096 bytes", "pixel data is 4096 bytes"),
    Case("pixel-data-too-long",
         lambda f, s: one(f, damaged_slice(s, lambda ds: setattr(ds, "PixelData", ds.PixelData + bytes(512)))),
         {OK: 12}, ("failed",), "pixel data is 5120 bytes", "pixel data is 5120 bytes"),
    Case("matrix-claims-8-GB", lambda f, s: one(f, damaged_slice(s, huge_matrix)),
         {OK: 12}, ("failed",), "more than jobs.max_voxels", "series too large"),
    Case("empty-data-set", lambda f, s: lone(f, s, lambda ds: [delattr(ds, k) for k in list(ds.dir())]),
         {A900: 1}, (), "", "with 0xA900: data set has no SOPInstanceUID"),
    # -- encoding
    Case("wrong-vr", lambda f, s: one(f, damaged_slice(s, wrong_vr_instance_number)),
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("unknown-vr", lambda f, s: byte_surgery(f, s, unknown_vr),
         {OK: 12}, ("failed",), "Unknown Value Representation '...' in tag (0008,1030)",
         "cannot be read"),
    Case("odd-length-value", lambda f, s: byte_surgery(f, s, odd_length_value),
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("implicit-vr-sent-as-explicit", build_implicit_in_explicit,
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("private-sequence-as-un", build_private_un_sequence,
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("heavy-private-tags", build_private_tags, {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("unsupported-transfer-syntax", build_unsupported_syntax,
         {NO_CONTEXT: 1}, (), "", "0 stored (0 duplicate, 0 replaced), 0 refused; 1 presentation context(s) rejected"),
    Case("deflated", lambda f, s: [Send(transcoded(f, s, "dcmconv", "+td"))],
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("big-endian", lambda f, s: [Send(transcoded(f, s, "dcmconv", "+tb"))],
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("rle-lossless", lambda f, s: [Send(transcoded(f, s, "dcmcrle"))],
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("jpeg-lossless", lambda f, s: [Send(transcoded(f, s, "dcmcjpeg", "+e1"))],
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    # -- identity
    Case("missing-sop-instance-uid", lambda f, s: lone(f, s, delete("SOPInstanceUID")),
         {A900: 1}, (), "", "data set has no SOPInstanceUID"),
    Case("uid-with-letters", lambda f, s: lone(f, s, set_attr("SeriesInstanceUID", "1.2.abc")),
         {A900: 1}, (), "", "SeriesInstanceUID"),
    Case("uid-path-traversal", lambda f, s: lone(f, s, set_attr("SeriesInstanceUID", "../../../etc")),
         {A900: 1}, (), "", "SeriesInstanceUID"),
    Case("affected-uid-differs", affected_uid_differs,
         {A900: 1}, (), "", "SOPInstanceUID differs from Affected SOP Instance UID"),
    Case("sop-class-differs-from-context", build_sop_class_mismatch,
         {A900: 1}, (), "", "does not match the context"),
    Case("duplicate-uid-different-content", build_replaced,
         {OK: 13}, ("delivered",), "", "replaced by a copy with different content"),
    # -- not a CT volume
    Case("non-ct-sop-class", lambda f, s: lone(f, s, non_ct_sop_class),
         {NO_CONTEXT: 1}, (), "", "0 stored (0 duplicate, 0 replaced), 0 refused; 1 presentation context(s) rejected"),
    Case("non-ct-modality", lambda f, s: one(f, [_modality(ds, "MR") for ds in phantom_series(s)]),
         {OK: 12}, ("failed",), "modality is MR, not CT", "not CT"),
    Case("rgb-ct", lambda f, s: one(f, damaged_slice(s, rgb)),
         {OK: 12}, ("failed",), "colour image", "colour image"),
    Case("multi-frame-enhanced-ct", build_enhanced, {OK: 1}, ("delivered",), "", "delivered to orthanc"),
    Case("missing-pixel-spacing", lambda f, s: one(f, damaged_slice(s, delete("PixelSpacing"))),
         {OK: 12}, ("failed",), "PixelSpacing is missing", "PixelSpacing is missing"),
    Case("degenerate-orientation",
         lambda f, s: one(f, damaged_slice(s, set_attr("ImageOrientationPatient", [0] * 6))),
         {OK: 12}, ("failed",), "not two orthogonal unit vectors", "not two orthogonal unit"),
    Case("two-slices-one-position", build_duplicate_position,
         {OK: 12}, ("failed",), "duplicate slice positions", "duplicate slice positions"),
    Case("missing-type-2-attributes", build_missing_type_2,
         {OK: 12}, ("delivered",), "", "delivered to orthanc"),
    Case("localizer", build_localizer, {OK: 3}, ("failed",), "localizer", "localizer"),
    Case("one-slice-series", lambda f, s: one(f, phantom_series(s, 1)),
         {OK: 1}, ("failed",), "single slice", "single slice"),
    Case("gantry-tilt", build_tilt, {OK: 12}, ("failed",), "gantry tilt", "gantry tilt"),
    Case("variable-slice-spacing", build_variable_spacing,
         {OK: 12}, ("failed",), "irregular slice spacing", "irregular slice spacing"),
    Case("missing-slice", build_gap, {OK: 11}, ("delivered",), "gap", "gap"),
    # -- how it arrives
    Case("two-series-interleaved", build_interleaved,
         {OK: 24}, ("delivered", "delivered"), "", "delivered to orthanc"),
    Case("two-patients-one-association", build_two_patients,
         {OK: 24}, ("delivered", "delivered"), "", "delivered to orthanc"),
    Case("long-series-small-slices", build_long_series,
         {OK: 400}, ("delivered",), "", "delivered to orthanc"),
    Case("aborted-mid-transfer", build_aborted,
         {OK: 11, ABORTED: 1}, ("delivered",), "", "aborted after"),
]


def _modality(ds: Dataset, modality: str) -> Dataset:
    ds.Modality = modality
    return ds


# ------------------------------------------------------------------------------ sending
class AbortingSocket:
    """Wraps pynetdicom's association socket: once armed, sends an A-ABORT after two P-DATA PDUs."""

    def __init__(self, assoc_socket) -> None:
        self.inner = assoc_socket
        self.original_send = assoc_socket.send
        self.armed = False
        self.aborted = False
        self.pdus = 0
        assoc_socket.send = self.send

    def send(self, bytestream: bytes) -> None:
        if self.aborted:
            return  # the connection is gone; pynetdicom's later PDUs go nowhere
        if self.armed and bytestream[:1] == b"\x04":  # P-DATA-TF
            self.pdus += 1
            if self.pdus > 2:
                raw = self.inner.socket
                # A-ABORT (PS3.8 9.3.8): type 7, length 4, source 0 (service user), reason 0.
                raw.sendall(b"\x07\x00" + (4).to_bytes(4, "big") + b"\x00\x00\x00\x00")
                time.sleep(0.5)  # let the node read the A-ABORT before the connection goes
                raw.shutdown(socket.SHUT_RDWR)
                self.aborted = True
                return
        self.original_send(bytestream)


def send(port: int, association: Send, calling_ae: str) -> list[tuple[Path, int | str]]:
    """C-STORE every file of one association: (file, status or NO_CONTEXT or ABORTED)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)  # keeps the association up if all else is rejected
    for sop_class, syntax in sorted({meta_uids(path)[::2] for path in association.files}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "the node refused the association"
    aborter = AbortingSocket(assoc.dul.socket) if association.abort_during_last else None
    results: list[tuple[Path, int | str]] = []
    for k, path in enumerate(association.files):
        if aborter is not None and k == len(association.files) - 1:
            aborter.armed = True
            assoc.dimse_timeout = 2  # no answer will come
            try:
                assoc.send_c_store(path)
            except Exception:  # the abort surfaces in pynetdicom in more than one way
                pass
            return results + [(path, ABORTED)]
        try:
            status = assoc.send_c_store(path)
        except ValueError:  # pynetdicom found no accepted presentation context for the file
            results.append((path, NO_CONTEXT))
            continue
        results.append((path, int(status.Status) if "Status" in status else "no response"))
    assoc.release()
    return results


@functools.cache  # asked again for every file by the checks after sending
def meta_uids(path: Path) -> tuple[str, str, str]:
    """(SOP class, SOP instance, transfer syntax) from a file's File Meta Information."""
    meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
    return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID))


def echo_ok(port: int) -> bool:
    return echoscu(port, "-aec", AE_TITLE).returncode == 0


def series_uid(path: Path) -> str | None:
    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SeriesInstanceUID)
    except Exception:
        return None  # too broken to read back here: the case's statuses say what happened


@dataclass
class Ran:
    """What happened to one case."""

    case: Case
    calling_ae: str
    results: list[tuple[Path, int | str]]
    series: set[str]
    jobs: list[tuple[str, str, str, str]] = field(default_factory=list)  # id, state, reason, warnings

    def log_lines(self, log: str) -> list[str]:
        """The node's log lines about this case: its association(s), instances and jobs."""
        keys = [f"from {self.calling_ae!r}", *(job_id for job_id, *_ in self.jobs),
                *(meta_uids(path)[1] for path, _ in self.results)]
        return [line for line in log.splitlines() if any(key in line for key in keys)]


# ------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def node_and_pacs(tmp_path_factory):
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    if not ECHOSCU.exists():
        pytest.skip("dcmtk is not installed")
    work = tmp_path_factory.mktemp("bad-input")
    pacs = Orthanc(work / "orthanc").start()
    port = free_port()
    config = write_config(
        work / "node.toml", port=port, data_dir=work / "node",
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
        node={"max_pdu": 16384},
        completion={"quiet_seconds": 2, "gap_timeout_seconds": 4},
    )
    node = NodeProcess(config, port, work / "node.log").start()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send file bytes as written, broken or not
    yield node, pacs, work
    _config.STORE_SEND_CHUNKED_DATASET = False
    node.stop()
    pacs.stop()


def test_every_case_in_the_corpus_is_documented():
    documented = set(re.findall(r"^\| `([A-Za-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), re.M))
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 25
    assert documented == set(names)


def test_bad_input_corpus(node_and_pacs, tmp_path):
    node, pacs, work = node_and_pacs
    runs = []
    for number, case in enumerate(CASES):
        folder = tmp_path / case.name
        folder.mkdir()
        sends = case.build(folder, 200000 + 10 * number)
        calling_ae = f"CORPUS{number:02d}"
        results = [r for association in sends for r in send(node.port, association, calling_ae)]
        series = {uid for path, _ in results if (uid := series_uid(path))}
        runs.append(Ran(case, calling_ae, results, series))
        assert echo_ok(node.port), f"the node stopped answering C-ECHO after {case.name}"

    def read_jobs(run: Ran) -> list[tuple[str, str, str, str]]:
        marks = ",".join("?" * len(run.series))
        return query(work / "node" / "jobs.sqlite",
                     f"SELECT id, state, reason, warnings FROM jobs WHERE series_uid IN ({marks})",
                     tuple(run.series))

    def settled() -> bool:
        for run in runs:
            run.jobs = read_jobs(run)
            states = [state for _, state, _, _ in run.jobs]
            if len(states) < len(run.case.job) or not set(states) <= {"delivered", "failed"}:
                return False
        return True

    wait_until(settled, 600, "every case's jobs to end", node, poll=1.0)
    log = node.log_path.read_text(errors="replace")
    indexed = {uid for (uid,) in query(work / "node" / "index.sqlite",
                                       "SELECT sop_instance_uid FROM instances")}
    problems = []
    for run in runs:
        case = run.case
        statuses = dict(Counter(status for _, status in run.results))
        if statuses != case.statuses:
            problems.append(f"{case.name}: statuses {statuses}, documented {case.statuses}")
        states = tuple(sorted(state for _, state, _, _ in run.jobs))
        if states != case.job:
            problems.append(f"{case.name}: jobs {run.jobs}, documented {case.job}")
        if case.reason and not any(case.reason in reason + warnings
                                   for _, _, reason, warnings in run.jobs):
            problems.append(f"{case.name}: no job reason or warning with {case.reason!r}: {run.jobs}")
        if not any(case.log in line for line in run.log_lines(log)):
            problems.append(f"{case.name}: no log line about the case with {case.log!r}")
        lost = [path.name for path, status in run.results
                if status == OK and meta_uids(path)[1] not in indexed]
        if lost:
            problems.append(f"{case.name}: acknowledged but not indexed: {lost}")
    phi = [value for value in ("Phantom^Demo", "BAD-2", "19600101") if value in log]
    if phi:  # patient name, IDs (BAD-<seed>) and birth date never reach the log
        problems.append(f"patient data in the node's log: {phi}")
    delivered = sum(state == "delivered" for run in runs for _, state, _, _ in run.jobs)
    srs = requests.post(f"{pacs.http_url}/tools/find", auth=pacs.auth, timeout=30,
                        json={"Level": "Instance", "Query": {"Modality": "SR"}}).json()
    if len(srs) != delivered:
        problems.append(f"{delivered} jobs delivered, {len(srs)} SRs in Orthanc")
    print(f"\nbad-input corpus: {len(runs)} cases, "
          f"{sum(len(r.results) for r in runs)} instances sent, {delivered} jobs delivered, "
          f"{sum(s == 'failed' for r in runs for _, s, _, _ in r.jobs)} failed with a reason")
    assert not problems, "\n".join(problems)
