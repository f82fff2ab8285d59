"""Patient data stays private on disk: the modes of everything a real node run writes.

The real node (``python -m dicomnode serve``) receives a CT series by dcmtk ``storescu``,
analyses it and delivers the results to a folder destination. Then every path under its data
folder and under the destination, while the node still runs (SQLite's ``-wal`` and ``-shm``
files exist then) and after it stopped, must be a file 0600 or a folder 0700: no other user
of the machine reads names, IDs or birth dates. With ``node.file_group`` set, files are 0640
and folders 2750 (setgid), all owned by that group.

``dicomnode process --out`` is held to the same modes. The segmenter is the threshold plug-in
of ``tests/segment_plugin.py``, so that the series gives a SEG in seconds.
"""

from __future__ import annotations

import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.phantom import make_phantom_study, write_study
from nodeproc import REPO, NodeProcess, query, wait_until, write_config
from orthanc import free_port

STORESCU = Path("/usr/bin/storescu")
TESTS = Path(__file__).resolve().parents[1]
DENSE_HU = 2000.0  # above segment_plugin.THRESHOLD_HU: one lesion
LESION = (slice(6, 10), slice(24, 32), slice(24, 32))

pytestmark = pytest.mark.skipif(not STORESCU.exists(), reason="needs dcmtk storescu")


def other_group() -> str:
    """A group the node's user may give files to: ``daemon`` for root, else one of its own."""
    if os.geteuid() == 0:
        return "daemon"
    others = [gid for gid in os.getgroups() if gid != os.getegid()]
    return grp.getgrgid(others[0] if others else os.getegid()).gr_name


def ct_with_a_dense_lesion(folder: Path) -> list[Path]:
    phantom = make_phantom_study(10011, shape=(16, 64, 64), spacing=(2.5, 3.0, 3.0))
    for z, ds in enumerate(phantom.datasets):
        if LESION[0].start <= z < LESION[0].stop:
            hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            hu[LESION[1], LESION[2]] = DENSE_HU
            stored = (hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
            ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    return write_study(phantom, folder)


def bad_modes(roots: list[Path], file_mode: int, folder_mode: int, gid: int | None) -> list[str]:
    """Every path under ``roots`` (roots included) whose mode or group is not the wanted one."""
    bad = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            wanted = folder_mode if stat.S_ISDIR(st.st_mode) else file_mode
            if stat.S_IMODE(st.st_mode) != wanted or (gid is not None and st.st_gid != gid):
                bad.append(f"{stat.S_IMODE(st.st_mode):04o} {grp.getgrgid(st.st_gid).gr_name} {path}")
    return bad


def run_node(tmp_path: Path, file_group: str) -> tuple[NodeProcess, list[Path]]:
    """A node that has delivered one series to its folder destination, still running; the
    folders it wrote."""
    port, data_dir, destination = free_port(), tmp_path / "node", tmp_path / "delivered"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "folder", "name": "folder", "path": destination}],
        node={"file_group": file_group}, completion={"quiet_seconds": 1},
        segmentation={"plugin": "segment_plugin:make"},
    )
    files = ct_with_a_dense_lesion(tmp_path / "ct")
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    sent = subprocess.run([str(STORESCU), "-aec", "DICOMNODE", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    wait_until(lambda: [s for (s,) in query(data_dir / "jobs.sqlite", "SELECT state FROM jobs")]
               == ["delivered"], 60, "the job delivered", node)
    return node, [data_dir, destination]


@pytest.mark.parametrize("grouped", [False, True], ids=["owner-only", "file_group"])
def test_everything_a_run_writes_is_private(tmp_path, monkeypatch, grouped):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the node process imports the plug-in
    group = other_group() if grouped else ""
    file_mode, folder_mode = (0o640, 0o2750) if grouped else (0o600, 0o700)
    gid = grp.getgrnam(group).gr_gid if grouped else None
    node, roots = run_node(tmp_path, group)
    try:
        written = {p.name for root in roots for p in root.rglob("*")}
        # What the run wrote: spooled CT, both databases with their write-ahead logs, the
        # result objects and summary, and the delivered SEG and SR.
        assert {"index.sqlite", "index.sqlite-wal", "jobs.sqlite-shm", "seg.dcm", "sr.dcm",
                "summary.json"} <= written, written
        assert len(list(roots[1].rglob("*.dcm"))) >= 2
        assert bad_modes(roots, file_mode, folder_mode, gid) == []
    finally:
        node.stop()
    assert bad_modes(roots, file_mode, folder_mode, gid) == []
    assert "made private" not in node.log_tail()  # nothing was loose: no tightening warning



def test_process_writes_private_results(tmp_path):
    """``dicomnode process --out`` makes its results as private as the node's."""
    files = ct_with_a_dense_lesion(tmp_path / "ct")
    config = tmp_path / "process.toml"
    config.write_text('[segmentation]\nplugin = "segment_plugin:make"\n')
    out = tmp_path / "results" / "new"
    run = subprocess.run(
        [sys.executable, "-m", "dicomnode", "process", str(files[0].parent), "--out", str(out),
         "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert {"seg.dcm", "sr.dcm", "summary.json"} <= {p.name for p in out.rglob("*")}
    assert bad_modes([tmp_path / "results"], 0o600, 0o700, None) == []
