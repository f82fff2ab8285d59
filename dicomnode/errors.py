"""One exception tree for the whole node.

Stages raise these; exactly one boundary turns them into something else: the C-STORE handler
into a DIMSE status, the job runner into a job state with a reason, the CLI into an exit code
and a message. Each error knows whether trying again can help.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""

    #: Whether the same work may succeed if simply tried again later.
    retryable: bool = False


class ConfigError(DicomNodeError):
    """The configuration is invalid; the message names the offending key."""


class InputRejected(DicomNodeError):
    """Input that can never be processed (wrong modality, localizer, too few slices, ...).

    ``dimse_status`` is the C-STORE status to answer when this is raised while receiving.
    """

    def __init__(self, message: str, *, dimse_status: int = 0xA900) -> None:
        super().__init__(message)
        self.dimse_status = dimse_status


class AssemblyError(InputRejected):
    """A series cannot be assembled into a volume; the message says why."""


class MaskError(InputRejected):
    """A SEG or RTSTRUCT cannot be placed on its CT: another grid, another frame of
    reference, a missing segment or ROI; the message says which."""


class ModelError(DicomNodeError):
    """A model file is missing or does not match what the node expects."""


class ReportError(DicomNodeError):
    """A SEG or SR could not be built."""


class CohortError(DicomNodeError):
    """A cohort CSV, or one of its cases, cannot be used.

    The message names the file, line and column of a bad CSV cell, or the case whose image
    or mask cannot be loaded and why.
    """


class TrainingError(DicomNodeError):
    """A training input is unusable; the message says which file, row or column."""


class DeliveryError(DicomNodeError):
    """Delivery to a destination failed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
