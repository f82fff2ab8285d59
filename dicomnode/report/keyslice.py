"""Each lesion's key slice: its largest CT slice, its outline there and its area (PURE).

Viewers that cannot show a SEG segment (OHIF's SR viewport, any PACS that shows images only)
can still show a contour on one CT image. The SR's planar group (TID 1410), the key images and
the PDF report all draw the same :class:`KeySlice`, so they agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import contourpy
import numpy as np
from pydicom import Dataset
from scipy import ndimage

from dicomnode.types import LabelVolume, Volume


@dataclass(frozen=True)
class KeySlice:
    """One lesion on the CT slice where its cross-section is largest.

    Attributes
    ----------
    label:
        The lesion's label (its SEG segment number).
    slice_index:
        ``z`` index of the slice in the volume.
    source:
        The CT image of that slice (for an Enhanced CT the multi-frame dataset).
    frame_number:
        1-based frame of ``source`` for an Enhanced CT, else ``None``.
    outline:
        ``(n, 2)`` closed polygon (first point repeated last) in DICOM image coordinates
        ``(column, row)``, where ``(0, 0)`` is the top-left corner of the top-left pixel
        (PS3.3 C.18.6.1.1): the outline of the lesion's largest connected part on the slice.
    area_mm2:
        Area of all the lesion's pixels on the slice (pixel count x pixel area), which is the
        number a person would compare with a manual measurement.
    """

    label: int
    slice_index: int
    source: Dataset
    frame_number: int | None
    outline: np.ndarray
    area_mm2: float

    @property
    def sop_instance_uid(self) -> str:
        return str(self.source.SOPInstanceUID)


def key_slices(volume: Volume, segmentation: LabelVolume) -> tuple[KeySlice, ...]:
    """The key slice of every lesion of ``segmentation``, in lesion order.

    The largest slice is the one with the most pixels of the lesion; a tie goes to the slice
    nearest the lesion's middle, so that a thin, flat lesion is shown where it is, not at an end.
    """
    pixel_area = float(volume.geometry.spacing[1] * volume.geometry.spacing[2])
    labels = segmentation.labels
    # Each lesion's box, all found in one pass: only the box is searched for its largest slice.
    boxes = ndimage.find_objects(labels)
    slices = []
    for lesion in segmentation.lesions:
        box = boxes[lesion.label - 1] if 0 < lesion.label <= len(boxes) else None
        if box is None:
            raise ValueError(f"lesion {lesion.label} has no voxel in the label volume")
        (z0, z1), (y0, y1), (x0, x1) = ((s.start, s.stop) for s in box)
        mask = labels[box] == lesion.label
        counts = np.zeros(labels.shape[0], dtype=np.int64)
        counts[z0:z1] = mask.sum(axis=(1, 2))
        z = _largest(counts)
        source, frame = _source_of(volume, z)
        on_slice = np.zeros(labels.shape[1:], dtype=bool)
        on_slice[y0:y1, x0:x1] = mask[z - z0]
        slices.append(KeySlice(
            label=lesion.label,
            slice_index=z,
            source=source,
            frame_number=frame,
            outline=outline(on_slice),
            area_mm2=float(counts[z]) * pixel_area,
        ))
    return tuple(slices)


def _largest(counts: np.ndarray) -> int:
    candidates = np.flatnonzero(counts == counts.max())
    occupied = np.flatnonzero(counts)
    middle = (occupied[0] + occupied[-1]) / 2
    return int(candidates[np.argmin(np.abs(candidates - middle))])


def _source_of(volume: Volume, z: int) -> tuple[Dataset, int | None]:
    if volume.frame_numbers:
        return volume.sources[0], int(volume.frame_numbers[z])
    return volume.sources[z], None


def outline(mask: np.ndarray) -> np.ndarray:
    """The closed outline of the largest connected part of a 2D mask, in image coordinates.

    The iso-line at 0.5 between pixel centres (marching squares) runs half-way between a
    lesion pixel and its neighbour: it looks like a drawn contour and encloses the pixels'
    centres. Pixel centres are at ``index + 0.5`` in DICOM image coordinates.
    """
    components, count = ndimage.label(mask)
    if count == 0:
        raise ValueError("the mask is empty: there is no outline")
    sizes = np.bincount(components.ravel())[1:]
    largest = components == (int(np.argmax(sizes)) + 1)
    # Pad so that a lesion touching the image border still gets a closed line.
    padded = np.pad(largest, 1).astype(np.float64)
    lines = contourpy.contour_generator(z=padded, name="serial").lines(0.5)
    # The outer boundary is the longest line; the others are holes.
    rows_cols = max(lines, key=len) - 1.0  # undo the padding; (x, y) = (column, row) indices
    polygon = rows_cols + 0.5
    if not np.array_equal(polygon[0], polygon[-1]):
        polygon = np.vstack([polygon, polygon[:1]])
    return polygon
