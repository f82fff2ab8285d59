"""The listener against real SCUs: dcmtk echoscu/storescu and a pynetdicom SCU (dicomnode.receive).

dcmtk ``storescu`` re-encodes each data set it reads (same elements, possibly different
lengths), so byte-for-byte checks send with pynetdicom's chunked mode instead, which copies the
file's data set bytes onto the wire unchanged.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta, split_dataset
from pynetdicom.dsutils import encode_file_meta as pynetdicom_file_meta

from dicomnode.receive import (
    encode_file_meta,
    read_header,
)
from dicomnode.spool.store import Spool
from dicomnode.types import SeriesKey
from listener import AE_TITLE, DCMTK_ENV, ECHOSCU, Node, echoscu, storescu

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


@pytest.fixture
def node(start_node: Callable[..., Node]) -> Node:
    return start_node()


@pytest.fixture
def ibsi_ct(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "ibsi_sts_001" / "dicom" / "CT" / "image").glob("*.dcm"))
    assert len(files) == 59
    return files


@pytest.fixture
def jpeg2000_ct(shared_data: Path) -> list[Path]:
    folder = shared_data / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"
    return sorted(folder.iterdir())


def send_raw(port: int, *paths: Path, monkeypatch: pytest.MonkeyPatch) -> list[Dataset]:
    """Send files with pynetdicom, data set bytes exactly as in the file; the statuses."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    for path in paths:  # one context per file's SOP class and transfer syntax, as SCUs do
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def data_set_bytes(path: Path) -> tuple[str, bytes]:
    """Transfer syntax and the encoded data set after the File Meta Information."""
    meta, offset = split_dataset(path)
    return str(meta.TransferSyntaxUID), path.read_bytes()[offset:]


def stored_path(node: Node, sop_instance_uid: str) -> Path:
    (path,) = node.spool.root.rglob(f"{sop_instance_uid}.dcm")
    return path


# -- Verification and storage with dcmtk --------------------------------------------------------


def test_echoscu_succeeds(node: Node) -> None:
    done = subprocess.run(
        [str(ECHOSCU), "-aec", AE_TITLE, "127.0.0.1", str(node.port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_storescu_series_is_stored_and_indexed(
    node: Node, ibsi_ct: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    done = storescu(node.port, *ibsi_ct)
    assert done.returncode == 0, done.stderr

    (state,) = node.index.pending_series()
    assert state.instance_count == 59 and len(state.positions) == 59
    assert state.orientation_consistent and not state.multiframe
    paths = node.index.instance_paths(state.key)
    assert len(paths) == 59 and all(p.is_relative_to(node.spool.root) for p in paths)
    for source in ibsi_ct:
        sent = pydicom.dcmread(source)
        kept = pydicom.dcmread(stored_path(node, sent.SOPInstanceUID))
        assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert kept == sent  # every element, pixel data included
    closing = [r.getMessage() for r in caplog.records if r.name == "dicomnode.receive"]
    assert len(closing) == 1 and "'STORESCU'" in closing[0] and "59 stored" in closing[0]
    assert "STS_001" not in caplog.text  # the patient's name and ID are never logged


def test_resent_series_is_idempotent(node: Node, ibsi_ct: list[Path]) -> None:
    assert storescu(node.port, *ibsi_ct).returncode == 0
    (state,) = node.index.pending_series()
    node.index.mark_taken(state.key, state.instance_count)
    assert storescu(node.port, *ibsi_ct).returncode == 0
    assert node.index.pending_series() == []  # no reprocessing for a plain resend
    assert node.index.series_state(state.key).instance_count == 59
    assert len(list(node.spool.root.rglob("*.dcm"))) == 59


def test_jpeg2000_ct_is_stored_unchanged(
    node: Node, jpeg2000_ct: list[Path], tmp_path: Path
) -> None:
    # These real Siemens files carry empty SOP Class/Instance, Study and Series UIDs (only
    # their File Meta has them), so storescu cannot send them as they are: give them UIDs,
    # keeping the encapsulated JPEG 2000 pixel data untouched.
    study, series = generate_uid(), generate_uid()
    fixed = []
    for source in jpeg2000_ct:
        ds = pydicom.dcmread(source)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        fixed.append(tmp_path / source.name)
        ds.save_as(fixed[-1], enforce_file_format=True)
    done = storescu(node.port, "--propose-j2k-lossless", *fixed)  # as a PACS would, no transcoding
    assert done.returncode == 0, done.stderr

    (state,) = node.index.pending_series()
    assert state.instance_count == 20
    for source in jpeg2000_ct:
        original = pydicom.dcmread(source)
        kept = pydicom.dcmread(stored_path(node, original.file_meta.MediaStorageSOPInstanceUID))
        assert kept.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
        assert kept.PixelData == original.PixelData  # the same JPEG 2000 codestreams


def other_object(shared_data: Path) -> Path:
    """A Comprehensive SR (dcmqi's example): neither CT nor a segmentation the node measures."""
    return shared_data / "dcmqi" / "data" / "sr-example" / "sr.dcm"


def test_non_ct_is_refused_under_reject_policy(node: Node, shared_data: Path) -> None:
    done = storescu(node.port, other_object(shared_data))
    assert done.returncode != 0
    assert "No presentation context" in done.stderr
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert node.index.pending_series() == []


def test_non_ct_is_stored_but_not_routed_under_accept_policy(
    start_node: Callable[..., Node], shared_data: Path
) -> None:
    node = start_node(non_ct="accept")
    done = storescu(node.port, other_object(shared_data))
    assert done.returncode == 0, done.stderr
    sent = pydicom.dcmread(other_object(shared_data))
    assert pydicom.dcmread(stored_path(node, sent.SOPInstanceUID)) == sent
    assert node.index.pending_series() == []
    state = node.index.series_state(_key(sent))
    assert state.instance_count == 1 and not state.routable
    assert node.index.instance_paths(state.key) == []


def test_a_radiologists_rtstruct_is_routed_unless_only_the_model_counts(
    start_node: Callable[..., Node], shared_data: Path
) -> None:
    rtstruct = shared_data / "ibsi_sts_001" / "dicom" / "CT" / "mask" / "RS.dcm"
    sent = pydicom.dcmread(rtstruct)
    node = start_node()  # [segmentation] source = "auto"
    done = storescu(node.port, rtstruct)
    assert done.returncode == 0, done.stderr
    state = node.index.series_state(_key(sent))
    assert state.routable and node.index.series_modalities(state.key) == {"RTSTRUCT"}
    model_only = start_node(segmentation_source="model")
    done = storescu(model_only.port, rtstruct)
    assert done.returncode != 0 and "No presentation context" in done.stderr


# -- exact bytes and error statuses, with a pynetdicom SCU --------------------------------------


def test_stored_data_set_is_byte_identical(
    node: Node, ibsi_ct: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    statuses = send_raw(node.port, *ibsi_ct[:5], monkeypatch=monkeypatch)
    assert [s.Status for s in statuses] == [0x0000] * 5
    for source in ibsi_ct[:5]:
        sop = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
        assert data_set_bytes(stored_path(node, sop)) == data_set_bytes(source)


def test_data_set_without_uids_is_refused_and_not_stored(
    node: Node, jpeg2000_ct: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (status,) = send_raw(node.port, jpeg2000_ct[0], monkeypatch=monkeypatch)
    assert status.Status == 0xA900
    assert "SOPInstanceUID" in status.ErrorComment
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert node.index.pending_series() == []


def test_sop_class_that_does_not_match_the_context_is_refused(
    node: Node, ibsi_ct: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = pydicom.dcmread(ibsi_ct[0])
    ds.SOPClassUID = MRImageStorage  # the File Meta (and so the context) still says CT
    ds.save_as(tmp_path / "mr_in_ct.dcm")
    (status,) = send_raw(node.port, tmp_path / "mr_in_ct.dcm", monkeypatch=monkeypatch)
    assert status.Status == 0xA900
    assert list(node.spool.root.rglob("*.dcm")) == []


# The disk fills while the data set arrives (the incoming file), or when it is moved into place.
@pytest.mark.parametrize("failing", ["open_incoming", "adopt"])
def test_disk_error_answers_out_of_resources_and_indexes_nothing(
    start_node: Callable[..., Node], ibsi_ct: list[Path], monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, failing, disk_full)
    node = start_node()
    statuses = send_raw(node.port, *ibsi_ct[:2], monkeypatch=monkeypatch)
    assert [s.Status for s in statuses] == [0xA700, 0xA700]
    assert "No space left on device" in statuses[0].ErrorComment
    assert node.index.pending_series() == []
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert list(node.spool.root.rglob("*.part")) == []


def test_below_the_free_space_watermark_stores_are_refused_until_space_is_freed(
    start_node, ibsi_ct: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The watermark sits 100 MB under today's free space; a 400 MB file pushes the disk
    # below it, deleting the file lifts it again.
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    node = start_node(min_free_mb=free_mb - 100)
    assert [s.Status for s in send_raw(node.port, ibsi_ct[0], monkeypatch=monkeypatch)] == [0]
    ballast = node.spool.root / "ballast"
    with ballast.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, 400 * 2**20)
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        (refused,) = send_raw(node.port, ibsi_ct[1], monkeypatch=monkeypatch)
    assert refused.Status == 0xA700
    assert "disk below node.min_free_mb" in refused.ErrorComment
    assert "disk below node.min_free_mb" in caplog.text
    ballast.unlink()
    assert [s.Status for s in send_raw(node.port, ibsi_ct[1], monkeypatch=monkeypatch)] == [0]
    assert len(node.index.pending_series()) == 1


# -- header reading and File Meta encoding -------------------------------------------------------


def test_file_meta_matches_pynetdicom_byte_for_byte() -> None:
    for sop_class, sop, syntax in [
        (CTImageStorage, "1.2.3.4", ImplicitVRLittleEndian),  # even-length UIDs
        ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.45", "1.2.840.10008.1.2.4.90"),  # odd: padded
    ]:
        expected = (
            b"\x00" * 128
            + b"DICM"
            + pynetdicom_file_meta(
                create_file_meta(
                    sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=syntax
                )
            )
        )
        assert encode_file_meta(sop_class, sop, syntax) == expected


def test_header_agrees_with_pydicom_on_real_files(shared_data: Path) -> None:
    checked = 0
    for path in sorted(shared_data.rglob("*.dcm")):
        try:
            syntax, body = data_set_bytes(path)
        except Exception:  # not a Part 10 file
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        header = read_header(body, syntax)
        assert header.sop_instance_uid == ds.get("SOPInstanceUID", "")
        assert header.series_uid == ds.get("SeriesInstanceUID", "")
        assert header.modality == ds.get("Modality", "")
        assert header.rows == ds.get("Rows") and header.cols == ds.get("Columns")
        if "ImagePositionPatient" in ds:
            assert header.position == pytest.approx(tuple(ds.ImagePositionPatient))
        checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_header_in_every_uncompressed_encoding(syntax: str) -> None:
    ds = _slice_with_nested_sequences()
    header = read_header(_encode(ds, syntax), syntax)
    assert (
        header.sop_instance_uid == ds.SOPInstanceUID and header.series_uid == ds.SeriesInstanceUID
    )
    assert header.position == (-250.0, -250.0, 12.5) and header.rows == 512 and header.cols == 256
    assert header.instance_number == 7 and header.frames == 1
    assert header.position_along_normal == pytest.approx(12.5)


def test_header_of_an_implicitly_encoded_data_set_sent_as_explicit() -> None:
    """pydicom's lenient reader takes over where the element walk gives up."""
    ds = _slice_with_nested_sequences()
    header = read_header(_encode(ds, ImplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert header.sop_instance_uid == ds.SOPInstanceUID and header.rows == 512


def _key(ds: Dataset) -> SeriesKey:
    return SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID)


def _slice_with_nested_sequences() -> Dataset:
    """A CT header with undefined-length sequences nested before the wanted elements."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    item.PurposeOfReferenceCodeSequence = [inner]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.Modality = "CT"
    ds.ReferencedImageSequence = [item, item]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.InstanceNumber = 7
    ds.ImagePositionPatient = [-250, -250, 12.5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.Rows, ds.Columns = 512, 256
    ds.PixelData = b"\x00\x01" * 16
    ds["PixelData"].VR = "OW"
    ds["ReferencedImageSequence"].is_undefined_length = True
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    return ds


def _encode(ds: Dataset, syntax: str) -> bytes:
    """The data set encoded in ``syntax`` (deflated after encoding, PS3.5 A.5)."""
    buffer = DicomBytesIO()
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(buffer, ds)
    encoded = buffer.getvalue()
    delimiter = b"\xfe\xff\xdd\xe0" if buffer.is_little_endian else b"\xff\xfe\xe0\xdd"
    assert encoded.count(delimiter) == 3  # outer sequence, and the inner one in both items
    if syntax != DeflatedExplicitVRLittleEndian:
        return encoded
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(encoded) + compressor.flush()


# -- AE title policy ---------------------------------------------------------------------------


def test_a_wrong_called_ae_title_is_rejected_with_reason_7(node: Node) -> None:
    done = echoscu(node.port, "-aec", "NOT-THE-NODE")
    assert done.returncode != 0
    assert "Called AE Title Not Recognized" in done.stdout + done.stderr
    assert echoscu(node.port, "-aec", AE_TITLE).returncode == 0


def test_only_whitelisted_calling_ae_titles_may_associate(start_node) -> None:
    node = start_node(allowed_calling_aes=("CT-SCANNER-1", "PACS"))
    refused = echoscu(node.port, "-aet", "INTRUDER", "-aec", AE_TITLE)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(node.port, "-aet", "PACS", "-aec", AE_TITLE).returncode == 0


def test_called_ae_check_can_be_switched_off(start_node) -> None:
    node = start_node(require_called_ae=False)
    assert echoscu(node.port, "-aec", "ANY-SCP").returncode == 0

