"""The real viewer for tests: OHIF 3.13.2 served on loopback in front of a test Orthanc by
:class:`dicomnode.viewer.ViewerServer` (what ``dicomnode viewer`` runs), driven by headless
Chromium (playwright-core) through ``tests/viewer/probe.mjs``.

``docker/install.sh --test`` installs what this needs: Debian's ``chromium`` (and ``nodejs``
when node is missing), ``npm ci`` of ``tests/viewer/package.json`` (playwright-core), and the
pinned ``@ohif/app`` package unpacked into ``tests/viewer/node_modules/@ohif/app`` (only its
prebuilt ``dist/`` is used: the published package's own dependencies cannot be installed).
:func:`probe` runs the Node script, which opens a study, does what the request asks and prints
one JSON object.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicomnode.viewer import ViewerServer

__all__ = ["OHIF_DIST", "STATUS_PROBE", "ViewerServer", "probe", "require_browser",
           "require_viewer"]

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
NODE_MODULES = VIEWER_DIR / "node_modules"
OHIF_PACKAGE = NODE_MODULES / "@ohif" / "app"
OHIF_DIST = OHIF_PACKAGE / "dist"
PLAYWRIGHT = NODE_MODULES / "playwright-core"
PROBE = VIEWER_DIR / "probe.mjs"
STATUS_PROBE = VIEWER_DIR / "status.mjs"
CHROMIUM = Path(os.environ.get("DICOMNODE_CHROMIUM", "/usr/bin/chromium"))
#: The OHIF release the tests are written against (and ``package.json`` pins).
OHIF_VERSION = json.loads((VIEWER_DIR / "package.json").read_text())["ohifApp"]["version"]

def require_browser() -> None:
    """Skip (a failure under CI=true, see conftest) when Chromium, node or playwright-core
    (what ``docker/install.sh --test`` installs) is missing."""
    _require(_browser_parts(), "the browser is not installed")


def require_viewer() -> None:
    """:func:`require_browser`, and the pinned OHIF."""
    _require([*_browser_parts(), (
        f"OHIF {OHIF_VERSION} in {OHIF_PACKAGE} (docker/install.sh --test)",
        (OHIF_DIST / "index.html").exists() and _installed_ohif_version() == OHIF_VERSION,
    )], "the real viewer is not installed")


def _browser_parts() -> list[tuple[str, bool]]:
    return [
        (f"Chromium at {CHROMIUM} (Debian package chromium)", CHROMIUM.exists()),
        ("node (Debian package nodejs)", shutil.which("node") is not None),
        (f"playwright-core in {NODE_MODULES} (npm ci in tests/viewer)", PLAYWRIGHT.is_dir()),
    ]


def _require(parts: list[tuple[str, bool]], what: str) -> None:
    missing = [name for name, there in parts if not there]
    if missing:
        pytest.skip(f"{what}: " + "; ".join(missing))


def _installed_ohif_version() -> str | None:
    try:
        return json.loads((OHIF_PACKAGE / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def probe(request: dict, *, timeout: float = 150.0, script: Path = PROBE) -> dict:
    """Run ``script`` (``probe.mjs``: OHIF; ``status.mjs``: dicomnode's status page) with
    ``request`` (JSON on its standard input) and return the JSON object it prints last; its own
    log lines (stderr) are in ``result["log"]``."""
    run = subprocess.run(
        ["node", str(script)], check=False, input=json.dumps({"chromium": str(CHROMIUM), **request}),
        capture_output=True, text=True, timeout=timeout, cwd=VIEWER_DIR,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} exited with {run.returncode}:\n{run.stdout[-4000:]}\n"
                           f"{run.stderr[-8000:]}")
    result = json.loads(lines[-1])
    result["log"] = run.stderr
    return result
