"""How fast does the node receive a CT series, next to dcmtk storescp and Orthanc?

Sends each series with dcmtk ``/usr/bin/storescu`` (one association, ``TCP_NODELAY=1``: without
it DCMTK waits for a 40 ms delayed ACK per instance on loopback) to:

- ``dicomnode``: :func:`dicomnode.receive.start_listener` in this process on a free loopback
  port, with a fresh spool and index per run (every instance fsynced and indexed before its
  Success);
- ``pynetdicom floor``: the same AE whose C-STORE handler stores nothing and answers Success
  (what pynetdicom itself costs);
- ``storescp``: dcmtk ``/usr/bin/storescp`` writing files without fsync;
- ``orthanc``: ``/usr/sbin/Orthanc`` with a fresh storage folder (durable like the node: it
  syncs each file and its SQLite index), when installed.

Series: the real ``ibsi_sts_001`` CT (59 slices of 202x198, implicit VR) from
``../shared/data`` and a synthetic 134 x 512 x 512 CT (explicit VR, 68 MB) made on the fly.
Runs are interleaved (one round = every receiver once) so that load from other processes
hits all receivers alike; the median of the rounds is printed with instances/s and MB/s.

Usage (from the project root)::

    python3 benchmarks/receive.py [--rounds 3] [--max-pdu 1048576 16384]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import evt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.config import Config, NodeConfig  # noqa: E402
from dicomnode.receive import build_ae, start_listener  # noqa: E402
from dicomnode.spool.index import Index  # noqa: E402
from dicomnode.spool.store import Spool  # noqa: E402

IBSI = ROOT.parent / "shared" / "data" / "ibsi_sts_001" / "dicom" / "CT" / "image"
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: Receives one series (folder of files) using a scratch folder; returns the seconds it took.
Receiver = Callable[[Path, Path], float]


def make_synthetic_ct(folder: Path, slices: int = 134, size: int = 512) -> Path:
    """Write an evenly spaced synthetic CT series (noise, 2.5 mm slices) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for i in range(slices):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = "BENCHMARK^CT", "BENCHMARK"
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -100.0 + 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.98, 0.98], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = rng.integers(0, 2000, (size, size), dtype=np.int16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return folder


def send(series: Path, port: int, called_ae: str) -> float:
    """Send every file of ``series`` in one association; seconds from start to exit."""
    started = time.perf_counter()
    subprocess.run(
        [str(STORESCU), "-aec", called_ae, "127.0.0.1", str(port), str(series), "+sd"],
        check=True,
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicomnode_receiver(max_pdu: int) -> Receiver:
    def run(series: Path, work: Path) -> float:
        config = Config(node=NodeConfig(host="127.0.0.1", port=0, max_pdu=max_pdu))
        index = Index(work / "index.sqlite")
        server = start_listener(config, Spool(work / "spool"), index)
        try:
            seconds = send(series, server.server_address[1], config.node.ae_title)
        finally:
            server.shutdown()
        expected = len(list(series.iterdir()))
        received = sum(s.instance_count for s in index.pending_series())
        index.close()
        if received != expected:
            raise RuntimeError(f"dicomnode indexed {received} of {expected} instances")
        return seconds

    return run


def pynetdicom_floor_receiver(series: Path, work: Path) -> float:
    """The same AE with a C-STORE handler that stores nothing: pynetdicom's own cost."""
    config = Config(node=NodeConfig(host="127.0.0.1", port=0))
    server = build_ae(config).start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)]
    )
    try:
        return send(series, server.server_address[1], config.node.ae_title)
    finally:
        server.shutdown()


def storescp_receiver(series: Path, work: Path) -> float:
    port = free_port()
    out = work / "out"
    out.mkdir()
    scp = subprocess.Popen(
        [str(STORESCP), "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        return send(series, port, "STORESCP")
    finally:
        scp.terminate()
        scp.wait()


def orthanc_receiver(series: Path, work: Path) -> float:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    orthanc = subprocess.Popen(
        [str(ORTHANC), str(work / "orthanc.json")],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_http(f"http://127.0.0.1:{http_port}/system")
        return send(series, dicom_port, "ORTHANC")
    finally:
        orthanc.terminate()
        orthanc.wait()


def _wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} does not answer")


def measure(
    series: dict[str, Path], receivers: dict[str, Receiver], rounds: int, scratch: Path
) -> dict[tuple[str, str], list[float]]:
    """Seconds per (series, receiver), one run of each receiver per round."""
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for series_name, folder in series.items():
            for receiver_name, receive in receivers.items():
                work = Path(tempfile.mkdtemp(dir=scratch))
                try:
                    times.setdefault((series_name, receiver_name), []).append(receive(folder, work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    return times


def report(series: dict[str, Path], times: dict[tuple[str, str], list[float]]) -> None:
    print(f"{'series':<26}{'receiver':<26}{'median s':>9}{'inst/s':>9}{'MB/s':>8}   runs (s)")
    for (series_name, receiver_name), runs in times.items():
        files = list(series[series_name].iterdir())
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        median = statistics.median(runs)
        print(
            f"{series_name:<26}{receiver_name:<26}{median:>9.3f}{len(files) / median:>9.0f}"
            f"{megabytes / median:>8.1f}   {' '.join(f'{r:.3f}' for r in runs)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--max-pdu",
        type=int,
        nargs="+",
        default=[1048576],
        help="dicomnode maximum PDU sizes to compare (node.max_pdu, 4096..16777216)",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=ROOT / "var" / "benchmarks",
        help="folder for spools and received files (on the disk under test)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not STORESCU.exists():
        sys.exit(f"{STORESCU} not found: install dcmtk")
    args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        series = {}
        if IBSI.is_dir():
            series["ibsi_sts_001 59x202x198"] = IBSI
        series["synthetic 134x512x512"] = make_synthetic_ct(scratch / "synthetic")
        receivers: dict[str, Receiver] = {
            f"dicomnode pdu={p}": dicomnode_receiver(p) for p in args.max_pdu
        }
        receivers["pynetdicom floor (no-op)"] = pynetdicom_floor_receiver
        if STORESCP.exists():
            receivers["storescp (no fsync)"] = storescp_receiver
        if ORTHANC.exists():
            receivers["orthanc 1.10"] = orthanc_receiver
        report(series, measure(series, receivers, args.rounds, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
