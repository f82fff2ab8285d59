"""A radiologist's own contours as the segmentation: RTSTRUCT and SEG measured on their CT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomfiles import write_seg
from dicomnode.analyse.supplied import newest_for_series, referenced_series, supplied_segmentation
from dicomnode.assemble import assemble
from dicomnode.cohort import CohortRow, load_case
from dicomnode.config import Config, SegmentationConfig
from dicomnode.errors import InputRejected, MaskError
from dicomnode.phantom import make_phantom_study
from dicomnode.pipeline import Pipeline


@pytest.fixture(scope="module")
def phantom():
    return make_phantom_study(10006, shape=(12, 48, 48), spacing=(2.5, 2.0, 2.0), n_lesions=2)


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_config(Config(segmentation=SegmentationConfig(device="cpu")))


def test_a_clinicians_rtstruct_is_measured_as_drawn(shared_data: Path) -> None:
    folder = shared_data / "ibsi_sts_001" / "dicom" / "CT"
    volume = assemble([pydicom.dcmread(p) for p in sorted((folder / "image").iterdir())])
    rtstruct = pydicom.dcmread(folder / "mask" / "RS.dcm")
    assert volume.key.series_uid in referenced_series(rtstruct)
    labels, warnings = supplied_segmentation(rtstruct, volume)
    truth = load_case(CohortRow("STS_001", str(folder / "image"), str(folder / "mask" / "RS.dcm"),
                                "GTV_Mass_CT", None, None, {}, 1), base_dir=folder)
    gtv = labels.supplied.names.index("GTV_Mass_CT") + 1
    assert np.array_equal(labels.labels == gtv, truth.mask)
    assert labels.supplied.kind == "RTSTRUCT" and "MIM" in labels.supplied.creator
    assert labels.lesions[gtv - 1].confidence is None  # drawn by a person
    assert all("no voxel" in w for w in warnings)
    assert "PixelData" not in labels.supplied.header


def test_a_seg_keeps_its_segment_numbers_and_leaves_out_empty_segments(phantom, tmp_path) -> None:
    first, second = (np.zeros(phantom.hu.shape, dtype=bool) for _ in range(2))
    first[2:5, 10:20, 10:20] = True
    second[7:9, 30:36, 30:36] = True
    path = write_seg(phantom, {"kept A": first, "kept B": second}, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    volume = assemble(list(phantom.datasets))
    labels, warnings = supplied_segmentation(seg, volume)
    assert labels.supplied.numbers == (1, 2) and labels.supplied.names == ("kept A", "kept B")
    assert np.array_equal(labels.labels == 1, first) and np.array_equal(labels.labels == 2, second)
    assert warnings == ()
    seg.SegmentSequence[1].SegmentLabel = "deleted"
    for frame in seg.PerFrameFunctionalGroupsSequence:  # all of segment 2's frames dropped
        frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber = 1
    labels, warnings = supplied_segmentation(seg, volume)
    assert labels.supplied.numbers == (1,) and len(labels.lesions) == 1
    assert warnings and "segment 2 'deleted' has no voxel" in warnings[0]


def test_a_seg_on_another_scan_is_refused(phantom, tmp_path) -> None:
    path = write_seg(phantom, {"A": phantom.label_map == phantom.lesion_labels[0]},
                     tmp_path / "seg.dcm")
    seg = pydicom.dcmread(path)
    seg.FrameOfReferenceUID = "1.2.3.999"
    with pytest.raises(MaskError, match="drawn on another scan"):
        supplied_segmentation(seg, assemble(list(phantom.datasets)))


def test_the_newest_segmentation_of_the_series_wins(phantom, tmp_path) -> None:
    path = write_seg(phantom, {"A": phantom.label_map == phantom.lesion_labels[0]},
                     tmp_path / "seg.dcm")
    older, newer, elsewhere = (pydicom.dcmread(path) for _ in range(3))
    older.ContentDate, newer.ContentDate, elsewhere.ContentDate = "20260101", "20260102", "20270101"
    elsewhere.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4"
    series = phantom.datasets[0].SeriesInstanceUID
    assert newest_for_series([older, newer, elsewhere], series) is newer
    assert newest_for_series([elsewhere], series) is None


def test_the_source_setting_decides_between_model_and_supplied(phantom, pipeline, tmp_path) -> None:
    path = write_seg(phantom, {"A": phantom.label_map == phantom.lesion_labels[0]},
                     tmp_path / "seg.dcm")
    given = pydicom.dcmread(path)
    given.SegmentSequence[0].TrackingID, given.SegmentSequence[0].TrackingUID = "A", "1.2.3.4.5"
    datasets = [*phantom.datasets, given]
    run = pipeline.run(datasets, uid_seed="s")
    supplied = run.analysis
    assert supplied.segmentation.supplied is not None
    assert [m.task for m in supplied.models] == ["tmb", "subtype"]  # no segmentation model
    # The SR tracks the supplied segment as the finding it already is (its Tracking UID).
    groups = next(i for i in run.reports.sr.ContentSequence
                  if i.ConceptNameCodeSequence[0].CodeValue == "126010").ContentSequence
    tracking = {c.UID for g in groups for c in g.ContentSequence if c.ValueType == "UIDREF"
                and c.ConceptNameCodeSequence[0].CodeValue == "112040"}
    assert tracking == {"1.2.3.4.5"}
    model_only = Pipeline(dataclasses.replace(
        pipeline.config, segmentation=SegmentationConfig(device="cpu", source="model")),
        segmenter=pipeline.segmenter, measurer=pipeline.measurer,
        predictor=pipeline.predictor, template=pipeline.template)
    assert model_only.run(datasets, uid_seed="m").analysis.segmentation.supplied is None
    supplied_only = Pipeline(dataclasses.replace(
        pipeline.config, segmentation=SegmentationConfig(device="cpu", source="supplied")),
        segmenter=pipeline.segmenter, measurer=pipeline.measurer,
        predictor=pipeline.predictor, template=pipeline.template)
    with pytest.raises(InputRejected, match="no RTSTRUCT or SEG references this CT series"):
        supplied_only.run(list(phantom.datasets), uid_seed="x")
