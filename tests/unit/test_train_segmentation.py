"""Segmentation training: a tiny run writes a complete, loadable model folder and learns."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dicomnode.analyse.segment import Segmenter, sha256_of
from dicomnode.config import SegmentationConfig
from dicomnode.train.segmentation import (
    RESERVED_SEED_START,
    VALIDATION_SEED_START,
    Recipe,
    TrainingReport,
    train_segmentation,
)

CPU = SegmentationConfig(device="cpu")
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
    segmenter = Segmenter.load(run.out_dir, CPU)
    assert segmenter.info.family == "3D U-Net"
    assert segmenter.manifest.roi_size == TINY.patch_size


def test_same_seed_gives_the_same_weights(run: TrainingReport, tmp_path: Path) -> None:
    again = train_segmentation(tmp_path, seed=3, device="cpu", recipe=TINY, log=lambda _: None)
    assert sha256_of(again.out_dir / "weights.pt") == sha256_of(run.out_dir / "weights.pt")


def test_recipe_rejects_a_patch_the_network_cannot_halve() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        Recipe(patch_size=(20, 64, 64))


def write_cohort(folder: Path) -> Path:
    """Three phantom CTs as NRRD; the first has its two lesions on two rows of the CSV."""
    import SimpleITK as sitk

    from dicomnode.phantom import make_phantom_study

    def write(name: str, array: np.ndarray, spacing: tuple[float, float, float]) -> str:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(spacing)))
        sitk.WriteImage(image, str(folder / name))
        return name

    rows = ["case_id,image,mask,mask_label"]
    for seed in (101, 102, 103):
        p = make_phantom_study(seed, shape=GEOMETRY[0], spacing=GEOMETRY[1], n_lesions=2)
        labels, n = ndimage.label(p.lesion_mask)
        image = write(f"ct{seed}.nrrd", p.hu.astype(np.int16), p.spacing)
        mask = write(f"lesions{seed}.nrrd", labels.astype(np.uint8), p.spacing)
        wanted = range(1, n + 1) if seed == 101 else [""]
        rows += [f"case{seed},{image},{mask},{label}" for label in wanted]
    (folder / "cohort.csv").write_text("\n".join(rows) + "\n")
    return folder / "cohort.csv"


def test_a_cohort_alone_trains_a_model_and_validates_on_held_out_cases(tmp_path: Path) -> None:
    cohort = write_cohort(tmp_path)
    lines: list[str] = []
    recipe = replace(TINY, n_phantoms=0, n_validation=0)
    report = train_segmentation(tmp_path / "model", cohort=cohort, seed=1, device="cpu",
                                recipe=recipe, log=lines.append)
    assert any("2 training and 1 validation case(s)" in line for line in lines)
    assert any("cohort" in d and "['case103']" in d for d in report.data_used)
    assert not any("phantoms" in d for d in report.data_used)
    assert np.mean(report.losses[-6:]) < np.mean(report.losses[:6])
    assert 0.0 <= report.best_validation_dice <= 1.0
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["training"]["cohort"] == str(cohort)
    recipe_text = (tmp_path / "model" / "RECIPE.md").read_text()
    assert f"--cohort {cohort}" in recipe_text and "--phantoms" not in recipe_text
    Segmenter.load(tmp_path / "model", CPU)
