"""The node's radiomics beside plain pyradiomics, on the same lesions, in one run.

    python3 benchmarks/radiomics_vs_pyradiomics.py [--rounds N] [--cases lung1 lung2 ibsi_sts_001]
    python3 benchmarks/radiomics_vs_pyradiomics.py --smoke        # a small synthetic lesion, seconds (CI)

For every case: pyradiomics 3.0.1's ``RadiomicsFeatureExtractor.execute`` on the whole image
with one thread (SimpleITK and BLAS limited to one), and ``RadiomicsExtractor`` as the node
configures it (crop_margin_mm = "auto", workers = one per core) on the same arrays, run
alternately ``--rounds`` times; the medians, the speed-up, the largest relative difference over
the 1037 features, how many differ by more than 1e-6 and how many are bit-identical, and the
most resident memory one lesion added to the node's process and its workers together (Linux
VmHWM, reset before each lesion). The pyradiomics
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


def memory_mb(pid: int | str, field: str) -> float:
    """A process's ``VmRSS`` or ``VmHWM`` (peak resident set, Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


class LesionMemory:
    """The resident memory one lesion adds: for the node's process and each worker, the peak
    during the lesion minus the resident set before it (the peaks are reset first)."""

    def __init__(self, extractor: RadiomicsExtractor) -> None:
        self.pids: list[int | str] = ["self", *extractor.worker_pids()]
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to VmRSS
        self.before = [memory_mb(pid, "VmRSS") for pid in self.pids]

    def added_mb(self) -> float:
        peaks = [memory_mb(pid, "VmHWM") for pid in self.pids]
        return sum(peak - before for peak, before in zip(peaks, self.before))

    def resident_mb(self) -> float:
        return sum(self.before)


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
    extractor = RadiomicsExtractor.from_config(config.radiomics)
    params = str(extractor.params_file)
    cases = [smoke_case()] if args.smoke else [read_case(n) for n in args.cases]
    rounds = 1 if args.smoke else args.rounds
    print(
        f"radiomics: node (crop_margin_mm={extractor.crop_margin_mm!r}, "
        f"workers={extractor.workers}, {os.cpu_count()} cores) vs pyradiomics "
        f"(whole image, one thread), {len(extractor.feature_names)} features, {rounds} round(s)"
    )
    print(f"{'case':<18} {'voxels':>8} {'pyradiomics s':>14} {'node s':>8} {'speed-up':>9} "
          f"{'worst rel.':>11} {'>1e-6':>6} {'identical':>10} {'lesion MB':>10}")
    extractor.warm_up()
    resident = math.nan
    with one_thread_pool() as pool:
        for case in cases:
            reference_s, node_s, added = [], [], []
            for _ in range(rounds):
                reference, seconds = pool.apply(pyradiomics_features, (params, case))
                reference_s.append(seconds)
                memory = LesionMemory(extractor)
                started = time.perf_counter()
                ours = extractor.extract_arrays(case.hu, case.mask, case.spacing_zyx)
                node_s.append(time.perf_counter() - started)
                added.append(memory.added_mb())
                resident = memory.resident_mb()
            worst, beyond, identical = compare(reference, dict(zip(ours.names, ours.values)))
            ref, node = statistics.median(reference_s), statistics.median(node_s)
            print(f"{case.name:<18} {int(case.mask.sum()):>8} {ref:>14.2f} {node:>8.2f} "
                  f"{ref / node:>8.1f}x {worst:>11.1e} {beyond:>6} {identical:>10} "
                  f"{max(added):>10.0f}")
    extractor.close()
    print(f"lesion MB: the most resident memory one lesion added to the node's process and its "
          f"{extractor.workers} worker(s) together, which hold {resident:.0f} MB between lesions "
          f"(this script's copies of the cases included)")


if __name__ == "__main__":
    main()
