"""`dicomnode train subtypes`: consensus clustering recovers planted groups, and the model
folder it writes is one the node can load and use."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from dicomnode.analyse.predict import SubtypeModel
from dicomnode.cli import build_parser
from dicomnode.errors import TrainingError
from dicomnode.train.subtypes import delta_areas, summarise_consensus, train_subtypes

GROUPS, PER_GROUP, N_FEATURES = 4, 30, 10
RESAMPLES = 20


def group_centres() -> np.ndarray:
    """Four equidistant centres (a simplex: no pair of groups is closer than another, so
    k = 2 or 3 must merge groups differently from one resample to the next)."""
    centres = np.zeros((GROUPS, N_FEATURES))
    centres[np.arange(GROUPS), np.arange(GROUPS)] = 8.0
    return centres


def draw(rng: np.random.Generator, per_group: int) -> tuple[np.ndarray, np.ndarray]:
    truth = np.repeat(np.arange(GROUPS), per_group)
    return group_centres()[truth] + rng.normal(size=(len(truth), N_FEATURES)), truth


def write_features(path: Path, values: np.ndarray) -> None:
    """A features CSV as `dicomnode features` writes it: identity columns, radiomics
    columns that the subtype model must ignore, ``wu_`` columns, a few missing cells."""
    rng = np.random.default_rng(7)
    names = [f"wu_feature{j:02d}" for j in range(N_FEATURES)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "mask_label", "original_firstorder_Mean", *names])
        for i, row in enumerate(values):
            cells = [repr(float(v)) for v in row]
            if i % 17 == 3:
                cells[GROUPS + i % (N_FEATURES - GROUPS)] = ""  # missing, in a noise column
            writer.writerow([f"case{i // 2:03d}", str(1 + i % 2), repr(rng.normal() * 1e4), *cells])
        # A lesion whose wu_ features could not be computed: left out, not imputed.
        writer.writerow(["case999", "1", "1.0", *[""] * N_FEATURES])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subtypes")
    values, truth = draw(np.random.default_rng(0), PER_GROUP)
    features = folder / "features.csv"
    write_features(features, values)
    summary = train_subtypes(features, folder / "model", resamples=RESAMPLES, progress=False)
    return features, folder / "model", summary, truth


def read_assignments(folder: Path) -> list[dict[str, str]]:
    with (folder / "assignments.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_four_planted_groups_are_recovered(planted):
    _, folder, summary, truth = planted
    subtypes = [row["subtype"] for row in read_assignments(folder)]
    assert adjusted_rand_score(truth, subtypes) == pytest.approx(1.0)
    assert summary.k == 4 and summary.sizes == [PER_GROUP] * GROUPS
    assert summary.n_features == N_FEATURES  # wu_ columns only; the radiomics column ignored
    assert summary.agreement == 1.0
    assert summary.n_lesions == GROUPS * PER_GROUP
    left_out = json.loads((folder / "model.json").read_text())["training"]["left_out"]
    assert left_out == ["case999/1: 100% of the features missing"]


def test_pac_is_lowest_at_the_planted_k(planted):
    _, folder, summary, _ = planted
    pac = summary.pac
    assert sorted(pac) == [2, 3, 4, 5, 6]
    assert pac[4] < 0.01
    assert all(pac[k] > pac[4] + 0.05 for k in (2, 3, 5, 6)), pac
    assert summary.lowest_pac_k == 4
    document = json.loads((folder / "consensus.json").read_text())
    assert document["chosen_k"] == 4
    assert {k: v["pac"] for k, v in document["by_k"].items()} == {str(k): v for k, v in pac.items()}
    cdf = np.array(document["by_k"]["4"]["cdf"])
    assert np.all(np.diff(cdf) >= 0) and cdf[-1] == 1.0


def test_centroids_are_the_subtypes_mean_standardised_features(planted):
    features, folder, _, _ = planted
    model = SubtypeModel.load(folder)
    with features.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    raw = np.array(
        [[float(row[f]) if row[f] else np.nan for f in model.features] for row in rows[:-1]]
    )
    assert np.isnan(raw).sum() == 7
    np.testing.assert_allclose(model.medians, np.nanmedian(raw, axis=0))
    standardised = (np.where(np.isnan(raw), model.medians, raw) - model.mean) / model.scale
    np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(standardised.std(axis=0), 1, rtol=1e-12)
    subtypes = [row["subtype"] for row in read_assignments(folder)]
    for index, subtype in enumerate(model.subtypes):
        members = [i for i, s in enumerate(subtypes) if s == subtype.code_value]
        np.testing.assert_allclose(model.centroids[index], standardised[members].mean(axis=0))


def test_the_model_loads_and_assigns_new_lesions_to_their_group(planted):
    _, folder, _, truth = planted
    model = SubtypeModel.load(folder)
    assert [s.code_value for s in model.subtypes] == ["IS1", "IS2", "IS3", "IS4"]
    assert model.coding_scheme == "99DICOMNODE"
    assert model.features == tuple(f"wu_feature{j:02d}" for j in range(N_FEATURES))
    assert model.info.family == "nearest centroid"
    training = [row["subtype"] for row in read_assignments(folder)]
    subtype_of_group = {g: training[int(np.flatnonzero(truth == g)[0])] for g in range(GROUPS)}
    assert len(set(subtype_of_group.values())) == GROUPS
    held_out, held_truth = draw(np.random.default_rng(99), 10)
    assigned = model.assign(held_out)
    codes = [model.subtypes[i].code_value for i in assigned]
    assert codes == [subtype_of_group[g] for g in held_truth]


def test_outputs_are_written_and_say_what_is_ours(planted):
    _, folder, _, _ = planted
    for name in (
        "model.json",
        "consensus.json",
        "consensus.png",
        "profiles.png",
        "assignments.csv",
        "MODEL_CARD.md",
        "RECIPE.md",
    ):
        assert (folder / name).stat().st_size > 0, name
    for image in ("consensus.png", "profiles.png"):
        assert (folder / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (folder / "MODEL_CARD.md").read_text()
    assert "research only" in card and card.count("**OURS**") >= 8
    assert "| 4 (model) |" in card
    recipe = (folder / "RECIPE.md").read_text()
    assert "dicomnode train subtypes --features" in recipe and "--k 4 --seed 0" in recipe


def test_training_is_deterministic_for_a_seed(planted, tmp_path):
    features, folder, _, _ = planted
    again = tmp_path / "again"
    train_subtypes(features, again, resamples=RESAMPLES, progress=False)
    for name in ("model.json", "consensus.json", "assignments.csv"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    other = tmp_path / "other"
    train_subtypes(features, other, resamples=RESAMPLES, seed=1, progress=False)
    assert (other / "consensus.json").read_bytes() != (folder / "consensus.json").read_bytes()


def test_consensus_summary_by_hand():
    # Three lesions: pairs (0,1) = 1.0, (0,2) = 0.5, (1,2) = 0.0.
    matrix = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
    summary = summarise_consensus(matrix, 2)
    assert summary.pac == pytest.approx(1 / 3)  # only 0.5 lies in (0.1, 0.9)
    # CDF steps: 1/3 at 0, 2/3 at 0.5, 1 at 1: area = 0.5 * 2/3 + 0.5 * 1
    assert summary.area == pytest.approx(0.5 * 2 / 3 + 0.5)
    assert summary.cdf[0] == pytest.approx(1 / 3) and summary.cdf[50] == pytest.approx(2 / 3)
    stable = summarise_consensus(np.eye(3), 3)  # every pair apart: CDF 1 from 0, area 0
    assert stable.pac == 0.0 and stable.area == 0.0
    higher = summarise_consensus(np.ones((3, 3)), 4)  # every pair together: one level, area 0
    deltas = delta_areas([summary, stable, higher])
    assert deltas == {2: pytest.approx(summary.area), 3: pytest.approx(-1.0), 4: deltas[4]}
    assert np.isnan(deltas[4])  # relative change from an area of 0 is undefined


def test_a_k_beyond_the_template_codes_is_refused(planted, tmp_path):
    features, _, _, _ = planted
    with pytest.raises(TrainingError, match="which declares 4: declare IS5 there first"):
        train_subtypes(features, tmp_path / "five", k=5, resamples=RESAMPLES, progress=False)


def test_bad_cells_and_missing_columns_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,wu_a,wu_b\nc1,1.0,2.0\nc2,abc,1.0\n")
    with pytest.raises(TrainingError, match="line 3, column wu_a: not a number"):
        train_subtypes(bad, tmp_path / "out", progress=False)
    none = tmp_path / "none.csv"
    none.write_text("case_id,original_shape_Sphericity\nc1,0.5\n")
    with pytest.raises(TrainingError, match="no wu_ feature column"):
        train_subtypes(none, tmp_path / "out", progress=False)


def test_command_line_parser():
    args = build_parser().parse_args(
        ["train", "subtypes", "--features", "f.csv", "--out", "models/subtypes-ours"]
    )
    assert (args.features, args.out, args.k, args.seed) == ("f.csv", "models/subtypes-ours", 4, 0)
    assert args.func.__name__ == "cmd_train_subtypes"
