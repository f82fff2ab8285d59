"""``dicomnode viewer``'s server: OHIF's files, its configuration, and the DICOMweb proxy."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from dicomnode.viewer import ViewerError, ViewerServer, find_ohif_dist


class _Pacs(BaseHTTPRequestHandler):
    """A stand-in DICOMweb root that echoes what it was asked."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"path": self.path, "accept": self.headers.get("Accept")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def pacs():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/orthanc/dicom-web"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def dist(tmp_path: Path) -> Path:
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "index.html").write_text("<html>OHIF</html>")
    (folder / "app.bundle.js").write_text("console.log('ohif')")
    (tmp_path / "secret.txt").write_text("not for the browser")
    return folder


def test_the_viewer_serves_ohif_its_configuration_and_proxies_dicomweb(pacs, dist):
    with ViewerServer(pacs, dist, friendly_name="Our PACS") as server:
        page = requests.get(f"{server.url}/viewer?StudyInstanceUIDs=1.2.3", timeout=10)
        assert page.text == "<html>OHIF</html>"  # the single-page app's own route
        assert page.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        script = requests.get(f"{server.url}/app.bundle.js", timeout=10)
        assert script.headers["Content-Type"] == "application/javascript"
        config = requests.get(f"{server.url}/app-config.js", timeout=10).text
        assert "qidoRoot: '/dicom-web'" in config and '"Our PACS"' in config
        answer = requests.get(f"{server.url}/dicom-web/studies?PatientID=1",
                              headers={"Accept": "application/dicom+json"}, timeout=10).json()
        assert answer == {"path": "/orthanc/dicom-web/studies?PatientID=1",
                          "accept": "application/dicom+json"}
        assert server.proxied == [("GET", "/dicom-web/studies?PatientID=1", 200)]
        # Nothing outside dist/ is served: the app's page comes back instead.
        escaped = requests.get(f"{server.url}/..%2Fsecret.txt", timeout=10)
        assert "not for the browser" not in escaped.text


def test_a_silent_pacs_gives_a_502_that_says_so(dist):
    with ViewerServer("http://127.0.0.1:9/dicom-web", dist) as server:
        answer = requests.get(f"{server.url}/dicom-web/studies", timeout=10)
    assert answer.status_code == 502 and "did not answer" in answer.text


def test_missing_ohif_and_a_bad_root_are_explained(tmp_path, dist, monkeypatch):
    monkeypatch.delenv("DICOMNODE_OHIF_DIST", raising=False)
    monkeypatch.setenv("DICOMNODE_HOME", str(tmp_path))
    with pytest.raises(ViewerError, match="docker/install.sh --test"):
        find_ohif_dist(tmp_path / "nowhere")
    assert find_ohif_dist(dist) == dist.resolve()
    with pytest.raises(ViewerError, match="not an http"):
        ViewerServer("pacs:8042", dist)
