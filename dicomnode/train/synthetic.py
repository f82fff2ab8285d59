"""A synthetic cohort with planted truth: CT crops with one lesion each, written as a cohort.

The shipped TMB and subtype models are DEMONSTRATION models fitted on this cohort: it shows
that the training commands recover a signal that was planted on purpose, and lets anyone
rebuild the shipped models without patient data. ``dicomnode train shipped`` writes it with
:func:`write_synthetic_cohort` (one NRRD image and mask per case and a ``cohort.csv``, the
format of ``docs/cohorts.md``), then runs the same ``features`` / ``train`` commands a
hospital runs on its own cohort.

Two hidden variables drive each case:

- a TMB driver: log TMB follows it, and so, seen through extra noise, does the lesion's
  texture (a higher driver gives stronger, finer-grained heterogeneity);
- one of four imaging phenotypes (size, shape, density, necrotic core, enhancing rim),
  independent of TMB: what the subtype model should find.

Everything is deterministic: case ``i`` of cohort ``seed`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

#: Grid of every synthetic case, ``(z, y, x)``: a 60 x 64 x 64 mm crop.
CASE_SHAPE_ZYX = (24, 64, 64)
CASE_SPACING_ZYX = (2.5, 1.0, 1.0)
#: TMB-high means at least this many mutations per megabase (seed 001).
TMB_HIGH_CUTOFF = 10.0
#: Bump when :func:`make_synthetic_case` changes, so that nobody mistakes two cohorts for one.
GENERATOR_VERSION = "1"

#: Latent imaging phenotypes: (name, lesion radius range mm, semi-axis ratios z/y/x, base HU).
PHENOTYPES: tuple[tuple[str, tuple[float, float], tuple[float, float, float], float], ...] = (
    ("small round hypodense", (6.0, 9.0), (1.0, 1.0, 1.0), 35.0),
    ("large lobulated with necrotic core", (13.0, 17.0), (1.0, 1.0, 1.0), 45.0),
    ("elongated hyperdense", (8.0, 11.0), (0.8, 1.7, 0.8), 105.0),
    ("round with enhancing rim", (10.0, 13.0), (1.0, 1.0, 1.0), 40.0),
)

#: Parenchyma around the lesion, HU, and CT quantum noise (standard deviation, HU).
PARENCHYMA_HU = 60.0
QUANTUM_NOISE_HU = 10.0


@dataclass(frozen=True)
class SyntheticCase:
    """One synthetic CT crop with one lesion and its hidden truth.

    Attributes
    ----------
    hu, mask:
        ``(z, y, x)`` image (HU, ``float32``, whole numbers) and lesion mask (``uint8``, 1).
    tmb:
        Tumour mutational burden, mutations/Mb.
    phenotype:
        Latent imaging phenotype, 1..4 (index into :data:`PHENOTYPES` plus one).
    """

    case_id: str
    hu: np.ndarray
    mask: np.ndarray
    spacing_zyx: tuple[float, float, float]
    tmb: float
    phenotype: int

    @property
    def tmb_high(self) -> bool:
        return self.tmb >= TMB_HIGH_CUTOFF


def make_synthetic_cohort(n_cases: int, seed: int) -> list[SyntheticCase]:
    """``n_cases`` synthetic cases; case ``i`` depends only on ``(seed, i)``."""
    return [make_synthetic_case(seed, i) for i in range(n_cases)]


def make_synthetic_case(seed: int, index: int) -> SyntheticCase:
    """Draw case ``index`` of the cohort ``seed``.

    The TMB driver ``t ~ N(0, 1)`` sets log TMB (``log 7 + 0.8 t + 0.45 noise``, so about a
    third of cases are TMB-high) and, seen through extra noise, the lesion's texture: a higher
    ``t`` gives a stronger and finer-grained heterogeneity. The phenotype sets size, shape
    and density and is independent of TMB.
    """
    rng = np.random.default_rng([seed, index])
    phenotype = int(rng.integers(len(PHENOTYPES)))
    driver = rng.standard_normal()
    tmb = float(np.exp(math.log(7.0) + 0.8 * driver + 0.45 * rng.standard_normal()))
    rho = _lesion_radius_field(rng, phenotype)
    mask = rho <= 1.0
    seen_driver = driver + 0.6 * rng.standard_normal()  # the image shows TMB only noisily
    lesion = _lesion_density(rng, phenotype, rho) + _tmb_texture(rng, seen_driver)
    background = PARENCHYMA_HU + 8.0 * _smooth_noise(rng, 2.0)
    hu = np.where(mask, lesion, background) + QUANTUM_NOISE_HU * rng.standard_normal(CASE_SHAPE_ZYX)
    return SyntheticCase(
        case_id=f"s{seed}-c{index}",
        hu=np.round(np.clip(hu, -1024, 3071)).astype(np.float32),
        mask=mask.astype(np.uint8),
        spacing_zyx=CASE_SPACING_ZYX,
        tmb=tmb,
        phenotype=phenotype + 1,
    )


def _lesion_radius_field(rng: np.random.Generator, phenotype: int) -> np.ndarray:
    """Normalised radius of every voxel (the lesion is ``<= 1``): an ellipsoid, lobulated for 2."""
    _, (r_min, r_max), ratios, _ = PHENOTYPES[phenotype]
    axes = np.asarray(ratios) * rng.uniform(r_min, r_max) * rng.uniform(0.9, 1.1, 3)
    centre = rng.normal(0.0, 2.0, 3)
    z, y, x = (
        (np.arange(n) - (n - 1) / 2) * step - c
        for n, step, c in zip(CASE_SHAPE_ZYX, CASE_SPACING_ZYX, centre)
    )
    z, y, x = np.meshgrid(z, y, x, indexing="ij")
    angle = rng.uniform(0.0, math.pi)  # random in-plane orientation
    y, x = math.cos(angle) * y + math.sin(angle) * x, -math.sin(angle) * y + math.cos(angle) * x
    rho = np.sqrt((z / axes[0]) ** 2 + (y / axes[1]) ** 2 + (x / axes[2]) ** 2)
    if phenotype == 1:
        azimuth, elevation = np.arctan2(y, x), np.arctan2(z, np.hypot(y, x))
        phase = rng.uniform(0, 2 * math.pi)
        rho = rho / (1 + 0.18 * np.sin(5 * azimuth + phase) * np.cos(2 * elevation))
    return rho


def _lesion_density(rng: np.random.Generator, phenotype: int, rho: np.ndarray) -> np.ndarray:
    """Mean HU of the lesion: uniform, with a necrotic core (2) or an enhancing rim (4)."""
    density = np.full(CASE_SHAPE_ZYX, PHENOTYPES[phenotype][3] + rng.normal(0.0, 5.0))
    if phenotype == 1:
        density = np.where(rho < rng.uniform(0.4, 0.6), 5.0 + rng.normal(0.0, 3.0), density)
    elif phenotype == 3:
        density = np.where(rho > rng.uniform(0.7, 0.8), 120.0 + rng.normal(0.0, 8.0), density)
    return density


def _tmb_texture(rng: np.random.Generator, seen_driver: float) -> np.ndarray:
    """Heterogeneity whose amplitude and grain grow with the (noisy) TMB driver."""
    amplitude = float(np.clip(14.0 + 8.0 * seen_driver, 3.0, 40.0))
    fine = 1.0 / (1.0 + math.exp(-1.5 * seen_driver))
    texture = fine * rng.standard_normal(CASE_SHAPE_ZYX) + (1.0 - fine) * _smooth_noise(rng, 1.5)
    return amplitude * texture / math.hypot(fine, 1.0 - fine)


def _smooth_noise(rng: np.random.Generator, sigma_voxels: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(CASE_SHAPE_ZYX), sigma_voxels)
    return noise / noise.std()


#: Columns of the cohort CSV written by :func:`write_synthetic_cohort`.
COHORT_COLUMNS = ("case_id", "image", "mask", "tmb", "phenotype")


def write_synthetic_cohort(
    folder: Path, n_cases: int, seed: int, *, progress: bool = True
) -> Path:
    """Write cases ``0..n_cases-1`` of cohort ``seed`` under ``folder``; return its ``cohort.csv``.

    Each case is ``images/<case_id>.nrrd`` (HU, int16) and ``masks/<case_id>.nrrd`` (uint8),
    on one grid with ``(x, y, z)`` spacing :data:`CASE_SPACING_ZYX` reversed. ``tmb`` is in
    mutations/Mb; ``phenotype`` is the latent phenotype (1..4), kept for evaluation only.
    Case files already there with the same content are left as they are.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in tqdm(range(n_cases), desc=f"synthetic cohort {seed}", unit="case",
                      disable=not progress):
        case = make_synthetic_case(seed, index)
        image, mask = f"images/{case.case_id}.nrrd", f"masks/{case.case_id}.nrrd"
        _write_nrrd(folder / image, case.hu.astype(np.int16), case.spacing_zyx)
        _write_nrrd(folder / mask, case.mask, case.spacing_zyx)
        rows.append((case.case_id, image, mask, repr(case.tmb), case.phenotype))
    cohort_csv = folder / "cohort.csv"
    with cohort_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COHORT_COLUMNS)
        writer.writerows(rows)
    return cohort_csv


def _write_nrrd(path: Path, array: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    """Write ``array`` as NRRD, leaving an identical existing file untouched.

    Untouched files keep their modification time, so the feature cache of ``dicomnode
    features`` (keyed by it) still holds when the cohort is written again.
    """
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    fresh = path.with_name(f".{path.name}.tmp.nrrd")
    sitk.WriteImage(image, str(fresh), useCompression=True)
    if path.is_file() and path.read_bytes() == fresh.read_bytes():
        fresh.unlink()
    else:
        fresh.replace(path)
