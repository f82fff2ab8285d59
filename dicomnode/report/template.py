"""The SR template: which codes, units and texts the SEG and the TID 1500 SR carry (PURE).

The content lives in a TOML file (``sr_templates/tid1500_tmb.toml``) so that a site can review
it, and so that a coding decision is a reviewed data change rather than a code change.
:func:`load_template` reads and validates it into a frozen :class:`SrTemplate`; every error
names the offending key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.sr.coding import Code

from dicomnode.errors import ConfigError

#: Coding Scheme Designators of PS3.16 Table 8-1 that the report may use without declaring them.
STANDARD_SCHEMES = frozenset({"DCM", "SCT", "LN", "UCUM", "NCIt", "UMLS", "RADLEX", "FMA"})

#: Volume units the builder can convert ``Lesion.volume_ml`` into (factor per ml).
VOLUME_UNITS_PER_ML = {"cm3": 1.0, "ml": 1.0, "mL": 1.0, "mm3": 1000.0}
#: UCUM units a number in [0, 1] (a confidence, a probability) may be written in, with the
#: factor from [0, 1].
FRACTION_SCALE = {"%": 100.0, "1": 1.0}

#: PS3.5 Table 6.2-1 limits: CodeValue is SH (16 chars), CodeMeaning LO (64 chars).
_MAX_CODE_VALUE = 16
_MAX_MEANING = 64


@dataclass(frozen=True)
class CodingScheme:
    """One item of the Coding Scheme Identification Sequence (PS3.3 C.12.1, (0008,0110))."""

    designator: str
    name: str
    version: str = ""
    responsible_organization: str = ""


@dataclass(frozen=True)
class SrTemplate:
    """Validated report content; field comments name the TOML key each one comes from."""

    title: Code  # [document].title
    procedure_reported: Code  # [document].procedure_reported
    sr_series_description: str  # [document].sr_series_description
    seg_series_description: str  # [document].seg_series_description
    key_image_series_description: str  # [document].key_image_series_description
    pdf_series_description: str  # [document].pdf_series_description
    pdf_title: str  # [document].pdf_title
    device_model_name: str  # [document].device_model_name
    finding_category: Code  # [finding].category
    finding_type: Code  # [finding].type
    tracking_identifier: str  # [finding].tracking_identifier, with "{label}"
    confidence: Code  # [finding].confidence
    confidence_unit: Code  # [finding].confidence_unit ("%" or "1")
    volume_concept: Code  # [volume].concept
    volume_unit: Code  # [volume].unit
    tmb_probability: Code  # [tmb].probability
    tmb_probability_unit: Code  # [tmb].probability_unit
    tmb_status: Code  # [tmb].status
    tmb_high: Code  # [tmb].high
    tmb_low: Code  # [tmb].low
    subtype_concept: Code  # [subtype].concept
    subtype_codes: tuple[Code, ...]  # [subtype].codes
    area_concept: Code  # [planar].area
    area_unit: Code  # [planar].area_unit
    shown_tmb_probability: Code  # [planar].tmb_probability
    shown_tmb_probability_unit: Code  # [planar].tmb_probability_unit ("%" or "1")
    shown_subtype: Code  # [planar].subtype
    shown_subtype_unit: Code  # [planar].subtype_unit
    algorithm_family: Code  # [algorithm].family
    coding_schemes: tuple[CodingScheme, ...]  # [[coding_schemes]]
    research_note: str  # [text].research_note
    no_lesion_text: str  # [text].no_lesion

    def lesion_name(self, label: int) -> str:
        """Tracking Identifier / Segment Label of lesion ``label``."""
        return self.tracking_identifier.format(label=label)

    @property
    def volume_per_ml(self) -> float:
        """Factor that turns millilitres into :attr:`volume_unit`."""
        return VOLUME_UNITS_PER_ML[self.volume_unit.value]

    @property
    def confidence_scale(self) -> float:
        """Factor that turns a confidence in [0, 1] into :attr:`confidence_unit`."""
        return FRACTION_SCALE[self.confidence_unit.value]

    @property
    def shown_tmb_probability_scale(self) -> float:
        """Factor that turns a probability in [0, 1] into :attr:`shown_tmb_probability_unit`."""
        return FRACTION_SCALE[self.shown_tmb_probability_unit.value]

    def subtype_code(self, value: str) -> Code:
        """The declared subtype code with CodeValue ``value``; ``KeyError`` when undeclared."""
        for code in self.subtype_codes:
            if code.value == value:
                return code
        raise KeyError(value)


_SECTIONS: dict[str, tuple[str, ...]] = {
    "document": (
        "title",
        "procedure_reported",
        "sr_series_description",
        "seg_series_description",
        "key_image_series_description",
        "pdf_series_description",
        "pdf_title",
        "device_model_name",
    ),
    "finding": ("category", "type", "tracking_identifier", "confidence", "confidence_unit"),
    "volume": ("concept", "unit"),
    "tmb": ("probability", "probability_unit", "status", "high", "low"),
    "subtype": ("concept", "codes"),
    "planar": ("area", "area_unit", "tmb_probability", "tmb_probability_unit", "subtype",
               "subtype_unit"),
    "algorithm": ("family",),
    "coding_schemes": (),
    "text": ("research_note", "no_lesion"),
}
_CODE_KEYS = ("value", "scheme", "meaning")
_SCHEME_KEYS = ("designator", "name", "version", "responsible_organization")


def load_template(path: Path | str) -> SrTemplate:
    """Read and validate an SR template TOML file.

    Raises
    ------
    dicomnode.errors.ConfigError
        When the file is missing, is not TOML, or a key is missing, unknown or invalid; the
        message starts with the file name and names the key (e.g. ``[tmb].high.scheme``).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: SR template not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return template_from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def template_from_mapping(data: dict[str, Any]) -> SrTemplate:
    """Validate a parsed template document (see :func:`load_template`)."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section (known: {', '.join(_SECTIONS)})")
    sections = {name: _table(data, name) for name in _SECTIONS if name != "coding_schemes"}
    for name, table in sections.items():
        _reject_unknown(table, _SECTIONS[name], f"[{name}]")
        for key in _SECTIONS[name]:
            if key not in table:
                raise ConfigError(f"[{name}].{key}: missing")
    doc, finding, volume, tmb, subtype, planar, algorithm, text = (
        sections[n]
        for n in ("document", "finding", "volume", "tmb", "subtype", "planar", "algorithm", "text")
    )
    coding_schemes = _coding_schemes(data.get("coding_schemes", []))
    declared = STANDARD_SCHEMES | {s.designator for s in coding_schemes}

    def code(value: Any, where: str) -> Code:
        return _code(value, where, declared)

    return SrTemplate(
        title=code(doc["title"], "[document].title"),
        procedure_reported=code(doc["procedure_reported"], "[document].procedure_reported"),
        sr_series_description=_text(
            doc["sr_series_description"], "[document].sr_series_description", 64
        ),
        seg_series_description=_text(
            doc["seg_series_description"], "[document].seg_series_description", 64
        ),
        key_image_series_description=_text(
            doc["key_image_series_description"], "[document].key_image_series_description", 64
        ),
        pdf_series_description=_text(
            doc["pdf_series_description"], "[document].pdf_series_description", 64
        ),
        pdf_title=_text(doc["pdf_title"], "[document].pdf_title", 64),
        device_model_name=_text(doc["device_model_name"], "[document].device_model_name", 64),
        finding_category=code(finding["category"], "[finding].category"),
        finding_type=code(finding["type"], "[finding].type"),
        tracking_identifier=_tracking_identifier(finding["tracking_identifier"]),
        confidence=code(finding["confidence"], "[finding].confidence"),
        confidence_unit=_fraction_unit(
            finding["confidence_unit"], "[finding].confidence_unit", declared
        ),
        volume_concept=code(volume["concept"], "[volume].concept"),
        volume_unit=_volume_unit(volume["unit"], declared),
        tmb_probability=code(tmb["probability"], "[tmb].probability"),
        tmb_probability_unit=code(tmb["probability_unit"], "[tmb].probability_unit"),
        tmb_status=code(tmb["status"], "[tmb].status"),
        tmb_high=code(tmb["high"], "[tmb].high"),
        tmb_low=code(tmb["low"], "[tmb].low"),
        subtype_concept=code(subtype["concept"], "[subtype].concept"),
        subtype_codes=_subtype_codes(subtype["codes"], declared),
        area_concept=code(planar["area"], "[planar].area"),
        area_unit=code(planar["area_unit"], "[planar].area_unit"),
        shown_tmb_probability=code(planar["tmb_probability"], "[planar].tmb_probability"),
        shown_tmb_probability_unit=_fraction_unit(
            planar["tmb_probability_unit"], "[planar].tmb_probability_unit", declared
        ),
        shown_subtype=code(planar["subtype"], "[planar].subtype"),
        shown_subtype_unit=code(planar["subtype_unit"], "[planar].subtype_unit"),
        algorithm_family=code(algorithm["family"], "[algorithm].family"),
        coding_schemes=coding_schemes,
        research_note=_text(text["research_note"], "[text].research_note"),
        no_lesion_text=_text(text["no_lesion"], "[text].no_lesion"),
    )


def _fraction_unit(value: Any, where: str, declared: Any) -> Code:
    """The unit of a number in [0, 1] as written: UCUM "%" or "1"."""
    unit = _code(value, where, declared)
    if unit.scheme_designator != "UCUM" or unit.value not in FRACTION_SCALE:
        raise ConfigError(f"{where}: {unit.value!r} ({unit.scheme_designator}) is not one "
                          f"of the UCUM units {', '.join(map(repr, FRACTION_SCALE))}")
    return unit


def _reject_unknown(table: dict[str, Any], known: Any, where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in data:
        raise ConfigError(f"[{name}]: missing section")
    table = data[name]
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}]: expected a table")
    return table


def _text(value: Any, where: str, max_length: int | None = None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    if max_length is not None and len(value) > max_length:
        raise ConfigError(f"{where}: longer than {max_length} characters")
    return value


def _code(value: Any, where: str, declared: frozenset[str]) -> Code:
    """A ``{ value, scheme, meaning }`` table as a :class:`pydicom.sr.coding.Code`.

    ``declared`` holds the designators the report may use: the standard ones and the private
    ones of [[coding_schemes]] (PS3.16 Section 8.2).
    """
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table {{ value, scheme, meaning }}, got {value!r}")
    _reject_unknown(value, _CODE_KEYS, where)
    for key in _CODE_KEYS:
        if key not in value:
            raise ConfigError(f"{where}.{key}: missing")
    code_value = _text(value["value"], f"{where}.value", _MAX_CODE_VALUE)
    scheme = _text(value["scheme"], f"{where}.scheme", 16)
    meaning = _text(value["meaning"], f"{where}.meaning", _MAX_MEANING)
    if scheme == "SRT":
        raise ConfigError(f"{where}.scheme: SRT is retired; use the SCT code (PS3.16 Section 8)")
    if scheme not in declared:
        raise ConfigError(
            f"{where}.scheme: {scheme!r} is neither a standard scheme nor declared in "
            "[[coding_schemes]]"
        )
    return Code(value=code_value, scheme_designator=scheme, meaning=meaning)


def _tracking_identifier(value: Any) -> str:
    where = "[finding].tracking_identifier"
    text = _text(value, where)
    if "{label}" not in text:
        raise ConfigError(f"{where}: must contain {{label}} (the lesion number)")
    try:
        example = text.format(label=999)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{where}: not a valid format string ({exc})") from None
    if len(example) > 64:
        raise ConfigError(f"{where}: longer than 64 characters once filled in")
    return text


def _volume_unit(value: Any, declared: frozenset[str]) -> Code:
    unit = _code(value, "[volume].unit", declared)
    if unit.scheme_designator != "UCUM" or unit.value not in VOLUME_UNITS_PER_ML:
        raise ConfigError(
            f"[volume].unit: expected a UCUM volume unit ({', '.join(VOLUME_UNITS_PER_ML)}), "
            f"got ({unit.value}, {unit.scheme_designator})"
        )
    return unit


def _subtype_codes(value: Any, declared: frozenset[str]) -> tuple[Code, ...]:
    where = "[subtype].codes"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty array of code tables")
    codes = tuple(_code(item, f"{where}[{i}]", declared) for i, item in enumerate(value))
    values = [c.value for c in codes]
    duplicate = next((v for v in values if values.count(v) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{where}: code value {duplicate!r} appears twice")
    return codes


def _coding_schemes(value: Any) -> tuple[CodingScheme, ...]:
    if not isinstance(value, list):
        raise ConfigError("[[coding_schemes]]: expected an array of tables")
    schemes = []
    for i, item in enumerate(value):
        where = f"[[coding_schemes]][{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table")
        _reject_unknown(item, _SCHEME_KEYS, where)
        for key in ("designator", "name"):
            if key not in item:
                raise ConfigError(f"{where}.{key}: missing")
        designator = _text(item["designator"], f"{where}.designator", 16)
        if designator in STANDARD_SCHEMES:
            raise ConfigError(
                f"{where}.designator: {designator} is a standard scheme; do not declare it"
            )
        if not designator.startswith("99"):
            raise ConfigError(
                f"{where}.designator: a private scheme designator must start with '99'"
            )
        schemes.append(
            CodingScheme(
                designator=designator,
                name=_text(item["name"], f"{where}.name", 64),
                version=_text(item["version"], f"{where}.version", 16) if "version" in item else "",
                responsible_organization=(
                    _text(item["responsible_organization"], f"{where}.responsible_organization", 64)
                    if "responsible_organization" in item
                    else ""
                ),
            )
        )
    return tuple(schemes)
