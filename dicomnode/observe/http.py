"""The node's HTTP(S) server: status page, a job's page and Retry, ``/metrics``, ``/healthz``
(EDGE).

Routes:

- ``GET /``: the status page (:func:`.page.status_page`); ``GET /jobs/<id>``: one job;
- ``POST /jobs/<id>/retry``: re-queue a failed or waiting job (form field ``token``: the
  page's anti-forgery token, so that another site cannot make a signed-in browser retry);
- ``GET /api/jobs``: the jobs as JSON (no patient data);
- ``GET /metrics``: Prometheus text format (:mod:`.metrics`);
- ``GET /healthz``: 200 when every check passes, else 503 (:mod:`.health`); open to anyone
  who can reach the port, with reasons only for an authorised caller.

Access (``[http]`` in the configuration): with a bearer token or a user and password
configured, a request that carries them is *authorised*: it sees patient names and may retry.
Without them, only this machine (loopback) is served, with patients as initials and a hash;
every other client gets 401. ``dicomnode serve`` refuses to listen beyond loopback without
credentials (:class:`~dicomnode.config.HttpConfig`). HTTPS takes the listener's TLS options.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
from pydicom.valuerep import PersonName

from dicomnode.config import Config, read_secret
from dicomnode.errors import ConfigError
from dicomnode.jobs.machine import IllegalTransition, JobEvent
from dicomnode.jobs.remote import Conflict, RemoteJobs
from dicomnode.jobs.runner import StorageFailure
from dicomnode.jobs.store import Job, JobStore
from dicomnode.observe.audit import AuditTrail
from dicomnode.observe.health import HealthChecks
from dicomnode.observe.metrics import CONTENT_TYPE, NodeMetrics
from dicomnode.observe.page import (
    AuditRow,
    JobRow,
    JournalRow,
    ListenerState,
    PatientLabel,
    job_page,
    status_page,
)
from dicomnode.receive.tls import server_tls_context

log = logging.getLogger(__name__)

#: Jobs shown on the status page.
PAGE_JOBS = 200
#: Seconds a client may take to send its request (a stalled socket must not hold a thread).
REQUEST_SECONDS = 30
_JOB_PATH = re.compile(r"^/jobs/([0-9a-f]{1,32})(/retry)?$")
_INTERNAL_PATH = re.compile(r"^/internal/jobs/([0-9a-f]{1,32})/(claim|inputs|results|failed|delivered)"
                            r"(?:/(\d+))?$")
#: Largest results archive a worker may upload (a SEG, an SR, key images and a PDF).
MAX_RESULTS_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Credentials:
    """What an authorised request carries; both empty: nobody is authorised."""

    token: str = ""
    username: str = ""
    password: str = ""

    @classmethod
    def from_config(cls, config: Config) -> Credentials:
        http = config.http
        token, password = _secret(config, "http", "token"), _secret(config, "http", "password")
        if http.credentials and not (token or password):
            raise ConfigError("http: the configured token or password is empty")
        return cls(token=token, username=http.username, password=password)

    @property
    def configured(self) -> bool:
        return bool(self.token or self.username)

    def who(self, authorization: str) -> str:
        """The user an ``Authorization`` header authenticates (``"token"`` for the bearer
        token), or ``""``."""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and self.token:
            return "token" if hmac.compare_digest(value.strip().encode(), self.token.encode()) else ""
        if scheme.lower() == "basic" and self.username:
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return ""
            ok = (hmac.compare_digest(user.encode(), self.username.encode())
                  & hmac.compare_digest(password.encode(), self.password.encode()))
            return user if ok else ""
        return ""


def _secret(config: Config, section: str, name: str) -> str:
    """The secret that ``<section>.<name>_env`` or ``<section>.<name>_file`` names, or ``""``."""
    settings = getattr(config, section)
    env, file = getattr(settings, f"{name}_env"), getattr(settings, f"{name}_file")
    try:
        return read_secret(env, file) or ""
    except ConfigError as exc:
        raise ConfigError(f"{section}.{name}_{'env' if env else 'file'}: {exc}") from None


class StatusServer:
    """The HTTP(S) server, in a thread of its own.

    Parameters
    ----------
    config
        ``[http]`` (address, credentials, TLS) and ``[node]`` (for the page).
    jobs, audit, metrics, health
        What the pages, ``/metrics`` and ``/healthz`` show.
    listener
        The listener's state now.
    remote
        The workers' API (:class:`~dicomnode.jobs.remote.RemoteJobs`), served under
        ``/internal`` to callers with ``[runner] worker_token_*``.
    secret
        The node's key for the patient hash and the anti-forgery tokens.
    """

    def __init__(self, config: Config, *, jobs: JobStore, audit: AuditTrail,
                 metrics: NodeMetrics, health: HealthChecks,
                 listener: Callable[[], ListenerState], secret: bytes,
                 clock: Callable[[], float], remote: RemoteJobs | None = None) -> None:
        self.config = config
        #: The workers' API (``/internal``), with ``[runner] kind = "celery"``.
        self.remote = remote
        self.worker_token = (
            _secret(config, "runner", "worker_token") if remote is not None else "")
        self.jobs = jobs
        self.audit = audit
        self.metrics = metrics
        self.health = health
        self.listener = listener
        self.secret = secret
        self.clock = clock
        self.credentials = Credentials.from_config(config)
        self._tls = server_tls_context(config, "http")  # checked before anything listens
        self._patients: dict[str, PatientLabel] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        http = self.config.http
        httpd = ThreadingHTTPServer((http.host, http.port), _handler_for(self))
        httpd.daemon_threads = True
        if self._tls is not None:
            httpd.socket = self._tls.wrap_socket(httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="dicomnode-http",
                                        daemon=True)
        self._thread.start()
        log.info("status page on %s", self.url)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1]) if self._httpd else self.config.http.port

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        host = self.config.http.host
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{self.port}/"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- what the handler asks for -------------------------------------------------------------
    def retry_token(self, job_id: str) -> str:
        return hmac.new(self.secret, f"retry:{job_id}".encode(), hashlib.sha256).hexdigest()

    def row(self, job: Job) -> JobRow:
        return JobRow(id=job.id, state=job.state.value, reason=job.reason,
                      created_at=job.created_at, updated_at=job.updated_at,
                      instances=len(job.inputs), series_uid=job.key.series_uid,
                      study_uid=job.key.study_uid, patient=self.patient(job),
                      seconds=job.seconds, attempts=job.attempts, warnings=job.warnings)

    def patient(self, job: Job) -> PatientLabel:
        """The patient of a job, from its first spooled instance (read once per job)."""
        label = self._patients.get(job.id)
        if label is None:
            label = self._patients[job.id] = patient_label(job.inputs, self.secret)
        return label

    def retry(self, job_id: str, who: str) -> Job:
        job = self.jobs.find(job_id)
        job = self.jobs.transition(job.id, JobEvent.RETRY, f"retry requested by {who} on the "
                                   "status page", now=self.clock())
        self.audit.job_retried(job.id, who)
        log.info("job %s re-queued by %s on the status page", job.id, who)
        return job


def patient_label(inputs: tuple[Path, ...], secret: bytes) -> PatientLabel:
    """Initials and a keyed hash of the patient ID (the same patient, the same hash on this
    node; no table of hashes reveals the ID), with the name and ID for authorised viewers."""
    if not inputs:
        return PatientLabel(initials="", hash="")
    try:
        ds = pydicom.dcmread(inputs[0], stop_before_pixels=True,
                             specific_tags=["SpecificCharacterSet", "PatientName", "PatientID"])
    except Exception:  # a file moved or damaged: the page still shows the job
        return PatientLabel(initials="", hash="")
    name = PersonName(str(ds.get("PatientName", "") or ""))
    patient_id = str(ds.get("PatientID", "") or "")
    initials = "".join(f"{part[0]}." for part in (name.family_name, name.given_name) if part)
    digest = hmac.new(secret, patient_id.encode(), hashlib.sha256).hexdigest()[:8]
    shown = name.family_comma_given().strip(", ") or str(name)
    return PatientLabel(initials=initials, hash=digest if patient_id else "", name=shown,
                        patient_id=patient_id)


def load_secret(path: Path) -> bytes:
    """The node's secret key, created on first use with the node's file modes (the umask of
    :func:`~dicomnode.filemodes.make_node_private`: owner only, or ``node.file_group``)."""
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        key = secrets.token_bytes(32)
        path.write_text(key.hex())
        return key


def _handler_for(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        status = server
    return Handler


class _Handler(BaseHTTPRequestHandler):
    status: StatusServer
    timeout = REQUEST_SECONDS
    server_version = "dicomnode"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("http %s: " + format, self.client_address[0], *args)

    # -- access --------------------------------------------------------------------------------
    def _who(self) -> str:
        return self.status.credentials.who(self.headers.get("Authorization", ""))

    def _local(self) -> bool:
        try:
            return ipaddress.ip_address(self.client_address[0]).is_loopback
        except ValueError:
            return False

    def _access(self) -> tuple[bool, str] | None:
        """(authorised, who) for a request that may be served, ``None`` after a 401."""
        who = self._who()
        if who:
            return True, who
        if self._local() and not self.headers.get("Authorization"):
            return False, f"local user ({self.client_address[0]})"
        self._unauthorised()
        return None

    def _unauthorised(self) -> None:
        scheme = 'Basic realm="dicomnode"' if self.status.credentials.username else "Bearer"
        self._send(HTTPStatus.UNAUTHORIZED, b"authentication required\n", "text/plain",
                   {"WWW-Authenticate": scheme})

    # -- routes --------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/healthz":
            return self._healthz()
        if path.startswith("/internal/"):
            return self._internal("GET", path)
        access = self._access()
        if access is None:
            return None
        authorised, _ = access
        if path == "/":
            return self._status_page(authorised)
        if path == "/metrics":
            return self._send(HTTPStatus.OK, self.status.metrics.exposition(), CONTENT_TYPE)
        if path == "/api/jobs":
            return self._api_jobs()
        match = _JOB_PATH.match(path)
        if match and not match.group(2):
            return self._job_page(match.group(1), authorised)
        return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def do_PUT(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/internal/"):
            return self._internal("PUT", path)
        return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/internal/"):
            return self._internal("POST", path)
        match = _JOB_PATH.match(path)
        if not (match and match.group(2)):
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        access = self._access()
        if access is None:
            return None
        authorised, who = access
        if self.status.credentials.configured and not authorised:
            return self._unauthorised()
        job_id = match.group(1)
        form = self._form()
        if not hmac.compare_digest(form.get("token", ""), self.status.retry_token(job_id)):
            return self._send(HTTPStatus.FORBIDDEN, b"stale or forged form: reload the page\n",
                              "text/plain")
        try:
            self.status.retry(job_id, who)
        except KeyError:
            return self._send(HTTPStatus.NOT_FOUND, b"no such job\n", "text/plain")
        except IllegalTransition as exc:
            return self._send(HTTPStatus.CONFLICT, f"{exc}\n".encode(), "text/plain")
        return self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": f"/jobs/{job_id}"})

    # -- the workers' API ----------------------------------------------------------------------
    def _internal(self, method: str, path: str) -> None:
        status = self.status
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if (status.remote is None or scheme.lower() != "bearer"
                or not hmac.compare_digest(token.strip().encode(), status.worker_token.encode())):
            return self._send(HTTPStatus.UNAUTHORIZED, b"worker token required\n", "text/plain",
                              {"WWW-Authenticate": "Bearer"})
        match = _INTERNAL_PATH.match(path)
        if not match:
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        job_id, action, number = match.group(1), match.group(2), match.group(3)
        try:
            return self._internal_call(status.remote, method, job_id, action, number)
        except KeyError as exc:
            return self._send(HTTPStatus.NOT_FOUND, f"{exc}\n".encode(), "text/plain")
        except (Conflict, IllegalTransition) as exc:
            return self._send(HTTPStatus.CONFLICT, f"{exc}\n".encode(), "text/plain")
        except StorageFailure as exc:
            log.error("job %s: %s", job_id, exc)
            return self._send(HTTPStatus.SERVICE_UNAVAILABLE, f"{exc}\n".encode(), "text/plain")

    def _internal_call(self, remote: RemoteJobs, method: str, job_id: str, action: str,
                       number: str | None) -> None:
        route = (method, action)
        if route == ("POST", "claim"):
            return self._json(remote.claim(job_id, str(self._body_json().get("worker", "?"))))
        if route == ("GET", "inputs") and number is not None:
            data = remote.input_path(job_id, int(number)).read_bytes()
            return self._send(HTTPStatus.OK, data, "application/dicom")
        if route == ("PUT", "results"):
            meta = json.loads(self.headers.get("X-Dicomnode-Meta") or "{}")
            job = remote.store_results(job_id, self._body(MAX_RESULTS_BYTES), meta)
            return self._json({"state": job.state.value})
        if route == ("GET", "results"):
            return self._send(HTTPStatus.OK, remote.results_archive(job_id), "application/x-tar")
        if route == ("POST", "failed"):
            body = self._body_json()
            job = remote.failed(job_id, str(body["reason"]), retryable=bool(body["retryable"]),
                                seconds=dict(body.get("seconds", {})))
            return self._json({"state": job.state.value})
        if route == ("POST", "delivered"):
            body = self._body_json()
            job = remote.delivered(job_id, body["results"], dict(body.get("seconds", {})))
            return self._json({"state": job.state.value})
        return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")

    def _body(self, limit: int) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise Conflict(f"request body of {length} bytes, more than {limit}")
        return self.rfile.read(length)

    def _body_json(self) -> dict[str, Any]:
        return json.loads(self._body(1 << 20) or b"{}")

    def _json(self, value: Any) -> None:
        self._send(HTTPStatus.OK, json.dumps(value).encode(), "application/json")

    def _form(self) -> dict[str, str]:
        length = min(int(self.headers.get("Content-Length") or 0), 4096)
        fields = urllib.parse.parse_qs(self.rfile.read(length).decode("ascii", "replace"))
        return {key: values[0] for key, values in fields.items()}

    def _healthz(self) -> None:
        health = self.status.health.run()
        body = json.dumps(health.as_json(reasons=bool(self._who())), indent=1).encode()
        code = HTTPStatus.OK if health.ok else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(code, body, "application/json")

    def _status_page(self, authorised: bool) -> None:
        status = self.status
        rows = [status.row(job) for job in status.jobs.recent(PAGE_JOBS)]
        page = status_page(status.listener(), rows, status.jobs.counts(),
                           authorised=authorised, now=status.clock())
        self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

    def _job_page(self, job_id: str, authorised: bool) -> None:
        status = self.status
        try:
            job = status.jobs.find(job_id)
        except KeyError:
            return self._send(HTTPStatus.NOT_FOUND, b"no such job\n", "text/plain")
        journal = [JournalRow(e.at, e.from_state or "", e.to_state, e.reason)
                   for e in status.jobs.journal(job.id)]
        # The job's own rows, and how its series arrived (before it was a job).
        entries = {a.seq: a for a in (
            *status.audit.query(series_uid=job.key.series_uid, event="received", limit=100),
            *status.audit.query(job_id=job.id, limit=200))}
        audit = [AuditRow(a.at, a.event, a.actor, a.destination, _detail(a.detail))
                 for _, a in sorted(entries.items())]
        page = job_page(status.row(job), journal, audit, authorised=authorised,
                        retry_token=status.retry_token(job.id))
        return self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")

    def _api_jobs(self) -> None:
        jobs = [{"id": j.id, "state": j.state.value, "reason": j.reason,
                 "study_uid": j.key.study_uid, "series_uid": j.key.series_uid,
                 "instances": len(j.inputs), "seconds": dict(j.seconds),
                 "created_at": j.created_at, "updated_at": j.updated_at}
                for j in self.status.jobs.recent(PAGE_JOBS)]
        self._send(HTTPStatus.OK, json.dumps(jobs).encode(), "application/json")

    def _send(self, code: HTTPStatus, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


def _detail(detail: Any) -> str:
    """An audit row's detail, short: counts and reasons, not every UID."""
    shown = {k: (f"{len(v)} instance(s)" if isinstance(v, list) else v) for k, v in dict(detail).items()}
    return ", ".join(f"{k} {v}" for k, v in shown.items())
