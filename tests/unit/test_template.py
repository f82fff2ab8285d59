"""SR template loading: the shipped file is valid; every bad key is named in the error."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dicomnode.errors import ConfigError
from dicomnode.report.template import load_template, template_from_mapping

TEMPLATE = Path(__file__).resolve().parents[2] / "sr_templates" / "tid1500_tmb.toml"


@pytest.fixture
def document() -> dict[str, Any]:
    return tomllib.loads(TEMPLATE.read_text(encoding="utf-8"))


def test_shipped_template_loads_with_the_documented_codes():
    t = load_template(TEMPLATE)
    assert (t.title.value, t.title.scheme_designator) == ("126000", "DCM")
    assert (t.finding_type.value, t.finding_type.scheme_designator) == ("108369006", "SCT")
    assert (t.tmb_probability.value, t.tmb_probability.scheme_designator) == ("122157", "DCM")
    assert (t.tmb_high.value, t.tmb_low.value) == ("LA9193-9", "LA9194-7")
    assert [c.value for c in t.subtype_codes] == ["IS1", "IS2", "IS3", "IS4"]
    assert {c.scheme_designator for c in t.subtype_codes} == {"99DICOMNODE"}
    assert [s.designator for s in t.coding_schemes] == ["99DICOMNODE"]
    assert t.lesion_name(3) == "Lesion 3"
    assert t.volume_per_ml == 1.0


def mutated(document: dict[str, Any], change) -> dict[str, Any]:
    copied = copy.deepcopy(document)
    change(copied)
    return copied


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["tmb"].update(probabilty=d["tmb"]["probability"]),
            r"\[tmb\]\.probabilty: unknown key",
        ),
        (lambda d: d["tmb"].pop("high"), r"\[tmb\]\.high: missing"),
        (lambda d: d["tmb"]["high"].pop("scheme"), r"\[tmb\]\.high\.scheme: missing"),
        (
            lambda d: d["volume"]["concept"].update(colour="red"),
            r"\[volume\]\.concept\.colour: unknown key",
        ),
        (lambda d: d.pop("finding"), r"\[finding\]: missing section"),
        (lambda d: d.update(extras={}), r"\[extras\]: unknown section"),
        (
            lambda d: d["finding"]["type"].update(scheme="SRT"),
            r"\[finding\]\.type\.scheme: SRT is retired",
        ),
        (
            lambda d: d["finding"]["type"].update(value="1" * 17),
            r"\[finding\]\.type\.value: longer than 16",
        ),
        (
            lambda d: d["finding"].update(tracking_identifier="Lesion"),
            r"tracking_identifier: must contain \{label\}",
        ),
        (
            lambda d: d["finding"]["confidence_unit"].update(value="cm"),
            r"\[finding\]\.confidence_unit: 'cm' \(UCUM\) is not one of",
        ),
        (
            lambda d: d["volume"]["unit"].update(value="l"),
            r"\[volume\]\.unit: expected a UCUM volume unit",
        ),
        (
            lambda d: d["coding_schemes"].clear(),
            r"\[subtype\]\.concept\.scheme: '99DICOMNODE' is neither",
        ),
        (
            lambda d: d["coding_schemes"][0].update(designator="XDICOMNODE"),
            r"designator: a private scheme .* '99'",
        ),
        (
            lambda d: d["subtype"]["codes"].append(d["subtype"]["codes"][0]),
            r"\[subtype\]\.codes: code value 'IS1'",
        ),
        (
            lambda d: d["text"].update(research_note=""),
            r"\[text\]\.research_note: expected a non-empty string",
        ),
    ],
)
def test_bad_key_is_named(document, change, message):
    with pytest.raises(ConfigError, match=message):
        template_from_mapping(mutated(document, change))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_template(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[document\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_template(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        TEMPLATE.read_text(encoding="utf-8").replace('meaning = "Neoplasm"', 'meanin = "Neoplasm"')
    )
    with pytest.raises(ConfigError, match=r"bad\.toml: \[finding\]\.type\.meanin: unknown key"):
        load_template(bad)
