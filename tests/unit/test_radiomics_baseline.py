"""RadiomicsExtractor against pyradiomics' published feature baseline (lung1, lung2).

External check of dicomnode's radiomics path (issue 3): run with the configuration that
produced pyradiomics' baseline (``models/radiomics/pyradiomics_baseline.yaml``), our
``RadiomicsExtractor.extract_arrays`` reproduces every feature of every class of
``../shared/data/pyradiomics/baseline/baseline_<class>.csv`` for the ``lung1`` and ``lung2``
columns, within pyradiomics' own tolerance.

What pyradiomics' own suite does with these files (tests/testUtils.py and
tests/test_features.py, v3.1.0; followed here, not copied):

- every CSV column is one test; rows whose name contains ``diagnostics`` are its provenance,
  the others its expected values. ``diagnostics_Configuration_Settings`` and
  ``diagnostics_Configuration_EnabledImageTypes`` (Python literals) are the settings it applies,
  and it asserts that the image and mask it loads have the ``..._Hash`` recorded there;
- only ``original`` image features are compared (any other image type is not implemented);
- a value passes when ``|1 - value / baseline| < 3%``; where the baseline is exactly 0 it must
  be exactly 0 (otherwise the deviation counts as 100%); a missing or NaN value fails;
- every non-deprecated feature of a class must have a baseline value and vice versa.

The extraction (original image only; about 2-3 s per case with reading and hashing) runs once
per case.
"""

from __future__ import annotations

import ast
import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import SimpleITK as sitk
from radiomics import featureextractor

from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.errors import ModelError

PROJECT = Path(__file__).resolve().parents[2]
PARAMS = PROJECT / "models" / "radiomics" / "pyradiomics_baseline.yaml"
#: ``SHARED_DATA`` of tests/conftest.py; its ``shared_data`` fixture is function-scoped, too
#: narrow for the module-scoped extraction below.
PYRADIOMICS_DATA = PROJECT.parent / "shared" / "data" / "pyradiomics"

CASES = ("lung1", "lung2")
#: The feature classes the baseline holds (one ``baseline_<class>.csv`` each).
CLASSES_3D = ("shape", "firstorder", "glcm", "gldm", "glrlm", "glszm", "ngtdm")
SHAPE_2D = "shape2D"
SHAPE_2D_REASON = (
    "shape2D cannot apply to a 3D extraction: its baseline has no lung1/lung2 column, only "
    "lung1_shape2D/lung2_shape2D, another test case (lung1_2D/lung2_2D: a one-slice mask) run "
    "with force2D=True, which RadiomicsExtractor refuses (3D features only)"
)

#: pyradiomics' tolerance: relative deviation strictly below 3%.
TOLERANCE = 0.03

#: Settings of the baseline that the parameter file may leave different, and why.
IRRELEVANT_SETTINGS = {
    "additionalInfo": "adds diagnostics_* entries only; RadiomicsExtractor drops them",
    "interpolator": "used only for resampling, which the baseline does not do",
}


@dataclass(frozen=True)
class BaselineColumn:
    """One test column of a ``baseline_<class>.csv``: its provenance rows and expected values."""

    diagnostics: Mapping[str, str]
    expected: Mapping[str, float]

    @property
    def settings(self) -> dict[str, Any]:
        """The settings pyradiomics applies for this column."""
        return ast.literal_eval(self.diagnostics["diagnostics_Configuration_Settings"])

    @property
    def image_types(self) -> dict[str, Any]:
        """The enabled image types pyradiomics applies for this column."""
        return ast.literal_eval(self.diagnostics["diagnostics_Configuration_EnabledImageTypes"])


@dataclass(frozen=True)
class CaseResult:
    """Our features of one pyradiomics test case, with the hashes of the files measured."""

    case: str
    features: Mapping[str, float]
    warnings: tuple[str, ...]
    image_hash: str
    mask_hash: str


# ----------------------------------------------------------------------------- helpers
def baseline_csv(feature_class: str) -> Path:
    """The baseline file of one feature class."""
    return PYRADIOMICS_DATA / "baseline" / f"baseline_{feature_class}.csv"


def baseline_columns(feature_class: str) -> list[str]:
    """The test columns (cases and configurations) of a class's baseline."""
    with baseline_csv(feature_class).open(newline="") as handle:
        return next(csv.reader(handle))[1:]


def read_baseline_column(feature_class: str, column: str) -> BaselineColumn:
    """One column of ``baseline_<class>.csv``, split into provenance and expected values."""
    with baseline_csv(feature_class).open(newline="") as handle:
        rows = list(csv.reader(handle))
    index = rows[0].index(column)
    # pyradiomics' own reader: a row is provenance when its name contains "diagnostics".
    diagnostics = {row[0]: row[index] for row in rows[1:] if "diagnostics" in row[0]}
    expected = {row[0]: float(row[index]) for row in rows[1:] if "diagnostics" not in row[0]}
    return BaselineColumn(diagnostics, expected)


def relative_deviation(value: float, expected: float) -> float:
    """pyradiomics' deviation: ``|1 - value / expected|``, or all-or-nothing at an expected 0.

    A baseline of exactly 0 cannot be divided by, so pyradiomics counts any non-zero value as
    100% off. A value that is not finite is always out of tolerance.
    """
    if not math.isfinite(value):
        return math.inf
    if expected == 0.0:
        return 0.0 if value == 0.0 else 1.0
    return abs(1.0 - value / expected)


def features_of_class(features: Mapping[str, float], feature_class: str) -> dict[str, float]:
    """Our original-image features of one class (``original_<class>_<Feature>``)."""
    prefix = f"original_{feature_class}_"
    return {name: value for name, value in features.items() if name.startswith(prefix)}


def read_case(case: str) -> tuple[sitk.Image, sitk.Image]:
    """Image and label map of a test case, the mask read as UInt32 as pyradiomics reads it."""
    image = sitk.ReadImage(str(PYRADIOMICS_DATA / f"{case}_image.nrrd"))
    mask = sitk.ReadImage(str(PYRADIOMICS_DATA / f"{case}_label.nrrd"), sitk.sitkUInt32)
    return image, mask


def extract_case(extractor: RadiomicsExtractor, case: str, label: int) -> CaseResult:
    """Our features of a test case through the node's own path: ``(z, y, x)`` arrays in."""
    image, mask = read_case(case)
    spacing_zyx = tuple(reversed(image.GetSpacing()))  # SimpleITK gives (x, y, z)
    result = extractor.extract_arrays(
        sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(mask), spacing_zyx, label=label
    )
    return CaseResult(
        case=case,
        features=result.as_dict(),
        warnings=result.warnings,
        image_hash=sitk.Hash(image),
        mask_hash=sitk.Hash(mask),
    )


def out_of_tolerance(ours: Mapping[str, float], expected: Mapping[str, float]) -> list[str]:
    """One line per baseline feature that we miss or that is not within :data:`TOLERANCE`."""
    problems = []
    for name, value in expected.items():
        if name not in ours:
            problems.append(f"{name}: not produced (baseline {value!r})")
            continue
        deviation = relative_deviation(ours[name], value)
        if not deviation < TOLERANCE:
            problems.append(
                f"{name}: ours {ours[name]!r}, baseline {value!r}, deviation {deviation:.2%}"
            )
    return problems


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_present() -> None:
    """Skip when the third-party data (see ../shared/data/MANIFEST.md) is not there."""
    for case in CASES:
        for part in ("image", "label"):
            if not (PYRADIOMICS_DATA / f"{case}_{part}.nrrd").is_file():
                pytest.skip(f"pyradiomics test case {case} not found in {PYRADIOMICS_DATA}")
    if not baseline_csv("shape").is_file():
        pytest.skip(f"pyradiomics baseline not found in {PYRADIOMICS_DATA / 'baseline'}")


@pytest.fixture(scope="module")
def extractor() -> RadiomicsExtractor:
    # crop_margin_mm=0: exactly pyradiomics' behaviour (it only matters to filtered images).
    return RadiomicsExtractor(PARAMS, crop_margin_mm=0.0)


@pytest.fixture(scope="module", params=CASES)
def case_result(
    request: pytest.FixtureRequest, data_present: None, extractor: RadiomicsExtractor
) -> CaseResult:
    """Our features of one case, extracted once for every class tested on it."""
    case: str = request.param
    label = int(read_baseline_column("shape", case).settings["label"])
    return extract_case(extractor, case, label)


@pytest.fixture(scope="module")
def protocol() -> featureextractor.RadiomicsFeatureExtractor:
    """The parameter file as pyradiomics itself reads it (defaults filled in)."""
    return featureextractor.RadiomicsFeatureExtractor(str(PARAMS))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "feature_class",
    [*CLASSES_3D, pytest.param(SHAPE_2D, marks=pytest.mark.skip(reason=SHAPE_2D_REASON))],
)
def test_features_match_baseline(case_result: CaseResult, feature_class: str) -> None:
    """Every baseline feature of the class within 3%, and no feature the baseline lacks."""
    baseline = read_baseline_column(feature_class, case_result.case)
    ours = features_of_class(case_result.features, feature_class)
    assert case_result.warnings == ()
    assert ours, f"the parameter file enables no {feature_class} feature"
    unexpected = sorted(set(ours) - set(baseline.expected))
    assert not unexpected, f"features without a baseline value: {unexpected}"
    problems = out_of_tolerance(ours, baseline.expected)
    assert not problems, f"{case_result.case} {feature_class}:\n" + "\n".join(problems)


@pytest.mark.parametrize("feature_class", CLASSES_3D)
def test_parameter_file_is_the_baseline_configuration(
    case_result: CaseResult,
    protocol: featureextractor.RadiomicsFeatureExtractor,
    feature_class: str,
) -> None:
    """The baseline's settings, image types and input files are the ones we measure with."""
    baseline = read_baseline_column(feature_class, case_result.case)
    assert baseline.diagnostics["diagnostics_Configuration_TestCase"] == case_result.case
    assert baseline.image_types == protocol.enabledImagetypes == {"Original": {}}
    differing = {
        key: (value, protocol.settings.get(key))
        for key, value in baseline.settings.items()
        if key not in IRRELEVANT_SETTINGS and protocol.settings.get(key) != value
    }
    assert not differing, f"(baseline, parameter file) differ: {differing}"
    # pyradiomics' tests check these hashes too: the baseline was computed on these very files.
    assert case_result.image_hash == baseline.diagnostics["diagnostics_Image-original_Hash"]
    assert case_result.mask_hash == baseline.diagnostics["diagnostics_Mask-original_Hash"]


def test_every_baseline_class_is_tested(data_present: None) -> None:
    """A class added to the baseline must be added here, not silently left out."""
    files = baseline_csv("shape").parent.glob("baseline_*.csv")
    present = {path.stem.removeprefix("baseline_") for path in files}
    assert present == {*CLASSES_3D, SHAPE_2D}


def test_shape2d_skip_reason_holds(data_present: None, tmp_path: Path) -> None:
    """Checks the premise of :data:`SHAPE_2D_REASON`, so the skip cannot outlive it."""
    columns = baseline_columns(SHAPE_2D)
    assert not set(CASES) & set(columns)
    for case in CASES:
        column = read_baseline_column(SHAPE_2D, f"{case}_shape2D")
        assert column.diagnostics["diagnostics_Configuration_TestCase"] == f"{case}_2D"
        assert column.settings["force2D"] is True
    force_2d = tmp_path / "force2d.yaml"
    force_2d.write_text(PARAMS.read_text().replace("force2D: false", "force2D: true"))
    with pytest.raises(ModelError, match="force2D"):
        RadiomicsExtractor(force_2d)


def test_relative_deviation_follows_pyradiomics_rule() -> None:
    """The comparison can fail: 3% is out, an expected 0 needs an exact 0, NaN is out."""
    assert relative_deviation(102.9, 100.0) < TOLERANCE
    assert not relative_deviation(103.0, 100.0) < TOLERANCE
    assert not relative_deviation(-97.0, -100.0) < TOLERANCE
    assert relative_deviation(0.0, 0.0) == 0.0
    assert relative_deviation(1e-12, 0.0) == 1.0
    assert relative_deviation(math.nan, 1.0) == math.inf
    assert out_of_tolerance({"a": 1.0}, {"a": 1.0, "b": 2.0}) == ["b: not produced (baseline 2.0)"]
