"""The fast protocol runner against pyradiomics' own functions: same bins, same bounding box,
same refusals, and every feature bit-identical to ``RadiomicsFeatureExtractor.execute``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from radiomics import featureextractor, imageoperations

from dicomnode.analyse.radiomics import RadiomicsExtractor, _crop_box
from dicomnode.analyse.radiomics_engine import ProtocolRunner, check_mask, discretise
from dicomnode.config import Config, ConfigError, RadiomicsConfig, from_mapping

PROTOCOL = Path(__file__).resolve().parents[2] / "models" / "radiomics" / "tmb_protocol.yaml"


def lesion_case(seed: int = 3, shape=(16, 40, 44), spacing_xyz=(0.9, 0.9, 2.5)):
    """A noisy soft-tissue ellipsoid with a fat rim, as SimpleITK images (image float64)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    inside = ((z - 8) / 5.0) ** 2 + ((y - 19) / 11.0) ** 2 + ((x - 23) / 9.0) ** 2 <= 1
    hu = rng.normal(30, 40, size=shape) - 120 * (rng.random(shape) < 0.1)
    hu = np.where(inside, hu + 40, hu - 60).round()
    image = sitk.GetImageFromArray(hu.astype(np.float64))
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    for item in (image, mask):
        item.SetSpacing(spacing_xyz)
    return image, mask


@pytest.fixture(scope="module")
def pyradiomics_extractor() -> featureextractor.RadiomicsFeatureExtractor:
    return featureextractor.RadiomicsFeatureExtractor(str(PROTOCOL))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discretise_equals_pyradiomics_bin_image(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 300, size=(9, 11, 13)).round(seed)  # integers, then decimals
    mask = rng.random(values.shape) < 0.4
    expected, _ = imageoperations.binImage(values, mask, binWidth=20)
    binned, levels = discretise(values, mask, 20)
    assert np.array_equal(binned, expected)
    assert np.array_equal(levels, np.unique(expected[mask]))


def test_discretise_a_flat_region_gives_one_bin_like_pyradiomics() -> None:
    values = np.full((3, 4, 5), 37.0)
    mask = np.zeros(values.shape, dtype=bool)
    mask[1, 1:3, 1:4] = True
    expected, _ = imageoperations.binImage(values, mask, binWidth=20)
    binned, levels = discretise(values, mask, 20)
    assert np.array_equal(binned, expected)
    assert levels.tolist() == [1]


@pytest.mark.parametrize(
    "voxels, settings",
    [
        ([(2, 3, 4), (5, 6, 9), (3, 3, 3)], {}),
        ([(2, 3, 4), (2, 6, 9)], {}),  # one slice: two dimensions, enough by default
        ([(2, 3, 4), (2, 6, 9)], {"minimumROIDimensions": 3}),
        ([(2, 3, 4)], {}),  # one voxel
        ([(2, 3, 4), (2, 3, 9)], {}),  # a line
        ([(1, 1, 1), (4, 5, 6), (2, 2, 2)], {"minimumROISize": 3}),
        ([], {}),  # no label
    ],
)
def test_check_mask_matches_pyradiomics(voxels, settings) -> None:
    array = np.zeros((7, 8, 10), dtype=np.uint8)
    for voxel in voxels:
        array[voxel] = 1
    mask = sitk.GetImageFromArray(array)
    image = sitk.GetImageFromArray(np.zeros(array.shape))
    try:
        expected, _ = imageoperations.checkMask(image, mask, **settings)
    except ValueError as refusal:
        with pytest.raises(ValueError) as ours:
            check_mask(mask, settings)
        assert str(ours.value).split("(")[0] == str(refusal).split("(")[0]
    else:
        assert check_mask(mask, settings).tolist() == list(expected)


def pyradiomics_features(extractor, image, mask) -> dict[str, float]:
    raw = extractor.execute(image, mask)
    return {k: float(v) for k, v in raw.items() if not k.startswith("diagnostics_")}


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_is_bit_identical_to_pyradiomics(pyradiomics_extractor, workers: int) -> None:
    image, mask = lesion_case()
    expected = pyradiomics_features(pyradiomics_extractor, image, mask)
    runner = ProtocolRunner(pyradiomics_extractor, workers=workers, fast_shape=False)
    try:
        got = runner.execute(image, mask)
        if workers > 1:
            assert len(runner.worker_pids()) == workers
    finally:
        runner.close()
    assert len(expected) == 1037
    assert got.keys() == expected.keys()
    differ = [k for k in expected if got[k] != expected[k] and not np.isnan(expected[k])]
    assert differ == []


def test_fast_shape_changes_only_mesh_surface_and_volume_features(pyradiomics_extractor) -> None:
    image, mask = lesion_case(seed=4)
    expected = pyradiomics_features(pyradiomics_extractor, image, mask)
    got = ProtocolRunner(pyradiomics_extractor).execute(image, mask)
    differ = {k for k in expected if got[k] != expected[k]}
    # Diameters, axis lengths and voxel volume are pyradiomics' bits; the mesh's surface and
    # volume (and the ratios made of them) are sums in another order.
    assert differ <= {
        f"original_shape_{name}" for name in (
            "MeshVolume", "SurfaceArea", "SurfaceVolumeRatio", "Sphericity", "Compactness1",
            "Compactness2", "SphericalDisproportion",
        )
    }
    for name in differ:
        assert got[name] == pytest.approx(expected[name], rel=1e-10), name


def test_runner_refuses_what_pyradiomics_refuses(pyradiomics_extractor) -> None:
    image, _ = lesion_case()
    line = np.zeros((16, 40, 44), dtype=np.uint8)
    line[5, 10, 3:20] = 1
    mask = sitk.GetImageFromArray(line)
    mask.SetSpacing(image.GetSpacing())
    with pytest.raises(ValueError, match="too few dimensions"):
        pyradiomics_extractor.execute(image, mask)
    with pytest.raises(ValueError, match="too few dimensions"):
        ProtocolRunner(pyradiomics_extractor).execute(image, mask)


def test_automatic_margin_follows_the_protocol() -> None:
    extractor = RadiomicsExtractor(PROTOCOL)
    # Largest LoG sigma 3 mm, 16 sigmas: 48 mm; coif1 (6 taps), one level: 5 + 1 voxels.
    assert extractor.margin_voxels((3.0, 1.0, 0.7)) == (16, 48, 69)
    assert extractor.margin_voxels((60.0, 60.0, 60.0)) == (6, 6, 6)
    fixed = RadiomicsExtractor(PROTOCOL, crop_margin_mm=20)
    assert fixed.margin_voxels((3.0, 1.0, 0.7)) == (7, 20, 29)


def test_crop_takes_the_whole_axis_where_the_margin_reaches_an_edge() -> None:
    lesion = np.zeros((30, 60, 60), dtype=bool)
    lesion[10:14, 3:9, 25:31] = True
    box = _crop_box(lesion, (5, 5, 5), (4, 4, 4))
    # z and x stay inside the image; y would reach row 0, so it keeps every row (wavelets
    # wrap around).
    assert box == (slice(5, 19), slice(0, 60), slice(20, 36))


def test_crop_margin_and_workers_are_validated_with_their_key() -> None:
    assert RadiomicsConfig().crop_margin_mm == "auto"
    assert from_mapping({"radiomics": {"crop_margin_mm": 30}}, environ={}).radiomics.crop_margin_mm == "30"
    for bad in ("-1", "wide", "nan"):
        with pytest.raises(ConfigError, match="radiomics.crop_margin_mm"):
            from_mapping({"radiomics": {"crop_margin_mm": bad}}, environ={})
    with pytest.raises(ConfigError, match="radiomics.workers"):
        from_mapping({"radiomics": {"workers": -1}}, environ={})
    assert Config().radiomics.worker_processes >= 1
    assert RadiomicsConfig(workers=3).worker_processes == 3


def test_a_killed_worker_fails_the_lesion_with_a_reason_and_the_next_one_works(
    pyradiomics_extractor,
) -> None:
    image, mask = lesion_case()
    runner = ProtocolRunner(pyradiomics_extractor, workers=2)
    try:
        expected = runner.execute(image, mask)
        for pid in runner.worker_pids():
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="worker process died"):
            runner.execute(image, mask)
        assert runner.execute(image, mask) == expected
    finally:
        runner.close()


OWNER = """
import sys, time
from dicomnode.analyse.radiomics_engine import ProtocolRunner
from radiomics import featureextractor
runner = ProtocolRunner(featureextractor.RadiomicsFeatureExtractor(sys.argv[1]), workers=2)
runner.warm_up()
while len(runner.worker_pids()) < 2:
    time.sleep(0.1)
print(*runner.worker_pids(), flush=True)
time.sleep(120)
"""


def test_workers_end_when_the_node_is_killed(tmp_path) -> None:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    owner = subprocess.Popen([sys.executable, str(script), str(PROTOCOL)], stdout=subprocess.PIPE,
                             text=True)
    try:
        workers = [int(pid) for pid in owner.stdout.readline().split()]
        assert len(workers) == 2
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended: only its parent has not collected it yet.
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
