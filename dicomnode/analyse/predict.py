"""Research predictions from radiomics features: TMB high/low (XGBoost) and imaging subtype.

Two models, each in its own folder with a ``MODEL_CARD.md``:

- ``models/tmb/``: ``model.json`` (XGBoost native JSON, binary:logistic) and
  ``manifest.json`` (the model's input feature names in order, the training medians used for
  imputation, the operating threshold, version, training seed, cohort, metrics);
- ``models/subtypes/``: ``model.json`` (input feature names, standardisation mean and scale,
  training medians, four centroids in standardised units, and per subtype its code in the
  private coding scheme). A lesion gets the subtype of the nearest centroid (Euclidean, in
  standardised units).

Incoming features are aligned by name, never by position: a missing input is a
:class:`~dicomnode.errors.ModelError` that names it. Non-finite values (features pyradiomics
could not compute) are replaced by the stored training medians. A lesion with more than
:data:`MAX_IMPUTED_FRACTION` of either model's inputs missing gets no prediction at all (a
prediction made mostly of training medians would describe the training cohort, not the
lesion); its :attr:`LesionFeatures.warnings` already say why.

PURE: reads its model files once, at load time; no disk writes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.config import PredictionConfig
from dicomnode.errors import ModelError
from dicomnode.types import LesionFeatures, ModelInfo, Prediction, Subtype

try:
    import xgboost
except ImportError:  # the package leaves the choice of build to the install (extras)
    raise ModelError(
        "XGBoost is not installed: pip install 'dicomnode[cpu]' "
        "(or 'dicomnode[gpu]' on a CUDA server)"
    ) from None

log = logging.getLogger(__name__)

#: Largest share of a model's inputs that may be imputed before a lesion is left unpredicted.
MAX_IMPUTED_FRACTION = 0.5

TMB_SCHEMA = "dicomnode.tmb/1"
SUBTYPE_SCHEMA = "dicomnode.subtypes/1"


def feature_matrix(
    features: Sequence[LesionFeatures], names: Sequence[str], *, model: str
) -> np.ndarray:
    """Rows of ``features`` restricted to ``names``, in that order (aligned by name).

    Raises
    ------
    ModelError
        A lesion lacks one of ``names``; the message names the missing features.
    """
    rows = []
    for lesion in features:
        values = lesion.as_dict()
        missing = [n for n in names if n not in values]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ModelError(
                f"{model} model: lesion {lesion.label} lacks {len(missing)} "
                f"input feature(s): {shown}"
            )
        rows.append([values[n] for n in names])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(names))


def impute(matrix: np.ndarray, medians: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace non-finite values by the column's training median.

    Returns
    -------
    The imputed matrix and, per row, the fraction of values that were imputed.
    """
    missing = ~np.isfinite(matrix)
    return np.where(missing, medians[np.newaxis, :], matrix), missing.mean(axis=1)


@dataclass(frozen=True)
class TmbModel:
    """XGBoost classifier of TMB-high (>= 10 mutations/Mb) and its operating threshold."""

    booster: xgboost.Booster
    features: tuple[str, ...]
    medians: np.ndarray
    threshold: float
    info: ModelInfo

    @classmethod
    def load(cls, folder: Path) -> TmbModel:
        where = folder / "manifest.json"
        manifest = _read_json(where)
        _check_schema(manifest, TMB_SCHEMA, where)
        features = tuple(_field(manifest, "features", where))
        medians = _vector(manifest, "impute_medians", len(features), where)
        threshold = float(_field(manifest, "threshold", where))
        if not 0.0 <= threshold <= 1.0:
            raise ModelError(f"{where}: threshold must lie in [0, 1], got {threshold}")
        model_file = folder / str(_field(manifest, "model_file", where))
        if not model_file.is_file():
            raise ModelError(f"{model_file}: TMB model file not found")
        booster = xgboost.Booster()
        try:
            booster.load_model(str(model_file))
        except xgboost.core.XGBoostError as exc:
            raise ModelError(f"{model_file}: not a readable XGBoost model: {exc}") from None
        if booster.num_features() != len(features):
            raise ModelError(
                f"{model_file}: the model takes {booster.num_features()} features but "
                f"{where} lists {len(features)}"
            )
        info = ModelInfo(
            name=str(_field(manifest, "name", where)),
            version=str(_field(manifest, "version", where)),
            family=str(_field(manifest, "family", where)),
            task="tmb",
        )
        return cls(
            booster=booster, features=features, medians=medians, threshold=threshold, info=info
        )

    def probabilities(self, matrix: np.ndarray) -> np.ndarray:
        """P(TMB-high) per row of an imputed matrix in :attr:`features` order."""
        return np.asarray(self.booster.inplace_predict(matrix), dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class SubtypeModel:
    """Nearest-centroid assignment to one of four imaging subtypes."""

    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    medians: np.ndarray
    centroids: np.ndarray  # (n_subtypes, n_features), standardised units
    subtypes: tuple[Subtype, ...]
    coding_scheme: str
    info: ModelInfo

    @classmethod
    def load(cls, folder: Path) -> SubtypeModel:
        where = folder / "model.json"
        model = _read_json(where)
        _check_schema(model, SUBTYPE_SCHEMA, where)
        features = tuple(_field(model, "features", where))
        n = len(features)
        scale = _vector(model, "scale", n, where)
        if not np.all(scale > 0):
            raise ModelError(f"{where}: every standardisation scale must be > 0")
        centroids = np.asarray(_field(model, "centroids", where), dtype=np.float64)
        subtypes = tuple(_subtype(entry, where) for entry in _field(model, "subtypes", where))
        if centroids.ndim != 2 or centroids.shape != (len(subtypes), n):
            raise ModelError(
                f"{where}: centroids must be {len(subtypes)} x {n} (one per subtype), "
                f"got {centroids.shape}"
            )
        if [s.index for s in subtypes] != list(range(1, len(subtypes) + 1)):
            raise ModelError(f"{where}: subtypes must be numbered 1..{len(subtypes)} in order")
        scheme = _field(model, "coding_scheme", where)
        info = ModelInfo(
            name=str(_field(model, "name", where)),
            version=str(_field(model, "version", where)),
            family=str(_field(model, "family", where)),
            task="subtype",
        )
        return cls(
            features=features,
            mean=_vector(model, "mean", n, where),
            scale=scale,
            medians=_vector(model, "impute_medians", n, where),
            centroids=centroids,
            subtypes=subtypes,
            coding_scheme=str(_field(scheme, "designator", where)),
            info=info,
        )

    def assign(self, matrix: np.ndarray) -> np.ndarray:
        """0-based index of the nearest centroid per row of an imputed matrix."""
        standardised = (matrix - self.mean) / self.scale
        offsets = standardised[:, np.newaxis, :] - self.centroids[np.newaxis]
        return np.argmin(np.linalg.norm(offsets, axis=2), axis=1)


class Predictor:
    """Both research models, loaded once; see the module docstring for the policies."""

    def __init__(self, tmb: TmbModel, subtypes: SubtypeModel) -> None:
        self.tmb = tmb
        self.subtypes = subtypes

    @classmethod
    def load(cls, tmb_dir: Path, subtype_dir: Path) -> Predictor:
        """Load ``tmb_dir`` (manifest.json + model.json) and ``subtype_dir`` (model.json).

        Raises
        ------
        ModelError
            A file is missing, unreadable or inconsistent; the message names it.
        """
        return cls(TmbModel.load(Path(tmb_dir)), SubtypeModel.load(Path(subtype_dir)))

    @classmethod
    def from_config(cls, cfg: PredictionConfig) -> Predictor:
        """The predictor described by the ``[prediction]`` section of a configuration (its
        paths resolved by :class:`~dicomnode.config.Config`)."""
        return cls.load(cfg.tmb_model_dir, cfg.subtype_model_dir)

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        return (self.tmb.info, self.subtypes.info)

    def predict(self, features: Sequence[LesionFeatures]) -> tuple[Prediction, ...]:
        """Predictions for the lesions that can be predicted, in input order.

        A lesion is left out (with a logged warning) when more than
        :data:`MAX_IMPUTED_FRACTION` of either model's inputs are not finite; match
        predictions to lesions by :attr:`Prediction.label`.
        """
        if not features:
            return ()
        tmb_x, tmb_missing = impute(
            feature_matrix(features, self.tmb.features, model="TMB"), self.tmb.medians
        )
        sub_x, sub_missing = impute(
            feature_matrix(features, self.subtypes.features, model="subtype"), self.subtypes.medians
        )
        probabilities = self.tmb.probabilities(tmb_x)
        nearest = self.subtypes.assign(sub_x)
        predictions = []
        for i, lesion in enumerate(features):
            worst = max(tmb_missing[i], sub_missing[i])
            if worst > MAX_IMPUTED_FRACTION:
                log.warning(
                    "lesion %d: %.0f%% of a model's inputs are missing; no prediction made",
                    lesion.label, 100 * worst,
                )
                continue
            if worst > 0:
                log.info("lesion %d: %.0f%% of a model's inputs imputed with training medians",
                         lesion.label, 100 * worst)
            predictions.append(
                Prediction(
                    label=lesion.label,
                    tmb_probability=float(probabilities[i]),
                    tmb_threshold=self.tmb.threshold,
                    subtype=self.subtypes.subtypes[int(nearest[i])],
                )
            )
        return tuple(predictions)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read model file: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def _check_schema(data: Mapping[str, Any], schema: str, where: Path) -> None:
    if data.get("schema") != schema:
        raise ModelError(f"{where}: schema must be {schema!r}, got {data.get('schema')!r}")


def _field(data: Mapping[str, Any], key: str, where: Path) -> Any:
    if not isinstance(data, Mapping) or key not in data:
        raise ModelError(f"{where}: missing key {key!r}")
    return data[key]


def _vector(data: Mapping[str, Any], key: str, length: int, where: Path) -> np.ndarray:
    vector = np.asarray(_field(data, key, where), dtype=np.float64)
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise ModelError(f"{where}: {key!r} must hold {length} finite numbers, one per feature")
    return vector


def _subtype(entry: Mapping[str, Any], where: Path) -> Subtype:
    index = _field(entry, "index", where)
    if not isinstance(index, int) or isinstance(index, bool):
        raise ModelError(f"{where}: subtype index must be an integer, got {index!r}")
    return Subtype(
        index=index,
        code_value=str(_field(entry, "code_value", where)),
        meaning=str(_field(entry, "meaning", where)),
    )
