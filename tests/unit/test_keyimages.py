"""The human-readable fallback: key images (Secondary Capture) and the PDF report (Encapsulated
PDF): valid (dciodvfy), in the CT's study, drawn where the lesion is, and saying the same as
each other."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
)
from test_report import (
    GAP_WARNING,
    PATIENT_ID,
    TEMPLATE,
    header,
    lesion_of,
    make_analysis,
    synthetic_ct,
)

from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report import load_template
from dicomnode.report.charset import settle_character_set
from dicomnode.report.findings import DRAWN, NOT_PREDICTED, RESEARCH_CAPTION, findings
from dicomnode.report.keyimages import MIN_CT_PIXELS, build_key_images, render_key_image
from dicomnode.report.keyslice import KeySlice, key_slices
from dicomnode.report.palette import lesion_rgb
from dicomnode.report.pdf import build_pdf_report, render_pdf
from dicomnode.report.seg import ReportUids
from dicomnode.types import Analysis, SeriesKey, SuppliedSegmentation
from validate import dciodvfy_errors

SEED = "job-key-images"
KEY_IMAGE_SERIES, PDF_SERIES = 903, 904


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def config() -> ReportConfig:
    return ReportConfig(institution_name="Test Hospital")


@pytest.fixture(scope="module")
def images() -> list[Dataset]:
    return synthetic_ct()


@pytest.fixture(scope="module")
def analysis(images) -> Analysis:
    return make_analysis(images)


@pytest.fixture(scope="module")
def slices(analysis) -> tuple[KeySlice, ...]:
    return key_slices(analysis.volume, analysis.segmentation)


def uids_of(analysis: Analysis, seed: str = SEED) -> ReportUids:
    return ReportUids.derive(seed, tuple(lesion.label for lesion in analysis.segmentation.lesions))


def build_both(analysis: Analysis, template, config,
               seed: str = SEED) -> tuple[list[Dataset], Dataset]:
    """Key images and PDF as build_reports makes them: one character set settled for all."""
    slices = key_slices(analysis.volume, analysis.segmentation)
    uids = uids_of(analysis, seed)
    key_images = build_key_images(analysis, slices, template=template, config=config, uids=uids,
                                  series_number=KEY_IMAGE_SERIES)
    pdf = build_pdf_report(analysis, slices, template=template, config=config, uids=uids,
                           series_number=PDF_SERIES)
    settle_character_set([*key_images, pdf], analysis.volume.sources[0])
    return key_images, pdf


@pytest.fixture(scope="module")
def built(analysis, template, config) -> tuple[list[Dataset], Dataset]:
    return build_both(analysis, template, config)


@pytest.fixture(scope="module")
def files(built, tmp_path_factory) -> tuple[list[Path], Path]:
    """The objects written as Part 10 files and read back."""
    folder = tmp_path_factory.mktemp("fallback")
    key_images, pdf = built
    paths = []
    for number, ds in enumerate(key_images, start=1):
        paths.append(folder / f"key-image-{number:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    pdf.save_as(folder / "report-pdf.dcm", enforce_file_format=True)
    return paths, folder / "report-pdf.dcm"


def pdf_bytes(ds: Dataset) -> bytes:
    return bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)]


def pdf_text(ds: Dataset, tmp_path: Path) -> str:
    """What ``pdftotext`` (poppler-utils) reads from the encapsulated PDF."""
    if shutil.which("pdftotext") is None:
        pytest.skip("pdftotext is not installed (Debian package poppler-utils)")
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf_bytes(ds))
    run = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True,
                         text=True, check=True, timeout=60)
    return run.stdout


# -- the results table --------------------------------------------------------------------


def test_findings_rows_say_what_the_sr_says(analysis, template):
    table = findings(analysis, template)
    first, second = table.rows
    assert first.cells() == ("Lesion 1", "0.290 ml", "92 %", "81 %", "High (threshold 50 %)",
                             "Imaging subtype 2")
    assert second.cells() == ("Lesion 2", "0.270 ml", DRAWN, "22 %", "Low (threshold 50 %)",
                              "Imaging subtype 4")
    assert table.caption == RESEARCH_CAPTION
    assert RESEARCH_CAPTION == "research prediction from imaging, not a sequencing result"
    assert table.models == ("Segmentation: lesion-unet 1.2.0 (3D U-Net)",
                            "TMB: tmb-xgboost 0.3.1 (XGBoost)",
                            "Subtype: subtype-centroids 0.1.0 (nearest centroid)")
    assert GAP_WARNING in table.warnings


def test_a_lesion_without_prediction_shows_dashes(images, template):
    full = make_analysis(images)
    analysis = dataclasses.replace(full, predictions=full.predictions[:1])
    row = findings(analysis, template).row(2)
    assert (row.tmb_probability, row.tmb_status, row.subtype) == (NOT_PREDICTED,) * 3
    assert row.volume == "0.270 ml"


def test_a_supplied_segmentation_is_named_instead_of_the_segmentation_model(analysis, template):
    supplied = SuppliedSegmentation(
        kind="RTSTRUCT", sop_class_uid=RTStructureSetStorage, sop_instance_uid="1.2.3.4",
        series_uid="1.2.3", creator="MIM 7.1", numbers=(1, 2), names=("GTV", "GTV2"),
        header=Dataset())
    drawn = dataclasses.replace(
        analysis, segmentation=dataclasses.replace(analysis.segmentation, supplied=supplied))
    models = findings(drawn, template).models
    assert models[0] == "Segmentation: supplied RTSTRUCT made by MIM 7.1, measured as drawn"
    assert not any("lesion-unet" in line for line in models)


def test_an_undeclared_subtype_is_refused_as_the_sr_refuses_it(images, template):
    with pytest.raises(ReportError, match="XX9"):
        findings(make_analysis(images, subtypes=("IS2", "XX9")), template)


# -- key images ---------------------------------------------------------------------------


def test_one_secondary_capture_per_lesion_in_a_new_series_of_the_ct_study(built, analysis, images,
                                                                         template):
    key_images, _ = built
    uids = uids_of(analysis)
    assert len(key_images) == len(analysis.segmentation.lesions) == 2
    for number, (ds, lesion) in enumerate(zip(key_images, analysis.segmentation.lesions), start=1):
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.SOPInstanceUID == uids.key_images[lesion.label]
        assert ds.SeriesInstanceUID == uids.key_image_series != images[0].SeriesInstanceUID
        assert ds.StudyInstanceUID == images[0].StudyInstanceUID
        assert (ds.SeriesNumber, ds.InstanceNumber) == (KEY_IMAGE_SERIES, number)
        assert ds.SeriesDescription == template.key_image_series_description
        assert (ds.Modality, ds.ConversionType) == ("OT", "WSD")
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel) == ("RGB", 3)
        # Results are burned in, the patient's identity is not (PS3.3 C.7.6.1 Burned In
        # Annotation is about identifying text).
        assert ds.BurnedInAnnotation == "NO"
        assert (ds.PatientID, ds.AccessionNumber) == (PATIENT_ID, images[0].AccessionNumber)
        assert max(ds.Rows, ds.Columns) >= MIN_CT_PIXELS


def test_source_image_sequence_points_to_the_key_slice(built, slices, images):
    key_images, _ = built
    for ds, key in zip(key_images, slices):
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == images[key.slice_index].SOPInstanceUID
        assert item.ReferencedSOPClassUID == images[key.slice_index].SOPClassUID
        assert "ReferencedFrameNumber" not in item
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def colour_near(pixels: np.ndarray, x: float, y: float, colour: tuple[int, int, int]) -> bool:
    """Whether ``colour`` is exactly in the 3 x 3 pixels around image point (x, y)."""
    column, row = int(x), int(y)
    window = pixels[max(0, row - 1):row + 2, max(0, column - 1):column + 2]
    return bool(np.all(window == colour, axis=-1).any())


def test_the_stored_pixels_show_the_outline_in_the_lesion_colour(files, slices, analysis):
    paths, _ = files
    rows = analysis.volume.shape[1]
    for path, key in zip(paths, slices):
        pixels = pydicom.dcmread(path).pixel_array
        # The CT part is square here (square pixels, 24 x 24), as tall as the image.
        scale = pixels.shape[0] / rows
        colour = lesion_rgb(key.label)
        points = key.outline * scale
        along = np.vstack([points, (points[:-1] + points[1:]) / 2])  # vertices and midpoints
        assert all(colour_near(pixels, x, y, colour) for x, y in along)
        # Inside the outline the CT shows through (HU 0 in a W 400 / L 40 window: grey).
        centre_x, centre_y = points.mean(axis=0)
        assert tuple(pixels[int(centre_y), int(centre_x)]) != colour


def test_the_panel_beside_the_ct_holds_the_results(analysis, slices, template):
    table = findings(analysis, template)
    for key in slices:
        pixels = render_key_image(analysis.volume, key, table)
        ct_width = pixels.shape[0]  # the square CT part comes first
        panel = pixels[:, ct_width:]
        assert panel.shape[1] > 0
        written = np.any(panel > 60, axis=-1)
        assert written.sum() > 2000  # lines of text, not a stray pixel
        # The lesion's name is written in its colour.
        assert np.all(panel == lesion_rgb(key.label), axis=-1).any()


def test_key_images_pass_dciodvfy(files):
    paths, _ = files
    for path in paths:
        assert dciodvfy_errors(path) == []


def test_key_slices_that_do_not_match_the_lesions_are_refused(analysis, slices, template, config):
    with pytest.raises(ReportError, match="key slices"):
        build_key_images(analysis, slices[:1], template=template, config=config,
                         uids=uids_of(analysis), series_number=KEY_IMAGE_SERIES)


# -- the PDF report -----------------------------------------------------------------------


def test_pdf_report_passes_dciodvfy(files):
    assert dciodvfy_errors(files[1]) == []


def test_pdf_report_is_an_encapsulated_pdf_in_the_ct_study(built, analysis, images, template):
    _, pdf = built
    uids = uids_of(analysis)
    assert pdf.SOPClassUID == EncapsulatedPDFStorage
    assert (pdf.SOPInstanceUID, pdf.SeriesInstanceUID) == (uids.pdf_instance, uids.pdf_series)
    assert pdf.StudyInstanceUID == images[0].StudyInstanceUID
    assert pdf.SeriesInstanceUID not in (images[0].SeriesInstanceUID, uids.key_image_series)
    assert (pdf.Modality, pdf.ConversionType, pdf.SeriesNumber) == ("DOC", "WSD", PDF_SERIES)
    assert pdf.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert pdf.DocumentTitle == template.pdf_title
    assert pdf.SeriesDescription == template.pdf_series_description
    assert pdf.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert pdf.BurnedInAnnotation == "YES"  # the PDF names the patient
    document = bytes(pdf.EncapsulatedDocument)
    assert len(document) % 2 == 0
    assert pdf_bytes(pdf).startswith(b"%PDF-") and pdf_bytes(pdf).rstrip().endswith(b"%%EOF")
    # Made from the whole series, as the SR's evidence says.
    assert [i.ReferencedSOPInstanceUID for i in pdf.SourceInstanceSequence] == [
        ds.SOPInstanceUID for ds in images]


def test_pdf_text_has_the_caption_the_table_the_models_and_the_patient(built, analysis, template,
                                                                      tmp_path):
    text = pdf_text(built[1], tmp_path)
    table = findings(analysis, template)
    assert RESEARCH_CAPTION in text
    for row in table.rows:
        assert row.lesion in text and row.volume in text and row.tmb_status in text
    for line in table.models:
        assert line in text
    assert GAP_WARNING in text
    assert "Secretname, Patientgiven" in text and PATIENT_ID in text
    assert "2024-01-02" in text  # study date, as ISO 8601


def test_the_same_inputs_give_the_same_pdf(analysis, template, config):
    # A retried delivery repeats the instance's UID: it must repeat the document too.
    slices = key_slices(analysis.volume, analysis.segmentation)
    table = findings(analysis, template)
    created = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    first, second = (render_pdf(analysis, slices, table, template=template, config=config,
                                created=created) for _ in range(2))
    assert first == second


def test_the_pdf_was_created_when_the_instance_says(built):
    _, pdf = built
    stamp = re.search(rb"/CreationDate \(D:(\d{14})", pdf_bytes(pdf))
    assert stamp, "the PDF has no creation date"
    created = datetime.strptime(stamp.group(1).decode(), "%Y%m%d%H%M%S")
    content = datetime.combine(pdf.ContentDate, pdf.ContentTime).astimezone()
    assert created == content.astimezone(timezone.utc).replace(tzinfo=None, microsecond=0)


def test_without_lesions_no_key_image_and_a_pdf_that_says_so(images, template, config, tmp_path):
    analysis = make_analysis(images, with_lesions=False)
    key_images, pdf = build_both(analysis, template, config, seed="no-lesion")
    assert key_images == []
    assert template.no_lesion_text in pdf_text(pdf, tmp_path)
    pdf.save_as(tmp_path / "pdf.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "pdf.dcm") == []


def test_a_latin1_patient_name_reads_the_same_in_the_pdf_and_the_headers(template, config,
                                                                         tmp_path):
    ct = synthetic_ct()
    for ds in ct:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
    key_images, pdf = build_both(make_analysis(ct), template, config, seed="latin1")
    for ds in (*key_images, pdf):
        assert ds.SpecificCharacterSet == "ISO_IR 100"
    pdf.save_as(tmp_path / "pdf.dcm", enforce_file_format=True)
    assert str(pydicom.dcmread(tmp_path / "pdf.dcm").PatientName) == "Müller^Jürgen"
    assert "Müller, Jürgen" in pdf_text(pdf, tmp_path)


def test_a_name_the_font_cannot_draw_reaches_no_warning_and_no_log(template, config, tmp_path,
                                                                    caplog):
    ct = synthetic_ct()
    for ds in ct:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "山田^太郎"
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, pdf = build_both(make_analysis(ct), template, config, seed="cjk")
    assert not [w for w in caught if "CJK" in str(w.message) or "山" in str(w.message)]
    assert not [r for r in caplog.records if "山" in r.getMessage() or "\\u5c71" in r.getMessage()]
    assert PATIENT_ID in pdf_text(pdf, tmp_path)  # the ID still identifies the patient


@pytest.mark.filterwarnings("ignore:The string .Anonymous. is unlikely:UserWarning")
def test_over_an_enhanced_ct_the_key_image_references_its_frame(shared_data, template, config,
                                                                 tmp_path):
    path = shared_data / "dcmqi/data/segmentations/24x38x3/multiframe/mf.dcm"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    source = pydicom.dcmread(path)
    frames = int(source.NumberOfFrames)
    labels = np.zeros((frames, source.Rows, source.Columns), np.uint16)
    labels[0, 3:8, 3:9] = 1  # slice 0 of the volume is the file's last frame (reversed order)
    base = make_analysis(synthetic_ct())
    analysis = dataclasses.replace(
        base,
        volume=dataclasses.replace(
            base.volume, hu=np.zeros(labels.shape, np.float32),
            key=SeriesKey(source.StudyInstanceUID, source.SeriesInstanceUID),
            sources=(header(source),), frame_numbers=tuple(range(frames, 0, -1)),
            frame_of_reference_uid=source.FrameOfReferenceUID),
        segmentation=dataclasses.replace(
            base.segmentation, labels=labels, lesions=(lesion_of(labels, 1, (1.0, 1.0, 1.0)),)),
        predictions=base.predictions[:1],
    )
    (key_image,), pdf = build_both(analysis, template, config, seed="enhanced")
    (item,) = key_image.SourceImageSequence
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(item.ReferencedFrameNumber) == frames
    (document_source,) = pdf.SourceInstanceSequence  # the whole multi-frame image
    assert document_source.ReferencedSOPInstanceUID == source.SOPInstanceUID
    for name, ds in (("sc.dcm", key_image), ("pdf.dcm", pdf)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        assert dciodvfy_errors(tmp_path / name) == []
