"""The TID 1500 Measurement Report in a Comprehensive 3D SR (PS3.3 A.35.13, PS3.16 TID 1500) (PURE).

Comprehensive 3D SR, not Comprehensive SR: IHE AI Results (RAD TF-3 6.5.3) asks for it, and
OHIF, highdicom, dcmqi and dsrdump read it as they read the other (the tests check all four).

Content tree (PS3.16 TID 1500, TID 1411, TID 300, TID 4019, TID 4108)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      HAS CONCEPT MOD  CODE  Language of Content Item and Descendants TID 1204
      HAS OBS CONTEXT  ...   Device observer (name, manufacturer, model, UID)   TID 1001/1004
      HAS CONCEPT MOD  CODE  Procedure reported (CT)
      CONTAINS CONTAINER Image Library (the CT images)                TID 1600
      CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")        only with lesions
        CONTAINS CONTAINER Measurement Group, one per lesion          TID 1410
          Tracking Identifier "Lesion k" + the same Tracking UID as below
          Finding category / Finding (Neoplasm)
          SCOORD POLYLINE: the lesion's outline on its largest CT slice (that image)
          Algorithm Identification (segmentation model)               TID 4019
          NUM Area on that slice (mm2)
          NUM TMB-high probability (%), NUM Imaging subtype number    for viewers (see below)
        CONTAINS CONTAINER Measurement Group, one per lesion          TID 1411
          Tracking Identifier "Lesion k" + Tracking UID (= SEG segment's)  TID 4108
          Finding category / Finding (Neoplasm)
          IMAGE Referenced Segment k of the SEG, source series = the CT
          Algorithm Identification (segmentation model)               TID 4019
          NUM Volume (cm3)                                            TID 300
          NUM Certainty of Finding (%): the segmenter's confidence    only for model lesions
          NUM Probability of TMB high (no units) + its algorithm and threshold
          CODE TMB [Interpretation] = High | Low (LOINC)
          CODE Imaging subtype = private code (99DICOMNODE)
      CONTAINS CONTAINER (C0034375, UMLS, "Qualitative Evaluations")
        CONTAINS TEXT Finding "No lesion detected"                    only without lesions
        CONTAINS TEXT Comment: research-use note, algorithms, volume warnings

Two groups per lesion because viewers differ: highdicom, dcmqi and 3D Slicer read the
volumetric group with its SEG segment, while OHIF draws only groups with a SCOORD, merges the
groups of one Tracking UID into one annotation and shows its first five NUM items as text, but
no CODE item. The planar group, which OHIF reads first, therefore repeats the TMB prediction
and the subtype as numbers (private concepts, declared in the template's [planar] section).

The Qualitative Evaluations container (TID 1500 row 10) is where TID 1500 allows free text at
document level; an SR without lesions therefore still satisfies TID 1500's condition that
Imaging Measurements, Derived Imaging Measurements or Qualitative Evaluations be present.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ContentSequence,
    RelationshipTypeValues,
    TextContentItem,
)
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode import __version__
from dicomnode.config import ReportConfig
from dicomnode.errors import ReportError
from dicomnode.report.charset import source_character_set
from dicomnode.report.equipment import contributing_equipment, pipeline_uid
from dicomnode.report.keyslice import KeySlice
from dicomnode.report.seg import ReportUids
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis, Lesion, ModelInfo, Prediction, SuppliedSegmentation

log = logging.getLogger(__name__)

#: TID 1500 row 10: document-level qualitative evaluations (CODE and TEXT items).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: TID 4019 row 3 concept of an algorithm parameter.
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
LANGUAGE = CodedConcept("en-US", "RFC5646", "English (United States)")


def build_sr(
    analysis: Analysis,
    *,
    seg: Dataset | None,
    key_slices: Sequence[KeySlice],
    template: SrTemplate,
    config: ReportConfig,
    uids: ReportUids,
    series_number: int,
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR of ``analysis`` in memory.

    Parameters
    ----------
    analysis
        The analysed series; with no lesion the report says so and ``seg`` must be ``None``.
    seg
        The SEG whose segments the lesion groups reference: the one built for this analysis,
        or the supplied SEG the lesions were measured on (its own segment numbers).
    key_slices
        Each lesion's largest slice and outline, in lesion order (:mod:`.keyslice`).
    template
        Codes, units and texts of the report.
    config
        Equipment and device-observer identity.
    uids
        Series, instance and tracking UIDs (tracking UIDs equal the SEG's).
    series_number
        Series Number of the SR series.
    predecessors
        Earlier SRs this one replaces (a corrected segmentation was measured): listed in the
        Predecessor Documents Sequence (PS3.3 C.17.2.3).

    Raises
    ------
    dicomnode.errors.ReportError
        When a prediction's subtype is not declared in the template, or highdicom refuses the
        content.
    """
    lesions = analysis.segmentation.lesions
    if bool(lesions) != (seg is not None):
        raise ReportError("a SEG is required exactly when there are lesions")
    if len(key_slices) != len(lesions):
        raise ReportError(f"{len(key_slices)} key slices for {len(lesions)} lesions")
    groups = [
        group
        for lesion, key in zip(lesions, key_slices)
        for group in (_planar_group(analysis, lesion, key, template, uids),
                      _measurement_group(analysis, lesion, seg, template, uids))
    ] if seg is not None else []
    root = _measurement_report(analysis, groups, template, config)
    supplied = analysis.segmentation.supplied
    evidence = [*analysis.volume.sources, *([seg] if seg is not None else []),
                *([supplied.header] if supplied is not None and supplied.kind == "RTSTRUCT" else [])]
    _check_evidence(root, evidence)
    try:
        document = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            # highdicom deep-copies the content it is given and searches it for references
            # (seconds for an image library of a few hundred CT images). It is given the
            # root container alone; the tree is put in afterwards, and read back once
            # without a copy (below), which makes `document.content` the same as it would be.
            content=_stand_in(root, template),
            series_instance_uid=uids.sr_series,
            series_number=series_number,
            sop_instance_uid=uids.sr_instance,
            instance_number=1,
            manufacturer=config.manufacturer,
            manufacturer_model_name=template.device_model_name,
            software_versions=__version__,
            device_serial_number=config.device_observer_name,
            institution_name=config.institution_name or None,
            series_description=template.sr_series_description,
            # Complete but neither verified nor final: no person has reviewed a research result.
            is_complete=True,
            is_final=False,
            is_verified=False,
            coding_schemes=_coding_schemes(template),
            previous_versions=list(predecessors) or None,
            contributing_equipment=contributing_equipment(analysis, config, template),
            # As in the SEG: settled after building (dicomnode.report.charset).
            specific_character_set=source_character_set(analysis.volume.sources[0])[0],
        )
        document.ContentSequence = root.ContentSequence
        return hd.sr.Comprehensive3DSR.from_dataset(document, copy=False)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"cannot build the SR: {exc}") from exc


def _stand_in(root: ContainerContentItem, template: SrTemplate) -> ContainerContentItem:
    """``root`` with only its first child (the language of the content): what the SR's
    constructor copies and searches instead of the whole tree."""
    stand_in = ContainerContentItem(name=template.title, template_id="1500")
    stand_in.ContentSequence = ContentSequence(root.ContentSequence[:1])
    return stand_in


def _check_evidence(root: ContainerContentItem, evidence: Sequence[Dataset]) -> None:
    """Every instance an IMAGE or COMPOSITE item of the tree references is in ``evidence``
    (what highdicom checks when it is given the whole tree)."""
    referenced: set[str] = set()
    items = list(root.ContentSequence)
    while items:
        item = items.pop()
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            referenced.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        items.extend(item.get("ContentSequence", []))
    missing = referenced - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ReportError(f"cannot build the SR: it references {len(missing)} instance(s) that "
                          f"are not among its evidence: {', '.join(sorted(missing))}")


def _coding_schemes(template: SrTemplate) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification Sequence items for the private schemes (PS3.3 C.12.1)."""
    return [
        CodingSchemeIdentificationItem(
            designator=s.designator,
            name=s.name,
            version=s.version or None,
            responsible_organization=s.responsible_organization or None,
        )
        for s in template.coding_schemes
    ]


def _measurement_report(
    analysis: Analysis,
    groups: Sequence[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
                     | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations],
    template: SrTemplate,
    config: ReportConfig,
) -> ContainerContentItem:
    """The TID 1500 root container (built here because highdicom's requires a lesion)."""
    root = ContainerContentItem(name=template.title, template_id="1500")
    content = ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(LANGUAGE))
    content.extend(_observation_context(analysis, template, config))
    content.append(
        CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=template.procedure_reported,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    content.extend(_image_library(analysis.volume.sources))
    if groups:
        measurements = ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
        content.append(measurements)
    content.append(_qualitative_evaluations(analysis, template))
    root.ContentSequence = content
    return root


def _observation_context(
    analysis: Analysis, template: SrTemplate, config: ReportConfig
) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer only (TID 1004): the report is the algorithm's. The
    device is the pipeline, with the UID of its Contributing Equipment item (IHE AIR)."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=pipeline_uid(config, analysis.models),
                name=config.device_observer_name,
                manufacturer_name=config.manufacturer,
                model_name=template.device_model_name,
                serial_number=config.device_observer_name,
            ),
        )
    )


def _image_library(sources: Sequence[Dataset]) -> ContentSequence:
    """TID 1600 Image Library of the CT, or nothing when highdicom cannot describe the images.

    The library is optional (TID 1500 row 5). highdicom derives its TID 1604 descriptors from
    top-level PixelSpacing, ImagePositionPatient and SliceThickness, which an Enhanced CT keeps
    in functional groups: such a source is still referenced through the evidence sequence and
    the Source Series For Segmentation of each group.
    """
    try:
        return hd.sr.ImageLibrary(list(sources))
    except (AttributeError, TypeError, ValueError) as exc:
        log.info("SR without image library: %s", exc)
        return ContentSequence()


def _measurement_group(
    analysis: Analysis,
    lesion: Lesion,
    seg: Dataset,
    template: SrTemplate,
    uids: ReportUids,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 for one lesion, referencing its SEG segment."""
    label = lesion.label
    prediction = _prediction_of(analysis.predictions, label)
    measurements = [
        hd.sr.Measurement(
            name=template.volume_concept,
            value=float(lesion.volume_ml) * template.volume_per_ml,
            unit=template.volume_unit,
        )
    ]
    if lesion.confidence is not None:
        measurements.append(hd.sr.Measurement(
            name=template.confidence,
            value=round(float(lesion.confidence) * template.confidence_scale, 2),
            unit=template.confidence_unit,
        ))
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if prediction is not None:
        measurements.append(_tmb_probability(prediction, analysis.models, template))
        evaluations = _predicted_classes(prediction, template)
    supplied = analysis.segmentation.supplied
    referenced_number = label
    if supplied is not None and supplied.kind == "SEG":
        referenced_number = supplied.numbers[label - 1]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking[label], identifier=template.lesion_name(label)
        ),
        # Built directly: ReferencedSegment.from_segmentation() fails on highdicom 0.28 SEGs.
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=referenced_number,
            source_series=hd.sr.SourceSeriesForSegmentation(analysis.volume.key.series_uid),
        ),
        finding_category=template.finding_category,
        finding_type=template.finding_type,
        algorithm_id=_segmentation_algorithm(analysis, template),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _planar_group(
    analysis: Analysis,
    lesion: Lesion,
    key: KeySlice,
    template: SrTemplate,
    uids: ReportUids,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for one lesion: its outline and area on its largest slice, and the predictions
    as numbers (what OHIF shows beside the outline)."""
    label = lesion.label
    measurements = [
        hd.sr.Measurement(name=template.area_concept, value=round(key.area_mm2, 2),
                          unit=template.area_unit)
    ]
    prediction = _prediction_of(analysis.predictions, label)
    if prediction is not None:
        measurements.extend([
            hd.sr.Measurement(
                name=template.shown_tmb_probability,
                value=round(float(prediction.tmb_probability)
                            * template.shown_tmb_probability_scale, 2),
                unit=template.shown_tmb_probability_unit,
                algorithm_id=_tmb_algorithm(prediction, analysis.models, template),
            ),
            hd.sr.Measurement(
                name=template.shown_subtype, value=prediction.subtype.index,
                unit=template.shown_subtype_unit,
                algorithm_id=_model_algorithm(_model_for("subtype", analysis.models), template),
            ),
        ])
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking[label], identifier=template.lesion_name(label)
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=key.outline,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=key.source.SOPClassUID,
                referenced_sop_instance_uid=key.source.SOPInstanceUID,
                referenced_frame_numbers=None if key.frame_number is None else [key.frame_number],
            ),
        ),
        finding_category=template.finding_category,
        finding_type=template.finding_type,
        algorithm_id=_segmentation_algorithm(analysis, template),
        measurements=measurements,
    )


def _segmentation_algorithm(
    analysis: Analysis, template: SrTemplate
) -> hd.sr.AlgorithmIdentification | None:
    """TID 4019 of the model that drew the lesions; none for a supplied segmentation (drawn by
    a person or another tool)."""
    segmentation = analysis.segmentation
    if segmentation.supplied is not None:
        return None
    return hd.sr.AlgorithmIdentification(
        name=segmentation.model_name,
        version=segmentation.model_version,
        family=template.algorithm_family,
    )


def _prediction_of(predictions: Iterable[Prediction], label: int) -> Prediction | None:
    """The prediction for lesion ``label``; a lesion without one gets only its volume."""
    return next((p for p in predictions if p.label == label), None)


def _tmb_probability(
    prediction: Prediction, models: Sequence[ModelInfo], template: SrTemplate
) -> hd.sr.Measurement:
    """NUM "Probability" of the TMB-high class, with the TMB model and its threshold (TID 4019)."""
    return hd.sr.Measurement(
        name=template.tmb_probability,
        value=float(prediction.tmb_probability),
        unit=template.tmb_probability_unit,
        algorithm_id=_tmb_algorithm(prediction, models, template),
    )


def _tmb_algorithm(prediction: Prediction, models: Sequence[ModelInfo],
                   template: SrTemplate) -> hd.sr.AlgorithmIdentification | None:
    """TID 4019 of the TMB model with its operating threshold."""
    model = _model_for("tmb", models)
    if model is None:
        log.warning("no TMB model in the analysis: the probability has no algorithm")
    return _model_algorithm(model, template, [f"threshold={prediction.tmb_threshold:g}"])


def _model_algorithm(model: ModelInfo | None, template: SrTemplate,
                     parameters: Sequence[str] = ()) -> hd.sr.AlgorithmIdentification | None:
    if model is None:
        return None
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version,
                                         family=template.algorithm_family,
                                         parameters=list(parameters) or None)


def predicted_codes(prediction: Prediction, template: SrTemplate) -> tuple[Code, Code]:
    """The TMB status (High iff probability >= threshold) and the imaging subtype as the
    template codes them; the key images and the PDF name the same codes.

    Raises
    ------
    dicomnode.errors.ReportError
        When the subtype is not declared in the template.
    """
    try:
        subtype = template.subtype_code(prediction.subtype.code_value)
    except KeyError:
        raise ReportError(
            f"lesion {prediction.label}: subtype code {prediction.subtype.code_value!r} is not "
            "declared in the SR template's [subtype].codes"
        ) from None
    return (template.tmb_high if prediction.tmb_high else template.tmb_low), subtype


def _predicted_classes(
    prediction: Prediction, template: SrTemplate
) -> list[hd.sr.QualitativeEvaluation]:
    """TMB status and imaging subtype as qualitative evaluations."""
    status, subtype = predicted_codes(prediction, template)
    return [
        hd.sr.QualitativeEvaluation(name=template.tmb_status, value=status),
        hd.sr.QualitativeEvaluation(name=template.subtype_concept, value=subtype),
    ]


def _model_for(task: str, models: Sequence[ModelInfo]) -> ModelInfo | None:
    """The model of ``task`` ("tmb", "subtype") in the analysis."""
    return next((m for m in models if m.task == task), None)


def _qualitative_evaluations(analysis: Analysis, template: SrTemplate) -> ContainerContentItem:
    """TID 1500 row 10: the no-lesion finding, the research note, algorithms and warnings."""
    container = ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    items = ContentSequence()
    if not analysis.segmentation.lesions:
        items.append(_text(codes.DCM.Finding, template.no_lesion_text))
    items.append(_text(codes.DCM.Comment, template.research_note))
    supplied = analysis.segmentation.supplied
    if supplied is not None:
        items.append(_text(codes.DCM.Comment, describe_supplied(supplied)))
    if analysis.models:
        algorithms = "; ".join(_describe(m) for m in analysis.models)
        items.append(_text(codes.DCM.Comment, f"Algorithms: {algorithms}"))
    for warning in report_warnings(analysis):
        items.append(_text(codes.DCM.Comment, f"Warning: {warning}"))
    container.ContentSequence = items
    return container


def report_warnings(analysis: Analysis) -> tuple[str, ...]:
    """Every warning the report must carry, each once, in pipeline order.

    Volume warnings (e.g. a slice gap), analysis warnings, per-lesion feature warnings, and a
    note for each lesion that got no prediction (its group then holds only the volume).
    """
    predicted = {p.label for p in analysis.predictions}
    per_lesion = [f"lesion {f.label}: {w}" for f in analysis.features for w in f.warnings]
    unpredicted = [
        f"lesion {lesion.label}: no TMB or subtype prediction was made"
        for lesion in analysis.segmentation.lesions
        if lesion.label not in predicted
    ]
    return tuple(
        dict.fromkeys((*analysis.volume.warnings, *analysis.warnings, *per_lesion, *unpredicted))
    )


def describe_supplied(supplied: SuppliedSegmentation) -> str:
    """The SR's note on where the lesions came from when no model of ours drew them."""
    parts = "segments" if supplied.kind == "SEG" else "ROIs"
    drawn = ", ".join(f"{n} {name!r}" for n, name in zip(supplied.numbers, supplied.names))
    return (f"Segmentation supplied, not found by a model: {supplied.kind} "
            f"{supplied.sop_instance_uid} of series {supplied.series_uid}, made by "
            f"{supplied.creator}; measured as drawn ({parts} {drawn}).")


def _describe(model: ModelInfo) -> str:
    return f"{model.name} {model.version} ({model.family})"


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


# -- reading back -------------------------------------------------------------------------


def summarize_sr(sr: Dataset) -> str:
    """A readable summary of a TID 1500 SR: one block per measurement group, then the notes.

    Only report content is shown (never patient name or ID), so the text can go into logs.
    Works on any TID 1500 SR, not only dicomnode's.
    """
    title = sr.ConceptNameCodeSequence[0].CodeMeaning
    lines = [f"{title} ({sr.get('SeriesDescription', 'SR')})", f"Study {sr.StudyInstanceUID}"]
    groups = list(_children(sr, codes.DCM.ImagingMeasurements))
    groups = [g for container in groups for g in _children(container, codes.DCM.MeasurementGroup)]
    lines.append(f"{len(groups)} measurement group(s)")
    for group in groups:
        lines.extend(_summarize_group(group))
    notes = [
        f"  {_concept(item).meaning}: {_value(item)}"
        for container in _children(sr, QUALITATIVE_EVALUATIONS)
        for item in container.get("ContentSequence", [])
    ]
    if notes:
        lines.append("Notes:")
        lines.extend(notes)
    return "\n".join(lines)


def _summarize_group(group: Dataset) -> list[str]:
    """``Lesion k [by <segmentation algorithm>]:`` then one line per NUM and CODE item."""
    items = list(group.get("ContentSequence", []))
    name = next((_value(i) for i in items if _concept(i) == codes.DCM.TrackingIdentifier), "group")
    if any(i.ValueType in ("SCOORD", "SCOORD3D") for i in items):
        name += " on its largest slice"
    lines = [f"{name}{_algorithm_note(group)}:"]
    for item in items:
        if item.ValueType in ("NUM", "CODE") and _concept(item) not in _NOT_SUMMARISED:
            label = f"{_concept(item).meaning}{_derivation(item)}"
            lines.append(f"  {label}: {_value(item)}{_algorithm_note(item)}")
    return lines


#: Items that describe an algorithm or the group rather than the lesion.
_NOT_SUMMARISED = (codes.DCM.AlgorithmFamily, Code("276214006", "SCT", "Finding category"))


def _algorithm_note(item: Dataset) -> str:
    """`` [by <algorithm> <version> <parameters>]`` for an item with TID 4019 children."""
    parts = [
        _value(child)
        for child in item.get("ContentSequence", [])
        if child.ValueType == "TEXT"
        and _concept(child)
        in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion, ALGORITHM_PARAMETERS)
    ]
    return f" [by {' '.join(parts)}]" if parts else ""


def _derivation(item: Dataset) -> str:
    """`` (Mean)`` for a NUM whose Derivation (121401, DCM) modifier says how it was computed."""
    derivation = next(
        (_value(c) for c in item.get("ContentSequence", []) if _concept(c) == codes.DCM.Derivation),
        None,
    )
    return f" ({derivation})" if derivation else ""


def _children(item: Dataset, name: Code) -> Iterable[Dataset]:
    return (c for c in item.get("ContentSequence", []) if _concept(c) == name)


def _concept(item: Dataset) -> Code:
    c = item.ConceptNameCodeSequence[0]
    return Code(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)


def _value(item: Dataset) -> str:
    """The value of a TEXT, CODE, NUM or UIDREF content item as text."""
    if item.ValueType == "NUM":
        measured = item.MeasuredValueSequence[0]
        unit = measured.MeasurementUnitsCodeSequence[0].CodeValue
        return f"{float(measured.NumericValue):g}" + ("" if unit == "1" else f" {unit}")
    if item.ValueType == "CODE":
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if item.ValueType == "UIDREF":
        return str(item.UID)
    return str(item.get("TextValue", ""))
