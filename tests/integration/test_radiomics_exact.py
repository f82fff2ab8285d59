"""The node's radiomics, as configured by default, against plain pyradiomics on the whole image.

Five real lesions: pyradiomics' lung1 and lung2 test CTs, the IBSI soft-tissue sarcoma case, and
two sarcoma patients of ``../shared/data/sts_cohort`` with their clinician's GTV. For each,
``RadiomicsFeatureExtractor.execute`` on the whole CT (the reference: slow, gigabytes) and the
node's :class:`RadiomicsExtractor` with its defaults (crop margin from the protocol, a worker
pool) must agree on every one of the 1037 features within 1e-6 relative. ``crop_margin_mm = 0``
must be bit-identical.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from radiomics import featureextractor

from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.assemble import assemble
from dicomnode.config import Config
from dicomnode.masks import ImageGrid, rtstruct_mask
from sarcoma import require_cohort

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
PROTOCOL = Path(__file__).resolve().parents[2] / "models" / "radiomics" / "tmb_protocol.yaml"
FILES = {
    "lung1": ("pyradiomics/lung1_image.nrrd", "pyradiomics/lung1_label.nrrd"),
    "lung2": ("pyradiomics/lung2_image.nrrd", "pyradiomics/lung2_label.nrrd"),
    "ibsi_sts_001": ("ibsi_sts_001/nifti/CT_image.nii.gz", "ibsi_sts_001/nifti/CT_mask.nii.gz"),
}
#: Held-out patients of the segmentation model (any would do): CT around the thigh, 190 x 189
#: x 52 and 206 x 218 x 71 voxels of 0.98 x 0.98 x 3.27 mm.
COHORT = ("STS_026", "STS_016")
RELATIVE = 1e-6
MESH_FEATURES = {
    f"original_shape_{name}"
    for name in ("MeshVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity", "Compactness1",
                 "Compactness2", "SphericalDisproportion")
}


def read_case(name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(hu, mask, spacing_zyx)`` of a case, the CT as float64 as the node holds it."""
    if name in FILES:
        image_path, mask_path = (SHARED / f for f in FILES[name])
        if not (image_path.is_file() and mask_path.is_file()):
            pytest.skip(f"{name} not found in {SHARED}")
        image, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(mask_path))
        spacing = tuple(reversed(image.GetSpacing()))
        hu = sitk.GetArrayFromImage(image).astype(np.float64)
        return hu, (sitk.GetArrayFromImage(mask) == 1).astype(np.uint8), spacing
    folder = require_cohort() / name / "CT"
    volume = assemble([pydicom.dcmread(p) for p in sorted((folder / "image").iterdir())])
    grid = ImageGrid(volume.hu, volume.geometry, volume.frame_of_reference_uid)
    mask = rtstruct_mask(pydicom.dcmread(folder / "rtstruct" / "RS.dcm"), grid, "GTV_Mass_CT", name)
    return volume.hu.astype(np.float64), mask.astype(np.uint8), volume.geometry.spacing


def pyradiomics_whole_image(hu, mask, spacing_zyx) -> dict[str, float]:
    extractor = featureextractor.RadiomicsFeatureExtractor(str(PROTOCOL))
    images = [sitk.GetImageFromArray(array) for array in (hu, mask)]
    for image in images:
        image.SetSpacing(tuple(reversed(spacing_zyx)))
    raw = extractor.execute(*images)
    return {k: float(v) for k, v in raw.items() if not k.startswith("diagnostics_")}


def relative_differences(reference: dict[str, float], names, values) -> dict[str, float]:
    ours = dict(zip(names, values))
    assert ours.keys() == reference.keys()
    out = {}
    for name, expected in reference.items():
        got = ours[name]
        if got == expected or (math.isnan(got) and math.isnan(expected)):
            continue
        out[name] = abs(got - expected) / max(abs(expected), 1e-300)
    return out


@pytest.fixture(scope="module")
def node_extractor():
    config = Config()
    extractor = RadiomicsExtractor.from_config(config.radiomics)
    assert extractor.crop_margin_mm == "auto"
    yield extractor
    extractor.close()


@pytest.mark.parametrize("case", [*FILES, *COHORT])
def test_default_radiomics_equal_pyradiomics_on_the_whole_image(case, node_extractor) -> None:
    hu, mask, spacing = read_case(case)
    assert mask.any()
    reference = pyradiomics_whole_image(hu, mask, spacing)
    features = node_extractor.extract_arrays(hu, mask, spacing)
    assert features.warnings == ()
    differences = relative_differences(reference, features.names, features.values)
    beyond = {k: v for k, v in differences.items() if v > RELATIVE}
    assert beyond == {}, f"{len(beyond)} features beyond {RELATIVE}: {sorted(beyond.items())[:5]}"
    # Only LoG images (their crop's edge) and the mesh's surface and volume (summed per cube
    # configuration, dicomnode/analyse/mesh.py) can differ at all: the wavelet and the
    # original image see the same voxels.
    unexpected = [n for n in differences if not (n.startswith("log-sigma") or n in MESH_FEATURES)]
    assert unexpected == []


def test_the_crop_is_much_smaller_than_a_whole_ct(node_extractor) -> None:
    """The equality above is not the trivial one: on lung2's 512 x 512 CT the node filters a
    box of less than a quarter of each slice."""
    hu, mask, spacing = read_case("lung2")
    margins = node_extractor.margin_voxels(spacing)
    occupied = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                for axis in range(3)]
    kept = [min(n, o[-1] - o[0] + 1 + 2 * m) for n, o, m in zip(hu.shape, occupied, margins)]
    assert kept[1] * kept[2] < 0.25 * hu.shape[1] * hu.shape[2]


def test_no_crop_is_bit_identical_to_pyradiomics() -> None:
    hu, mask, spacing = read_case("ibsi_sts_001")
    reference = pyradiomics_whole_image(hu, mask, spacing)
    extractor = RadiomicsExtractor(PROTOCOL, crop_margin_mm=0, workers=2)
    try:
        features = extractor.extract_arrays(hu, mask, spacing)
    finally:
        extractor.close()
    assert relative_differences(reference, features.names, features.values) == {}
