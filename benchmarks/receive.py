"""How fast does the node receive a CT series, next to Orthanc and a minimal pynetdicom SCP?

Sends each series with dcmtk ``/usr/bin/storescu`` (one association, ``TCP_NODELAY=1``: without
it DCMTK waits for a 40 ms delayed ACK per instance on loopback) to each receiver, every one
in its own process started fresh for each run with an empty storage folder on the scratch
disk, on a free loopback port:

- ``dicomnode``: the node's listener (:func:`dicomnode.receive.start_listener`, the one
  ``dicomnode serve`` runs, without the job runner and its models): every instance is streamed
  to a private file, fsynced, renamed into the spool, the folder fsynced, and indexed in SQLite
  (``synchronous=FULL``) before its Success;
- ``Orthanc``: ``/usr/sbin/Orthanc`` without plugins (durable like the node: it syncs each
  file, ``SyncStorageArea``, and its SQLite index);
- ``pynetdicom SCP, fsync``: a plain pynetdicom ``AE`` (the Storage SCP presentation contexts
  of ``StoragePresentationContexts``, the node's maximum PDU) whose C-STORE handler writes
  ``event.encoded_dataset()`` to ``<SOP Instance UID>.dcm`` and fsyncs the file and its folder
  before answering Success (durable files, no index: the fair reference for the node);
- ``pynetdicom SCP, no fsync``: the same handler without the two fsyncs;
- ``pynetdicom no-op``: the same AE whose handler stores nothing and answers Success (what
  pynetdicom itself costs);
- ``dcmtk storescp``: ``/usr/bin/storescp -od DIR`` (writes files, no fsync).

After each run the instances each receiver stored are counted (index, files, Orthanc's
``/statistics``); a receiver that lost one stops the benchmark. Runs are interleaved (one
round = every receiver once per series, each round starting with the next receiver) so that
load from other processes hits all receivers alike; before each run the page cache is written
back (``sync``) and received files are deleted only at the end (the scratch folder needs
rounds x receivers x series of space, about 2.5 GB for 5 rounds), so that no run pays for
another's writes or deletions. Printed: one Markdown table, receivers side by side: per
series the median seconds of the rounds (with the range), MB/s, and the resident memory of
the receiver's process when it is ready (``VmRSS``) and its peak by the end of the run
(``VmHWM``, largest of the rounds).

Series: the real ``ibsi_sts_001`` CT (59 slices of 202x198, implicit VR) from
``../shared/data`` when it is there, and a synthetic 134 x 512 x 512 CT (explicit VR, 70 MB)
made on the fly. ``--smoke``: one round of a 10 x 128 x 128 synthetic series (seconds, for CI;
its figures mean nothing).

Usage (from the project root)::

    python3 benchmarks/receive.py [--rounds 5] [--max-pdu 1048576 16384] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IBSI = ROOT.parent / "shared" / "data" / "ibsi_sts_001" / "dicom" / "CT" / "image"
STORESCU = Path("/usr/bin/storescu")
STORESCP = Path("/usr/bin/storescp")
ORTHANC = Path("/usr/sbin/Orthanc")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NODE_AE = "DICOMNODE"
#: The kinds of receiver this script runs in a child process (``--serve KIND``).
CHILD_KINDS = ("dicomnode", "pynetdicom-fsync", "pynetdicom", "noop")


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


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident so far) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


# -- the receivers' own side (child processes) ------------------------------------------------


def serve(kind: str, work: Path, max_pdu: int) -> None:
    """In a child process: run one receiver on a free loopback port, print ``port N``, and
    serve until stdin is closed."""
    from pynetdicom import AE, StoragePresentationContexts, evt

    logging.basicConfig(level=logging.WARNING)
    if kind == "dicomnode":
        from dicomnode.config import Config, NodeConfig
        from dicomnode.receive import start_listener
        from dicomnode.spool.index import Index
        from dicomnode.spool.store import Spool

        config = Config(node=NodeConfig(host="127.0.0.1", port=0, ae_title=NODE_AE,
                                        max_pdu=max_pdu))
        index = Index(work / "index.sqlite")
        server = start_listener(config, Spool(work / "spool"), index)
    else:
        out = work / "out"
        out.mkdir()
        folder_fd = os.open(out, os.O_RDONLY)

        def store(event: evt.Event) -> int:
            if kind == "noop":
                return 0x0000
            path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
            with open(path, "wb") as f:
                f.write(event.encoded_dataset(include_meta=True))
                if kind == "pynetdicom-fsync":
                    f.flush()
                    os.fsync(f.fileno())
            if kind == "pynetdicom-fsync":
                os.fsync(folder_fd)
            return 0x0000

        ae = AE(ae_title="PYNETDICOM")
        ae.maximum_pdu_size = max_pdu
        ae.supported_contexts = StoragePresentationContexts
        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, store)])
    print(f"port {server.server_address[1]}", flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    server.shutdown()
    if kind == "dicomnode":
        index.close()


# -- the parent's side -------------------------------------------------------------------------


@dataclass
class Running:
    """A started receiver: its process, where it listens, how to stop it and count what it
    stored (``None``: it stores nothing)."""

    process: subprocess.Popen
    port: int
    called_ae: str
    stop: Callable[[], int | None]


@dataclass
class Run:
    seconds: float
    rest_mb: float
    peak_mb: float


def _stop_process(process: subprocess.Popen, *, close_stdin: bool = False) -> None:
    if close_stdin and process.stdin is not None:
        process.stdin.close()
    else:
        process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_child(kind: str, max_pdu: int) -> Callable[[Path], Running]:
    def start(work: Path) -> Running:
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--work", str(work),
             "--max-pdu", str(max_pdu)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = process.stdout.readline() if process.stdout else ""
        if not line.startswith("port "):
            _stop_process(process, close_stdin=True)
            raise RuntimeError(f"the {kind} receiver did not start (exit {process.returncode})")

        def stop() -> int | None:
            _stop_process(process, close_stdin=True)
            if kind == "dicomnode":
                from dicomnode.spool.index import Index

                index = Index(work / "index.sqlite")
                try:
                    return sum(s.instance_count for s in index.pending_series())
                finally:
                    index.close()
            if kind == "noop":
                return None
            return len(list((work / "out").iterdir()))

        return Running(process, int(line.split()[1]),
                       NODE_AE if kind == "dicomnode" else "PYNETDICOM", stop)

    return start


def start_storescp(work: Path) -> Running:
    port = free_port()
    out = work / "out"
    out.mkdir()
    process = subprocess.Popen(
        [str(STORESCP), "-aet", "STORESCP", "-od", str(out), str(port)],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    _wait_for_port(port, process)

    def stop() -> int:
        _stop_process(process)
        return len(list(out.iterdir()))

    return Running(process, port, "STORESCP", stop)


def start_orthanc(work: Path) -> Running:
    dicom_port, http_port = free_port(), free_port()
    config = {
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "Plugins": [],
    }
    (work / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    process = subprocess.Popen(
        [str(ORTHANC), str(work / "orthanc.json")],
        env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{http_port}"
    _wait_for_http(f"{url}/system", process)

    def stop() -> int:
        with urllib.request.urlopen(f"{url}/statistics", timeout=10) as answer:
            count = int(json.load(answer)["CountInstances"])
        _stop_process(process)
        return count

    return Running(process, dicom_port, "ORTHANC", stop)


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    _stop_process(process)
    raise RuntimeError(f"nothing listens on port {port}")


def _wait_for_http(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    _stop_process(process)
    raise RuntimeError(f"{url} does not answer")


def receive_once(start: Callable[[Path], Running], series: Path, work: Path) -> Run:
    """Start a receiver, send it ``series``, stop it; its seconds and memory."""
    running = start(work)
    try:
        os.sync()  # what earlier runs left to write back is not this run's cost
        rest = memory_mb(running.process.pid, "VmRSS")
        seconds = send(series, running.port, running.called_ae)
        peak = memory_mb(running.process.pid, "VmHWM")
    finally:
        stored = running.stop()
    expected = len(list(series.iterdir()))
    if stored is not None and stored != expected:
        raise RuntimeError(f"{running.called_ae} stored {stored} of {expected} instances")
    return Run(seconds, rest, peak)


def measure(
    series: dict[str, Path], receivers: dict[str, Callable[[Path], Running]], rounds: int,
    scratch: Path,
) -> dict[tuple[str, str], list[Run]]:
    """Runs per (series, receiver), one run of each receiver per round.

    Round ``i`` starts with receiver ``i`` (mod their number), so each follows every other
    alike; what a run received is removed only at the end, so that no run pays for deleting
    (and discarding the blocks of) an earlier one's files.
    """
    runs: dict[tuple[str, str], list[Run]] = {}
    names = list(receivers)
    for round_ in range(rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for series_name, folder in series.items():
            for receiver_name in order:
                work = Path(tempfile.mkdtemp(dir=scratch))
                runs.setdefault((series_name, receiver_name), []).append(
                    receive_once(receivers[receiver_name], folder, work))
    return runs


def table(series: dict[str, Path], receivers: list[str], rounds: int,
          runs: dict[tuple[str, str], list[Run]]) -> list[str]:
    """One Markdown table: a column per receiver, four rows per series."""
    lines = ["| series | figure | " + " | ".join(receivers) + " |",
             "|---|---|" + "---:|" * len(receivers)]
    for series_name, folder in series.items():
        files = list(folder.iterdir())
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        label = f"{series_name} ({len(files)} files, {megabytes:.1f} MB)"
        cells: dict[str, list[str]] = {"seconds": [], "MB/s": [], "rest": [], "peak": []}
        for receiver in receivers:
            these = runs[(series_name, receiver)]
            seconds = [r.seconds for r in these]
            median = statistics.median(seconds)
            spread = f" ({min(seconds):.2f}-{max(seconds):.2f})" if len(seconds) > 1 else ""
            cells["seconds"].append(f"{median:.3f} s{spread}")
            cells["MB/s"].append(f"{megabytes / median:.0f} MB/s")
            cells["rest"].append(f"{statistics.median(r.rest_mb for r in these):.0f} MB")
            cells["peak"].append(f"{max(r.peak_mb for r in these):.0f} MB")
        names = {"seconds": f"time, median of {rounds}" if rounds > 1 else "time",
                 "MB/s": "throughput", "rest": "RSS when ready", "peak": "peak RSS"}
        for key, name in names.items():
            first = label if key == "seconds" else ""
            lines.append(f"| {first} | {name} | " + " | ".join(cells[key]) + " |")
    return lines


def orthanc_version() -> str:
    try:
        run = subprocess.run([str(ORTHANC), "--version"], capture_output=True, text=True,
                             timeout=10)
        return run.stdout.split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--max-pdu",
        type=int,
        nargs="+",
        default=[1048576],
        help="dicomnode maximum PDU sizes to compare (node.max_pdu, 4096..16777216); the "
        "pynetdicom SCPs use the first",
    )
    parser.add_argument(
        "--scratch",
        type=Path,
        default=ROOT / "var" / "benchmarks",
        help="folder for spools and received files (on the disk under test)",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="one round of a tiny series: checks that the benchmark runs")
    parser.add_argument("--serve", choices=CHILD_KINDS, help=argparse.SUPPRESS)  # child side
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.work, args.max_pdu[0])
        return
    if not STORESCU.exists():
        sys.exit(f"{STORESCU} not found: install dcmtk")
    rounds = 1 if args.smoke else args.rounds
    args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        series = {}
        if args.smoke:
            series["synthetic 10x128x128"] = make_synthetic_ct(scratch / "synthetic", 10, 128)
        else:
            if IBSI.is_dir():
                series["ibsi_sts_001 59x202x198"] = IBSI
            series["synthetic 134x512x512"] = make_synthetic_ct(scratch / "synthetic")
        receivers: dict[str, Callable[[Path], Running]] = {}
        for pdu in args.max_pdu:
            name = "dicomnode" if len(args.max_pdu) == 1 else f"dicomnode pdu={pdu}"
            receivers[name] = start_child("dicomnode", pdu)
        if ORTHANC.exists():
            receivers[f"Orthanc {orthanc_version()}"] = start_orthanc
        else:
            print(f"(Orthanc not found at {ORTHANC}: its column is left out)")
        reference_pdu = args.max_pdu[0]
        receivers["pynetdicom SCP, fsync"] = start_child("pynetdicom-fsync", reference_pdu)
        receivers["pynetdicom SCP, no fsync"] = start_child("pynetdicom", reference_pdu)
        receivers["pynetdicom no-op"] = start_child("noop", reference_pdu)
        if STORESCP.exists():
            receivers["dcmtk storescp (no fsync)"] = start_storescp
        import pynetdicom

        print(f"{datetime.date.today()}, {platform.node()}: {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}, pynetdicom {pynetdicom.__version__}; "
              f"scratch {args.scratch}; max PDU {', '.join(map(str, args.max_pdu))}; "
              f"{rounds} round(s){' (smoke: figures mean nothing)' if args.smoke else ''}")
        print("dcmtk storescu, one association per series; a fresh receiver process per run\n")
        runs = measure(series, receivers, rounds, scratch)
        print("\n".join(table(series, list(receivers), rounds, runs)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
