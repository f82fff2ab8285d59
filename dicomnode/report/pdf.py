"""The PDF report in an Encapsulated PDF instance (PS3.3 A.45.1) (PURE).

A report a radiologist can open in any PACS viewer, print or attach: the results table
(:mod:`.findings`, the same text as on the key images), the research caption, the models and
their versions, the report's warnings and each lesion's key image (the same pixels as the
Secondary Capture images, :func:`.keyimages.render_key_image`).

The PDF identifies the patient (name, ID, birth date, sex) and the study (date, accession
number, description), on the first page and in every page's footer, as a radiology report
does: a printed or forwarded PDF must not be mistaken for another patient's. Nothing else about
the patient is printed, and the PDF's document properties hold no patient data. Burned In
Annotation is therefore YES (PS3.3 C.24.2: enough to identify the patient and the date).

Written with fpdf2, a document writer: text is wrapped by the font's own glyph widths, images
are embedded losslessly at their own pixels, and a key image page costs milliseconds (the
report of 47 lesions has 24 pages of key images). The bytes are reproducible: the same inputs
give the same PDF, its creation date (the instance's Content Date and Time) among them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from datetime import datetime

import highdicom as hd
import numpy as np
from fontTools.ttLib import TTFont
from fpdf import FPDF
from fpdf.image_parsing import SETTINGS as IMAGE_SETTINGS
from PIL import Image
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from dicomnode import __version__
from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report.charset import source_character_set
from dicomnode.report.equipment import contributing_equipment
from dicomnode.report.findings import COLUMNS, UNITS, Findings, findings
from dicomnode.report.keyimages import FONTS, WORKSTATION, render_key_image, source_item
from dicomnode.report.keyslice import KeySlice
from dicomnode.report.palette import lesion_rgb
from dicomnode.report.seg import ReportUids
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis

#: Concept Name of the document (Encapsulated Document module, PS3.16 CID 7000 "Diagnostic
#: Imaging Report Document Title"): what a PACS lists the PDF as.
DOCUMENT_CONCEPT = Code("18748-4", "LN", "Diagnostic Imaging Report")
PDF_MIME_TYPE = "application/pdf"

# fontTools logs each font subset at INFO (about 25 lines per PDF): only its warnings.
logging.getLogger("fontTools").setLevel(logging.WARNING)

#: zlib level of the embedded key images (fpdf2's documented setting, 6 by default): level 1
#: writes a key image in a third of the time for a 9 % larger PDF (47 key images of
#: 512 x 952 pixels: 0.11 s and 2.9 MB instead of 0.26 s and 2.7 MB).
IMAGE_SETTINGS.compression_level = 1

#: A4 portrait, in inches, and the page margin.
_PAGE = (8.27, 11.69)
_MARGIN = 0.6
_FOOTER = 0.45
_TEXT_WIDTH = _PAGE[0] - 2 * _MARGIN
#: Results table column widths (inches), in the order of findings.COLUMNS.
_COLUMN_WIDTHS = (1.05, 0.8, 0.95, 0.95, 1.75, 1.57)
_FONT = "DejaVuSans"
#: The footer is one line: longer text is cut (the first page names the patient in full).
_FOOTER_CHARACTERS = 150
_NO_BREAK = "\u00a0"
_REPLACEMENT = "\ufffd"
_INK, _GREY, _RULE = "#111111", "#555555", "#bbbbbb"
_CAPTION_FILL, _CAPTION_EDGE = "#fff1cc", "#d9a400"

def build_pdf_report(
    analysis: Analysis,
    slices: Sequence[KeySlice],
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
    rendered: Sequence[np.ndarray] | None = None,
) -> hd.SOPClass:
    """The Encapsulated PDF instance of ``analysis``, in a new series of the CT's study.

    Parameters
    ----------
    analysis
        The analysed series; without lesions the report says so.
    slices
        Each lesion's key slice, in lesion order (the key images the report shows).
    template
        Lesion names, units, the document title and the series description.
    config
        Equipment identity; a non-empty institution name is printed in the header.
    uids
        ``pdf_series`` and ``pdf_instance``.
    series_number
        Series Number of the PDF series.
    rendered
        The key images' pixels when :func:`.keyimages.render_key_images` made them already;
        else they are rendered here.

    Raises
    ------
    dicomnode.errors.ReportError
        When the key slices do not match the lesions, or highdicom refuses the content.
    """
    table = findings(analysis, template)
    if [key.label for key in slices] != [row.label for row in table.rows]:
        raise ReportError(f"key slices for lesions {[k.label for k in slices]}, "
                          f"but the lesions are {[row.label for row in table.rows]}")
    document = _encapsulated(analysis, template=template, config=config, uids=uids,
                             series_number=series_number)
    # The PDF says it was made when the instance says its content was (local time).
    created = datetime.combine(document.ContentDate, document.ContentTime).astimezone()
    pdf = render_pdf(analysis, slices, table, template=template, config=config,
                     created=created, rendered=rendered)
    document.EncapsulatedDocumentLength = len(pdf)
    # OB values have even length (PS3.5 7.1.1); the length above tells readers where the PDF
    # ends.
    document.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)
    return document


def _encapsulated(
    analysis: Analysis,
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
) -> hd.SOPClass:
    """Encapsulated PDF Storage: Encapsulated Document Series (Modality DOC), SC Equipment and
    Encapsulated Document modules, with the patient and study of the CT; the document itself
    is put in by the caller."""
    source = analysis.volume.sources[0]
    try:
        document = hd.SOPClass(
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=uids.pdf_series,
            series_number=series_number,
            sop_instance_uid=uids.pdf_instance,
            sop_class_uid=EncapsulatedPDFStorage,
            instance_number=1,
            modality="DOC",
            manufacturer=config.manufacturer,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            manufacturer_model_name=template.device_model_name,
            software_versions=__version__,
            device_serial_number=config.device_observer_name,
            institution_name=config.institution_name or None,
            series_description=template.pdf_series_description,
            # As in the SEG and SR: settled after building (dicomnode.report.charset).
            specific_character_set=source_character_set(source)[0],
        )
        # The whole Patient and Study modules, as highdicom copies them into the SEG and SR.
        document.copy_patient_and_study_information(source)
        # The pipeline and every model whose result the report shows (IHE AIR), and highdicom,
        # as in the other objects (the base class has no argument for them).
        document.ContributingEquipmentSequence = [
            *contributing_equipment(analysis, config, template),
            hd.ContributingEquipment.for_highdicom(),
        ]
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot build the PDF report: {exc}") from exc
    document.ConversionType = WORKSTATION
    document.BurnedInAnnotation = "YES"  # the PDF names the patient: see the module notes
    document.AcquisitionDateTime = None  # Type 2: the document was made, not acquired
    document.DocumentTitle = template.pdf_title
    document.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(DOCUMENT_CONCEPT)]
    document.VerificationFlag = "UNVERIFIED"  # no person has reviewed a research result
    # Made from the whole series (with or without a lesion), as the SR's evidence says.
    document.SourceInstanceSequence = [source_item(ds) for ds in analysis.volume.sources]
    document.MIMETypeOfEncapsulatedDocument = PDF_MIME_TYPE
    return document


def render_pdf(
    analysis: Analysis,
    slices: Sequence[KeySlice],
    table: Findings,
    *,
    template: SrTemplate,
    config: ReportConfig,
    created: datetime,
    rendered: Sequence[np.ndarray] | None = None,
) -> bytes:
    """The PDF: the summary (identity, caption, results, models, warnings, note), then the key
    images (``rendered``, or rendered here), each kept whole on a page; every page has a
    footer with the patient, the caption and its number. ``created`` is its creation date:
    the same inputs give the same bytes."""
    source = analysis.volume.sources[0]
    footer = "  |  ".join(part for part in (_patient_line(source), table.caption) if part)
    pages = _Pages(footer, title=template.pdf_title, created=created)
    _summary(pages, analysis, table, template=template, config=config)
    if rendered is None:
        rendered = [render_key_image(analysis.volume, key, table) for key in slices]
    for key, pixels in zip(slices, rendered, strict=True):
        pages.image_block(pixels, f"{table.row(key.label).lesion}: key image (largest slice)")
    return pages.pdf()


def _summary(pages: _Pages, analysis: Analysis, table: Findings, *, template: SrTemplate,
             config: ReportConfig) -> None:
    source = analysis.volume.sources[0]
    pages.text_block(template.pdf_title, size=16, bold=True)
    subtitle = f"dicomnode {__version__}, automated research analysis of a CT series"
    if config.institution_name:
        subtitle += f", {config.institution_name}"
    pages.text_block(subtitle, size=9, colour=_GREY, gap=0.04)
    pages.pairs(_identity(source, analysis), gap=0.2)
    pages.banner(table.caption, gap=0.2)
    pages.text_block("Results", size=12, bold=True, gap=0.25)
    if table.rows:
        pages.table(table)
    else:
        pages.text_block(template.no_lesion_text, size=10, gap=0.05)
    pages.text_block("Models", size=12, bold=True, gap=0.25)
    for line in (*table.models, f"Report: dicomnode {__version__}"):
        pages.text_block(line, size=9.5, gap=0.03)
    if table.warnings:
        pages.text_block("Warnings", size=12, bold=True, gap=0.25)
        for warning in table.warnings:
            pages.text_block(warning, size=9.5, gap=0.03)
    pages.text_block("Note", size=12, bold=True, gap=0.25)
    pages.text_block(template.research_note, size=9.5, gap=0.03)


def _identity(source: Dataset, analysis: Analysis) -> list[tuple[str, str]]:
    """The patient and study lines of the header (absent values left out)."""
    series = ", ".join(str(v) for v in (source.get("SeriesNumber"), source.get("SeriesDescription"))
                       if v not in (None, ""))
    pairs = [
        ("Patient", _name(source.get("PatientName"))),
        ("Patient ID", str(source.get("PatientID") or "")),
        ("Birth date", _date(source.get("PatientBirthDate"))),
        ("Sex", str(source.get("PatientSex") or "")),
        ("Study date", _date(source.get("StudyDate"))),
        ("Accession", str(source.get("AccessionNumber") or "")),
        ("Study", str(source.get("StudyDescription") or "")),
        ("CT series", series or analysis.volume.key.series_uid),
    ]
    return [(label, value) for label, value in pairs if value]


def _patient_line(source: Dataset) -> str:
    """``Family, Given, ID 123``: who every page is about."""
    parts = [_name(source.get("PatientName"))]
    if source.get("PatientID"):
        parts.append(f"ID {source.PatientID}")
    return ", ".join(part for part in parts if part)


def _name(value: object) -> str:
    """``Family, Given`` (the alphabetic group, as printed reports write it)."""
    if not value:
        return ""
    name = PersonName(str(value))
    return name.family_comma_given().strip(", ") or str(value)


def _date(value: object) -> str:
    """A DICOM DA as ISO 8601 (``2024-01-02``), which no reader misreads; other text as is."""
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


class _Pages(FPDF):
    """A4 pages filled from top to bottom, in inches; a block that does not fit starts a new
    page, and every page gets the footer (the patient, the caption) and its number."""

    def __init__(self, footer: str, *, title: str, created: datetime) -> None:
        super().__init__(orientation="portrait", unit="in", format="A4")
        self.footer_text = _drawable(footer)
        self.set_margins(_MARGIN, _MARGIN, _MARGIN)
        self.c_margin = 0  # text starts where it is put; columns have their own gaps
        self.set_auto_page_break(True, margin=_MARGIN + _FOOTER)
        for style, name in (("", "DejaVuSans.ttf"), ("B", "DejaVuSans-Bold.ttf")):
            self.add_font(_FONT, style, str(FONTS / name))
        # Document properties without patient data.
        self.set_title(title)
        self.set_creator(f"dicomnode {__version__}")
        self.set_creation_date(created)
        self.add_page()
        self.set_y(_MARGIN)

    def footer(self) -> None:
        """The patient and the caption on the left, the page number on the right (fpdf2 calls
        this when a page is finished)."""
        self._style(7.5, colour=_GREY)
        y = _PAGE[1] - _MARGIN - _line_height(7.5)
        self.set_xy(_MARGIN, y)
        self.cell(_TEXT_WIDTH, _line_height(7.5), self.footer_text[:_FOOTER_CHARACTERS])
        self.set_xy(_MARGIN, y)
        self.cell(_TEXT_WIDTH, _line_height(7.5), f"page {self.page_no()} of {{nb}}", align="R")

    def _style(self, size: float, *, bold: bool = False, colour: str = _INK) -> None:
        self.set_font(_FONT, "B" if bold else "", size)
        self.set_text_color(colour)

    def _make_room(self, height: float) -> None:
        if self.get_y() + height > _PAGE[1] - _MARGIN - _FOOTER:
            self.add_page()
            self.set_y(_MARGIN)

    def _lines(self, text: str, size: float, width: float, *, bold: bool = False) -> list[str]:
        """``text`` wrapped to ``width`` inches with the font's own glyph widths, a number never
        parted from its unit."""
        self._style(size, bold=bold)
        for unit in UNITS:
            text = text.replace(f" {unit}", f"{_NO_BREAK}{unit}")
        lines = self.multi_cell(width, _line_height(size), _drawable(text), dry_run=True,
                                output="LINES", padding=0) or [""]
        return [line.replace(_NO_BREAK, " ") for line in lines]

    def _line(self, x: float, line: str, size: float, *, bold: bool = False,
              colour: str = _INK, width: float = _TEXT_WIDTH, align: str = "L") -> None:
        """One line of text at ``x`` whose top is the cursor's y (the cursor stays)."""
        self._style(size, bold=bold, colour=colour)
        y = self.get_y()
        self.set_xy(x, y)
        self.cell(width, _line_height(size), line, align=align)
        self.set_y(y)

    def text_block(self, text: str, *, size: float, bold: bool = False, colour: str = _INK,
                   gap: float = 0.0) -> None:
        """Wrapped text across the text width; ``gap`` inches above it."""
        lines = self._lines(text, size, _TEXT_WIDTH, bold=bold)
        self._make_room(gap + len(lines) * _line_height(size))
        self.set_y(self.get_y() + gap)
        for line in lines:
            self._line(_MARGIN, line, size, bold=bold, colour=colour)
            self.set_y(self.get_y() + _line_height(size))

    def pairs(self, pairs: Sequence[tuple[str, str]], *, gap: float) -> None:
        """Label-value pairs in two columns, filled down the left column first."""
        half = (len(pairs) + 1) // 2
        self._make_room(gap + half * _line_height(10))
        top = self.get_y() + gap
        for number, column in enumerate((pairs[:half], pairs[half:])):
            x = _MARGIN + number * _TEXT_WIDTH / 2
            for row, (label, value) in enumerate(column):
                self.set_y(top + row * _line_height(10))
                self._line(x, label, 9, colour=_GREY, width=1.0)
                shown = self._lines(value, 10, _TEXT_WIDTH / 2 - 1.05)[0]
                self._line(x + 1.0, shown, 10, width=_TEXT_WIDTH / 2 - 1.0)
        self.set_y(top + half * _line_height(10))

    def banner(self, text: str, *, gap: float) -> None:
        """``text`` in bold on an amber band across the page: the research caption."""
        height = 0.42
        self._make_room(gap + height)
        top = self.get_y() + gap
        self.set_fill_color(_CAPTION_FILL)
        self.set_draw_color(_CAPTION_EDGE)
        self.set_line_width(1.2 / 72)
        self.rect(_MARGIN, top, _TEXT_WIDTH, height, style="DF", round_corners=True,
                  corner_radius=0.04)
        self.set_y(top + (height - _line_height(12)) / 2)
        self._line(_MARGIN, _drawable(text), 12, bold=True, align="C")
        self.set_y(top + height)

    def table(self, table: Findings) -> None:
        """The results table: a header row, then one row per lesion with its colour swatch,
        rows parted by a rule."""
        self._table_row(COLUMNS, size=8.5, bold=True, colour=_GREY)
        for row in table.rows:
            self._table_row(row.cells(), size=9.5, swatch=lesion_rgb(row.label))

    def _table_row(self, cells: Sequence[str], *, size: float, bold: bool = False,
                   colour: str = _INK, swatch: tuple[int, int, int] | None = None) -> None:
        swatch_width = 0.18 if swatch is not None else 0.0
        wrapped = [self._lines(cell, size, width - 0.1 - (swatch_width if k == 0 else 0.0),
                               bold=bold)
                   for k, (cell, width) in enumerate(zip(cells, _COLUMN_WIDTHS))]
        height = max(len(lines) for lines in wrapped) * _line_height(size) + 0.08
        self._make_room(height)
        top = self.get_y()
        if swatch is not None:
            self.set_draw_color(_RULE)
            self.set_line_width(0.6 / 72)
            self.line(_MARGIN, top, _MARGIN + _TEXT_WIDTH, top)
        x = _MARGIN
        for k, (lines, width) in enumerate(zip(wrapped, _COLUMN_WIDTHS)):
            indent = swatch_width if k == 0 else 0.0
            for number, line in enumerate(lines):
                self.set_y(top + 0.04 + number * _line_height(size))
                self._line(x + indent, line, size, bold=bold, colour=colour,
                           width=width - indent)
            x += width
        if swatch is not None:
            side = 0.12
            self.set_fill_color(swatch)
            self.set_draw_color(_INK)
            self.set_line_width(0.5 / 72)
            self.rect(_MARGIN, top + 0.04 + (_line_height(size) - side) / 2, side, side,
                      style="DF")
        self.set_y(top + height)

    def image_block(self, pixels: np.ndarray, heading: str) -> None:
        """A key image across the text width under its heading, kept on one page; the PDF
        holds the image's own pixels (lossless), not a resampled copy."""
        height = _TEXT_WIDTH * pixels.shape[0] / pixels.shape[1]
        self._make_room(0.35 + _line_height(11) + 0.08 + height)
        self.text_block(heading, size=11, bold=True, gap=0.35)
        top = self.get_y() + 0.08
        self.image(Image.fromarray(pixels), x=_MARGIN, y=top, w=_TEXT_WIDTH, h=height)
        self.set_y(top + height)

    def pdf(self) -> bytes:
        """The document's bytes."""
        return bytes(self.output())


def _line_height(size: float) -> float:
    """Inches per line of ``size``-point text."""
    return size * 1.35 / 72


@functools.cache
def _font_characters() -> frozenset[int]:
    """The code points DejaVu Sans (regular and bold) can draw."""
    drawable: set[int] | None = None
    for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"):
        with TTFont(str(FONTS / name), lazy=True) as font:
            points = set(font.getBestCmap())
        drawable = points if drawable is None else drawable & points
    return frozenset(drawable or ())


def _drawable(text: str) -> str:
    """``text`` with each character the font cannot draw (e.g. a CJK patient name) shown as
    U+FFFD: fpdf2 would otherwise log the missing characters, and patient data must not reach
    the log."""
    drawable = _font_characters()
    return "".join(c if ord(c) in drawable or c in "\n" else _REPLACEMENT for c in text)
