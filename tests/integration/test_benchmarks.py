"""Every benchmark runs and prints its figures: ``python3 benchmarks/<name>.py --smoke``.

Benchmarks are not timed tests: each script under ``benchmarks/`` must have a ``--smoke`` mode
(a tiny input, one round, seconds) and this file runs every one of them in a subprocess from
the project root, checking only that it exits 0 and prints at least one figure (a number
with a unit). No speed or memory figure is asserted. New scripts are picked up by themselves.

A script that needs a real part (dcmtk, Orthanc, the sarcoma cohort) skips on a laptop
without it, and fails under ``CI=true`` (``tests/conftest.py``), as every other test does.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from listener import STORESCU
from orthanc import DICOMWEB_PLUGIN, ORTHANC
from sarcoma import require_cohort

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
#: Seconds one smoke run may take; the whole file should stay within about two minutes.
SMOKE_SECONDS = 120
#: A figure: a number followed by a unit ("0.61 s", "712 MB", "33 MB/s", "3.4 lesions/s").
FIGURE = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?\s?(?:ms|s|min|h|[kKMG]i?B(?:/s)?|%|\w+/s)\b")


def _require_dcmtk() -> None:
    if not STORESCU.exists():
        pytest.skip(f"{STORESCU} is not installed (Debian package dcmtk)")


def _require_orthanc(*, dicomweb: bool = False) -> None:
    if not ORTHANC.exists() or (dicomweb and not DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc (with the DICOMweb plugin) is not installed (orthanc, "
                    "orthanc-dicomweb)")


def _require_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server)")


#: The real parts each script needs (skip without them, fail under CI=true).
REQUIRES = {
    "receive.py": lambda: (_require_dcmtk(), _require_orthanc()),
    "pacs_cohort.py": lambda: (_require_orthanc(dicomweb=True), require_cohort()),
    "e2e.py": lambda: _require_orthanc(dicomweb=True),
    "celery_throughput.py": lambda: (_require_dcmtk(), _require_redis()),
}

#: What else a script's output must show, beyond one figure.
EXPECTED = {
    # node, Orthanc and the pynetdicom SCPs side by side, with time and peak memory rows
    "receive.py": [r"\| dicomnode \| Orthanc [\d.]+ \| pynetdicom SCP, fsync \| "
                   r"pynetdicom SCP, no fsync \|",
                   r"\| time \|( [\d.]+ s \|){6}", r"\| peak RSS \|( \d+ MB \|){6}"],
    "job_memory.py": [r"peak during the job +\d+ MB, job \+ *-?\d+ MB",
                      r"whole tree peak +\d+ MB"],
    "pacs_cohort.py": [r"STS_\d+: identical"],
    # the whole time and its stages from the job's record, and the node's peak memory
    "celery_throughput.py": [r"1 worker\(s\): \d+ series in [\d.]+ s, [\d.]+ series/min"],
    "e2e.py": [r"\| \*\*the same minus the quiet period\*\* \| [\d.]+ s \|",
               r"\| report \| [\d.]+ s \|", r"node peak RSS: \d+ MB"],
}


def _run_smoke(script: Path) -> subprocess.CompletedProcess[str]:
    """``python3 benchmarks/<script> --smoke`` in its own process group, all of which is
    killed when it runs over ``SMOKE_SECONDS`` (a benchmark may start servers of its own)."""
    process = subprocess.Popen([sys.executable, str(script.relative_to(ROOT)), "--smoke"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=SMOKE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script.name} --smoke ran over {SMOKE_SECONDS} s; it printed:\n"
                    f"{stdout[-3000:]}{stderr[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # what a benchmark that exited left running in its group (nothing, normally)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_every_benchmark_is_found() -> None:
    assert {"receive.py", "job_memory.py", "pacs_cohort.py"} <= {s.name for s in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_smoke_prints_its_figures(script: Path) -> None:
    REQUIRES.get(script.name, lambda: None)()
    run = _run_smoke(script)
    output = run.stdout + run.stderr
    print(run.stdout)
    assert run.returncode == 0, f"{script.name} --smoke exited {run.returncode}:\n{output[-3000:]}"
    figures = [line for line in run.stdout.splitlines() if FIGURE.search(line)]
    assert figures, f"{script.name} --smoke printed no figure (a number with a unit):\n{output}"
    for pattern in EXPECTED.get(script.name, []):
        assert re.search(pattern, run.stdout), f"{script.name}: no match for {pattern!r}:\n{output}"
