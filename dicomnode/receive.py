"""The DICOM listener: Verification and Storage SCP for CT (EDGE).

What it offers (PS3.4 Annex A and B, negotiated per PS3.8 9.3):

- Verification (C-ECHO);
- CT Image Storage and Enhanced CT Image Storage with the transfer syntaxes PACS send CT in:
  Implicit and Explicit VR Little Endian, Deflated Explicit VR Little Endian, Explicit VR Big
  Endian, JPEG Baseline and Extended, JPEG Lossless (process 14 and SV1), JPEG-LS lossless and
  near-lossless, JPEG 2000 lossless and lossy, RLE Lossless. Instances are stored as received,
  so accepting a syntax costs nothing here; decoding happens later, in assembly;
- Segmentation Storage and RT Structure Set Storage (Explicit and Implicit VR Little Endian and
  the rest), unless ``[segmentation] source = "model"``: a radiologist's own contours, or our
  SEG corrected in a viewer, measured on the CT they reference (:mod:`dicomnode.analyse.supplied`);
- with ``non_ct = "accept"``, also pynetdicom's common storage SOP classes (the same transfer
  syntaxes): stored in the spool and indexed with ``routable = false``, never processed. With
  ``non_ct = "reject"`` (the default) their presentation contexts are rejected during
  association negotiation (result "abstract syntax not supported", PS3.8 9.3.3.2), so no
  C-STORE for them is ever sent and there is no DIMSE status to answer: the SCU reports the
  missing presentation context itself (dcmtk ``storescu`` exits with "No presentation context
  for: (RS) ..." and, unless run with ``--no-halt``, stops there).

Association policy: a Called AE Title other than ``node.ae_title`` is rejected (A-ASSOCIATE-RJ,
rejected-permanent, reason 7) unless ``node.require_called_ae`` is false; when
``node.allowed_calling_aes`` is not empty, other Calling AE Titles are rejected (reason 3).

DICOM TLS (after PS3.15 B.12, the BCP 195 TLS profile): with ``node.tls_cert_file`` and
``node.tls_key_file`` set, every connection must begin with a TLS handshake (TLS 1.2 or 1.3,
``node.tls_min_version``; TLS 1.2 only with ECDHE and AES-GCM or ChaCha20-Poly1305) before any
DICOM PDU; a peer that speaks plain TCP, or fails the handshake, is disconnected before
association negotiation and the failure is logged (one WARNING: address and reason). With
``node.tls_ca_file`` a client certificate is requested and, if given, must chain to that CA;
with ``node.tls_require_client_cert`` a client without one is refused during the handshake.
The handshake runs in the connection's own thread within :data:`TLS_HANDSHAKE_SECONDS`, so a
peer that connects and stalls cannot hold up other connections (pynetdicom's own server does
the handshake on the thread that accepts every connection). The files are checked when the
listener starts (:func:`server_tls_context`).

Each C-STORE is handled in this order, and Success is answered only at the end:

1. read the few header elements needed (UIDs, Modality, InstanceNumber, ImagePositionPatient,
   ImageOrientationPatient, NumberOfFrames, Rows, Columns) from the encoded data set, stopping
   after Columns (0028,0011): the data set is never decoded as a whole;
2. check them; refuse with a status and an Error Comment (0000,0902) if they are wrong;
3. write File Meta + data set as received to the spool (fsynced, see
   :mod:`dicomnode.spool.store`);
4. record the instance in the index (committed with ``synchronous=FULL``).

Status mapping (PS3.4 B.2.3; PS3.7 Annex C):

=========  =====================================================================================
0x0000     stored and indexed (also for an identical duplicate, and for a replaced copy)
0xA700     Refused, out of resources: free space on the spool's disk is below
           ``node.min_free_mb``, or the file or the index could not be written (disk full,
           I/O error, database locked); nothing is acknowledged, the sender may retry
0xA900     Error, data set does not match SOP class: a required UID (SOP Instance, Study,
           Series) is missing or breaks the UID grammar, the data set's SOP Instance UID differs
           from the request's Affected SOP Instance UID, or its SOP Class UID differs from the
           presentation context's abstract syntax
0xC000     Error, cannot understand: the data set's header could not be parsed, or an
           unexpected error occurred in the handler (logged with its traceback)
other      whatever an ``accept_callback`` raises as :class:`~dicomnode.errors.InputRejected`
=========  =====================================================================================

Logging: one INFO line per association (calling AE, address, whether it ran over TLS and with
which version and client certificate Common Name, counts, duration), one WARNING per refused
or replaced instance (with its SOP Instance UID). Patient name, ID and birth date are
never read, so never logged.

Maximum PDU: ``config.node.max_pdu`` (0 = no limit, the default). With pynetdicom's 16 KB
default a 512x512 slice arrives in 33 PDUs, each decoded in Python; with no limit dcmtk sends
far fewer, and receiving a 134-slice 512x512 series took 22 % less CPU and 23 % less time here
(``benchmarks/receive.py``). The data set is held in memory until it is written either way.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import socket
import sqlite3
import ssl
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    RTStructureSetStorage,
    SegmentationStorage,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    StoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.config import Config, read_secret
from dicomnode.errors import ConfigError, InputRejected
from dicomnode.spool.index import Index, InstanceRecord
from dicomnode.spool.store import Outcome, Spool, check_uid
from dicomnode.types import SeriesKey

log = logging.getLogger(__name__)

#: SOP classes the pipeline processes: stored with ``routable = true``.
CT_STORAGE_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage)
#: Segmentations drawn on a CT (measured instead of running the model): also routable.
SEGMENTATION_STORAGE_CLASSES: tuple[str, ...] = (SegmentationStorage, RTStructureSetStorage)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP Class (PS3.4 A.4)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

#: Called with the header of each instance and the calling AE title, before it is stored;
#: raise :class:`~dicomnode.errors.InputRejected` to refuse it with that exception's status.
AcceptCallback = Callable[["InstanceHeader", str], None]

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

_PREAMBLE = b"\x00" * 128 + b"DICM"
_ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO (PS3.7 E.1)


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
    """Read :class:`InstanceHeader` from an encoded data set without decoding the rest.

    The elements are located by walking element headers only (sequences are skipped by their
    lengths or delimiters, PS3.5 7.5), and the walk stops at the first element after Columns
    (0028,0011): pixel data and everything after it are never touched. On a real CT slice this
    takes 0.15 ms against 0.57 ms for pydicom's ``read_dataset`` with the same ``stop_when``
    (and about 1 ms for the full lazy decode behind ``Event.dataset``). pydicom still reads
    whatever the walk does not expect, for example an explicit VR transfer syntax whose data
    set is implicitly encoded, which pydicom detects and tolerates. A deflated data set
    (PS3.5 A.5) is inflated first.

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
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    try:
        raw = _ElementWalker(implicit=implicit, little_endian=little).header_values(buffer)
    except _Truncated as exc:
        raw = _header_values_encoded_the_other_way(buffer, implicit, little, exc)
    except _UnexpectedEncoding:
        raw = _header_values_with_pydicom(buffer, implicit, little)
    return _header_from_values(raw, little)


def _header_values_encoded_the_other_way(
    buffer: memoryview, implicit: bool, little: bool, truncated: _Truncated
) -> dict[int, bytes]:
    """Header values of a data set whose walk ran past its end.

    Either the data set was cut short (refused: pydicom would read the part that arrived and
    call it complete), or its VR explicitness is not the transfer syntax's, which misreads
    lengths; only the second is readable, by walking it the other way.
    """
    try:
        return _ElementWalker(implicit=not implicit, little_endian=little).header_values(buffer)
    except _UnexpectedEncoding:
        raise HeaderUnreadable(f"truncated: {truncated}") from None


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` prefix and File Meta Information group (PS3.10 7.1) for one instance.

    Byte for byte what ``pynetdicom``'s ``Event.encoded_dataset()`` writes (the same elements
    and pynetdicom's implementation UID and version, since it is the implementation that
    received the instance), built directly: pydicom's generic encoder takes about 0.8 ms per
    instance, a noticeable share of the receive time of a CT series.
    """
    elements = b"".join(
        (
            _element_long(0x0001, b"OB", b"\x00\x01"),
            _element_short(0x0002, b"UI", _uid_value(sop_class_uid)),
            _element_short(0x0003, b"UI", _uid_value(sop_instance_uid)),
            _element_short(0x0010, b"UI", _uid_value(transfer_syntax)),
            _element_short(0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
            _element_short(
                0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" ")
            ),
        )
    )
    group_length = _element_short(0x0000, b"UL", struct.pack("<I", len(elements)))
    return _PREAMBLE + group_length + elements


def routable_sop_classes(config: Config) -> tuple[str, ...]:
    """SOP classes the node processes: CT, and the segmentations drawn on CT unless
    ``[segmentation] source = "model"``."""
    if config.segmentation.source == "model":
        return CT_STORAGE_CLASSES
    return CT_STORAGE_CLASSES + SEGMENTATION_STORAGE_CLASSES


def storage_sop_classes(config: Config) -> tuple[str, ...]:
    """Storage SOP classes offered: the routable ones, plus pynetdicom's common storage
    classes with ``non_ct = "accept"``."""
    routable = routable_sop_classes(config)
    if config.node.non_ct == "reject":
        return routable
    others = tuple(
        str(cx.abstract_syntax)
        for cx in StoragePresentationContexts
        if cx.abstract_syntax not in routable
    )
    return routable + others


def build_ae(config: Config) -> AE:
    """An AE with the node's title, AE title policy, maximum PDU and presentation contexts.

    pynetdicom binds event handlers when a server starts, so they are given to
    :func:`start_listener`, not to the AE.
    """
    _quiet_pynetdicom()
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_pdu_size = config.node.max_pdu
    # pynetdicom answers both with A-ASSOCIATE-RJ (permanent), reasons 7 and 3 of PS3.8 9.3.4.
    ae.require_called_aet = config.node.require_called_ae
    ae.require_calling_aet = list(config.node.allowed_calling_aes)
    ae.add_supported_context(VERIFICATION)
    for sop_class in storage_sop_classes(config):
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


def _quiet_pynetdicom() -> None:
    """Keep pynetdicom's per-message INFO lines out of the log unless its level was chosen.

    pynetdicom logs several INFO lines per C-STORE; under a root logger at INFO they would bury
    the one line per association this module writes.
    """
    logger = logging.getLogger("pynetdicom")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def start_listener(
    config: Config,
    spool: Spool,
    index: Index,
    *,
    accept_callback: AcceptCallback | None = None,
) -> ThreadedAssociationServer:
    """Start the SCP on ``config.node.host:port`` in background threads.

    Returns the pynetdicom server: ``server.server_address[1]`` is the bound port (useful
    with port 0), ``server.shutdown()`` stops it.
    """
    tls_context = server_tls_context(config)  # checked before anything listens
    receiver = Receiver(spool=spool, index=index, accept_callback=accept_callback,
                        min_free_bytes=int(config.node.min_free_mb * 1024 * 1024),
                        reprocess_resent=config.completion.resent_series == "reprocess",
                        routable=routable_sop_classes(config))
    ae = build_ae(config)
    address = (config.node.host, config.node.port)
    if tls_context is None:
        server = ae.start_server(address, block=False, evt_handlers=receiver.handlers())
        return cast(ThreadedAssociationServer, server)  # block=False always returns the server
    # What AE.start_server(block=False) does, with the server class that handshakes per thread.
    tls_server = ae.make_server(
        address,
        ssl_context=tls_context,
        evt_handlers=receiver.handlers(),
        server_class=_TlsAssociationServer,
    )
    thread = threading.Thread(
        target=tls_server.serve_forever, name="AcceptorServer@tls", daemon=True
    )
    thread.start()
    ae._servers.append(tls_server)  # AssociationServer.shutdown() removes it from there
    return tls_server


#: Seconds a client has to complete the TLS handshake after connecting.
TLS_HANDSHAKE_SECONDS = 30.0

#: TLS 1.2 cipher suites (OpenSSL names): forward secrecy and AEAD only, the suites BCP 195
#: (RFC 9325 4.2) recommends plus ChaCha20-Poly1305. TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def server_tls_context(config: Config) -> ssl.SSLContext | None:
    """The listener's TLS context, or ``None`` when ``node.tls_cert_file`` is not set.

    Checks the configured files and the key password now, so that a bad setting stops the
    node at start-up with a message that names the key.

    Raises
    ------
    dicomnode.errors.ConfigError
        A file is missing, unreadable or not PEM; the key does not match the certificate; the
        key is encrypted and no (or a wrong) password is configured.
    """
    node = config.node
    if not node.tls:
        return None
    cert = _tls_file(config, "tls_cert_file")
    key = _tls_file(config, "tls_key_file")
    ca = _tls_file(config, "tls_ca_file") if node.tls_ca_file else None
    try:
        password = read_secret(node.tls_key_password_env, node.tls_key_password_file)
    except ConfigError as exc:
        which = "tls_key_password_env" if node.tls_key_password_env else "tls_key_password_file"
        raise ConfigError(f"node.{which}: {exc}") from None

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if node.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION

    _check_certificates(cert, "tls_cert_file")
    try:
        # A callable, so that OpenSSL never prompts on the terminal for an encrypted key.
        context.load_cert_chain(cert, key, password=lambda: _key_password(password))
    except ssl.SSLError as exc:  # a ConfigError from _key_password passes through
        if "KEY_VALUES_MISMATCH" in str(exc.reason) or "key values mismatch" in str(exc):
            raise ConfigError(
                f"node.tls_key_file: {key} does not match the certificate in {cert}"
            ) from None
        if password is not None:
            raise ConfigError(
                f"node.tls_key_file: cannot read the private key {key} with the configured "
                f"password (wrong password, or not a PEM key): {exc.reason or exc}"
            ) from None
        raise ConfigError(
            f"node.tls_key_file: {key} is not a readable PEM private key: {exc.reason or exc}"
        ) from None
    if ca is not None:
        _check_certificates(ca, "tls_ca_file")
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = (
            ssl.CERT_REQUIRED if node.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE  # no client certificate is asked for
    return context


def _tls_file(config: Config, key: str) -> Path:
    """The resolved path of a TLS file setting, checked to be a readable file."""
    path = config.resolve(Path(getattr(config.node, key)))
    if not path.is_file():
        raise ConfigError(f"node.{key}: {path} does not exist or is not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"node.{key}: cannot read {path}: {exc.strerror or exc}") from None
    return path


def _check_certificates(path: Path, key: str) -> None:
    """Refuse a file that holds no PEM certificate."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"node.{key}: no PEM certificate in {path}: {exc.reason or exc}"
        ) from None


def _key_password(password: str | None) -> str:
    if password is None:
        raise ConfigError(
            "node.tls_key_file: the private key is encrypted; name its password with "
            "tls_key_password_env or tls_key_password_file"
        )
    return password


class _TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into each connection's thread.

    ``AssociationServer.get_request`` wraps each accepted socket on the thread that accepts
    every connection, handshake included: one peer that connects and sends nothing would stall
    all other associations. Here that thread only accepts; each connection's own thread does
    the handshake within :data:`TLS_HANDSHAKE_SECONDS`, and a failure closes that connection
    with one WARNING line. Connection threads are daemons, so stopping the server does not
    wait for a stalled handshake.
    """

    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        context = cast(ssl.SSLContext, self.ssl_context)
        try:
            request.settimeout(TLS_HANDSHAKE_SECONDS)
            tls_socket = context.wrap_socket(request, server_side=True)
            tls_socket.settimeout(None)  # as pynetdicom's accepted sockets: blocking
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset, closed
            log.warning(
                "TLS handshake with %s failed, connection closed: %s",
                _address_text(client_address),
                _tls_failure(exc),
            )
            self.shutdown_request(request)
            return
        super().process_request_thread(tls_socket, client_address)


def _address_text(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _tls_failure(exc: BaseException) -> str:
    """A short reason for a failed handshake (OpenSSL's reason code where there is one)."""
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return f"no handshake within {TLS_HANDSHAKE_SECONDS:.0f} s"
    return str(exc) or type(exc).__name__


def _transport_text(assoc: Association) -> str:
    """``plain TCP``, or the TLS version and the client certificate's Common Name."""
    holder = assoc.dul.socket
    sock = holder.socket if holder is not None else None
    if not isinstance(sock, ssl.SSLSocket):
        return "plain TCP"
    version = sock.version() or "TLS"
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        cert = None
    if not cert:
        return f"{version}, no client certificate"
    names = [
        value
        for rdn in cert.get("subject", ())
        for name, value in rdn
        if name == "commonName"
    ]
    return f"{version}, client certificate CN {names[0] if names else '(none)'!r}"


@dataclass
class _AssociationStats:
    """Counters of one association, for its closing log line."""

    id: str
    calling_ae: str
    peer: str
    #: "plain TCP", or the TLS version and client certificate (see ``_transport_text``).
    transport: str = ""
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
    refused: int = 0
    rejected_contexts: int = 0


class Receiver:
    """The C-STORE handler and its association bookkeeping (see the module docstring).

    Parameters
    ----------
    spool, index:
        Where instances are written and recorded.
    accept_callback:
        Optional veto on each instance (see :data:`AcceptCallback`).
    clock:
        Wall clock for ``received_at`` (seconds since the epoch).
    min_free_bytes:
        Free space the spool's file system must keep; below it every C-STORE is answered
        Out of Resources (0xA700) with the reason. 0: no check.
    reprocess_resent:
        A copy of an instance that a job already covered (identical or replaced) reopens its
        series (:meth:`~dicomnode.spool.index.Index.reopen`): it is processed again.
    routable:
        SOP classes indexed as routable (:func:`routable_sop_classes`); others are only kept.
    """

    def __init__(
        self,
        *,
        spool: Spool,
        index: Index,
        accept_callback: AcceptCallback | None = None,
        clock: Callable[[], float] = time.time,
        min_free_bytes: int = 0,
        reprocess_resent: bool = False,
        routable: tuple[str, ...] = CT_STORAGE_CLASSES,
    ) -> None:
        self.routable = frozenset(routable)
        self.spool = spool
        self.index = index
        self.accept_callback = accept_callback
        self.clock = clock
        self.min_free_bytes = min_free_bytes
        self.reprocess_resent = reprocess_resent
        self._associations: dict[Association, _AssociationStats] = {}

    def handlers(self) -> list[EventHandlerType]:
        """pynetdicom ``evt_handlers`` for ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            # A peer that drops the connection without release or abort ends here.
            (evt.EVT_CONN_CLOSE, self.on_ended),
        ]

    def on_accepted(self, event: Event) -> None:
        stats = self._stats(event.assoc)
        rejected = [_describe_rejected(cx) for cx in event.assoc.rejected_contexts]
        stats.rejected_contexts = len(rejected)
        # SCUs such as storescu propose every storage class they know, so most associations
        # have rejected contexts: counted in the closing line, listed only at DEBUG.
        if rejected:
            log.debug(
                "association %s from %r: rejected presentation context(s): %s",
                stats.id,
                stats.calling_ae,
                "; ".join(rejected),
            )

    def on_ended(self, event: Event) -> None:
        stats = self._associations.pop(event.assoc, None)
        if stats is None:
            return
        how = {evt.EVT_RELEASED: "released", evt.EVT_ABORTED: "aborted"}.get(event.event, "closed")
        if how == "closed" and event.assoc.acse.is_aborted():
            how = "aborted"  # an A-ABORT the connection's close overtook
        log.info(
            "association %s from %r (%s, %s) %s after %.1f s: %d stored (%d duplicate, "
            "%d replaced), %d refused; %d presentation context(s) rejected",
            stats.id,
            stats.calling_ae,
            stats.peer,
            stats.transport,
            how,
            time.monotonic() - stats.started,
            stats.stored,
            stats.duplicates,
            stats.replaced,
            stats.refused,
            stats.rejected_contexts,
        )

    def on_store(self, event: Event) -> int | Dataset:
        """Handle one C-STORE request; always returns a status, never raises."""
        stats = self._stats(event.assoc)
        try:
            status = self._store(event, stats)
        except Exception:  # the DIMSE boundary: a bug must become a status, not a crash
            log.exception("association %s: unexpected error while storing", stats.id)
            status = _failure(CANNOT_UNDERSTAND, "internal error while storing")
        if status != SUCCESS:
            stats.refused += 1
        return status

    def _store(self, event: Event, stats: _AssociationStats) -> int | Dataset:
        request = cast(C_STORE, event.request)
        context = event.context
        stream = cast(io.BytesIO, request.DataSet)
        affected_uid = str(request.AffectedSOPInstanceUID)
        shortage = self._disk_shortage()
        if shortage:
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES, shortage)
        try:
            with stream.getbuffer() as data_set:
                header = read_header(data_set, context.transfer_syntax)
        except HeaderUnreadable as exc:
            return self._refuse(
                stats, affected_uid, CANNOT_UNDERSTAND, f"unreadable data set: {exc}"
            )
        try:
            _check(header, affected_uid, context.abstract_syntax)
            if self.accept_callback is not None:
                self.accept_callback(header, stats.calling_ae)
            meta = encode_file_meta(
                header.sop_class_uid, header.sop_instance_uid, context.transfer_syntax
            )
            with stream.getbuffer() as data_set:
                stored = self.spool.write(header.key, header.sop_instance_uid, (meta, data_set))
        except InputRejected as exc:
            return self._refuse(stats, affected_uid, exc.dimse_status, str(exc))
        except OSError as exc:
            return self._refuse(
                stats, affected_uid, OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}"
            )
        if stored.outcome is Outcome.REPLACED:
            stats.replaced += 1
            log.warning(
                "association %s: instance %s replaced by a copy with different content",
                stats.id,
                header.sop_instance_uid,
            )
        elif stored.outcome is Outcome.DUPLICATE:
            stats.duplicates += 1
        try:
            self.index.record_instance(
                self._record(header, stored.path, context.transfer_syntax, stats, stored.outcome)
            )
            reopened = (
                stored.outcome is not Outcome.NEW
                and self.reprocess_resent
                and self.index.reopen(header.key)
            )
        except (sqlite3.Error, OSError) as exc:
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES, f"cannot index: {exc}")
        if reopened:
            log.info(
                "association %s: series %s sent again; it will be processed again "
                "(completion.resent_series = reprocess)",
                stats.id,
                header.series_uid,
            )
        stats.stored += 1
        return SUCCESS

    def _record(
        self,
        header: InstanceHeader,
        path: Path,
        transfer_syntax: str,
        stats: _AssociationStats,
        outcome: Outcome,
    ) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            key=header.key,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax=str(transfer_syntax),
            path=path,
            received_at=self.clock(),
            calling_ae=stats.calling_ae,
            association_id=stats.id,
            routable=header.sop_class_uid in self.routable,
            modality=header.modality,
            position_along_normal=header.position_along_normal,
            orientation=header.orientation_text,
            instance_number=header.instance_number,
            rows=header.rows,
            cols=header.cols,
            frames=header.frames,
            replaced=outcome is Outcome.REPLACED,
        )

    def _disk_shortage(self) -> str:
        """Why the spool's disk is too full to take an instance, or ``""`` when it is not."""
        if self.min_free_bytes <= 0:
            return ""
        free = shutil.disk_usage(self.spool.root).free
        if free >= self.min_free_bytes:
            return ""
        # Fits the 64 characters of the status's Error Comment (LO).
        return f"disk below node.min_free_mb: {free / 2**20:.0f} MB free"

    def _refuse(self, stats: _AssociationStats, sop_uid: str, status: int, reason: str) -> Dataset:
        log.warning(
            "association %s from %r: refused instance %r with 0x%04X: %s",
            stats.id,
            stats.calling_ae,
            sop_uid[:64],
            status,
            reason,
        )
        return _failure(status, reason)

    def _stats(self, assoc: Association) -> _AssociationStats:
        stats = self._associations.get(assoc)
        if stats is None:
            requestor = assoc.requestor
            stats = _AssociationStats(
                id=uuid.uuid4().hex[:12],
                calling_ae=str(requestor.ae_title).strip(),
                peer=f"{requestor.address}:{requestor.port}",
                transport=_transport_text(assoc),
            )
            self._associations[assoc] = stats
        return stats


def _check(header: InstanceHeader, affected_sop_instance_uid: str, context_sop_class: str) -> None:
    """Refuse (0xA900) a data set whose identity is missing, malformed or inconsistent."""
    for value, name in (
        (header.sop_instance_uid, "SOPInstanceUID"),
        (header.study_uid, "StudyInstanceUID"),
        (header.series_uid, "SeriesInstanceUID"),
    ):
        if not value:
            raise InputRejected(f"data set has no {name}", dimse_status=DATA_SET_DOES_NOT_MATCH)
        check_uid(value, name)
    if header.sop_instance_uid != affected_sop_instance_uid:
        raise InputRejected(
            "SOPInstanceUID differs from Affected SOP Instance UID",
            dimse_status=DATA_SET_DOES_NOT_MATCH,
        )
    if header.sop_class_uid != context_sop_class:
        raise InputRejected(
            f"SOPClassUID {header.sop_class_uid!r} does not match the context",
            dimse_status=DATA_SET_DOES_NOT_MATCH,
        )


_CONTEXT_RESULTS = {
    0x01: "rejected by the node",
    0x02: "no reason given",
    0x03: "abstract syntax not supported",
    0x04: "transfer syntaxes not supported",
}


def _describe_rejected(context: PresentationContext) -> str:
    """A rejected presentation context in words (PS3.8 9.3.3.2 result)."""
    syntaxes = ", ".join(UID(ts).name for ts in context.transfer_syntax)
    reason = _CONTEXT_RESULTS.get(context.result or 0, f"result {context.result}")
    return f"{UID(context.abstract_syntax).name} in {syntaxes or 'no transfer syntax'} ({reason})"


def _failure(status: int, comment: str) -> Dataset:
    """A status data set with an Error Comment (0000,0902).

    The comment is made a valid LO value (PS3.5 6.2): printable ASCII without backslash, at
    most 64 characters; it may quote values the sender chose.
    """
    printable = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in comment)
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = printable[:_ERROR_COMMENT_MAX]
    return ds


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

    def header_values(self, buffer: memoryview) -> dict[int, bytes]:
        """Raw values of the wanted top-level elements up to (0028,0011)."""
        found: dict[int, bytes] = {}
        position, end = 0, len(buffer)
        try:
            while position < end:
                tag, vr, length, position = self._element(buffer, position, self.implicit)
                if tag > _LAST_HEADER_TAG:
                    break
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
        return found

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


def _uid_value(uid: str) -> bytes:
    return _padded(uid.encode("ascii"), b"\x00")


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element_short(element: int, vr: bytes, value: bytes) -> bytes:
    """Explicit VR Little Endian element of group 0002 with a 2-byte length (PS3.5 7.1.2)."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def _element_long(element: int, vr: bytes, value: bytes) -> bytes:
    """Explicit VR Little Endian element of group 0002 with a 4-byte length (OB, PS3.5 7.1.2)."""
    return (
        struct.pack("<HH", 0x0002, element)
        + vr
        + b"\x00\x00"
        + struct.pack("<I", len(value))
        + value
    )
