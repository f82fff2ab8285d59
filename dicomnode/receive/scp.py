"""The Verification and Storage SCP: association policy and the C-STORE handler (EDGE).

See :mod:`dicomnode.receive` for what is offered, the order in which each C-STORE is handled
and the status each outcome gets.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
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
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext

from dicomnode.config import Config
from dicomnode.errors import InputRejected
from dicomnode.observe.events import AssociationSummary, Observer
from dicomnode.receive.guard import GuardedConnection, Limits, ReceivedDataSet
from dicomnode.receive.header import (
    HeaderUnreadable,
    InstanceHeader,
    InstanceTooLarge,
    read_header_from_file,
)
from dicomnode.receive.server import GuardedServer
from dicomnode.receive.tls import server_tls_context, transport_text
from dicomnode.spool.index import Index, InstanceRecord
from dicomnode.spool.store import Outcome, Spool, Stored, check_uid
from dicomnode.types import SeriesKey

log = logging.getLogger("dicomnode.receive")

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
AcceptCallback = Callable[[InstanceHeader, str], None]

_ERROR_COMMENT_MAX = 64  # Error Comment (0000,0902) is LO (PS3.7 E.1)


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
    """An AE with the node's title, AE title policy, maximum PDU, timeouts and presentation
    contexts.

    pynetdicom binds event handlers when a server starts, so they are given to
    :func:`start_listener`, not to the AE.
    """
    _quiet_pynetdicom()
    node = config.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_pdu_size = node.max_pdu
    # pynetdicom answers both with A-ASSOCIATE-RJ (permanent), reasons 7 and 3 of PS3.8 9.3.4.
    ae.require_called_aet = node.require_called_ae
    ae.require_calling_aet = list(node.allowed_calling_aes)
    # The guard enforces the association limits (per host too) and refuses with its own
    # A-ASSOCIATE-RJ; pynetdicom's count includes connections still negotiating, so it must
    # never be the one to refuse.
    ae.maximum_associations = node.max_associations + node.max_pending_connections
    ae.acse_timeout = node.association_request_seconds  # ARTIM: a connection that sends nothing
    ae.network_timeout = node.idle_seconds  # silence inside an association: A-ABORT
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
    observer: Observer | None = None,
) -> GuardedServer:
    """Start the SCP on ``config.node.host:port`` in background threads.

    Returns the server: ``server.server_address[1]`` is the bound port (useful with port 0),
    ``server.shutdown()`` stops it and closes every connection, ``server.receiver`` is the
    :class:`Receiver` (associations open). ``observer`` is told of every association and
    instance.
    """
    tls_context = server_tls_context(config)  # checked before anything listens
    node = config.node
    receiver = Receiver(spool=spool, index=index, accept_callback=accept_callback,
                        min_free_bytes=int(node.min_free_mb * 1024 * 1024),
                        max_inflated_bytes=int(node.max_inflated_mb * 2**20),
                        reprocess_resent=config.completion.resent_series == "reprocess",
                        routable=routable_sop_classes(config),
                        policy=AssociationPolicy.from_config(config), observer=observer)
    ae = build_ae(config)
    server = ae.make_server(
        (node.host, node.port),
        ssl_context=tls_context,
        evt_handlers=receiver.handlers(),
        server_class=GuardedServer,
        guard=(Limits.from_config(node), spool.open_incoming),
    )
    server.receiver = receiver
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    server.serve_thread = thread
    thread.start()
    ae._servers.append(server)  # as AE.start_server does; AssociationServer.shutdown removes it
    return server


@dataclass(frozen=True)
class AssociationPolicy:
    """The AE title rules pynetdicom applies, kept to say why it rejected an association."""

    ae_title: str
    require_called_ae: bool
    allowed_calling_aes: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Config) -> AssociationPolicy:
        node = config.node
        return cls(node.ae_title, node.require_called_ae, node.allowed_calling_aes)

    def reason(self, called: str, calling: str) -> str:
        """Why pynetdicom rejected an association from ``calling`` addressed to ``called``."""
        if self.require_called_ae and called != self.ae_title:
            return (f"called AE title {called!a} is not {self.ae_title!a} "
                    "(rejected-permanent, reason 7; node.require_called_ae)")
        if self.allowed_calling_aes and calling not in self.allowed_calling_aes:
            return (f"calling AE title {calling!a} is not in node.allowed_calling_aes "
                    "(rejected-permanent, reason 3)")
        return "rejected during negotiation"


@dataclass
class _AssociationStats:
    """Counters of one association, for its closing log line."""

    id: str
    calling_ae: str
    peer: str
    #: "plain TCP", or the TLS version and client certificate (see :func:`~dicomnode.receive.tls.transport_text`).
    transport: str = ""
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
    refused: int = 0
    rejected_contexts: int = 0
    bytes: int = 0
    #: Instances stored per series.
    series: dict[SeriesKey, int] = field(default_factory=dict)

    def summary(self, how: str) -> AssociationSummary:
        return AssociationSummary(
            id=self.id, calling_ae=self.calling_ae, peer=self.peer, how=how,
            seconds=time.monotonic() - self.started, stored=self.stored, refused=self.refused,
            bytes=self.bytes, series=dict(self.series))


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
    max_inflated_bytes:
        Largest inflated size of a deflated data set; larger ones are answered 0xA700.
    policy:
        The AE title rules, to say in the log why an association was rejected.
    reprocess_resent:
        A copy of an instance that a job already covered (identical or replaced) reopens its
        series (:meth:`~dicomnode.spool.index.Index.reopen`): it is processed again.
    routable:
        SOP classes indexed as routable (:func:`routable_sop_classes`); others are only kept.
    observer:
        Told of every association and instance (metrics, the audit trail).
    """

    def __init__(
        self,
        *,
        spool: Spool,
        index: Index,
        accept_callback: AcceptCallback | None = None,
        clock: Callable[[], float] = time.time,
        min_free_bytes: int = 0,
        max_inflated_bytes: int = 256 * 2**20,
        reprocess_resent: bool = False,
        routable: tuple[str, ...] = CT_STORAGE_CLASSES,
        policy: AssociationPolicy | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.routable = frozenset(routable)
        self.observer = observer if observer is not None else Observer()
        self.spool = spool
        self.index = index
        self.accept_callback = accept_callback
        self.clock = clock
        self.min_free_bytes = min_free_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self.policy = policy
        self.reprocess_resent = reprocess_resent
        self._associations: dict[Association, _AssociationStats] = {}

    def handlers(self) -> list[EventHandlerType]:
        """pynetdicom ``evt_handlers`` for ``AE.start_server``."""
        return [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            # A peer that drops the connection without release or abort ends here.
            (evt.EVT_CONN_CLOSE, self.on_ended),
        ]

    @property
    def associations_open(self) -> int:
        """Associations negotiated and not yet ended."""
        return len(self._associations)

    def on_accepted(self, event: Event) -> None:
        stats = self._stats(event.assoc)
        self.observer.association_accepted(stats.calling_ae, stats.peer)
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

    def on_rejected(self, event: Event) -> None:
        """One WARNING line for an association pynetdicom rejected (AE title policy)."""
        assoc = event.assoc
        calling = str(assoc.requestor.ae_title).strip()
        primitive = assoc.requestor.primitive
        called = str(primitive.called_ae_title).strip() if primitive is not None else ""
        reason = self.policy.reason(called, calling) if self.policy else "rejected"
        log.warning("association from %a (%s:%s) refused: %s", calling,
                    assoc.requestor.address, assoc.requestor.port, reason)
        self._associations.pop(assoc, None)
        self.observer.association_rejected(
            calling, f"{assoc.requestor.address}:{assoc.requestor.port}", reason)

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
        self.observer.association_ended(stats.summary(how))

    def on_store(self, event: Event) -> int | Dataset:
        """Handle one C-STORE request; always returns a status, never raises."""
        stats = self._stats(event.assoc)
        try:
            status = self._store(event, stats)
        except Exception:  # the DIMSE boundary: a bug must become a status, not a crash
            log.exception("association %s: unexpected error while storing", stats.id)
            status = _failure(CANNOT_UNDERSTAND, "internal error while storing")
            self.observer.instance_refused("internal_error")
        if status != SUCCESS:
            stats.refused += 1
        return status

    def _store(self, event: Event, stats: _AssociationStats) -> int | Dataset:
        request = cast(C_STORE, event.request)
        affected_uid = str(request.AffectedSOPInstanceUID)
        received = _captured_data_set(event.assoc)
        if received is None or received.sop_instance_uid != affected_uid:
            # Cannot happen under start_listener: every C-STORE data set passes the guard.
            raise RuntimeError("the C-STORE data set was not captured by the connection guard")
        try:
            return self._store_received(event, stats, received, affected_uid)
        finally:
            received.discard()  # unless the spool adopted it

    def _store_received(self, event: Event, stats: _AssociationStats, received: ReceivedDataSet,
                        affected_uid: str) -> int | Dataset:
        context = event.context
        if received.refusal or received.path is None:
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES,
                                received.refusal or "data set not kept",
                                cause=received.cause or "storage_error")
        shortage = self._disk_shortage()
        if shortage:
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES, shortage,
                                cause="disk_full")
        try:
            header = read_header_from_file(received.path, received.data_offset,
                                           context.transfer_syntax,
                                           max_inflated_bytes=self.max_inflated_bytes)
        except HeaderUnreadable as exc:
            return self._refuse(
                stats, affected_uid, CANNOT_UNDERSTAND, f"unreadable data set: {exc}",
                cause="unreadable")
        except InstanceTooLarge as exc:
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES,
                                f"{exc} (node.max_inflated_mb)", cause="too_large")
        cause = "invalid"
        try:
            _check(header, affected_uid, context.abstract_syntax)
            if header.sop_class_uid != received.sop_class_uid:
                raise InputRejected("SOPClassUID differs from Affected SOP Class UID",
                                    dimse_status=DATA_SET_DOES_NOT_MATCH)
            if self.accept_callback is not None:
                cause = "rejected"  # the node's own veto on this instance
                self.accept_callback(header, stats.calling_ae)
            cause = "invalid"
            stored = self.spool.adopt(header.key, header.sop_instance_uid, received.path)
        except InputRejected as exc:
            return self._refuse(stats, affected_uid, exc.dimse_status, str(exc), cause=cause)
        except OSError as exc:
            return self._refuse(
                stats, affected_uid, OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}",
                cause="storage_error")
        return self._index(header, stored, context.transfer_syntax, stats, affected_uid)

    def _index(self, header: InstanceHeader, stored: Stored, transfer_syntax: str,
               stats: _AssociationStats, affected_uid: str) -> int | Dataset:
        """Record a spooled instance; Success only once the index has it."""
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
                self._record(header, stored.path, transfer_syntax, stats, stored.outcome)
            )
            reopened = (
                stored.outcome is not Outcome.NEW
                and self.reprocess_resent
                and self.index.reopen(header.key)
            )
        except (sqlite3.Error, OSError) as exc:
            if stored.outcome is Outcome.NEW:
                # Not acknowledged, so not kept: the sender still has it and may retry.
                stored.path.unlink(missing_ok=True)
            return self._refuse(stats, affected_uid, OUT_OF_RESOURCES, f"cannot index: {exc}",
                                cause="index_error")
        if reopened:
            log.info(
                "association %s: series %s sent again; it will be processed again "
                "(completion.resent_series = reprocess)",
                stats.id,
                header.series_uid,
            )
        stats.stored += 1
        stats.series[header.key] = stats.series.get(header.key, 0) + 1
        nbytes = _size(stored.path)
        stats.bytes += nbytes
        self.observer.instance_stored(nbytes, self.clock())
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

    def _refuse(self, stats: _AssociationStats, sop_uid: str, status: int, reason: str, *,
                cause: str) -> Dataset:
        """The failure status, logged and counted; ``cause`` is one of
        :data:`~dicomnode.observe.events.CAUSES`."""
        self.observer.instance_refused(cause)
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
                transport=transport_text(assoc),
            )
            self._associations[assoc] = stats
        return stats


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _captured_data_set(assoc: Association) -> ReceivedDataSet | None:
    """The data set the association's guarded connection captured for this C-STORE."""
    holder = assoc.dul.socket
    conn = holder.socket if holder is not None else None
    return conn.take_data_set() if isinstance(conn, GuardedConnection) else None


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


