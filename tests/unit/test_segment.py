"""The shipped segmentation model through :class:`Segmenter`, and its failure modes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from anonymised import restore_uids
from dicomnode.analyse.segment import Segmenter, label_lesions, pick_device
from dicomnode.assemble import assemble
from dicomnode.config import Config
from dicomnode.errors import ModelError
from dicomnode.phantom import make_phantom_study
from dicomnode.types import Geometry, SeriesKey, Volume

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "segmentation"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TOTALSEG_CT = SHARED / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def bare_volume(hu: np.ndarray, spacing=(2.5, 1.5, 1.5)) -> Volume:
    geometry = Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), spacing)
    return Volume(hu=hu.astype(np.float32), geometry=geometry, key=SeriesKey("1", "2"),
                  sources=(), frame_of_reference_uid="1.2")


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.load(MODEL_DIR, device="cpu")


@pytest.fixture(scope="module")
def phantom_result(segmenter: Segmenter):
    phantom = make_phantom_study(10_004)  # reserved seed: never seen in training
    volume = assemble(phantom.datasets)
    return phantom, volume, segmenter.segment(volume)


# ----------------------------------------------------------------------------- the shipped model
def test_held_out_phantom_is_segmented_with_dice_at_least_0_8(phantom_result) -> None:
    phantom, _, result = phantom_result
    assert result.labels.shape == phantom.hu.shape and result.labels.dtype == np.uint16
    score = dice(result.labels > 0, phantom.lesion_mask)
    assert score >= 0.8, f"Dice {score:.3f}"


def test_lesions_are_numbered_by_size_with_centroids_in_patient_mm(phantom_result) -> None:
    phantom, volume, result = phantom_result
    assert len(result.lesions) == len(phantom.lesions)
    sizes = [lesion.voxel_count for lesion in result.lesions]
    assert sizes == sorted(sizes, reverse=True)
    assert [lesion.label for lesion in result.lesions] == list(range(1, len(sizes) + 1))
    affine = volume.geometry.affine()
    truth_mm = [affine @ np.append(np.argwhere(phantom.label_map == k).mean(axis=0), 1.0)
                for k in phantom.lesion_labels]
    for lesion in result.lesions:
        nearest = min(np.linalg.norm(np.asarray(lesion.centroid_mm) - t[:3]) for t in truth_mm)
        assert nearest < 4.0
        assert lesion.volume_ml == pytest.approx(
            lesion.voxel_count * volume.geometry.voxel_volume_mm3 / 1000)
        (z0, z1), (y0, y1), (x0, x1) = lesion.bbox
        assert (result.labels[z0:z1, y0:y1, x0:x1] == lesion.label).sum() == lesion.voxel_count
    assert result.model_name == segmenter_info_name()


def segmenter_info_name() -> str:
    return json.loads((MODEL_DIR / "manifest.json").read_text())["name"]


def test_uniform_water_has_no_lesion(segmenter: Segmenter) -> None:
    rng = np.random.default_rng(0)
    for hu in (np.zeros((40, 96, 96)), rng.normal(0, 15, size=(40, 96, 96))):
        assert segmenter.segment(bare_volume(hu)).lesions == ()


def test_min_lesion_ml_removes_small_components(segmenter: Segmenter, phantom_result) -> None:
    _, volume, result = phantom_result
    strict = Segmenter(segmenter.network, segmenter.manifest, device="cpu",
                       min_lesion_ml=max(lesion.volume_ml for lesion in result.lesions) + 1)
    assert strict.segment(volume).lesions == ()


def test_label_lesions_drops_small_components_and_orders_by_size() -> None:
    mask = np.zeros((10, 20, 20), dtype=bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels = 0.027 ml at 1 mm
    mask[5:9, 10:18, 10:18] = True  # 256 voxels
    mask[1:3, 15:19, 1:5] = True  # 32 voxels
    volume = bare_volume(np.zeros(mask.shape), spacing=(1.0, 1.0, 1.0))
    labels, lesions = label_lesions(mask, volume, min_lesion_ml=0.03)
    assert [lesion.voxel_count for lesion in lesions] == [256, 32]
    assert labels[2, 2, 2] == 0 and labels[6, 12, 12] == 1 and labels[2, 16, 2] == 2
    assert lesions[0].centroid_mm == pytest.approx((13.5, 13.5, 6.5))  # (x, y, z) patient mm
    assert lesions[0].bbox == ((5, 9), (10, 18), (10, 18))


@pytest.mark.skipif(not TOTALSEG_CT.exists(), reason=f"third-party CT {TOTALSEG_CT} not found")
def test_real_abdominal_ct_is_not_flooded_with_false_positives(segmenter: Segmenter) -> None:
    import pydicom

    datasets = restore_uids([pydicom.dcmread(p) for p in sorted(TOTALSEG_CT.iterdir())], "totalseg")
    for ds in datasets:  # anonymised with blank UIDs, which assembly refuses: give them back
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    volume = assemble(datasets)
    result = segmenter.segment(volume)
    found_ml = sum(lesion.volume_ml for lesion in result.lesions)
    body_ml = (volume.hu > -500).sum() * volume.geometry.voxel_volume_mm3 / 1000
    assert found_ml < 0.01 * body_ml, f"{found_ml:.1f} ml of {body_ml:.0f} ml called lesion"


# ----------------------------------------------------------------------------- device and loading
def test_auto_device_is_cuda_only_when_available(segmenter: Segmenter) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert segmenter.device.type == "cpu"
    assert next(segmenter.network.parameters()).device.type == "cpu"


def test_from_config_loads_the_configured_model() -> None:
    config = Config()
    loaded = Segmenter.from_config(config.segmentation, config)
    assert loaded.info.name == segmenter_info_name()
    assert loaded.min_lesion_ml == config.segmentation.min_lesion_ml


def test_missing_model_dir_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="manifest.json not found"):
        Segmenter.load(tmp_path / "nowhere")


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    for name in ("manifest.json", "weights.pt"):
        shutil.copy(MODEL_DIR / name, target / name)
    return target


def test_missing_weights_are_a_model_error(model_copy: Path) -> None:
    (model_copy / "weights.pt").unlink()
    with pytest.raises(ModelError, match="weights .* not found"):
        Segmenter.load(model_copy)


def test_weights_that_do_not_belong_to_the_manifest_are_refused(model_copy: Path) -> None:
    with (model_copy / "weights.pt").open("ab") as f:
        f.write(b"tampered")
    with pytest.raises(ModelError, match="SHA-256 differs"):
        Segmenter.load(model_copy)


def test_manifest_architecture_that_does_not_fit_the_weights_is_refused(model_copy: Path) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["architecture"]["params"]["channels"] = [8, 16, 32, 64, 128]
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="do not match"):
        Segmenter.load(model_copy)


def test_malformed_manifest_is_refused(model_copy: Path) -> None:
    manifest = json.loads((model_copy / "manifest.json").read_text())
    del manifest["preprocessing"]
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="malformed"):
        Segmenter.load(model_copy)
