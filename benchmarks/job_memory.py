"""Memory of one job: peak resident memory while the node's runner analyses one CT series.

Each series is spooled as the listener stores it (``<spool>/<study>/<series>/<sop>.dcm``),
then one child process per series does what ``dicomnode serve`` does for it: loads the models
(``Pipeline.from_config`` with the default configuration), indexes the spool, takes the
complete series as a job and works it with the real runner (read the instances, check
``[jobs] max_voxels``, assemble, segment with the U-Net, measure, predict, report, save,
deliver to a folder). It prints, per series: its voxels, the process's resident memory once
the models are loaded (and its peak while loading them), its peak by the end of the job
(``VmHWM``), the difference (what the job itself costs) and the job's seconds and end
state. A process per job means every peak is
that job's alone.

The node does not work alone: radiomics computes a lesion's images in worker processes
(``[radiomics] workers``, one per core by default, forked from a forkserver). They are
counted too: the whole tree's memory, the job process's resident memory plus the
proportional set size (``Pss``: a page shared by n processes counts 1/n in each, so the
workers' pages inherited from the forkserver count once) of every descendant, is sampled
every 50 ms, and the helpers' own peaks (``VmHWM``, while they still run at the end of the
job) are printed beside the node's.

Series: synthetic CTs from :mod:`dicomnode.phantom` in the sizes given, and a real sarcoma
patient of ``../shared/data/sts_cohort`` (JPEG-LS) when it is there.

``--smoke``: one small phantom (32 x 256 x 256, where the U-Net finds a lesion, so radiomics
and its workers run too) and no real patient, for CI (about half a minute).

Usage (from the project root)::

    python3 benchmarks/job_memory.py [--sizes 64x256x256 160x512x512 320x512x512] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.config import DestinationConfig, load  # noqa: E402
from dicomnode.deliver import make_destination  # noqa: E402
from dicomnode.jobs.runner import Runner, read_headers  # noqa: E402
from dicomnode.jobs.store import JobStore  # noqa: E402
from dicomnode.pipeline import Pipeline  # noqa: E402
from dicomnode.spool.index import Index  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REAL = ("sts_cohort STS_006", SHARED / "sts_cohort" / "STS_006" / "CT" / "image")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def resident_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or its peak so far (``VmHWM``), in MB.

    Not ``ru_maxrss``: Linux carries it over from the parent across fork and exec, so a child
    started by a parent that held a large phantom would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_mb() -> float:
    return resident_mb("VmHWM")


def descendants(pid: int) -> list[int]:
    """Every living descendant of process ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_mb(pid: int, field: str, file: str = "status") -> float:
    """``VmRSS`` or ``VmHWM`` (``status``) or ``Pss`` (``smaps_rollup``) of another process
    in MB; 0 when it has gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class TreeSampler(threading.Thread):
    """Samples this process's resident memory plus its descendants' proportional set sizes
    every ``interval`` seconds; ``peak`` is the largest sum since the last :meth:`reset`."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.helpers = interval, 0.0, 0
        self._done = threading.Event()

    def sample(self) -> float:
        pids = descendants(os.getpid())
        self.helpers = max(self.helpers, len(pids))
        total = resident_mb() + sum(process_mb(pid, "Pss", "smaps_rollup") for pid in pids)
        self.peak = max(self.peak, total)
        return total

    def reset(self) -> float:
        self.peak = 0.0
        return self.sample()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> float:
        self._done.set()
        self.join()
        self.sample()
        return self.peak


def spool_series(datasets, spool: Path) -> None:
    """Write instances where the listener would have stored them."""
    for ds in datasets:
        path = spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


def spool_phantom(shape: tuple[int, int, int], spool: Path) -> None:
    from dicomnode.phantom import make_phantom_study

    # 0.8 mm pixels and 1.5 mm slices: a usual diagnostic CT, whatever the matrix.
    phantom = make_phantom_study(40000 + shape[0], shape=shape, spacing=(1.5, 0.8, 0.8))
    spool_series(phantom.datasets, spool)


def spool_real(folder: Path, spool: Path) -> None:
    import pydicom

    spool_series([pydicom.dcmread(p) for p in sorted(folder.iterdir())], spool)


def run_one_job(data_dir: Path) -> dict:
    """In this process: load the node's models, then index, take and work the one series
    spooled under ``data_dir/spool`` as the node's runner does."""
    config = load(None)
    pipeline = Pipeline.from_config(config)
    index, jobs = Index(data_dir / "index.sqlite"), JobStore(data_dir / "jobs.sqlite")
    destination = make_destination(DestinationConfig(name="bench", path=data_dir / "out"))
    runner = Runner(config, index=index, jobs=jobs, destinations=[destination],
                    pipeline=pipeline, results_root=data_dir / "results",
                    clock=lambda: time.time() + 3600)  # past every quiet period
    loaded, loading_peak = resident_mb(), peak_mb()
    index.index_orphans(data_dir / "spool", (CT_IMAGE_STORAGE,))
    (job,) = runner.take_complete_series()
    voxels = sum(int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1)
                 for ds in read_headers(job.inputs))
    sampler = TreeSampler()
    tree_loaded = sampler.reset()
    sampler.start()
    started = time.perf_counter()
    job = runner.work_once()
    seconds = time.perf_counter() - started
    helpers = descendants(os.getpid())
    helper_peaks = [process_mb(pid, "VmHWM") for pid in helpers]
    tree_peak = max(sampler.stop(), peak_mb())  # samples can miss the node's own peak
    return {
        "rss_loaded_mb": loaded,
        "loading_peak_mb": loading_peak,
        "peak_mb": peak_mb(),
        "tree_loaded_mb": tree_loaded,
        "tree_peak_mb": tree_peak,
        "helpers": max(len(helpers), sampler.helpers),
        "helper_peaks_mb": helper_peaks,
        "seconds": seconds,
        "state": job.state.value,
        "reason": job.reason,
        "voxels": voxels,
    }


def measure(name: str, spool_it) -> bool:
    """Run one job in a child process and print its line; whether the child succeeded."""
    with tempfile.TemporaryDirectory(prefix="job-memory-") as tmp:
        data_dir = Path(tmp)
        spool_it(data_dir / "spool")
        child = subprocess.run([sys.executable, __file__, "--job", str(data_dir)],
                               capture_output=True, text=True, env={**os.environ})
        if child.returncode != 0:
            print(f"{name}: the job process failed:\n{child.stderr[-2000:]}")
            return False
        r = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{name:<26} {r['voxels'] / 1e6:6.1f} Mvoxels"
          f" | models loaded {r['rss_loaded_mb']:5.0f} MB"
          f" (peak while loading {r['loading_peak_mb']:5.0f}) | peak during the job"
          f" {r['peak_mb']:5.0f} MB, job +{r['peak_mb'] - r['rss_loaded_mb']:5.0f} MB"
          f" | {r['helpers']} helper processes, peaks"
          f" {' + '.join(f'{m:.0f}' for m in r['helper_peaks_mb']) or '0'} MB"
          f" | whole tree peak {r['tree_peak_mb']:5.0f} MB (sampled),"
          f" job +{r['tree_peak_mb'] - r['tree_loaded_mb']:5.0f} MB"
          f" | {r['seconds']:5.1f} s, {r['state']}: {r['reason']}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["64x256x256", "160x512x512",
                                                       "320x512x512"],
                        help="synthetic CTs as SLICESxROWSxCOLUMNS")
    parser.add_argument("--smoke", action="store_true",
                        help="one small phantom only: checks that the benchmark runs")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.job:
        print(json.dumps(run_one_job(args.job)))
        return
    sizes = ["32x256x256"] if args.smoke else args.sizes
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; one process per job"
          f"{' (smoke)' if args.smoke else ''}")
    ok = True
    for size in sizes:
        shape = tuple(int(n) for n in size.split("x"))
        ok &= measure(f"phantom {size}", lambda spool, shape=shape: spool_phantom(shape, spool))
    if REAL[1].is_dir() and not args.smoke:
        ok &= measure(REAL[0], lambda spool: spool_real(REAL[1], spool))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
