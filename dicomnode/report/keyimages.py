"""Key images: one Secondary Capture image per lesion, results burned in (PURE).

The fallback for viewers that show neither a SEG nor an SR: every PACS viewer shows an RGB
Secondary Capture image (PS3.3 A.8.1). Each key image is the lesion's largest CT slice
(:mod:`.keyslice`, the slice the SR's planar group outlines) in a soft-tissue window, scaled up
so that the text is readable, the outline drawn in the lesion's colour (:mod:`.palette`, as in
the SEG) and a panel beside it with the lesion's row of the results table (:mod:`.findings`),
the research caption and the report's warnings.

No patient identifier is burned in: viewers show the patient from the header, and an image
without one can be shown at a tumour board or exported for teaching as it is. Burned In
Annotation is therefore NO, as PS3.3 C.7.6.1 defines it (enough burned-in text "to identify
the patient and the date the image was acquired"), although the image does carry text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicomnode import __version__
from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report.charset import source_character_set
from dicomnode.report.equipment import contributing_equipment
from dicomnode.report.findings import COLUMNS, UNITS, FindingRow, Findings, findings
from dicomnode.report.keyslice import KeySlice
from dicomnode.report.palette import lesion_rgb
from dicomnode.report.seg import ReportUids
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis, Geometry, Volume

#: Soft-tissue window (width, centre) in HU: the window in which a soft-tissue tumour's edge
#: against muscle and fat is seen, and the one radiologists read sarcoma CT in.
SOFT_TISSUE_WINDOW = (400.0, 40.0)
#: The CT part of a key image is scaled so that its longer side has at least this many pixels:
#: a cropped 200-pixel CT would otherwise leave no room for readable text.
MIN_CT_PIXELS = 512
#: Purpose of Reference of the Source Image Sequence item (PS3.16 CID 7202).
SOURCE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
#: ConversionType (PS3.3 C.8.6.1): made by software on a workstation, not digitised.
WORKSTATION = "WSD"

#: DejaVu Sans, shipped with matplotlib: the key images' and the PDF report's font, with Latin, Greek and Cyrillic
#: glyphs (Pillow's built-in font lacks even "ä", and a template may name lesions in any
#: language). Read from the installed package, like any other code.
FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
#: Sizes at a CT part of MIN_CT_PIXELS; larger images scale them.
_FONT_PX, _PANEL_PX, _MARGIN_PX = 18, 440, 16
_BACKGROUND, _LABEL_GREY, _VALUE_WHITE = (0, 0, 0), (170, 170, 170), (240, 240, 240)
#: Amber: the caption must stand out from the results without looking like an alarm.
_CAPTION_AMBER, _WARNING_ORANGE = (255, 190, 60), (255, 150, 70)


def build_key_images(
    analysis: Analysis,
    slices: Sequence[KeySlice],
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
    rendered: Sequence[np.ndarray] | None = None,
) -> list[Dataset]:
    """One Secondary Capture image per lesion, in lesion order, in a new series of the CT's study.

    Parameters
    ----------
    analysis
        The analysed series; a lesion without a prediction shows "-" for the predictions.
    slices
        Each lesion's key slice, in lesion order (:func:`dicomnode.report.keyslice.key_slices`).
    template
        Lesion names, units and the series description.
    config
        Equipment identity.
    uids
        ``key_image_series`` and one ``key_images[label]`` per lesion.
    series_number
        Series Number of the key-image series.
    rendered
        The images' pixels when :func:`render_key_images` made them already (the PDF report
        shows the same pixels); else they are rendered here.

    Raises
    ------
    dicomnode.errors.ReportError
        When the key slices do not match the lesions, or highdicom refuses the content.
    """
    labels = [lesion.label for lesion in analysis.segmentation.lesions]
    if [key.label for key in slices] != labels:
        raise ReportError(f"key slices for lesions {[k.label for k in slices]}, "
                          f"but the lesions are {labels}")
    if rendered is None:
        rendered = render_key_images(analysis, slices, template)
    return [
        _secondary_capture(analysis, key, pixels, template=template, config=config, uids=uids,
                           series_number=series_number, instance_number=number)
        for number, (key, pixels) in enumerate(zip(slices, rendered, strict=True), start=1)
    ]


def render_key_images(analysis: Analysis, slices: Sequence[KeySlice],
                      template: SrTemplate) -> list[np.ndarray]:
    """The pixels of every lesion's key image (:func:`render_key_image`), in lesion order."""
    table = findings(analysis, template)
    return [render_key_image(analysis.volume, key, table) for key in slices]


def _secondary_capture(
    analysis: Analysis,
    key: KeySlice,
    pixels: np.ndarray,
    *,
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
    instance_number: int,
) -> hd.sc.SCImage:
    """The SC Image Storage instance holding ``pixels`` (RGB), derived from the key slice."""
    source = key.source
    try:
        image = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=source.StudyInstanceUID,
            series_instance_uid=uids.key_image_series,
            series_number=series_number,
            sop_instance_uid=uids.key_images[key.label],
            instance_number=instance_number,
            manufacturer=config.manufacturer,
            patient_orientation=patient_orientation(analysis.volume.geometry),
            manufacturer_model_name=template.device_model_name,
            software_versions=__version__,
            device_serial_number=config.device_observer_name,
            institution_name=config.institution_name or None,
            series_description=template.key_image_series_description,
            # As in the SEG and SR: settled after building (dicomnode.report.charset).
            specific_character_set=source_character_set(source)[0],
            # The pipeline and every model whose result the image shows (IHE AIR).
            contributing_equipment=contributing_equipment(analysis, config, template),
        )
        # The whole Patient and Study modules, as highdicom copies them into the SEG and SR
        # (the constructor's few arguments would drop e.g. PatientIdentityRemoved). Copied, not
        # passed as arguments, also because highdicom would warn with the patient's name.
        image.copy_patient_and_study_information(source)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ReportError(f"cannot build the key image of lesion {key.label}: {exc}") from exc
    image.ConversionType = WORKSTATION
    image.SecondaryCaptureDeviceManufacturer = config.manufacturer
    image.SecondaryCaptureDeviceManufacturerModelName = template.device_model_name
    image.SecondaryCaptureDeviceSoftwareVersions = __version__
    image.BurnedInAnnotation = "NO"  # results only, no patient identifier: see the module notes
    if str(source.get("LossyImageCompression", "")) == "01":
        image.LossyImageCompression = "01"  # once lossy, every derived image says so (C.7.6.1.1.5)
    _copy_laterality(image, source)
    image.DerivationDescription = (
        f"{template.lesion_name(key.label)} on its largest CT slice, soft-tissue window "
        f"W {SOFT_TISSUE_WINDOW[0]:g} L {SOFT_TISSUE_WINDOW[1]:g}; outline and results burned in"
    )
    image.SourceImageSequence = [source_item(key.source, key.frame_number)]
    return image


def _copy_laterality(image: Dataset, source: Dataset) -> None:
    """The CT's laterality, else Laterality empty: General Series makes it Type 2C, needed for a
    paired body part unless Image Laterality is given (a sarcoma of the thigh is on one side),
    and empty means unknown, which is what a CT that says neither tells us."""
    if source.get("Laterality"):
        image.Laterality = source.Laterality
    elif source.get("ImageLaterality"):
        image.ImageLaterality = source.ImageLaterality
    else:
        image.Laterality = None


def source_item(source: Dataset, frame_number: int | None = None) -> Dataset:
    """A Source Image (or Source Instance) Sequence item: the CT image, and its frame for an
    Enhanced CT, that the object was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_PURPOSE)]
    return item


def patient_orientation(geometry: Geometry) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of the CT part: the patient direction that the rows and
    the columns run towards, each the axis nearest the CT's (one letter, as highdicom takes it)."""
    return _direction_letter(geometry.row_direction), _direction_letter(geometry.column_direction)


def _direction_letter(direction: tuple[float, float, float]) -> str:
    """The letter of the patient axis nearest ``direction`` (LPS: +x L, +y P, +z H)."""
    axis = int(np.argmax(np.abs(direction)))
    positive = direction[axis] > 0
    return (("L", "R"), ("P", "A"), ("H", "F"))[axis][0 if positive else 1]


# -- rendering ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Pixel sizes of one key image, all scaled with the CT part."""

    ct_width: int
    ct_height: int
    scale: float

    def px(self, size: int) -> int:
        return max(1, round(size * self.scale))


def render_key_image(volume: Volume, key: KeySlice, table: Findings) -> np.ndarray:
    """The key image of lesion ``key.label`` as ``(rows, columns, 3)`` sRGB ``uint8``.

    The CT slice in the soft-tissue window, scaled with the pixel spacing's aspect kept, the
    outline in the lesion's colour with the lesion's name beside it, and on the right a panel
    with the lesion's results, the research caption and the report's warnings. The PDF report
    shows these same pixels.
    """
    layout = _layout(volume)
    panel = _panel_lines(key, table.row(key.label), table, layout)
    height = max(layout.ct_height, _lines_height(panel, layout))
    canvas = Image.new("RGB", (layout.ct_width + layout.px(_PANEL_PX), height), _BACKGROUND)
    canvas.paste(_windowed_slice(volume.hu[key.slice_index], layout), (0, 0))
    draw = ImageDraw.Draw(canvas)
    _draw_outline(draw, key, volume, layout, table.row(key.label).lesion)
    _draw_lines(draw, panel, x=layout.ct_width + layout.px(_MARGIN_PX), layout=layout)
    return np.asarray(canvas, dtype=np.uint8)


def _layout(volume: Volume) -> _Layout:
    """The CT part's size: physical aspect kept (row and column spacing may differ), longer
    side at least MIN_CT_PIXELS and never below the CT's own pixel count."""
    _, rows, columns = volume.shape
    height_mm = rows * volume.geometry.spacing[1]
    width_mm = columns * volume.geometry.spacing[2]
    longer_px = max(MIN_CT_PIXELS, rows, columns)
    px_per_mm = longer_px / max(height_mm, width_mm)
    return _Layout(ct_width=max(1, round(width_mm * px_per_mm)),
                   ct_height=max(1, round(height_mm * px_per_mm)),
                   scale=longer_px / MIN_CT_PIXELS)


def _windowed_slice(hu: np.ndarray, layout: _Layout) -> Image.Image:
    width, centre = SOFT_TISSUE_WINDOW
    grey = np.clip((hu.astype(np.float64) - (centre - width / 2)) / width, 0.0, 1.0)
    image = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    size = (layout.ct_width, layout.ct_height)
    return image.resize(size, Image.Resampling.BILINEAR).convert("RGB")


def _draw_outline(draw: ImageDraw.ImageDraw, key: KeySlice, volume: Volume, layout: _Layout,
                  name: str) -> None:
    """The outline, scaled from image coordinates (whose (0, 0) is the top-left pixel's
    corner, so scaling needs no half-pixel shift), and the lesion's name above it."""
    _, rows, columns = volume.shape
    points = key.outline * (layout.ct_width / columns, layout.ct_height / rows)
    colour = lesion_rgb(key.label)
    draw.line([tuple(p) for p in points], fill=colour, width=layout.px(2), joint="curve")
    font = _font(layout.px(_FONT_PX), bold=True)
    left, top = points.min(axis=0)
    text_width = draw.textlength(name, font=font)
    # Above the outline's top-left, kept inside the CT part; a dark edge keeps it legible on
    # bright bone as on dark air.
    x = min(max(0.0, float(left)), layout.ct_width - text_width)
    y = max(0.0, float(top) - layout.px(_FONT_PX) - layout.px(6))
    draw.text((x, y), name, font=font, fill=colour, stroke_width=layout.px(2),
              stroke_fill=(0, 0, 0))


@dataclass(frozen=True)
class _Line:
    """One line of the panel: an optional grey label, then text that starts in the value
    column (a labelled value and its continuation lines) or at the panel's left edge."""

    text: str
    colour: tuple[int, int, int] = _VALUE_WHITE
    label: str = ""
    value_column: bool = False
    bold: bool = False
    size: int = _FONT_PX
    gap_before: int = 0


def _panel_lines(key: KeySlice, row: FindingRow, table: Findings, layout: _Layout) -> list[_Line]:
    """The panel's lines, values wrapped to the panel's width."""
    label_font = _font(layout.px(_FONT_PX))
    labels = (*COLUMNS[1:], "CT image")
    values = (*row.cells()[1:], _location(key))
    label_width = max(label_font.getlength(label) for label in labels) + layout.px(12)
    value_width = layout.px(_PANEL_PX) - 2 * layout.px(_MARGIN_PX) - label_width
    full_width = layout.px(_PANEL_PX) - 2 * layout.px(_MARGIN_PX)
    lines = [_Line(row.lesion, lesion_rgb(key.label), bold=True, size=24, gap_before=4)]
    for label, value in zip(labels, values):
        wrapped = _wrap(value, label_font, value_width)
        lines.append(_Line(wrapped[0], label=label, value_column=True, gap_before=6))
        lines.extend(_Line(part, value_column=True) for part in wrapped[1:])
    caption_font = _font(layout.px(_FONT_PX), bold=True)
    caption = _wrap(table.caption, caption_font, full_width)
    lines.append(_Line(caption[0], _CAPTION_AMBER, bold=True, gap_before=22))
    lines.extend(_Line(part, _CAPTION_AMBER, bold=True) for part in caption[1:])
    small = _font(layout.px(14))
    for number, warning in enumerate(table.warnings):
        wrapped = _wrap(f"Warning: {warning}", small, full_width)
        gap = 18 if number == 0 else 6
        lines.append(_Line(wrapped[0], _WARNING_ORANGE, size=14, gap_before=gap))
        lines.extend(_Line(part, _WARNING_ORANGE, size=14) for part in wrapped[1:])
    return lines


def _location(key: KeySlice) -> str:
    """Where the key slice is in the CT series, as a viewer numbers it."""
    source = key.source
    parts = [f"series {source.SeriesNumber}"] if source.get("SeriesNumber") is not None else []
    if key.frame_number is not None:
        parts.append(f"frame {key.frame_number}")
    elif source.get("InstanceNumber") is not None:
        parts.append(f"image {source.InstanceNumber}")
    return ", ".join(parts) or f"slice {key.slice_index + 1}"


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels, a number never
    parted from its unit (a single word wider than that is cut into pieces that fit)."""
    lines: list[str] = []
    for word in _words(text):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = max(1, int(len(word) * width / font.getlength(word)))
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def _words(text: str) -> list[str]:
    """The words of ``text``, a unit kept with the number before it ("50 %", "12.3 ml")."""
    words: list[str] = []
    for word in text.split():
        if words and word.strip(").,;") in UNITS:
            words[-1] = f"{words[-1]} {word}"
        else:
            words.append(word)
    return words


def _line_height(line: _Line, layout: _Layout) -> int:
    return layout.px(line.gap_before) + round(layout.px(line.size) * 1.3)


def _lines_height(lines: Sequence[_Line], layout: _Layout) -> int:
    return 2 * layout.px(_MARGIN_PX) + sum(_line_height(line, layout) for line in lines)


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[_Line], *, x: int,
                layout: _Layout) -> None:
    label_font = _font(layout.px(_FONT_PX))
    value_x = x + max((label_font.getlength(line.label) for line in lines), default=0.0)
    value_x += layout.px(12)
    y = layout.px(_MARGIN_PX)
    for line in lines:
        y += layout.px(line.gap_before)
        font = _font(layout.px(line.size), bold=line.bold)
        if line.label:
            draw.text((x, y), line.label, font=label_font, fill=_LABEL_GREY)
        draw.text((value_x if line.value_column else x, y), line.text, font=font, fill=line.colour)
        y += round(layout.px(line.size) * 1.3)


@lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(FONTS / name), size)

