"""The rules of dicomnode.report.charset on plain data sets (the end-to-end cases, through the
real node and Orthanc, are in tests/integration/test_charsets.py)."""

from __future__ import annotations

import logging

from pydicom import Dataset
from pydicom.valuerep import PersonName

from dicomnode.report.charset import settle_character_set, source_character_set


def _ds(charset: object = None, **values: str) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SeriesInstanceUID = "1.2.3"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_node_text_outside_the_sources_set_makes_the_outputs_utf8(caplog):
    source = _ds("ISO_IR 100", PatientName="Müller^Jürgen")
    out = _ds("ISO_IR 100", PatientName="Müller^Jürgen", InstitutionName="Πανεπιστημιακό")
    with caplog.at_level(logging.INFO, logger="dicomnode.report.charset"):
        assert settle_character_set([out], source) == "ISO_IR 192"
    assert out.SpecificCharacterSet == "ISO_IR 192"
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "InstitutionName" in record.getMessage()
    assert "Müller" not in record.getMessage()


def test_iso_2022_code_extensions_are_kept():
    source = _ds(["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎")
    assert source_character_set(source) == (["ISO 2022 IR 6", "ISO 2022 IR 87"], True)
    out = _ds(["ISO 2022 IR 6", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎")
    assert settle_character_set([out], source) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


def test_ascii_outputs_of_an_unknown_set_declare_none(caplog):
    source = _ds("ISO_IR 999", PatientName="Smith^John")
    assert source_character_set(source) == (None, False)
    out = _ds("ISO_IR 999", PatientName="Smith^John")
    assert settle_character_set([out], source) is None
    assert "SpecificCharacterSet" not in out
    assert "'ISO_IR 999'" in caplog.text and "Smith" not in caplog.text


def test_the_source_elements_are_left_untouched():
    source = _ds(None, PatientName=PersonName("Lef\xe8vre^H\xe9l\xe8ne".encode("latin-1"),
                                              encodings=["iso8859"]))
    out = Dataset()
    out.add(source["PatientName"])  # shared, as highdicom copies patient attributes
    settle_character_set([out], source)
    assert out.SpecificCharacterSet == "ISO_IR 100"
    assert out["PatientName"] is not source["PatientName"]
    assert "SpecificCharacterSet" not in source
