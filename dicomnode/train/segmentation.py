"""Train the lesion-segmentation 3D U-Net that :mod:`dicomnode.analyse.segment` runs.

``dicomnode train segmentation --cohort C.csv --out DIR [--data-root ../shared/data]
[--phantoms N] [--epochs N] [--seed S]`` runs :func:`train_segmentation`, which

1. loads a cohort of CT with the tumours drawn (a cohort CSV, see ``docs/cohorts.md``: DICOM,
   NIfTI/NRRD or DICOMweb images; SEG, RTSTRUCT or NIfTI/NRRD masks) and splits it by patient
   (:func:`split_by_patient`: every :attr:`Recipe.cohort_validation_every`-th case validates);
2. optionally adds synthetic phantoms (:func:`dicomnode.phantom.make_phantom_study`, seeds
   ``0 .. n_phantoms - 1``), lesion-free water volumes, and synthetic lesions inserted into the
   real CT of ``data_root`` (``real_variants``);
3. brings every volume onto the training grid with the very preprocessing the node uses
   (:class:`dicomnode.analyse.segment.Preprocessing`);
4. trains a MONAI ``UNet`` on patches (part of them centred near a lesion), with random flips
   and intensity jitter, Dice + cross-entropy loss (``monai.losses.DiceCELoss``), AdamW, a
   cosine learning-rate schedule and an exponential moving average of the weights;
5. after each epoch, segments the validation patients (and held-out phantoms, when phantoms
   are used) with :class:`~dicomnode.analyse.segment.Segmenter` exactly as the node would;
6. ships the last averaged weights (``select_best_epoch`` picks by validation instead), then
   scores each validation patient (:func:`evaluate_case`: Dice, tumour found, false lesions),
   studies ``min_confidence`` on the training patients, and counts the lesions reported on
   the whole chest and abdomen CTs of ``data_root`` (out of domain);
7. writes ``weights.pt``, ``manifest.json``, ``training_curve.png``, ``MODEL_CARD.md`` and
   ``RECIPE.md`` into ``out_dir``.

The :class:`Recipe` defaults train the shipped model on the sarcoma cohort of
``../shared/data/sts_cohort``. Seeds 10000 and above are reserved for tests and the demo and
are never used here. Deterministic for a given seed, device and thread count.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from dicomnode import __version__
from dicomnode.analyse.segment import (
    PAD_VALUE,
    Preprocessing,
    SegmentationManifest,
    Segmenter,
    pick_device,
    resize,
    sha256_of,
)
from dicomnode.config import SegmentationConfig
from dicomnode.errors import TrainingError
from dicomnode.phantom import insert_lesions, make_phantom_study, soft_tissue_region
from dicomnode.train import jsonable
from dicomnode.types import Geometry, SeriesKey, Volume

#: Phantom seeds at or above this are held out for validation, never trained on.
VALIDATION_SEED_START = 9_000
#: Seeds at or above this are reserved for tests and the demo.
RESERVED_SEED_START = 10_000
#: Real CT (relative to ``data_root``) into which lesions are inserted, and the mask of the
#: real tumour each already holds (excluded from the loss), or ``None``.
REAL_CT: tuple[tuple[str, str, str | None], ...] = (
    ("lung1", "pyradiomics/lung1_image.nrrd", "pyradiomics/lung1_label.nrrd"),
    ("lung2", "pyradiomics/lung2_image.nrrd", "pyradiomics/lung2_label.nrrd"),
    ("ibsi_sts_001", "ibsi_sts_001/nifti/CT_image.nii.gz", "ibsi_sts_001/nifti/CT_mask.nii.gz"),
    ("totalsegmentator", "totalsegmentator/tests/reference_files/example_ct_dicom", None),
)
#: Geometries the training phantoms cycle through: ``((z, y, x) shape, (z, y, x) spacing)``.
PHANTOM_GEOMETRIES: tuple[tuple[tuple[int, int, int], tuple[float, float, float]], ...] = (
    ((48, 128, 128), (2.5, 1.5, 1.5)),
    ((24, 144, 144), (5.0, 1.3, 1.3)),
    ((60, 112, 112), (2.0, 1.7, 1.7)),
)
MODEL_NAME = "dicomnode-lesion-unet"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """Every setting of a training run; the defaults train the shipped model.

    ``epochs x iterations_per_epoch`` optimiser steps of ``batch_size`` patches each.
    """

    epochs: int = 60
    iterations_per_epoch: int = 250
    batch_size: int = 4
    #: 96 x 192 x 192 mm at the training spacing: most of a limb in one window, so that the
    #: network sees the tumour with the muscle, fat and bone around it.
    patch_size: tuple[int, int, int] = (32, 96, 96)
    spacing_mm: tuple[float, float, float] = (3.0, 2.0, 2.0)
    hu_window: tuple[float, float] = (-200.0, 300.0)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    #: 0: the output comes straight from a transposed convolution. With residual units MONAI's
    #: UNet ends in a one-channel instance normalisation, which forces every patch's logits
    #: to zero mean and unit variance and keeps the model from learning "no lesion here".
    num_res_units: int = 0
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_iterations: int = 100
    #: Initial bias of the output layer: the logit of the expected lesion fraction, so that
    #: training starts from "mostly background" instead of spending its first thousand
    #: steps getting there (Lin et al., focal loss, 2017).
    output_bias: float = -3.0
    #: Decay of the exponential moving average of the weights that is validated and shipped
    #: (smoother than the last iterate; no batch-norm statistics to track in this network).
    ema_decay: float = 0.998
    lesion_patch_fraction: float = 0.5
    #: Share of patches drawn from real CT with inserted lesions (when ``real_variants`` and
    #: ``data_root`` are given) and from the lesion-free water volumes; the rest come from
    #: phantoms.
    real_fraction: float = 0.3
    water_fraction: float = 0.05
    #: Share of patches drawn from a hospital's cohort (when one is given).
    cohort_fraction: float = 0.75
    #: Every n-th case of the cohort (in CSV order) validates instead of training: a fixed
    #: split by patient (35 sarcoma patients: 28 train, 7 validate).
    cohort_validation_every: int = 5
    n_phantoms: int = 0
    phantom_geometries: tuple[tuple[tuple[int, int, int], tuple[float, float, float]], ...] = (
        PHANTOM_GEOMETRIES
    )
    n_water: int = 2
    #: Copies of each :data:`REAL_CT` volume with synthetic lesions inserted (0: none; the
    #: volumes are then only the out-of-domain check).
    real_variants: int = 0
    #: Held-out phantoms validated after each epoch (only when phantoms are trained on).
    n_validation: int = 6
    validation_geometry: tuple[tuple[int, int, int], tuple[float, float, float]] = (
        PHANTOM_GEOMETRIES[0]
    )
    #: True: ship the epoch with the best validation Dice. False: ship the last (averaged)
    #: weights, so that the validation figures were not used to pick the model.
    select_best_epoch: bool = False
    threads: int = 2
    version: str = "2.0.0"

    def __post_init__(self) -> None:
        if self.n_phantoms > VALIDATION_SEED_START:
            raise ValueError(f"n_phantoms must be <= {VALIDATION_SEED_START} (seed ranges)")
        if self.n_validation > RESERVED_SEED_START - VALIDATION_SEED_START:
            raise ValueError("too many validation phantoms for the validation seed range")
        factor = 2 ** len(self.strides)
        if any(p % factor for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of {factor}")


@dataclass(frozen=True)
class TrainingReport:
    """What a training run did and produced."""

    out_dir: Path
    best_validation_dice: float
    best_epoch: int
    epochs: int
    iterations: int
    seconds: float
    device: str
    weights_bytes: int
    train_seeds: tuple[int, ...]
    validation_seeds: tuple[int, ...]
    data_used: tuple[str, ...]
    losses: tuple[float, ...] = field(repr=False)
    epoch_losses: tuple[float, ...] = field(repr=False)
    validation_dice: tuple[float, ...] = field(repr=False)
    #: (training, validation) patient ids of the cohort.
    split: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    #: :func:`evaluate_case` for each validation patient, with the shipped weights.
    per_patient: tuple[dict[str, Any], ...] = field(repr=False, default=())
    #: :func:`confidence_study` on the training patients.
    confidence_study: tuple[dict[str, Any], ...] = field(repr=False, default=())
    out_of_domain: tuple[dict[str, Any], ...] = field(repr=False, default=())
    settings: SegmentationConfig = SegmentationConfig()

    def __str__(self) -> str:
        patients = ""
        if self.per_patient:
            summary = summarise(self.per_patient)
            patients = (f"; validation patients: median Dice {summary['median_dice']:.3f}, "
                        f"tumour found in {summary['found']} of {summary['patients']}, "
                        f"{summary['false_lesions_per_patient']:.2f} false lesions per patient")
        return (
            f"segmentation model written to {self.out_dir}: validation Dice "
            f"{self.best_validation_dice:.3f} (epoch {self.best_epoch} of {self.epochs}){patients}, "
            f"{self.iterations} iterations in {self.seconds / 60:.1f} min on {self.device}, "
            f"weights {self.weights_bytes / 1e6:.1f} MB"
        )


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One training volume on the training grid."""

    name: str
    group: str  # "phantom", "real" or "water": patches are drawn per group
    image: NDArray[np.float32]  # normalised HU
    label: NDArray[np.bool_]
    ignore: NDArray[np.bool_] | None
    lesion_voxels: NDArray[np.int64]  # (n, 3) indices of lesion voxels


def _item(name: str, group: str, hu: NDArray[np.floating], mask: NDArray[np.bool_],
          spacing: tuple[float, float, float], prep: Preprocessing,
          ignore: NDArray[np.bool_] | None = None) -> _Item:
    """Bring one volume and its masks onto the training grid exactly as inference would."""
    image = prep.to_training_grid(prep.normalise(hu), spacing)
    shape = image.shape

    def on_grid(m: NDArray[np.bool_]) -> NDArray[np.bool_]:
        return resize(m.astype(np.float32), shape) >= 0.5

    label = on_grid(mask)
    return _Item(name, group, image, label, None if ignore is None else on_grid(ignore),
                 np.argwhere(label))


def _phantom_items(seeds: Sequence[int], recipe: Recipe, prep: Preprocessing, log: Log) -> list[_Item]:
    items = []
    for seed in seeds:
        shape, spacing = recipe.phantom_geometries[seed % len(recipe.phantom_geometries)]
        phantom = make_phantom_study(seed, shape=shape, spacing=spacing, n_lesions=1 + seed % 4)
        items.append(_item(f"phantom {seed}", "phantom", phantom.hu, phantom.lesion_mask, spacing, prep))
    log(f"  {len(items)} phantoms (seeds {seeds[0]}..{seeds[-1]})" if items else "  no phantom")
    return items


def _water_items(n: int, rng: np.random.Generator, prep: Preprocessing) -> list[_Item]:
    """Lesion-free negatives: uniform water, and a water cylinder in air, with noise."""
    items = []
    shape, spacing = (40, 96, 96), prep.spacing_mm
    for k in range(n):
        hu = np.zeros(shape, dtype=np.float32)
        if k % 2:
            y, x = np.ogrid[-1:1:shape[1] * 1j, -1:1:shape[2] * 1j]
            hu[:, (y**2 + x**2) > 0.8] = -1000.0
        hu += rng.normal(0, rng.uniform(0, 20), size=shape).astype(np.float32)
        items.append(_item(f"water {k}", "water", hu, np.zeros(shape, bool), spacing, prep))
    return items


@dataclass(frozen=True)
class TrainingCase:
    """One patient's CT with every drawn lesion as foreground, on the CT's own grid."""

    case_id: str
    hu: NDArray[np.float32]
    mask: NDArray[np.bool_]
    spacing: tuple[float, float, float]

    def volume(self) -> Volume:
        return _volume(self.hu, self.spacing, self.case_id)


def load_cohort_cases(cohort: Path, dicomweb: Any = None, log: Log = print) -> list[TrainingCase]:
    """The cases of a cohort CSV in CSV order; the lesion rows of one case are merged.

    A case with several lesion rows is one image whose lesions are all foreground: training
    on one of them while the others count as background would teach the network to miss them.
    """
    from dicomnode.cohort import load_case, read_cohort

    cases: dict[str, TrainingCase] = {}
    for row in read_cohort(cohort):
        case = load_case(row, base_dir=cohort.parent, dicomweb=dicomweb)
        if row.case_id in cases:
            known = cases[row.case_id]
            cases[row.case_id] = replace(known, mask=known.mask | case.mask)
        else:
            cases[row.case_id] = TrainingCase(row.case_id, case.hu.astype(np.float32),
                                              case.mask, case.spacing_zyx)
    log(f"  cohort {cohort}: {len(cases)} case(s)")
    return list(cases.values())


def split_by_patient(case_ids: Sequence[str], every: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training, validation) case ids: every ``every``-th case in CSV order validates.

    A fixed rule, not a random draw, so that the split can be read off the CSV and is the
    same on every machine; with a single case there is nothing to hold out.
    """
    held = [c for i, c in enumerate(case_ids) if len(case_ids) > 1 and i % every == every - 1]
    if len(case_ids) > 1 and not held:
        held = [case_ids[-1]]
    return tuple(c for c in case_ids if c not in held), tuple(held)


def _read_real_ct(path: Path) -> tuple[NDArray[np.float32], tuple[float, float, float]]:
    """A real CT as ``(z, y, x)`` HU and spacing: a DICOM folder (via assemble) or an ITK image."""
    if path.is_dir():
        import pydicom

        from dicomnode.assemble import assemble

        datasets = [pydicom.dcmread(p) for p in sorted(path.iterdir()) if p.is_file()]
        volume = assemble(restore_blank_uids(datasets, str(path.name)))
        return volume.hu, volume.geometry.spacing
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image).astype(np.float32), spacing  # type: ignore[return-value]


def restore_blank_uids(datasets: Sequence[Any], seed: str) -> list[Any]:
    """Fill blank SOP Class/Instance UIDs from the file meta and Study/Series UIDs from ``seed``.

    The TotalSegmentator example CT was anonymised with blank dataset UIDs, which assembly
    refuses (no report could reference such images). Here it is only a check volume that is
    never reported on; the pixel data stays untouched.
    """
    import pydicom

    study = pydicom.uid.generate_uid(entropy_srcs=[seed, "study"])
    series = pydicom.uid.generate_uid(entropy_srcs=[seed, "series"])
    for ds in datasets:
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or study
        ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or series
    return list(datasets)


def _read_mask(path: Path) -> NDArray[np.bool_]:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0


def _real_items(data_root: Path, recipe: Recipe, rng: np.random.Generator, prep: Preprocessing,
                log: Log) -> tuple[list[_Item], list[str]]:
    items, used = [], []
    for name, image_path, mask_path in REAL_CT:
        path = data_root / image_path
        if not path.exists():
            log(f"  skipped {name}: {path} not found")
            continue
        hu, spacing = _read_real_ct(path)
        tumour = np.zeros(hu.shape, dtype=bool)
        if mask_path is not None and (data_root / mask_path).exists():
            tumour = _read_mask(data_root / mask_path)
            # A margin around the real tumour: its border is neither lesion nor background.
            tumour = ndimage.binary_dilation(tumour, iterations=2)
        region = soft_tissue_region(hu, spacing) & ~ndimage.binary_dilation(tumour, iterations=8)
        for variant in range(recipe.real_variants):
            inserted, mask = insert_lesions(hu, spacing, rng, n_lesions=int(rng.integers(2, 5)),
                                            region_mask=region)
            items.append(_item(f"{name} #{variant}", "real", inserted, mask, spacing, prep,
                               ignore=tumour if tumour.any() else None))
        used.append(f"{name} ({image_path}, {hu.shape[0]}x{hu.shape[1]}x{hu.shape[2]}, "
                    f"{recipe.real_variants} lesion insertions)")
        log(f"  {name}: {recipe.real_variants} variants with inserted lesions")
    return items, used


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


def _crop(array: NDArray, start: NDArray[np.int64], size: tuple[int, int, int], fill: float) -> NDArray:
    """``array[start : start + size]`` with ``fill`` where the window leaves the array."""
    out = np.full(size, fill, dtype=array.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, array.shape)
    if np.any(hi <= lo):
        return out
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
    out[dst] = array[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))]
    return out


def _sample_patch(item: _Item, recipe: Recipe, rng: np.random.Generator) -> tuple[NDArray, ...]:
    """Image, label and ignore patches; near a lesion with ``lesion_patch_fraction``."""
    size = np.asarray(recipe.patch_size)
    shape = np.asarray(item.image.shape)
    if len(item.lesion_voxels) and rng.random() < recipe.lesion_patch_fraction:
        centre = item.lesion_voxels[rng.integers(len(item.lesion_voxels))]
        centre = centre + rng.integers(-size // 4, size // 4 + 1)
    else:
        # Anywhere, including the borders, so that padding is seen in training as at inference.
        centre = rng.integers(np.minimum(size // 4, shape // 2), np.maximum(shape - size // 4, shape // 2 + 1))
    start = centre - size // 2
    image = _crop(item.image, start, recipe.patch_size, PAD_VALUE)
    label = _crop(item.label, start, recipe.patch_size, False)
    ignore = (_crop(item.ignore, start, recipe.patch_size, False) if item.ignore is not None
              else np.zeros(recipe.patch_size, dtype=bool))
    for axis in range(3):
        if rng.random() < 0.5:
            image, label, ignore = (np.flip(a, axis) for a in (image, label, ignore))
    # Intensity jitter: calibration (+-25 HU), contrast (+-10 %) and extra noise (<= 10 HU).
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    image = image + rng.normal(0, rng.uniform(0, 0.04), size=image.shape)
    return image.astype(np.float32), label, ignore


def _batch(items: Sequence[_Item], recipe: Recipe, rng: np.random.Generator):
    """``batch_size`` patches: a group drawn by its share (:class:`Recipe`), then an item."""
    groups: dict[str, list[_Item]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    share = {"real": recipe.real_fraction, "water": recipe.water_fraction,
             "cohort": recipe.cohort_fraction}
    names = sorted(groups)
    phantom_share = max(0.0, 1.0 - sum(share[g] for g in names if g in share))
    weights = np.array([share.get(g, phantom_share) for g in names])
    patches = []
    for _ in range(recipe.batch_size):
        members = groups[names[rng.choice(len(names), p=weights / weights.sum())]]
        patches.append(_sample_patch(members[rng.integers(len(members))], recipe, rng))
    image, label, ignore = (torch.from_numpy(np.ascontiguousarray(np.stack(p)))[:, None]
                            for p in zip(*patches))
    return image, label.float(), ignore


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Dice coefficient of two masks; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _volume(hu: NDArray[np.float32], spacing: tuple[float, float, float], name: str) -> Volume:
    """A bare :class:`Volume` for arrays that never were DICOM (validation and checks)."""
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                        spacing)
    return Volume(hu=hu, geometry=geometry, key=SeriesKey(name, name), sources=(),
                  frame_of_reference_uid="")


def evaluate_case(segmenter: Segmenter, volume: Volume, truth: NDArray[np.bool_]) -> dict[str, Any]:
    """What the node reports on one annotated CT, scored against the drawn tumour(s).

    ``found``: at least one reported lesion overlaps the drawn tumour; ``false_lesions``:
    reported lesions that touch no drawn voxel; ``dice``: all reported lesions against all
    drawn voxels, on the CT's own grid (1.0 when both are empty).
    """
    result = segmenter.segment(volume)
    labels = result.labels
    hits = set(np.unique(labels[truth & (labels > 0)]).tolist())
    voxel_ml = volume.geometry.voxel_volume_mm3 / 1000.0
    return {
        "case": volume.key.study_uid,
        "dice": round(dice(labels > 0, truth), 3),
        "found": bool(hits) if truth.any() else None,
        "lesions": len(result.lesions),
        "false_lesions": sum(1 for lesion in result.lesions if lesion.label not in hits),
        "drawn_ml": round(float(truth.sum()) * voxel_ml, 1),
        "reported_ml": round(float((labels > 0).sum()) * voxel_ml, 1),
        "confidences": [lesion.confidence for lesion in result.lesions],
    }


def _mean_dice(segmenter: Segmenter, cases: Sequence[tuple[Volume, NDArray[np.bool_]]]) -> float:
    return float(np.mean([evaluate_case(segmenter, v, truth)["dice"] for v, truth in cases]))


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and mean Dice, tumours found, false lesions per patient."""
    dices = [r["dice"] for r in rows]
    return {
        "patients": len(rows),
        "median_dice": round(float(np.median(dices)), 3) if rows else None,
        "mean_dice": round(float(np.mean(dices)), 3) if rows else None,
        "found": sum(1 for r in rows if r["found"]),
        "false_lesions_per_patient": round(sum(r["false_lesions"] for r in rows) / max(1, len(rows)), 2),
    }


#: Whole CT volumes outside the model's domain (chest and abdomen, no sarcoma), relative to
#: ``data_root``: how many lesions the node reports there is the out-of-domain check.
OUT_OF_DOMAIN_CT: tuple[tuple[str, str, str | None], ...] = tuple(
    entry for entry in REAL_CT if entry[0] != "ibsi_sts_001"  # STS_001 of the cohort
)


def _out_of_domain_checks(segmenter: Segmenter, data_root: Path | None, log: Log
                          ) -> list[dict[str, Any]]:
    """Lesions the node reports on chest and abdomen CTs it was not trained for."""
    if data_root is None:
        return []
    checks = []
    for name, image_path, mask_path in OUT_OF_DOMAIN_CT:
        path = data_root / image_path
        if not path.exists():
            log(f"  out-of-domain check {name}: skipped, {path} not found")
            continue
        hu, spacing = _read_real_ct(path)
        tumour = (_read_mask(data_root / mask_path) if mask_path and (data_root / mask_path).exists()
                  else np.zeros(hu.shape, dtype=bool))
        labels = segmenter.segment(_volume(hu, spacing, name)).labels
        check = {
            "case": name,
            "slices": int(hu.shape[0]),
            "lesions": int(labels.max()),
            "on_its_tumour": len(np.unique(labels[tumour & (labels > 0)])),
            "tumour_drawn": bool(tumour.any()),
        }
        checks.append(check)
        log(f"  out-of-domain check {name}: {check}")
    return checks


def confidence_study(rows: Sequence[dict[str, Any]], thresholds: Sequence[float]
                     ) -> list[dict[str, Any]]:
    """For each ``min_confidence``: tumours still found and false lesions left on ``rows``.

    ``rows`` come from :func:`evaluate_case` with ``min_confidence`` 0 and each reported
    lesion's confidence and whether it hit the tumour (``hit_confidences``,
    ``false_confidences``), so that every threshold is scored from one inference.
    """
    study = []
    for threshold in thresholds:
        found = sum(1 for r in rows if any(c >= threshold for c in r["hit_confidences"]))
        false = sum(sum(1 for c in r["false_confidences"] if c >= threshold) for r in rows)
        study.append({"min_confidence": threshold, "found": found, "patients": len(rows),
                      "false_lesions_per_patient": round(false / max(1, len(rows)), 2)})
    return study


def _confidences_by_hit(segmenter: Segmenter, case: TrainingCase) -> dict[str, Any]:
    """Every lesion's confidence with no confidence filter, split by whether it hit the tumour."""
    open_segmenter = Segmenter(segmenter.network, segmenter.manifest,
                               replace(segmenter.settings, min_confidence=0.0, max_lesions=0))
    result = open_segmenter.segment(case.volume())
    hits = set(np.unique(result.labels[case.mask & (result.labels > 0)]).tolist())
    return {
        "case": case.case_id,
        "hit_confidences": [le.confidence for le in result.lesions if le.label in hits],
        "false_confidences": [le.confidence for le in result.lesions if le.label not in hits],
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _manifest_dict(recipe: Recipe, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "version": recipe.version,
        "family": "3D U-Net",
        "architecture": {
            "class": "UNet",
            "params": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 1,
                "channels": list(recipe.channels),
                "strides": list(recipe.strides),
                "num_res_units": recipe.num_res_units,
            },
        },
        "preprocessing": {"spacing_mm": list(recipe.spacing_mm), "hu_window": list(recipe.hu_window)},
        "inference": {"roi_size": list(recipe.patch_size), "output": "sigmoid lesion probability"},
        **extra,
    }


def train_segmentation(
    out_dir: Path,
    *,
    data_root: Path | None = None,
    cohort: Path | None = None,
    cohort_cases: Sequence[TrainingCase] | None = None,
    dicomweb: Any = None,
    epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    recipe: Recipe = Recipe(),
    settings: SegmentationConfig = SegmentationConfig(),
    log: Log = print,
) -> TrainingReport:
    """Train the lesion U-Net and write a complete model folder.

    Parameters
    ----------
    out_dir:
        Where ``weights.pt``, ``manifest.json``, ``training_curve.png``, ``MODEL_CARD.md`` and
        ``RECIPE.md`` go (created if needed; existing files are replaced).
    data_root:
        A folder laid out like ``../shared/data``: the whole chest and abdomen CTs there
        (:data:`OUT_OF_DOMAIN_CT`) are the out-of-domain check, and, with
        ``recipe.real_variants``, get synthetic lesions inserted for training.
    cohort:
        A cohort CSV of CT with lesion masks (``docs/cohorts.md``), split by patient
        (:func:`split_by_patient`); ``dicomweb`` is the
        :class:`~dicomnode.cohort.DicomwebSource` for its ``dicomweb:`` references.
    cohort_cases:
        The cohort already loaded (:func:`load_cohort_cases`), in CSV order; ``cohort`` is
        then only named in the provenance.
    epochs:
        Overrides ``recipe.epochs``.
    seed:
        Seeds weight initialisation, patch sampling, augmentation and lesion insertion into
        real CT. Phantom seeds are fixed: ``0 .. n_phantoms - 1`` for training and
        ``9000 ..`` for validation.
    device:
        ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    recipe:
        Every other setting (:class:`Recipe`); its defaults train the shipped model.
    settings:
        The node's ``[segmentation]`` post-processing used to validate (threshold,
        confidence, minimum volume, body mask), as the node will run the model.
    log:
        Receives one line per step and per epoch.
    """
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(out_dir, data_root=Path(data_root) if data_root else None,
                      cohort=Path(cohort) if cohort else None, cohort_cases=cohort_cases,
                      dicomweb=dicomweb, seed=seed, device=device, recipe=recipe,
                      settings=settings, log=log)
    finally:
        torch.set_num_threads(threads)


def _train(out_dir: Path, *, data_root: Path | None, cohort: Path | None,
           cohort_cases: Sequence[TrainingCase] | None, dicomweb: Any, seed: int, device: str,
           recipe: Recipe, settings: SegmentationConfig, log: Log) -> TrainingReport:
    from monai.losses import DiceCELoss

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    run_device = pick_device(device)
    settings = replace(settings, device=str(run_device))
    prep = Preprocessing(recipe.spacing_mm, recipe.hu_window)
    manifest = SegmentationManifest.from_dict(_manifest_dict(
        recipe, {"weights": {"file": "weights.pt"}}))

    log("preparing training data")
    train_seeds = tuple(range(recipe.n_phantoms))
    val_seeds = (tuple(range(VALIDATION_SEED_START, VALIDATION_SEED_START + recipe.n_validation))
                 if train_seeds else ())
    items = _phantom_items(train_seeds, recipe, prep, log)
    items += _water_items(recipe.n_water, rng, prep)
    data_used = [f"{recipe.n_water} lesion-free water volumes (uniform or cylinder, noise 0-20 HU)"]
    if train_seeds:
        data_used.insert(0, (
            f"{len(train_seeds)} synthetic phantoms (make_phantom_study seeds "
            f"{train_seeds[0]}-{train_seeds[-1]}, 1-4 lesions each, (shape, spacing) "
            f"cycling through {list(recipe.phantom_geometries)})"))
    split: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    train_cases: list[TrainingCase] = []
    val_cases: list[TrainingCase] = []
    if cohort is not None or cohort_cases is not None:
        cases = list(cohort_cases) if cohort_cases is not None else load_cohort_cases(
            Path(cohort), dicomweb, log)  # type: ignore[arg-type]
        split = split_by_patient([c.case_id for c in cases], recipe.cohort_validation_every)
        train_cases = [c for c in cases if c.case_id in split[0]]
        val_cases = [c for c in cases if c.case_id in split[1]]
        items += [_item(f"cohort {c.case_id}", "cohort", c.hu, c.mask, c.spacing, prep)
                  for c in train_cases]
        log(f"  cohort: {len(train_cases)} training and {len(val_cases)} validation case(s)")
        data_used.append(f"cohort {cohort}: {len(train_cases)} training patients, "
                         f"{len(val_cases)} validation patients ({list(split[1])})")
    if data_root is not None and recipe.real_variants:
        real, used = _real_items(data_root, recipe, rng, prep, log)
        items += real
        data_used += used
    val_shape, val_spacing = recipe.validation_geometry
    validation = []
    for s in val_seeds:
        p = make_phantom_study(s, shape=val_shape, spacing=val_spacing, n_lesions=1 + s % 4)
        validation.append((_volume(p.hu, p.spacing, f"validation {s}"), p.lesion_mask))
    validation += [(c.volume(), c.mask) for c in val_cases]
    if not validation:
        raise TrainingError("nothing to validate on: train on phantoms (n_phantoms > 0) or "
                            "on a cohort of at least two patients")
    log(f"  {len(items)} training volumes, {len(validation)} validation volumes "
        f"({time.perf_counter() - started:.0f} s)")

    network = manifest.build_network()
    _init_output_bias(network, recipe.output_bias)
    network = network.to(run_device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=recipe.learning_rate,
                                  weight_decay=recipe.weight_decay)
    total = recipe.epochs * recipe.iterations_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: _lr_factor(i, total, recipe))
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    losses: list[float] = []
    epoch_losses: list[float] = []
    val_dice: list[float] = []
    average = copy.deepcopy(network).eval()
    best = (-1.0, 0, copy.deepcopy(average.state_dict()))
    step = 0
    for epoch in range(1, recipe.epochs + 1):
        network.train()
        for _ in range(recipe.iterations_per_epoch):
            image, label, ignore = (t.to(run_device) for t in _batch(items, recipe, rng))
            logits = network(image)
            # Ignored voxels (real tumours we did not draw) are forced to a confident,
            # correct background: they then add nothing to either loss term.
            logits = torch.where(ignore, torch.full_like(logits, -20.0), logits)
            loss = loss_fn(logits, label)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            _update_average(average, network, min(recipe.ema_decay, (1 + step) / (10 + step)))
            losses.append(float(loss.detach()))
        epoch_losses.append(float(np.mean(losses[-recipe.iterations_per_epoch:])))
        val_dice.append(_mean_dice(Segmenter(average, manifest, settings), validation))
        if val_dice[-1] > best[0] or not recipe.select_best_epoch:
            best = (val_dice[-1], epoch, copy.deepcopy(average.state_dict()))
        log(f"epoch {epoch}/{recipe.epochs}: loss {epoch_losses[-1]:.4f}, validation Dice "
            f"{val_dice[-1]:.3f} (kept: epoch {best[1]}), {time.perf_counter() - started:.0f} s")
    train_seconds = time.perf_counter() - started

    network.load_state_dict(best[2])
    # The weights first: an evaluation that fails must not cost the training.
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()},
               out_dir / "weights.pt")
    per_patient, study, checks = evaluate_model(Segmenter(network, manifest, settings),
                                                train_cases, val_cases, data_root, log)
    report = TrainingReport(
        out_dir=out_dir, best_validation_dice=best[0], best_epoch=best[1],
        epochs=recipe.epochs, iterations=total, seconds=train_seconds, device=str(run_device),
        weights_bytes=0, train_seeds=train_seeds, validation_seeds=val_seeds,
        data_used=tuple(data_used), losses=tuple(losses), epoch_losses=tuple(epoch_losses),
        validation_dice=tuple(val_dice), split=split, per_patient=tuple(per_patient),
        confidence_study=tuple(study), out_of_domain=tuple(checks), settings=settings,
    )
    return _write_model(out_dir, network, recipe, report, seed, data_root, cohort)


def evaluate_model(
    segmenter: Segmenter, train_cases: Sequence[TrainingCase], val_cases: Sequence[TrainingCase],
    data_root: Path | None, log: Log = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The model card's figures: per validation patient (:func:`evaluate_case`), the
    ``min_confidence`` study on the training patients (:func:`confidence_study`) and the
    out-of-domain lesion counts."""
    log("per-patient evaluation")
    per_patient = [evaluate_case(segmenter, c.volume(), c.mask) for c in val_cases]
    for row in per_patient:
        log(f"  validation {row['case']}: {row}")
    study_rows = [_confidences_by_hit(segmenter, c) for c in train_cases]
    study = confidence_study(study_rows, CONFIDENCE_GRID) if study_rows else []
    for line in study:
        log(f"  training patients: {line}")
    return per_patient, study, _out_of_domain_checks(segmenter, data_root, log)


#: ``min_confidence`` values scored on the training patients (:func:`confidence_study`).
CONFIDENCE_GRID = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


@torch.no_grad()
def _update_average(average: torch.nn.Module, network: torch.nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * network``, parameter by parameter."""
    for mean, current in zip(average.parameters(), network.parameters()):
        mean.lerp_(current, 1.0 - decay)


def _init_output_bias(network: torch.nn.Module, value: float) -> None:
    """Set the bias of the network's last layer (the last bias parameter it registers)."""
    biases = [p for name, p in network.named_parameters() if name.endswith("bias")]
    with torch.no_grad():
        biases[-1].fill_(value)


def _lr_factor(iteration: int, total: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to 5 % of the base learning rate."""
    if iteration < recipe.warmup_iterations:
        return (iteration + 1) / recipe.warmup_iterations
    progress = (iteration - recipe.warmup_iterations) / max(1, total - recipe.warmup_iterations)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------


def _write_model(out_dir: Path, network: torch.nn.Module, recipe: Recipe, report: TrainingReport,
                 seed: int, data_root: Path | None, cohort: Path | None = None) -> TrainingReport:
    weights = out_dir / "weights.pt"
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, weights)
    report = replace(report, weights_bytes=weights.stat().st_size)
    training = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": report.device,
        "host": f"{platform.machine()}, {recipe.threads} CPU thread(s)",
        "seconds": round(report.seconds, 1),
        "torch": torch.__version__,
        "monai": _monai_version(),
        "dicomnode": __version__,
        "seed": seed,
        "recipe": jsonable(asdict(recipe)),
        "train_phantom_seeds": ([report.train_seeds[0], report.train_seeds[-1]]
                                if report.train_seeds else []),
        "validation_phantom_seeds": list(report.validation_seeds),
        "reserved_seeds": f">= {RESERVED_SEED_START} (tests and demo; never trained on)",
        "data": list(report.data_used),
        "data_root": str(data_root) if data_root else None,
        "cohort": str(cohort) if cohort else None,
        "best_epoch": report.best_epoch,
        "validation_dice": round(report.best_validation_dice, 4),
        "validation_dice_per_epoch": [round(d, 4) for d in report.validation_dice],
        "loss_per_epoch": [round(x, 4) for x in report.epoch_losses],
        "select_best_epoch": recipe.select_best_epoch,
        "split": {"train": list(report.split[0]), "validation": list(report.split[1])},
        "postprocessing": {k: v for k, v in asdict(report.settings).items()
                           if k not in ("model_dir", "device")},
        "validation_patients": list(report.per_patient),
        "validation_summary": summarise(report.per_patient) if report.per_patient else None,
        "confidence_study_training_patients": list(report.confidence_study),
        "out_of_domain": list(report.out_of_domain),
    }
    manifest = _manifest_dict(recipe, {
        "weights": {"file": weights.name, "sha256": sha256_of(weights),
                    "bytes": report.weights_bytes},
        "training": training,
    })
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _plot_curve(out_dir / "training_curve.png", report)
    (out_dir / "MODEL_CARD.md").write_text(_model_card(recipe, report, training), encoding="utf-8")
    (out_dir / "RECIPE.md").write_text(_recipe_text(recipe, seed, data_root, report, cohort),
                                       encoding="utf-8")
    return report


def _monai_version() -> str:
    import monai

    return monai.__version__


def _plot_curve(path: Path, report: TrainingReport) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(7, 4))
    per_epoch = len(report.losses) / max(1, report.epochs)
    loss_ax.plot(np.arange(1, len(report.losses) + 1) / per_epoch, report.losses, color="0.75",
                 lw=0.6, label="loss per iteration")
    loss_ax.plot(range(1, report.epochs + 1), report.epoch_losses, "o-", color="C0",
                 label="mean loss per epoch")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("Dice + cross-entropy loss")
    dice_ax = loss_ax.twinx()
    dice_ax.plot(range(1, report.epochs + 1), report.validation_dice, "s-", color="C3",
                 label="validation Dice (held-out cases)")
    dice_ax.set_ylabel("Dice")
    dice_ax.set_ylim(0, 1)
    handles = loss_ax.get_legend_handles_labels()[0] + dice_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles=handles, loc="center right", fontsize=8)
    loss_ax.set_title(f"{MODEL_NAME}: validation Dice {report.best_validation_dice:.3f} "
                      f"(shipped: epoch {report.best_epoch})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _command(seed: int, data_root: Path | None, recipe: Recipe, out_dir: Path,
             cohort: Path | None = None) -> str:
    parts = ["dicomnode train segmentation", f"--out {out_dir}"]
    if data_root is not None:
        parts.append(f"--data-root {data_root}")
    if cohort is not None:
        parts.append(f"--cohort {cohort}")
    if recipe.n_phantoms != Recipe().n_phantoms:
        parts.append(f"--phantoms {recipe.n_phantoms}")
    if recipe.epochs != Recipe().epochs:
        parts.append(f"--epochs {recipe.epochs}")
    parts.append(f"--seed {seed}")
    return " ".join(parts)


def _recipe_text(recipe: Recipe, seed: int, data_root: Path | None, report: TrainingReport,
                 cohort: Path | None = None) -> str:
    return f"""# Recipe: {MODEL_NAME} {recipe.version}

Reproduce the shipped model from the project root (the third-party data in `../shared/data`,
see its MANIFEST.md):

```
{_command(seed, data_root, recipe, report.out_dir, cohort)}
```

equivalently, in Python:

```python
from pathlib import Path
from dicomnode.train.segmentation import train_segmentation
train_segmentation(Path("{report.out_dir}"), data_root={f'Path("{data_root}")' if data_root else None},
                   cohort={f'Path("{cohort}")' if cohort else None}, seed={seed})
```

Settings (`dicomnode.train.segmentation.Recipe` defaults{'' if recipe == Recipe() else ', with changes'}):

```
{json.dumps(jsonable(asdict(recipe)), indent=2)}
```

This run: {report.iterations} iterations, {report.seconds / 60:.1f} min on {report.device}
({recipe.threads} thread(s)), torch {torch.__version__}. Deterministic for a seed, a device and
a thread count; another CPU or library version may give slightly different weights.
"""


def _seed_range(seeds: Sequence[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds else "none"


def _patient_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| patient | Dice | tumour found | false lesions | drawn ml | reported ml | confidence |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        confidences = ", ".join(f"{c:.2f}" for c in r["confidences"]) or "-"
        lines.append(f"| {r['case']} | {r['dice']:.3f} | {'yes' if r['found'] else 'NO'} | "
                     f"{r['false_lesions']} | {r['drawn_ml']:.1f} | {r['reported_ml']:.1f} | "
                     f"{confidences} |")
    return "\n".join(lines)


def _model_card(recipe: Recipe, report: TrainingReport, training: dict[str, Any]) -> str:
    data = "\n".join(f"- {d}" for d in report.data_used)
    settings = report.settings
    if report.per_patient:
        summary = summarise(report.per_patient)
        evaluation = f"""Validation patients (never trained on; the node's own inference and post-processing,
scored on the CT's native grid against the clinician's GTV): median Dice
**{summary['median_dice']:.3f}** (mean {summary['mean_dice']:.3f}), tumour found in
**{summary['found']} of {summary['patients']}**, **{summary['false_lesions_per_patient']:.2f}** false
lesions per patient. "Found": a reported lesion overlaps the drawn tumour; a false lesion
touches no drawn voxel.

{_patient_table(report.per_patient)}
"""
    else:
        evaluation = (f"Validation Dice (held-out phantoms): **{report.best_validation_dice:.3f}**. "
                      "No patient was validated: this model knows only synthetic lesions.")
    study = "\n".join(
        f"| {line['min_confidence']:.2f} | {line['found']} of {line['patients']} | "
        f"{line['false_lesions_per_patient']:.2f} |" for line in report.confidence_study
    ) or "| (no cohort) | | |"
    ood = "\n".join(
        f"| {c['case']} | {c['slices']} | {c['lesions']} | "
        f"{c['on_its_tumour'] if c['tumour_drawn'] else '(none drawn)'} |"
        for c in report.out_of_domain
    ) or "| (not run: no data root) | | | |"
    if training.get("cohort") or report.per_patient:
        headline = ("**Trained on real patients (listed below). Research use only; not for "
                    "clinical use.** Its quality is the per-patient table below, on patients it "
                    "never saw.")
    else:
        headline = ("**A demonstration model trained on synthetic lesions. Not for clinical "
                    "use.** It shows that the node's segmentation stage works end to end; it "
                    "has never seen a real, annotated tumour.")
    split = ""
    if report.split[1]:
        split = (f"Fixed split by patient (every {recipe.cohort_validation_every}th case of the "
                 f"CSV validates): training {', '.join(report.split[0])}; **validation "
                 f"{', '.join(report.split[1])}**.")
    kept = (f"the epoch with the best validation Dice was kept (epoch {report.best_epoch})"
            if recipe.select_best_epoch else
            f"the weights after the last epoch (an exponential moving average, decay "
            f"{recipe.ema_decay}) are shipped, so the validation figures did not pick the model")
    return f"""# Model card: {MODEL_NAME} {recipe.version}

{headline}

## Domain
Soft-tissue sarcoma of the limbs and trunk on CT (planning CT cropped around the tumour, as
in the IBSI/TCIA Soft-tissue-Sarcoma collection). One output: tumour (the gross tumour volume
as a radiation oncologist draws it) against everything else. **Out of domain** (chest,
abdomen, other tumours, other crops) the figures below do not hold; see "Out of domain".

## What the node does with it
Input one CT volume in HU; output a lesion probability per voxel. The node keeps voxels with
probability >= `probability_threshold` ({settings.probability_threshold}) inside the body
(`body_only` = {str(settings.body_only).lower()}), splits them into 3D connected components,
gives each its **confidence** (the mean probability inside it, reported in the SR), and drops
components below `min_lesion_ml` ({settings.min_lesion_ml} ml) or below `min_confidence`
({settings.min_confidence}); `max_lesions` ({settings.max_lesions or 'no limit'}) keeps the most
confident. These `[segmentation]` values are ours, not a paper's; the evaluation below uses
exactly them.

## Architecture and preprocessing (our choices)
MONAI `UNet` (3D), channels {list(recipe.channels)}, strides {list(recipe.strides)},
{recipe.num_res_units} residual unit(s) per block, instance normalisation, one output channel
(sigmoid); {report.weights_bytes / 1e6:.1f} MB of float32 weights. Input: HU clipped to
{list(recipe.hu_window)} and scaled to [-1, 1], resampled to {list(recipe.spacing_mm)} mm
(z, y, x); sliding-window inference with {list(recipe.patch_size)}-voxel windows
(Gaussian-weighted), logits resampled back to the native grid. All of this is read from
`manifest.json`. Seed 004 names only "a 3D U-Net"; its Dice 0.87 was brain MRI structures,
not this task, and nothing here reproduces it.

## Training data (exactly)
{data}

{split}

Patches {list(recipe.patch_size)}, {recipe.lesion_patch_fraction:.0%} centred near a lesion,
random flips on all axes, intensity jitter (+-25 HU offset, +-10 % contrast, up to 10 HU extra
noise). Loss: Dice + binary cross-entropy (MONAI `DiceCELoss`, batch Dice). AdamW, learning
rate {recipe.learning_rate:g}, warm-up then cosine decay; {report.epochs} epochs of
{recipe.iterations_per_epoch} iterations of {recipe.batch_size} patches; {kept}.

Trained {training['date']} on {report.device} ({training['host']}) in
{report.seconds / 60:.1f} min with torch {training['torch']}, MONAI {training['monai']}, seed
{training['seed']}.

## Evaluation
{evaluation}
Choosing `min_confidence` (on the **training** patients only, shipped weights; tumours found
and false lesions per patient for each value):

| min_confidence | tumours found | false lesions per patient |
|---|---|---|
{study}

## Out of domain
Lesions the node reports on whole CTs that are not limb or trunk sarcoma (none trained on):

| CT | slices | lesions reported | of which on its drawn tumour |
|---|---|---|---|
{ood}

## Seeds
- Training phantoms: `make_phantom_study` seeds {_seed_range(report.train_seeds)}.
- **Reserved: seeds >= {RESERVED_SEED_START}** are for tests and the demo and are never used
  in training or validation.

## Intended use
Research on the dicomnode pipeline (receive, segment, measure, report) with de-identified
sarcoma CT; a starting point a hospital retrains on its own cohort
(`dicomnode train segmentation --cohort`).

## Limitations
- {len(report.split[0]) or 'No'} training patients from one public collection (one
  institution's planning CTs, cropped around the tumour by the IBSI team); other scanners,
  kernels, contrast phases, children, implants and whole-body fields of view were never seen.
- The ground truth is one clinician's GTV per patient; the GTV may include oedema or exclude
  parts a radiologist would call tumour.
- Lesions touching each other merge into one; components below `min_lesion_ml` are dropped.
- Not a medical device. Do not use it for diagnosis, treatment or any clinical decision.
"""
