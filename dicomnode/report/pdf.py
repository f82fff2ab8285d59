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

The bytes are reproducible: the same inputs give the same PDF (no creation date; matplotlib
writes fonts and images deterministically).
"""

from __future__ import annotations

import io
import textwrap
import warnings
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch, Rectangle
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
from dicomnode.report.keyimages import WORKSTATION, render_key_image, source_item
from dicomnode.report.keyslice import KeySlice
from dicomnode.report.palette import lesion_rgb
from dicomnode.report.seg import ReportUids
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis

#: Concept Name of the document (Encapsulated Document module, PS3.16 CID 7000 "Diagnostic
#: Imaging Report Document Title"): what a PACS lists the PDF as.
DOCUMENT_CONCEPT = Code("18748-4", "LN", "Diagnostic Imaging Report")
PDF_MIME_TYPE = "application/pdf"

#: A4 portrait, in inches (matplotlib's unit), and the page margin.
_PAGE = (8.27, 11.69)
_MARGIN = 0.6
_FOOTER = 0.45
_TEXT_WIDTH = _PAGE[0] - 2 * _MARGIN
#: Results table column widths (inches), in the order of findings.COLUMNS.
_COLUMN_WIDTHS = (0.95, 0.8, 0.9, 1.1, 1.75, 1.57)
#: Average glyph width of DejaVu Sans in em, to wrap text to a width before drawing it.
_EM_PER_CHAR = 0.58
_NO_BREAK = "\u00a0"
_INK, _GREY, _RULE = "#111111", "#555555", "#bbbbbb"
_CAPTION_FILL, _CAPTION_EDGE = "#fff1cc", "#d9a400"
#: matplotlib warns about each character DejaVu Sans cannot draw (e.g. a CJK patient name),
#: naming the character: patient data must not reach the log.
_MISSING_GLYPH = r"Glyph \d+ .*missing from"


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
    pdf = render_pdf(analysis, slices, table, template=template, config=config,
                     rendered=rendered)
    return _encapsulated(analysis, pdf, template=template, config=config, uids=uids,
                         series_number=series_number)


def _encapsulated(
    analysis: Analysis,
    pdf: bytes,
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
) -> hd.SOPClass:
    """Encapsulated PDF Storage: Encapsulated Document Series (Modality DOC), SC Equipment and
    Encapsulated Document modules, with the patient and study of the CT."""
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
    document.EncapsulatedDocumentLength = len(pdf)
    # OB values have even length (PS3.5 7.1.1); the length above tells readers where the PDF
    # ends.
    document.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)
    return document


def render_pdf(
    analysis: Analysis,
    slices: Sequence[KeySlice],
    table: Findings,
    *,
    template: SrTemplate,
    config: ReportConfig,
    rendered: Sequence[np.ndarray] | None = None,
) -> bytes:
    """The PDF: the summary (identity, caption, results, models, warnings, note), then the key
    images (``rendered``, or rendered here), each kept whole on a page; every page has a
    footer with the patient, the caption and its number."""
    source = analysis.volume.sources[0]
    pages = _Pages()
    _summary(pages, analysis, table, template=template, config=config)
    if rendered is None:
        rendered = [render_key_image(analysis.volume, key, table) for key in slices]
    for key, pixels in zip(slices, rendered, strict=True):
        pages.image(pixels, f"{table.row(key.label).lesion}: key image (largest slice)")
    footer = "  |  ".join(part for part in (_patient_line(source), table.caption) if part)
    return pages.pdf(footer, title=template.pdf_title)


def _summary(pages: _Pages, analysis: Analysis, table: Findings, *, template: SrTemplate,
             config: ReportConfig) -> None:
    source = analysis.volume.sources[0]
    pages.text(template.pdf_title, size=16, bold=True)
    subtitle = f"dicomnode {__version__}, automated research analysis of a CT series"
    if config.institution_name:
        subtitle += f", {config.institution_name}"
    pages.text(subtitle, size=9, colour=_GREY, gap=0.04)
    pages.pairs(_identity(source, analysis), gap=0.2)
    pages.banner(table.caption, gap=0.2)
    pages.text("Results", size=12, bold=True, gap=0.25)
    if table.rows:
        pages.table(table)
    else:
        pages.text(template.no_lesion_text, size=10, gap=0.05)
    pages.text("Models", size=12, bold=True, gap=0.25)
    for line in (*table.models, f"Report: dicomnode {__version__}"):
        pages.text(line, size=9.5, gap=0.03)
    if table.warnings:
        pages.text("Warnings", size=12, bold=True, gap=0.25)
        for warning in table.warnings:
            pages.text(warning, size=9.5, gap=0.03)
    pages.text("Note", size=12, bold=True, gap=0.25)
    pages.text(template.research_note, size=9.5, gap=0.03)


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


class _Pages:
    """A4 pages filled from top to bottom; a block that does not fit starts a new page."""

    def __init__(self) -> None:
        self.figures: list[Figure] = []
        self.y = 0.0
        self._new_page()

    def _new_page(self) -> None:
        self.figures.append(Figure(figsize=_PAGE))
        self.y = _PAGE[1] - _MARGIN

    def _make_room(self, height: float) -> None:
        if self.y - height < _MARGIN + _FOOTER:
            self._new_page()

    @property
    def figure(self) -> Figure:
        return self.figures[-1]

    def _at(self, x: float, y: float) -> tuple[float, float]:
        """Inches from the page's bottom-left corner as figure fractions."""
        return x / _PAGE[0], y / _PAGE[1]

    def text(self, text: str, *, size: float, bold: bool = False, colour: str = _INK,
             gap: float = 0.0, x: float = _MARGIN, width: float = _TEXT_WIDTH) -> None:
        """Wrapped text; ``gap`` inches above it."""
        lines = _wrapped(text, size, width)
        height = gap + len(lines) * _line_height(size)
        self._make_room(height)
        self.y -= gap
        for line in lines:
            self.y -= _line_height(size)
            self.figure.text(*self._at(x, self.y), line, fontsize=size, color=colour,
                             fontweight="bold" if bold else "normal")

    def pairs(self, pairs: Sequence[tuple[str, str]], *, gap: float) -> None:
        """Label-value pairs in two columns, filled down the left column first."""
        half = (len(pairs) + 1) // 2
        columns = (pairs[:half], pairs[half:])
        self._make_room(gap + half * _line_height(10))
        self.y -= gap
        top = self.y
        for number, column in enumerate(columns):
            x = _MARGIN + number * _TEXT_WIDTH / 2
            y = top
            for label, value in column:
                y -= _line_height(10)
                self.figure.text(*self._at(x, y), label, fontsize=9, color=_GREY)
                shown = _wrapped(value, 10, _TEXT_WIDTH / 2 - 1.05)[0]
                self.figure.text(*self._at(x + 1.0, y), shown, fontsize=10, color=_INK)
        self.y = top - half * _line_height(10)

    def banner(self, text: str, *, gap: float) -> None:
        """``text`` in bold on an amber band across the page: the research caption."""
        height = 0.42
        self._make_room(gap + height)
        self.y -= gap + height
        self.figure.add_artist(FancyBboxPatch(
            self._at(_MARGIN, self.y), _TEXT_WIDTH / _PAGE[0], height / _PAGE[1],
            boxstyle="round,pad=0,rounding_size=0.005", transform=self.figure.transFigure,
            facecolor=_CAPTION_FILL, edgecolor=_CAPTION_EDGE, linewidth=1.2))
        self.figure.text(*self._at(_PAGE[0] / 2, self.y + height / 2), text, fontsize=12,
                         fontweight="bold", color=_INK, ha="center", va="center")

    def table(self, table: Findings) -> None:
        """The results table: a header row, then one row per lesion with its colour swatch."""
        self._table_row(COLUMNS, size=8.5, bold=True, colour=_GREY)
        for row in table.rows:
            top = self.y
            self._table_row(row.cells(), size=9.5, swatch=lesion_rgb(row.label))
            self.figure.add_artist(Line2D(
                [_MARGIN / _PAGE[0], (_MARGIN + _TEXT_WIDTH) / _PAGE[0]],
                [top / _PAGE[1]] * 2, transform=self.figure.transFigure, color=_RULE,
                linewidth=0.6))

    def _table_row(self, cells: Sequence[str], *, size: float, bold: bool = False,
                   colour: str = _INK, swatch: tuple[int, int, int] | None = None) -> None:
        swatch_width = 0.18 if swatch is not None else 0.0
        wrapped = [_wrapped(cell, size, width - 0.1 - (swatch_width if k == 0 else 0.0))
                   for k, (cell, width) in enumerate(zip(cells, _COLUMN_WIDTHS))]
        height = max(len(lines) for lines in wrapped) * _line_height(size) + 0.08
        self._make_room(height)
        x = _MARGIN
        for k, (lines, width) in enumerate(zip(wrapped, _COLUMN_WIDTHS)):
            indent = swatch_width if k == 0 else 0.0
            for number, line in enumerate(lines, start=1):
                self.figure.text(*self._at(x + indent, self.y - number * _line_height(size)),
                                 line, fontsize=size, color=colour,
                                 fontweight="bold" if bold else "normal")
            x += width
        if swatch is not None:
            side = 0.12
            self.figure.add_artist(Rectangle(
                self._at(_MARGIN, self.y - _line_height(size) - 0.01), side / _PAGE[0],
                side / _PAGE[1], transform=self.figure.transFigure, linewidth=0.5,
                facecolor=np.asarray(swatch) / 255, edgecolor=_INK))
        self.y -= height

    def image(self, pixels: np.ndarray, heading: str) -> None:
        """A key image across the text width under its heading, kept on one page."""
        height = _TEXT_WIDTH * pixels.shape[0] / pixels.shape[1]
        self._make_room(0.35 + _line_height(11) + height)
        self.text(heading, size=11, bold=True, gap=0.35)
        self.y -= height + 0.08
        axes = self.figure.add_axes((*self._at(_MARGIN, self.y),
                                     _TEXT_WIDTH / _PAGE[0], height / _PAGE[1]))
        # "none": the PDF holds the image's own pixels, not a resampled copy.
        axes.imshow(pixels, interpolation="none")
        axes.set_axis_off()

    def pdf(self, footer: str, *, title: str) -> bytes:
        """Every page with its footer, as one PDF. No creation date, so that the same report
        gives the same bytes; no patient data in the document properties."""
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_MISSING_GLYPH)
            with PdfPages(buffer, metadata={"Title": title, "Creator": f"dicomnode {__version__}",
                                            "CreationDate": None}) as document:
                for number, figure in enumerate(self.figures, start=1):
                    figure.text(*self._at(_MARGIN, _MARGIN), footer, fontsize=7.5, color=_GREY)
                    figure.text(*self._at(_PAGE[0] - _MARGIN, _MARGIN),
                                f"page {number} of {len(self.figures)}", fontsize=7.5,
                                color=_GREY, ha="right")
                    document.savefig(figure)
        return buffer.getvalue()


def _line_height(size: float) -> float:
    """Inches per line of ``size``-point text."""
    return size * 1.35 / 72


def _wrapped(text: str, size: float, width: float) -> list[str]:
    """``text`` wrapped to about ``width`` inches of ``size``-point DejaVu Sans, a number never
    parted from its unit."""
    characters = max(8, int(width * 72 / (size * _EM_PER_CHAR)))
    # textwrap does not break at a no-break space; it is a plain space again once wrapped.
    for unit in UNITS:
        text = text.replace(f" {unit}", f"{_NO_BREAK}{unit}")
    lines = textwrap.wrap(text, characters, break_on_hyphens=False) or [""]
    return [line.replace(_NO_BREAK, " ") for line in lines]
