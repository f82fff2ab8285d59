"""Volume assembly: real third-party CT, and every refusal on synthetic series."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from anonymised import restore_uids
from dicomfiles import enhanced_ct
from dicomnode.assemble import assemble, stack_gaps
from dicomnode.config import AssemblyConfig
from dicomnode.errors import AssemblyError, InputRejected
from dicomnode.phantom import Phantom, make_phantom_study
from dicomnode.types import SeriesKey

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
IBSI_CT = SHARED / "ibsi_sts_001" / "dicom" / "CT" / "image"
IBSI_NIFTI = SHARED / "ibsi_sts_001" / "nifti" / "CT_image.nii.gz"
TOTALSEG_CT = SHARED / "totalsegmentator" / "tests" / "reference_files" / "example_ct_dicom"
DCMQI_3SLICE = SHARED / "dcmqi" / "data" / "segmentations" / "ct-3slice"


def needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.exists(),
                              reason=f"third-party test data {path} not found (see ../shared/data)")


def read_folder(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    # Small and lesion-free: these tests are about geometry, not anatomy. Seed >= 10000.
    return make_phantom_study(10_500, shape=(14, 48, 40), spacing=(2.5, 4.0, 4.5), n_lesions=0)


@pytest.fixture
def series(phantom: Phantom) -> list[Dataset]:
    """Private copies of the phantom's slices that a test may change."""
    return [copy.deepcopy(ds) for ds in phantom.datasets]


def shift(ds: Dataset, offset_mm: tuple[float, float, float]) -> None:
    ds.ImagePositionPatient = [float(p) + o for p, o in zip(ds.ImagePositionPatient, offset_mm)]


# ----------------------------------------------------------------------------- real CT
@needs(IBSI_CT)
def test_ibsi_sts_ct_assembles_with_its_spacing_and_matches_the_ibsi_nifti() -> None:
    volume = assemble(read_folder(IBSI_CT))
    assert volume.shape == (59, 202, 198)
    assert volume.geometry.spacing == pytest.approx((3.27, 0.976562, 0.976562), abs=1e-4)
    assert volume.geometry.slice_direction == pytest.approx((0, 0, 1))
    assert volume.hu.dtype == np.float32
    if IBSI_NIFTI.exists():  # the IBSI team's own conversion of the same series
        import SimpleITK as sitk

        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(IBSI_NIFTI)))
        np.testing.assert_array_equal(volume.hu, reference.astype(np.float32))


@needs(TOTALSEG_CT)
def test_jpeg2000_ct_assembles_sorted_by_position() -> None:
    # The example was anonymised with blank dataset UIDs (refused: see below); give them back.
    datasets = restore_uids(read_folder(TOTALSEG_CT), "totalseg")
    volume = assemble(datasets)
    assert volume.shape == (20, 512, 512)
    assert volume.geometry.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    # Instance numbers grow toward the feet: sorting by position reverses them.
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.sources]
    assert z == sorted(z)
    assert volume.geometry.origin[2] == pytest.approx(min(z))
    assert volume.hu.min() == pytest.approx(-1024.0)
    assert 900 < volume.hu.max() < 3100


@needs(DCMQI_3SLICE)
def test_three_slice_ct_is_refused_as_too_few_slices() -> None:
    with pytest.raises(AssemblyError, match=r"too few slices: found 3, at least 10"):
        assemble(read_folder(DCMQI_3SLICE))


# ----------------------------------------------------------------------------- order and HU
def test_shuffled_slices_are_sorted_along_the_normal(phantom: Phantom, series) -> None:
    shuffled = [series[i] for i in np.random.default_rng(0).permutation(len(series))]
    volume = assemble(shuffled)
    np.testing.assert_array_equal(volume.hu, phantom.hu)
    assert volume.geometry.origin == pytest.approx(phantom.geometry.origin)
    assert volume.geometry.spacing == pytest.approx(phantom.geometry.spacing)
    assert [ds.InstanceNumber for ds in volume.sources] == list(range(1, len(series) + 1))
    assert volume.key == SeriesKey(series[0].StudyInstanceUID, series[0].SeriesInstanceUID)
    assert volume.frame_of_reference_uid == series[0].FrameOfReferenceUID


def test_feet_first_stack_along_a_negative_normal_is_sorted_by_projection(series) -> None:
    # Flip the row direction: the normal now points to the feet, so the stack order reverses.
    for ds in series:
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
    volume = assemble(series)
    assert volume.geometry.slice_direction == pytest.approx((0, 0, -1))
    assert volume.sources[0].InstanceNumber == len(series)


def test_hu_is_stored_value_times_slope_plus_intercept(phantom: Phantom, series) -> None:
    for ds in series:
        ds.RescaleSlope = "0.5"
        ds.RescaleIntercept = "-1000"
    series[3].RescaleSlope = "2"  # per-slice rescale is allowed
    volume = assemble(series)
    stored = phantom.hu + 1024  # the phantom stores HU + 1024
    expected = stored * 0.5 - 1000
    expected[3] = stored[3] * 2 - 1000
    np.testing.assert_allclose(volume.hu, expected)


def test_explicit_key_is_used(series) -> None:
    key = SeriesKey("1.2.3", "4.5.6")
    assert assemble(series, key=key).key == key


# ----------------------------------------------------------------------------- refusals
def test_localizer_is_refused(series) -> None:
    series[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(AssemblyError, match="localizer"):
        assemble(series)


def test_single_slice_series_is_refused_as_not_a_volume(series) -> None:
    with pytest.raises(AssemblyError, match="single slice"):
        assemble(series[:1])


def test_too_few_slices_message_says_found_and_minimum(series) -> None:
    with pytest.raises(AssemblyError, match=r"found 14, at least 20"):
        assemble(series, AssemblyConfig(min_slices=20))


def test_assembly_error_is_an_input_rejection(series) -> None:
    with pytest.raises(InputRejected):
        assemble(series[:2])


def test_mixed_orientations_are_refused(series) -> None:
    angle = np.radians(10)
    series[5].ImageOrientationPatient = [np.cos(angle), np.sin(angle), 0,
                                         -np.sin(angle), np.cos(angle), 0]
    with pytest.raises(AssemblyError, match="mixed orientations"):
        assemble(series)


def test_orientation_within_tolerance_is_accepted(series) -> None:
    angle = np.radians(0.2)
    series[5].ImageOrientationPatient = [np.cos(angle), np.sin(angle), 0,
                                         -np.sin(angle), np.cos(angle), 0]
    assert assemble(series).shape[0] == len(series)


@pytest.mark.parametrize(
    ("keyword", "value", "message"),
    [
        ("SeriesInstanceUID", generate_uid(), "different series"),
        ("StudyInstanceUID", generate_uid(), "different study"),
        ("FrameOfReferenceUID", generate_uid(), "different frame of reference"),
        ("PixelSpacing", [4.0, 4.0], "inconsistent pixel spacing"),
        ("Modality", "MR", "modality is MR, not CT"),
    ],
)
def test_inconsistent_series_are_refused(series, keyword, value, message) -> None:
    setattr(series[4], keyword, value)
    with pytest.raises(AssemblyError, match=message):
        assemble(series)


def test_inconsistent_matrix_is_refused(series) -> None:
    series[2].Rows = 40
    series[2].PixelData = series[2].PixelData[: 40 * 40 * 2]
    with pytest.raises(AssemblyError, match="different matrix sizes"):
        assemble(series)


def test_missing_pixel_data_is_refused(series) -> None:
    del series[6].PixelData
    with pytest.raises(AssemblyError, match="no pixel data"):
        assemble(series)


def test_rgb_image_is_refused(series) -> None:
    series[1].PhotometricInterpretation = "RGB"
    series[1].SamplesPerPixel = 3
    with pytest.raises(AssemblyError, match="colour image"):
        assemble(series)


def test_duplicate_positions_are_refused(series) -> None:
    twin = copy.deepcopy(series[3])
    twin.SOPInstanceUID = generate_uid()
    with pytest.raises(AssemblyError, match="duplicate slice positions"):
        assemble([*series, twin])


def test_gantry_tilt_is_refused(series) -> None:
    # Each slice moves 2.5 mm along z and 0.67 mm along y: a 15 degree sheared stack.
    for k, ds in enumerate(series):
        shift(ds, (0.0, k * 2.5 * np.tan(np.radians(15)), 0.0))
    with pytest.raises(AssemblyError, match=r"gantry tilt: the slices advance 15\.0 degrees"):
        assemble(series)


def test_irregular_spacing_is_refused(series) -> None:
    shift(series[7], (0.0, 0.0, 1.0))
    with pytest.raises(AssemblyError, match="irregular slice spacing"):
        assemble(series)


def test_gap_is_reported_distinctly_from_irregular_spacing(series) -> None:
    del series[6]
    with pytest.raises(AssemblyError, match=r"gap in the slice stack: 1 slice\(s\) missing") as err:
        assemble(series)
    assert "irregular" not in str(err.value)


def test_gap_is_accepted_with_a_warning_when_allowed(phantom: Phantom, series) -> None:
    del series[6]
    volume = assemble(series, allow_gaps=True)
    assert volume.shape[0] == len(series)
    assert volume.geometry.spacing[0] == pytest.approx(2.5)
    np.testing.assert_array_equal(volume.hu, np.delete(phantom.hu, 6, axis=0))
    assert len(volume.warnings) == 1 and "slice gap" in volume.warnings[0]


# ----------------------------------------------------------------------------- stack_gaps
def test_stack_gaps_on_an_even_stack() -> None:
    check = stack_gaps([5.0, 0.0, 2.5, 7.5], tolerance=0.1)
    assert check.complete and check.median_spacing == pytest.approx(2.5)
    assert check.gaps == () and check.irregular == ()


def test_stack_gaps_finds_missing_slices_and_counts_them() -> None:
    check = stack_gaps([0.0, 2.5, 5.0, 12.5, 15.0, 17.5, 20.0], tolerance=0.1)
    assert not check.complete and check.irregular == ()
    (gap,) = check.gaps
    assert (gap.after_index, gap.start_mm, gap.end_mm, gap.missing) == (2, 5.0, 12.5, 2)
    assert check.missing_slices == 2


def test_stack_gaps_tells_irregular_steps_from_gaps() -> None:
    check = stack_gaps([0.0, 2.5, 5.0, 8.5, 10.0, 12.5, 15.0], tolerance=0.1)
    assert check.gaps == () and check.irregular == (2, 3)


# ----------------------------------------------------------------------------- enhanced CT
def test_enhanced_multiframe_ct_assembles_with_frame_numbers(phantom: Phantom) -> None:
    order = np.random.default_rng(1).permutation(len(phantom.datasets))
    ds = enhanced_ct(phantom, order)
    volume = assemble([ds])
    np.testing.assert_array_equal(volume.hu, phantom.hu)
    assert volume.geometry.spacing == pytest.approx(phantom.geometry.spacing)
    assert len(volume.sources) == 1 and "PixelData" not in volume.sources[0]
    # Slice k of the volume is the frame that holds phantom slice k.
    assert [order[f - 1] for f in volume.frame_numbers] == list(range(len(order)))


def test_enhanced_ct_localizer_frame_is_refused(phantom: Phantom) -> None:
    ds = enhanced_ct(phantom, np.arange(len(phantom.datasets)))
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "LOCALIZER", "NONE"]
    ds.PerFrameFunctionalGroupsSequence[0].CTImageFrameTypeSequence = Sequence([frame_type])
    with pytest.raises(AssemblyError, match="localizer"):
        assemble([ds])


# ----------------------------------------------------------------------------- no mutation
def test_inputs_are_not_mutated_and_sources_are_header_only_copies(series) -> None:
    before = [copy.deepcopy(ds) for ds in series]
    volume = assemble(list(reversed(series)))
    assert series == before
    assert all("PixelData" in ds for ds in series)
    assert all("PixelData" not in ds for ds in volume.sources)
    volume.sources[0].PatientName = "Changed^Here"
    assert str(series[0].PatientName) == str(before[0].PatientName)


@needs(TOTALSEG_CT)
def test_instances_with_blanked_uids_are_refused_by_name() -> None:
    """The TotalSegmentator example keeps its UIDs only in the file meta (anonymised)."""
    datasets = read_folder(TOTALSEG_CT)
    with pytest.raises(AssemblyError, match="has no SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID"):
        assemble(datasets)
