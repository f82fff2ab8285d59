"""Report stage: an :class:`~dicomnode.types.Analysis` becomes a DICOM SEG, a TID 1500 SR, key
images and a PDF report (PURE).

Everything is built in memory with highdicom; writing and sending are the job of
:mod:`dicomnode.results` and :mod:`dicomnode.deliver`. The codes, units and texts come from an
SR template file (``sr_templates/tid1500_tmb.toml``, see :mod:`dicomnode.report.template`).

- :func:`build_reports`: the SEG (absent when no lesion was found), the SR, a key image per
  lesion and the PDF of one analysis.
- :func:`summarize_sr`: a readable text summary of an SR, for the CLI and the demo.
- :func:`summary_json`: the JSON summary written next to the objects.

The Specific Character Set the objects declare, for names in any script and for sources
that declare a wrong one or none, is decided in :mod:`dicomnode.report.charset`.

Neither summary contains the patient's name or ID.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.dataelem import DataElement

from dicomnode.config import ReportConfig
from dicomnode.report.charset import settle_character_set
from dicomnode.report.keyimages import build_key_images, render_key_images
from dicomnode.report.keyslice import key_slices
from dicomnode.report.pdf import build_pdf_report
from dicomnode.report.seg import ReportUids, build_seg
from dicomnode.report.sr import build_sr, report_warnings, summarize_sr
from dicomnode.report.template import SrTemplate, load_template
from dicomnode.types import Analysis, Prediction, ReportSet, SuppliedSegmentation

log = logging.getLogger(__name__)

__all__ = [
    "ReportUids",
    "SrTemplate",
    "build_reports",
    "load_template",
    "summarize_sr",
    "summary_json",
]


def build_reports(
    analysis: Analysis,
    *,
    template: SrTemplate,
    config: ReportConfig,
    uid_seed: str,
    series_number_base: int = 900,
    predecessors: Sequence[Dataset] = (),
) -> ReportSet:
    """Build the SEG and the SR of one analysis.

    Parameters
    ----------
    analysis
        The analysed CT series.
    template
        Report content (codes, units, texts), from :func:`load_template`.
    config
        Equipment identity written into both objects.
    uid_seed
        Seed of every UID of the result (the job's identity): the same seed gives the same
        series, instance and tracking UIDs, so a retried delivery repeats them exactly; a new
        job must use a new seed, so that re-issued results never reuse a UID.
    series_number_base
        Series Number of the SEG; the SR, the key images and the PDF get the next three.
    predecessors
        Earlier SRs of the same series that this report replaces (Predecessor Documents).

    Returns
    -------
    dicomnode.types.ReportSet
        ``seg`` is ``None`` when no lesion was found (the SR then says so) and when the
        lesions were measured on a supplied SEG (the SR references that SEG's segments); a
        supplied RTSTRUCT gets a SEG, so that viewers can show it. ``key_images`` (one per
        lesion) and ``pdf`` are there when ``config.key_images`` / ``config.pdf_report`` say so;
        the PDF is written without lesions too (it then says that none was found).

    Raises
    ------
    dicomnode.errors.ReportError
        When the analysis cannot be expressed as a valid SEG or SR.
    """
    labels = tuple(lesion.label for lesion in analysis.segmentation.lesions)
    uids = _keep_supplied_tracking(ReportUids.derive(uid_seed, labels), analysis.segmentation.supplied)
    with warnings.catch_warnings():
        # highdicom warns about a one-component PatientName with the name in the message
        # (check_person_name): patient data in the log. The name is copied as the source has it.
        warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
        supplied = analysis.segmentation.supplied
        slices = key_slices(analysis.volume, analysis.segmentation)
        seg = None
        if labels and (supplied is None or supplied.kind != "SEG"):
            seg = build_seg(
                analysis, template=template, config=config, uids=uids, series_number=series_number_base
            )
        sr = build_sr(
            analysis,
            seg=seg if seg is not None or not labels or supplied is None else supplied.header,
            key_slices=slices,
            template=template,
            config=config,
            uids=uids,
            series_number=series_number_base + 1,
            predecessors=predecessors,
        )
        # Rendered once: the PDF shows the key images' own pixels.
        rendered = (render_key_images(analysis, slices, template)
                    if config.key_images or config.pdf_report else [])
        key_images = tuple(build_key_images(
            analysis, slices, template=template, config=config, uids=uids,
            series_number=series_number_base + 2, rendered=rendered,
        )) if config.key_images else ()
        pdf = build_pdf_report(
            analysis, slices, template=template, config=config, uids=uids,
            series_number=series_number_base + 3, rendered=rendered,
        ) if config.pdf_report else None
    reports = ReportSet(sr=sr, seg=seg, key_images=key_images, pdf=pdf)
    outputs = list(reports.datasets())
    shortened = set()
    for ds in outputs:
        shortened.update(fit_inherited_values(ds))
        complete_deidentification_method(ds)
    for keyword in sorted(shortened):
        # Once per report, not per object (a key image per lesion), naming never the value,
        # which may identify the patient.
        log.warning("%s copied from the source is longer than its VR allows: shortened",
                    keyword)
    settle_character_set(outputs, analysis.volume.sources[0])
    return reports


def _keep_supplied_tracking(uids: ReportUids, supplied: SuppliedSegmentation | None) -> ReportUids:
    """A lesion measured on a supplied SEG keeps that segment's Tracking UID, so that the SR's
    groups and the SEG describe one tracked finding (PS3.3 C.8.20.4, IHE AIR)."""
    if supplied is None or supplied.kind != "SEG":
        return uids
    given = {int(item.SegmentNumber): str(item.TrackingUID)
             for item in supplied.header.get("SegmentSequence", []) if item.get("TrackingUID")}
    tracking = {label: given.get(number, uids.tracking[label])
                for label, number in enumerate(supplied.numbers, start=1)}
    return dataclasses.replace(uids, tracking=tracking)


#: highdicom's warning whose text holds the patient's name (never logged).
PERSON_NAME_WARNING = r".*is unlikely to represent the intended person name"

#: Maximum value lengths of the string VRs that are copied from the source CT (PS3.5 6.2).
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64}


def fit_inherited_values(ds: Dataset) -> list[str]:
    """Cut string values copied from the source CT to their VR's maximum length; the keywords
    of those cut.

    Patient and study attributes are copied from the CT into the SEG and SR; some scanners and
    anonymisers write over-long values (the IBSI CT has a 17-character Study ID), which would
    make our objects invalid. The value is shortened, not dropped; the caller says which
    attributes were (never their values, which may identify the patient).
    """
    shortened = []
    for element in ds:
        limit = _MAX_LENGTH.get(element.VR)
        if limit is None or element.value is None:
            continue
        values = element.value if element.VM > 1 else [element.value]
        fitted = [str(v)[:limit] for v in values]
        if fitted != [str(v) for v in values]:
            shortened.append(element.keyword)
            # A new element: highdicom shares the source's elements, which must stay untouched.
            ds[element.tag] = DataElement(element.tag, element.VR,
                                          fitted if element.VM > 1 else fitted[0])
    return shortened


#: DeidentificationMethod written when the source says "de-identified" but not how (LO, 64).
UNSTATED_DEIDENTIFICATION = "Not stated in the source images (PatientIdentityRemoved YES)"


def complete_deidentification_method(ds: Dataset) -> None:
    """Satisfy the Patient Module's Type 1C condition that the source itself broke.

    Public archives (TCIA among them) ship CT with PatientIdentityRemoved YES and neither
    DeidentificationMethod nor its code sequence; copied into the SEG and SR that is invalid
    (PS3.3 C.7.1.1). We say that the method was not stated instead of guessing one, and
    write nothing about the patient.
    """
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        return
    if ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence"):
        return
    log.warning("the source says PatientIdentityRemoved YES without a method: the outputs "
                "state that the method was not given")
    ds.DeidentificationMethod = UNSTATED_DEIDENTIFICATION


def summary_json(analysis: Analysis, reports: ReportSet) -> dict[str, Any]:
    """The JSON-serialisable summary of one result (written as ``summary.json``).

    Holds UIDs, per-lesion numbers and predictions, the models, warnings and the UIDs of the
    objects written; no patient name or ID.
    """
    predictions = {p.label: p for p in analysis.predictions}
    return {
        "study_instance_uid": analysis.volume.key.study_uid,
        "series_instance_uid": analysis.volume.key.series_uid,
        "lesions": [
            {
                "label": int(lesion.label),
                "volume_ml": round(float(lesion.volume_ml), 3),
                "confidence": lesion.confidence,
                "centroid_mm": [round(float(c), 2) for c in lesion.centroid_mm],
                **_prediction_summary(predictions.get(lesion.label)),
            }
            for lesion in analysis.segmentation.lesions
        ],
        "models": [
            {"name": m.name, "version": m.version, "family": m.family} for m in analysis.models
        ],
        "warnings": list(report_warnings(analysis)),
        "segmentation_source": _supplied_summary(analysis.segmentation.supplied),
        "outputs": {
            "seg": _object_uids(reports.seg),
            "sr": _object_uids(reports.sr),
            "key_images": [_object_uids(ds) for ds in reports.key_images],
            "pdf": _object_uids(reports.pdf),
        },
    }


def _prediction_summary(prediction: Prediction | None) -> dict[str, Any]:
    if prediction is None:
        return {"tmb_probability": None, "tmb_threshold": None, "tmb_status": None, "subtype": None}
    return {
        "tmb_probability": round(float(prediction.tmb_probability), 4),
        "tmb_threshold": float(prediction.tmb_threshold),
        "tmb_status": "high" if prediction.tmb_high else "low",
        "subtype": {
            "index": prediction.subtype.index,
            "code": prediction.subtype.code_value,
            "meaning": prediction.subtype.meaning,
        },
    }


def _supplied_summary(supplied: SuppliedSegmentation | None) -> dict[str, Any]:
    """Where the lesions came from: the model, or a supplied RTSTRUCT/SEG (with its ROIs or
    segments, lesion k being ``numbers[k-1]``)."""
    if supplied is None:
        return {"kind": "model"}
    return {"kind": supplied.kind, "sop_instance_uid": supplied.sop_instance_uid,
            "series_instance_uid": supplied.series_uid, "creator": supplied.creator,
            "numbers": list(supplied.numbers), "names": list(supplied.names)}


def _object_uids(ds: Dataset | None) -> dict[str, str] | None:
    if ds is None:
        return None
    return {
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
    }
