"""What every destination promises, and the registry that builds one from its configuration.

A destination never raises for a failed delivery: it answers a
:class:`~dicomnode.types.DeliveryResult` with one outcome per instance and says whether trying
again later can help (``retryable``). The job runner decides about retries from that alone.
Messages name hosts and instances, never secrets or patient data.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from io import BytesIO
from typing import Protocol

from pydicom import Dataset

from dicomnode.config import DestinationConfig
from dicomnode.types import DeliveryResult, InstanceOutcome


class Destination(Protocol):
    """Somewhere the report objects go (a folder, a DICOMweb server, a DICOM peer)."""

    #: The configured destination name, used in logs and job reasons.
    name: str

    def send(self, datasets: Sequence[Dataset]) -> DeliveryResult:
        """Deliver ``datasets``; report per instance what happened."""
        ...  # pragma: no cover - protocol


#: ``[[destinations]] kind`` -> the class that delivers there, as ``module:class``: imported
#: when first used, so that a node that only writes folders never imports pynetdicom or
#: requests, and each module stays importable on its own. A new kind is one line here (and
#: its name in :class:`~dicomnode.config.DestinationConfig`).
DESTINATION_KINDS: dict[str, str] = {
    "folder": "dicomnode.deliver.folder:FolderDestination",
    "stow": "dicomnode.deliver.stow:StowDestination",
    "cstore": "dicomnode.deliver.cstore:CStoreDestination",
}


def make_destination(cfg: DestinationConfig, *, calling_ae_title: str = "DICOMNODE") -> Destination:
    """Build the destination that ``cfg.kind`` names (:data:`DESTINATION_KINDS`).

    Parameters
    ----------
    cfg
        One ``[[destinations]]`` entry.
    calling_ae_title
        Our AE title when the destination is a DICOM peer (PS3.8 A-ASSOCIATE calling AE).
    """
    try:
        module, name = DESTINATION_KINDS[cfg.kind].split(":")
    except KeyError:
        raise ValueError(f"unknown destination kind {cfg.kind!r}") from None
    kind = getattr(importlib.import_module(module), name)
    if cfg.kind == "cstore":
        return kind(cfg, calling_ae_title=calling_ae_title)
    return kind(cfg)


def part10(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file: preamble, ``DICM``, complete file meta (PS3.10 Section 7.1)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def sop_instance_uid(ds: Dataset) -> str:
    """The instance's SOP Instance UID, or ``""`` for a dataset without one."""
    return str(ds.get("SOPInstanceUID", ""))


def failed_for_all(
    name: str, datasets: Sequence[Dataset], error: str, *, retryable: bool
) -> DeliveryResult:
    """The result of an attempt that failed before any instance could be judged."""
    return DeliveryResult(
        destination=name,
        outcomes=tuple(
            InstanceOutcome(sop_instance_uid(ds), ok=False, reason=error) for ds in datasets
        ),
        retryable=retryable,
        error=error,
    )


def from_outcomes(
    name: str, judged: Sequence[tuple[InstanceOutcome, bool]], error: str = ""
) -> DeliveryResult:
    """Combine ``(outcome, failure_is_temporary)`` pairs into one result.

    The result is retryable only if every failed instance may succeed later: one permanent
    failure makes retrying pointless, since the job cannot succeed as a whole.
    """
    failures = [temporary for outcome, temporary in judged if not outcome.ok]
    return DeliveryResult(
        destination=name,
        outcomes=tuple(outcome for outcome, _ in judged),
        retryable=bool(failures) and all(failures),
        error=error,
    )
