"""`dicomnode train tmb`: seed 001's chain in nested cross-validation, and proof of its honesty.

The honesty tests run the real chain on features measured by pyradiomics on synthetic
lesions whose label depends on one texture property (heterogeneity amplitude), padded with
hundreds of pure-noise features: selection that peeked at the test folds would find
"signal" in them and lift the shuffled-label AUC above chance.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dicomnode.analyse.predict import TmbModel
from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.cli import main
from dicomnode.errors import TrainingError
from dicomnode.train.tmb import (
    TmbProtocol,
    TrainingSet,
    filter_features,
    load_training_set,
    rfe_path,
    train_tmb,
    youden_threshold,
)

N_CASES = 150
N_NOISE_FEATURES = 300
#: Smaller forests than the shipped default keep the suite fast; the chain is the same.
FAST = TmbProtocol(rf_trees=50)
#: A texture-only protocol: the label lives in texture, so shape features are left out.
TEXTURE_PROTOCOL = """\
setting: {binWidth: 20, resegmentRange: [-150, 500], label: 1}
imageType: {Original: {}}
featureClass: {firstorder: [], glcm: [], glrlm: [], gldm: []}
"""


def texture_case(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """A 20 x 40 x 40 crop with a spherical lesion; label 1 iff its hidden driver is high.

    The lesion's heterogeneity follows the driver seen through noise, so the label is
    learnable but not perfectly (an ideal classifier reaches an AUC of about 0.9).
    """
    rng = np.random.default_rng([seed, index])
    driver = rng.standard_normal()
    amplitude = float(np.clip(15.0 + 8.0 * (driver + 0.5 * rng.standard_normal()), 3.0, 40.0))
    z, y, x = np.meshgrid(*(np.arange(n) - n / 2 for n in (20, 40, 40)), indexing="ij")
    radius = rng.uniform(6.0, 10.0)
    mask = ((2.0 * z) ** 2 + y**2 + x**2) <= radius**2  # 2 mm slices, 1 mm pixels
    hu = 60.0 + 10.0 * rng.standard_normal(mask.shape)
    hu[mask] = 45.0 + amplitude * rng.standard_normal(int(mask.sum()))
    return np.round(hu).astype(np.float32), mask.astype(np.uint8), int(driver > 0.3)


@pytest.fixture(scope="module")
def texture_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """features.csv (texture features + noise columns) and cohort.csv with the labels."""
    folder = tmp_path_factory.mktemp("texture-cohort")
    protocol = folder / "texture.yaml"
    protocol.write_text(TEXTURE_PROTOCOL)
    extractor = RadiomicsExtractor(protocol)
    noise = np.random.default_rng(7).standard_normal((N_CASES, N_NOISE_FEATURES))
    names = [*extractor.feature_names, *(f"noise_{j}" for j in range(N_NOISE_FEATURES))]
    features, cohort = [], []
    for i in range(N_CASES):
        hu, mask, label = texture_case(2024, i)
        measured = extractor.extract_arrays(hu, mask, (2.0, 1.0, 1.0))
        features.append([f"t{i}", *map(repr, measured.values), *map(repr, noise[i].tolist())])
        cohort.append([f"t{i}", label])
    _write_csv(folder / "features.csv", ["case_id", *names], features)
    _write_csv(folder / "cohort.csv", ["case_id", "label"], cohort)
    return folder / "features.csv", folder / "cohort.csv"


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def test_a_planted_texture_signal_is_found_in_nested_cross_validation(
    texture_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    features, cohort = texture_cohort
    data = load_training_set(features, cohort, label_column="label")
    assert len(data.names) > N_NOISE_FEATURES + 50
    summary = train_tmb(data, tmp_path / "model", protocol=FAST, seed=0, log=lambda _: None)
    assert summary.metrics["auc"] >= 0.8
    low, up = summary.metrics["auc_95ci"]
    assert low < summary.metrics["auc"] < up
    # The final model is what the node loads; it keeps mostly texture, little noise.
    model = TmbModel.load(tmp_path / "model")
    noise = [f for f in model.features if f.startswith("noise_")]
    print(f"final features: {len(model.features)}, of them noise: {len(noise)}")
    assert len(noise) < len(model.features) / 2
    assert model.threshold == summary.threshold
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert [f["size"] in FAST.rfe_sizes for f in manifest["training"]["outer_folds"]] == [True] * 5
    assert (tmp_path / "model" / "roc.png").stat().st_size > 10_000
    card = (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert "nested cross-validation" in card and "research" in card and "ours" in card


def test_shuffled_labels_give_chance_performance(
    texture_cohort: tuple[Path, Path], tmp_path: Path
) -> None:
    features, cohort = texture_cohort
    data = load_training_set(features, cohort, label_column="label").shuffled(seed=11)
    summary = train_tmb(data, tmp_path / "model", protocol=FAST, seed=0, log=lambda _: None)
    assert abs(summary.metrics["auc"] - 0.5) <= 0.12


# ----------------------------------------------------------------------------- small, fast
def numeric_set(n: int = 60, seed: int = 0) -> TrainingSet:
    """Two informative columns among twenty, grouped two lesions per case."""
    rng = np.random.default_rng(seed)
    high = np.tile([0, 0, 1, 1], n // 4)
    values = rng.standard_normal((n, 20))
    values[:, [3, 7]] += 1.5 * high[:, np.newaxis]
    groups = np.repeat([f"c{i}" for i in range(n // 2)], 2)
    keys = tuple((g, str(i)) for i, g in enumerate(groups))
    names = tuple(f"f{j}" for j in range(20))
    return TrainingSet(keys, names, values, high, groups, "test")


def test_training_is_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    tiny = TmbProtocol(rf_trees=10, rfe_sizes=(2, 4), bootstrap=200,
                       xgboost={**TmbProtocol().xgboost, "n_estimators": 50})
    outputs = []
    for run, workers in enumerate((1, 2)):
        train_tmb(numeric_set(), tmp_path / str(run), protocol=tiny, seed=3, workers=workers,
                  log=lambda _: None)
        outputs.append([(tmp_path / str(run) / f).read_bytes()
                        for f in ("model.json", "cv_predictions.csv", "manifest.json")])
    assert outputs[0] == outputs[1]


def test_filters_drop_redundant_and_uninformative_features() -> None:
    rng = np.random.default_rng(0)
    high = np.repeat([0, 1], 40)
    signal = high + 0.3 * rng.standard_normal(80)
    copy = 2 * signal + 0.01 * rng.standard_normal(80)
    constant = np.ones(80)
    values = np.column_stack([signal, copy, rng.standard_normal((80, 10)), constant])
    kept = filter_features(values, high, TmbProtocol(min_after_filter=1))
    assert 0 in kept and 1 not in kept and 12 not in kept
    assert len(kept) <= 3  # noise passes at p < 0.05 only by chance


def test_elimination_reaches_every_size_and_keeps_the_informative_columns() -> None:
    data = numeric_set(n=80)
    columns = np.arange(20)
    path = rfe_path(data.values, data.high, columns, TmbProtocol(rf_trees=50, rfe_sizes=(2, 8, 50)), 0)
    assert [len(path[s]) for s in (50, 8, 2)] == [20, 8, 2]
    assert set(path[2]) == {3, 7}
    assert set(path[2]) <= set(path[8]) <= set(path[50])


def test_youden_threshold_separates_a_perfect_score() -> None:
    high = np.array([0, 0, 0, 1, 1])
    assert youden_threshold(high, np.array([0.1, 0.2, 0.3, 0.7, 0.9])) == 0.7


def test_training_set_joins_on_case_and_applies_the_tmb_cutoff(tmp_path: Path) -> None:
    _write_csv(tmp_path / "f.csv", ["case_id", "a", "b", "wu_c"],
               [["p1", "1.0", "3", "5"], ["p2", "nan", "4", "6"], ["p3", "", "", ""],
                ["p4", "2.0", "1", "7"]])
    _write_csv(tmp_path / "c.csv", ["case_id", "image", "tmb"],
               [["p1", "x", "12.5"], ["p2", "x", "9.99"], ["p3", "x", "20"]])
    data = load_training_set(tmp_path / "f.csv", tmp_path / "c.csv")
    assert data.names == ("a", "b")  # wu_ features serve the subtype model, not TMB
    assert [k[0] for k in data.keys] == ["p1", "p2"] and data.high.tolist() == [1, 0]
    assert math.isnan(data.values[1, 0])
    assert data.dropped == ("p3: no feature could be computed", "p4: not in c.csv")


@pytest.mark.parametrize(
    ("cohort_rows", "message"),
    [
        ([["p1", "-3"]], r"line 2, column tmb: TMB must be a number >= 0"),
        ([["p1", "lots"]], r"line 2, column tmb: not a number"),
    ],
)
def test_bad_targets_name_the_line_and_column(
    tmp_path: Path, cohort_rows: list[list[str]], message: str
) -> None:
    _write_csv(tmp_path / "f.csv", ["case_id", "a"], [["p1", "1"]])
    _write_csv(tmp_path / "c.csv", ["case_id", "tmb"], cohort_rows)
    with pytest.raises(TrainingError, match=message):
        load_training_set(tmp_path / "f.csv", tmp_path / "c.csv")


#: A fast protocol for the small-cohort tests below (the chain is the same).
TINY = TmbProtocol(rf_trees=10, rfe_sizes=(2, 4), bootstrap=200,
                   xgboost={**TmbProtocol().xgboost, "n_estimators": 50})


def with_high(data: TrainingSet, high_lesions: list[int]) -> TrainingSet:
    """``data`` with exactly these lesions TMB-high."""
    high = np.zeros(len(data.high), dtype=int)
    high[high_lesions] = 1
    values = data.values.copy()
    values[:, [3, 7]] += 1.5 * high[:, np.newaxis]
    return TrainingSet(data.keys, data.names, values, high, data.groups, "test")


def test_below_one_lesion_per_outer_fold_is_refused_with_the_counts(tmp_path: Path) -> None:
    few = with_high(numeric_set(), [0, 2, 4, 6])  # 4 TMB-high lesions of 4 cases, 5 outer folds
    with pytest.raises(TrainingError, match=r"at least 5 lesions of each class \(one per outer "
                                            r"fold\); this cohort has 4 TMB-high and 56 TMB-low"):
        train_tmb(few, tmp_path, protocol=TINY, log=lambda _: None)
    assert not (tmp_path / "manifest.json").exists()
    # The floor follows the outer folds: with 4 of them, 4 TMB-high lesions are enough.
    train_tmb(few, tmp_path, protocol=replace(TINY, outer_folds=4), log=lambda _: None)
    assert (tmp_path / "manifest.json").exists()


def test_a_small_class_like_the_papers_trains_with_a_recorded_warning(tmp_path: Path) -> None:
    # 6 TMB-high lesions of 6 cases among 60 (the paper: 5 to 8 TMB-high patients of 24).
    small = with_high(numeric_set(), [0, 2, 4, 6, 8, 10])
    logged: list[str] = []
    summary = train_tmb(small, tmp_path, protocol=TINY, log=logged.append)
    warning = [line for line in logged if line.startswith("WARNING:")]
    assert len(warning) == 1
    assert "only 6 TMB-high lesions, fewer than the recommended 10" in warning[0]
    assert summary.warnings == (warning[0].removeprefix("WARNING: "),)
    assert str(summary).startswith(warning[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["training"]["warnings"] == list(summary.warnings)
    assert manifest["protocol"]["recommended_per_class"] == 10
    assert manifest["metrics"]["nested_cross_validated"]["n_high"] == 6
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"**Warning:** {summary.warnings[0]}" in card
    # The recommended size is a protocol value: at 6 the same cohort trains without warning.
    quiet = train_tmb(small, tmp_path / "quiet", protocol=replace(TINY, recommended_per_class=6),
                      log=logged.append)
    assert quiet.warnings == ()
    assert json.loads((tmp_path / "quiet" / "manifest.json").read_text())["training"][
        "warnings"] == []
    assert "**Warning:**" not in (tmp_path / "quiet" / "MODEL_CARD.md").read_text()


def test_a_class_held_by_too_few_cases_is_refused_clearly(tmp_path: Path) -> None:
    # 6 TMB-high lesions, above the floor, but all in one case: the outer fold that tests
    # that case has no TMB-high lesion left to train on.
    data = numeric_set()
    groups = data.groups.copy()
    groups[:6] = "c0"
    one_case = with_high(TrainingSet(data.keys, data.names, data.values, data.high, groups,
                                     "test"), list(range(6)))
    with pytest.raises(TrainingError, match="training part holds 0 TMB-high and .* needs both "
                                            "classes"):
        train_tmb(one_case, tmp_path, protocol=TINY, log=lambda _: None)


def test_cli_trains_from_csv_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = numeric_set()
    _write_csv(tmp_path / "features.csv", ["case_id", "roi", *data.names],
               [[g, k[1], *map(repr, row.tolist())] for g, k, row in zip(data.groups, data.keys, data.values)])
    _write_csv(tmp_path / "cohort.csv", ["case_id", "roi", "tmb"],
               [[g, k[1], 25.0 if h else 2.0] for g, k, h in zip(data.groups, data.keys, data.high)])
    code = main(["train", "tmb", "--features", str(tmp_path / "features.csv"),
                 "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "model"),
                 "--rf-trees", "10", "--rfe-sizes", "2", "4"])
    assert code == 0
    assert "nested cross-validated AUC" in capsys.readouterr().out
    recipe = (tmp_path / "model" / "RECIPE.md").read_text()
    assert "dicomnode train tmb --features" in recipe
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["positive_class"] == "tmb >= 10 mutations/Mb"
    assert manifest["training"]["warnings"] == []  # 30 lesions of each class
