"""The PACS route at cohort scale: the sarcoma cohort in a real Orthanc, trained from there.

1. starts ``/usr/sbin/Orthanc`` with the DICOMweb plugin on loopback (``tests/orthanc.py``);
2. uploads every CT and RTSTRUCT of ``../shared/data/sts_cohort`` as stored (JPEG-LS);
3. writes a cohort CSV of ``dicomweb:<study>/<series>`` rows and loads every case through
   QIDO-RS and WADO-RS, checking that each gives the very voxels of the local files;
4. with ``--train OUT``, runs the shipped recipe (``dicomnode train segmentation``) from the
   DICOMweb cohort and prints its weights' SHA-256 beside the shipped model's: the same seed,
   device and thread count give the same weights only if the PACS gave the same data.

``--smoke``: the first case only, without training, for CI (seconds).

Usage (from the project root)::

    python3 benchmarks/pacs_cohort.py [--train /tmp/model-from-pacs] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dicomnode.cohort import DicomwebSource, load_case, read_cohort  # noqa: E402
from orthanc import Orthanc  # noqa: E402

COHORT = ROOT.parent / "shared" / "data" / "sts_cohort" / "cohort.csv"


def upload(pacs: Orthanc, cohort: Path, limit: int | None = None) -> list[str]:
    """POST every case's files (the first ``limit`` cases); returns the dicomweb cohort rows."""
    rows = ["case_id,image,mask,roi"]
    for row in read_cohort(cohort)[:limit]:
        image, mask = cohort.parent / row.image, cohort.parent / row.mask
        files = [*sorted(image.iterdir()), mask]
        for path in files:
            requests.post(f"{pacs.http_url}/instances", data=path.read_bytes(), timeout=60
                          ).raise_for_status()
        ct = pydicom.dcmread(files[0], stop_before_pixels=True)
        rt = pydicom.dcmread(mask, stop_before_pixels=True)
        rows.append(f"{row.case_id},dicomweb:{ct.StudyInstanceUID}/{ct.SeriesInstanceUID},"
                    f"dicomweb:{rt.StudyInstanceUID}/{rt.SeriesInstanceUID},{row.roi or ''}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, help="also train the shipped recipe into this folder")
    parser.add_argument("--smoke", action="store_true",
                        help="the first case only, no training: checks that the benchmark runs")
    args = parser.parse_args()
    if args.smoke and args.train:
        parser.error("--smoke does not train")
    with tempfile.TemporaryDirectory() as work:
        pacs = Orthanc(Path(work) / "orthanc").start()
        try:
            started = time.perf_counter()
            rows = upload(pacs, COHORT, limit=1 if args.smoke else None)
            print(f"uploaded {len(rows) - 1} cases in {time.perf_counter() - started:.1f} s")
            remote_csv = Path(work) / "pacs-cohort.csv"
            remote_csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
            source = DicomwebSource.from_url(pacs.dicomweb_url)
            local = {row.case_id: row for row in read_cohort(COHORT)}
            started = time.perf_counter()
            for row in read_cohort(remote_csv):
                remote = load_case(row, base_dir=remote_csv.parent, dicomweb=source)
                mine = load_case(local[row.case_id], base_dir=COHORT.parent)
                same = (np.array_equal(remote.hu, mine.hu) and np.array_equal(remote.mask, mine.mask)
                        and remote.spacing_zyx == mine.spacing_zyx)
                print(f"  {row.case_id}: {'identical' if same else 'DIFFERENT'} "
                      f"({remote.hu.shape[0]} slices)")
                if not same:
                    return 1
            print(f"loaded every case through DICOMweb in {time.perf_counter() - started:.1f} s; "
                  "all identical to the local files")
            if args.train:
                from dicomnode.analyse.segment import sha256_of
                from dicomnode.train.segmentation import train_segmentation

                report = train_segmentation(args.train, cohort=remote_csv, dicomweb=source,
                                            data_root=COHORT.parent.parent, seed=0)
                print(report)
                shipped = json.loads((ROOT / "models" / "segmentation" / "manifest.json")
                                     .read_text())["weights"]["sha256"]
                trained = sha256_of(args.train / "weights.pt")
                print(f"weights from the PACS {trained}\nshipped weights       {shipped}\n"
                      f"{'IDENTICAL' if trained == shipped else 'different'}")
        finally:
            pacs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
