"""The synthetic CT phantom: deterministic, anatomically plausible, valid DICOM, known lesions."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from scipy import ndimage

from dicomnode.assemble import assemble
from dicomnode.phantom import (
    LESION_DIAMETER_MM,
    Phantom,
    insert_lesions,
    make_phantom_study,
    soft_tissue_region,
    write_study,
)

SEED = 10_000  # seeds >= 10000 are reserved for tests and the demo


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom_study(SEED)


def test_same_seed_same_study_other_seed_other_study(phantom: Phantom) -> None:
    again = make_phantom_study(SEED)
    np.testing.assert_array_equal(again.hu, phantom.hu)
    assert [d.SOPInstanceUID for d in again.datasets] == [d.SOPInstanceUID for d in phantom.datasets]
    other = make_phantom_study(SEED + 1)
    assert not np.array_equal(other.hu, phantom.hu)
    assert other.datasets[0].StudyInstanceUID != phantom.datasets[0].StudyInstanceUID


def test_arrays_and_labels_agree(phantom: Phantom) -> None:
    assert phantom.hu.shape == (48, 128, 128) and phantom.hu.dtype == np.float32
    assert len(phantom.datasets) == 48
    assert phantom.lesion_labels == (1, 2)
    assert set(np.unique(phantom.label_map)) == {0, 1, 2}
    np.testing.assert_array_equal(phantom.lesion_mask, phantom.label_map > 0)
    for lesion in phantom.lesions:
        assert lesion.voxel_count == int((phantom.label_map == lesion.label).sum())


def test_lesions_are_1p5_to_4_cm_and_stand_out_from_their_surroundings() -> None:
    for seed in (10_000, 10_001, 10_002, 10_003):
        p = make_phantom_study(seed)
        voxel_mm3 = float(np.prod(p.spacing))
        for lesion in p.lesions:
            assert LESION_DIAMETER_MM[0] <= lesion.diameter_mm <= LESION_DIAMETER_MM[1]
            inside = p.label_map == lesion.label
            # Diameter of the sphere of equal volume: the modulation changes it a little.
            equivalent = 2 * (3 * inside.sum() * voxel_mm3 / (4 * np.pi)) ** (1 / 3)
            assert 0.6 * LESION_DIAMETER_MM[0] < equivalent < 1.3 * LESION_DIAMETER_MM[1]
            shell = ndimage.binary_dilation(inside, iterations=3) & ~ndimage.binary_dilation(
                inside, iterations=1) & ~p.lesion_mask
            contrast = abs(np.median(p.hu[inside]) - np.median(p.hu[shell]))
            assert contrast > 25, (seed, lesion)


def test_anatomy_has_air_fat_soft_tissue_bone_and_lungs_at_the_top(phantom: Phantom) -> None:
    hu = phantom.hu
    assert np.median(hu[:, :5, :5]) < -950  # air outside the body
    centre = hu[:, 32:96, 32:96]
    assert (centre > 400).any()  # bone
    assert ((centre > -130) & (centre < -70)).mean() > 0.02  # fat
    assert ((centre > 80) & (centre < 140)).mean() > 0.05  # liver, spleen
    lung = lambda k: ((hu[k] > -900) & (hu[k] < -780)).mean()  # noqa: E731
    assert lung(-1) > 0.1 and lung(0) < 0.03


def test_noise_is_in_range_and_spatially_correlated(phantom: Phantom) -> None:
    # A patch of water-like anatomy does not exist everywhere: use the high-pass residual
    # of the whole body, where the anatomy is piecewise constant.
    body = ndimage.binary_erosion(phantom.hu > -500, iterations=3)
    residual = phantom.hu - ndimage.median_filter(phantom.hu, size=(1, 5, 5))
    values = residual[body & (np.abs(residual) < 100)]
    assert 5 < values.std() < 25
    inner = body[:, 1:, :] & body[:, :-1, :]
    r = np.corrcoef(residual[:, 1:, :][inner], residual[:, :-1, :][inner])[0, 1]
    assert r > 0.2


def test_datasets_carry_the_modules_a_seg_needs(phantom: Phantom) -> None:
    ds = phantom.datasets[0]
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "Manufacturer", "KVP",
                    "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient"):
        assert keyword in ds, keyword
    assert ds.PatientID == f"PHANTOM-{SEED}" and str(ds.PatientName) == "Phantom^Demo"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 1
    assert [d.InstanceNumber for d in phantom.datasets] == list(range(1, 49))


def test_chosen_identity_is_used() -> None:
    p = make_phantom_study(SEED, shape=(12, 64, 64), n_lesions=0, patient_name="Doe^Jane",
                           patient_id="X1", study_uid="1.2.3.4")
    assert {d.StudyInstanceUID for d in p.datasets} == {"1.2.3.4"}
    assert str(p.datasets[0].PatientName) == "Doe^Jane" and p.datasets[0].PatientID == "X1"
    assert p.lesions == () and not p.lesion_mask.any()


def test_written_study_reads_back_to_the_same_volume(phantom: Phantom, tmp_path) -> None:
    import pydicom

    paths = write_study(phantom, tmp_path / "ct")
    assert len(paths) == 48 and all(p.suffix == ".dcm" for p in paths)
    read = [pydicom.dcmread(p) for p in paths]
    assert read[0].file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    volume = assemble(read)
    np.testing.assert_array_equal(volume.hu, phantom.hu)
    assert volume.geometry == phantom.geometry


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_finds_no_error(phantom: Phantom, tmp_path) -> None:
    path = write_study(phantom, tmp_path)[0]
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert "Error" not in run.stderr + run.stdout, run.stderr


def test_highdicom_builds_a_seg_on_the_phantom(phantom: Phantom) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=list(phantom.datasets), pixel_array=phantom.lesion_mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=90,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="dicomnode",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    assert seg.NumberOfFrames == int(phantom.lesion_mask.any(axis=(1, 2)).sum())


# ----------------------------------------------------------------------------- insert_lesions
@pytest.fixture(scope="module")
def background() -> tuple[np.ndarray, tuple[float, float, float]]:
    """A lesion-free phantom stands in for a real CT volume."""
    p = make_phantom_study(10_010, n_lesions=0)
    return p.hu, p.spacing


def test_insert_lesions_adds_visible_lesions_in_soft_tissue(background) -> None:
    hu, spacing = background
    original = hu.copy()
    out, mask = insert_lesions(hu, spacing, np.random.default_rng(3), n_lesions=2)
    np.testing.assert_array_equal(hu, original)  # the input is left alone
    assert out.dtype == np.float32 and mask.dtype == bool
    labels, n = ndimage.label(mask)
    assert n == 2
    region = soft_tissue_region(hu, spacing)
    for k in range(1, n + 1):
        lesion = labels == k
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(lesion))
        assert region[centre]
        assert np.abs(out[lesion] - hu[lesion]).mean() > 20
    np.testing.assert_array_equal(out[~ndimage.binary_dilation(mask, iterations=2)],
                                  hu[~ndimage.binary_dilation(mask, iterations=2)])


def test_insert_lesions_is_deterministic_and_honours_the_region(background) -> None:
    hu, spacing = background
    region = np.zeros(hu.shape, dtype=bool)
    region[10:40, 40:90, 30:70] = True
    a = insert_lesions(hu, spacing, np.random.default_rng(5), n_lesions=1, region_mask=region)
    b = insert_lesions(hu, spacing, np.random.default_rng(5), n_lesions=1, region_mask=region)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].any() and not (a[1] & ~region).any()


def test_insert_lesions_without_room_inserts_nothing(background) -> None:
    hu, spacing = background
    out, mask = insert_lesions(hu, spacing, np.random.default_rng(0), n_lesions=3,
                               region_mask=np.zeros(hu.shape, dtype=bool))
    assert not mask.any()
    np.testing.assert_array_equal(out, hu)
