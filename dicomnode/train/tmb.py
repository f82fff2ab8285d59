"""Train the TMB-high classifier on a cohort with seed 001's protocol, in nested cross-validation.

``dicomnode train tmb --features features.csv --cohort cohort.csv --out models/<name>`` runs
:func:`train_tmb`. The paper's chain, in its order:

1. drop one of each pair of features with Pearson |r| > 0.9;
2. keep the features that differ between TMB-high and TMB-low (Mann-Whitney U test);
3. recursive feature elimination with a random forest;
4. XGBoost classifier;

all inside **nested cross-validation** (5 outer x 5 inner folds): for each outer fold, the
inner folds of its training part choose how many features the elimination keeps, then the
whole chain is refitted on that training part and scores the outer test fold, which nothing
before has seen. The cross-validated outputs give the ROC curve, the AUC (with a bootstrap
95% interval) and the operating threshold at the maximum Youden index; the final model is
the same chain refitted on every case. Cases with several lesions stay in one fold.

Small cohorts: the paper had 24 patients, of whom 8 (primary tumour) and 5 (liver metastasis)
were TMB-high. Training therefore runs with as few lesions of a class as there are outer folds
(5: one per outer test fold), the technical floor, below which it stops with an error; below
:attr:`TmbProtocol.recommended_per_class` (10) it goes on with a warning that is logged,
returned in :attr:`TmbTrainingSummary.warnings` and written into ``manifest.json``
(``training.warnings``) and the model card.

Every value the paper leaves open is a field of :class:`TmbProtocol` with its default and a
line in the model card marked as ours. Deterministic for a seed, whatever ``workers`` is.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import sklearn
import xgboost
from joblib import Parallel, delayed
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedGroupKFold

from dicomnode import __version__
from dicomnode.analyse.predict import TMB_SCHEMA, impute
from dicomnode.errors import TrainingError
from dicomnode.train import cpu_host, jsonable
from dicomnode.train.table import number, read_csv, read_feature_table

#: Feature-name prefixes left out of the TMB model by default: Wu's regional features serve
#: the subtype model; the paper's TMB model uses the radiomics protocol only.
DEFAULT_EXCLUDED_PREFIXES = ("wu_",)
_TRUE = {"1", "high", "true", "yes", "tmb-high"}
_FALSE = {"0", "low", "false", "no", "tmb-low"}


@dataclass(frozen=True)
class TmbProtocol:
    """Seed 001's model protocol; fields marked *ours* are choices the paper leaves open."""

    #: TMB-high means at least this many mutations/Mb (the paper's cut-off).
    high_cutoff: float = 10.0
    #: Of two features with Pearson |r| above this, one is dropped (the paper's value); ours:
    #: the one later in protocol order (shape, original, LoG, wavelet).
    pearson_max: float = 0.9
    #: Ours: "significant" Mann-Whitney U means two-sided p below this, uncorrected ...
    mann_whitney_alpha: float = 0.05
    #: ... and, ours, when fewer pass, the features with the smallest p, down to this many.
    min_after_filter: int = 5
    #: Ours: numbers of features the random-forest elimination may keep; the inner folds pick one.
    rfe_sizes: tuple[int, ...] = (5, 10, 20)
    #: Ours: share of the remaining features eliminated per random-forest refit.
    rfe_step: float = 0.2
    #: Ours: trees of the elimination's random forest (impurity importances).
    rf_trees: int = 200
    #: The paper's nested cross-validation.
    outer_folds: int = 5
    inner_folds: int = 5
    #: Ours: fixed XGBoost hyper-parameters (the paper publishes none).
    xgboost: Mapping[str, Any] = field(default_factory=lambda: {
        "n_estimators": 300,
        "max_depth": 2,
        "learning_rate": 0.05,
        "subsample": 0.8,
        "colsample_bytree": 0.8,
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "tree_method": "hist",
        "n_jobs": 1,  # one thread per fit: bit-for-bit reproducible
    })
    #: Ours: bootstrap resamples of the cross-validated outputs for the AUC's 95% interval.
    bootstrap: int = 2000
    #: Ours: with fewer lesions than this in the smaller class, training goes on with a
    #: warning (recorded in the manifest and the model card). 10 = 2 x 5 outer folds: below
    #: it an outer test fold holds one lesion of that class and some inner test folds none,
    #: so the AUC, its interval and the Youden threshold are very unstable. The paper itself
    #: had 5 to 8 TMB-high patients. The hard floor is :attr:`outer_folds` per class.
    recommended_per_class: int = 10

    def __post_init__(self) -> None:
        if not self.rfe_sizes or min(self.rfe_sizes) < 1:
            raise TrainingError("rfe_sizes: give at least one number of features, each >= 1")
        if not 0 < self.rfe_step < 1:
            raise TrainingError(f"rfe_step: must lie in (0, 1), got {self.rfe_step}")
        if min(self.outer_folds, self.inner_folds) < 2:
            raise TrainingError("outer_folds and inner_folds must be >= 2")
        if self.recommended_per_class < 1:
            raise TrainingError(
                f"recommended_per_class: must be >= 1, got {self.recommended_per_class}"
            )


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class TrainingSet:
    """Features and truth of every lesion that has both, in the features CSV's order."""

    keys: tuple[tuple[str, ...], ...]  # (case_id, roi, mask_label) as present
    names: tuple[str, ...]
    values: np.ndarray  # (lesions, features), NaN where not computed
    high: np.ndarray  # 1 = TMB-high
    groups: np.ndarray  # case_id per lesion: one case never straddles two folds
    target: str  # how ``high`` was defined, for the model card
    dropped: tuple[str, ...] = ()  # why rows were left out

    def shuffled(self, seed: int) -> TrainingSet:
        """The same set with the labels permuted across cases (a leakage check)."""
        rng = np.random.default_rng(seed)
        return TrainingSet(self.keys, self.names, self.values, rng.permutation(self.high),
                           self.groups, f"{self.target}, labels shuffled (seed {seed})")


def load_training_set(
    features_csv: Path,
    cohort_csv: Path,
    *,
    tmb_column: str = "tmb",
    label_column: str | None = None,
    high_cutoff: float = 10.0,
    excluded_prefixes: Sequence[str] = DEFAULT_EXCLUDED_PREFIXES,
) -> TrainingSet:
    """Join a features CSV (``dicomnode features``) with its cohort CSV's targets.

    The truth is ``label_column`` when given (1/0, high/low, true/false), else
    ``tmb_column >= high_cutoff``. Rows are matched on ``case_id`` and on ``roi`` and
    ``mask_label`` where both files have them. Lesions without a target, or whose features
    all failed, are left out and listed in :attr:`TrainingSet.dropped`.
    """
    table = read_feature_table(
        features_csv, include=lambda name: not name.startswith(tuple(excluded_prefixes))
    )
    cohort_header, cohort_rows = read_csv(cohort_csv)
    if "case_id" not in cohort_header:
        raise TrainingError(f"{cohort_csv}: no case_id column")
    wanted = label_column or tmb_column
    if wanted not in cohort_header:
        raise TrainingError(f"{cohort_csv}: no column {wanted!r} (columns: {cohort_header})")
    shared = [i for i, c in enumerate(table.lesion_columns) if c in cohort_header]
    truth = {
        (row["case_id"], *(row[table.lesion_columns[i]] for i in shared)): (
            _label(row[wanted], cohort_csv, line, wanted) if label_column
            else _tmb_high(row[wanted], cohort_csv, line, wanted, high_cutoff)
        )
        for line, row in cohort_rows
    }
    keys = [(lesion[0], *(lesion[1 + i] for i in shared)) for lesion in table.lesions]
    measured = np.isfinite(table.values).any(axis=1)
    keep = np.array([key in truth and ok for key, ok in zip(keys, measured)], dtype=bool)
    reasons = [
        f"{'/'.join(key)}: " + (f"not in {Path(cohort_csv).name}" if key not in truth
                                else "no feature could be computed")
        for key, kept in zip(keys, keep) if not kept
    ]
    table = table.select(keep, reasons)
    target = (f"{label_column} column" if label_column
              else f"{tmb_column} >= {high_cutoff:g} mutations/Mb")
    return TrainingSet(
        keys=table.lesions,
        names=table.names,
        values=table.values,
        high=np.asarray([truth[key] for key, kept in zip(keys, keep) if kept], dtype=int),
        groups=table.case_ids,
        target=target,
        dropped=table.left_out,
    )


def _tmb_high(text: str, path: Path, line: int, column: str, cutoff: float) -> int:
    value = number(text, path, line, column)
    if not math.isfinite(value) or value < 0:
        raise TrainingError(f"{path}, line {line}, column {column}: TMB must be a number >= 0 "
                            f"(mutations/Mb), got {text!r}")
    return int(value >= cutoff)


def _label(text: str, path: Path, line: int, column: str) -> int:
    word = text.strip().lower()
    if word in _TRUE:
        return 1
    if word in _FALSE:
        return 0
    raise TrainingError(f"{path}, line {line}, column {column}: expected one of "
                        f"{sorted(_TRUE | _FALSE)}, got {text!r}")


# ----------------------------------------------------------------------------- the chain
@dataclass(frozen=True)
class FittedChain:
    """Imputation, selection and classifier fitted on one training set."""

    features: tuple[str, ...]
    medians: np.ndarray  # of the selected features
    classifier: xgboost.XGBClassifier

    def probabilities(self, values: np.ndarray, names: Sequence[str]) -> np.ndarray:
        index = {n: i for i, n in enumerate(names)}
        matrix, _ = impute(values[:, [index[n] for n in self.features]], self.medians)
        return self.classifier.predict_proba(matrix)[:, 1]


def column_medians(values: np.ndarray) -> np.ndarray:
    """Median of each column's finite values; 0 where none (a constant the filters drop)."""
    with np.errstate(all="ignore"):
        medians = np.nanmedian(np.where(np.isfinite(values), values, np.nan), axis=0)
    return np.nan_to_num(medians, nan=0.0)


def filter_features(values: np.ndarray, high: np.ndarray, protocol: TmbProtocol) -> np.ndarray:
    """Columns that survive the Pearson redundancy and Mann-Whitney U filters, in order.

    ``values`` must be imputed. Visiting columns in protocol order keeps, of a redundant
    pair, the one that comes first.
    """
    varying = np.flatnonzero(np.ptp(values, axis=0) > 0)
    with np.errstate(all="ignore"):
        correlation = np.abs(np.corrcoef(values[:, varying], rowvar=False))
    correlation = np.nan_to_num(np.atleast_2d(correlation), nan=0.0)
    kept: list[int] = []
    for j in range(len(varying)):
        if not kept or correlation[j, kept].max() <= protocol.pearson_max:
            kept.append(j)
    columns = varying[kept]
    p_values = stats.mannwhitneyu(values[high == 1][:, columns], values[high == 0][:, columns],
                                  axis=0).pvalue
    significant = p_values < protocol.mann_whitney_alpha
    if significant.sum() < protocol.min_after_filter:
        significant = np.zeros_like(significant)
        significant[np.argsort(p_values, kind="stable")[:protocol.min_after_filter]] = True
    return columns[significant]


def rfe_path(
    values: np.ndarray, high: np.ndarray, columns: np.ndarray, protocol: TmbProtocol, seed: int
) -> dict[int, np.ndarray]:
    """Random-forest recursive feature elimination from ``columns`` down to each wanted size.

    Returns, for every size of :attr:`TmbProtocol.rfe_sizes`, the columns left when the
    elimination reached it (all of ``columns`` for a size larger than they are). One
    elimination serves every size: each refit drops the :attr:`TmbProtocol.rfe_step` share
    with the lowest importance, never stepping past the next wanted size.
    """
    remaining = np.asarray(columns)
    path = {}
    for size in sorted(protocol.rfe_sizes, reverse=True):
        while len(remaining) > size:
            forest = RandomForestClassifier(n_estimators=protocol.rf_trees, random_state=seed,
                                            n_jobs=1)
            forest.fit(values[:, remaining], high)
            drop = min(max(1, round(protocol.rfe_step * len(remaining))), len(remaining) - size)
            order = np.argsort(forest.feature_importances_, kind="stable")
            remaining = remaining[np.sort(order[drop:])]  # stays in protocol order
        path[size] = remaining
    return path


def _selection_path(
    values: np.ndarray, high: np.ndarray, protocol: TmbProtocol, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Medians, imputed values and the elimination path, all from these rows only."""
    n_high = int(np.sum(high))
    if n_high == 0 or n_high == len(high):
        # Possible above the floor when one class's lesions come from too few cases: a case
        # never straddles two folds, so a fold can take every lesion of that class.
        raise TrainingError(
            f"a cross-validation training part holds {n_high} TMB-high and "
            f"{len(high) - n_high} TMB-low lesions: it needs both classes. The lesions of the "
            f"smaller class come from too few cases (a case stays in one fold); add cases or "
            f"lower outer_folds/inner_folds"
        )
    medians = column_medians(values)
    imputed, _ = impute(values, medians)
    return medians, imputed, rfe_path(imputed, high, filter_features(imputed, high, protocol),
                                      protocol, seed)


def _classifier(protocol: TmbProtocol, seed: int) -> xgboost.XGBClassifier:
    return xgboost.XGBClassifier(**protocol.xgboost, random_state=seed)


def fit_chain(
    values: np.ndarray, high: np.ndarray, names: Sequence[str], size: int,
    protocol: TmbProtocol, seed: int,
) -> FittedChain:
    """The whole chain on these rows, the elimination keeping ``size`` features."""
    medians, imputed, path = _selection_path(values, high, protocol, seed)
    columns = path[size]
    classifier = _classifier(protocol, seed)
    classifier.fit(imputed[:, columns], high)
    return FittedChain(tuple(names[c] for c in columns), medians[columns], classifier)


def choose_size(
    values: np.ndarray, high: np.ndarray, groups: np.ndarray, protocol: TmbProtocol, seed: int
) -> tuple[int, dict[int, float]]:
    """The elimination size with the best inner cross-validated AUC (ties: fewer features).

    Selection and fitting run inside every inner training fold. Returns the size and the
    inner AUC of every size.
    """
    folds = StratifiedGroupKFold(n_splits=protocol.inner_folds, shuffle=True, random_state=seed)
    scores: dict[int, np.ndarray] = {}
    for train, test in folds.split(values, high, groups):
        medians, imputed, path = _selection_path(values[train], high[train], protocol, seed)
        test_x, _ = impute(values[test], medians)
        for size, columns in path.items():
            classifier = _classifier(protocol, seed)
            classifier.fit(imputed[:, columns], high[train])
            scores.setdefault(size, np.full(len(high), np.nan))[test] = (
                classifier.predict_proba(test_x[:, columns])[:, 1]
            )
    aucs = {size: _auc(high, p) for size, p in scores.items()}
    best = max(sorted(aucs), key=lambda size: aucs[size])  # sorted: ties go to the smaller
    return best, aucs


def _auc(high: np.ndarray, probabilities: np.ndarray) -> float:
    # A size that some inner fold could not reach (too few features there) has NaN entries.
    seen = np.isfinite(probabilities)
    if len(np.unique(high[seen])) < 2:
        return math.nan
    return float(roc_auc_score(high[seen], probabilities[seen]))


@dataclass(frozen=True)
class OuterFold:
    """One outer fold: what the inner folds chose and what the refitted chain predicted."""

    test: np.ndarray
    probabilities: np.ndarray
    size: int
    inner_aucs: dict[int, float]
    features: tuple[str, ...]


def _outer_fold(
    data: TrainingSet, train: np.ndarray, test: np.ndarray, protocol: TmbProtocol, seed: int
) -> OuterFold:
    size, inner = choose_size(data.values[train], data.high[train], data.groups[train],
                              protocol, seed)
    chain = fit_chain(data.values[train], data.high[train], data.names, size, protocol, seed)
    return OuterFold(test, chain.probabilities(data.values[test], data.names), size, inner,
                     chain.features)


def nested_cross_validation(
    data: TrainingSet, protocol: TmbProtocol, seed: int, workers: int = 1
) -> tuple[np.ndarray, list[OuterFold]]:
    """Out-of-fold P(TMB-high) for every lesion; nothing fitted on a fold ever sees its test part.

    Raises :class:`TrainingError` below the floor of :func:`check_classes`; call that first
    for its warnings.
    """
    check_classes(data, protocol)
    folds = StratifiedGroupKFold(n_splits=protocol.outer_folds, shuffle=True, random_state=seed)
    splits = list(folds.split(data.values, data.high, data.groups))
    outer = Parallel(n_jobs=workers)(
        delayed(_outer_fold)(data, train, test, protocol, seed + 1 + i)
        for i, (train, test) in enumerate(splits)
    )
    probabilities = np.empty(len(data.high))
    for fold in outer:
        probabilities[fold.test] = fold.probabilities
    return probabilities, list(outer)


def check_classes(data: TrainingSet, protocol: TmbProtocol) -> tuple[str, ...]:
    """Refuse a cohort below the technical floor; warn below the recommended size.

    The floor is :attr:`TmbProtocol.outer_folds` lesions of each class: stratified outer
    folds can then give every outer test fold one lesion of each class and every training
    part both classes (the inner AUCs are computed over the pooled inner out-of-fold outputs,
    so an inner test fold without a class is allowed). When a class's lesions come from too
    few cases, a training part can still lack it: :func:`_selection_path` then stops with an
    error. Returns the warnings: one when the smaller class has fewer than
    :attr:`TmbProtocol.recommended_per_class` lesions.
    """
    n_high = int(data.high.sum())
    n_low = len(data.high) - n_high
    smallest = min(n_high, n_low)
    counts = f"this cohort has {n_high} TMB-high and {n_low} TMB-low"
    if smallest < protocol.outer_folds:
        raise TrainingError(
            f"nested {protocol.outer_folds} x {protocol.inner_folds} cross-validation needs at "
            f"least {protocol.outer_folds} lesions of each class (one per outer fold); {counts}"
        )
    if smallest < protocol.recommended_per_class:
        which = "TMB-high" if n_high <= n_low else "TMB-low"
        return (
            f"only {smallest} {which} lesions, fewer than the recommended "
            f"{protocol.recommended_per_class} ({counts}): each outer test fold holds about one "
            f"of them and some inner test folds none, so the cross-validated AUC, its interval "
            f"and the Youden threshold are very unstable. Trained anyway (the paper had 5 to 8 "
            f"TMB-high patients of 24); treat the metrics as a rough indication only.",
        )
    return ()


# ----------------------------------------------------------------------------- metrics
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


def bootstrap_auc_interval(
    high: np.ndarray, probabilities: np.ndarray, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile 95% interval of the AUC over case resamples (those with one class skipped)."""
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples):
        pick = rng.integers(0, len(high), len(high))
        if 0 < high[pick].sum() < len(pick):
            aucs.append(roc_auc_score(high[pick], probabilities[pick]))
    low, up = np.percentile(aucs, [2.5, 97.5])
    return float(low), float(up)


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TmbTrainingSummary:
    """What :func:`train_tmb` did; ``str()`` gives a short report."""

    out_dir: Path
    seconds: float
    metrics: dict[str, Any]
    threshold: float
    n_features: int
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        m = self.metrics
        low, up = m["auc_95ci"]
        return "\n".join([
            *(f"WARNING: {w}" for w in self.warnings),
            f"wrote {self.out_dir} in {self.seconds:.0f} s",
            f"nested cross-validated AUC {m['auc']:.3f} (95% CI {low:.3f}-{up:.3f}), "
            f"{m['n']} lesions ({m['n_high']} TMB-high)",
            f"Youden threshold {self.threshold:.3f}: sensitivity {m['sensitivity']:.3f}, "
            f"specificity {m['specificity']:.3f}, accuracy {m['accuracy']:.3f}",
            f"final model: {self.n_features} features. Research use only.",
        ])


def train_tmb(
    data: TrainingSet,
    out_dir: Path,
    *,
    protocol: TmbProtocol | None = None,
    seed: int = 0,
    workers: int = 2,
    name: str = "dicomnode TMB model",
    cohort_note: str = "",
    sources: Mapping[str, str] | None = None,
    log=print,
) -> TmbTrainingSummary:
    """Nested cross-validation, final refit on all lesions, and the model folder.

    Writes ``model.json`` (XGBoost), ``manifest.json`` (what the node reads: features,
    medians, threshold), ``cv_predictions.csv``, ``roc.png``, ``MODEL_CARD.md`` and
    ``RECIPE.md`` into ``out_dir``.

    Parameters
    ----------
    cohort_note:
        One paragraph about the cohort for the model card (who, scanner, phase, ...).
    sources:
        Provenance for the card: e.g. ``{"features": ..., "cohort": ..., "command": ...}``.
    """
    started = time.perf_counter()
    protocol = protocol or TmbProtocol()
    out_dir = Path(out_dir)
    warnings = check_classes(data, protocol)
    for warning in warnings:
        log(f"WARNING: {warning}")
    log(f"nested {protocol.outer_folds} x {protocol.inner_folds} cross-validation on "
        f"{len(data.high)} lesions, {len(data.names)} features ...")
    probabilities, folds = nested_cross_validation(data, protocol, seed, workers)
    threshold = youden_threshold(data.high, probabilities)
    metrics: dict[str, Any] = classification_metrics(data.high, probabilities, threshold)
    metrics["auc_95ci"] = bootstrap_auc_interval(data.high, probabilities, protocol.bootstrap, seed)
    log(f"cross-validated AUC {metrics['auc']:.3f}; refitting on all lesions ...")
    size, inner = choose_size(data.values, data.high, data.groups, protocol, seed)
    final = fit_chain(data.values, data.high, data.names, size, protocol, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    final.classifier.get_booster().save_model(str(out_dir / "model.json"))
    _write_predictions(out_dir / "cv_predictions.csv", data, probabilities, folds)
    plot_roc(out_dir / "roc.png", data.high, probabilities, threshold, title=name)
    manifest = {
        "schema": TMB_SCHEMA,
        "name": name,
        "version": f"{__version__}+{_digest(out_dir / 'model.json')}",
        "family": "XGBoost",
        "status": "research prediction from imaging; not a sequencing result",
        "model_file": "model.json",
        "positive_class": data.target,
        "features": list(final.features),
        "impute_medians": final.medians.tolist(),
        "threshold": threshold,
        "threshold_rule": "maximum Youden index of the nested cross-validated probabilities",
        "protocol": {**jsonable(asdict(protocol)), "seed": seed},
        "training": {
            "host": cpu_host(),
            "lesions": len(data.high),
            "cases": len(np.unique(data.groups)),
            "high": int(data.high.sum()),
            "target": data.target,
            "left_out": list(data.dropped),
            "candidate_features": len(data.names),
            "warnings": list(warnings),
            "note": cohort_note,
            "sources": dict(sources or {}),
            "final_size_inner_aucs": {str(k): v for k, v in inner.items()},
            "outer_folds": [
                {"size": f.size, "inner_aucs": {str(k): v for k, v in f.inner_aucs.items()},
                 "features": list(f.features), "test_lesions": len(f.test)}
                for f in folds
            ],
        },
        "metrics": {"nested_cross_validated": metrics},
        "versions": _versions(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out_dir / "MODEL_CARD.md").write_text(model_card(manifest), encoding="utf-8")
    (out_dir / "RECIPE.md").write_text(_recipe(manifest), encoding="utf-8")
    return TmbTrainingSummary(out_dir, time.perf_counter() - started, metrics, threshold,
                              len(final.features), warnings)


def _write_predictions(
    path: Path, data: TrainingSet, probabilities: np.ndarray, folds: Sequence[OuterFold]
) -> None:
    fold_of = np.empty(len(data.high), dtype=int)
    for i, fold in enumerate(folds):
        fold_of[fold.test] = i
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lesion", "outer_fold", "tmb_high", "probability"])
        for i, key in enumerate(data.keys):
            writer.writerow(["/".join(key), fold_of[i], data.high[i], repr(float(probabilities[i]))])


def plot_roc(
    path: Path, high: np.ndarray, probabilities: np.ndarray, threshold: float, *, title: str
) -> None:
    """ROC curve of the cross-validated outputs with the Youden operating point."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fpr, tpr, _ = roc_curve(high, probabilities)
    point = classification_metrics(high, probabilities, threshold)
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(fpr, tpr, label=f"nested CV (AUC {point['auc']:.2f})")
    axes.plot(1 - point["specificity"], point["sensitivity"], "ko",
              label=f"Youden threshold {threshold:.2f}")
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def _versions() -> dict[str, str]:
    return {
        "dicomnode": __version__,
        "xgboost": xgboost.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


# ----------------------------------------------------------------------------- documents
def model_card(manifest: Mapping[str, Any]) -> str:
    """The model card of a trained TMB model, from its manifest."""
    t, p = manifest["training"], manifest["protocol"]
    m = manifest["metrics"]["nested_cross_validated"]
    low, up = m["auc_95ci"]
    sizes = ", ".join(str(f["size"]) for f in t["outer_folds"])
    left_out = f"{len(t['left_out'])} lesion(s) left out (listed in `manifest.json`)." \
        if t["left_out"] else "No lesion was left out."
    warnings = "".join(f"\n**Warning:** {w}" for w in t.get("warnings", ()))
    # Manifests written before the field existed were trained with the default.
    recommended = p.get("recommended_per_class", 10)
    return f"""# Model card: {manifest['name']}

Output: P(TMB-high) of a lesion, TMB-high meaning **{t['target']}**; the node reports High when
P >= **{manifest['threshold']:.4f}**. Intended use: **research only**. The output is a research
prediction from imaging, **not a sequencing result**, and must not inform care.

- Version `{manifest['version']}`, XGBoost (binary:logistic); files: `model.json` (XGBoost
  JSON), `manifest.json` (features in order, imputation medians, threshold, protocol, folds),
  `cv_predictions.csv` (every lesion's cross-validated probability), `roc.png`, `RECIPE.md`.

## Data
{t['note'] or 'No description of the cohort was given.'}
{t['lesions']} lesions of {t['cases']} cases, {t['high']} TMB-high; {t['candidate_features']} candidate features.
{left_out}{warnings}
One row of the features CSV is one lesion (segmented VOI); the lesions of a case stay in one fold.
Sources: {json.dumps(t['sources'])}

## Method
Seed 001's chain, in its order: Pearson redundancy filter (|r| > {p['pearson_max']}), Mann-Whitney U
filter, random-forest recursive feature elimination, XGBoost, all inside nested
cross-validation ({p['outer_folds']} outer x {p['inner_folds']} inner folds, stratified, cases grouped): selection and
fitting never see the outer test fold. ROC analysis on the cross-validated outputs; operating
threshold at the maximum Youden index; final model refitted on every lesion.

Where this differs from seed 001 as written:
- the paper ran "all statistical analysis and machine learning" in **R 4.1.0** (packages not
  named); dicomnode runs the same steps in **Python** (scipy's Mann-Whitney U, scikit-learn's
  random forest and stratified group folds, the xgboost Python package, versions below): the
  same method, not the same code, so the paper's figures cannot be reproduced to the digit;
- the paper reports one AUC per lesion site (primary tumour, liver metastasis) and per CT
  phase (so, as we read it, one model each), on one segmented lesion per patient (for the
  liver, the metastasis that was sequenced); this model is fitted on whatever lesions, sites
  and phases the cohort CSV lists.

Choices the paper leaves open (ours, each a field of `dicomnode.train.tmb.TmbProtocol`, or fixed):
- the redundancy filter uses |r| (the paper writes "r > 0.9"; a strong negative correlation is as
  collinear); of a correlated pair, the feature later in protocol order is dropped;
- folds are stratified by class and keep the lesions of a case together (the paper says neither);
- Mann-Whitney U: two-sided, uncorrected p < {p['mann_whitney_alpha']}; if fewer than {p['min_after_filter']} pass,
  the {p['min_after_filter']} with the smallest p are kept;
- elimination: random forest of {p['rf_trees']} trees, impurity importance, {p['rfe_step']:.0%} of the remaining
  features dropped per refit; the inner folds choose how many features it keeps among
  {p['rfe_sizes']} by inner cross-validated AUC (outer folds chose {sizes}; final model
  {len(manifest['features'])});
- XGBoost hyper-parameters fixed, not tuned: `{json.dumps(p['xgboost'])}`;
- non-finite inputs are replaced by training medians (stored); the node makes no prediction
  for a lesion with more than half of its inputs missing;
- 95% interval of the AUC: percentile bootstrap over lesions, {p['bootstrap']} resamples; seed {p['seed']};
- cohort size: training needs at least {p['outer_folds']} lesions of each class (one per outer fold)
  and warns, in the log, `manifest.json` and this card, below {recommended} (`recommended_per_class`).

## Metrics (nested cross-validation: every figure from lesions the model did not see)
| lesions | AUC (95% CI) | sensitivity | specificity | accuracy |
|---|---|---|---|---|
| {m['n']} ({m['n_high']} high) | {m['auc']:.3f} ({low:.3f}-{up:.3f}) | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['accuracy']:.3f} |

Sensitivity, specificity and accuracy use a threshold chosen on the same cross-validated
outputs, so they are somewhat optimistic.

For scale only (another cohort and, as we read it, one model per site and phase): seed 001
reports AUCs per CT phase, and its headline figures (the abstract's "maximum values") are the
better phase of each site: primary tumour 0.732 (supine, contrast-enhanced CT colonography, 35 s; prone, 300 s: 0.701) and
liver metastasis 0.812 (contrast-enhanced, 70 s; non-contrast: 0.784). Contrast CT was analysed
in 22 of the 24 patients (two received no contrast), so both headline AUCs come from 22
patients; of all 24, 8 (primary) and 5 (liver) were TMB-high. No confidence intervals are
given. Its sensitivity 0.857, specificity 0.600 and accuracy 0.682 are for TMB *discordance*
between primary and metastasis, not for TMB status.

Trained on {t['host']}. Versions: {json.dumps(manifest['versions'])}
"""


def _recipe(manifest: Mapping[str, Any]) -> str:
    sources = manifest["training"]["sources"]
    command = sources.get("command", "dicomnode train tmb --features FEATURES.csv "
                                     "--cohort COHORT.csv --out DIR")
    return f"""# Recipe: {manifest['name']}

```
{command}
```

Deterministic for a seed (`--seed`, here {manifest['protocol']['seed']}); `--workers` changes only the speed.
The protocol values are in `manifest.json` (`protocol`) and explained in `MODEL_CARD.md`.
Seed 001 ran its analysis in R 4.1.0; this recipe runs dicomnode's Python implementation of
the same steps (the versions below), so its figures are not the paper's to the digit.
Versions: {json.dumps(manifest['versions'])}
"""
