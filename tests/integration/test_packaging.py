"""`pip install .` gives a working `dicomnode` that finds its models and configurations
without the checkout (they install under <prefix>/share/dicomnode)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pip_install_dot_gives_a_working_entry_point(tmp_path):
    venv = tmp_path / "venv"
    # The venv sees the already installed dependencies; only dicomnode itself is installed.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    pip = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    env = {k: v for k, v in os.environ.items() if k != "DICOMNODE_HOME"}
    run = subprocess.run(
        [venv / "bin" / "dicomnode", "check-config"], cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert run.returncode == 0, run.stderr
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import dicomnode.config as c; print(c.home())"],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )
    assert where.stdout.strip() == str(venv / "share" / "dicomnode")
    assert (venv / "share" / "dicomnode" / "models" / "tmb" / "model.json").exists()
