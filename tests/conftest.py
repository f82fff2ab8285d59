"""Shared fixtures: a real Orthanc on loopback, the listener in-process, and the third-party
test data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from listener import Node, listeners
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: Under CI=true every real part (Orthanc, dcmtk, dicom3tools, openssl, the shared data) must
#: be there: a test that skips for want of one fails instead, so a green CI means it ran.
STRICT = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    # An unconditional @pytest.mark.skip is a design decision with its reason; every other
    # skip (pytest.skip(), skipif) means something the test needs was missing.
    expected_failure = hasattr(report, "wasxfail")  # an xfail is reported as skipped
    if (STRICT and report.skipped and not expected_failure
            and item.get_closest_marker("skip") is None):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every real part must be present: {reason}"


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` next to the project (see its MANIFEST.md); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"third-party test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthancs with chosen options (``Orthanc(**kwargs)``); all are stopped afterwards."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    started: list[Orthanc] = []

    def start(**kwargs: object) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    """A running Orthanc without authentication."""
    return orthanc_factory()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process listeners on free loopback ports (``NodeConfig`` options as
    arguments); all are stopped afterwards."""
    with listeners(tmp_path) as start:
        yield start
