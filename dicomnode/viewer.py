"""``dicomnode viewer``: OHIF in front of a PACS's DICOMweb, on this machine (EDGE).

A radiologist judges dicomnode by what the viewer shows. This serves OHIF's prebuilt ``dist/``
(npm ``@ohif/app``, installed by ``docker/install.sh --test`` into ``tests/viewer``, or any
copy named by ``--ohif-dist`` / ``DICOMNODE_OHIF_DIST``) on a loopback port and proxies
``/dicom-web/*`` to the PACS's DICOMweb root, so that the browser sees one origin: no CORS set-up
on the PACS, and OHIF gets the cross-origin isolation it wants for volume loading.

:class:`ViewerServer` is also what the real-viewer test drives (``tests/integration/test_viewer.py``).
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dicomnode.config import home

#: Where ``docker/install.sh --test`` puts OHIF (relative to the dicomnode checkout).
INSTALLED_DIST = Path("tests") / "viewer" / "node_modules" / "@ohif" / "app" / "dist"

#: OHIF's configuration: one DICOMweb data source at the same origin (``/dicom-web``), no
#: investigational-use dialog (the results carry their own research labels).
APP_CONFIG = """\
/** dicomnode viewer: one DICOMweb data source, the PACS behind /dicom-web. */
window.config = {
  name: 'dicomnode',
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
        friendlyName: %(friendly_name)s,
        name: 'pacs',
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
#: Request headers passed on to the PACS (Host too: Orthanc's DICOMweb plugin writes the
#: retrieve and bulk data URLs in its answers from it, so they point at this server), and the
#: response headers passed back.
_FORWARD_REQUEST = ("host", "accept", "content-type", "content-length", "range")
_FORWARD_RESPONSE = ("content-type", "content-range", "etag", "last-modified")
PREFIX = "/dicom-web"


class ViewerError(Exception):
    """OHIF is not installed where we looked, or the DICOMweb root is not a URL."""


def find_ohif_dist(explicit: Path | str | None = None) -> Path:
    """OHIF's ``dist/``: ``explicit``, else ``$DICOMNODE_OHIF_DIST``, else the copy that
    ``docker/install.sh --test`` installs in the checkout."""
    candidates = [Path(p) for p in (explicit, os.environ.get("DICOMNODE_OHIF_DIST")) if p]
    candidates.append(home() / INSTALLED_DIST)
    for candidate in candidates:
        if (candidate / "index.html").is_file():
            return candidate.resolve()
    raise ViewerError(
        "OHIF is not installed: looked for index.html in " + ", ".join(map(str, candidates))
        + ". Install it with `bash docker/install.sh --test` (npm @ohif/app, its dist/) or "
        "name a copy with --ohif-dist / DICOMNODE_OHIF_DIST")


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass  # request paths hold study UIDs; nothing to log by default

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path == PREFIX or path.startswith(PREFIX + "/"):
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, self.server.app_config, "application/javascript")
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
        server = self.server
        upstream_path = server.upstream_path + self.path[len(PREFIX):]
        connection = (http.client.HTTPSConnection if server.upstream_https
                      else http.client.HTTPConnection)
        upstream = connection(server.upstream_host, server.upstream_port, timeout=60)
        try:
            upstream.request(self.command, upstream_path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        except OSError as exc:
            self._send(502, f"the PACS did not answer: {exc}".encode(), "text/plain")
            return
        finally:
            upstream.close()
        server.proxied.append((self.command, self.path, response.status))
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() in _FORWARD_RESPONSE:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self._isolation_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, dicomweb_root: str, address: tuple[str, int],
                 friendly_name: str) -> None:
        parts = urllib.parse.urlsplit(dicomweb_root)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ViewerError(f"DICOMweb root {dicomweb_root!r} is not an http(s) URL")
        super().__init__(address, _Handler)
        self.dist = dist.resolve()
        self.upstream_https = parts.scheme == "https"
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or (443 if self.upstream_https else 80)
        self.upstream_path = parts.path.rstrip("/")
        self.app_config = (APP_CONFIG % {"friendly_name": json.dumps(friendly_name)}).encode()
        self.proxied: list[tuple[str, str, int]] = []


class ViewerServer:
    """OHIF's ``dist/`` on ``host:port`` (0: a free port), ``/dicom-web/*`` proxied to
    ``dicomweb_root`` (e.g. ``http://127.0.0.1:8042/dicom-web`` for Orthanc)."""

    def __init__(self, dicomweb_root: str, dist: Path | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, friendly_name: str = "PACS") -> None:
        self._server = _Server(find_ohif_dist(dist), dicomweb_root, (host, port), friendly_name)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="ohif-server")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def proxied(self) -> list[tuple[str, str, int]]:
        """(method, path, status) of every request passed to the PACS, in order."""
        return list(self._server.proxied)

    def start(self) -> "ViewerServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "ViewerServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def viewer_url(self, study_uid: str | None = None, mode: str = "viewer") -> str:
        """The page that opens one study in a mode (``viewer`` is OHIF's basic viewer), or the
        study list without a study."""
        if study_uid is None:
            return f"{self.url}/"
        return f"{self.url}/{mode}?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"
