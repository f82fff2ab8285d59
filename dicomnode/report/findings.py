"""The results table that the key images and the PDF report show, as text (PURE).

Both human-readable outputs take every number they print from :func:`findings`, formatted
once, so that a lesion's volume, confidence and predictions read the same on its key image and
in the PDF, and in the same units as the SR's planar group (what OHIF shows beside the outline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.sr.coding import Code

from dicomnode.report.equipment import contributing_models
from dicomnode.report.sr import predicted_codes, report_warnings
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis, Lesion, Prediction

#: The words every human-readable output carries next to the predictions (issue 11). The SR
#: carries the template's longer ``[text].research_note``; this short form fits on an image.
RESEARCH_CAPTION = "research prediction from imaging, not a sequencing result"
#: Shown instead of a prediction for a lesion that got none (the SR then has a warning).
NOT_PREDICTED = "-"
#: Shown instead of a confidence for a lesion a person drew: no model was asked how sure it is.
DRAWN = "drawn"
#: The units the formatted values end in: a line break never parts one from its number.
UNITS = frozenset({"%", "ml"})
#: Column headings, in the order of :meth:`FindingRow.cells`.
COLUMNS = ("Lesion", "Volume", "Confidence", "TMB-high probability", "TMB status", "Subtype")
#: Model roles in the order the model list names them, with the words that introduce them.
_TASKS = {"segmentation": "Segmentation", "tmb": "TMB", "subtype": "Subtype"}


@dataclass(frozen=True)
class FindingRow:
    """One lesion's line of the results table, every value already formatted."""

    label: int
    lesion: str
    volume: str
    confidence: str
    tmb_probability: str
    tmb_status: str
    subtype: str

    def cells(self) -> tuple[str, ...]:
        """The values in the order of :data:`COLUMNS`."""
        return (self.lesion, self.volume, self.confidence, self.tmb_probability,
                self.tmb_status, self.subtype)


@dataclass(frozen=True)
class Findings:
    """What a person reads about one analysis.

    Attributes
    ----------
    rows:
        One row per lesion, in lesion order.
    caption:
        :data:`RESEARCH_CAPTION`.
    models:
        One line per model that contributed (segmentation first), or the supplied
        segmentation that replaced the model.
    warnings:
        The same warnings the SR carries (:func:`dicomnode.report.sr.report_warnings`).
    """

    rows: tuple[FindingRow, ...]
    caption: str
    models: tuple[str, ...]
    warnings: tuple[str, ...]

    def row(self, label: int) -> FindingRow:
        """The row of lesion ``label``; ``KeyError`` when there is none."""
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(label)


def findings(analysis: Analysis, template: SrTemplate) -> Findings:
    """The results table, caption, model list and warnings of ``analysis``.

    Raises
    ------
    dicomnode.errors.ReportError
        When a prediction's subtype is not declared in the template (as the SR refuses it).
    """
    predictions = {p.label: p for p in analysis.predictions}
    return Findings(
        rows=tuple(_row(lesion, predictions.get(lesion.label), template)
                   for lesion in analysis.segmentation.lesions),
        caption=RESEARCH_CAPTION,
        models=model_lines(analysis),
        warnings=report_warnings(analysis),
    )


def _row(lesion: Lesion, prediction: Prediction | None, template: SrTemplate) -> FindingRow:
    confidence = DRAWN
    if lesion.confidence is not None:
        confidence = _fraction_text(lesion.confidence, template.confidence_scale)
    tmb_probability = tmb_status = subtype = NOT_PREDICTED
    if prediction is not None:
        status, subtype_code = predicted_codes(prediction, template)
        tmb_probability, tmb_status = _tmb_texts(prediction, status, template)
        subtype = subtype_code.meaning
    return FindingRow(
        label=lesion.label,
        lesion=template.lesion_name(lesion.label),
        volume=volume_text(lesion.volume_ml),
        confidence=confidence,
        tmb_probability=tmb_probability,
        tmb_status=tmb_status,
        subtype=subtype,
    )


def volume_text(volume_ml: float) -> str:
    """A volume in ml with three significant digits (``"0.123 ml"``, ``"12.3 ml"``,
    ``"1234 ml"``): more digits than a segmentation's accuracy would suggest a precision it
    does not have."""
    if volume_ml <= 0:
        return "0 ml"
    decimals = max(0, 2 - math.floor(math.log10(volume_ml)))
    return f"{volume_ml:.{decimals}f} ml"


def _fraction_text(value: float, scale: float) -> str:
    """A number in [0, 1] in the unit the SR writes it in: ``"81 %"`` or ``"0.81"``."""
    if scale == 100.0:
        return f"{value * 100:.0f} %"
    return f"{value:.2f}"


def _tmb_texts(prediction: Prediction, status: Code, template: SrTemplate) -> tuple[str, str]:
    """The TMB-high probability and the status with the threshold that decided it, both in
    the unit the SR's planar group shows the probability in (what OHIF displays)."""
    scale = template.shown_tmb_probability_scale
    threshold = _fraction_text(prediction.tmb_threshold, scale)
    return (_fraction_text(prediction.tmb_probability, scale),
            f"{status.meaning} (threshold {threshold})")


def model_lines(analysis: Analysis) -> tuple[str, ...]:
    """``"Segmentation: lesion-unet 1.2.0 (3D U-Net)"``, one line per model whose result the
    report holds, segmentation first.

    The segmentation model comes from the label volume when the analysis' model list lacks it;
    a supplied segmentation is named with who made it instead, since no model drew the lesions.
    """
    models = contributing_models(analysis)
    segmentation = analysis.segmentation
    lines = []
    if segmentation.supplied is not None:
        lines.append(f"Segmentation: supplied {segmentation.supplied.kind} made by "
                     f"{segmentation.supplied.creator}, measured as drawn")
    elif not any(m.task == "segmentation" for m in models):
        lines.append(f"Segmentation: {segmentation.model_name} {segmentation.model_version}")
    for task, words in _TASKS.items():
        lines.extend(f"{words}: {m.name} {m.version} ({m.family})"
                     for m in models if m.task == task)
    return tuple(lines)
