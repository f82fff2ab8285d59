"""Run the DICOM validators on files we wrote: dicom3tools' dciodvfy and DCMTK's dsrdump.

``dciodvfy`` checks the IOD (attributes, VRs, conditions) but not SR content-tree
relationships; ``dsrdump`` (exit status 1) does check those, e.g. CONTAINER has-properties NUM.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian packages dicom3tools and dcmtk)")


def dciodvfy_errors(path: Path | str) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``path`` (warnings are not returned)."""
    _require(DCIODVFY)
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    if run.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with {run.returncode}: {output[-500:]}")
    return errors


def dsrdump_ok(path: Path | str) -> tuple[bool, str]:
    """Whether ``dsrdump -q`` accepts the SR at ``path``, and what it printed."""
    _require(DSRDUMP)
    # errors="replace": dsrdump prints names in the SR's own character set, e.g. Latin-1.
    run = subprocess.run([DSRDUMP, "-q", str(path)], capture_output=True, text=True,
                         errors="replace", timeout=120)
    return run.returncode == 0, run.stderr or run.stdout[-2000:]
