"""RadiomicsExtractor: the 1037-feature protocol, the array-to-SimpleITK path, failure policy."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.config import Config, ConfigError, RadiomicsConfig
from dicomnode.errors import InputRejected, ModelError
from dicomnode.types import Geometry, LabelVolume, Lesion, LesionFeatures, SeriesKey, Volume

PROTOCOL = Path(__file__).resolve().parents[2] / "models" / "radiomics" / "tmb_protocol.yaml"
PYRADIOMICS_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "pyradiomics"

IMAGES = (
    "original",
    "log-sigma-1-0-mm-3D",
    "log-sigma-3-0-mm-3D",
    *(f"wavelet-{d}" for d in ("LLH", "LHL", "LHH", "HLL", "HLH", "HHL", "HHH", "LLL")),
)
PER_CLASS = {"firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}


@pytest.fixture(scope="module")
def extractor() -> RadiomicsExtractor:
    """The whole image, as plain pyradiomics filters it."""
    return RadiomicsExtractor(PROTOCOL, crop_margin_mm=0.0)


@pytest.fixture(scope="module")
def lung1() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """pyradiomics' lung1 test case as ``(z, y, x)`` arrays and spacing."""
    sitk = pytest.importorskip("SimpleITK")
    image, label = PYRADIOMICS_DATA / "lung1_image.nrrd", PYRADIOMICS_DATA / "lung1_label.nrrd"
    if not (image.is_file() and label.is_file()):
        pytest.skip(f"pyradiomics test case not found in {PYRADIOMICS_DATA}")
    image, label = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label), spacing_zyx


@pytest.fixture(scope="module")
def lung1_exact(extractor: RadiomicsExtractor, lung1) -> LesionFeatures:
    """The whole protocol on the uncropped 512 x 512 x 48 CT (the slow, exact path)."""
    hu, mask, spacing = lung1
    return extractor.extract_arrays(hu, mask, spacing)


def sphere_phantom(radius_mm: float, hu_value: float, spacing=(2.0, 0.8, 0.8), shape=(20, 40, 40)):
    """A sphere (in mm) on an anisotropic grid, with noisy soft-tissue density."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    mask = (np.sqrt(z**2 + y**2 + x**2) <= radius_mm).astype(np.uint8)
    hu = hu_value + 10.0 * np.random.default_rng(0).standard_normal(shape)
    return hu, mask, spacing


# ----------------------------------------------------------------------------- protocol
def test_protocol_names_exactly_1037_features(extractor: RadiomicsExtractor) -> None:
    names = extractor.feature_names
    assert len(names) == 1037
    assert len(set(names)) == 1037
    assert sum(n.startswith("original_shape_") for n in names) == 14
    per_image_class = Counter(tuple(n.split("_")[:2]) for n in names if "_shape_" not in n)
    assert per_image_class == Counter({(i, c): k for i in IMAGES for c, k in PER_CLASS.items()})


def test_protocol_file_errors_are_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        RadiomicsExtractor(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidthTypo: 20\n")
    with pytest.raises(ModelError, match="not a valid pyradiomics parameter file"):
        RadiomicsExtractor(bad)
    squared = tmp_path / "square.yaml"
    squared.write_text("imageType:\n  Square: {}\n")
    with pytest.raises(ModelError, match="Square"):
        RadiomicsExtractor(squared)


def test_negative_crop_margin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="crop_margin_mm"):
        RadiomicsExtractor(PROTOCOL, crop_margin_mm=-1.0)


def test_from_config_resolves_the_shipped_protocol() -> None:
    config = Config(radiomics=RadiomicsConfig(crop_margin_mm=20.0))
    extractor = RadiomicsExtractor.from_config(config.radiomics)
    assert extractor.params_file == config.resolve(config.radiomics.params_file)
    assert extractor.crop_margin_mm == 20.0
    assert len(extractor.feature_names) == 1037


def test_pyradiomics_logger_is_quiet(extractor: RadiomicsExtractor) -> None:
    assert logging.getLogger("radiomics").level == logging.WARNING


# ----------------------------------------------------------------------------- real CT
def test_lung1_gives_1037_finite_values_in_protocol_order(
    extractor: RadiomicsExtractor, lung1_exact: LesionFeatures
) -> None:
    assert lung1_exact.label == 1
    assert lung1_exact.names == extractor.feature_names
    assert len(lung1_exact.values) == 1037
    assert np.all(np.isfinite(lung1_exact.as_array()))
    assert lung1_exact.warnings == ()
    features = lung1_exact.as_dict()
    # Names carry their own values: the resegmentation range bounds the original image's HU,
    # and shape uses the mask cropped to the resegmented box (812 of 837 voxels, see science.md).
    lowest = features["original_firstorder_Minimum"]
    highest = features["original_firstorder_Maximum"]
    assert -150 <= lowest < highest <= 500
    voxel_mm3 = 0.5703125 * 0.5703125 * 5.0
    assert features["original_shape_VoxelVolume"] == pytest.approx(812 * voxel_mm3)


def test_automatic_margin_equals_the_whole_image_on_lung1(
    lung1, lung1_exact: LesionFeatures
) -> None:
    hu, mask, spacing = lung1
    auto = RadiomicsExtractor(PROTOCOL)
    assert auto.crop_margin_mm == "auto"
    # 16 x sigma 3 mm on a 0.57 x 0.57 x 5 mm grid: the crop is far smaller than the CT.
    assert auto.margin_voxels(spacing) == (10, 85, 85)
    cropped, exact = auto.extract_arrays(hu, mask, spacing).as_dict(), lung1_exact.as_dict()
    differ = sorted(name for name in exact if cropped[name] != exact[name])
    # Every filtered feature to the bit; only the mesh's surface and volume (summed per cube
    # configuration, see dicomnode/analyse/mesh.py) and the ratios made of them differ.
    assert all(name.startswith("original_shape_") for name in differ), differ
    for name in differ:
        assert cropped[name] == pytest.approx(exact[name], rel=1e-10), name


def test_crop_margin_keeps_shape_and_original_features(
    lung1, lung1_exact: LesionFeatures
) -> None:
    hu, mask, spacing = lung1
    cropped = RadiomicsExtractor(PROTOCOL, crop_margin_mm=20.0).extract_arrays(hu, mask, spacing)
    exact, near = lung1_exact.as_dict(), cropped.as_dict()
    assert cropped.names == lung1_exact.names
    for name in exact:
        if name.startswith("original_shape_"):  # mesh sums in another order: see mesh.py
            assert near[name] == pytest.approx(exact[name], rel=1e-10), name
        elif name.startswith("original_"):
            assert near[name] == exact[name], name
        else:  # filters see a different border; measured worst case 5e-5 relative
            assert near[name] == pytest.approx(exact[name], rel=1e-3, abs=1e-6), name


# ----------------------------------------------------------------------------- phantoms
def test_sphere_phantom_volume_and_shape(extractor: RadiomicsExtractor) -> None:
    hu, mask, spacing = sphere_phantom(10.0, 40.0)
    features = extractor.extract_arrays(hu, mask, spacing).as_dict()
    assert features["original_shape_VoxelVolume"] == pytest.approx(mask.sum() * 2.0 * 0.8 * 0.8)
    sphere_mm3 = 4 / 3 * math.pi * 10.0**3
    assert features["original_shape_MeshVolume"] == pytest.approx(sphere_mm3, rel=0.03)
    assert features["original_shape_Sphericity"] > 0.85


def test_box_phantom_diameters_follow_zyx_spacing(extractor: RadiomicsExtractor) -> None:
    mask = np.zeros((12, 30, 30), np.uint8)
    mask[3:9, 5:15, 5:19] = 1  # 6 x 10 x 14 voxels = 15 x 10 x 7 mm (z, y, x)
    hu = 40.0 + 10.0 * np.random.default_rng(1).standard_normal(mask.shape)
    features = extractor.extract_arrays(hu, mask, (2.5, 1.0, 0.5)).as_dict()
    assert features["original_shape_VoxelVolume"] == pytest.approx(15 * 10 * 7)
    # pyradiomics: "Slice" is the axial (y-x) plane, "Column" the (z-x) and "Row" the (z-y) plane.
    diameters = {
        "Slice": math.hypot(10, 7),
        "Column": math.hypot(15, 7),
        "Row": math.hypot(15, 10),
    }
    for plane, diagonal in diameters.items():
        measured = features[f"original_shape_Maximum2DDiameter{plane}"]
        assert measured == pytest.approx(diagonal, rel=0.05), plane


def test_extract_measures_every_lesion_of_a_label_volume(extractor: RadiomicsExtractor) -> None:
    hu, sphere, spacing = sphere_phantom(6.0, 40.0, shape=(20, 40, 80))
    labels = np.zeros(sphere.shape, np.uint16)
    labels[:, :, :40] = sphere[:, :, 20:60]  # lesion 1 left, lesion 2 right
    labels[:, :, 40:] = 2 * sphere[:, :, 20:60]
    geometry = Geometry((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), spacing)
    volume = Volume(hu.astype(np.float32), geometry, SeriesKey("1.2", "1.2.3"), (), "1.2.4")
    unused_bbox = ((0, 1), (0, 1), (0, 1))  # the extractor finds the voxels itself
    lesions = tuple(
        Lesion(k, int((labels == k).sum()), 0.0, (0.0, 0.0, 0.0), unused_bbox) for k in (1, 2)
    )
    result = extractor.extract(volume, LabelVolume(labels, lesions, "test", "0"))
    assert [f.label for f in result] == [1, 2]
    volumes = [f.as_dict()["original_shape_VoxelVolume"] for f in result]
    assert volumes == pytest.approx([(labels == k).sum() * 2.0 * 0.8 * 0.8 for k in (1, 2)])


# ----------------------------------------------------------------------------- failures
def test_empty_mask_is_rejected_clearly(extractor: RadiomicsExtractor) -> None:
    hu, mask, spacing = sphere_phantom(6.0, 40.0)
    with pytest.raises(InputRejected, match="lesion 3: its mask is empty"):
        extractor.extract_arrays(hu, mask, spacing, label=3)


def test_mismatched_grid_and_bad_spacing_are_rejected(extractor: RadiomicsExtractor) -> None:
    hu, mask, spacing = sphere_phantom(6.0, 40.0)
    with pytest.raises(InputRejected, match="one grid"):
        extractor.extract_arrays(hu[:-1], mask, spacing)
    with pytest.raises(InputRejected, match="spacing"):
        extractor.extract_arrays(hu, mask, (0.0, 1.0, 1.0))


def test_lesion_outside_resegmentation_range_gives_nan_and_a_warning(
    extractor: RadiomicsExtractor, caplog: pytest.LogCaptureFixture
) -> None:
    hu, mask, spacing = sphere_phantom(6.0, -600.0)  # air: nothing left in -150 .. 500 HU
    with caplog.at_level(logging.WARNING, logger="dicomnode.analyse.radiomics"):
        features = extractor.extract_arrays(hu, mask, spacing, label=1)
    assert features.names == extractor.feature_names
    assert np.all(np.isnan(features.as_array()))
    assert len(features.warnings) == 1
    assert "lesion 1: pyradiomics could not measure it" in features.warnings[0]
    assert "Resegmentation" in features.warnings[0]
    assert features.warnings[0] in caplog.text
