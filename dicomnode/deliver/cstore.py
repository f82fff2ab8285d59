"""C-STORE destination: send instances to a DICOM peer over one association (PS3.4 Annex B).

Classification (the job runner retries only when every failure is temporary):

- no association (connection refused, timeout, rejection, abort): temporary; a peer that is
  down or busy is the common case, and a persistent rejection ends when the job gives up;
- per instance (PS3.4 Table B.2-1): Success and Warning statuses are stored; 0xA7xx "Refused:
  Out of Resources" and a missing response are temporary; any other failure status, or a SOP
  class the peer did not accept, is permanent.

With ``tls = true`` the association runs over TLS 1.2 or later; the peer's certificate is
verified against ``ca_file`` (else the system's CAs) and must name ``host``. A failed handshake
is a failed association (pynetdicom logs the TLS error); client certificate and key files that
cannot be loaded fail the delivery for good, since no retry can fix them.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicomnode.config import DestinationConfig
from dicomnode.deliver.base import failed_for_all, from_outcomes, sop_instance_uid
from dicomnode.types import DeliveryResult, InstanceOutcome

log = logging.getLogger(__name__)


class CStoreDestination:
    """Send instances to ``cfg.ae_title`` at ``cfg.host:cfg.port``."""

    def __init__(self, cfg: DestinationConfig, *, calling_ae_title: str) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.calling_ae_title = calling_ae_title
        self.peer = f"{cfg.ae_title}@{cfg.host}:{cfg.port}"

    def send(self, datasets: Sequence[Dataset]) -> DeliveryResult:
        if not datasets:
            return DeliveryResult(destination=self.name)
        datasets = [_with_transfer_syntax(ds) for ds in datasets]
        try:
            tls_args = self._tls_args()
        except (OSError, ssl.SSLError) as exc:
            reason = f"TLS set-up for {self.peer}: {exc}"
            return failed_for_all(self.name, datasets, reason, retryable=False)
        assoc = self._associate(datasets, tls_args)
        if not assoc.is_established:
            why = (
                "rejected by the peer"
                if assoc.is_rejected
                else "not established (no answer or aborted"
                + (", or the TLS handshake failed: see the log)" if tls_args else ")")
            )
            return failed_for_all(
                self.name, datasets, f"association with {self.peer} {why}", retryable=True
            )
        try:
            judged = [self._store(assoc, ds) for ds in datasets]
        finally:
            if assoc.is_established:
                assoc.release()
        result = from_outcomes(self.name, judged)
        if not result.ok:
            log.warning(
                "C-STORE to %s: %d of %d instance(s) stored",
                self.peer,
                sum(o.ok for o in result.outcomes),
                len(datasets),
            )
        return result

    def _tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for ``cfg.tls``: a verifying client context and the host."""
        if not self.cfg.tls:
            return None
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=self.cfg.ca_file or None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cfg.tls_cert_file:
            context.load_cert_chain(self.cfg.tls_cert_file, self.cfg.tls_key_file)
        return context, self.cfg.host

    def _associate(
        self, datasets: Sequence[Dataset], tls_args: tuple[ssl.SSLContext, str] | None
    ) -> Association:
        """One association proposing each (SOP class, transfer syntax) pair of ``datasets``."""
        ae = AE(ae_title=self.calling_ae_title)
        timeout = self.cfg.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
        for sop_class, syntax in dict.fromkeys(_context_of(ds) for ds in datasets):
            ae.add_requested_context(sop_class, syntax)
        return ae.associate(
            self.cfg.host, self.cfg.port, ae_title=self.cfg.ae_title, tls_args=tls_args
        )

    def _store(self, assoc: Association, ds: Dataset) -> tuple[InstanceOutcome, bool]:
        """C-STORE one instance: ``(outcome, failure_is_temporary)``."""
        uid = sop_instance_uid(ds)
        try:
            status = assoc.send_c_store(ds)
        except (ValueError, AttributeError) as exc:  # no accepted context, or not encodable
            return InstanceOutcome(uid, ok=False, reason=f"not sent: {exc}"), False
        except RuntimeError:  # the peer aborted the association during an earlier instance
            return InstanceOutcome(uid, ok=False, reason="association lost"), True
        if "Status" not in status:  # no response: the association was aborted or timed out
            return InstanceOutcome(uid, ok=False, reason="no C-STORE response"), True
        code = int(status.Status)
        category = code_to_category(code)
        if category == "Success":
            return InstanceOutcome(uid, ok=True), False
        if category == "Warning":
            return InstanceOutcome(uid, ok=True, reason=f"stored with warning 0x{code:04X}"), False
        reason = f"C-STORE status 0x{code:04X} ({category.lower()})"
        return InstanceOutcome(uid, ok=False, reason=reason), code >> 8 == 0xA7


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """``ds``, or a shallow copy that states Explicit VR Little Endian if it states no syntax.

    pynetdicom picks the presentation context from (0002,0010); an in-memory dataset without
    file meta information is uncompressed and is sent in the default syntax of PS3.5 A.2.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    stated = ds.copy()
    stated.file_meta = FileMetaDataset()
    stated.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return stated


def _context_of(ds: Dataset) -> tuple[str, str]:
    """The presentation context an instance needs: its SOP class in its own transfer syntax."""
    return str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
