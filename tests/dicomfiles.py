"""DICOM objects the tests write about a phantom CT (test helpers, not product code)."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.phantom import Phantom


def write_seg(phantom: Phantom, masks: dict[str, np.ndarray], path: Path) -> Path:
    """A BINARY highdicom SEG of the phantom, one segment per mask, empty frames omitted."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label in enumerate(masks, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(phantom.datasets),
        pixel_array=np.stack(list(masks.values()), axis=-1).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=99,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="tests",
        manufacturer_model_name="tests",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(path)
    return path


def enhanced_ct(phantom: Phantom, order: np.ndarray) -> Dataset:
    """An Enhanced CT Image Storage instance (PS3.3 A.38) holding the phantom's slices in ``order``."""
    first = phantom.datasets[0]
    ds = Dataset()
    ds.file_meta = copy.deepcopy(first.file_meta)
    ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID", "Modality", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                    "PhotometricInterpretation"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = len(order)

    def item(**kwargs: object) -> Sequence:
        inner = Dataset()
        for key, value in kwargs.items():
            setattr(inner, key, value)
        return Sequence([inner])

    shared = Dataset()
    shared.PixelMeasuresSequence = item(PixelSpacing=first.PixelSpacing,
                                        SliceThickness=first.SliceThickness)
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelValueTransformationSequence = item(RescaleSlope="1", RescaleIntercept="-1024",
                                                   RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in order:
        frame = Dataset()
        frame.PlanePositionSequence = item(
            ImagePositionPatient=phantom.datasets[k].ImagePositionPatient)
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(phantom.datasets[k].PixelData for k in order)
    return ds
