"""Cohort CSV parsing and loading one case: every image and mask kind, placed on one grid.

Expected masks are computed independently of ``dicomnode.cohort``: from the phantom's own
ground truth, from pixel-centre geometry in millimetres, from highdicom, SimpleITK or the
third-party masks that came with the real data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from dicomfiles import write_seg
from dicomnode.cohort import CohortRow, DicomwebSource, load_case, read_cohort
from dicomnode.config import AssemblyConfig
from dicomnode.errors import CohortError, ConfigError
from dicomnode.phantom import Phantom, make_phantom_study, write_study

SHAPE = (12, 48, 48)
SPACING = (2.5, 1.5, 1.5)


# --------------------------------------------------------------------------------------------
# Helpers: files other tools would have written
# --------------------------------------------------------------------------------------------


def row(image: str, mask: str, *, roi: str | None = None, mask_label: int | None = None,
        organ_mask: str | None = None) -> CohortRow:
    return CohortRow("P1", image, mask, roi, mask_label, organ_mask, {}, 2)


def write_volume(array: np.ndarray, path: Path, *, spacing_zyx, origin, direction=None) -> Path:
    """A NIfTI/NRRD file of a ``(z, y, x)`` array as SimpleITK lays it out."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(tuple(float(v) for v in origin))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    sitk.WriteImage(image, str(path))
    return path


def write_phantom_as_volume(phantom: Phantom, array: np.ndarray, path: Path) -> Path:
    """``array`` (on the phantom's grid) as a volume stored with y flipped, as dcm2niix does."""
    g = phantom.geometry
    flipped = array[:, ::-1, :]
    down = np.asarray(g.column_direction)
    last_row = np.asarray(g.origin) + down * g.spacing[1] * (array.shape[1] - 1)
    direction = np.column_stack([g.row_direction, -down, g.slice_direction])
    return write_volume(flipped, path, spacing_zyx=g.spacing, origin=last_row, direction=direction)


def write_rtstruct(phantom: Phantom, rois: dict[str, list[np.ndarray]], path: Path) -> Path:
    """A minimal RTSTRUCT: per ROI name, closed planar contours given as ``(n, 3)`` mm points."""
    first = phantom.datasets[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.StructureSetLabel = "tests"
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ContourSequence = []
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.4f}" for v in np.asarray(points).ravel()]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def pixel_centres_mm(phantom: Phantom, z: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient x and y (mm) of every pixel centre of slice ``z`` (axial phantom)."""
    g = phantom.geometry
    ys, xs = np.mgrid[0:SHAPE[1], 0:SHAPE[2]]
    return g.origin[0] + xs * g.spacing[2], g.origin[1] + ys * g.spacing[1]


def slice_z_mm(phantom: Phantom, z: int) -> float:
    return phantom.geometry.origin[2] + z * phantom.geometry.spacing[0]


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom_study(10003, shape=SHAPE, spacing=SPACING, n_lesions=1)


@pytest.fixture(scope="module")
def ct_folder(phantom: Phantom, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "ct"
    write_study(phantom, folder)
    return folder


# --------------------------------------------------------------------------------------------
# The CSV
# --------------------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cohort.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_read_cohort_keeps_targets_and_counts_lines(tmp_path):
    path = write_csv(tmp_path, (
        "\ufeffcase_id,image,mask,roi,mask_label,tmb,note\n"
        "P1,ct/p1,p1.seg.dcm,GTV,,12.5,\"two\nlines\"\n"
        "\n"
        "P1,ct/p1,p1.nii.gz,,2,12.5,\n"
        "P2,dicomweb:1.2.3/1.2.3.4,dicomweb:1.2.3/1.2.3.5,,,3,\n"
    ))
    rows = read_cohort(path)
    assert [(r.case_id, r.roi, r.mask_label, r.line) for r in rows] == [
        ("P1", "GTV", None, 2), ("P1", None, 2, 5), ("P2", None, None, 6)]
    assert rows[0].targets == {"tmb": "12.5", "note": "two\nlines"}
    assert rows[2].image == "dicomweb:1.2.3/1.2.3.4" and rows[2].organ_mask is None


@pytest.mark.parametrize(("text", "expected"), [
    ("case_id,image\nP1,a\n", "line 1: missing column 'mask'"),
    ("case_id,image,mask,mask\nP1,a,b,c\n", "line 1: column 'mask' appears more than once"),
    ("case_id,image,mask\nP1,a,b\nP2,,b\n", "line 3, column 'image': empty"),
    ("case_id,image,mask\nP1,a,b,c\n", "line 2: 4 cells for 3 columns"),
    ("case_id,image,mask,mask_label\nP1,a,b,two\n", "line 2, column 'mask_label': 'two'"),
    ("case_id,image,mask,mask_label\nP1,a,b,0\n", "line 2, column 'mask_label': '0'"),
    ("case_id,image,mask\nP1,dicomweb:1.2.3,b\n", "line 2, column 'image'"),
    ("case_id,image,mask\nP1,a,dicomweb:1.2/x.y\n", "line 2, column 'mask'"),
    ("case_id,image,mask\nP1,a,b\nP1,c,d\n", "line 3: case 'P1' (line 3) repeats line 2"),
    ("case_id,image,mask\n", "has a header but no rows"),
    ("", "the file is empty"),
])
def test_read_cohort_errors_name_line_and_column(tmp_path, text, expected):
    path = write_csv(tmp_path, text)
    with pytest.raises(CohortError) as caught:
        read_cohort(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_read_cohort_missing_file(tmp_path):
    with pytest.raises(CohortError, match="cohort file not found"):
        read_cohort(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------------
# NIfTI / NRRD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_volume_image_and_label_map(tmp_path, suffix):
    hu = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 2000 - 1000
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:6, 10:20, 5:9] = 1
    labels[7:9, 30:40, 30:35] = 2
    # A rotated-axes grid (x along -y, y along +x): the arrays stay in file order.
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    options = {"spacing_zyx": (3.0, 0.8, 0.7), "origin": (10.0, -20.0, 5.0), "direction": direction}
    write_volume(hu, tmp_path / f"ct{suffix}", **options)
    write_volume(labels, tmp_path / f"mask{suffix}", **options)

    case = load_case(row(f"ct{suffix}", f"mask{suffix}", mask_label=2), base_dir=tmp_path)

    assert case.hu.dtype == np.float32 and np.array_equal(case.hu, hu)
    assert np.array_equal(case.mask, labels == 2)
    assert case.spacing_zyx == pytest.approx((3.0, 0.8, 0.7))
    every_label = load_case(row(f"ct{suffix}", f"mask{suffix}"), base_dir=tmp_path)
    assert np.array_equal(every_label.mask, labels > 0)


def test_label_map_stored_flipped_is_put_back_on_the_dicom_grid(phantom, ct_folder, tmp_path):
    labels = phantom.label_map.astype(np.uint8)
    mask = write_phantom_as_volume(phantom, labels, tmp_path / "m.nii.gz")
    case = load_case(row(str(ct_folder), str(mask)), base_dir=tmp_path)
    assert np.array_equal(case.hu, phantom.hu)
    assert np.array_equal(case.mask, phantom.lesion_mask)


def test_label_map_matches_simpleitk_resampling_on_real_ct(shared_data, tmp_path):
    """TotalSegmentator's organ map (stored with y flipped) onto its DICOM CT, against SimpleITK."""
    from anonymised import restore_uids

    folder = shared_data / "totalsegmentator/tests/reference_files"
    files = sorted((folder / "example_ct_dicom").iterdir())
    datasets = restore_uids([pydicom.dcmread(p) for p in files], "test_cohort")
    for k, ds in enumerate(datasets):
        ds.save_as(tmp_path / f"{k}.dcm")
    nifti = folder / "example_seg_dicom.nii.gz"

    case = load_case(row(str(tmp_path), str(nifti), mask_label=5), base_dir=tmp_path)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    reference = reader.Execute()
    resampled = sitk.Resample(sitk.ReadImage(str(nifti)), reference, sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(case.hu, sitk.GetArrayFromImage(reference))
    expected = sitk.GetArrayFromImage(resampled) == 5
    assert expected.sum() > 1000 and np.array_equal(case.mask, expected)


@pytest.mark.parametrize(("change", "message"), [
    ({"spacing_zyx": (2.5, 1.5, 1.4)}, "spacing"),
    ({"origin_shift": (0.0, 1.5, 0.0)}, "first voxel at"),
    ({"shape": (12, 48, 47)}, "size (z, y, x) 12x48x47, image 12x48x48"),
])
def test_label_map_on_another_grid_is_refused(phantom, ct_folder, tmp_path, change, message):
    g = phantom.geometry
    labels = np.ones(change.get("shape", SHAPE), dtype=np.uint8)
    origin = np.asarray(g.origin) + np.asarray(change.get("origin_shift", (0.0, 0.0, 0.0)))
    write_volume(labels, tmp_path / "m.nii.gz", spacing_zyx=change.get("spacing_zyx", g.spacing),
                 origin=origin)
    with pytest.raises(CohortError) as caught:
        load_case(row(str(ct_folder), "m.nii.gz"), base_dir=tmp_path)
    text = str(caught.value)
    assert text.startswith("case 'P1' (line 2): mask 'm.nii.gz': not on the image grid")
    assert message in text and "resample the mask onto the image first" in text


def test_label_map_without_the_label_says_which_values_it_has(tmp_path):
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2, 2, 2], labels[3, 3, 3] = 1, 4
    write_volume(labels, tmp_path / "ct.nrrd", spacing_zyx=SPACING, origin=(0, 0, 0))
    write_volume(labels, tmp_path / "m.nrrd", spacing_zyx=SPACING, origin=(0, 0, 0))
    message = r"no voxel has the value mask_label 3 \(values present: 1, 4\)"
    with pytest.raises(CohortError, match=message):
        load_case(row("ct.nrrd", "m.nrrd", mask_label=3), base_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# DICOM SEG
# --------------------------------------------------------------------------------------------


def test_seg_frames_land_on_their_slices(phantom, ct_folder, tmp_path):
    box = np.zeros(SHAPE, dtype=bool)
    box[2:4, 5:15, 30:40] = True
    seg = write_seg(phantom, {"tumour": phantom.lesion_mask, "box": box}, tmp_path / "seg.dcm")
    # highdicom leaves out empty frames: frame k is not slice k.
    assert pydicom.dcmread(seg).NumberOfFrames < 2 * SHAPE[0]

    by_label = load_case(row(str(ct_folder), str(seg), roi="tumour"), base_dir=tmp_path)
    by_number = load_case(row(str(ct_folder), str(seg), roi="2"), base_dir=tmp_path)
    every = load_case(row(str(ct_folder), str(seg)), base_dir=tmp_path)

    assert np.array_equal(by_label.mask, phantom.lesion_mask)
    assert np.array_equal(by_number.mask, box)
    assert np.array_equal(every.mask, phantom.lesion_mask | box)


def test_seg_on_a_nifti_image_is_placed_by_position(phantom, tmp_path):
    g = phantom.geometry
    write_volume(phantom.hu, tmp_path / "ct.nii.gz", spacing_zyx=g.spacing, origin=g.origin)
    write_seg(phantom, {"tumour": phantom.lesion_mask}, tmp_path / "seg.dcm")
    case = load_case(row("ct.nii.gz", "seg.dcm"), base_dir=tmp_path)
    assert np.array_equal(case.mask, phantom.lesion_mask)


def test_seg_of_another_scan_or_segment_is_refused(phantom, ct_folder, tmp_path):
    other = make_phantom_study(10004, shape=SHAPE, spacing=SPACING, n_lesions=1)
    seg = write_seg(other, {"tumour": other.lesion_mask}, tmp_path / "other.dcm")
    with pytest.raises(CohortError, match="frame of reference .* is not the image's"):
        load_case(row(str(ct_folder), str(seg)), base_dir=tmp_path)
    own = write_seg(phantom, {"tumour": phantom.lesion_mask}, tmp_path / "own.dcm")
    message = r"no segment labelled or numbered 'liver' \(segments: 1 'tumour'\)"
    with pytest.raises(CohortError, match=message):
        load_case(row(str(ct_folder), str(own), roi="liver"), base_dir=tmp_path)


@pytest.mark.parametrize(("image", "seg", "label_map", "roi"), [
    ("ct-3slice", "liver.dcm", "liver_seg.nrrd", "Liver"),
    # Frames of 23 x 38 pixels: bit-packed BINARY frames that do not end on a byte boundary.
    ("23x38x3/image", "23x38x3/seg/label.seg", "23x38x3/nrrd/label.nrrd", None),
    ("24x38x3/image", "24x38x3/seg/label.seg", "24x38x3/nrrd/label.nrrd", None),
    ("24x38x3/image", "sparse-labelmap-noppv.dcm", "sparse_labelmap_noppv_seg.nrrd", "Liver"),
])
def test_dcmqi_seg_matches_the_label_map_it_was_made_from(shared_data, image, seg, label_map, roi):
    folder = shared_data / "dcmqi/data/segmentations"
    three_slices = AssemblyConfig(min_slices=3)
    from_seg = load_case(row(image, seg, roi=roi), base_dir=folder, assembly=three_slices)
    from_label_map = load_case(row(image, label_map), base_dir=folder, assembly=three_slices)
    assert from_seg.mask.sum() > 300
    assert np.array_equal(from_seg.mask, from_label_map.mask)


# --------------------------------------------------------------------------------------------
# RTSTRUCT
# --------------------------------------------------------------------------------------------


def test_rtstruct_square_and_ring_with_hole(phantom, ct_folder, tmp_path):
    square_z, ring_z = 3, 8
    # Square with corners between pixel centres: no centre lies on its edge.
    x0, y0 = (np.asarray(phantom.geometry.origin[:2]) + 10.25 * 1.5)
    side = 12 * 1.5
    square = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]])
    centre = np.asarray(phantom.geometry.origin[:2]) + np.array([32.3, 24.1]) * 1.5
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)

    def circle(radius: float) -> np.ndarray:
        return centre + radius * np.c_[np.cos(angles), np.sin(angles)]

    def on_slice(points_xy: np.ndarray, z: int) -> np.ndarray:
        return np.c_[points_xy, np.full(len(points_xy), slice_z_mm(phantom, z))]

    rs = write_rtstruct(phantom, {
        "Square": [on_slice(square, square_z)],
        "GTV ring": [on_slice(circle(12.0), ring_z), on_slice(circle(5.0), ring_z)],
    }, tmp_path / "rs.dcm")

    square_mask = load_case(row(str(ct_folder), str(rs), roi="square"), base_dir=tmp_path).mask
    ring_mask = load_case(row(str(ct_folder), str(rs), roi="GTV ring"), base_dir=tmp_path).mask

    x, y = pixel_centres_mm(phantom, square_z)
    expected_square = np.zeros(SHAPE, dtype=bool)
    expected_square[square_z] = (x > x0) & (x < x0 + side) & (y > y0) & (y < y0 + side)
    assert expected_square.sum() == 144 and np.array_equal(square_mask, expected_square)

    # The 720-gon lies within 12 * (1 - cos(pi / 720)) mm of the circle: only centres closer
    # than that to either circle could go either way.
    distance = np.hypot(x - centre[0], y - centre[1])
    chord = 12.0 * (1 - np.cos(np.pi / 720))
    certain = (np.abs(distance - 12.0) > chord) & (np.abs(distance - 5.0) > chord)
    expected_ring = (distance < 12.0) & (distance > 5.0)
    assert np.array_equal(ring_mask[ring_z][certain], expected_ring[certain])
    assert (~certain).sum() <= 2
    assert not ring_mask[ring_z][distance < 4.5].any(), "the inner contour must cut a hole"
    assert ring_mask.sum() == ring_mask[ring_z].sum(), "only the contour's slice is filled"


def test_rtstruct_errors_name_the_rois(phantom, ct_folder, tmp_path):
    z = slice_z_mm(phantom, 4)
    square = np.array([[0, 0, z], [9, 0, z], [9, 9, z], [0, 9, z]], dtype=float)
    between = square + np.array([0, 0, 1.25])  # half-way to the next slice
    rs = write_rtstruct(phantom, {"GTV": [square], "Between": [between]}, tmp_path / "rs.dcm")
    message = r"holds 2 ROIs \('GTV', 'Between'\); name one in the roi"
    with pytest.raises(CohortError, match=message):
        load_case(row(str(ct_folder), str(rs)), base_dir=tmp_path)
    with pytest.raises(CohortError, match=r"no ROI named 'CTV' \(ROIs: 'GTV', 'Between'\)"):
        load_case(row(str(ct_folder), str(rs), roi="CTV"), base_dir=tmp_path)
    with pytest.raises(CohortError, match="contour 1: it does not lie on a slice of the image"):
        load_case(row(str(ct_folder), str(rs), roi="Between"), base_dir=tmp_path)


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # MIM's over-long SH values
def test_rtstruct_matches_the_ibsi_mask(shared_data):
    """IBSI's sarcoma RTSTRUCT (from MIM), rasterised, against the NIfTI mask IBSI made of it."""
    folder = shared_data / "ibsi_sts_001"
    contours = load_case(row("dicom/CT/image", "dicom/CT/mask/RS.dcm", roi="GTV_Mass_CT"),
                         base_dir=folder)
    nifti = load_case(row("dicom/CT/image", "nifti/CT_mask.nii.gz"), base_dir=folder)
    assert contours.mask.sum() > 100_000
    assert np.array_equal(contours.mask, nifti.mask)


# --------------------------------------------------------------------------------------------
# Failures name the case
# --------------------------------------------------------------------------------------------


def test_case_errors_name_the_case_and_the_problem(phantom, ct_folder, tmp_path):
    write_phantom_as_volume(phantom, np.zeros(SHAPE, np.uint8), tmp_path / "empty.nii.gz")
    write_phantom_as_volume(phantom, np.ones(SHAPE, np.uint8), tmp_path / "organ.nii.gz")
    lesion = phantom.lesion_mask.astype(np.uint8)
    write_phantom_as_volume(phantom, lesion, tmp_path / "lesion.nii.gz")
    cases = [
        (row("nope", "m.nii.gz"), f"image 'nope': {tmp_path / 'nope'} does not exist"),
        (row(str(ct_folder), "empty.nii.gz"), "the lesion mask is empty"),
        (row(str(ct_folder), "lesion.nii.gz", roi="GTV"),
         "a label map's lesion is chosen by mask_label"),
        (row("dicomweb:1.2.3/4.5.6", "m.nii.gz"), "no DICOMweb server was given (--dicomweb-url)"),
    ]
    for bad, message in cases:
        with pytest.raises(CohortError) as caught:
            load_case(bad, base_dir=tmp_path)
        assert str(caught.value).startswith("case 'P1"), caught.value
        assert message in str(caught.value)
    with pytest.raises(CohortError, match="too few slices: found 12, at least 20"):
        load_case(row(str(ct_folder), "lesion.nii.gz"), base_dir=tmp_path,
                  assembly=AssemblyConfig(min_slices=20))
    with_organ = row(str(ct_folder), "lesion.nii.gz", organ_mask="organ.nii.gz")
    case = load_case(with_organ, base_dir=tmp_path)
    assert case.organ_mask is not None and case.organ_mask.all()


@pytest.mark.parametrize(("url", "options", "message"), [
    ("pacs:8042/dicom-web", {}, "expected http:// or https://"),
    ("http://pacs/dicom-web", {"password_env": "PW"}, "a DICOMweb password needs a user name"),
    ("http://pacs/dicom-web", {"username": "u", "token_file": "t"}, "user .* or a token, not both"),
])
def test_dicomweb_source_refuses_what_cannot_work(url, options, message):
    with pytest.raises(ConfigError, match=message):
        DicomwebSource.from_url(url, **options)
