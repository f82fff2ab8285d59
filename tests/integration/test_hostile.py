"""Hostile and broken peers against the real node (``dicomnode serve`` in its own process).

Stalled sockets must not lock a well-behaved sender out, a stalled PDU inside an association
must end it, SIGTERM must stop the node whatever the peers do, and instances of any size,
deflate bombs included, must cost the node bounded memory (issue 12, points 1, 2 and 5).
The node's memory is read from ``/proc/<pid>/status`` while the peer sends.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset

from listener import ECHOSCU, STORESCU
from nodeproc import NodeProcess, query, wait_until, write_config
from orthanc import free_port

MB = 2**20
#: Issue 12: the node's peak RSS while receiving stays within this much of its idle RSS.
RSS_BUDGET_MB = 200


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``dicomnode serve`` with ``[node]`` overrides; stopped after the test."""
    nodes: list[NodeProcess] = []

    def run(**node: object) -> NodeProcess:
        port = free_port()
        config = write_config(
            tmp_path / "node.toml", port=port, data_dir=tmp_path / "node",
            destinations=[{"kind": "folder", "path": str(tmp_path / "results")}],
            node=node, completion={"quiet_seconds": 1},
        )
        started = NodeProcess(config, port, tmp_path / "node.log").start()
        nodes.append(started)
        return started

    yield run
    for node in nodes:
        node.stop()


@pytest.fixture
def ct_series(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "ibsi_sts_001" / "dicom" / "CT" / "image").glob("*.dcm"))
    assert len(files) >= 12
    return files[:12]


def stall(port: int, count: int, first_bytes: bytes) -> list[socket.socket]:
    """``count`` connections that each send ``first_bytes`` and then nothing."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(first_bytes)
        sockets.append(s)
    return sockets


#: The first 6 bytes of an A-ASSOCIATE-RQ announcing 200 bytes that never come.
HALF_ASSOCIATE_RQ = struct.pack(">BBL", 0x01, 0, 200)


def instances_indexed(node: NodeProcess) -> int:
    data_dir = node.config.parent / "node"
    return query(data_dir / "index.sqlite", "SELECT COUNT(*) FROM instances")[0][0]


def test_fifty_stalled_sockets_do_not_keep_a_whitelisted_sender_out(
    start: Callable[..., NodeProcess], ct_series: list[Path]
) -> None:
    node = start(allowed_calling_aes=["GOOD"])
    stalled = stall(node.port, 40, HALF_ASSOCIATE_RQ) + stall(node.port, 10, b"")
    try:
        time.sleep(0.5)
        started = time.monotonic()
        sent = subprocess.run(
            [str(STORESCU), "-aet", "GOOD", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
             *map(str, ct_series)], capture_output=True, text=True, timeout=60,
        )
        seconds = time.monotonic() - started
        print(f"whitelisted storescu beside 50 stalled sockets: {seconds:.2f} s")
        assert sent.returncode == 0, sent.stderr
        assert seconds < 5, f"the well-behaved sender needed {seconds:.1f} s"
        assert instances_indexed(node) == len(ct_series)
        log = node.log_path.read_text()
        assert "(node.max_pending_per_host); the oldest closed" in log
    finally:
        for s in stalled:
            s.close()


def test_sigterm_stops_the_node_within_seconds_while_peers_stall(
    start: Callable[..., NodeProcess],
) -> None:
    node = start()
    stalled = stall(node.port, 5, HALF_ASSOCIATE_RQ)
    inside = AE(ae_title="STALLER")
    inside.add_requested_context(CTImageStorage)
    assoc = inside.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 5000))  # a P-DATA-TF's start
    try:
        time.sleep(0.5)
        process = node.process
        assert process is not None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        print(f"SIGTERM with stalled peers: exit after {time.monotonic() - started:.2f} s")
        assert time.monotonic() - started < 10
        assert process.returncode == 0
    finally:
        assoc.abort()
        for s in stalled:
            s.close()


def test_a_pdu_that_stalls_inside_an_association_ends_it_and_says_why(
    start: Callable[..., NodeProcess],
) -> None:
    node = start(pdu_seconds=2)
    ae = AE(ae_title="STALLER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 5000))
    raw.settimeout(10)
    started = time.monotonic()
    assert raw.recv(1) == b""  # the node closed the connection
    assert 1.5 < time.monotonic() - started < 6
    assoc.abort()
    wait_until(lambda: "PDU not complete in time (node.pdu_seconds)" in node.log_path.read_text(),
               5, "the closing line", node)


def test_associations_over_the_per_host_budget_are_refused_with_one_line(
    start: Callable[..., NodeProcess],
) -> None:
    node = start(max_associations=4, max_associations_per_host=2)
    ae = AE(ae_title="MANY")
    ae.add_requested_context(CTImageStorage)
    held = [ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.result_source,
                third.acceptor.primitive.diagnostic) == (2, 3, 2)  # transient, local limit
    finally:
        for a in held:
            a.release()
    log = node.log_path.read_text()
    assert "association from 'MANY'" in log
    assert "2 associations from 127.0.0.1 (node.max_associations_per_host)" in log
    # Once the two are released, the host may associate again.
    again = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert again.is_established
    again.release()


@pytest.mark.parametrize("called, expected", [
    ("SOMEONE", "refused: called AE title 'SOMEONE' is not 'DICOMNODE'"),
    ("SOME\nFORGED", "refused: called AE title 'SOME\\nFORGED' is not a valid AE title"),
])
def test_a_wrong_called_ae_title_is_refused_with_one_line_and_no_traceback(
    start: Callable[..., NodeProcess], called: str, expected: str
) -> None:
    node = start()
    echo = subprocess.run([str(ECHOSCU), "-aet", "ME", "-aec", called, "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode != 0
    wait_until(lambda: expected in node.log_path.read_text(), 5, "the refusal line", node)
    log = node.log_path.read_text()
    assert "Traceback" not in log
    assert not any(line.startswith("FORGED") for line in log.splitlines())


# -- memory ---------------------------------------------------------------------------------
def write_instance(path: Path, sop_class: str, pixel_bytes: int, *, deflated: bool) -> Path:
    """A Part 10 file whose Pixel Data (OB) holds ``pixel_bytes`` zeros, written in chunks so
    that the test itself never holds it; deflated, it is a bomb (about 1000:1)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT" if sop_class == CTImageStorage else "OT"
    ds.Rows, ds.Columns = 512, 512
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    with path.open("wb") as f:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS) if deflated else None
        for piece in _pieces(body.getvalue() + pixel_header, pixel_bytes):
            f.write(compressor.compress(piece) if compressor else piece)
        if compressor:
            f.write(compressor.flush())
    return path


def _pieces(head: bytes, zeros: int) -> Iterator[bytes]:
    yield head
    chunk = bytes(16 * MB)
    for start in range(0, zeros, len(chunk)):
        yield chunk[: min(len(chunk), zeros - start)]


class PeakRss:
    """The largest VmRSS of a process, sampled every 10 ms while in the ``with`` block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, self.rss_mb())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def send_files(port: int, files: list[Path], contexts: list[tuple[str, str]]) -> list[int]:
    """C-STORE each file as it is on disk (pynetdicom streams it, never re-encodes)."""
    ae = AE(ae_title="BIG")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", max_pdu=0)
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(f).Status) for f in files]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def idle_rss(node: NodeProcess) -> float:
    assert subprocess.run([str(ECHOSCU), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                          timeout=30).returncode == 0
    time.sleep(1)
    return PeakRss(node.process.pid).rss_mb()  # type: ignore[union-attr]


def test_a_512_mb_instance_is_refused_by_default_and_stored_when_allowed_in_bounded_memory(
    start: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    big = write_instance(tmp_path / "big.dcm", SecondaryCaptureImageStorage, 512 * MB,
                         deflated=False)
    context = [(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)]
    node = start(non_ct="accept")
    idle = idle_rss(node)
    with PeakRss(node.process.pid) as rss:  # type: ignore[union-attr]
        assert send_files(node.port, [big], context) == [0xA700]
    print(f"512 MB instance refused: node idle {idle:.0f} MB, peak {rss.peak_mb:.0f} MB")
    assert rss.peak_mb - idle < RSS_BUDGET_MB, (idle, rss.peak_mb)
    assert "instance over node.max_instance_mb (256 MB)" in node.log_path.read_text()
    assert not list((tmp_path / "node" / "spool").rglob("*.part"))
    node.stop()

    allowed = start(non_ct="accept", max_instance_mb=1024)
    idle = idle_rss(allowed)
    with PeakRss(allowed.process.pid) as rss:  # type: ignore[union-attr]
        assert send_files(allowed.port, [big], context) == [0x0000]
    print(f"512 MB instance stored: node idle {idle:.0f} MB, peak {rss.peak_mb:.0f} MB")
    assert rss.peak_mb - idle < RSS_BUDGET_MB, (idle, rss.peak_mb)
    (stored,) = (tmp_path / "node" / "spool").rglob("*.dcm")
    assert data_set_digest(stored) == data_set_digest(big)  # stored as sent, byte for byte


def data_set_digest(path: Path) -> str:
    """SHA-256 of the data set after the File Meta Information (which the node writes anew)."""
    _, offset = split_dataset(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(16 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def test_deflate_bombs_are_refused_in_bounded_memory_and_the_node_still_answers(
    start: Callable[..., NodeProcess], tmp_path: Path, ct_series: list[Path]
) -> None:
    bombs = [write_instance(tmp_path / f"bomb{i}.dcm", CTImageStorage, 512 * MB, deflated=True)
             for i in range(4)]
    assert all(b.stat().st_size < 1 * MB for b in bombs)
    node = start()
    idle = idle_rss(node)
    with PeakRss(node.process.pid) as rss:  # type: ignore[union-attr]
        statuses = send_files(node.port, bombs, [(CTImageStorage, DeflatedExplicitVRLittleEndian)])
    assert statuses == [0xA700] * 4
    print(f"4 deflate bombs refused: node idle {idle:.0f} MB, peak {rss.peak_mb:.0f} MB")
    assert rss.peak_mb - idle < RSS_BUDGET_MB, (idle, rss.peak_mb)
    assert "inflates to more than 256 MB (node.max_inflated_mb)" in node.log_path.read_text()
    assert instances_indexed(node) == 0
    sent = subprocess.run([str(STORESCU), "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                           *map(str, ct_series[:3])], capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert instances_indexed(node) == 3


def test_a_calling_ae_title_off_the_whitelist_is_refused_with_one_line(
    start: Callable[..., NodeProcess],
) -> None:
    node = start(allowed_calling_aes=["PACS"])
    echo = subprocess.run([str(ECHOSCU), "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode != 0
    expected = "association from 'INTRUDER'"
    wait_until(lambda: expected in node.log_path.read_text(), 5, "the refusal line", node)
    (line,) = [x for x in node.log_path.read_text().splitlines() if expected in x]
    assert "is not in node.allowed_calling_aes" in line
