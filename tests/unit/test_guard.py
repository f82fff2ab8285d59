"""The connection guard without a server: budgets with plain objects, and a
:class:`GuardedConnection` over a socket pair fed PDUs by hand (PS3.8 9.3)."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.config import NodeConfig
from dicomnode.receive.guard import ConnectionBudget, GuardedConnection, Limits


def limits_for(**node: Any) -> Limits:
    """The guard's limits for a node configured with ``node`` (defaults otherwise)."""
    return Limits.from_config(NodeConfig(**node))


@dataclass(eq=False)
class FakeConnection:
    host: str
    closed: list[str] = field(default_factory=list)

    def close_for(self, reason: str) -> None:
        self.closed.append(reason)


def test_a_host_over_its_pending_budget_loses_its_oldest_connection_only() -> None:
    budget = ConnectionBudget(limits_for(max_pending_per_host=2, max_pending_connections=10))
    other = FakeConnection("10.0.0.2")
    first, second, third = (FakeConnection("10.0.0.1") for _ in range(3))
    for conn in (other, first, second, third):
        budget.admit(conn)  # type: ignore[arg-type]
    assert first.closed and "node.max_pending_per_host" in first.closed[0]
    assert not second.closed and not third.closed and not other.closed
    assert budget.counts() == (3, 0)


def test_over_the_total_pending_budget_the_oldest_connection_of_any_host_is_closed() -> None:
    budget = ConnectionBudget(limits_for(max_pending_per_host=5, max_pending_connections=2))
    a, b, c = FakeConnection("a"), FakeConnection("b"), FakeConnection("c")
    for conn in (a, b, c):
        budget.admit(conn)  # type: ignore[arg-type]
    assert "node.max_pending_connections" in a.closed[0]
    assert not b.closed and not c.closed


def test_associations_are_limited_per_host_and_in_all_and_released() -> None:
    budget = ConnectionBudget(limits_for(max_associations=3, max_associations_per_host=2))
    conns = [FakeConnection(h) for h in ("a", "a", "a", "b", "c")]
    for conn in conns:
        budget.admit(conn)  # type: ignore[arg-type]
    verdicts = [budget.request_association(conn) for conn in conns]  # type: ignore[arg-type]
    assert verdicts[:2] == ["", ""]
    assert "2 associations from a (node.max_associations_per_host)" in verdicts[2]
    assert verdicts[3] == ""
    assert "3 associations (node.max_associations)" in verdicts[4]
    budget.release(conns[0])  # type: ignore[arg-type]
    assert budget.request_association(conns[2]) == ""  # type: ignore[arg-type]


# -- a guarded connection over a socket pair ------------------------------------------------
@dataclass
class Context:
    context_id: int
    transfer_syntax: list[str]


@dataclass
class FakeAssociation:
    accepted_contexts: list[Context]


class Incoming:
    """``Spool.open_incoming`` for a tmp folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def __call__(self) -> tuple[BinaryIO, Path]:
        self.count += 1
        path = self.folder / f"{self.count}.part"
        return path.open("wb"), path


@pytest.fixture
def pair(tmp_path: Path) -> Any:
    ours, peer = socket.socketpair()
    yield ours, peer, Incoming(tmp_path)
    ours.close()
    peer.close()


def guarded(pair: Any, **node: Any) -> GuardedConnection:
    ours, _, incoming = pair
    limits = limits_for(**node)
    return GuardedConnection(ours, ("127.0.0.1", 4242), budget=ConnectionBudget(limits),
                             limits=limits, open_incoming=incoming)


def associate_rq(calling: str = "SENDER", called: str = "DICOMNODE") -> bytes:
    body = (b"\x00\x01\x00\x00" + called.encode().ljust(16) + calling.encode().ljust(16)
            + bytes(32) + b"\x10\x00\x00\x15" + b"1.2.840.10008.3.1.1.1")
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdata(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context id, message control header, value) items."""
    body = b"".join(struct.pack(">LBB", len(v) + 2, cx, mch) + v for cx, mch, v in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def c_store_command(sop_instance_uid: str) -> bytes:
    cmd = Dataset()
    cmd.AffectedSOPClassUID = CTImageStorage
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance_uid
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, cmd)
    return buffer.getvalue()


def ct_data_set(uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated = 16
    ds.PixelData = bytes(8)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def read_pdu(conn: GuardedConnection) -> bytes:
    """What pynetdicom would read: the 6-byte header, then the body."""
    header = conn.recv(6)
    if not header:
        return b""
    (length,) = struct.unpack(">L", header[2:])
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return header + body


def test_an_association_request_passes_unchanged_and_counts_as_an_association(pair: Any) -> None:
    conn = guarded(pair)
    pair[1].sendall(associate_rq())
    assert read_pdu(conn) == associate_rq()
    assert conn.associated and conn.budget.counts() == (0, 1)


def test_a_request_that_stalls_is_closed_at_its_deadline_with_the_setting_named(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conn = guarded(pair, association_request_seconds=0.3)
    pair[1].sendall(associate_rq()[:6])
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assert conn.recv(6) == b""
    assert "PDU not complete in time (node.association_request_seconds)" in caplog.text
    assert conn.budget.counts() == (0, 0)


def test_a_pdu_longer_than_announced_is_refused_before_it_is_read(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conn = guarded(pair, max_pdu=4096)
    pair[1].sendall(struct.pack(">BBL", 0x04, 0, 10**9))
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assert conn.recv(6) == b""
    assert "PDU of 1000000000 bytes, longer than the 4096 the node announced" in caplog.text


def test_a_control_character_in_the_called_ae_title_is_rejected_by_the_guard(
    pair: Any, caplog: pytest.LogCaptureFixture
) -> None:
    conn = guarded(pair)
    pair[1].sendall(associate_rq(called="X\nFORGED"))
    with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
        assert conn.recv(6) == b""
    assert pair[1].recv(10) == bytes((0x03, 0, 0, 0, 0, 4, 0, 1, 1, 7))  # A-ASSOCIATE-RJ
    assert "'X\\nFORGED' is not a valid AE title" in caplog.text
    assert "\nFORGED" not in caplog.text


def start_association(pair: Any, **node: Any) -> GuardedConnection:
    conn = guarded(pair, **node)
    pair[1].sendall(associate_rq())
    read_pdu(conn)
    conn.attach(FakeAssociation([Context(1, [ExplicitVRLittleEndian])]))  # type: ignore[arg-type]
    return conn


def test_a_c_store_data_set_goes_to_a_file_and_pynetdicom_gets_empty_fragments(
    pair: Any,
) -> None:
    conn = start_association(pair)
    uid = generate_uid()
    data = ct_data_set(uid)
    command = c_store_command(uid)
    # The command in one PDU; the data set in two fragments over two PDUs.
    pair[1].sendall(pdata((1, 0x03, command)) + pdata((1, 0x00, data[:100]))
                    + pdata((1, 0x02, data[100:])))
    assert read_pdu(conn) == pdata((1, 0x03, command))
    assert read_pdu(conn) == pdata((1, 0x00, b""))
    assert read_pdu(conn) == pdata((1, 0x02, b""))
    received = conn.take_data_set()
    assert received is not None and received.path is not None
    assert (received.sop_instance_uid, received.size, received.refusal) == (uid, len(data), "")
    content = received.path.read_bytes()
    assert content[received.data_offset:] == data
    ds = pydicom.dcmread(received.path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == uid
    assert conn.take_data_set() is None


def test_a_data_set_over_the_size_limit_is_read_dropped_and_marked(pair: Any) -> None:
    conn = start_association(pair, max_instance_mb=150 / 2**20)
    uid = generate_uid()
    data = ct_data_set(uid) + bytes(200)
    pair[1].sendall(pdata((1, 0x03, c_store_command(uid))) + pdata((1, 0x02, data)))
    read_pdu(conn)
    read_pdu(conn)
    received = conn.take_data_set()
    assert received is not None
    assert received.path is None and received.size == len(data)
    assert "node.max_instance_mb" in received.refusal
    assert list(pair[2].folder.glob("*.part")) == []


def test_a_connection_cut_mid_data_set_leaves_no_file(pair: Any) -> None:
    conn = start_association(pair)
    uid = generate_uid()
    pair[1].sendall(pdata((1, 0x03, c_store_command(uid))) + pdata((1, 0x00, b"x" * 50)))
    read_pdu(conn)
    read_pdu(conn)
    assert len(list(pair[2].folder.glob("*.part"))) == 1
    pair[1].close()
    assert conn.recv(6) == b""
    conn.close()
    assert list(pair[2].folder.glob("*.part")) == []


def test_a_blocked_read_returns_at_once_when_the_listener_closes_everything(pair: Any) -> None:
    conn = start_association(pair, pdu_seconds=60)
    pair[1].sendall(struct.pack(">BBL", 0x04, 0, 100))
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(conn.recv(6)))
    reader.start()
    conn.budget.close_all()
    reader.join(5)
    assert not reader.is_alive() and got == [b""]
