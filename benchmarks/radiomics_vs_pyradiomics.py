"""The node's radiomics beside plain pyradiomics, on the same lesions, in one run.

    python3 benchmarks/radiomics_vs_pyradiomics.py [--rounds N] [--cases lung1 lung2 ibsi_sts_001]
    python3 benchmarks/radiomics_vs_pyradiomics.py --smoke        # a small synthetic lesion, seconds (CI)

For every case: pyradiomics 3.0.1's ``RadiomicsFeatureExtractor.execute`` on the whole image
with one thread (SimpleITK and BLAS limited to one), and ``RadiomicsExtractor`` as the node
configures it (crop_margin_mm = "auto", workers = one per core) on the same arrays, run
alternately ``--rounds`` times; the medians, the speed-up, the largest relative difference over
the 1037 features, how many differ by more than 1e-6 and how many are bit-identical, and the
peak resident memory of the node's process and of each of its workers (Linux VmHWM). The pyradiomics
reference is computed in a child process limited to one thread, so that the node's own process
keeps the machine's threads.

Cases come from ../shared/data (see its MANIFEST.md): pyradiomics' lung1 and lung2 test CTs with
their tumour masks, and the IBSI soft-tissue-sarcoma case ibsi_sts_001.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.config import Config, load

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = {
    "lung1": (SHARED / "pyradiomics/lung1_image.nrrd", SHARED / "pyradiomics/lung1_label.nrrd"),
    "lung2": (SHARED / "pyradiomics/lung2_image.nrrd", SHARED / "pyradiomics/lung2_label.nrrd"),
    "ibsi_sts_001": (
        SHARED / "ibsi_sts_001/nifti/CT_image.nii.gz",
        SHARED / "ibsi_sts_001/nifti/CT_mask.nii.gz",
    ),
}
RELATIVE = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    hu: np.ndarray  # (z, y, x)
    mask: np.ndarray  # (z, y, x), lesion = 1
    spacing_zyx: tuple[float, float, float]


def read_case(name: str) -> Case:
    image_path, mask_path = CASES[name]
    image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
    return Case(
        name,
        sitk.GetArrayFromImage(image).astype(np.float64),
        (sitk.GetArrayFromImage(mask) == 1).astype(np.uint8),
        tuple(reversed(image.GetSpacing())),  # type: ignore[arg-type]
    )


def smoke_case() -> Case:
    """A 20 x 64 x 64 CT with a 10 mm ellipsoid of soft tissue: seconds for both sides."""
    rng = np.random.default_rng(13)
    z, y, x = np.mgrid[:20, :64, :64]
    lesion = ((z - 10) / 4.0) ** 2 + ((y - 30) / 7.0) ** 2 + ((x - 34) / 6.0) ** 2 <= 1
    hu = rng.normal(40, 25, size=lesion.shape) + np.where(lesion, 30.0, 0.0)
    return Case("smoke (synthetic)", hu.round(), lesion.astype(np.uint8), (2.5, 1.0, 1.0))


def pyradiomics_features(params: str, case: Case) -> tuple[dict[str, float], float]:
    """Plain pyradiomics on the whole image, one thread; (features, seconds)."""
    from radiomics import featureextractor

    from dicomnode.analyse.radiomics import quiet_pyradiomics

    quiet_pyradiomics()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    extractor = featureextractor.RadiomicsFeatureExtractor(params)
    image = sitk.GetImageFromArray(case.hu)
    image.SetSpacing(tuple(reversed(case.spacing_zyx)))
    mask = sitk.GetImageFromArray(case.mask)
    mask.SetSpacing(tuple(reversed(case.spacing_zyx)))
    started = time.perf_counter()
    raw = extractor.execute(image, mask)
    seconds = time.perf_counter() - started
    return {k: float(v) for k, v in raw.items() if not k.startswith("diagnostics_")}, seconds


def one_thread_pool() -> multiprocessing.pool.Pool:
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return multiprocessing.get_context("spawn").Pool(1)


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident set (Linux VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def memory_line(extractor: RadiomicsExtractor, before_mb: float) -> str:
    workers = [peak_rss_mb(pid) for pid in extractor.worker_pids()]
    line = f"peak RSS: node process {peak_rss_mb():.0f} MB ({before_mb:.0f} MB before the first lesion)"
    if workers:
        line += ", workers " + " + ".join(f"{mb:.0f}" for mb in workers) + " MB"
    return line


def compare(reference: dict[str, float], ours: dict[str, float]) -> tuple[float, int, int]:
    """(largest relative difference, features beyond RELATIVE, bit-identical features)."""
    worst, beyond, identical = 0.0, 0, 0
    for name, expected in reference.items():
        got = ours[name]
        if got == expected or (math.isnan(got) and math.isnan(expected)):
            identical += 1
            continue
        relative = abs(got - expected) / max(abs(expected), 1e-300)
        worst = max(worst, relative)
        beyond += relative > RELATIVE
    return worst, beyond, identical


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--config", help="node configuration (default: embedded defaults)")
    parser.add_argument("--smoke", action="store_true", help="one small synthetic case, 1 round")
    args = parser.parse_args()
    config: Config = load(args.config)
    extractor = RadiomicsExtractor.from_config(config.radiomics, config)
    params = str(extractor.params_file)
    cases = [smoke_case()] if args.smoke else [read_case(n) for n in args.cases]
    rounds = 1 if args.smoke else args.rounds
    print(
        f"radiomics: node (crop_margin_mm={extractor.crop_margin_mm!r}, "
        f"workers={extractor.workers}, {os.cpu_count()} cores) vs pyradiomics "
        f"(whole image, one thread), {len(extractor.feature_names)} features, {rounds} round(s)"
    )
    print(f"{'case':<18} {'voxels':>8} {'pyradiomics s':>14} {'node s':>8} {'speed-up':>9} "
          f"{'worst rel.':>11} {'>1e-6':>6} {'identical':>10}")
    extractor.warm_up()
    before_mb = peak_rss_mb()
    with one_thread_pool() as pool:
        for case in cases:
            reference_s, node_s = [], []
            for _ in range(rounds):
                reference, seconds = pool.apply(pyradiomics_features, (params, case))
                reference_s.append(seconds)
                started = time.perf_counter()
                ours = extractor.extract_arrays(case.hu, case.mask, case.spacing_zyx)
                node_s.append(time.perf_counter() - started)
            worst, beyond, identical = compare(reference, dict(zip(ours.names, ours.values)))
            ref, node = statistics.median(reference_s), statistics.median(node_s)
            print(f"{case.name:<18} {int(case.mask.sum()):>8} {ref:>14.2f} {node:>8.2f} "
                  f"{ref / node:>8.1f}x {worst:>11.1e} {beyond:>6} {identical:>10}")
    print(memory_line(extractor, before_mb))
    extractor.close()


if __name__ == "__main__":
    main()
