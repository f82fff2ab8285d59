"""Regenerate the models shipped in ``models/`` with one command: ``dicomnode train shipped``.

The shipped TMB and subtype models are DEMONSTRATION models: they are made by the very
commands a hospital runs on its own cohort (``dicomnode features``, ``dicomnode train tmb``,
``dicomnode train subtypes``), fed with the synthetic cohort of
:mod:`dicomnode.train.synthetic` instead of patients. The segmentation model is trained by
``dicomnode train segmentation`` on real patients: the sarcoma cohort
``<data_root>/sts_cohort/cohort.csv`` (28 patients train, 7 validate, split by patient), with
the chest and abdomen CTs of ``<data_root>`` as the out-of-domain check. Each model folder's
``RECIPE.md`` names the command that made it.

Because the cohort has planted truth, this command also checks the models against data they
never saw: a held-out synthetic cohort drawn with another seed (TMB AUC, subtype agreement
with the planted phenotypes), and appends the figures to the model cards.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sklearn.metrics import adjusted_rand_score

from dicomnode.analyse.predict import SubtypeModel, TmbModel, impute
from dicomnode.config import Config
from dicomnode.errors import TrainingError
from dicomnode.train.features import compute_features
from dicomnode.train.synthetic import GENERATOR_VERSION, write_synthetic_cohort
from dicomnode.train.table import read_feature_table
from dicomnode.train.tmb import classification_metrics, load_training_set, train_tmb

PARTS = ("tmb", "subtypes", "segmentation")
#: The real cohort the shipped segmentation model trains on, relative to ``data_root``.
SEGMENTATION_COHORT = Path("sts_cohort") / "cohort.csv"
TRAINING_CASES = 200
HOLDOUT_CASES = 100
#: The held-out cohort is drawn with ``seed + HOLDOUT_SEED_OFFSET``: no case is shared.
HOLDOUT_SEED_OFFSET = 1_000_000

DEMO_NOTE = (
    "DEMONSTRATION model fitted on a synthetic cohort (dicomnode.train.synthetic, generator "
    "version {version}, seed {seed}): CT crops of 24 x 64 x 64 voxels (2.5 x 1 x 1 mm) with one "
    "lesion each, whose texture follows a latent TMB variable seen through noise and whose "
    "size, shape, density, necrosis and rim follow one of four latent phenotypes. It knows "
    "nothing about real tumours or patients; it shows that the training commands recover a "
    "signal planted on purpose."
)


def train_shipped(
    models_dir: Path,
    *,
    work_dir: Path,
    data_root: Path | None,
    parts: Sequence[str] = PARTS,
    seed: int = 0,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Rebuild the ``parts`` of ``models_dir``; return one summary line per model.

    ``work_dir`` receives the synthetic cohorts and their feature files (with their caches,
    so an interrupted run resumes). ``data_root`` is the real CT for the segmentation model.
    """
    models_dir, work_dir = Path(models_dir), Path(work_dir)
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TrainingError(f"unknown model(s) {sorted(unknown)}; choose from {PARTS}")
    summaries = []
    if {"tmb", "subtypes"} & set(parts):
        config = Config()
        train = _synthetic_features(work_dir / "training", TRAINING_CASES, seed, config, workers, log)
        holdout = _synthetic_features(work_dir / "holdout", HOLDOUT_CASES,
                                      seed + HOLDOUT_SEED_OFFSET, config, workers, log)
        if "tmb" in parts:
            summaries.append(_train_demo_tmb(models_dir / "tmb", train, holdout, seed, workers, log))
        if "subtypes" in parts:
            summaries.append(_train_demo_subtypes(models_dir / "subtypes", train, holdout, seed))
    if "segmentation" in parts:
        from dicomnode.train.segmentation import train_segmentation  # torch: only when asked

        if data_root is None or not (Path(data_root) / SEGMENTATION_COHORT).is_file():
            raise TrainingError(f"the segmentation model trains on {SEGMENTATION_COHORT} under "
                                f"--data-root, which is not at {data_root}")
        report = train_segmentation(models_dir / "segmentation", data_root=data_root,
                                    cohort=Path(data_root) / SEGMENTATION_COHORT, seed=seed,
                                    log=log)
        summaries.append(str(report))
    return summaries


def _synthetic_features(
    folder: Path, n_cases: int, seed: int, config: Config, workers: int, log: Callable[[str], None]
) -> tuple[Path, Path]:
    """Write the synthetic cohort ``seed`` and measure it; returns (cohort.csv, features.csv)."""
    started = time.perf_counter()
    cohort = write_synthetic_cohort(folder, n_cases, seed)
    summary = compute_features(cohort, folder / "features.csv", config=config, workers=workers)
    if not summary.ok:
        raise TrainingError(f"synthetic cohort {seed}: features failed:\n{summary}")
    log(f"synthetic cohort {seed}: {n_cases} cases measured in {time.perf_counter() - started:.0f} s")
    return cohort, folder / "features.csv"


def _train_demo_tmb(
    out_dir: Path, train: tuple[Path, Path], holdout: tuple[Path, Path], seed: int, workers: int,
    log: Callable[[str], None],
) -> str:
    cohort, features = train
    summary = train_tmb(
        load_training_set(features, cohort), out_dir, seed=seed, workers=workers,
        name="dicomnode TMB demonstration model",
        cohort_note=DEMO_NOTE.format(version=GENERATOR_VERSION, seed=seed),
        sources={"features": "synthetic", "cohort": "synthetic",
                 "command": f"dicomnode train shipped --only tmb --seed {seed}"},
        log=log,
    )
    held = load_training_set(holdout[1], holdout[0])
    model = TmbModel.load(out_dir)
    names = {n: i for i, n in enumerate(held.names)}
    matrix, _ = impute(held.values[:, [names[f] for f in model.features]], model.medians)
    metrics = classification_metrics(held.high, model.probabilities(matrix), model.threshold)
    _add_to_manifest(out_dir / "manifest.json", "holdout", metrics)
    _append(out_dir / "MODEL_CARD.md", f"""
## Held-out synthetic cohort (final model, threshold as stored)
{metrics['n']} further cases drawn with seed {seed + HOLDOUT_SEED_OFFSET} (none shared with training):
AUC {metrics['auc']:.3f}, sensitivity {metrics['sensitivity']:.3f}, specificity {metrics['specificity']:.3f},
accuracy {metrics['accuracy']:.3f}.
""")
    return f"{summary}\nheld-out AUC {metrics['auc']:.3f} ({metrics['n']} cases)"


def _train_demo_subtypes(
    out_dir: Path, train: tuple[Path, Path], holdout: tuple[Path, Path], seed: int
) -> str:
    from dicomnode.train.subtypes import train_subtypes

    summary = train_subtypes(train[1], out_dir, seed=seed,
                             name="dicomnode imaging subtype demonstration model",
                             command=f"dicomnode train shipped --only subtypes --seed {seed}")
    model = SubtypeModel.load(out_dir)
    agreement = {
        name: _phenotype_agreement(model, cohort, features)
        for name, (cohort, features) in (("training", train), ("holdout", holdout))
    }
    _add_to_manifest(out_dir / "model.json", "planted_phenotype_agreement", agreement)
    _append(out_dir / "MODEL_CARD.md", f"""
## Check against the planted phenotypes (synthetic cohort only)
Adjusted Rand index between the subtypes and the generator's four latent phenotypes
(1 = the same partition, 0 = chance): training {agreement['training']:.3f},
held-out {agreement['holdout']:.3f} ({HOLDOUT_CASES} cases, seed {seed + HOLDOUT_SEED_OFFSET}).
**This model is a DEMONSTRATION fitted on synthetic lesions.**
""")
    return (f"{summary}\nsubtypes vs planted phenotypes: adjusted Rand index "
            f"{agreement['training']:.3f} (training), {agreement['holdout']:.3f} (held-out)")


def _phenotype_agreement(model: SubtypeModel, cohort: Path, features: Path) -> float:
    with cohort.open(newline="", encoding="utf-8") as handle:
        phenotype = {row["case_id"]: int(row["phenotype"]) for row in csv.DictReader(handle)}
    table = read_feature_table(features, model.features)
    imputed, _ = impute(table.values, model.medians)
    subtypes = model.assign(imputed)
    return float(adjusted_rand_score([phenotype[case] for case in table.case_ids], subtypes))


def _add_to_manifest(path: Path, key: str, value: object) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    document.setdefault("metrics", {})[key] = value
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)

