"""Fit the DEMONSTRATION TMB and imaging-subtype models on a synthetic cohort.

``dicomnode train predictors --out models [--cases N] [--seed S]`` runs
:func:`train_demo_models`, which

1. draws a synthetic cohort (:func:`make_synthetic_cohort`): small CT crops, one lesion each,
   whose texture depends on a latent variable that also drives the tumour mutational burden
   (TMB), and whose size/shape/density follow one of four latent imaging phenotypes;
2. computes the 1037 protocol features of every lesion with
   :class:`~dicomnode.analyse.radiomics.RadiomicsExtractor` in a process pool, caching them in
   ``<out>/tmb/training_features.csv`` so that a rerun only computes what is missing;
3. fits the TMB classifier (Pearson redundancy filter, Mann-Whitney U filter, XGBoost; the
   operating threshold at the maximum Youden index of out-of-fold predictions) and the
   subtype model (standardisation, k-means with k = 4, nearest-centroid assignment);
4. measures both on a held-out synthetic cohort drawn with another seed, and writes
   ``tmb/{model.json, manifest.json, MODEL_CARD.md, RECIPE.md, roc.png}`` and
   ``subtypes/{model.json, MODEL_CARD.md, RECIPE.md}``.

Everything is deterministic for a seed. The models say nothing about patients: they only
show that the machinery works end to end.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import radiomics
import scipy
import sklearn
import SimpleITK as sitk
import xgboost
from scipy import ndimage, stats
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, roc_auc_score, roc_curve, silhouette_score
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from dicomnode import __version__
from dicomnode.analyse.predict import SUBTYPE_SCHEMA, TMB_SCHEMA, impute
from dicomnode.analyse.radiomics import RadiomicsExtractor

# ----------------------------------------------------------------------------- cohort
#: Grid of every synthetic case, ``(z, y, x)``: a 60 x 64 x 64 mm crop.
CASE_SHAPE_ZYX = (24, 64, 64)
CASE_SPACING_ZYX = (2.5, 1.0, 1.0)
#: TMB-high means at least this many mutations per megabase (seed 001).
TMB_HIGH_CUTOFF = 10.0
DEFAULT_CASES = 200
DEFAULT_HOLDOUT_CASES = 100
#: The held-out cohort is drawn with ``seed + HOLDOUT_SEED_OFFSET``: no case is shared.
HOLDOUT_SEED_OFFSET = 1_000_000
#: Bump when :func:`make_synthetic_case` changes: it invalidates cached features.
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


# ----------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureTable:
    """Protocol features of a cohort, one row per case, with the hidden truth."""

    case_ids: tuple[str, ...]
    names: tuple[str, ...]
    values: np.ndarray  # (cases, features)
    tmb: np.ndarray
    phenotype: np.ndarray

    @property
    def tmb_high(self) -> np.ndarray:
        return (self.tmb >= TMB_HIGH_CUTOFF).astype(int)

    def columns(self, names: Sequence[str]) -> np.ndarray:
        index = {n: i for i, n in enumerate(self.names)}
        return self.values[:, [index[n] for n in names]]


_worker_extractor: RadiomicsExtractor | None = None


def _start_worker(params_file: Path) -> None:
    # One extractor per process; SimpleITK's own threads would only fight the pool for cores.
    global _worker_extractor
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _worker_extractor = RadiomicsExtractor(params_file)


def _case_row(seed: int, index: int) -> tuple[str, float, int, tuple[float, ...]]:
    assert _worker_extractor is not None, "worker not started"
    case = make_synthetic_case(seed, index)
    features = _worker_extractor.extract_arrays(case.hu, case.mask, case.spacing_zyx)
    return case.case_id, case.tmb, case.phenotype, features.values


def cohort_features(
    seed: int,
    n_cases: int,
    *,
    params_file: Path,
    cache_csv: Path,
    workers: int = 2,
    progress: bool = True,
) -> FeatureTable:
    """Features of the cohort ``(seed, n_cases)``, computing only what ``cache_csv`` lacks.

    Cached rows are reused only when made by the same protocol file, generator version and
    pyradiomics version (their ``fingerprint`` column). Values are written with ``repr`` so
    a cached rerun fits exactly the same numbers as a fresh one.
    """
    names = RadiomicsExtractor(params_file).feature_names
    fingerprint = _feature_fingerprint(params_file)
    rows = _read_cache(cache_csv, names, fingerprint)
    wanted = [f"s{seed}-c{i}" for i in range(n_cases)]
    todo = [i for i, case_id in enumerate(wanted) if case_id not in rows]
    if todo:
        computed = _compute_rows(seed, todo, params_file, workers, progress)
        for case_id, tmb, phenotype, values in computed:
            rows[case_id] = (tmb, phenotype, values)
        _write_cache(cache_csv, names, fingerprint, rows)
    return FeatureTable(
        case_ids=tuple(wanted),
        names=names,
        values=np.asarray([rows[c][2] for c in wanted], dtype=np.float64),
        tmb=np.asarray([rows[c][0] for c in wanted], dtype=np.float64),
        phenotype=np.asarray([rows[c][1] for c in wanted], dtype=int),
    )


def _compute_rows(
    seed: int, indices: Sequence[int], params_file: Path, workers: int, progress: bool
) -> Iterable[tuple[str, float, int, tuple[float, ...]]]:
    bar = tqdm(
        total=len(indices), desc=f"radiomics (seed {seed})", unit="case", disable=not progress
    )
    with bar:
        if workers <= 1:
            _start_worker(params_file)
            for i in indices:
                yield _case_row(seed, i)
                bar.update()
            return
        # "spawn": a forked child may inherit ITK/OpenMP thread pools in a locked state.
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_start_worker,
            initargs=(params_file,),
        ) as pool:
            for future in as_completed([pool.submit(_case_row, seed, i) for i in indices]):
                yield future.result()
                bar.update()


def _feature_fingerprint(params_file: Path) -> str:
    digest = hashlib.sha256(params_file.read_bytes())
    digest.update(f"generator {GENERATOR_VERSION} pyradiomics {radiomics.__version__}".encode())
    return digest.hexdigest()[:16]


_CACHE_FIELDS = ("case_id", "fingerprint", "tmb", "phenotype")


def _read_cache(
    path: Path, names: Sequence[str], fingerprint: str
) -> dict[str, tuple[float, int, tuple[float, ...]]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != [*_CACHE_FIELDS, *names]:
            return {}  # another protocol: recompute everything
        return {
            row[0]: (float(row[2]), int(row[3]), tuple(float(v) for v in row[4:]))
            for row in reader
            if row[1] == fingerprint
        }


def _write_cache(
    path: Path,
    names: Sequence[str],
    fingerprint: str,
    rows: dict[str, tuple[float, int, tuple[float, ...]]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*_CACHE_FIELDS, *names])
        for case_id in sorted(rows, key=_case_sort_key):
            tmb, phenotype, values = rows[case_id]
            writer.writerow([case_id, fingerprint, repr(tmb), phenotype, *map(repr, values)])


def _case_sort_key(case_id: str) -> tuple[int, int]:
    seed, index = case_id[1:].split("-c")
    return int(seed), int(index)


# ----------------------------------------------------------------------------- TMB model
#: Redundancy filter: of two features with Pearson |r| above this, the later one is dropped.
PEARSON_MAX = 0.9
#: Mann-Whitney U filter: keep features with a two-sided p below this ...
MANN_WHITNEY_ALPHA = 0.05
#: ... or, when fewer pass, the features with the smallest p, down to this many.
MIN_SELECTED = 5
CV_FOLDS = 5
XGB_PARAMS: dict[str, Any] = {
    "n_estimators": 300,
    "max_depth": 2,
    "learning_rate": 0.05,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
    "min_child_weight": 1.0,
    "reg_lambda": 1.0,
    "objective": "binary:logistic",
    "eval_metric": "logloss",
    "tree_method": "hist",
    "n_jobs": 1,  # one thread: bit-for-bit reproducible and fair to the other jobs here
}


@dataclass(frozen=True)
class FittedTmb:
    """A TMB classifier fitted on one training set, with its preprocessing."""

    features: tuple[str, ...]
    medians: np.ndarray
    classifier: xgboost.XGBClassifier

    def probabilities(self, table_values: np.ndarray, all_names: Sequence[str]) -> np.ndarray:
        index = {n: i for i, n in enumerate(all_names)}
        matrix, _ = impute(table_values[:, [index[n] for n in self.features]], self.medians)
        return self.classifier.predict_proba(matrix)[:, 1]


def select_tmb_features(
    values: np.ndarray, high: np.ndarray, names: Sequence[str]
) -> tuple[str, ...]:
    """Pearson redundancy filter, then Mann-Whitney U filter (seed 001's first two steps).

    ``values`` must be imputed. Features are visited in protocol order, so of a redundant
    pair the one that comes first in the protocol (shape, then original, LoG, wavelet) stays.
    """
    varying = np.flatnonzero(np.std(values, axis=0) > 0)
    correlation = np.abs(np.corrcoef(values[:, varying], rowvar=False))
    kept: list[int] = []
    for j in range(len(varying)):
        if not kept or correlation[j, kept].max() <= PEARSON_MAX:
            kept.append(j)
    columns = varying[kept]
    p_values = np.array([
        stats.mannwhitneyu(values[high == 1, c], values[high == 0, c]).pvalue  # two-sided
        for c in columns
    ])
    significant = p_values < MANN_WHITNEY_ALPHA
    if significant.sum() < MIN_SELECTED:
        significant = np.zeros_like(significant)
        significant[np.argsort(p_values, kind="stable")[:MIN_SELECTED]] = True
    return tuple(names[c] for c in columns[significant])


def fit_tmb(values: np.ndarray, high: np.ndarray, names: Sequence[str], seed: int) -> FittedTmb:
    """Impute with training medians, select features, fit XGBoost, all on the given rows only."""
    medians = _column_medians(values)
    imputed, _ = impute(values, medians)
    selected = select_tmb_features(imputed, high, names)
    index = {n: i for i, n in enumerate(names)}
    columns = [index[n] for n in selected]
    classifier = xgboost.XGBClassifier(**XGB_PARAMS, random_state=seed)
    classifier.fit(imputed[:, columns], high)
    return FittedTmb(features=selected, medians=medians[columns], classifier=classifier)


def out_of_fold_probabilities(table: FeatureTable, seed: int) -> tuple[np.ndarray, list[int]]:
    """Cross-validated P(TMB-high): imputation, selection and fitting never see the test fold.

    Returns the probabilities and the number of features selected in each fold.
    """
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    probabilities = np.zeros(len(table.case_ids))
    selected_counts = []
    for train, test in folds.split(table.values, table.tmb_high):
        fitted = fit_tmb(table.values[train], table.tmb_high[train], table.names, seed)
        probabilities[test] = fitted.probabilities(table.values[test], table.names)
        selected_counts.append(len(fitted.features))
    return probabilities, selected_counts


def youden_threshold(high: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability cut-off that maximises sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(high, probabilities)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))  # roc_curve's first threshold is +inf


def classification_metrics(
    high: np.ndarray, probabilities: np.ndarray, threshold: float
) -> dict[str, float]:
    """AUC, and sensitivity, specificity and accuracy at ``threshold`` (high iff p >= threshold)."""
    predicted = probabilities >= threshold
    positives, negatives = high == 1, high == 0
    return {
        "n": int(len(high)),
        "n_high": int(positives.sum()),
        "auc": float(roc_auc_score(high, probabilities)),
        "sensitivity": float(predicted[positives].mean()),
        "specificity": float((~predicted[negatives]).mean()),
        "accuracy": float((predicted == positives).mean()),
    }


def _column_medians(values: np.ndarray) -> np.ndarray:
    # A column that is NaN in every case gets 0: it is constant after imputation and the
    # selection drops it.
    with np.errstate(all="ignore"):
        medians = np.nanmedian(np.where(np.isfinite(values), values, np.nan), axis=0)
    return np.nan_to_num(medians, nan=0.0)


# ----------------------------------------------------------------------------- subtypes
#: Size, shape and density features of the original image: what separates imaging phenotypes
#: and what a reader can interpret. TMB-driven texture is deliberately left out.
SUBTYPE_FEATURES = (
    "original_shape_MajorAxisLength",
    "original_shape_Sphericity",
    "original_shape_Elongation",
    "original_firstorder_Mean",
    "original_firstorder_10Percentile",
    "original_firstorder_90Percentile",
    "original_firstorder_Skewness",
)
N_SUBTYPES = 4
KMEANS_INITS = 20
CODING_SCHEME = {"designator": "99DICOMNODE", "name": "dicomnode private codes"}


@dataclass(frozen=True)
class FittedSubtypes:
    medians: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray  # standardised units, ordered by subtype number

    def assign(self, matrix: np.ndarray) -> np.ndarray:
        """1-based subtype of each row (nearest centroid, as the node does)."""
        standardised = (impute(matrix, self.medians)[0] - self.mean) / self.scale
        distances = np.linalg.norm(standardised[:, np.newaxis] - self.centroids[np.newaxis], axis=2)
        return np.argmin(distances, axis=1) + 1


def fit_subtypes(matrix: np.ndarray, seed: int) -> FittedSubtypes:
    """Standardise, k-means with k = 4; subtypes numbered by increasing lesion size."""
    medians = _column_medians(matrix)
    imputed, _ = impute(matrix, medians)
    mean, scale = imputed.mean(axis=0), imputed.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    kmeans = KMeans(n_clusters=N_SUBTYPES, n_init=KMEANS_INITS, random_state=seed)
    kmeans.fit((imputed - mean) / scale)
    # k-means numbers clusters arbitrarily; a stable order makes versions comparable.
    order = np.argsort(kmeans.cluster_centers_[:, 0], kind="stable")
    centroids = kmeans.cluster_centers_[order]
    return FittedSubtypes(medians=medians, mean=mean, scale=scale, centroids=centroids)


def subtype_entries() -> list[dict[str, Any]]:
    """The subtype codes: they must match ``[subtype].codes`` of the SR template."""
    return [
        {"index": k, "code_value": f"IS{k}", "meaning": f"Imaging subtype {k}"}
        for k in range(1, N_SUBTYPES + 1)
    ]


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainingSummary:
    """What :func:`train_demo_models` did; ``str()`` gives a short report."""

    out_root: Path
    seconds: float
    n_cases: int
    n_holdout: int
    tmb_cv: dict[str, float]
    tmb_holdout: dict[str, float]
    threshold: float
    n_tmb_features: int
    subtype_ari_train: float
    subtype_ari_holdout: float

    def __str__(self) -> str:
        cv, ho = self.tmb_cv, self.tmb_holdout
        return "\n".join([
            f"wrote {self.out_root / 'tmb'} and {self.out_root / 'subtypes'} "
            f"in {self.seconds:.0f} s",
            f"TMB: {self.n_tmb_features} features; cross-validated AUC {cv['auc']:.3f} "
            f"({self.n_cases} cases), held-out AUC {ho['auc']:.3f} ({self.n_holdout} cases); "
            f"threshold {self.threshold:.3f}: held-out sensitivity {ho['sensitivity']:.2f}, "
            f"specificity {ho['specificity']:.2f}",
            f"subtypes: adjusted Rand index vs latent phenotype {self.subtype_ari_train:.2f} "
            f"(training), {self.subtype_ari_holdout:.2f} (held-out)",
            "DEMONSTRATION models fitted on synthetic data: research use only.",
        ])


def train_demo_models(
    out_root: Path,
    *,
    n_cases: int | None = None,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    n_holdout: int = DEFAULT_HOLDOUT_CASES,
    params_file: Path | None = None,
) -> TrainingSummary:
    """Fit and write the demonstration TMB and subtype models under ``out_root``.

    Parameters
    ----------
    out_root:
        Models root: ``tmb/`` and ``subtypes/`` are (re)written in it.
    n_cases:
        Training cohort size (default :data:`DEFAULT_CASES`).
    seed:
        Seeds the cohort, the folds, XGBoost and k-means; the held-out cohort uses
        ``seed + HOLDOUT_SEED_OFFSET``.
    workers:
        Processes computing radiomics features.
    params_file:
        The radiomics protocol (default ``<out_root>/radiomics/tmb_protocol.yaml``).
    """
    started = time.perf_counter()
    n_cases = DEFAULT_CASES if n_cases is None else n_cases
    out_root = Path(out_root)
    params_file = Path(params_file) if params_file else out_root / "radiomics" / "tmb_protocol.yaml"
    tmb_dir, subtype_dir = out_root / "tmb", out_root / "subtypes"
    cache = tmb_dir / "training_features.csv"
    features_of = partial(
        cohort_features, params_file=params_file, cache_csv=cache, workers=workers, progress=progress
    )
    train = features_of(seed, n_cases)
    holdout = features_of(seed + HOLDOUT_SEED_OFFSET, n_holdout)

    oof, fold_sizes = out_of_fold_probabilities(train, seed)
    threshold = youden_threshold(train.tmb_high, oof)
    tmb = fit_tmb(train.values, train.tmb_high, train.names, seed)
    holdout_p = tmb.probabilities(holdout.values, holdout.names)
    cv_metrics = classification_metrics(train.tmb_high, oof, threshold)
    holdout_metrics = classification_metrics(holdout.tmb_high, holdout_p, threshold)

    subtypes = fit_subtypes(train.columns(SUBTYPE_FEATURES), seed)
    train_subtype = subtypes.assign(train.columns(SUBTYPE_FEATURES))
    holdout_subtype = subtypes.assign(holdout.columns(SUBTYPE_FEATURES))

    context = _Context(
        seed=seed, n_cases=n_cases, n_holdout=n_holdout, params_file=params_file, out_root=out_root,
        version=f"{__version__}-demo.seed{seed}",
    )
    subtype_metrics = _subtype_metrics(subtypes, train, holdout, train_subtype, holdout_subtype)
    _write_tmb(tmb_dir, context, tmb, threshold, cv_metrics, holdout_metrics, fold_sizes, train)
    _plot_roc(tmb_dir / "roc.png", train.tmb_high, oof, holdout.tmb_high, holdout_p, threshold)
    _write_subtypes(subtype_dir, context, subtypes, subtype_metrics)
    for folder in (tmb_dir, subtype_dir):
        (folder / "RECIPE.md").write_text(_recipe(context, folder.name), encoding="utf-8")
    seconds = time.perf_counter() - started
    return TrainingSummary(
        out_root=out_root, seconds=seconds, n_cases=n_cases, n_holdout=n_holdout, tmb_cv=cv_metrics,
        tmb_holdout=holdout_metrics, threshold=threshold, n_tmb_features=len(tmb.features),
        subtype_ari_train=subtype_metrics["training"]["adjusted_rand_index"],
        subtype_ari_holdout=subtype_metrics["holdout"]["adjusted_rand_index"],
    )


@dataclass(frozen=True)
class _Context:
    seed: int
    n_cases: int
    n_holdout: int
    params_file: Path
    out_root: Path
    version: str

    @property
    def protocol(self) -> dict[str, Any]:
        return {
            "file": _relative(self.params_file, self.out_root),
            "sha256": hashlib.sha256(self.params_file.read_bytes()).hexdigest(),
            "pyradiomics": radiomics.__version__,
            "n_features": len(RadiomicsExtractor(self.params_file).feature_names),
        }

    @property
    def cohort(self) -> dict[str, Any]:
        return {
            "description": (
                "Synthetic CT crops, one lesion each, "
                f"{CASE_SHAPE_ZYX[0]}x{CASE_SHAPE_ZYX[1]}x{CASE_SHAPE_ZYX[2]} voxels (z, y, x) of "
                f"{CASE_SPACING_ZYX[0]} x {CASE_SPACING_ZYX[1]} x {CASE_SPACING_ZYX[2]} mm; "
                "texture driven by a latent TMB variable, 4 latent imaging phenotypes; "
                f"generated by dicomnode.train.predictors (generator version {GENERATOR_VERSION})"
            ),
            "training_seed": self.seed,
            "training_cases": self.n_cases,
            "holdout_seed": self.seed + HOLDOUT_SEED_OFFSET,
            "holdout_cases": self.n_holdout,
            "tmb_high_cutoff_mutations_per_mb": TMB_HIGH_CUTOFF,
        }

    @property
    def versions(self) -> dict[str, str]:
        return {
            "dicomnode": __version__,
            "pyradiomics": radiomics.__version__,
            "xgboost": xgboost.__version__,
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        }


def _subtype_metrics(
    subtypes: FittedSubtypes,
    train: FeatureTable,
    holdout: FeatureTable,
    train_subtype: np.ndarray,
    holdout_subtype: np.ndarray,
) -> dict[str, Any]:
    imputed, _ = impute(train.columns(SUBTYPE_FEATURES), subtypes.medians)
    standardised = (imputed - subtypes.mean) / subtypes.scale
    return {
        "training": {
            "adjusted_rand_index": float(adjusted_rand_score(train.phenotype, train_subtype)),
            "silhouette": float(silhouette_score(standardised, train_subtype)),
            "cases_per_subtype": _cases_per_subtype(train_subtype),
        },
        "holdout": {
            "adjusted_rand_index": float(adjusted_rand_score(holdout.phenotype, holdout_subtype)),
            "cases_per_subtype": _cases_per_subtype(holdout_subtype),
        },
        "note": "adjusted Rand index against the generator's latent phenotype "
        "(1 = identical partition, 0 = chance)",
    }


def _cases_per_subtype(subtypes: np.ndarray) -> list[int]:
    return np.bincount(subtypes, minlength=N_SUBTYPES + 1)[1:].tolist()


def _write_tmb(
    folder: Path,
    context: _Context,
    tmb: FittedTmb,
    threshold: float,
    cv_metrics: dict[str, float],
    holdout_metrics: dict[str, float],
    fold_sizes: list[int],
    train: FeatureTable,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmb.classifier.get_booster().save_model(str(folder / "model.json"))
    manifest = {
        "schema": TMB_SCHEMA,
        "name": "dicomnode TMB demonstration model",
        "version": context.version,
        "family": "XGBoost",
        "status": "DEMONSTRATION model fitted on a synthetic cohort; research use only; "
        "not a sequencing result",
        "model_file": "model.json",
        "positive_class": f"TMB-high (>= {TMB_HIGH_CUTOFF:g} mutations/Mb)",
        "features": list(tmb.features),
        "impute_medians": tmb.medians.tolist(),
        "threshold": threshold,
        "threshold_rule": "maximum Youden index of the out-of-fold cross-validated probabilities",
        "protocol": context.protocol,
        "training": {
            **context.cohort,
            "training_high": int(train.tmb_high.sum()),
            "selection": {
                "pearson_abs_r_max": PEARSON_MAX,
                "mann_whitney_alpha": MANN_WHITNEY_ALPHA,
                "min_selected": MIN_SELECTED,
                "features_selected_per_cv_fold": fold_sizes,
            },
            "xgboost_params": {**XGB_PARAMS, "random_state": context.seed},
            "cv_folds": CV_FOLDS,
        },
        "metrics": {"cross_validated": cv_metrics, "holdout": holdout_metrics},
        "versions": context.versions,
    }
    _write_json(folder / "manifest.json", manifest)
    (folder / "MODEL_CARD.md").write_text(_tmb_card(manifest), encoding="utf-8")


def _write_subtypes(
    folder: Path, context: _Context, subtypes: FittedSubtypes, metrics: dict[str, Any]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = {
        "schema": SUBTYPE_SCHEMA,
        "name": "dicomnode imaging subtype demonstration model",
        "version": context.version,
        "family": "nearest centroid",
        "status": "DEMONSTRATION model fitted on a synthetic cohort; research use only",
        "coding_scheme": CODING_SCHEME,
        "features": list(SUBTYPE_FEATURES),
        "impute_medians": subtypes.medians.tolist(),
        "mean": subtypes.mean.tolist(),
        "scale": subtypes.scale.tolist(),
        "centroids": subtypes.centroids.tolist(),
        "subtypes": subtype_entries(),
        "protocol": context.protocol,
        "training": {
            **context.cohort,
            "kmeans": {"k": N_SUBTYPES, "n_init": KMEANS_INITS, "random_state": context.seed},
        },
        "metrics": metrics,
        "versions": context.versions,
    }
    _write_json(folder / "model.json", model)
    (folder / "MODEL_CARD.md").write_text(_subtype_card(model), encoding="utf-8")


def _plot_roc(
    path: Path,
    cv_high: np.ndarray,
    cv_p: np.ndarray,
    holdout_high: np.ndarray,
    holdout_p: np.ndarray,
    threshold: float,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    curves = ((cv_high, cv_p, "cross-validated"), (holdout_high, holdout_p, "held-out"))
    for high, p, label in curves:
        fpr, tpr, _ = roc_curve(high, p)
        axes.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(high, p):.2f})")
    point = classification_metrics(cv_high, cv_p, threshold)
    youden = f"Youden threshold {threshold:.2f}"
    axes.plot(1 - point["specificity"], point["sensitivity"], "ko", label=youden)
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity")
    axes.set_title("TMB-high, synthetic DEMONSTRATION cohort")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve().parent))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- documents
def _metrics_line(m: dict[str, float]) -> str:
    return (
        f"| {m['n']} ({m['n_high']} high) | {m['auc']:.3f} | {m['sensitivity']:.3f} | "
        f"{m['specificity']:.3f} | {m['accuracy']:.3f} |"
    )


def _tmb_card(manifest: dict[str, Any]) -> str:
    t, m = manifest["training"], manifest["metrics"]
    return f"""# Model card: TMB high/low (DEMONSTRATION)

**This is a DEMONSTRATION model fitted on a synthetic cohort.** It shows that dicomnode's
radiomics-to-prediction machinery works end to end. It knows nothing about real tumours or
real patients. Intended use: research and software testing only. Its output is a research
prediction from imaging, **not a sequencing result**, and must never inform care.

- Name / version: {manifest['name']} / `{manifest['version']}`; family: XGBoost (binary:logistic).
- Output: P(TMB-high), TMB-high meaning >= {t['tmb_high_cutoff_mutations_per_mb']:g} mutations/Mb
  (seed 001's cut-off); a lesion is reported High when P >= the stored threshold
  **{manifest['threshold']:.4f}**.
- Files: `model.json` (XGBoost native JSON), `manifest.json` (input features in order, imputation
  medians, threshold, provenance, metrics), `roc.png`, `RECIPE.md` (how to rebuild it).

## Data
{t['description']}.
Training: {t['training_cases']} cases (seed {t['training_seed']}, {t['training_high']} TMB-high).
Held-out test: {t['holdout_cases']} further cases drawn with seed {t['holdout_seed']} (no case shared).
TMB is log-normal: log TMB = log 7 + 0.8 t + 0.45 e, with t and e standard normal; the lesion's
texture heterogeneity (amplitude and grain) follows t seen through noise (sd 0.6); the
phenotype (size, shape, density, necrosis, rim) is independent of TMB.

## Features
The 1037-feature pyradiomics protocol of `{manifest['protocol']['file']}`
(sha256 `{manifest['protocol']['sha256'][:16]}...`, pyradiomics {manifest['protocol']['pyradiomics']}):
see `models/radiomics/README.md` for which values are the paper's and which are ours.
The model uses {len(manifest['features'])} of them (listed in `manifest.json`).

## Method
As in seed 001 (the paper): Pearson redundancy filter (|r| > {t['selection']['pearson_abs_r_max']}: one of each pair
dropped), Mann-Whitney U filter (two-sided p < {t['selection']['mann_whitney_alpha']}), XGBoost classifier, operating
threshold at the maximum Youden index of cross-validated outputs.

Our choices, where the paper is silent or where this demonstration simplifies:
- of a correlated pair the feature that comes later in protocol order is dropped;
- if fewer than {t['selection']['min_selected']} features pass the Mann-Whitney filter, the {t['selection']['min_selected']} with the smallest p are kept;
- **the random-forest recursive feature elimination step of the paper is omitted**, and
  **cross-validation is single-level ({t['cv_folds']} stratified folds), not the paper's nested 5 x 5
  protocol**: the full nested-CV protocol is a later issue. Imputation, both filters and the
  fit run inside each training fold only (the test fold is never seen), so the
  cross-validated AUC is not inflated by selection; sensitivity/specificity at a threshold
  chosen on those same out-of-fold outputs are optimistic, hence the held-out figures below;
- XGBoost hyper-parameters fixed, not tuned: `{json.dumps(t['xgboost_params'])}`;
- missing (non-finite) inputs are replaced by the training medians stored in `manifest.json`;
  the node makes no prediction for a lesion with more than half of the inputs missing;
- the final model is refitted on all training cases (selected features: {len(manifest['features'])}; per
  CV fold: {t['selection']['features_selected_per_cv_fold']}).

## Metrics (measured on data the model did not see)
| data | cases | AUC | sensitivity | specificity | accuracy |
|---|---|---|---|---|---|
| cross-validated (out-of-fold) {_metrics_line(m['cross_validated'])}
| held-out cohort, final model {_metrics_line(m['holdout'])}

For scale, the paper reports AUC 0.732 (primary tumour) and 0.812 (liver metastasis) on 24
real patients; numbers on this synthetic cohort say only that the pipeline recovers a signal
that was planted on purpose.

## Limitations
Synthetic lesions with a planted, simple texture-TMB link; perfect segmentation; one crop
geometry; no scanner, protocol or contrast-phase variation. Do not use on patients.

Versions: {json.dumps(manifest['versions'])}
"""


def _subtype_card(model: dict[str, Any]) -> str:
    t, m = model["training"], model["metrics"]
    centroids = np.asarray(model["centroids"])
    rows = "\n".join(
        f"| {s['index']} | `{s['code_value']}` | {s['meaning']} | "
        + " | ".join(f"{v:+.2f}" for v in centroids[s['index'] - 1])
        + f" | {m['training']['cases_per_subtype'][s['index'] - 1]} |"
        for s in model["subtypes"]
    )
    header = " | ".join(f.replace("original_", "") for f in model["features"])
    return f"""# Model card: imaging subtype (DEMONSTRATION)

**This is a DEMONSTRATION model fitted on a synthetic cohort.** Intended use: research and
software testing only. The subtypes are clusters of synthetic lesions; they carry no
biological or prognostic meaning and must never inform care.

- Name / version: {model['name']} / `{model['version']}`; family: nearest centroid (k-means, k = 4).
- Output: one of four subtypes, coded in the private scheme `{model['coding_scheme']['designator']}`
  ({model['coding_scheme']['name']}); the codes match `[subtype].codes` of
  `sr_templates/tid1500_tmb.toml`.
- Files: `model.json` (features, imputation medians, standardisation mean and scale, centroids,
  codes, provenance, metrics), `RECIPE.md`.

## Data
{t['description']}.
Training: {t['training_cases']} cases (seed {t['training_seed']}); held-out: {t['holdout_cases']} cases (seed {t['holdout_seed']}).

## Method
Seed 003 (Wu et al. 2021) found four imaging subtypes but publishes no clustering code; every
step here is **our choice**, not the paper's:
- features: {len(model['features'])} size, shape and density features of the 1037-feature protocol
  (`{model['protocol']['file']}`), no texture (texture carries the synthetic TMB signal);
- standardisation: z-score with the training mean and standard deviation;
- clustering: k-means, k = 4, {t['kmeans']['n_init']} initialisations, seed {t['kmeans']['random_state']}; subtypes numbered
  by increasing centroid of `{model['features'][0]}` (lesion size), so subtype numbers are stable;
- assignment of a new lesion: nearest centroid (Euclidean, standardised units); missing
  inputs replaced by the training medians;
- names: "Imaging subtype 1..4", codes `IS1`..`IS4`: no meaning beyond the number.

Centroids (standardised units):

| subtype | code | meaning | {header} | training cases |
|---|---|---|{'---|' * len(model['features'])}---|
{rows}

## Metrics
Agreement with the generator's latent phenotype (adjusted Rand index, 1 = identical, 0 = chance):
training {m['training']['adjusted_rand_index']:.3f} (silhouette {m['training']['silhouette']:.3f}); held-out
{m['holdout']['adjusted_rand_index']:.3f} (cases per subtype {m['holdout']['cases_per_subtype']}).

## Limitations
Four planted phenotypes of synthetic lesions, perfect segmentation. Do not use on patients.

Versions: {json.dumps(model['versions'])}
"""


def _recipe(context: _Context, model: str) -> str:
    return f"""# Recipe: {model} (DEMONSTRATION model)

Rebuild both demonstration models (`tmb/` and `subtypes/` are fitted together) from the
project root:

```
dicomnode train predictors --out {context.out_root} --cases {context.n_cases} --seed {context.seed}
```

or, from Python:

```python
from pathlib import Path
from dicomnode.train.predictors import train_demo_models
print(train_demo_models(Path("{context.out_root}"), n_cases={context.n_cases}, seed={context.seed}, workers=2))
```

- Radiomics protocol: `{context.protocol['file']}` (sha256 `{context.protocol['sha256']}`).
- Cohorts: {context.n_cases} training cases (seed {context.seed}) and {context.n_holdout} held-out cases
  (seed {context.seed + HOLDOUT_SEED_OFFSET}), synthetic generator version {GENERATOR_VERSION}.
- Features are cached in `tmb/training_features.csv` (one row per case, keyed by protocol,
  generator and pyradiomics version): a rerun with the same inputs recomputes nothing and
  writes identical model files. Delete the file to recompute from scratch.
- The run is deterministic for a seed (XGBoost on one thread, seeded folds and k-means).
- Computing the features is the slow part (well under a second per case per core); fitting
  takes seconds.
- Versions: {json.dumps(context.versions)}
"""
