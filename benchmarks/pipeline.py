"""Time the analysis core per stage, in this process (no network, no job), models loaded once.

    python3 benchmarks/pipeline.py [--repeat N] [--lesions 1 10 47] [--smoke]

Prints, per series: its size, the number of lesions found, and the seconds spent in assembly,
segmentation, radiomics, prediction and report writing (median of N runs). Series: a phantom,
and the real CTs in ../shared/data when they are there (ibsi_sts_001, the TotalSegmentator
JPEG 2000 CT, and the held-out sarcoma patient STS_036 unchanged in a 134 x 512 x 512 grid of
air, as ``benchmarks/e2e.py`` sends it).

``--lesions N ...``: the report stage (and saving its files) for N lesions drawn by a
radiologist (a supplied RTSTRUCT of 8 mm lesions on that 134 x 512 x 512 series, see
``benchmarks/e2e.py``): how the report grows with the number of lesions.

``--smoke`` (for CI, seconds): the phantom only, one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.config import load  # noqa: E402
from dicomnode.phantom import make_phantom_study  # noqa: E402
from dicomnode.pipeline import Pipeline  # noqa: E402
from dicomnode.report import summary_json  # noqa: E402
from dicomnode.results import save  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
REAL = {
    "ibsi_sts_001": SHARED / "ibsi_sts_001/dicom/CT/image",
    "totalsegmentator (JPEG 2000)": SHARED / "totalsegmentator/tests/reference_files/example_ct_dicom",
}
CANVAS = "STS_036 in 134x512x512 air"


def series(smoke: bool) -> dict[str, list[pydicom.Dataset]]:
    out = {"phantom 10001": list(make_phantom_study(10001).datasets)}
    if smoke:
        return out
    from dicomnode.train.segmentation import restore_blank_uids

    for name, folder in REAL.items():
        if folder.is_dir():
            datasets = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
            # The TotalSegmentator example was anonymised with blank UIDs (tests/anonymised.py).
            out[name] = restore_blank_uids(datasets, str(folder))
    if (SHARED / "sts_cohort").is_dir():
        out[CANVAS] = canvas()
    return out


def canvas() -> list[pydicom.Dataset]:
    import e2e

    return e2e._new_uids([copy.deepcopy(ds) for ds in e2e.sarcoma_in_canvas("STS_036", 134, 512)],
                         "benchmarks/pipeline.py")


def report_growth(pipeline: Pipeline, counts: list[int], repeat: int) -> None:
    """The report stage and the save of its files for a supplied RTSTRUCT of N lesions."""
    import e2e

    ct = canvas()
    volume = pipeline.assemble(ct)
    for n in counts:
        rtstruct = pydicom.dcmread(_encoded(e2e.supplied_rtstruct(ct, n)))
        analysis, _ = pipeline.analyse(volume, supplied=rtstruct)
        report, saving = [], []
        for k in range(repeat):
            started = time.perf_counter()
            reports = pipeline.report(analysis, f"bench-{n}-{k}")
            report.append(time.perf_counter() - started)
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                save(Path(folder), reports, summary_json(analysis, reports))
                saving.append(time.perf_counter() - started)
        print(f"{CANVAS}, {n} supplied lesion(s): report {statistics.median(report):.2f} s, "
              f"save {statistics.median(saving):.2f} s ({len(reports.key_images)} key images)",
              flush=True)


def _encoded(ds: pydicom.Dataset):
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lesions", type=int, nargs="*", default=[],
                        help="also time the report stage for these numbers of supplied lesions")
    parser.add_argument("--smoke", action="store_true", help="the phantom only, one run (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.repeat, args.lesions = 1, []
    started = time.perf_counter()
    pipeline = Pipeline.from_config(load(None))
    print(f"models loaded in {time.perf_counter() - started:.1f} s")
    for name, datasets in series(args.smoke).items():
        runs = [pipeline.run(datasets, uid_seed=f"bench-{k}") for k in range(args.repeat)]
        shape = runs[0].analysis.volume.shape
        lesions = len(runs[0].analysis.segmentation.lesions)
        stages = {s: statistics.median(r.seconds[s] for r in runs) for s in runs[0].seconds}
        total = sum(stages.values())
        detail = ", ".join(f"{s} {v:.2f} s" for s, v in stages.items())
        print(f"{name}: {shape[0]}x{shape[1]}x{shape[2]}, {lesions} lesion(s): total {total:.2f} s "
              f"({detail})", flush=True)
    if args.lesions:
        report_growth(pipeline, args.lesions, args.repeat)


if __name__ == "__main__":
    main()
