"""The PURE/EDGE rule of dicomnode/__init__.py, checked on the source: pure modules import no
network, database or process machinery, so tests can drive them with plain values."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dicomnode"
PURE = [
    "types.py", "errors.py", "assemble.py", "pipeline.py", "series/completion.py",
    "analyse/segment.py", "analyse/radiomics.py", "analyse/regional.py", "analyse/measure.py",
    "analyse/predict.py", "analyse/supplied.py", "masks.py",
    "report/seg.py", "report/sr.py", "report/template.py", "report/charset.py",
    "report/keyslice.py", "report/palette.py", "report/equipment.py", "report/findings.py",
    "report/keyimages.py", "report/pdf.py", "jobs/machine.py", "receive/header.py",
]
EDGE_IMPORTS = {"socket", "sqlite3", "subprocess", "pynetdicom", "requests", "dicomweb_client",
                "http", "urllib", "dicomnode.receive", "dicomnode.spool", "dicomnode.deliver",
                "dicomnode.jobs.store", "dicomnode.jobs.runner", "dicomnode.node"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_edge(module):
    path = PACKAGE / module
    assert path.exists(), f"{module} is listed as pure but does not exist"
    bad = {m for m in imported_modules(path) for edge in EDGE_IMPORTS if m == edge or m.startswith(edge + ".")}
    assert not bad, f"{module} imports {sorted(bad)}"
