"""Time the analysis core per stage on a phantom and on the real CT in ../shared/data.

    python3 benchmarks/pipeline.py [--repeat N]

Prints, per series: its size, the number of lesions found, and the seconds spent in assembly,
segmentation, radiomics, prediction and report writing (median of N runs, models loaded once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pydicom

from dicomnode.config import load
from dicomnode.phantom import make_phantom_study
from dicomnode.pipeline import Pipeline

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = {
    "ibsi_sts_001": SHARED / "ibsi_sts_001/dicom/CT/image",
    "totalsegmentator (JPEG 2000)": SHARED / "totalsegmentator/tests/reference_files/example_ct_dicom",
}


def series() -> dict[str, list[pydicom.Dataset]]:
    out = {"phantom 10001": list(make_phantom_study(10001).datasets)}
    for name, folder in REAL.items():
        if folder.is_dir():
            out[name] = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    started = time.perf_counter()
    pipeline = Pipeline.from_config(load(None))
    print(f"models loaded in {time.perf_counter() - started:.1f} s")
    for name, datasets in series().items():
        runs = [pipeline.run(datasets, uid_seed=f"bench-{k}") for k in range(args.repeat)]
        shape = runs[0].analysis.volume.shape
        lesions = len(runs[0].analysis.segmentation.lesions)
        stages = {s: statistics.median(r.seconds[s] for r in runs) for s in runs[0].seconds}
        total = sum(stages.values())
        detail = ", ".join(f"{s} {v:.2f}" for s, v in stages.items())
        print(f"{name}: {shape[0]}x{shape[1]}x{shape[2]}, {lesions} lesion(s): total {total:.2f} s ({detail})")


if __name__ == "__main__":
    main()
