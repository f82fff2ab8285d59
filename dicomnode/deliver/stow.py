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

The request is made with dicomweb-client's ``DICOMwebClient.store_instances`` over a
:mod:`requests` session that carries the configured credentials. Its internal retries are
switched off (the job runner owns retries, with its own backoff), and since it raises
``HTTPError`` on every 4xx/5xx, the body is read from the error's response. The datasets are
the job's saved Part 10 files, so each part keeps its preamble and file meta information.

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
from collections.abc import Sequence
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient
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


class _Session(requests.Session):
    """A session whose own ``verify`` (the destination's ``ca_file``) wins over the environment.

    Plain requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` replace a session's CA file
    (psf/requests#3829), and many servers set them: a PACS certificate from the hospital's own
    CA would then be refused although ``ca_file`` names that CA.
    """

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore[override]
        if verify is None:
            verify = self.verify
        return super().merge_environment_settings(url, proxies, stream, verify, cert)


def authenticated_session(cfg: DestinationConfig) -> requests.Session:
    """A session with ``cfg``'s credentials and CA, read now so that rotated secrets apply.

    Raises
    ------
    ConfigError
        A named secret (environment variable or file) is missing.
    """
    session = _Session()
    if cfg.ca_file:
        session.verify = cfg.ca_file
    if cfg.username:
        password = read_secret(cfg.password_env, cfg.password_file)
        session.auth = (cfg.username, password or "")
    else:
        token = read_secret(cfg.token_env, cfg.token_file)
        if token is not None:
            session.headers["Authorization"] = f"Bearer {token}"
    return session


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
            client = self._client()
        except ConfigError as exc:
            return failed_for_all(self.name, datasets, str(exc), retryable=False)
        study = str(datasets[0].get("StudyInstanceUID", "")) or None
        try:
            body = client.store_instances([as_part10(ds) for ds in datasets], study_instance_uid=study)
            status = 200
        except requests.HTTPError as exc:
            if exc.response is None:
                return failed_for_all(self.name, datasets, f"cannot send: {exc}", retryable=True)
            status, body = exc.response.status_code, _response_dataset(exc.response)
        except (ValueError, TypeError, AttributeError) as exc:  # pydicom cannot encode an instance
            return failed_for_all(self.name, datasets, f"cannot encode: {exc}", retryable=False)
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
        return self._judge(datasets, status, body)

    def _client(self) -> DICOMwebClient:
        """A dicomweb-client without its own retries, on a session with our credentials."""
        client = DICOMwebClient(
            self.cfg.url.rstrip("/"), session=authenticated_session(self.cfg), timeout=self.cfg.timeout_seconds
        )
        client.set_http_retry_params(retry=False)
        return client

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


def as_part10(ds: Dataset) -> Dataset:
    """``ds`` as read from its Part 10 encoding, so dicomweb-client writes preamble and meta."""
    return pydicom.dcmread(BytesIO(part10(ds)))


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
