"""SEG + TID 1500 SR from an Analysis: valid (dciodvfy, dsrdump), linked, deterministic, private."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report import (
    UNSTATED_DEIDENTIFICATION,
    build_reports,
    load_template,
    summarize_sr,
    summary_json,
)
from dicomnode.report.seg import seg_encoding
from dicomnode.types import (
    Analysis,
    Geometry,
    LabelVolume,
    Lesion,
    LesionFeatures,
    ModelInfo,
    Prediction,
    ReportSet,
    SeriesKey,
    Subtype,
    Volume,
)
from validate import dciodvfy_errors, dsrdump_ok

TEMPLATE = Path(__file__).resolve().parents[2] / "sr_templates" / "tid1500_tmb.toml"
PATIENT_NAME = "Secretname^Patientgiven"
PATIENT_ID = "PID-7734-SECRET"
SLICES, ROWS, COLS = 8, 24, 24
GAP_WARNING = "slice gap: 5.0 mm between slices 3 and 4 (expected 2.5 mm)"
MODELS = (
    ModelInfo("lesion-unet", "1.2.0", "3D U-Net", "segmentation"),
    ModelInfo("tmb-xgboost", "0.3.1", "XGBoost", "tmb"),
    ModelInfo("subtype-centroids", "0.1.0", "nearest centroid", "subtype"),
)
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def config() -> ReportConfig:
    return ReportConfig(institution_name="Test Hospital")


def synthetic_ct(slices: int = SLICES, rows: int = ROWS, cols: int = COLS) -> list[Dataset]:
    """A small, complete CT Image series (PS3.3 A.3) of one patient, 2.5 mm slices."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    images = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = (
            "CT",
            "Synthetic",
            2,
            k + 1,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-12.0, -12.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP, ds.AcquisitionNumber = -1024, 1, 120, 1
        ds.PixelData = np.full((rows, cols), 1024, np.uint16).tobytes()
        images.append(ds)
    return images


def header(ds: Dataset) -> Dataset:
    """What the assembly stage keeps: the dataset without its pixel data."""
    copied = copy.deepcopy(ds)
    del copied.PixelData
    return copied


def lesion_of(labels: np.ndarray, label: int, spacing: tuple[float, float, float],
              confidence: float | None = None) -> Lesion:
    voxels = np.argwhere(labels == label)
    lo, hi = voxels.min(0), voxels.max(0) + 1
    return Lesion(
        label=label,
        voxel_count=len(voxels),
        volume_ml=len(voxels) * float(np.prod(spacing)) / 1000.0,
        centroid_mm=tuple(float(c) for c in voxels.mean(0) * spacing),  # type: ignore[arg-type]
        bbox=tuple((int(a), int(b)) for a, b in zip(lo, hi)),  # type: ignore[arg-type]
        confidence=confidence,
    )


#: Lesion 1 was found by a model with this confidence; lesion 2 has none (drawn by a person).
CONFIDENCE_1 = 0.9234


def two_lesions(slices: int = SLICES, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """Label volume with lesion 1 on slices 2-4 and lesion 2 on slices 4-6 (touching slice 4).

    Lesion 1 is widest on slice 3 (its key slice); lesion 2 is a box, largest on every slice.
    """
    labels = np.zeros((slices, rows, cols), np.uint16)
    labels[2:5, 4:9, 4:10] = 1
    labels[3, 3:10, 3:11] = 1
    labels[4:7, 14:20, 13:19] = 2
    return labels


def make_analysis(
    images: list[Dataset],
    *,
    probabilities: tuple[float, ...] = (0.81, 0.22),
    subtypes: tuple[str, ...] = ("IS2", "IS4"),
    threshold: float = 0.5,
    with_lesions: bool = True,
) -> Analysis:
    """Two lesions (labels 1 and 2) with fake features and predictions, or none."""
    spacing = (2.5, 1.0, 1.0)
    shape = (len(images), int(images[0].Rows), int(images[0].Columns))
    labels = two_lesions(*shape) if with_lesions else np.zeros(shape, np.uint16)
    lesions = ((lesion_of(labels, 1, spacing, CONFIDENCE_1), lesion_of(labels, 2, spacing))
               if with_lesions else ())
    volume = Volume(
        hu=np.zeros(labels.shape, np.float32),
        geometry=Geometry(
            origin=(-12.0, -12.0, 0.0),
            row_direction=(1.0, 0.0, 0.0),
            column_direction=(0.0, 1.0, 0.0),
            slice_direction=(0.0, 0.0, 1.0),
            spacing=spacing,
        ),
        key=SeriesKey(images[0].StudyInstanceUID, images[0].SeriesInstanceUID),
        sources=tuple(header(ds) for ds in images),
        frame_of_reference_uid=images[0].FrameOfReferenceUID,
        warnings=(GAP_WARNING,),
    )
    predictions = tuple(
        Prediction(
            label=lesion.label,
            tmb_probability=p,
            tmb_threshold=threshold,
            subtype=Subtype(int(code[-1]), code, f"Imaging subtype {code[-1]}"),
        )
        for lesion, p, code in zip(lesions, probabilities, subtypes)
    )
    return Analysis(
        volume=volume,
        segmentation=LabelVolume(
            labels=labels, lesions=lesions, model_name="lesion-unet", model_version="1.2.0"
        ),
        features=tuple(
            LesionFeatures(lesion.label, ("original_shape_VoxelVolume",), (1.0,))
            for lesion in lesions
        ),
        predictions=predictions,
        models=MODELS,
    )


def written(reports: ReportSet, folder: Path) -> tuple[Path | None, Path]:
    """Write the objects as Part 10 files (as results.save does) and return their paths."""
    seg_path = None
    if reports.seg is not None:
        seg_path = folder / "seg.dcm"
        reports.seg.save_as(seg_path, enforce_file_format=True)
    sr_path = folder / "sr.dcm"
    reports.sr.save_as(sr_path, enforce_file_format=True)
    return seg_path, sr_path


def content_items(item: Dataset):
    """Every content item below ``item``, depth first."""
    for child in item.get("ContentSequence", []):
        yield child
        yield from content_items(child)


def concept(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return c.CodeValue, c.CodingSchemeDesignator


@pytest.fixture(scope="module")
def images() -> list[Dataset]:
    return synthetic_ct()


@pytest.fixture(scope="module")
def analysis(images) -> Analysis:
    return make_analysis(images)


@pytest.fixture(scope="module")
def reports(analysis, template, config) -> ReportSet:
    return build_reports(analysis, template=template, config=config, uid_seed="job-0001")


@pytest.fixture(scope="module")
def files(reports, tmp_path_factory) -> tuple[Path, Path]:
    seg_path, sr_path = written(reports, tmp_path_factory.mktemp("reports"))
    assert seg_path is not None
    return seg_path, sr_path


def test_seg_and_sr_pass_dciodvfy_and_dsrdump(files):
    seg_path, sr_path = files
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    ok, output = dsrdump_ok(sr_path)
    assert ok, output


def test_seg_has_one_binary_automatic_segment_per_lesion(files, analysis):
    seg = hd.seg.segread(files[0])
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "lesion-unet"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert item.SegmentLabel == item.TrackingID == f"Lesion {item.SegmentNumber}"
    # Frames without the segment are omitted: one frame per (segment, slice it touches).
    labels = analysis.segmentation.labels
    expected_frames = sum(
        int(np.any(labels[z] == k)) for k in (1, 2) for z in range(labels.shape[0])
    )
    assert seg.NumberOfFrames == expected_frames


def test_seg_pixels_land_on_the_right_ct_slices(files, analysis):
    seg = hd.seg.segread(files[0])
    labels = analysis.segmentation.labels
    for k, source in enumerate(analysis.volume.sources):
        for segment in (1, 2):
            expected = labels[k] == segment
            if not expected.any():
                continue
            frame = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[segment]
            )[0, :, :, 0]
            assert np.array_equal(frame.astype(bool), expected)


def test_seg_is_in_the_ct_study_and_references_the_ct_series(reports, images):
    seg = reports.seg
    assert seg.StudyInstanceUID == images[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != images[0].SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == images[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} <= {
        ds.SOPInstanceUID for ds in images
    }
    assert seg.FrameOfReferenceUID == images[0].FrameOfReferenceUID


def test_sr_groups_track_and_reference_the_seg_segments(files, reports):
    sr = hd.sr.srread(files[1])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (IHE AIR)
    segments = {str(s.TrackingUID): int(s.SegmentNumber) for s in reports.seg.SegmentSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    for group in groups:
        uid = str(group.tracking_uid)
        assert uid in segments
        assert group.tracking_identifier == f"Lesion {segments[uid]}"
        referenced = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert int(referenced.ReferencedSegmentNumber) == segments[uid]
        assert referenced.ReferencedSOPInstanceUID == reports.seg.SOPInstanceUID
        assert group.finding_type == codes.SCT.Neoplasm


def test_sr_measurements_volume_and_probability(files, analysis):
    sr = hd.sr.srread(files[1])
    for group, lesion, prediction in zip(
        sr.content.get_volumetric_roi_measurement_groups(),
        analysis.segmentation.lesions,
        analysis.predictions,
    ):
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(lesion.volume_ml, rel=1e-6)
        assert volume.unit.value == "cm3"
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(prediction.tmb_probability)
        assert probability.unit.value == "1" and probability.unit.scheme_designator == "UCUM"
        algorithm = {
            concept(c): c.TextValue for c in probability[0].ContentSequence if c.ValueType == "TEXT"
        }
        assert algorithm[("111001", "DCM")] == "tmb-xgboost"  # Algorithm Name
        assert algorithm[("111003", "DCM")] == "0.3.1"  # Algorithm Version
        assert algorithm[("111002", "DCM")] == f"threshold={prediction.tmb_threshold:g}"


def test_sr_carries_the_confidence_of_model_lesions_only(files):
    sr = hd.sr.srread(files[1])
    first, second = sr.content.get_volumetric_roi_measurement_groups()
    certainty = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
    (confidence,) = first.get_measurements(name=certainty)
    assert confidence.value == pytest.approx(CONFIDENCE_1 * 100)
    assert confidence.unit.value == "%" and confidence.unit.scheme_designator == "UCUM"
    assert second.get_measurements(name=certainty) == []


@pytest.mark.parametrize(
    ("probability", "code"),
    [(0.81, "LA9193-9"), (0.5, "LA9193-9"), (0.4999, "LA9194-7"), (0.02, "LA9194-7")],
)
def test_tmb_status_is_high_at_or_above_the_threshold(images, template, config, probability, code):
    analysis = make_analysis(images, probabilities=(probability, probability), threshold=0.5)
    sr = build_reports(analysis, template=template, config=config, uid_seed="status").sr
    statuses = [
        item.ConceptCodeSequence[0]
        for item in content_items(sr)
        if concept(item) == ("94077-5", "LN")
    ]
    assert [(s.CodeValue, s.CodingSchemeDesignator) for s in statuses] == [(code, "LN")] * 2


def test_subtype_is_coded_in_the_declared_private_scheme(reports):
    sr = reports.sr
    declared = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert "99DICOMNODE" in declared
    subtypes = [
        item.ConceptCodeSequence[0]
        for item in content_items(sr)
        if concept(item) == ("IMGSUBTYPE", "99DICOMNODE")
    ]
    assert [(s.CodeValue, s.CodingSchemeDesignator) for s in subtypes] == [
        ("IS2", "99DICOMNODE"),
        ("IS4", "99DICOMNODE"),
    ]


def test_undeclared_subtype_code_is_refused(images, template, config):
    analysis = make_analysis(images, subtypes=("IS2", "XX9"))
    with pytest.raises(ReportError, match="XX9"):
        build_reports(analysis, template=template, config=config, uid_seed="bad-subtype")


def test_sr_evidence_lists_the_seg_and_every_ct_image(reports, images):
    evidence = reports.sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == images[0].StudyInstanceUID
    by_series = {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
        for s in evidence[0].ReferencedSeriesSequence
    }
    assert by_series[images[0].SeriesInstanceUID] == {ds.SOPInstanceUID for ds in images}
    assert by_series[reports.seg.SeriesInstanceUID] == {reports.seg.SOPInstanceUID}


def test_sr_has_device_observer_procedure_and_image_library(files):
    sr = hd.sr.srread(files[1])
    (observer,) = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert attributes.name == "dicomnode" and attributes.model_name
    root = pydicom.dcmread(files[1])
    assert concept(root) == ("126000", "DCM")
    procedures = [i for i in root.ContentSequence if concept(i) == ("121058", "DCM")]
    assert procedures[0].ConceptCodeSequence[0].CodeValue == "25045-6"
    assert any(concept(i) == ("111028", "DCM") for i in root.ContentSequence)  # Image Library


def test_sr_carries_the_research_note_and_the_volume_warning(reports, template):
    texts = [str(i.TextValue) for i in content_items(reports.sr) if i.ValueType == "TEXT"]
    assert template.research_note in texts
    assert any(GAP_WARNING in t for t in texts)


def test_lesion_without_prediction_keeps_its_volume_and_says_why(analysis, template, config):
    features = (
        analysis.features[0],
        dataclasses.replace(analysis.features[1], warnings=("glcm features not computable",)),
    )
    partial = dataclasses.replace(analysis, features=features, predictions=analysis.predictions[:1])
    reports = build_reports(partial, template=template, config=config, uid_seed="partial")
    groups = hd.sr.Comprehensive3DSR.from_dataset(reports.sr).content
    second = groups.get_volumetric_roi_measurement_groups()[1]
    assert [m.name for m in second.get_measurements()] == [codes.SCT.Volume]
    evaluated = [e.name for e in second.get_qualitative_evaluations()]
    assert template.tmb_status not in evaluated and template.subtype_concept not in evaluated
    texts = [str(i.TextValue) for i in content_items(reports.sr) if i.ValueType == "TEXT"]
    assert "Warning: lesion 2: glcm features not computable" in texts
    assert "Warning: lesion 2: no TMB or subtype prediction was made" in texts
    assert summary_json(partial, reports)["lesions"][1]["tmb_status"] is None


def test_same_seed_same_uids_new_seed_new_uids(analysis, template, config):
    def uids(seed: str) -> list[str]:
        r = build_reports(analysis, template=template, config=config, uid_seed=seed)
        tracking = [str(s.TrackingUID) for s in r.seg.SegmentSequence]
        return [
            r.seg.SeriesInstanceUID,
            r.seg.SOPInstanceUID,
            r.sr.SeriesInstanceUID,
            r.sr.SOPInstanceUID,
            *tracking,
        ]

    first, again, other = uids("job-A"), uids("job-A"), uids("job-B")
    assert first == again
    assert len(set(first)) == len(first)
    assert not set(first) & set(other)


def test_series_numbers_follow_the_base(analysis, template, config):
    r = build_reports(
        analysis, template=template, config=config, uid_seed="n", series_number_base=700
    )
    assert (r.seg.SeriesNumber, r.sr.SeriesNumber) == (700, 701)


def test_no_lesion_gives_a_valid_sr_that_says_so_and_no_seg(images, template, config, tmp_path):
    analysis = make_analysis(images, with_lesions=False)
    reports = build_reports(analysis, template=template, config=config, uid_seed="empty")
    # No SEG and no key image; the PDF says that nothing was found, for PACS-only readers.
    assert reports.seg is None and reports.key_images == ()
    assert reports.datasets() == (reports.sr, reports.pdf)
    _, sr_path = written(reports, tmp_path)
    assert dciodvfy_errors(sr_path) == []
    ok, output = dsrdump_ok(sr_path)
    assert ok, output
    sr = hd.sr.srread(sr_path)
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    root = pydicom.dcmread(sr_path)
    assert not any(concept(i) == ("126010", "DCM") for i in root.ContentSequence)
    (evaluations,) = [i for i in root.ContentSequence if concept(i) == QUALITATIVE_EVALUATIONS]
    findings = [i.TextValue for i in evaluations.ContentSequence if concept(i) == ("121071", "DCM")]
    assert findings == [template.no_lesion_text]
    assert "No lesion detected" in summarize_sr(root)


def test_summaries_describe_lesions_without_patient_identity(analysis, reports):
    text = summarize_sr(reports.sr)
    document = json.dumps(summary_json(analysis, reports))
    for secret in (PATIENT_ID, *PATIENT_NAME.split("^")):
        assert secret not in text
        assert secret not in document
    assert "Lesion 1" in text and "Lesion 2" in text
    assert "High" in text and "Low" in text and "Imaging subtype 2" in text
    assert "For research use only" in text


def test_summary_json_fields(analysis, reports):
    summary = json.loads(json.dumps(summary_json(analysis, reports)))
    assert summary["study_instance_uid"] == analysis.volume.key.study_uid
    assert summary["series_instance_uid"] == analysis.volume.key.series_uid
    first = summary["lesions"][0]
    assert first["label"] == 1 and first["tmb_status"] == "high" and first["tmb_threshold"] == 0.5
    assert first["subtype"]["code"] == "IS2" and len(first["centroid_mm"]) == 3
    assert summary["lesions"][1]["tmb_status"] == "low"
    assert [m["name"] for m in summary["models"]] == [m.name for m in MODELS]
    assert summary["warnings"] == [GAP_WARNING]
    assert summary["outputs"]["seg"]["sop_instance_uid"] == reports.seg.SOPInstanceUID
    assert summary["outputs"]["sr"]["sop_instance_uid"] == reports.sr.SOPInstanceUID


def test_labels_that_do_not_match_the_lesions_are_refused(analysis, template, config):
    labels = analysis.segmentation.labels.copy()
    labels[0, 0, 0] = 3
    broken = dataclasses.replace(
        analysis, segmentation=dataclasses.replace(analysis.segmentation, labels=labels)
    )
    with pytest.raises(ReportError, match="label"):
        build_reports(broken, template=template, config=config, uid_seed="broken")


# -- real third-party data (../shared/data) -------------------------------------------------


def test_reports_over_pydicom_ct_series(shared_data, template, config, tmp_path):
    folder = shared_data / "pydicom/pydicom/data/test_files/dicomdirtests/77654033/CT2"
    if not folder.is_dir():
        pytest.skip(f"{folder} missing")
    images = sorted(
        (pydicom.dcmread(p) for p in folder.iterdir()),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    base = make_analysis(synthetic_ct())
    labels = np.zeros((len(images), images[0].Rows, images[0].Columns), np.uint16)
    labels[0:2, 2:6, 2:6] = 1
    labels[3, 9:14, 10:14] = 2
    spacing = (1.25, *map(float, images[0].PixelSpacing))
    analysis = dataclasses.replace(
        base,
        volume=dataclasses.replace(
            base.volume,
            hu=np.zeros(labels.shape, np.float32),
            key=SeriesKey(images[0].StudyInstanceUID, images[0].SeriesInstanceUID),
            sources=tuple(header(ds) for ds in images),
            frame_of_reference_uid=images[0].FrameOfReferenceUID,
        ),
        segmentation=dataclasses.replace(
            base.segmentation,
            labels=labels,
            lesions=tuple(lesion_of(labels, k, spacing) for k in (1, 2)),
        ),
    )
    seg_path, sr_path = written(
        build_reports(analysis, template=template, config=config, uid_seed="ct2"), tmp_path
    )
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    assert dsrdump_ok(sr_path)[0]
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == images[0].SeriesInstanceUID


@pytest.mark.filterwarnings("ignore:The string .Anonymous. is unlikely:UserWarning")
def test_seg_over_a_multiframe_ct_uses_the_frame_numbers(shared_data, template, config, tmp_path):
    path = shared_data / "dcmqi/data/segmentations/24x38x3/multiframe/mf.dcm"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    source = pydicom.dcmread(path)
    frames = int(source.NumberOfFrames)
    labels = np.zeros((frames, source.Rows, source.Columns), np.uint16)
    labels[0, 3:8, 3:9] = 1  # slice 0 of the volume is frame 3 of the file (reversed order)
    base = make_analysis(synthetic_ct())
    analysis = dataclasses.replace(
        base,
        volume=dataclasses.replace(
            base.volume,
            hu=np.zeros(labels.shape, np.float32),
            key=SeriesKey(source.StudyInstanceUID, source.SeriesInstanceUID),
            sources=(header(source),),
            frame_numbers=tuple(range(frames, 0, -1)),
            frame_of_reference_uid=source.FrameOfReferenceUID,
        ),
        segmentation=dataclasses.replace(
            base.segmentation, labels=labels, lesions=(lesion_of(labels, 1, (1.0, 1.0, 1.0)),)
        ),
        predictions=base.predictions[:1],
    )
    reports = build_reports(analysis, template=template, config=config, uid_seed="mf")
    seg_path, sr_path = written(reports, tmp_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    assert dsrdump_ok(sr_path)[0]
    (frame,) = reports.seg.PerFrameFunctionalGroupsSequence
    source_ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
    assert source_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(source_ref.ReferencedFrameNumber) == frames


@pytest.mark.parametrize(
    "relative",
    [
        "highdicom/data/test_files/sr_document_with_multiple_groups.dcm",
        "dcmqi/data/sr-example/sr.dcm",
    ],
)
def test_summarize_sr_reads_other_tools_reports(shared_data, relative):
    path = shared_data / relative
    if not path.is_file():
        pytest.skip(f"{path} missing")
    text = summarize_sr(pydicom.dcmread(path))
    assert "measurement group" in text and "Volume" in text


def test_over_long_values_copied_from_the_source_are_shortened():
    from pydicom import Dataset

    from dicomnode.report import fit_inherited_values

    ds = Dataset()
    ds.StudyID = "IBSI_1_STS_001_CT"  # 17 characters: invalid SH, as in the real IBSI CT
    ds.InstitutionName = "Clinic"
    assert fit_inherited_values(ds) == ["StudyID"]
    assert ds.StudyID == "IBSI_1_STS_001_C" and ds.InstitutionName == "Clinic"


def test_a_shortened_value_is_reported_once_per_report_without_its_value(template, config,
                                                                          caplog):
    ct = synthetic_ct()
    for ds in ct:
        ds.StudyID = "IBSI_1_STS_001_CT"
    reports = build_reports(make_analysis(ct), template=template, config=config,
                            uid_seed="long-study-id")
    assert len(reports.datasets()) > 2  # SEG, SR, key images, PDF: each copied the Study ID
    assert all(ds.StudyID == "IBSI_1_STS_001_C" for ds in reports.datasets())
    lines = [r.getMessage() for r in caplog.records if "StudyID" in r.getMessage()]
    assert len(lines) == 1 and "IBSI" not in lines[0]


def test_a_source_that_says_deidentified_without_a_method_still_gives_valid_outputs(
        template, config, tmp_path):
    ct = synthetic_ct()
    for ds in ct:  # as TCIA ships some series: the flag without the Type 1C method
        ds.PatientIdentityRemoved = "YES"
    reports = build_reports(make_analysis(ct), template=template, config=config, uid_seed="tcia")
    seg_path, sr_path = written(reports, tmp_path)
    for path in (seg_path, sr_path):
        assert dciodvfy_errors(path) == [], path.name
        written_ds = pydicom.dcmread(path)
        assert written_ds.PatientIdentityRemoved == "YES"
        assert written_ds.DeidentificationMethod == UNSTATED_DEIDENTIFICATION
        assert written_ds.PatientName == ct[0].PatientName  # nothing about the patient changed
    assert "DeidentificationMethod" not in ct[0]  # the source is left as it was
    ok, output = dsrdump_ok(sr_path)
    assert ok, output


def test_no_warning_carries_the_patients_name(template, config):
    ct = synthetic_ct()
    for ds in ct:  # a one-component name: highdicom warns, quoting it
        ds.PatientName = "Onlyname"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_reports(make_analysis(ct), template=template, config=config, uid_seed="name")
    assert not [w for w in caught if "Onlyname" in str(w.message)]


# -- what viewers show: SEG encoding, colours, planar groups ------------------------------


@pytest.mark.parametrize(
    ("choice", "rows", "columns", "expected"),
    [
        ("auto", 24, 24, "BINARY"),      # 576 pixels: every frame starts on a byte
        ("auto", 202, 198, "FRACTIONAL"),  # the sarcoma CT's frame size: 39996 pixels
        ("auto", 23, 23, "FRACTIONAL"),
        ("binary", 23, 23, "BINARY"),
        ("fractional", 24, 24, "FRACTIONAL"),
        ("labelmap", 24, 24, "LABELMAP"),
    ],
)
def test_seg_encoding_follows_the_frame_size(choice, rows, columns, expected):
    assert seg_encoding(choice, rows=rows, columns=columns).value == expected


@pytest.fixture(scope="module")
def odd_sized(template, config, tmp_path_factory):
    """A 23 x 21 CT, whose 483-pixel frames would start mid-byte in a BINARY SEG."""
    images = synthetic_ct(rows=23, cols=21)
    analysis = make_analysis(images)
    reports = build_reports(analysis, template=template, config=config, uid_seed="odd")
    return analysis, reports, written(reports, tmp_path_factory.mktemp("odd"))


def test_odd_sized_frames_give_a_pseudo_binary_fractional_seg(odd_sized):
    analysis, _, (seg_path, _) = odd_sized
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "FRACTIONAL"
    assert seg.SegmentationFractionalType == "OCCUPANCY"
    assert seg.BitsAllocated == 8 and int(seg.MaximumFractionalValue) == 255
    assert set(np.unique(seg.pixel_array)) == {0, 255}  # a mask, not a probability map
    labels = analysis.segmentation.labels
    for k, source in enumerate(analysis.volume.sources):
        for segment in (1, 2):
            if not (labels[k] == segment).any():
                continue
            frame = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[segment],
                rescale_fractional=False,
            )[0, :, :, 0]
            assert np.array_equal(frame == 255, labels[k] == segment), (k, segment)


def test_every_segment_has_its_own_display_colour(reports):
    colours = [tuple(s.RecommendedDisplayCIELabValue) for s in reports.seg.SegmentSequence]
    assert len(colours) == 2 and colours[0] != colours[1]


def planar_and_volumetric_groups(sr: Dataset) -> list[Dataset]:
    measurements = next(c for c in sr.ContentSequence
                        if c.ConceptNameCodeSequence[0].CodeValue == "126010")
    return list(measurements.ContentSequence)


def test_each_lesion_has_an_outline_on_its_largest_slice_before_its_volume_group(
    files, analysis, reports
):
    labels = analysis.segmentation.labels
    sources = analysis.volume.sources
    sr = hd.sr.srread(files[1])
    planar = {str(g.tracking_uid): g for g in sr.content.get_planar_roi_measurement_groups()}
    volumetric = {str(g.tracking_uid): g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert planar.keys() == volumetric.keys() and len(planar) == 2
    segments = {str(s.TrackingUID): int(s.SegmentNumber) for s in reports.seg.SegmentSequence}
    for uid, group in planar.items():
        label = segments[uid]
        # Lesion 1 is widest on slice 3; lesion 2, a box on slices 4-6, in its middle.
        largest = {1: 3, 2: 5}[label]
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert np.array_equal(points[0], points[-1])  # closed
        source = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == sources[largest].SOPInstanceUID
        # The outline runs along the lesion's border: inside its bounding box, edge included.
        rows, cols = np.nonzero(labels[largest] == label)
        assert points[:, 0].min() >= cols.min() and points[:, 0].max() <= cols.max() + 1
        assert points[:, 1].min() >= rows.min() and points[:, 1].max() <= rows.max() + 1
        area = next(m for m in group.get_measurements() if m.name == codes.SCT.Area)
        assert area.value == pytest.approx(len(rows) * 1.0 * 1.0)  # 1 x 1 mm pixels
        assert area.unit.value == "mm2"
    # Planar group first: OHIF merges the groups of a Tracking UID in document order.
    order = [g.ContentSequence[1].UID for g in planar_and_volumetric_groups(reports.sr)]
    assert order == [order[0], order[0], order[2], order[2]] and order[0] != order[2]
    first = planar_and_volumetric_groups(reports.sr)[0]
    assert any(i.ValueType == "SCOORD" for i in first.ContentSequence)


def test_the_first_five_numbers_ohif_shows_carry_the_predictions(reports, template):
    """OHIF shows the first five NUM items of a lesion's merged groups and no CODE item."""
    groups = planar_and_volumetric_groups(reports.sr)
    shown = [(i.ConceptNameCodeSequence[0].CodeMeaning,
              float(i.MeasuredValueSequence[0].NumericValue),
              i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
             for g in groups[:2] for i in g.ContentSequence if i.ValueType == "NUM"][:5]
    names = [name for name, _, _ in shown]
    assert names == ["Area", "TMB-high probability (research)", "Imaging subtype (research)",
                     "Volume", "Certainty of Finding"]
    assert shown[1][1:] == (81.0, "%")  # lesion 1's probability 0.81
    assert shown[2][1:] == (2.0, "{subtype}")  # IS2


def test_reports_with_planar_groups_pass_dciodvfy_and_dsrdump(odd_sized):
    _, _, (_, sr_path) = odd_sized
    assert dciodvfy_errors(sr_path) == []
    ok, output = dsrdump_ok(sr_path)
    assert ok, output


# -- IHE AI Results: who made the result ---------------------------------------------------


def processing_equipment(ds: Dataset) -> dict[str, Dataset]:
    """Contributing Equipment items with purpose (109102, DCM) and a Device UID, by model name."""
    return {str(item.ManufacturerModelName): item for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
            and "DeviceUID" in item}


def test_seg_and_sr_list_the_pipeline_and_each_model_as_equipment(reports, template, config):
    seg_items = processing_equipment(reports.seg)
    sr_items = processing_equipment(reports.sr)
    pipeline = template.device_model_name
    assert set(seg_items) == {pipeline, "lesion-unet"}
    assert set(sr_items) == {pipeline, "lesion-unet", "tmb-xgboost", "subtype-centroids"}
    assert sr_items["tmb-xgboost"].SoftwareVersions == "0.3.1"
    assert len({str(i.DeviceUID) for i in sr_items.values()}) == 4
    assert seg_items["lesion-unet"].DeviceUID == sr_items["lesion-unet"].DeviceUID
    # The SR's device observer is the pipeline's equipment item (AIR Table 6.5.3.1-1).
    observer_uid = next(i.UID for i in reports.sr.ContentSequence
                        if i.ValueType == "UIDREF"
                        and i.ConceptNameCodeSequence[0].CodeValue == "121012")
    assert observer_uid == sr_items[pipeline].DeviceUID
    # The SEG's algorithm is the equipment's model, from its manufacturer.
    algorithm = reports.seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "lesion-unet"
    assert algorithm.AlgorithmSource == config.manufacturer == seg_items["lesion-unet"].Manufacturer


def test_a_new_model_version_is_a_new_device(images, template, config):
    first = build_reports(make_analysis(images), template=template, config=config, uid_seed="v")
    newer = dataclasses.replace(
        make_analysis(images),
        models=(MODELS[0], dataclasses.replace(MODELS[1], version="0.4.0"), MODELS[2]))
    second = build_reports(newer, template=template, config=config, uid_seed="v")
    before, after = processing_equipment(first.sr), processing_equipment(second.sr)
    assert before["tmb-xgboost"].DeviceUID != after["tmb-xgboost"].DeviceUID
    assert before["lesion-unet"].DeviceUID == after["lesion-unet"].DeviceUID
    assert (before[template.device_model_name].DeviceUID
            != after[template.device_model_name].DeviceUID)


def test_the_numbers_ohif_shows_name_the_model_that_made_them(reports):
    planar = planar_and_volumetric_groups(reports.sr)[0]
    algorithms = {
        i.ConceptNameCodeSequence[0].CodeMeaning: next(
            c.TextValue for c in i.ContentSequence
            if c.ConceptNameCodeSequence[0].CodeValue == "111001")
        for i in planar.ContentSequence if i.ValueType == "NUM" and "ContentSequence" in i
    }
    assert algorithms == {"TMB-high probability (research)": "tmb-xgboost",
                          "Imaging subtype (research)": "subtype-centroids"}
