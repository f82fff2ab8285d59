"""STOW-RS destination (PS3.18 Section 10.5 Store Transaction).

All instances of one delivery go in one ``POST {url}/studies/{StudyInstanceUID}`` request
(``multipart/related; type="application/dicom"``), each part a complete Part 10 file
(PS3.10 Section 7: preamble, ``DICM``, file meta information). Naming the study in the URL
makes the server refuse any instance that does not belong to the source study (failure
reason 0x0110 with Orthanc) instead of filing it elsewhere.

The response body lists stored instances (ReferencedSOPSequence) and refused ones
(FailedSOPSequence with a FailureReason). Servers send that body with 4xx statuses too:
Orthanc answers 400 for a request with one bad part while it stores the good ones, and 409
for a study mismatch; the body is therefore parsed whatever the status.

The request is made with :mod:`requests` directly rather than dicomweb-client's
``store_instances``: that method writes datasets without the Part 10 preamble and prefix
unless they happen to carry one, raises on every 4xx, and retries internally; here each part
is a proper file, every status is judged, and the job runner owns retries.

Classification (the job runner retries only when every failure is temporary):

- connection refused/reset, timeout, HTTP 408, 429 and 5xx: temporary;
- TLS verification failure, other 4xx (401, 403, 404, 409, 413, ...): permanent;
- per instance: FailureReason 0xA7xx "Refused: Out of Resources" temporary (PS3.4
  Table B.2-1), any other failure reason permanent; an instance the server does not mention
  counts as failed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from pydicom import Dataset

from dicomnode.config import DestinationConfig, read_secret
from dicomnode.deliver.base import failed_for_all, from_outcomes, part10, sop_instance_uid
from dicomnode.errors import ConfigError
from dicomnode.types import DeliveryResult, InstanceOutcome

log = logging.getLogger(__name__)

#: HTTP statuses after which the same request may succeed later.
RETRYABLE_STATUSES = frozenset({408, 429})

#: PS3.4 Table B.2-1 / PS3.18 Table 10.5.3-1 failure reasons, for readable messages.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}


class StowDestination:
    """Send instances to a DICOMweb server with STOW-RS."""

    def __init__(self, cfg: DestinationConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        #: The URL as it may appear in logs: without any user:password part.
        self.url_for_logs = _without_userinfo(cfg.url)

    def send(self, datasets: Sequence[Dataset]) -> DeliveryResult:
        if not datasets:
            return DeliveryResult(destination=self.name)
        try:
            session = self._session()
            body, content_type = multipart_related([part10(ds) for ds in datasets])
        except ConfigError as exc:
            return failed_for_all(self.name, datasets, str(exc), retryable=False)
        except (ValueError, TypeError, AttributeError) as exc:  # pydicom cannot encode an instance
            return failed_for_all(self.name, datasets, f"cannot encode: {exc}", retryable=False)
        study = str(datasets[0].get("StudyInstanceUID", ""))
        url = f"{self.cfg.url.rstrip('/')}/studies" + (f"/{study}" if study else "")
        try:
            response = session.post(
                url,
                data=body,
                headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
                timeout=self.cfg.timeout_seconds,
            )
        except requests.exceptions.SSLError as exc:
            error = f"TLS failure with {self.url_for_logs}: {_reason(exc)}"
            return failed_for_all(self.name, datasets, error, retryable=False)
        except requests.Timeout:
            error = f"no answer from {self.url_for_logs} within {self.cfg.timeout_seconds:g} s"
            return failed_for_all(self.name, datasets, error, retryable=True)
        except requests.ConnectionError as exc:
            error = f"cannot connect to {self.url_for_logs}: {_reason(exc)}"
            return failed_for_all(self.name, datasets, error, retryable=True)
        except requests.RequestException as exc:  # an invalid URL and the like
            return failed_for_all(self.name, datasets, f"cannot send: {exc}", retryable=False)
        return self._judge(datasets, response.status_code, _response_dataset(response))

    def _session(self) -> requests.Session:
        """A session with the configured credentials, read now so that rotated secrets apply.

        Raises
        ------
        ConfigError
            A named secret (environment variable or file) is missing.
        """
        session = requests.Session()
        if self.cfg.ca_file:
            session.verify = self.cfg.ca_file
        if self.cfg.username:
            password = read_secret(self.cfg.password_env, self.cfg.password_file)
            session.auth = (self.cfg.username, password or "")
        else:
            token = read_secret(self.cfg.token_env, self.cfg.token_file)
            if token is not None:
                session.headers["Authorization"] = f"Bearer {token}"
        return session

    def _judge(self, datasets: Sequence[Dataset], status: int, body: Dataset) -> DeliveryResult:
        """Per-instance outcomes from the HTTP status and the response body."""
        stored = {
            str(item.get("ReferencedSOPInstanceUID", ""))
            for item in body.get("ReferencedSOPSequence", [])
        }
        failed = {
            str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0))
            for item in body.get("FailedSOPSequence", [])
        }
        if 200 <= status < 300 and not stored and not failed:
            # A 2xx without the response body PS3.18 asks for: the server took the request whole.
            return from_outcomes(
                self.name, [(InstanceOutcome(sop_instance_uid(ds), True), False) for ds in datasets]
            )
        judged = [
            _instance_outcome(sop_instance_uid(ds), status, stored, failed) for ds in datasets
        ]
        error = "" if stored or failed else f"HTTP {status} from {self.url_for_logs}"
        result = from_outcomes(self.name, judged, error=error)
        if not result.ok:
            log.warning(
                "STOW-RS to %s: HTTP %d, %d of %d instance(s) stored",
                self.url_for_logs,
                status,
                len(stored & {sop_instance_uid(ds) for ds in datasets}),
                len(datasets),
            )
        return result


def _instance_outcome(
    uid: str, status: int, stored: set[str], failed: dict[str, int]
) -> tuple[InstanceOutcome, bool]:
    """One instance's outcome and whether its failure is temporary."""
    temporary_status = status in RETRYABLE_STATUSES or status >= 500
    if uid and uid in stored:
        return InstanceOutcome(uid, ok=True), False
    if uid and uid in failed:
        code = failed[uid]
        meaning = FAILURE_REASONS.get(code, "refused")
        reason = f"HTTP {status}: failure reason 0x{code:04X} ({meaning})"
        # 0xA7xx: "Refused: Out of Resources" (PS3.4 Table B.2-1), e.g. a full archive disk.
        return InstanceOutcome(uid, ok=False, reason=reason), temporary_status or code >> 8 == 0xA7
    return InstanceOutcome(uid, ok=False, reason=f"HTTP {status}: not stored"), temporary_status


def multipart_related(parts: Sequence[bytes]) -> tuple[bytes, str]:
    """The STOW-RS request body and its Content-Type (PS3.18 Section 8.6.1.2, RFC 2387)."""
    boundary = uuid.uuid4().hex
    delimiter = f"--{boundary}".encode()
    chunks = []
    for part in parts:
        chunks += [delimiter, b"\r\nContent-Type: application/dicom\r\n\r\n", part, b"\r\n"]
    chunks += [delimiter, b"--\r\n"]
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def _response_dataset(response: requests.Response) -> Dataset:
    """The DICOM JSON response body, or an empty dataset.

    Parsed whatever the Content-Type says: Orthanc sends its 409 body without one.
    """
    if not response.content:
        return Dataset()
    try:
        data: Any = response.json()
        return Dataset.from_json(data) if isinstance(data, dict) else Dataset()
    except (ValueError, json.JSONDecodeError, TypeError, KeyError):
        return Dataset()


def _without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests error, short (urllib3 wraps it several times)."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause)
    return text.split("] ", 1)[-1][:200] if text else type(cause).__name__
