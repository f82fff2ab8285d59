"""Non-ASCII names through the real node to a real Orthanc, and character sets that are wrong.

Each case is a held-out sarcoma CT (its own study) stored into Orthanc with ``storescu``; Orthanc auto-routes it
to the node (``python -m dicomnode serve``), whose SEG and SR come back by STOW-RS, as in
test_end_to_end. The checks read what Orthanc holds: the stored files, byte for byte (the
names pydicom decodes from them, their Specific Character Set, dciodvfy and dsrdump), and the
names Orthanc itself decodes for the results and for the CT. The node's log must name the
problem of a bad character set but no patient name. The behaviour is documented in
dicomnode/report/charset.py; the last tests check its rules on plain data sets (no Orthanc).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from pydicom import Dataset, dcmread

from nodeproc import NodeProcess, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from routing import ROUTE_CT, store_to_pacs, wait_for_outcome
from sarcoma import held_out_series
from validate import dciodvfy_errors, dsrdump_ok

#: Text the node adds itself (configuration): Latin-1, so it fits every case below.
INSTITUTION = "Hôpital Universitaire de Genève"


@dataclass(frozen=True)
class Case:
    """One CT series: its (0008,0005), PatientName bytes, and what the SEG and SR must hold."""

    id: str
    charset: str | None
    name_bytes: bytes
    name: str  # the name the results must carry, decoded
    out_charset: str | None  # the Specific Character Set the results must declare
    warning: str = ""  # a WARNING the node must log for this series
    text: dict[str, str] = field(default_factory=dict)  # other attributes of the CT
    #: Whether Orthanc shows the CT with the same name. Not where the CT's bytes cannot be read
    #: with its declaration: Orthanc then drops the non-ASCII characters ("Gmann^Kthe").
    orthanc_reads_the_ct_alike: bool = True

    @property
    def name_forms(self) -> set[bytes]:
        """Each name component as it could show up in a log: UTF-8, Latin-1, escaped, as sent."""
        try:
            real = self.name_bytes.decode("utf-8")
        except UnicodeDecodeError:
            real = self.name_bytes.decode("latin-1")
        forms = set()
        for name in (real, self.name):
            for part in (p for group in name.split("=") for p in group.split("^") if p):
                forms |= {part.encode("utf-8"), ascii(part)[1:-1].encode()}
                with suppress(UnicodeEncodeError):
                    forms.add(part.encode("latin-1"))
        return {f for f in forms if len(f) >= 3}


CASES = [
    Case("iso_ir_100", "ISO_IR 100", "Müller^Jürgen".encode("latin-1"), "Müller^Jürgen",
         "ISO_IR 100", text={"StudyDescription": "Kontrolle nach Größenzunahme",
                             "ReferringPhysicianName": "Böhm^Zoë",
                             "InstitutionName": "Klinikum Köln-Mülheim"}),
    Case("iso_ir_192_latin", "ISO_IR 192", "Ødegård^Åse".encode(), "Ødegård^Åse", "ISO_IR 192",
         text={"StudyDescription": "Θώρακας/κοιλία, kontroll",
               "ReferringPhysicianName": "Παπαδόπουλος^Γιώργος",
               "InstitutionName": "Haukeland universitetssjukehus, Førde"}),
    Case("iso_ir_192_cjk", "ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう".encode(),
         "Yamada^Tarou=山田^太郎=やまだ^たろう", "ISO_IR 192",
         text={"StudyDescription": "腹部CT 造影", "InstitutionName": "東京中央病院"}),
    # An unknown value with bytes outside the default repertoire: read as Latin-1, declared so.
    Case("unknown_charset", "ISO_IR 999", "Gößmann^Käthe".encode("latin-1"), "Gößmann^Käthe",
         "ISO_IR 100", "Specific Character Set 'ISO_IR 999' is not a known Defined Term",
         orthanc_reads_the_ct_alike=False),
    # Latin-1 bytes and no (0008,0005), as older modalities send them.
    Case("undeclared", None, "Lefèvre^Hélène".encode("latin-1"), "Lefèvre^Hélène",
         "ISO_IR 100", "declares no Specific Character Set but has non-ASCII text in PatientName"),
    # Declared UTF-8 but Latin-1 bytes: undecodable, so replacement characters, validly encoded.
    Case("misdeclared_utf8", "ISO_IR 192", "Jørgensen^Bjørn".encode("latin-1"),
         "J\ufffdrgensen^Bj\ufffdrn", "ISO_IR 192",
         "source text in PatientName could not be decoded", orthanc_reads_the_ct_alike=False),
]


@pytest.fixture(scope="module")
def charset_node(tmp_path_factory):
    """Orthanc auto-routing CT to a node (STOW-RS back) that adds a non-ASCII institution."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    work = tmp_path_factory.mktemp("charsets")
    node_port = free_port()
    pacs = Orthanc(work / "orthanc", lua_script=ROUTE_CT, stable_age=1,
                   modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}).start()
    config = write_config(
        work / "node.toml", port=node_port, data_dir=work / "node",
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
        completion={"quiet_seconds": 1}, report={"institution_name": INSTITUTION},
    )
    node = NodeProcess(config, node_port, work / "node.log").start()
    yield pacs, node, work
    node.stop()
    pacs.stop()


def ct_series(case: Case, folder: Path) -> tuple[list[Path], Dataset]:
    """A held-out sarcoma CT (the model finds its tumour: a SEG and an SR come back) as a
    study of its own, whose text is encoded as ``case`` says."""
    name = case.name_bytes + b" " * (len(case.name_bytes) % 2)  # even length (PS3.5 7.1.1)
    placeholder = b"~" * len(name)

    def encode(ds: Dataset) -> None:
        if case.charset is None:
            del ds.SpecificCharacterSet
        else:
            ds.SpecificCharacterSet = case.charset
        for keyword, value in case.text.items():
            setattr(ds, keyword, value)  # encoded with the declared set when written
        ds.PatientName = placeholder.decode()
        ds.PatientID = f"CHARSET-{case.id}"

    files = held_out_series("STS_026", folder, uid_seed=f"charset-{case.id}", edit=encode)
    for path in files:  # the name's bytes exactly as given, whatever the declaration says
        data = path.read_bytes()
        assert data.count(placeholder) == 1
        path.write_bytes(data.replace(placeholder, name))
    return files, dcmread(files[0], stop_before_pixels=True)


def orthanc_id(pacs: Orthanc, sop_instance_uid: str) -> str:
    found = requests.post(f"{pacs.http_url}/tools/lookup", data=sop_instance_uid,
                          auth=pacs.auth, timeout=10).json()
    return next(r["ID"] for r in found if r["Type"] == "Instance")


@pytest.mark.orthanc
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 999'")  # writing that CT
def test_names_in_every_character_set_reach_the_pacs_intact(charset_node, tmp_path):
    pacs, node, work = charset_node
    sources = {}
    for case in CASES:  # all series at once: the node works through them one by one
        files, first = ct_series(case, tmp_path / case.id)
        assert case.name_bytes in files[0].read_bytes()
        store_to_pacs(pacs, files, "--propose-jls-lossless")
        sources[case.id] = first

    for case in CASES:
        ct = sources[case.id]
        jobs, held = wait_for_outcome(pacs, node, work, ct.StudyInstanceUID, want_seg=True)
        assert [s for s, _ in jobs] == ["delivered"], (case.id, jobs)
        assert len(held["SEG"]) == 1 and len(held["SR"]) == 1, case.id
        ct_as_orthanc_reads_it = pacs.get(
            f"/instances/{orthanc_id(pacs, ct.SOPInstanceUID)}/simplified-tags").json()
        for modality in ("SEG", "SR", "OT", "DOC"):  # and the key image and the PDF
            (ds,) = held[modality]
            what = f"{case.id} {modality}"
            # The file as the PACS holds it, decoded by pydicom with its own declaration.
            assert ds.get("SpecificCharacterSet") == case.out_charset, what
            assert str(ds.PatientName) == case.name, what
            assert ds.InstitutionName == INSTITUTION, what
            for keyword in ("StudyDescription", "ReferringPhysicianName"):
                if keyword in case.text:
                    assert str(ds.get(keyword)) == case.text[keyword], (what, keyword)
            # The same file as Orthanc decodes it: the results show the CT's name.
            instance = orthanc_id(pacs, ds.SOPInstanceUID)
            tags = pacs.get(f"/instances/{instance}/simplified-tags").json()
            assert tags["PatientName"] == case.name, what
            if case.orthanc_reads_the_ct_alike:
                assert tags["PatientName"] == ct_as_orthanc_reads_it["PatientName"], what
            # Valid DICOM, byte for byte what Orthanc returns; a name that could be decoded is
            # carried through as the very bytes the CT had.
            path = tmp_path / f"{case.id}-{modality}.dcm"
            path.write_bytes(pacs.get(f"/instances/{instance}/file").content)
            if "\ufffd" not in case.name:
                assert case.name_bytes in path.read_bytes(), what
            assert dciodvfy_errors(path) == [], what
            if modality == "SR":
                ok, text = dsrdump_ok(path)
                assert ok, (what, text)

    log = node.log_path.read_bytes()
    for case in CASES:
        series = sources[case.id].SeriesInstanceUID
        if case.warning:
            lines = [line for line in log.decode("utf-8", "replace").splitlines()
                     if "WARNING" in line and series in line and case.warning in line]
            assert lines, f"{case.id}: no WARNING naming the problem\n{node.log_tail()}"
        else:
            assert not [line for line in log.decode("utf-8", "replace").splitlines()
                        if "report.charset" in line and series in line], case.id
        for form in case.name_forms:
            assert form not in log, f"{case.id}: the log holds a patient name"
    print(f"\n{len(CASES)} character-set cases delivered")
