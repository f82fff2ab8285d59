"""DICOM SEG and RTSTRUCT masks placed on the grid of a CT (PURE).

The cohort loader (training) and the node (a radiologist's own contours as input) read masks
with the same code: a SEG frame is placed by its Plane Position, an RTSTRUCT contour is filled
on the slice it lies on (even-odd rule), and anything drawn on another grid or frame of
reference is refused with a :class:`~dicomnode.errors.MaskError` that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.path import Path as Polygon
from pydicom import Dataset

from dicomnode.assemble import frame_plane, functional_group
from dicomnode.errors import MaskError
from dicomnode.types import Geometry

#: A mask voxel lies on an image voxel when their centres are this close (in voxels).
ON_GRID_VOXELS = 0.1
#: An RTSTRUCT contour belongs to a slice when it lies this close to it (in slices).
_ON_SLICE = 0.25
#: Cosine above which two axes count as parallel (about 2.5 degrees).
PARALLEL = 0.999
#: A FRACTIONAL SEG pixel is in the segment from this fraction of its maximum value on.
_FRACTION_INSIDE = 0.5


@dataclass(frozen=True)
class ImageGrid:
    """An image and where its grid lies in patient space, for placing masks on it."""

    hu: np.ndarray
    geometry: Geometry
    #: FrameOfReferenceUID of a DICOM image; empty for NIfTI/NRRD, which carry none.
    frame_of_reference_uid: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    def to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Patient positions ``(n, 3)`` as fractional ``(z, y, x)`` voxel indices."""
        inverse = np.linalg.inv(self.geometry.affine())
        homogeneous = np.c_[points_mm, np.ones(len(points_mm))]
        return (homogeneous @ inverse.T)[:, :3]


def _check_frame_of_reference(uid: str, image: ImageGrid, where: str) -> None:
    if uid and image.frame_of_reference_uid and uid != image.frame_of_reference_uid:
        raise MaskError(
            f"{where}: its frame of reference {uid} is not the image's "
            f"({image.frame_of_reference_uid}); it was drawn on another scan"
        )


def dims_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def mm_text(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.2f}" for v in values) + ")"


# ----------------------------------------------------------------------------- DICOM SEG


def seg_mask(seg: Dataset, image: ImageGrid, roi: str | None, where: str) -> np.ndarray:
    """The chosen segments of a SEG (all when ``roi`` is None), frame by frame on the image.

    Each frame is placed by its Plane Position (PS3.3 C.7.6.16.2.3), so the SEG may hold
    only the slices its segments touch, in any order, and may belong to an image series
    that is not DICOM (the image's NIfTI).
    """
    masks = segment_masks(seg, image, segment_numbers(seg, roi, where), where)
    return np.logical_or.reduce(list(masks.values()))


def segment_masks(seg: Dataset, image: ImageGrid, numbers: Sequence[int], where: str
                  ) -> dict[int, np.ndarray]:
    """Each of the segments ``numbers`` of a SEG on the image, the frames decoded once."""
    _check_frame_of_reference(str(seg.get("FrameOfReferenceUID", "")), image, where)
    kind = str(seg.get("SegmentationType", "BINARY"))
    try:
        frames = seg.pixel_array
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as exc:
        raise MaskError(f"{where}: the segmentation frames cannot be decoded ({exc})") from None
    frames = frames.reshape(-1, int(seg.Rows), int(seg.Columns))
    masks = {number: np.zeros(image.shape, dtype=bool) for number in numbers}
    for f, pixels in enumerate(frames):
        if kind == "LABELMAP":
            inside = {n: pixels == n for n in numbers}
        else:
            item = functional_group(seg, f, "SegmentIdentificationSequence")
            if item is None or int(item.ReferencedSegmentNumber) not in masks:
                continue
            inside = {int(item.ReferencedSegmentNumber): _binary(pixels, seg, kind)}
        for number, pixels_in in inside.items():
            if pixels_in.any():
                origin = _frame_origin(seg, f, image, where)
                _paste_frame(masks[number], pixels_in, origin, f"{where}, frame {f + 1}")
    return masks


def _binary(pixels: np.ndarray, seg: Dataset, kind: str) -> np.ndarray:
    if kind == "FRACTIONAL":
        top = float(seg.get("MaximumFractionalValue", 255) or 255)
        return pixels >= _FRACTION_INSIDE * top
    return pixels != 0


def segment_numbers(seg: Dataset, roi: str | None, where: str) -> tuple[int, ...]:
    """Segment numbers chosen by label (exact, else ignoring case) or number; all for None."""
    segments = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", ""))
        for item in seg.get("SegmentSequence", [])
        if int(item.SegmentNumber) > 0  # 0 is a LABELMAP's background
    }
    if roi is None:
        return tuple(segments)
    for matches in (lambda label: label == roi, lambda label: label.lower() == roi.lower()):
        chosen = tuple(n for n, label in segments.items() if matches(label))
        if chosen:
            return chosen
    if roi.isdigit() and int(roi) in segments:
        return (int(roi),)
    listed = ", ".join(f"{n} {label!r}" for n, label in segments.items())
    raise MaskError(f"{where}: no segment labelled or numbered {roi!r} (segments: {listed})")


def _frame_origin(seg: Dataset, frame: int, image: ImageGrid, where: str) -> tuple[int, int, int]:
    """The image voxel ``(z, y, x)`` of a frame's first pixel; the frame must lie on the grid."""
    here = f"{where}, frame {frame + 1}"
    plane = frame_plane(seg, frame)
    if plane is None:
        raise MaskError(
            f"{here}: no Plane Position, Plane Orientation or Pixel Measures; the frame "
            "cannot be placed on the image"
        )
    position, orientation, measures = plane
    cosines = np.asarray(orientation.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(measures.PixelSpacing, dtype=np.float64)
    same_axes = (cosines[:3] @ image.geometry.row_direction >= PARALLEL
                 and cosines[3:] @ image.geometry.column_direction >= PARALLEL)
    if not same_axes or not np.allclose(spacing, image.geometry.spacing[1:], rtol=1e-3):
        raise MaskError(
            f"{here}: its rows, columns or pixel spacing ({mm_text(spacing)} mm) differ from "
            f"the image's ({mm_text(image.geometry.spacing[1:])} mm); the SEG was made on "
            "another grid"
        )
    index = image.to_index(np.asarray(position.ImagePositionPatient, dtype=np.float64)[None])[0]
    if np.abs(index - np.round(index)).max() > ON_GRID_VOXELS:
        raise MaskError(
            f"{here}: at {mm_text(position.ImagePositionPatient)} mm it falls between the image's "
            f"voxels (voxel index {mm_text(index)}); the SEG was made on another grid"
        )
    return tuple(int(v) for v in np.round(index))  # type: ignore[return-value]


def _paste_frame(mask: np.ndarray, inside: np.ndarray, origin: tuple[int, int, int],
                 where: str) -> None:
    z, y, x = origin
    rows, columns = inside.shape
    if not (0 <= z < mask.shape[0] and 0 <= y and y + rows <= mask.shape[1]
            and 0 <= x and x + columns <= mask.shape[2]):
        raise MaskError(
            f"{where}: lies outside the image (slice {z}, rows {y}..{y + rows - 1}, columns "
            f"{x}..{x + columns - 1} of a {dims_text(mask.shape)} image)"
        )
    mask[z, y:y + rows, x:x + columns] |= inside


# ----------------------------------------------------------------------------- RTSTRUCT


def rtstruct_mask(rs: Dataset, image: ImageGrid, roi: str | None, where: str) -> np.ndarray:
    """The chosen ROI's closed planar contours filled on the image's slices (the only ROI
    when ``roi`` is None)."""
    number = roi_number(roi_names(rs), roi, where)
    return roi_mask(rs, image, number, where)


def roi_names(rs: Dataset) -> dict[int, str]:
    """ROI Number -> ROI Name of a structure set."""
    return {int(item.ROINumber): str(item.get("ROIName", ""))
            for item in rs.get("StructureSetROISequence", [])}


def roi_mask(rs: Dataset, image: ImageGrid, number: int, where: str) -> np.ndarray:
    """ROI ``number``'s closed planar contours filled on the image's slices.

    A voxel is inside when its centre is inside an odd number of the slice's contours
    (even-odd rule): an inner contour cuts a hole, as PS3.3 C.8.8.6.3 intends.
    """
    names = roi_names(rs)
    for item in rs.get("StructureSetROISequence", []):
        if int(item.ROINumber) == number:
            _check_frame_of_reference(str(item.get("ReferencedFrameOfReferenceUID", "")),
                                      image, where)
    contours = [
        contour
        for item in rs.get("ROIContourSequence", [])
        if int(item.ReferencedROINumber) == number
        for contour in item.get("ContourSequence", [])
        if str(contour.get("ContourGeometricType", "")) == "CLOSED_PLANAR"
    ]
    if not contours:
        raise MaskError(f"{where}: ROI {names[number]!r} has no closed planar contour")
    mask = np.zeros(image.shape, dtype=bool)
    for k, contour in enumerate(contours, start=1):
        points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
        z, filled = _fill_contour(image.to_index(points), image.shape, f"{where}, contour {k}")
        mask[z] ^= filled
    return mask


def roi_number(names: dict[int, str], roi: str | None, where: str) -> int:
    """The ROI named ``roi`` (exact, else ignoring case); the only ROI when ``roi`` is None."""
    listed = ", ".join(repr(n) for n in names.values()) or "none"
    if roi is None:
        if len(names) == 1:
            return next(iter(names))
        raise MaskError(f"{where}: the structure set holds {len(names)} ROIs ({listed}); "
                          "name one in the roi column")
    for matches in (lambda name: name == roi, lambda name: name.lower() == roi.lower()):
        chosen = [n for n, name in names.items() if matches(name)]
        if len(chosen) == 1:
            return chosen[0]
        if len(chosen) > 1:
            raise MaskError(f"{where}: {len(chosen)} ROIs are named {roi!r}")
    raise MaskError(f"{where}: no ROI named {roi!r} (ROIs: {listed})")


def _fill_contour(
    index: np.ndarray, shape: tuple[int, int, int], where: str
) -> tuple[int, np.ndarray]:
    """The slice a contour lies on, and the ``(y, x)`` pixels whose centre it encloses."""
    z = float(np.median(index[:, 0]))
    k = round(z)
    if np.abs(index[:, 0] - k).max() > _ON_SLICE:
        raise MaskError(
            f"{where}: it does not lie on a slice of the image (slice index "
            f"{index[:, 0].min():.2f} to {index[:, 0].max():.2f}); the structure set was "
            "drawn on another series"
        )
    if not 0 <= k < shape[0]:
        raise MaskError(f"{where}: it lies on slice {k}, outside the image's {shape[0]} slices")
    filled = np.zeros(shape[1:], dtype=bool)
    # Only pixels in the contour's bounding box (clipped to the image) can be inside it.
    low = np.maximum(np.floor(index[:, 1:].min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(index[:, 1:].max(axis=0)).astype(int) + 1, shape[1:])
    if np.any(high <= low):
        return k, filled
    ys, xs = np.mgrid[low[0]:high[0], low[1]:high[1]]
    polygon = Polygon(index[:, [2, 1]])  # matplotlib wants (x, y)
    inside = polygon.contains_points(np.c_[xs.ravel(), ys.ravel()])
    filled[low[0]:high[0], low[1]:high[1]] = inside.reshape(ys.shape)
    return k, filled
