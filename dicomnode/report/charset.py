"""The Specific Character Set (0008,0005) of the SEG and SR (PURE).

The SEG and SR copy the patient and study attributes (PatientName, ReferringPhysicianName,
StudyDescription, ...) from the source CT and add text of their own (the node's configuration,
the SR template). By the time the report is built pydicom has decoded every source value into
Python text with the source's declared character set. What the outputs declare, and therefore
how that text is encoded, is decided here, once for both objects:

1. The source's Specific Character Set, when it is a Defined Term (PS3.3 C.12.1.1.2) that
   pydicom and highdicom both know and every text value of both objects can be encoded in it.
   This is the usual case: an ``ISO_IR 100`` or ``ISO_IR 192`` CT gives an ``ISO_IR 100`` or
   ``ISO_IR 192`` SEG and SR with byte-for-byte the same names, and a CT without the attribute
   (default repertoire, ASCII) whose text is ASCII gives outputs without it.
2. Otherwise none (the default repertoire) when all text is ASCII, else ``ISO_IR 100``
   (Latin-1) when every value fits it, else ``ISO_IR 192`` (UTF-8), which fits any text.

Rule 2 applies in these cases. The series is processed and delivered either way (the images are
fine), and one log line per job names the character set and the attributes concerned, never
their values (no patient data in logs, see SECURITY.md):

- **Unknown value**, e.g. ``ISO_IR 999`` or a misspelling pydicom cannot correct (WARNING).
  pydicom decodes such text with its fallback, Latin-1, which maps every byte to a character,
  so nothing is lost; declaring ``ISO_IR 100`` then carries the same bytes through under a
  correct declaration. (highdicom refuses an unknown value outright, which used to fail the
  job; Orthanc shows such a CT with its non-ASCII characters dropped.)
- **Undeclared non-ASCII text**: no Specific Character Set, but e.g. Latin-1 bytes in
  PatientName, as older modalities write (WARNING). The text is read as Latin-1, as pydicom and
  Orthanc (its default ``DefaultEncoding``) read it, and written as ``ISO_IR 100``: the same
  bytes, now declared, so the SEG and SR show the name the PACS shows for the CT.
- **Node text that the source's set cannot hold**, e.g. a Greek institution name in the
  configuration and a Latin-1 CT (INFO: the input is fine).

Text that could not be decoded with the source's declared set (e.g. Latin-1 bytes in an
``ISO_IR 192`` CT) reaches the report with U+FFFD replacement characters. It is written as that
text, validly encoded (never as the source's undecodable bytes), and a WARNING names the
attributes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from highdicom.enum import SpecificCharacterSetValues
from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.valuerep import PersonName

log = logging.getLogger(__name__)

#: What (0008,0005) may hold: one value, or several ISO 2022 code extensions (``None`` = absent).
CharacterSet = str | list[str] | None

LATIN_1 = "ISO_IR 100"
UTF_8 = "ISO_IR 192"
#: Value representations whose text is encoded with the Specific Character Set (PS3.5 6.1.2.3).
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
#: Spellings of the default repertoire (ASCII).
_DEFAULT = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
#: Defined Terms both pydicom (to write) and highdicom (to build) accept.
_KNOWN = frozenset(python_encoding) & {v.value for v in SpecificCharacterSetValues}
#: Code extensions that may not come first (PS3.3 C.12.1.1.2, as highdicom checks it).
_MULTI_BYTE = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149"})


def source_character_set(source: Dataset) -> tuple[CharacterSet, bool]:
    """The source's Specific Character Set as highdicom accepts it, and whether it is usable.

    ``(None, True)`` for the default repertoire; ``(None, False)`` for a value that pydicom or
    highdicom does not know (the SEG and SR are then built without one, and
    :func:`settle_character_set` decides).
    """
    value = source.get("SpecificCharacterSet")
    values = [value] if isinstance(value, str) else [str(v) for v in value or ()]
    values = [v.strip() for v in values]
    if len(values) > 1 and not values[0]:
        values[0] = "ISO 2022 IR 6"  # an empty first value means ASCII in G0 (PS3.3 C.12.1.1.2)
    if not values or (len(values) == 1 and values[0] in _DEFAULT):
        return None, True
    if len(values) == 1:
        ok = values[0] in _KNOWN and not values[0].startswith("ISO 2022")
        return (values[0], True) if ok else (None, False)
    ok = (all(v in _KNOWN and v.startswith("ISO 2022") for v in values)
          and values[0] not in _MULTI_BYTE)
    return (values, True) if ok else (None, False)


def settle_character_set(outputs: Sequence[Dataset], source: Dataset) -> CharacterSet:
    """Declare in every output a character set that can encode all of its text (rules above).

    Top-level person names are rebuilt from their text, so that pydicom encodes them with the
    declared set instead of re-using the source's original bytes. Returns the declared value.
    """
    declared, usable = source_character_set(source)
    texts = [(keyword, text) for ds in outputs for keyword, text in _texts(ds)]
    chosen = declared
    if not (usable and _all_fit(texts, declared)):
        chosen = next((c for c in (None, LATIN_1) if _all_fit(texts, c)), UTF_8)
        _log_choice(source, declared, usable, texts, _named(chosen))
    undecoded = [k for k, t in texts if "\ufffd" in t]
    if undecoded:
        log.warning("series %s: source text in %s could not be decoded with the declared "
                    "Specific Character Set %s: written with replacement characters",
                    _series(source), _keywords(undecoded), _shown(source))
    for ds in outputs:
        _declare(ds, chosen)
    return chosen


def _log_choice(source: Dataset, declared: CharacterSet, usable: bool,
                texts: list[tuple[str, str]], chosen: str) -> None:
    inherited = set(_texts(source))
    copied = [k for k, t in texts if (k, t) in inherited and not t.isascii()]
    if not usable:
        log.warning("series %s: source Specific Character Set %s is not a known Defined Term "
                    "(or combination): its text was decoded with pydicom's fallback (Latin-1); "
                    "the SEG and SR declare %s", _series(source), _shown(source), chosen)
    elif declared is None and copied:
        log.warning("series %s: source declares no Specific Character Set but has non-ASCII "
                    "text in %s: read as Latin-1; the SEG and SR declare %s",
                    _series(source), _keywords(copied), chosen)
    else:
        log.info("series %s: text in %s does not fit the source Specific Character Set %s: the "
                 "SEG and SR declare %s", _series(source),
                 _keywords(k for k, t in texts if not _fits(t, _codecs(declared))),
                 _shown(source), chosen)


def _declare(ds: Dataset, chosen: CharacterSet) -> None:
    if chosen is None:
        if "SpecificCharacterSet" in ds:
            del ds.SpecificCharacterSet
    else:
        ds.SpecificCharacterSet = chosen
    for element in list(ds):
        if element.VR == "PN" and element.value is not None:
            # A new element: highdicom shares the source's elements, which must stay untouched.
            ds[element.tag] = DataElement(element.tag, "PN", _plain_person_names(element))


def _plain_person_names(element: DataElement) -> object:
    """Person name(s) without the source's bytes (a PersonName keeps and re-uses them)."""
    if element.VM > 1:
        return [PersonName(str(v)) for v in element.value]
    return PersonName(str(element.value))


def _texts(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(keyword, text) of every non-empty text value in ``ds``, nested items included."""
    for element in ds.iterall():
        if element.VR not in TEXT_VRS or element.value is None:
            continue
        for value in element.value if element.VM > 1 else [element.value]:
            text = str(value)
            if text:
                yield element.keyword or str(element.tag), text


def _codecs(charset: CharacterSet) -> list[str]:
    values = [charset] if isinstance(charset, str) else list(charset or [""])
    return ["ascii" if v in _DEFAULT else python_encoding[v] for v in values]


def _fits(text: str, codecs: list[str]) -> bool:
    """Whether ``text`` can be encoded with one of ``codecs``, or (ISO 2022 code extensions)
    each character with one of them, as pydicom then switches between them."""
    if any(_encodes(text, c) for c in codecs):
        return True
    return len(codecs) > 1 and all(any(_encodes(ch, c) for c in codecs) for ch in text)


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeError:
        return False
    return True


def _all_fit(texts: list[tuple[str, str]], charset: CharacterSet) -> bool:
    codecs = _codecs(charset)
    return all(_fits(text, codecs) for _, text in texts)


def _keywords(keywords: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(keywords))


def _named(charset: CharacterSet) -> str:
    if charset is None:
        return "no Specific Character Set (ASCII)"
    return charset if isinstance(charset, str) else "\\".join(charset)


def _series(source: Dataset) -> str:
    return str(source.get("SeriesInstanceUID", "(unknown)"))


def _shown(source: Dataset) -> str:
    """The source's (0008,0005) for a log line: a code, not patient data, but sender-controlled,
    so quoted and cut short."""
    value = source.get("SpecificCharacterSet")
    if value is None:
        return "(absent)"
    text = "\\".join(str(v) for v in value) if not isinstance(value, str) else value
    return ascii(text[:64])
