"""The DICOM listener: Verification and Storage SCP for CT (EDGE).

Modules: :mod:`~dicomnode.receive.header` (the few elements receiving reads, PURE),
:mod:`~dicomnode.receive.guard` (deadlines, limits, budgets; streams data sets to disk),
:mod:`~dicomnode.receive.server` (the TCP server), :mod:`~dicomnode.receive.tls`,
:mod:`~dicomnode.receive.scp` (association policy and the C-STORE handler).

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

DICOM TLS: see :mod:`dicomnode.receive.tls`.

Hostile and broken peers: see :mod:`dicomnode.receive.guard` (one WARNING line for every
closed connection and every refused association, with the reason and the setting).

Each C-STORE is handled in this order, and Success is answered only at the end:

1. while the data set arrives, write it fragment by fragment to a private file in the spool's
   ``.incoming`` folder (never whole in memory; over ``node.max_instance_mb`` it is dropped);
2. read the few header elements needed (UIDs, Modality, InstanceNumber, ImagePositionPatient,
   ImageOrientationPatient, NumberOfFrames, Rows, Columns) from the start of that file,
   stopping after Columns (0028,0011); a deflated data set is inflated as a stream and
   measured against ``node.max_inflated_mb``;
3. check them; refuse with a status and an Error Comment (0000,0902) if they are wrong;
4. fsync the file and rename it into the spool (see :mod:`dicomnode.spool.store`);
5. record the instance in the index (committed with ``synchronous=FULL``); if that fails, a
   new file is removed again, so nothing unacknowledged stays.

Status mapping (PS3.4 B.2.3; PS3.7 Annex C):

=========  =====================================================================================
0x0000     stored and indexed (also for an identical duplicate, and for a replaced copy)
0xA700     Refused, out of resources: free space on the spool's disk is below
           ``node.min_free_mb``, the instance is larger than ``node.max_instance_mb`` or
           inflates to more than ``node.max_inflated_mb``, or the file or the index could not
           be written (disk full, I/O error, database locked); nothing is acknowledged
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

Maximum PDU: ``config.node.max_pdu`` (1 MiB by default, at most 16 MiB): each PDU is read
whole, so it bounds what one connection holds in memory. With pynetdicom's 16 KB default a
512x512 slice arrives in 33 PDUs, each decoded in Python; with 1 MiB dcmtk sends one or two
(``benchmarks/receive.py``).
"""

from dicomnode.receive.guard import encode_file_meta
from dicomnode.receive.header import (
    HeaderUnreadable,
    InstanceHeader,
    InstanceTooLarge,
    read_header,
    read_header_from_file,
)
from dicomnode.receive.scp import (
    CANNOT_UNDERSTAND,
    CT_STORAGE_CLASSES,
    DATA_SET_DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SEGMENTATION_STORAGE_CLASSES,
    SUCCESS,
    TRANSFER_SYNTAXES,
    VERIFICATION,
    AcceptCallback,
    Receiver,
    build_ae,
    routable_sop_classes,
    start_listener,
    storage_sop_classes,
)
from dicomnode.receive.tls import server_tls_context

__all__ = [
    "CANNOT_UNDERSTAND",
    "CT_STORAGE_CLASSES",
    "DATA_SET_DOES_NOT_MATCH",
    "OUT_OF_RESOURCES",
    "SEGMENTATION_STORAGE_CLASSES",
    "SUCCESS",
    "TRANSFER_SYNTAXES",
    "VERIFICATION",
    "AcceptCallback",
    "HeaderUnreadable",
    "InstanceHeader",
    "InstanceTooLarge",
    "Receiver",
    "build_ae",
    "encode_file_meta",
    "read_header",
    "read_header_from_file",
    "routable_sop_classes",
    "server_tls_context",
    "start_listener",
    "storage_sop_classes",
]
