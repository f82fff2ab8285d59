"""Key slices: each lesion's largest slice, its outline there and its area."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as PolygonPath
from pydicom import Dataset

from dicomnode.report.keyslice import key_slices, outline
from dicomnode.types import Geometry, LabelVolume, Lesion, SeriesKey, Volume


def enclosed(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which pixel centres (index + 0.5 in DICOM image coordinates) the polygon encloses."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centres = np.column_stack([cols.ravel() + 0.5, rows.ravel() + 0.5])
    return PolygonPath(polygon).contains_points(centres).reshape(shape)


def test_the_outline_encloses_exactly_the_pixels_of_a_blob():
    mask = np.zeros((20, 30), bool)
    mask[4:12, 6:20] = True
    mask[12:15, 8:11] = True  # an irregular part
    polygon = outline(mask)
    assert np.array_equal(polygon[0], polygon[-1])
    assert np.array_equal(enclosed(polygon, mask.shape), mask)


def test_the_outline_closes_at_the_image_border_and_takes_the_largest_part():
    mask = np.zeros((16, 16), bool)
    mask[0:6, 0:5] = True   # touches two borders
    mask[12:14, 12:14] = True  # a smaller, separate part
    polygon = outline(mask)
    assert polygon.min() >= 0 and np.array_equal(polygon[0], polygon[-1])
    expected = np.zeros_like(mask)
    expected[0:6, 0:5] = True
    assert np.array_equal(enclosed(polygon, mask.shape), expected)


def test_an_empty_mask_has_no_outline():
    with pytest.raises(ValueError, match="empty"):
        outline(np.zeros((4, 4), bool))


def volume_of(labels: np.ndarray, frame_numbers: tuple[int, ...] = ()) -> Volume:
    sources = []
    for k in range(1 if frame_numbers else labels.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k + 1}"
        sources.append(ds)
    return Volume(
        hu=np.zeros(labels.shape, np.float32),
        geometry=Geometry((0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
                          (3.0, 0.5, 0.8)),
        key=SeriesKey("1.2", "1.2.3"),
        sources=tuple(sources),
        frame_of_reference_uid="1.2.4",
        frame_numbers=frame_numbers,
    )


def lesions(labels: np.ndarray) -> LabelVolume:
    found = tuple(Lesion(label=int(k), voxel_count=int((labels == k).sum()), volume_ml=1.0,
                         centroid_mm=(0.0, 0.0, 0.0), bbox=((0, 1), (0, 1), (0, 1)))
                  for k in range(1, int(labels.max()) + 1))
    return LabelVolume(labels=labels, lesions=found, model_name="m", model_version="1")


def test_key_slice_is_the_largest_slice_with_ties_broken_towards_the_middle():
    labels = np.zeros((9, 10, 10), np.uint8)
    labels[1:4, 2:5, 2:5] = 1
    labels[2, 1:6, 1:6] = 1      # lesion 1 is widest on slice 2
    labels[3:8, 6:9, 6:9] = 2    # lesion 2: equal on slices 3-7, middle 5
    first, second = key_slices(volume_of(labels), lesions(labels))
    assert (first.label, first.slice_index, first.sop_instance_uid) == (1, 2, "1.2.3.3")
    assert (second.label, second.slice_index) == (2, 5)
    assert first.frame_number is None
    assert first.area_mm2 == pytest.approx(25 * 0.5 * 0.8)


def test_key_slice_of_an_enhanced_ct_names_the_frame():
    labels = np.zeros((4, 8, 8), np.uint8)
    labels[2, 2:4, 2:4] = 1
    (key,) = key_slices(volume_of(labels, frame_numbers=(7, 8, 9, 10)), lesions(labels))
    assert (key.sop_instance_uid, key.frame_number) == ("1.2.3.1", 9)
