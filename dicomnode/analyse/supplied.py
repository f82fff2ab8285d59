"""A radiologist's own contours as the segmentation: an RTSTRUCT or a DICOM SEG that references
the CT series is measured instead of running the model (PURE).

Each ROI (RTSTRUCT) or segment (SEG) is one lesion, numbered in the object's own order; a
ROI or segment without any voxel on the CT (deleted content) is left out and named in a
warning. Where several objects reference the series, the newest (Content Date and Time, then
Instance Creation) wins; with ``[segmentation] source = "model"`` none is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset

from dicomnode.analyse.segment import describe_lesions
from dicomnode.errors import MaskError
from dicomnode.masks import ImageGrid, roi_mask, roi_names, segment_masks
from dicomnode.types import LabelVolume, SuppliedSegmentation, Volume

log = logging.getLogger(__name__)

#: Modalities of the objects that carry a segmentation the node can measure.
SEGMENTATION_MODALITIES = ("SEG", "RTSTRUCT")


def is_segmentation(ds: Dataset) -> bool:
    return str(ds.get("Modality", "")) in SEGMENTATION_MODALITIES


def referenced_series(ds: Dataset) -> set[str]:
    """The image series a SEG (Referenced Series Sequence) or an RTSTRUCT (Referenced Frame of
    Reference > RT Referenced Study > RT Referenced Series) was drawn on."""
    if str(ds.get("Modality", "")) == "SEG":
        return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])
                if "SeriesInstanceUID" in item}
    return {
        str(series.SeriesInstanceUID)
        for frame in ds.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in series
    }


def newest_for_series(candidates: Sequence[Dataset], series_uid: str) -> Dataset | None:
    """The newest segmentation object among ``candidates`` that references ``series_uid``."""
    mine = [ds for ds in candidates if is_segmentation(ds) and series_uid in referenced_series(ds)]
    if not mine:
        return None

    def created(ds: Dataset) -> tuple[str, str, str, str]:
        return (str(ds.get("ContentDate", "")), str(ds.get("ContentTime", "")),
                str(ds.get("InstanceCreationDate", "")), str(ds.get("InstanceCreationTime", "")))

    return max(mine, key=created)


def creator_of(ds: Dataset) -> str:
    """Who or what made the object, from what it says about itself; never invented."""
    people = [str(ds.get(k, "")) for k in ("ContentCreatorName", "OperatorsName")]
    algorithms = [str(item.get("SegmentAlgorithmName", ""))
                  for item in ds.get("SegmentSequence", []) if item.get("SegmentAlgorithmName")]
    device = " ".join(str(ds.get(k, "")) for k in ("Manufacturer", "ManufacturerModelName")).strip()
    named = [p for p in people if p] + sorted(set(algorithms)) + ([device] if device else [])
    return "; ".join(dict.fromkeys(named)) or "not stated in the object"


def supplied_segmentation(ds: Dataset, volume: Volume) -> tuple[LabelVolume, tuple[str, ...]]:
    """The lesions ``ds`` draws on ``volume``, and warnings for ROIs or segments left out.

    Raises
    ------
    MaskError
        When the object is not on the CT's grid or frame of reference, or draws nothing.
    """
    kind = str(ds.get("Modality", ""))
    where = f"supplied {kind} {ds.get('SOPInstanceUID', '?')}"
    grid = ImageGrid(volume.hu, volume.geometry, volume.frame_of_reference_uid)
    if kind == "SEG":
        segments = {int(item.SegmentNumber): str(item.get("SegmentLabel", ""))
                    for item in ds.get("SegmentSequence", []) if int(item.SegmentNumber) > 0}
        masks = segment_masks(ds, grid, list(segments), where)
        names = segments
    elif kind == "RTSTRUCT":
        names = roi_names(ds)
        drawn = {int(item.ReferencedROINumber) for item in ds.get("ROIContourSequence", [])
                 if item.get("ContourSequence")}
        masks = {n: roi_mask(ds, grid, n, where) for n in names if n in drawn}
    else:
        raise MaskError(f"{where}: a {kind or 'object without modality'} is not a SEG or RTSTRUCT")
    kept = [n for n, mask in masks.items() if mask.any()]
    warnings = tuple(f"{where}: {'segment' if kind == 'SEG' else 'ROI'} {n} {names[n]!r} has "
                     "no voxel on the CT and was left out" for n in names if n not in kept)
    if not kept:
        raise MaskError(f"{where}: none of its {'segments' if kind == 'SEG' else 'ROIs'} "
                        "draws a voxel on the CT")
    labels = np.zeros(volume.shape, dtype=np.uint16)
    for label, number in enumerate(kept, start=1):
        labels[masks[number]] = label  # an overlap goes to the later one
    if len(np.unique(labels)) != len(kept) + 1:
        raise MaskError(f"{where}: some of its segments lie entirely under later ones")
    header = Dataset()
    for element in ds:
        if element.keyword != "PixelData":
            header.add(element)
    supplied = SuppliedSegmentation(
        kind=kind,  # type: ignore[arg-type]
        sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.SeriesInstanceUID), creator=creator_of(ds),
        numbers=tuple(kept), names=tuple(names[n] for n in kept), header=header,
    )
    lesions = describe_lesions(labels, volume)
    for warning in warnings:
        log.warning("%s", warning)
    return LabelVolume(labels=labels, lesions=lesions, model_name=f"supplied {kind}",
                       model_version=str(ds.SOPInstanceUID), supplied=supplied), warnings
