"""The DICOM Segmentation of the lesions (PS3.3 A.51 Segmentation IOD) (PURE).

One segment per lesion, with its own display colour; the segment number is the lesion label,
so that the SR's Referenced Segment (TID 1411, (121191, DCM)) and the label volume agree
without a lookup table. The encoding (BINARY, FRACTIONAL or LABELMAP) depends on the frame
size and ``[report] seg_encoding``: see :func:`seg_encoding`.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report.charset import source_character_set
from dicomnode.report.equipment import contributing_equipment
from dicomnode.report.palette import lesion_cielab
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis, LabelVolume, Volume

#: Content Label (0070,0080) of the SEG: a CS value, upper case, at most 16 characters.
CONTENT_LABEL = "LESIONS"


@dataclass(frozen=True)
class ReportUids:
    """The UIDs of one job's report objects, all derived from the job's seed.

    A retried delivery of the same job rebuilds identical UIDs (the PACS sees the same
    instances again, not duplicates); a new job gets a new seed and therefore new UIDs, which
    matters because a PACS such as Orthanc silently keeps the first copy of a re-sent UID.
    """

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    #: Tracking Unique Identifier (0062,0021) per lesion label, shared by SEG and SR.
    tracking: dict[int, str]
    #: The key-image (Secondary Capture) series and one instance per lesion label.
    key_image_series: str
    key_images: dict[int, str]
    pdf_series: str
    pdf_instance: str

    @classmethod
    def derive(cls, seed: str, labels: tuple[int, ...]) -> "ReportUids":
        def uid(*parts: str) -> str:
            return str(generate_uid(entropy_srcs=[seed, *parts]))

        return cls(
            seg_series=uid("seg-series"),
            seg_instance=uid("seg-instance"),
            sr_series=uid("sr-series"),
            sr_instance=uid("sr-instance"),
            tracking={label: uid("tracking", str(label)) for label in labels},
            key_image_series=uid("key-image-series"),
            key_images={label: uid("key-image", str(label)) for label in labels},
            pdf_series=uid("pdf-series"),
            pdf_instance=uid("pdf-instance"),
        )


def build_seg(
    analysis: Analysis,
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
) -> hd.seg.Segmentation:
    """Build the SEG of ``analysis`` in memory.

    Parameters
    ----------
    analysis
        Must contain at least one lesion (no lesion means no SEG).
    template
        Codes of the segments (category, type, algorithm family) and the series description.
    config
        Equipment identity (PS3.3 C.7.5.1 General Equipment).
    uids
        Series, instance and per-segment tracking UIDs.
    series_number
        Series Number of the SEG series.

    Raises
    ------
    dicomnode.errors.ReportError
        When the label volume does not match the CT or the lesion list.
    """
    segmentation = analysis.segmentation
    _check_labels(segmentation, analysis.volume)
    frames = _label_frames(analysis.volume, segmentation.labels)
    encoding = seg_encoding(config.seg_encoding, rows=frames.shape[1], columns=frames.shape[2])
    try:
        return hd.seg.Segmentation(
            source_images=list(analysis.volume.sources),
            pixel_array=_encoded_frames(frames, encoding, len(segmentation.lesions)),
            segmentation_type=encoding,
            # A mask is all or nothing: 255 means the voxel is inside the lesion.
            fractional_type=hd.seg.SegmentationFractionalTypeValues.OCCUPANCY,
            segment_descriptions=[
                _segment_description(lesion.label, segmentation, template, config, uids)
                for lesion in segmentation.lesions
            ],
            series_instance_uid=uids.seg_series,
            series_number=series_number,
            sop_instance_uid=uids.seg_instance,
            instance_number=1,
            manufacturer=config.manufacturer,
            manufacturer_model_name=template.device_model_name,
            software_versions=__version__,
            # The device observer name identifies this node among several of one site.
            device_serial_number=config.device_observer_name,
            series_description=template.seg_series_description,
            content_label=CONTENT_LABEL,
            content_description=f"{len(segmentation.lesions)} lesion(s), {segmentation.model_name}"[:64],
            institution_name=config.institution_name or None,
            # Frames without any lesion carry no information; omitting them keeps the SEG small.
            omit_empty_frames=True,
            # highdicom would copy the source's value and refuse an unknown one; the value
            # written is settled after both objects are built (dicomnode.report.charset).
            specific_character_set=source_character_set(analysis.volume.sources[0])[0],
            contributing_equipment=contributing_equipment(
                analysis, config, template, tasks=("segmentation",)
            ),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"cannot build the SEG: {exc}") from exc


def seg_encoding(choice: str, *, rows: int, columns: int) -> hd.seg.SegmentationTypeValues:
    """The Segmentation Type to write for frames of ``rows`` x ``columns`` pixels.

    ``"auto"`` gives BINARY when a frame fills whole bytes (Rows x Columns a multiple of 8),
    else FRACTIONAL. BINARY frames are packed one after the other, 1 bit a pixel, so a frame of
    any other size starts mid-byte; OHIF 3.13's dcmjs reads such frames in the wrong bit order
    and draws every second slice as stripes. FRACTIONAL with only 0 and 255 (8 bits a pixel) is
    read as the same mask by OHIF, dcmqi, highdicom and every other SEG reader; LABELMAP
    (Supplement 243) is an explicit choice because older readers do not know its SOP class.
    """
    if choice == "auto":
        fills_bytes = (rows * columns) % 8 == 0
        return hd.seg.SegmentationTypeValues.BINARY if fills_bytes else hd.seg.SegmentationTypeValues.FRACTIONAL
    return hd.seg.SegmentationTypeValues[choice.upper()]


def _encoded_frames(
    frames: np.ndarray, encoding: hd.seg.SegmentationTypeValues, segments: int
) -> np.ndarray:
    """The label frames as highdicom takes them for ``encoding``.

    BINARY and LABELMAP take the label map itself (one value per segment). FRACTIONAL takes
    one plane per segment, in [0, 1]: the label map one-hot encoded, so that each voxel is
    either fully inside a lesion (stored as 255) or outside it (0).
    """
    if encoding != hd.seg.SegmentationTypeValues.FRACTIONAL:
        return frames
    numbers = np.arange(1, segments + 1, dtype=frames.dtype)
    return (frames[..., np.newaxis] == numbers).astype(np.float32)


def _check_labels(segmentation: LabelVolume, volume: Volume) -> None:
    """Segment numbers must run 1..n (PS3.3 C.8.20.2) and the grid must be the CT's."""
    if segmentation.labels.shape != volume.shape:
        raise ReportError(
            f"label volume shape {segmentation.labels.shape} differs from the CT {volume.shape}"
        )
    expected = list(range(1, len(segmentation.lesions) + 1))
    if [lesion.label for lesion in segmentation.lesions] != expected:
        raise ReportError("lesion labels must be 1..n in order (they become SEG segment numbers)")
    if int(segmentation.labels.max(initial=0)) > len(segmentation.lesions):
        raise ReportError("the label volume holds a label that no lesion describes")


def _label_frames(volume: Volume, labels: np.ndarray) -> np.ndarray:
    """The label map arranged like the source frames, as highdicom pairs them by index.

    Single-frame CT: slice ``k`` is ``sources[k]``. Enhanced CT: slice ``k`` is frame
    ``frame_numbers[k]``; frames outside the volume stay empty and are then omitted.
    """
    if not volume.frame_numbers:
        if len(volume.sources) != labels.shape[0]:
            raise ReportError(f"{labels.shape[0]} label slices but {len(volume.sources)} CT images")
        return labels
    frames = np.zeros((int(volume.sources[0].NumberOfFrames), *labels.shape[1:]), labels.dtype)
    frames[np.asarray(volume.frame_numbers) - 1] = labels
    return frames


def _segment_description(
    label: int, segmentation: LabelVolume, template: SrTemplate, config: ReportConfig,
    uids: ReportUids,
) -> hd.seg.SegmentDescription:
    """PS3.3 C.8.20.2 Segment Description: AUTOMATIC with the segmentation model's identity,
    or MANUAL for contours a person drew (a supplied RTSTRUCT)."""
    manual = segmentation.supplied is not None
    return hd.seg.SegmentDescription(
        segment_number=label,
        segment_label=template.lesion_name(label),
        segmented_property_category=template.finding_category,
        segmented_property_type=template.finding_type,
        algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.MANUAL if manual
                        else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
        algorithm_identification=None if manual else hd.AlgorithmIdentificationSequence(
            name=segmentation.model_name,
            family=template.algorithm_family,
            version=segmentation.model_version,
            # Algorithm Source = the Contributing Equipment's Manufacturer (IHE AIR).
            source=config.manufacturer,
        ),
        tracking_uid=uids.tracking[label],
        tracking_id=template.lesion_name(label),
        display_color=lesion_cielab(label),
    )
