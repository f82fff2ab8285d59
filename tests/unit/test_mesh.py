"""Fast shape coefficients against pyradiomics' own C function: surface and volume to 1e-10,
diameters to the bit, on random masks (thin ones included) and a real sarcoma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import cShape
from radiomics.shape import RadiomicsShape

from dicomnode.analyse.mesh import FastShape, calibration, diameters, mesh_vertices

IBSI_MASK = Path(__file__).resolve().parents[3] / "shared/data/ibsi_sts_001/nifti/CT_mask.nii.gz"


def random_masks(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = rng.integers(1, 14, size=3)  # one voxel thick along some axes, too
        core = rng.random(shape) < rng.uniform(0.2, 0.97)
        if core.any():
            yield np.pad(core, 1), tuple(float(s) for s in rng.uniform(0.3, 5.0, size=3))


def test_surface_volume_and_diameters_match_pyradiomics_on_random_masks() -> None:
    for padded, spacing in random_masks(150, seed=7):
        area, volume, expected = cShape.calculate_coefficients(padded, np.array(spacing))
        fast_area, fast_volume = calibration().surface_and_volume(padded, spacing)
        assert fast_area == pytest.approx(area, rel=1e-10, abs=1e-9)
        assert fast_volume == pytest.approx(volume, rel=1e-10, abs=1e-9)
        assert diameters(padded, spacing) == tuple(expected)


def test_vertices_are_the_middles_of_edges_that_leave_the_mask() -> None:
    padded = np.pad(np.ones((1, 1, 1), dtype=bool), 1)
    # One voxel at (1, 1, 1): six faces, one vertex in the middle of each (doubled indices).
    assert sorted(map(tuple, mesh_vertices(padded))) == [
        (1, 2, 2), (2, 1, 2), (2, 2, 1), (2, 2, 3), (2, 3, 2), (3, 2, 2)
    ]


def test_shape_features_of_a_real_sarcoma() -> None:
    if not IBSI_MASK.is_file():
        pytest.skip(f"{IBSI_MASK} not found")
    mask = sitk.ReadImage(str(IBSI_MASK))
    image = sitk.Cast(mask, sitk.sitkFloat64)
    expected = RadiomicsShape(image, mask).execute()
    got = FastShape(image, mask).execute()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(float(value), rel=1e-10), name
    for name in ("Maximum3DDiameter", "Maximum2DDiameterSlice", "Maximum2DDiameterColumn",
                 "Maximum2DDiameterRow", "MajorAxisLength", "VoxelVolume"):
        assert float(got[name]) == float(expected[name]), name
