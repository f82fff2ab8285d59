"""Segmentation training: a tiny run writes a complete, loadable model folder and learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomnode.analyse.segment import Segmenter, sha256_of
from dicomnode.train.segmentation import (
    RESERVED_SEED_START,
    VALIDATION_SEED_START,
    Recipe,
    TrainingReport,
    train_segmentation,
)

GEOMETRY = ((16, 64, 64), (2.5, 3.0, 3.0))
TINY = Recipe(
    epochs=3,
    iterations_per_epoch=12,
    batch_size=2,
    patch_size=(16, 32, 32),
    spacing_mm=GEOMETRY[1],
    channels=(4, 8, 16, 32, 64),
    learning_rate=1e-2,
    warmup_iterations=2,
    lesion_patch_fraction=1.0,
    n_phantoms=3,
    phantom_geometries=(GEOMETRY,),
    n_water=1,
    real_variants=0,
    n_validation=1,
    validation_geometry=GEOMETRY,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TrainingReport:
    lines: list[str] = []
    out = tmp_path_factory.mktemp("model")
    report = train_segmentation(out, data_root=None, seed=3, device="cpu", recipe=TINY,
                                log=lines.append)
    assert any(line.startswith("epoch 3/3") for line in lines)
    return report


def test_tiny_run_writes_every_file(run: TrainingReport) -> None:
    names = {p.name for p in run.out_dir.iterdir()}
    assert {"weights.pt", "manifest.json", "training_curve.png", "MODEL_CARD.md",
            "RECIPE.md"} <= names
    manifest = json.loads((run.out_dir / "manifest.json").read_text())
    assert manifest["weights"]["sha256"] == sha256_of(run.out_dir / "weights.pt")
    assert manifest["architecture"]["params"]["channels"] == list(TINY.channels)
    assert manifest["preprocessing"]["spacing_mm"] == list(TINY.spacing_mm)
    training = manifest["training"]
    assert training["torch"] == torch.__version__ and training["device"] == "cpu"
    assert training["validation_dice"] == pytest.approx(run.best_validation_dice, abs=1e-4)
    card = (run.out_dir / "MODEL_CARD.md").read_text()
    assert "Not for clinical use" in card and "synthetic" in card
    assert f">= {RESERVED_SEED_START}" in card
    assert "dicomnode train segmentation" in (run.out_dir / "RECIPE.md").read_text()


def test_tiny_run_loss_falls(run: TrainingReport) -> None:
    assert run.iterations == len(run.losses) == 36
    assert np.mean(run.losses[-6:]) < np.mean(run.losses[:6])
    assert len(run.validation_dice) == 3 and 0.0 <= run.best_validation_dice <= 1.0


def test_validation_seeds_are_held_out_and_not_reserved(run: TrainingReport) -> None:
    assert set(run.train_seeds).isdisjoint(run.validation_seeds)
    assert all(VALIDATION_SEED_START <= s < RESERVED_SEED_START for s in run.validation_seeds)
    assert max(run.train_seeds) < VALIDATION_SEED_START


def test_written_model_loads_in_the_segmenter(run: TrainingReport) -> None:
    segmenter = Segmenter.load(run.out_dir, device="cpu")
    assert segmenter.info.family == "3D U-Net"
    assert segmenter.manifest.roi_size == TINY.patch_size


def test_same_seed_gives_the_same_weights(run: TrainingReport, tmp_path: Path) -> None:
    again = train_segmentation(tmp_path, seed=3, device="cpu", recipe=TINY, log=lambda _: None)
    assert sha256_of(again.out_dir / "weights.pt") == sha256_of(run.out_dir / "weights.pt")


def test_recipe_rejects_a_patch_the_network_cannot_halve() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        Recipe(patch_size=(20, 64, 64))
