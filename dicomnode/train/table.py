"""The features CSV that ``dicomnode features`` writes, read back for the training commands.

One row per lesion: ``case_id``, then ``roi`` and/or ``mask_label`` when the cohort used them
(together they name the lesion), then one column per feature, written with ``repr`` (empty
or ``nan`` where a feature could not be computed).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomnode.errors import TrainingError

#: Columns that name the lesion of a row, besides ``case_id``.
LESION_COLUMNS = ("roi", "mask_label")


@dataclass(frozen=True)
class FeatureTable:
    """Lesions (rows) by features (columns) of a features CSV."""

    path: Path
    lesions: tuple[tuple[str, ...], ...]  # case_id, then the lesion columns present
    lesion_columns: tuple[str, ...]
    names: tuple[str, ...]
    values: np.ndarray  # float, NaN where missing
    left_out: tuple[str, ...] = ()  # lesions of the file not in the table, with the reason

    @property
    def case_ids(self) -> np.ndarray:
        return np.asarray([lesion[0] for lesion in self.lesions])

    @property
    def n_cases(self) -> int:
        return len({lesion[0] for lesion in self.lesions})

    def select(self, keep: np.ndarray, reasons: Sequence[str]) -> FeatureTable:
        """The lesions where ``keep`` is true; ``reasons`` (one per dropped lesion) join
        :attr:`left_out`."""
        lesions = tuple(lesion for lesion, kept in zip(self.lesions, keep) if kept)
        return dataclasses.replace(self, lesions=lesions, values=self.values[keep],
                                   left_out=self.left_out + tuple(reasons))

    def without_sparse_lesions(self, limit: float) -> FeatureTable:
        """The lesions with at most ``limit`` of their features missing (the others are named
        in :attr:`left_out`).

        The node predicts nothing for such a lesion; fitted on medians, it would only pull
        a model towards the cohort's middle.
        """
        missing = (~np.isfinite(self.values)).mean(axis=1)
        keep = missing <= limit
        return self.select(keep, [
            f"{'/'.join(lesion)}: {share:.0%} of the features missing"
            for lesion, share, kept in zip(self.lesions, missing, keep)
            if not kept
        ])


def read_feature_table(
    path: Path,
    features: Sequence[str] | None = None,
    *,
    include: Callable[[str], bool] = lambda name: True,
    kind: str = "feature",
) -> FeatureTable:
    """The ``features`` columns of a features CSV (default: every column ``include`` accepts).

    ``kind`` names what the caller looks for in the error raised when no column is left.

    Raises
    ------
    TrainingError
        The file is unreadable, lacks ``case_id`` or a requested column, has no feature
        column, or a cell that is neither a number nor empty; the message names it.
    """
    path = Path(path)
    header, rows = read_csv(path)
    if "case_id" not in header:
        raise TrainingError(f"{path}: no case_id column")
    lesion_columns = tuple(c for c in LESION_COLUMNS if c in header)
    if features is None:
        features = [c for c in header if c != "case_id" and c not in lesion_columns and include(c)]
    names = tuple(features)
    missing = [n for n in names if n not in header]
    if missing:
        raise TrainingError(f"{path}: no column {missing[0]!r}")
    if not names:
        raise TrainingError(f"{path}: no {kind} column (run `dicomnode features`)")
    values = np.array(
        [[number(row[n], path, line, n) for n in names] for line, row in rows], dtype=np.float64
    ).reshape(len(rows), len(names))
    lesions = tuple((row["case_id"], *(row[c] or "" for c in lesion_columns)) for _, row in rows)
    return FeatureTable(path, lesions, lesion_columns, names, values)


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs of a CSV file."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingError(f"{path}: cannot read: {exc}") from None


def number(text: str | None, path: Path, line: int, column: str) -> float:
    """A CSV cell as a float: NaN when empty; a :class:`TrainingError` naming it otherwise."""
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise TrainingError(f"{path}, line {line}, column {column}: not a number: {text!r}") from None
