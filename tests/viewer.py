"""The real viewer for tests: OHIF 3.13.2 served on loopback in front of a test Orthanc, driven
by headless Chromium (playwright-core) through ``tests/viewer/probe.mjs``.

``docker/install.sh --test`` installs what this needs: Debian's ``chromium`` (and ``nodejs``
when node is missing), ``npm ci`` of ``tests/viewer/package.json`` (playwright-core), and the
pinned ``@ohif/app`` package unpacked into ``tests/viewer/node_modules/@ohif/app`` (only its
prebuilt ``dist/`` is used: the published package's own dependencies cannot be installed).

:class:`ViewerServer` is a small threaded HTTP server on 127.0.0.1 that

- serves OHIF's ``dist/`` with the single-page-app fallback to ``index.html``,
- answers ``/app-config.js`` with a configuration whose one data source is DICOMweb at the same
  origin (``/dicom-web``), and
- proxies ``/dicom-web/*`` to the Orthanc given (its DICOMweb plugin answers there),

so that the browser sees one origin and no CORS is involved. :func:`probe` runs the Node
script, which opens a study, does what the request asks and prints one JSON object.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import shutil
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
NODE_MODULES = VIEWER_DIR / "node_modules"
OHIF_PACKAGE = NODE_MODULES / "@ohif" / "app"
OHIF_DIST = OHIF_PACKAGE / "dist"
PLAYWRIGHT = NODE_MODULES / "playwright-core"
PROBE = VIEWER_DIR / "probe.mjs"
CHROMIUM = Path(os.environ.get("DICOMNODE_CHROMIUM", "/usr/bin/chromium"))
#: The OHIF release the tests are written against (and ``package.json`` pins).
OHIF_VERSION = json.loads((VIEWER_DIR / "package.json").read_text())["ohifApp"]["version"]

#: Our configuration: the shipped default's viewer settings, one DICOMweb data source at the
#: same origin, no investigational-use dialog, no study prefetcher.
APP_CONFIG = """\
/** dicomnode tests: one DICOMweb data source, the test Orthanc behind /dicom-web. */
window.config = {
  name: 'dicomnode-tests',
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  experimentalStudyBrowserSort: false,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  maxNumRequests: { interaction: 100, thumbnail: 10, prefetch: 10 },
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'dicomnode test Orthanc',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""

_TYPES = {
    ".js": "application/javascript", ".mjs": "application/javascript", ".wasm": "application/wasm",
    ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
    ".svg": "image/svg+xml", ".woff2": "font/woff2", ".png": "image/png", ".ico": "image/x-icon",
}
#: Request headers passed on to Orthanc (Host too: its DICOMweb plugin writes the retrieve and
#: bulk data URLs in its answers from it, so they point at this server), and those passed back.
_FORWARD_REQUEST = ("host", "accept", "content-type", "content-length", "range")
_FORWARD_RESPONSE = ("content-type", "content-length", "content-range", "etag", "last-modified")


def require_viewer() -> None:
    """Skip (a failure under CI=true, see conftest) when Chromium, node or the npm packages
    that ``docker/install.sh --test`` installs are missing."""
    missing = [what for what, there in (
        (f"Chromium at {CHROMIUM} (Debian package chromium)", CHROMIUM.exists()),
        ("node (Debian package nodejs)", shutil.which("node") is not None),
        (f"playwright-core in {NODE_MODULES} (npm ci in tests/viewer)", PLAYWRIGHT.is_dir()),
        (f"OHIF {OHIF_VERSION} in {OHIF_PACKAGE} (docker/install.sh --test)",
         (OHIF_DIST / "index.html").exists() and _installed_ohif_version() == OHIF_VERSION),
    ) if not there]
    if missing:
        pytest.skip("the real viewer is not installed: " + "; ".join(missing))


def _installed_ohif_version() -> str | None:
    try:
        return json.loads((OHIF_PACKAGE / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path == "/dicom-web" or path.startswith("/dicom-web/"):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, APP_CONFIG.encode(), "application/javascript")
            else:
                self._static(path)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away (page closed, request cancelled)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self._isolation_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _isolation_headers(self) -> None:
        # Cross-origin isolation gives OHIF SharedArrayBuffer (volume loading), as its docs ask.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")

    def _static(self, path: str) -> None:
        dist = self.server.dist
        relative = urllib.parse.unquote(path).lstrip("/")
        target = (dist / relative).resolve() if relative else dist / "index.html"
        if not (target.is_file() and target.is_relative_to(dist)):
            target = dist / "index.html"  # the SPA's own routes (/viewer, /segmentation, ...)
        content_type = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] \
            or "application/octet-stream"
        self._send(200, target.read_bytes(), content_type)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARD_REQUEST}
        upstream = http.client.HTTPConnection(self.server.upstream_host,
                                              self.server.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() in _FORWARD_RESPONSE and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self._isolation_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.server.proxied.append((self.command, self.path, response.status))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.dist = dist.resolve()
        parts = urllib.parse.urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.proxied: list[tuple[str, str, int]] = []


class ViewerServer:
    """OHIF's ``dist/`` on a free loopback port, ``/dicom-web`` proxied to ``orthanc_url``
    (an Orthanc's HTTP root, e.g. ``Orthanc.http_url``)."""

    def __init__(self, orthanc_url: str, dist: Path = OHIF_DIST) -> None:
        self._server = _Server(dist, orthanc_url)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="ohif-server")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def proxied(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request passed to Orthanc, in order."""
        return list(self._server.proxied)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def viewer_url(self, study_uid: str, mode: str = "viewer") -> str:
        """The page that opens one study in a mode (``viewer`` is OHIF's basic viewer)."""
        return f"{self.url}/{mode}?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"


def probe(request: dict, *, timeout: float = 150.0) -> dict:
    """Run ``probe.mjs`` with ``request`` (JSON on its standard input) and return the JSON
    object it prints last; its own log lines (stderr) are in ``result["log"]``."""
    run = subprocess.run(
        ["node", str(PROBE)], check=False, input=json.dumps({"chromium": str(CHROMIUM), **request}),
        capture_output=True, text=True, timeout=timeout, cwd=VIEWER_DIR,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"probe.mjs exited with {run.returncode}:\n{run.stdout[-4000:]}\n"
                           f"{run.stderr[-8000:]}")
    result = json.loads(lines[-1])
    result["log"] = run.stderr
    return result
