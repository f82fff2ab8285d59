"""Fit the imaging-subtype model of seed 003 (Wu et al. 2021) by consensus clustering.

``dicomnode train subtypes --features features.csv --out models/<name> [--k 4] [--seed 0]``
runs :func:`train_subtypes`:

1. read the lesions' ``wu_`` features (:mod:`dicomnode.analyse.regional`) from a features CSV
   (``case_id``, optional lesion columns ``label``/``roi``/``mask_label``, then features; other
   feature columns are ignored unless named);
2. replace missing values by the feature's median, drop features that are constant, and
   standardise (z-score with the training mean and population standard deviation);
3. consensus clustering (Monti et al. 2003) for every k of ``k_range`` and the chosen k:
   ``resamples`` times, k-means (best of 5 starts) on a random ``subsample`` of the lesions
   (all features); the consensus matrix holds, per pair of lesions, how often they fell in
   one cluster among the resamples that drew both; its CDF, the area under it, the delta area
   and the PAC (proportion of ambiguous clustering: share of pairs with consensus in
   (0.1, 0.9), Senbabaoglu et al. 2014) say how stable each k is;
4. the final subtypes: average-linkage hierarchical clustering of ``1 - consensus`` for the
   chosen k (default 4, the paper's number), numbered by decreasing size; centroids are the
   subtypes' mean standardised features; a new lesion gets the subtype of the nearest
   centroid (:meth:`dicomnode.analyse.predict.SubtypeModel.assign`);
5. write ``model.json`` (what the node reads), ``consensus.json``, ``consensus.png``,
   ``profiles.png``, ``assignments.csv``, ``MODEL_CARD.md`` and ``RECIPE.md``.

The paper publishes no clustering code: every step above is our choice and the model card
says so. Subtype codes come from ``[subtype].codes`` of the SR template; a k larger than the
number of codes declared there is refused (declare ``IS5``... in the template first, or the
node could not report the new subtypes). Deterministic for a seed.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import sklearn
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from dicomnode import __version__
from dicomnode.analyse.predict import MAX_IMPUTED_FRACTION, SUBTYPE_SCHEMA, SubtypeModel
from dicomnode.analyse.regional import PREFIX as REGIONAL_PREFIX
from dicomnode.config import Config, home
from dicomnode.errors import TrainingError
from dicomnode.report.template import load_template
from dicomnode.train import cpu_host
from dicomnode.train.table import FeatureTable, read_feature_table
from dicomnode.types import ModelInfo, Subtype

#: Consensus values strictly inside this interval count as ambiguous (PAC).
PAC_INTERVAL = (0.1, 0.9)
#: Where the consensus CDF is tabulated in ``consensus.json`` and drawn.
CDF_GRID = np.linspace(0.0, 1.0, 101)
MODEL_NAME = "dicomnode imaging subtype model"
DEFAULT_K_RANGE = (2, 6)
DEFAULT_SUBSAMPLE = 0.8
#: k-means starts per resample (best inertia kept): a single start lands in a poor local
#: minimum often enough to blur the consensus with the clusterer's own instability.
KMEANS_STARTS = 5


def _is_regional(name: str) -> bool:
    return name.startswith(REGIONAL_PREFIX)


@dataclass(frozen=True)
class Standardisation:
    """Median imputation and z-scoring fitted on the training lesions."""

    names: tuple[str, ...]
    medians: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    dropped: tuple[str, ...]  # "name: reason"

    def apply(self, imputed: np.ndarray) -> np.ndarray:
        return (imputed - self.mean) / self.scale


def fit_standardisation(table: FeatureTable) -> tuple[Standardisation, np.ndarray]:
    """The standardisation of ``table`` and its imputed (not standardised) kept columns.

    A feature with no finite value, or the same value for every lesion after imputation,
    separates nothing and would divide by zero: it is dropped, with the reason.
    """
    finite = np.isfinite(table.values)
    has_value = finite.any(axis=0)
    medians = np.full(len(table.names), np.nan)
    for j in np.flatnonzero(has_value):
        medians[j] = np.median(table.values[finite[:, j], j])
    imputed = np.where(finite, table.values, medians)
    std = imputed.std(axis=0)
    keep = has_value & (std > 1e-12 * np.maximum(np.abs(imputed).max(axis=0), 1.0))
    dropped = tuple(
        f"{name}: {'no finite value' if not has_value[j] else 'constant'}"
        for j, name in enumerate(table.names)
        if not keep[j]
    )
    if not keep.any():
        raise TrainingError(f"{table.path}: every feature is constant or missing")
    standardisation = Standardisation(
        names=tuple(n for n, k in zip(table.names, keep) if k),
        medians=medians[keep],
        mean=imputed[:, keep].mean(axis=0),
        scale=std[keep],
        dropped=dropped,
    )
    return standardisation, imputed[:, keep]


# ----------------------------------------------------------------------------- consensus
@dataclass(frozen=True)
class Consensus:
    """Consensus clustering of the lesions for one k."""

    k: int
    matrix: np.ndarray  # (n, n): share of co-sampled resamples that put the pair together
    cdf: np.ndarray  # empirical CDF of the pairs' consensus at CDF_GRID
    area: float  # area under the CDF (Monti et al.)
    pac: float


def consensus_matrix(
    x: np.ndarray,
    k: int,
    *,
    resamples: int,
    subsample: float,
    seed: int,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Consensus of k-means (:data:`KMEANS_STARTS` k-means++ starts) over ``resamples``
    subsamples of the rows.

    Pairs never drawn together (vanishingly rare with dozens of resamples) get 0. The random
    stream depends on ``(seed, k)`` only, so every k is reproducible on its own.
    """
    n = len(x)
    size = round(subsample * n)
    rng = np.random.default_rng([seed, k])
    together = np.zeros((n, n))
    drawn = np.zeros((n, n))
    with threadpool_limits(1):  # tiny fits: threads cost more than they give
        for _ in range(resamples):
            rows = np.sort(rng.choice(n, size=size, replace=False))
            clusterer = KMeans(
                n_clusters=k, n_init=KMEANS_STARTS, random_state=int(rng.integers(2**31 - 1))
            )
            labels = clusterer.fit_predict(x[rows])
            members = np.eye(k)[labels]
            block = np.ix_(rows, rows)
            together[block] += members @ members.T
            drawn[block] += 1
            if progress is not None:
                progress.update()
    matrix = np.divide(together, drawn, out=np.zeros_like(together), where=drawn > 0)
    np.fill_diagonal(matrix, 1.0)
    return matrix


def summarise_consensus(matrix: np.ndarray, k: int) -> Consensus:
    """CDF, area under the CDF and PAC of the consensus values of all pairs ``i < j``."""
    pairs = np.sort(matrix[np.triu_indices(len(matrix), 1)])
    cdf = np.searchsorted(pairs, CDF_GRID, side="right") / len(pairs)
    levels, counts = np.unique(pairs, return_counts=True)
    # Monti et al.: sum over the sorted distinct values of (x_i - x_(i-1)) CDF(x_i).
    area = float(np.sum(np.diff(levels) * (np.cumsum(counts)[1:] / len(pairs))))
    low, high = PAC_INTERVAL
    pac = float(np.mean((pairs > low) & (pairs < high)))
    return Consensus(k=k, matrix=matrix, cdf=cdf, area=area, pac=pac)


def delta_areas(consensus: Sequence[Consensus]) -> dict[int, float]:
    """Relative change of the CDF area from k - 1 to k (ConsensusClusterPlus' convention;
    the smallest k gets its area)."""
    ordered = sorted(consensus, key=lambda c: c.k)
    deltas = {ordered[0].k: ordered[0].area}
    for before, after in itertools.pairwise(ordered):
        deltas[after.k] = (after.area - before.area) / before.area if before.area > 0 else math.nan
    return deltas


def consensus_partition(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage hierarchical clustering of ``1 - consensus`` cut into ``k`` clusters.

    Returns 0-based cluster labels and the dendrogram's leaf order (for the plot).
    """
    distance = 1.0 - matrix
    np.fill_diagonal(distance, 0.0)
    tree = hierarchy.linkage(squareform(distance, checks=False), method="average")
    labels = hierarchy.fcluster(tree, t=k, criterion="maxclust") - 1
    found = len(np.unique(labels))
    if found != k:
        raise TrainingError(
            f"the consensus tree splits into {found} clusters, not {k}: "
            "too few lesions, or lesions that are identical"
        )
    return labels, hierarchy.leaves_list(tree)


def numbered_subtypes(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by decreasing size (ties: smaller centroid first, feature by feature).

    Returns 0-based subtype numbers per lesion and the centroids in that order.
    """
    centroids = np.array([x[labels == c].mean(axis=0) for c in range(k)])
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], tuple(centroids[c])))
    renumber = np.empty(k, dtype=int)
    renumber[order] = np.arange(k)
    return renumber[labels], centroids[order]


def cluster_consensus(matrix: np.ndarray, subtypes: np.ndarray, k: int) -> list[float]:
    """Mean consensus of the pairs within each subtype (Monti et al.'s cluster consensus)."""
    values = []
    for s in range(k):
        members = np.flatnonzero(subtypes == s)
        if len(members) < 2:
            values.append(math.nan)
            continue
        block = matrix[np.ix_(members, members)]
        values.append(float(block[np.triu_indices(len(members), 1)].mean()))
    return values


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class SubtypeTrainingSummary:
    """What :func:`train_subtypes` did; ``str()`` gives a short report."""

    out_dir: Path
    seconds: float
    k: int
    n_lesions: int
    n_features: int
    pac: dict[int, float]
    sizes: list[int]
    agreement: float  # share of training lesions whose nearest centroid is their subtype

    @property
    def lowest_pac_k(self) -> int:
        return min(self.pac, key=lambda k: (self.pac[k], k))

    def __str__(self) -> str:
        pac = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(self.pac.items()))
        return "\n".join(
            [
                (
                    f"wrote {self.out_dir} in {self.seconds:.0f} s: {self.k} subtypes of "
                    f"{self.n_lesions} lesions, {self.n_features} features (sizes {self.sizes})"
                ),
                f"PAC (lower is more stable): {pac}; lowest at k={self.lowest_pac_k}",
                (
                    "nearest-centroid assignment agrees with the consensus subtypes for "
                    f"{self.agreement:.1%} of the training lesions. Research use only."
                ),
            ]
        )


def train_subtypes(
    features_csv: Path,
    out_dir: Path,
    *,
    k: int = 4,
    k_range: tuple[int, int] = DEFAULT_K_RANGE,
    seed: int = 0,
    resamples: int = 100,
    subsample: float = DEFAULT_SUBSAMPLE,
    features: Sequence[str] | None = None,
    template: Path | None = None,
    command: str | None = None,
    name: str = MODEL_NAME,
    progress: bool = True,
) -> SubtypeTrainingSummary:
    """Consensus clustering of a cohort's lesions into ``k`` subtypes, and the model folder.

    Parameters
    ----------
    features_csv:
        Features CSV (``dicomnode features``): ``case_id``, lesion columns, features.
    out_dir:
        Folder to (re)write (see the module docstring for its files).
    k:
        Number of subtypes of the model (the paper's: 4).
    k_range:
        Smallest and largest k whose consensus (CDF, PAC) is reported.
    seed:
        Seeds every resample; equal seeds give equal files.
    resamples, subsample:
        Number of resamples per k and the share of lesions each one draws.
    features:
        Feature columns to use; default every ``wu_`` column.
    template:
        SR template whose ``[subtype].codes`` name the subtypes; default the node's.
    command:
        The command line that ran this, for ``RECIPE.md``.
    name:
        The model's name (it goes into every SR the node writes with it).
    progress:
        Show a progress bar.

    Raises
    ------
    TrainingError
        Unusable input or parameters; the message says which.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    table = read_feature_table(
        Path(features_csv), features, include=_is_regional, kind=f"{REGIONAL_PREFIX} feature"
    )
    table = table.without_sparse_lesions(MAX_IMPUTED_FRACTION)
    ks = sorted(set(range(k_range[0], k_range[1] + 1)) | {k})
    _check_parameters(len(table.lesions), k, ks, resamples, subsample)
    template_path = Path(template) if template else _default_template()
    entries, scheme = subtype_entries(template_path, k)
    fitted = fit_subtypes(
        table,
        k,
        ks,
        entries,
        scheme,
        resamples=resamples,
        subsample=subsample,
        seed=seed,
        progress=progress,
    )
    parameters = {
        "k": k,
        "k_range": list(k_range),
        "seed": seed,
        "resamples": resamples,
        "subsample": subsample,
        "requested_features": None if features is None else list(features),
        "template": _shown(template_path),
        "command": command,
    }
    _write_model_folder(out_dir, table, fitted, entries, scheme, parameters, name)
    return SubtypeTrainingSummary(
        out_dir=out_dir,
        seconds=time.perf_counter() - started,
        k=k,
        n_lesions=len(table.lesions),
        n_features=len(fitted.standardisation.names),
        pac={kk: fitted.metrics["pac"][kk] for kk in range(k_range[0], k_range[1] + 1)},
        sizes=fitted.metrics["subtype_sizes"],
        agreement=fitted.metrics["nearest_centroid_agreement"],
    )


@dataclass(frozen=True)
class FittedSubtypes:
    """Everything :func:`fit_subtypes` found; subtypes are 0-based, numbered as in the model."""

    standardisation: Standardisation
    consensus: dict[int, Consensus]
    subtypes: np.ndarray  # consensus subtype of each training lesion
    nearest: np.ndarray  # subtype of each training lesion's nearest centroid
    centroids: np.ndarray  # standardised units, one row per subtype
    leaves: np.ndarray  # dendrogram order of the lesions (for the plot)
    metrics: dict[str, Any]


def fit_subtypes(
    table: FeatureTable,
    k: int,
    ks: Sequence[int],
    entries: list[dict[str, Any]],
    scheme: dict[str, str],
    *,
    resamples: int,
    subsample: float,
    seed: int,
    progress: bool,
) -> FittedSubtypes:
    """Standardise, run consensus clustering for every k of ``ks``, cut the chosen ``k``."""
    standardisation, imputed = fit_standardisation(table)
    x = standardisation.apply(imputed)
    with tqdm(total=len(ks) * resamples, desc="consensus clustering", disable=not progress) as bar:
        consensus = {
            kk: summarise_consensus(
                consensus_matrix(
                    x, kk, resamples=resamples, subsample=subsample, seed=seed, progress=bar
                ),
                kk,
            )
            for kk in ks
        }
    labels, leaves = consensus_partition(consensus[k].matrix, k)
    subtypes, centroids = numbered_subtypes(x, labels, k)
    model = SubtypeModel(
        features=standardisation.names,
        mean=standardisation.mean,
        scale=standardisation.scale,
        medians=standardisation.medians,
        centroids=centroids,
        subtypes=tuple(Subtype(e["index"], e["code_value"], e["meaning"]) for e in entries),
        coding_scheme=scheme["designator"],
        info=ModelInfo(MODEL_NAME, "", "nearest centroid", "subtype"),
    )
    nearest = model.assign(imputed)  # exactly what the node will do with a new lesion
    return FittedSubtypes(
        standardisation=standardisation,
        consensus=consensus,
        subtypes=subtypes,
        nearest=nearest,
        centroids=centroids,
        leaves=leaves,
        metrics=_metrics(x, consensus, subtypes, nearest, k),
    )


def _write_model_folder(
    out_dir: Path,
    table: FeatureTable,
    fitted: FittedSubtypes,
    entries: list[dict[str, Any]],
    scheme: dict[str, str],
    parameters: dict[str, Any],
    name: str,
) -> None:
    k = parameters["k"]
    out_dir.mkdir(parents=True, exist_ok=True)
    document = _model_document(table, fitted, entries, scheme, parameters, name)
    _write_json(out_dir / "model.json", document)
    SubtypeModel.load(out_dir)  # the node must be able to read what we wrote
    deltas = fitted.metrics["delta_area"]
    _write_json(out_dir / "consensus.json", _consensus_document(fitted.consensus, deltas, k))
    _write_assignments(out_dir / "assignments.csv", table, entries, fitted.subtypes, fitted.nearest)
    plot_consensus(
        out_dir / "consensus.png", fitted.consensus, k, fitted.subtypes, fitted.leaves, entries
    )
    plot_profiles(
        out_dir / "profiles.png",
        fitted.standardisation.names,
        fitted.centroids,
        entries,
        fitted.metrics["subtype_sizes"],
    )
    (out_dir / "MODEL_CARD.md").write_text(model_card(document), encoding="utf-8")
    (out_dir / "RECIPE.md").write_text(recipe(document, out_dir), encoding="utf-8")


def _check_parameters(n: int, k: int, ks: Sequence[int], resamples: int, subsample: float) -> None:
    if k < 2 or ks[0] < 2:
        raise TrainingError(f"k and k_range must be at least 2, got k={k}, k_range from {ks[0]}")
    if resamples < 2:
        raise TrainingError(f"resamples must be at least 2, got {resamples}")
    if not 0 < subsample <= 1:
        raise TrainingError(f"subsample must lie in (0, 1], got {subsample}")
    if round(subsample * n) <= ks[-1]:
        raise TrainingError(
            f"{n} lesions: a subsample of {round(subsample * n)} cannot hold {ks[-1]} clusters"
        )


def _default_template() -> Path:
    config = Config()
    return config.resolve(config.report.template_file)


def _shown(path: Path) -> str:
    """``path`` relative to the dicomnode home when it lies there: model files name no host."""
    try:
        return str(path.resolve().relative_to(home().resolve()))
    except ValueError:
        return str(path)


def subtype_entries(template: Path, k: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The first ``k`` subtype codes of an SR template, and their coding scheme.

    Raises
    ------
    TrainingError
        The template declares fewer than ``k`` codes (the node could not report the others).
    """
    sr = load_template(template)
    codes = sr.subtype_codes
    if len(codes) < k:
        raise TrainingError(
            f"k = {k} subtypes need {k} codes in [subtype].codes of {template}, which declares "
            f"{len(codes)}: declare {_code_span(len(codes) + 1, k)} there first"
        )
    entries = [
        {"index": i, "code_value": c.value, "meaning": c.meaning}
        for i, c in enumerate(codes[:k], start=1)
    ]
    designator = codes[0].scheme_designator
    name = next((s.name for s in sr.coding_schemes if s.designator == designator), "")
    return entries, {"designator": designator, "name": name}


def _code_span(first: int, last: int) -> str:
    return f"IS{first}" if first == last else f"IS{first}..IS{last}"


def _metrics(
    x: np.ndarray,
    consensus: Mapping[int, Consensus],
    subtypes: np.ndarray,
    nearest: np.ndarray,
    k: int,
) -> dict[str, Any]:
    return {
        "pac": {kk: c.pac for kk, c in consensus.items()},
        "cdf_area": {kk: c.area for kk, c in consensus.items()},
        "delta_area": delta_areas(list(consensus.values())),
        "subtype_sizes": np.bincount(subtypes, minlength=k).tolist(),
        "cluster_consensus": cluster_consensus(consensus[k].matrix, subtypes, k),
        "silhouette": float(silhouette_score(x, subtypes)),
        "nearest_centroid_agreement": float(np.mean(nearest == subtypes)),
    }


# ----------------------------------------------------------------------------- outputs
def _model_document(
    table: FeatureTable,
    fitted: FittedSubtypes,
    entries: list[dict[str, Any]],
    scheme: dict[str, str],
    parameters: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    digest = hashlib.sha256(table.path.read_bytes()).hexdigest()
    k = parameters["k"]
    standardisation, metrics = fitted.standardisation, fitted.metrics
    return {
        "schema": SUBTYPE_SCHEMA,
        "name": name,
        "version": f"{__version__}+k{k}.seed{parameters['seed']}.{digest[:8]}",
        "family": "nearest centroid",
        "status": "research use only: imaging subtypes from consensus clustering; "
        "no clinical meaning established",
        "coding_scheme": scheme,
        "features": list(standardisation.names),
        "impute_medians": standardisation.medians.tolist(),
        "mean": standardisation.mean.tolist(),
        "scale": standardisation.scale.tolist(),
        "centroids": fitted.centroids.tolist(),
        "subtypes": entries,
        "training": {
            "host": cpu_host(),
            "features_file": str(table.path),
            "features_sha256": digest,
            "lesions": len(table.lesions),
            "cases": table.n_cases,
            "candidate_features": len(table.names),
            "dropped_features": list(standardisation.dropped),
            "missing_values": int((~np.isfinite(table.values)).sum()),
            "left_out": list(table.left_out),
            "consensus_clustering": {
                "base_clusterer": f"k-means, best of {KMEANS_STARTS} k-means++ starts per "
                "resample (scikit-learn)",
                "resamples": parameters["resamples"],
                "subsample_lesions": parameters["subsample"],
                "subsample_features": 1.0,
                "final_partition": "average-linkage hierarchical clustering of 1 - consensus",
                "numbering": "by decreasing subtype size",
                "pac_interval": list(PAC_INTERVAL),
            },
            **parameters,
        },
        "metrics": {
            **{
                key: metrics[key]
                for key in (
                    "subtype_sizes",
                    "cluster_consensus",
                    "silhouette",
                    "nearest_centroid_agreement",
                )
            },
            "pac": {str(kk): v for kk, v in metrics["pac"].items()},
            "delta_area": {str(kk): v for kk, v in metrics["delta_area"].items()},
        },
        "versions": {
            "dicomnode": __version__,
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
    }


def _consensus_document(
    consensus: Mapping[int, Consensus], deltas: Mapping[int, float], k: int
) -> dict[str, Any]:
    return {
        "chosen_k": k,
        "pac_interval": list(PAC_INTERVAL),
        "cdf_grid": CDF_GRID.round(4).tolist(),
        "by_k": {
            str(kk): {
                "pac": c.pac,
                "cdf_area": c.area,
                "delta_area": deltas[kk],
                "cdf": c.cdf.tolist(),
            }
            for kk, c in sorted(consensus.items())
        },
    }


def _write_assignments(
    path: Path,
    table: FeatureTable,
    entries: list[dict[str, Any]],
    subtypes: np.ndarray,
    nearest: np.ndarray,
) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", *table.lesion_columns, "subtype", "nearest_centroid"])
        for lesion, s, n in zip(table.lesions, subtypes, nearest):
            writer.writerow([*lesion, entries[s]["code_value"], entries[n]["code_value"]])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_consensus(
    path: Path,
    consensus: Mapping[int, Consensus],
    k: int,
    subtypes: np.ndarray,
    leaves: np.ndarray,
    entries: list[dict[str, Any]],
) -> None:
    """The chosen k's consensus matrix ordered by subtype, and the consensus CDF of every k."""
    plt = _pyplot()
    # Lesions grouped by subtype, in dendrogram order within each subtype.
    order = leaves[np.argsort(subtypes[leaves], kind="stable")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    image = left.imshow(
        consensus[k].matrix[np.ix_(order, order)],
        cmap="Blues",
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    bounds = np.cumsum(np.bincount(subtypes, minlength=k))
    for edge in bounds[:-1] - 0.5:
        left.axhline(edge, color="k", lw=0.6)
        left.axvline(edge, color="k", lw=0.6)
    centres = bounds - np.bincount(subtypes, minlength=k) / 2 - 0.5
    left.set_xticks(centres, [e["code_value"] for e in entries], fontsize=8)
    left.set_yticks(centres, [e["code_value"] for e in entries], fontsize=8)
    left.set_title(f"consensus matrix, k = {k} ({len(subtypes)} lesions)", fontsize=9)
    figure.colorbar(image, ax=left, fraction=0.046, label="consensus")
    for kk, c in sorted(consensus.items()):
        right.step(
            CDF_GRID,
            c.cdf,
            where="post",
            lw=2 if kk == k else 1,
            label=f"k = {kk} (PAC {c.pac:.2f})",
        )
    for edge in PAC_INTERVAL:
        right.axvline(edge, color="grey", ls=":", lw=0.8)
    right.set(xlabel="consensus", ylabel="CDF", xlim=(0, 1), ylim=(0, 1.01))
    right.set_title("consensus CDF; PAC = CDF(0.9) - CDF(0.1)", fontsize=9)
    right.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


def plot_profiles(
    path: Path,
    names: Sequence[str],
    centroids: np.ndarray,
    entries: list[dict[str, Any]],
    sizes: Sequence[int],
) -> None:
    """Each subtype's centroid (standardised units) over every feature."""
    plt = _pyplot()
    limit = max(1.0, float(np.abs(centroids).max()))
    figure, axes = plt.subplots(
        figsize=(max(6.0, 0.16 * len(names) + 2.0), 1.2 + 0.45 * len(entries))
    )
    image = axes.imshow(centroids, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    axes.set_yticks(
        range(len(entries)),
        [f"{e['code_value']} (n={n})" for e, n in zip(entries, sizes)],
        fontsize=8,
    )
    axes.set_xticks(
        range(len(names)), [n.removeprefix(REGIONAL_PREFIX) for n in names], rotation=90, fontsize=6
    )
    axes.set_title("subtype profiles: centroid of each feature in standard deviations", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.03, label="standardised value")
    figure.tight_layout()
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)


# ----------------------------------------------------------------------------- documents
def _command_line_can_express(training: Mapping[str, Any]) -> bool:
    return (
        tuple(training["k_range"]) == DEFAULT_K_RANGE
        and training["subsample"] == DEFAULT_SUBSAMPLE
        and training["requested_features"] is None
        and training["template"] == _shown(_default_template())
    )


def _left_out(reasons: Sequence[str]) -> str:
    if not reasons:
        return "no lesion was left out."
    return (
        f"{len(reasons)} lesion(s) left out, more than {MAX_IMPUTED_FRACTION:.0%} of their "
        "features missing (listed in `model.json`)."
    )


def _defining_features(names: Sequence[str], centroid: Sequence[float], count: int = 3) -> str:
    ranked = sorted(range(len(names)), key=lambda j: -abs(centroid[j]))[:count]
    return ", ".join(f"`{names[j]}` {centroid[j]:+.2f}" for j in ranked)


def model_card(model: Mapping[str, Any]) -> str:
    """The model card of a trained subtype model, from its ``model.json`` document."""
    t, m = model["training"], model["metrics"]
    cc = t["consensus_clustering"]
    k = t["k"]
    lowest = min(m["pac"], key=lambda kk: (m["pac"][kk], int(kk)))
    pac_rows = "\n".join(
        f"| {kk}{' (model)' if int(kk) == k else ''} | {m['pac'][kk]:.3f} "
        f"| {m['delta_area'][kk]:+.3f} |"
        for kk in sorted(m["pac"], key=int)
    )
    subtype_rows = "\n".join(
        f"| `{s['code_value']}` | {s['meaning']} | {m['subtype_sizes'][i]} | "
        f"{m['cluster_consensus'][i]:.3f} | "
        f"{_defining_features(model['features'], model['centroids'][i])} |"
        for i, s in enumerate(model["subtypes"])
    )
    dropped = "; ".join(t["dropped_features"]) or "none"
    return f"""# Model card: {model["name"]}

Output: one of {k} imaging subtypes per lesion (codes `{"`, `".join(s["code_value"] for s in model["subtypes"])}` of the
private scheme `{model["coding_scheme"]["designator"]}`, as declared in the SR template). Intended use:
**research only**. The subtypes are clusters of this training cohort; no biological,
prognostic or predictive meaning has been established for them, and they must not inform care.

- Version `{model["version"]}`; family: nearest centroid. Files: `model.json` (what the node
  reads), `consensus.json` (CDF, PAC, delta area per k), `consensus.png`, `profiles.png`,
  `assignments.csv` (every training lesion's subtype), `RECIPE.md`.

## Data
{t["lesions"]} lesions of {t["cases"]} cases from `{t["features_file"]}` (sha256 `{t["features_sha256"][:16]}...`);
{t["missing_values"]} missing values (replaced by medians); {_left_out(t["left_out"])}
Features: {len(model["features"])} of {t["candidate_features"]} candidates (dropped: {dropped}).

## Features
Regional variation of Wu et al. 2021 (core, rim and peritumoral-ring histograms over
-1000..500 HU by default, compared by correlation, chi-square, intersection and Bhattacharyya,
rings of 5 and 10 mm by default: see the `wu_ring*` names in `model.json` and the `[regional]`
section of the configuration that measured them), after the paper's public code (GitHub
WuLabMDA/PanCancer; deviations listed in `dicomnode/analyse/regional.py`), and radius-normalised
shape descriptors. **The shape descriptors are OURS**: a radial spherical-harmonic expansion
that agrees only approximately with the paper's SPHARM-MAT parameterisation (see
`dicomnode/analyse/regional.py` for every deviation). Values of this model cannot be compared
with the paper's.

Where the node differs from the paper (seed 003 and its public code):
- **rings bounded by the body, not the lung** (**OURS**): the public code keeps the peritumoral
  ring inside a lung mask (plus the lesion); the node has no organ segmentation and keeps it
  inside the body (largest connected region above `[regional] body_threshold_hu`, holes
  filled), so a ring can take in mediastinum, chest wall, fat or bowel that the lung mask would
  exclude. `dicomnode features` bounds the rings by a cohort's `organ_mask` column when one is
  given, which the node cannot do: a model the node runs should be trained on body-bounded
  rings (no `organ_mask`);
- **CT only** (**OURS**): the paper's subtypes are shared by CT and MRI; the node accepts CT
  series only and these features use Hounsfield units, so this model must not be applied to MRI;
- **one lesion, not one patient, per row** (**OURS**): the paper counts patients (1,682); here
  every row of the features file is one lesion, so a case with several lesions is clustered,
  and counted, once per lesion.

## Method
The paper reports four imaging subtypes but publishes no clustering code. Choices:
- k = {k}: the paper's number of subtypes (**paper**), fixed, not chosen by PAC (**OURS**); the
  lowest PAC on this cohort was at k = {lowest};
- imputation by the training median, features constant over the cohort dropped (**OURS**);
- standardisation: z-score with the training mean and population standard deviation (**OURS**);
- consensus clustering after Monti et al. 2003 (**OURS**: the likely method, not confirmed):
  {cc["resamples"]} resamples of {cc["subsample_lesions"]:.0%} of the lesions (all features), base clusterer {cc["base_clusterer"]};
- final subtypes: {cc["final_partition"]} (**OURS**); {cc["numbering"]} (**OURS**);
- PAC: share of lesion pairs with consensus in ({cc["pac_interval"][0]}, {cc["pac_interval"][1]}) (Senbabaoglu et al. 2014);
  delta area as in ConsensusClusterPlus (**OURS**);
- every lesion is clustered on its own, also when a case has several (**OURS**);
- assignment of a new lesion: nearest centroid, Euclidean distance in standardised units
  (**OURS**); missing inputs are replaced by the training medians and the node makes no
  prediction when more than half are missing;
- names and codes: "Imaging subtype 1..{k}" from `[subtype].codes` of the SR template (**OURS**):
  a model with more subtypes needs more codes declared there first. Seed {t["seed"]}.

## Consensus by k
| k | PAC | delta area |
|---|---|---|
{pac_rows}

## Subtypes
| code | meaning | lesions | cluster consensus | most distinctive features (centroid, SD) |
|---|---|---|---|---|
{subtype_rows}

Silhouette (standardised features): {m["silhouette"]:.3f}. Nearest-centroid assignment
reproduces the consensus subtype of {m["nearest_centroid_agreement"]:.1%} of the training lesions.

## Limitations
Clusters describe one cohort and move with its scanners, protocols, contrast phases and
segmentations; they need external validation before any use beyond research.

Trained on {model["training"]["host"]}. Versions: {json.dumps(model["versions"])}
"""


def recipe(model: Mapping[str, Any], out_dir: Path) -> str:
    """How to rebuild the model folder: the command that made it (when known, or when the
    command line can say everything that was chosen) and the equivalent Python call."""
    t = model["training"]
    command = t["command"]
    if command is None and _command_line_can_express(t):
        command = (
            f"dicomnode train subtypes --features {t['features_file']} --out {out_dir} "
            f"--k {t['k']} --seed {t['seed']} --resamples {t['resamples']}"
        )
    shell = f"```\n{command}\n```\n\nor, from Python:\n\n" if command else ""
    chosen = (
        "" if t["requested_features"] is None else f"\n    features={t['requested_features']!r},"
    )
    return f"""# Recipe: {model["name"]}

{shell}```python
from pathlib import Path
from dicomnode.train.subtypes import train_subtypes
print(train_subtypes(
    Path("{t["features_file"]}"), Path("{out_dir}"), k={t["k"]}, k_range={tuple(t["k_range"])},
    seed={t["seed"]}, resamples={t["resamples"]}, subsample={t["subsample"]},{chosen}
    template=Path("{t["template"]}"),
))
```

Features file sha256 `{t["features_sha256"]}`. Deterministic for a seed.
Versions: {json.dumps(model["versions"])}
"""
