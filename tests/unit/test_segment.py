"""The shipped segmentation model through :class:`Segmenter`, and its failure modes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from anonymised import restore_uids
from dicomnode.analyse.segment import LesionSource, Segmenter, label_lesions, pick_device
from dicomnode.assemble import assemble
from dicomnode.config import Config, SegmentationConfig
from dicomnode.errors import ModelError
from dicomnode.types import Geometry, SeriesKey, Volume
from sarcoma import COHORT, HELD_OUT, gtv, require_cohort

CPU = SegmentationConfig(device="cpu")
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
    return Segmenter.load(MODEL_DIR, CPU)


def held_out_patient(case_id: str) -> tuple[Volume, np.ndarray]:
    """A real sarcoma CT assembled as the node does, and the clinician's GTV on its grid."""
    truth, _ = gtv(case_id)
    images = sorted((COHORT / case_id / "CT" / "image").iterdir())
    volume = assemble([pydicom.dcmread(p) for p in images])
    assert volume.shape == truth.shape
    return volume, truth


@pytest.fixture(scope="module")
def patient_results(segmenter: Segmenter):
    """The shipped model on every patient it was validated on (never trained on)."""
    require_cohort()
    results = {}
    for case_id in HELD_OUT:
        volume, truth = held_out_patient(case_id)
        results[case_id] = (volume, truth, segmenter.segment(volume))
    return results


# ----------------------------------------------------------------------------- the shipped model
def test_on_patients_it_never_saw_the_model_meets_its_aims(patient_results):
    """Issue 10's aims on the validation patients: median Dice >= 0.7, the tumour found in
    every patient, at most one false lesion per patient (the node's own post-processing)."""
    scores, false_lesions = [], []
    for case_id, (_, truth, result) in patient_results.items():
        assert result.labels.shape == truth.shape and result.labels.dtype == np.uint16
        scores.append(dice(result.labels > 0, truth))
        hits = set(np.unique(result.labels[truth & (result.labels > 0)])) - {0}
        assert hits, f"{case_id}: the tumour was not found"
        false_lesions.append(len(result.lesions) - len(hits))
    print("Dice per patient:", dict(zip(patient_results, np.round(scores, 3))))
    assert np.median(scores) >= 0.7, scores
    assert max(false_lesions) <= 1, dict(zip(patient_results, false_lesions))


def test_lesions_are_numbered_by_size_with_confidence_and_centroids_in_patient_mm(patient_results):
    volume, truth, result = patient_results["STS_006"]
    sizes = [lesion.voxel_count for lesion in result.lesions]
    assert sizes == sorted(sizes, reverse=True)
    assert [lesion.label for lesion in result.lesions] == list(range(1, len(sizes) + 1))
    minimum = Segmenter.load(MODEL_DIR, CPU).settings.min_confidence
    affine = volume.geometry.affine()
    for lesion in result.lesions:
        assert minimum <= lesion.confidence <= 1.0
        own = np.argwhere(result.labels == lesion.label)
        assert np.allclose(lesion.centroid_mm, (affine @ np.append(own.mean(axis=0), 1.0))[:3])
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


def test_min_lesion_ml_and_min_confidence_remove_lesions(segmenter: Segmenter, patient_results):
    volume, _, result = patient_results["STS_006"]
    largest = max(lesion.volume_ml for lesion in result.lesions)
    for change in ({"min_lesion_ml": largest + 1}, {"min_confidence": 0.999}):
        strict = Segmenter(segmenter.network, segmenter.manifest, replace(CPU, **change))
        assert strict.segment(volume).lesions == (), change


class AlwaysLesion(torch.nn.Module):
    """A stand-in network that calls every voxel lesion (logit +5): only post-processing is left."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, 5.0)


def test_body_only_keeps_lesions_inside_the_body(segmenter: Segmenter) -> None:
    hu = np.full((24, 64, 64), -1000.0)
    y, x = np.ogrid[:64, :64]
    hu[:, (y - 32) ** 2 + (x - 32) ** 2 < 20**2] = 40.0  # a limb in air
    volume = bare_volume(hu)
    inside = Segmenter(AlwaysLesion(), segmenter.manifest, CPU).segment(volume)
    assert len(inside.lesions) == 1
    assert np.array_equal(inside.labels > 0, hu > -500)
    everywhere = Segmenter(AlwaysLesion(), segmenter.manifest, replace(CPU, body_only=False))
    assert (everywhere.segment(volume).labels > 0).all()


def test_max_lesions_keeps_the_most_confident() -> None:
    mask = np.zeros((10, 20, 20), dtype=bool)
    probability = np.zeros(mask.shape)
    mask[5:9, 10:18, 10:18] = True  # the largest, least confident
    probability[5:9, 10:18, 10:18] = 0.6
    mask[1:3, 15:19, 1:5] = True
    probability[1:3, 15:19, 1:5] = 0.95
    mask[1:4, 1:4, 1:4] = True
    probability[1:4, 1:4, 1:4] = 0.8
    volume = bare_volume(np.zeros(mask.shape), spacing=(1.0, 1.0, 1.0))
    labels, lesions = label_lesions(mask, volume, 0.0, probability=probability, max_lesions=2)
    assert [(le.voxel_count, le.confidence) for le in lesions] == [(32, 0.95), (27, 0.8)]
    assert labels[6, 12, 12] == 0 and labels[2, 16, 2] == 1 and labels[2, 2, 2] == 2
    _, confident = label_lesions(mask, volume, 0.0, probability=probability, min_confidence=0.7)
    assert [le.confidence for le in confident] == [0.95, 0.8]
    _, drawn = label_lesions(mask, volume, 0.0)
    assert [le.confidence for le in drawn] == [None, None, None]


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


def full_volume_reference(mask, volume, probability, min_ml, min_confidence, max_lesions):
    """label_lesions as it was before it searched the foreground's box only: the whole grid."""
    from scipy import ndimage

    from dicomnode.analyse.segment import describe_lesions

    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    sums = np.bincount(components.ravel(), weights=probability.ravel(), minlength=n + 1)[1:]
    confidence = sums / np.maximum(counts, 1)
    ml = counts * volume.geometry.voxel_volume_mm3 / 1000.0
    kept = np.flatnonzero((ml >= min_ml) & (confidence >= min_confidence))
    kept = kept[np.argsort(-confidence[kept], kind="stable")][:max_lesions or None]
    kept = kept[np.argsort(-counts[kept], kind="stable")]
    relabel = np.zeros(n + 1, dtype=np.uint16)
    relabel[kept + 1] = np.arange(1, len(kept) + 1)
    labels = relabel[components]
    return labels, describe_lesions(labels, volume, [round(float(confidence[c]), 4) for c in kept])


@pytest.mark.parametrize("seed", range(6))
def test_label_lesions_in_the_foreground_box_equals_the_whole_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (24, 40, 36)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(0, 6)):  # blobs anywhere, some touching the grid's edges
        low = rng.integers(0, shape, 3)
        high = np.minimum(low + rng.integers(1, 9, 3), shape)
        mask[tuple(slice(a, b) for a, b in zip(low, high))] = True
    mask &= rng.random(shape) < 0.9
    probability = np.where(mask, rng.random(shape), 0.0)
    volume = bare_volume(np.zeros(shape), spacing=(1.0, 1.0, 1.0))
    for settings in [(0.0, 0.0, 0), (0.01, 0.4, 0), (0.0, 0.0, 2)]:
        labels, lesions = label_lesions(mask, volume, settings[0], probability=probability,
                                        min_confidence=settings[1], max_lesions=settings[2])
        want_labels, want = full_volume_reference(mask, volume, probability, *settings)
        assert np.array_equal(labels, want_labels) and lesions == want


def test_body_mask_on_chosen_slices_equals_the_whole_mask_there() -> None:
    from dicomnode.analyse.regional import body_mask

    rng = np.random.default_rng(3)
    hu = np.full((12, 40, 40), -1000.0)
    hu[2:10, 5:35, 5:35] = 40.0  # the body, with a hole (a lung) and noise outside it
    hu[4:8, 15:25, 15:25] = -800.0
    hu[rng.random(hu.shape) < 0.02] = 100.0
    whole = body_mask(hu, -500.0)
    chosen = np.array([0, 3, 5, 11])
    part = body_mask(hu, -500.0, slices=chosen)
    assert np.array_equal(part[chosen], whole[chosen]) and whole[5, 20, 20]
    assert not np.delete(part, chosen, axis=0).any()


@pytest.mark.skipif(not TOTALSEG_CT.exists(), reason=f"third-party CT {TOTALSEG_CT} not found")
@pytest.mark.xfail(strict=True, reason=(
    "known limitation, recorded in models/segmentation/MODEL_CARD.md: the sarcoma model was "
    "trained on CT cropped around limb and trunk tumours; on a whole abdominal CT it calls a "
    "583 ml region lesion (confidence 0.96). strict: the day it passes, this mark must go."))
def test_real_abdominal_ct_is_not_flooded_with_false_positives(segmenter: Segmenter) -> None:
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
    loaded = Segmenter.from_config(config.segmentation)
    assert loaded.info.name == segmenter_info_name()
    assert loaded.settings == config.segmentation


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


# ----------------------------------------------------------------------------- the seam
def test_a_segmenter_plugged_in_by_configuration_feeds_the_pipeline() -> None:
    from dicomnode.config import from_mapping
    from dicomnode.pipeline import Pipeline

    config = from_mapping({"segmentation": {"plugin": "segment_plugin:make"}})
    pipeline = Pipeline.from_config(config)
    assert isinstance(pipeline.segmenter, LesionSource)
    assert pipeline.segmenter.info.name == "dense-things"
    hu = np.zeros((12, 32, 32))
    hu[4:8, 10:20, 10:20] = 2000.0
    analysis, _ = pipeline.analyse(bare_volume(hu, spacing=(2.0, 1.0, 1.0)))
    assert [lesion.voxel_count for lesion in analysis.segmentation.lesions] == [400]
    assert analysis.models[0].name == "dense-things"


@pytest.mark.parametrize(("plugin", "message"), [
    ("segment_plugin:missing", "cannot be loaded"),
    ("no_such_module_here:make", "cannot be loaded"),
    ("segment_plugin:make_nothing", "returned object, which has no info"),
])
def test_a_broken_plugin_is_a_model_error(plugin: str, message: str) -> None:
    from dicomnode.analyse.segment import make_lesion_source
    from dicomnode.config import from_mapping

    config = from_mapping({"segmentation": {"plugin": plugin}})
    with pytest.raises(ModelError, match=message):
        make_lesion_source(config.segmentation, config)
