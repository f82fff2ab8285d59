"""Predictor on the shipped demonstration models, fed by the node's own measurer."""

from __future__ import annotations

import json
import logging
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from dicomnode.analyse.measure import Measurer
from dicomnode.analyse.predict import Predictor
from dicomnode.config import Config
from dicomnode.errors import ModelError
from dicomnode.train.shipped import HOLDOUT_SEED_OFFSET
from dicomnode.train.synthetic import SyntheticCase, make_synthetic_cohort
from dicomnode.types import LesionFeatures

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
#: Neither the training cohort (seed 0) nor its held-out cohort (seed 0 + offset).
TEST_SEED = 4242
TEST_CASES = 30


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    config = Config()
    return Predictor.from_config(config.prediction)


@pytest.fixture(scope="module")
def new_cases() -> list[SyntheticCase]:
    assert TEST_SEED not in (0, HOLDOUT_SEED_OFFSET)
    return make_synthetic_cohort(TEST_CASES, TEST_SEED)


@pytest.fixture(scope="module")
def new_features(new_cases: list[SyntheticCase]) -> list[LesionFeatures]:
    """Everything the node measures, on synthetic cases the models never saw (about 15 s)."""
    measurer = Measurer.from_config(Config())
    features = []
    for label, case in enumerate(new_cases, start=1):  # labelled 1..n, like a segmentation
        mask = case.mask * np.uint8(label)
        features.append(measurer.measure_arrays(case.hu, mask, case.spacing_zyx, label=label))
    return features


# ----------------------------------------------------------------------------- shipped models
def test_shipped_models_load_with_their_identity(predictor: Predictor) -> None:
    families = [m.family for m in predictor.models]
    assert families == ["XGBoost", "nearest centroid"]
    assert all(m.version and "demonstration" in m.name for m in predictor.models)
    manifest = json.loads((MODELS / "tmb" / "manifest.json").read_text())
    assert predictor.tmb.threshold == manifest["threshold"]
    for folder in ("tmb", "subtypes"):
        card = (MODELS / folder / "MODEL_CARD.md").read_text()
        assert "DEMONSTRATION" in card and "synthetic" in card


def test_model_inputs_are_what_the_node_measures(predictor: Predictor) -> None:
    measurer = Measurer.from_config(Config())
    assert set(predictor.tmb.features) <= set(measurer.radiomics.feature_names)
    assert set(predictor.subtypes.features) <= set(measurer.regional.feature_names)


def test_subtype_codes_are_declared_in_the_sr_template(predictor: Predictor) -> None:
    template = tomllib.loads((ROOT / "sr_templates" / "tid1500_tmb.toml").read_text())
    declared = {(c["value"], c["scheme"], c["meaning"]) for c in template["subtype"]["codes"]}
    scheme = predictor.subtypes.coding_scheme
    assert {(s.code_value, scheme, s.meaning) for s in predictor.subtypes.subtypes} == declared


def test_predictions_are_probabilities_and_declared_subtypes(
    predictor: Predictor, new_features: list[LesionFeatures]
) -> None:
    predictions = predictor.predict(new_features)
    assert [p.label for p in predictions] == [f.label for f in new_features]
    codes = {s.code_value: s for s in predictor.subtypes.subtypes}
    for p in predictions:
        assert 0.0 <= p.tmb_probability <= 1.0
        assert p.tmb_threshold == predictor.tmb.threshold
        assert p.tmb_high == (p.tmb_probability >= p.tmb_threshold)
        assert 1 <= p.subtype.index <= 4
        assert codes[p.subtype.code_value] == p.subtype


def test_held_out_cases_are_predicted_well_above_chance(
    predictor: Predictor, new_features: list[LesionFeatures], new_cases: list[SyntheticCase]
) -> None:
    predictions = predictor.predict(new_features)
    high = [case.tmb_high for case in new_cases]
    assert 5 <= sum(high) <= TEST_CASES - 5  # both classes present
    assert roc_auc_score(high, [p.tmb_probability for p in predictions]) >= 0.7
    subtypes = [p.subtype.index for p in predictions]
    assert adjusted_rand_score([c.phenotype for c in new_cases], subtypes) >= 0.8


def test_features_out_of_order_are_realigned_by_name(
    predictor: Predictor, new_features: list[LesionFeatures]
) -> None:
    lesion = new_features[0]
    shuffled_order = np.random.default_rng(0).permutation(len(lesion.names))
    shuffled = LesionFeatures(
        label=lesion.label,
        names=tuple(lesion.names[i] for i in shuffled_order),
        values=tuple(lesion.values[i] for i in shuffled_order),
    )
    assert predictor.predict([shuffled]) == predictor.predict([lesion])


def test_a_missing_feature_is_a_model_error_naming_it(
    predictor: Predictor, new_features: list[LesionFeatures]
) -> None:
    lesion = new_features[0]
    dropped = predictor.tmb.features[3]
    keep = [i for i, n in enumerate(lesion.names) if n != dropped]
    incomplete = LesionFeatures(
        label=7,
        names=tuple(lesion.names[i] for i in keep),
        values=tuple(lesion.values[i] for i in keep),
    )
    with pytest.raises(ModelError, match=f"lesion 7 lacks 1 input feature.*{dropped}"):
        predictor.predict([incomplete])


def test_missing_values_are_imputed_with_training_medians(
    predictor: Predictor, new_features: list[LesionFeatures]
) -> None:
    lesion = new_features[0]
    name = predictor.tmb.features[0]
    median = predictor.tmb.medians[0]
    values = lesion.as_dict()
    with_nan = LesionFeatures(lesion.label, lesion.names, tuple(
        float("nan") if n == name else values[n] for n in lesion.names))
    with_median = LesionFeatures(lesion.label, lesion.names, tuple(
        median if n == name else values[n] for n in lesion.names))
    assert predictor.predict([with_nan]) == predictor.predict([with_median])


def test_unmeasurable_lesion_gets_no_prediction(
    predictor: Predictor, new_features: list[LesionFeatures], caplog: pytest.LogCaptureFixture
) -> None:
    good = new_features[0]
    all_nan = (float("nan"),) * len(good.names)
    failed = LesionFeatures(9, good.names, all_nan, ("pyradiomics failed",))
    with caplog.at_level(logging.WARNING, logger="dicomnode.analyse.predict"):
        predictions = predictor.predict([good, failed])
    assert [p.label for p in predictions] == [good.label]
    assert "lesion 9" in caplog.text and "no prediction" in caplog.text
    assert predictor.predict([]) == ()


def test_broken_model_folders_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="manifest.json: model file not found"):
        Predictor.load(tmp_path / "tmb", MODELS / "subtypes")
    tmb = tmp_path / "tmb"
    shutil.copytree(MODELS / "tmb", tmb, ignore=shutil.ignore_patterns("*.csv", "*.png"))
    manifest = json.loads((tmb / "manifest.json").read_text())
    manifest["features"] = manifest["features"][:-1]
    manifest["impute_medians"] = manifest["impute_medians"][:-1]
    (tmb / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="the model takes"):
        Predictor.load(tmb, MODELS / "subtypes")
    subtypes = tmp_path / "subtypes"
    subtypes.mkdir()
    model = json.loads((MODELS / "subtypes" / "model.json").read_text())
    del model["centroids"]
    (subtypes / "model.json").write_text(json.dumps(model))
    with pytest.raises(ModelError, match="missing key 'centroids'"):
        Predictor.load(MODELS / "tmb", subtypes)


# ----------------------------------------------------------------------------- synthetic cohort
def test_synthetic_cases_are_deterministic_and_independent_of_cohort_size() -> None:
    small, large = make_synthetic_cohort(2, seed=5), make_synthetic_cohort(3, seed=5)
    for a, b in zip(small, large):
        assert a.case_id == b.case_id
        assert np.array_equal(a.hu, b.hu) and np.array_equal(a.mask, b.mask) and a.tmb == b.tmb
    case = large[2]
    assert case.hu.shape == case.mask.shape and case.mask.any()
    assert 1 <= case.phenotype <= 4 and case.tmb > 0
