"""DICOM objects the tests write about a phantom CT (test helpers, not product code)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

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
