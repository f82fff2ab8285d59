"""Throughput of a node whose jobs run on Celery workers: series per minute through 1 and 2
workers, and the ratio, in one run.

    python3 benchmarks/celery_throughput.py [--series 10] [--workers 1 2] [--radiomics-workers 1]
    python3 benchmarks/celery_throughput.py --smoke      # one series, one worker (CI)

For each worker count: a fresh Redis (``redis-server``), a node (``dicomnode serve`` with
``[runner] kind = "celery"``, a folder destination) and that many ``dicomnode worker``
processes on this machine; ``--series`` synthetic CT series (48 x 128 x 128, one lesion) are
sent one after the other by storescu, and the clock runs from the first instance sent to the
last job delivered. Printed: seconds, series per minute, the speed-up over one worker, and
which worker analysed how many series. Every worker runs the whole pipeline, radiomics worker
processes included, so on a machine with few cores two workers compete for them: the figure
says what a second worker buys here, not on a second machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster import Cluster, Redis, phantom_files  # noqa: E402


def run(series: int, workers: int, work: Path, radiomics_workers: int) -> tuple[float, list[int]]:
    """Seconds from the first instance sent to the last job delivered, and the series each
    worker analysed."""
    redis = Redis(work / "redis").start()
    cluster = Cluster(work, redis, {"kind": "folder", "name": "results",
                                    "path": str(work / "results")},
                      radiomics={"workers": radiomics_workers})
    try:
        for _ in range(workers):
            cluster.start_worker()
        files = [phantom_files(work / f"ct{k}", 20000 + k) for k in range(series)]
        started = time.perf_counter()
        for batch in files:
            cluster.send(batch)
        jobs = cluster.wait_for(series, timeout=600 + 120 * series)
        seconds = time.perf_counter() - started
        share = [sum(f"job {job['id']}: analysing".encode() in cluster.worker_log(n)
                     for job in jobs) for n in range(workers)]
        return seconds, share
    finally:
        cluster.stop()
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--radiomics-workers", type=int, default=0,
                        help="[radiomics] workers of each worker (0: one per core, the default)")
    parser.add_argument("--smoke", action="store_true", help="one series, one worker (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.series, args.workers = 1, [1]
    print(f"machine: {os.cpu_count()} CPU(s); {args.series} series of 48x128x128, each job's "
          f"pipeline on a worker; radiomics workers per worker: {args.radiomics_workers or 'one per core'}",
          flush=True)
    baseline = None
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="dicomnode-celery-") as folder:
            seconds, share = run(args.series, workers, Path(folder), args.radiomics_workers)
        rate = 60 * args.series / seconds
        baseline = baseline or rate
        print(f"{workers} worker(s): {args.series} series in {seconds:.1f} s, "
              f"{rate:.1f} series/min, {rate / baseline:.2f}x one worker; "
              f"series per worker {share}", flush=True)


if __name__ == "__main__":
    main()
