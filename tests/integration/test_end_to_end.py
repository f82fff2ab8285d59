"""The product's core loop against the real thing.

A real Orthanc (DICOMweb plugin, Lua ``OnStableSeries`` auto-routing of CT series) and the
real node (``python -m dicomnode serve`` in its own process, STOW-RS destination pointing at
that Orthanc). Studies go into Orthanc with dcmtk ``storescu``, exactly as a modality would
send them; the tests then read what Orthanc holds.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from anonymised import restore_uids
from dicomnode.demo import dice, seg_mask
from nodeproc import NodeProcess, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from routing import ROUTE_CT, store_to_pacs, wait_for_outcome
from sarcoma import gtv, held_out_series
from validate import dciodvfy_errors, dsrdump_ok

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """Orthanc auto-routing CT to a running node whose results go back to Orthanc by STOW-RS."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    work = tmp_path_factory.mktemp("e2e")
    node_port = free_port()
    pacs = Orthanc(
        work / "orthanc",
        lua_script=ROUTE_CT,
        modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)},
        stable_age=2,
    ).start()
    config = write_config(
        work / "node.toml",
        port=node_port,
        data_dir=work / "node",
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
        completion={"quiet_seconds": 2},
    )
    node = NodeProcess(config, node_port, work / "node.log").start()
    yield pacs, node, work
    node.stop()
    pacs.stop()


def validate_files(tmp_path: Path, held: dict[str, list[pydicom.Dataset]]) -> None:
    for modality, datasets in held.items():
        for k, ds in enumerate(datasets if modality in {"SEG", "SR", "OT", "DOC"} else []):
            path = tmp_path / f"{modality}{k}.dcm"
            ds.save_as(path)
            assert dciodvfy_errors(path) == [], f"dciodvfy errors in {modality}"
            if modality == "SR":
                ok, text = dsrdump_ok(path)
                assert ok, text


def referenced_segments(sr: pydicom.Dataset) -> set[tuple[str, int]]:
    """(SEG SOP Instance UID, segment number) pairs referenced anywhere in the SR content tree."""
    found = set()

    def walk(items):
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedSegmentNumber" in ref:
                    found.add((ref.ReferencedSOPInstanceUID, int(ref.ReferencedSegmentNumber)))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return found


def test_a_sarcoma_ct_comes_back_as_seg_and_sr_on_the_tumour(routed, tmp_path):
    """A real patient the model never trained on, JPEG-LS as the PACS stores it."""
    pacs, node, work = routed
    case_id = "STS_036"
    files = held_out_series(case_id, tmp_path / "ct")
    ct = pydicom.dcmread(files[0], stop_before_pixels=True)
    store_to_pacs(pacs, files, "--propose-jls-lossless")

    jobs, held = wait_for_outcome(pacs, node, work, ct.StudyInstanceUID, want_seg=True)
    assert [s for s, _ in jobs] == ["delivered"], jobs
    assert len(held["SEG"]) == 1 and len(held["SR"]) == 1
    # The fallback for viewers without SEG or SR came with them: a key image and the PDF.
    assert len(held["OT"]) == 1 and len(held["DOC"]) == 1
    seg, sr = held["SEG"][0], held["SR"][0]
    validate_files(tmp_path, held)
    key_image, pdf = held["OT"][0], held["DOC"][0]
    assert key_image.StudyInstanceUID == pdf.StudyInstanceUID == ct.StudyInstanceUID
    assert bytes(pdf.EncapsulatedDocument).startswith(b"%PDF")

    # Same study, new series, and the SEG points at the CT series it was made from.
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == ct.StudyInstanceUID
    assert len({seg.SeriesInstanceUID, sr.SeriesInstanceUID, ct.SeriesInstanceUID,
                key_image.SeriesInstanceUID, pdf.SeriesInstanceUID}) == 5
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    # The SR's measurement groups reference exactly the SEG's segments.
    segments = {(seg.SOPInstanceUID, int(s.SegmentNumber)) for s in seg.SegmentSequence}
    assert referenced_segments(sr) == segments
    # The SEG lies on the tumour the clinician drew.
    truth, slices = gtv(case_id)
    score = dice(seg_mask(seg, slices), truth)
    print(f"{case_id} Dice {score:.3f} against the clinician's GTV")
    assert score >= 0.6


def with_uids_restored(source: Path, target: Path) -> list[Path]:
    """Copies of an anonymised series whose dataset UIDs were blanked, as a PACS would hold it.

    The TotalSegmentator example keeps its SOP Class/Instance UIDs only in the file meta and
    has empty Study/Series UIDs: no PACS stores that (and the node refuses it with 0xA900, see
    test_receive). The copies get the UIDs back; the JPEG 2000 pixel data is left untouched.
    """
    target.mkdir(parents=True)
    paths = sorted(p for p in source.iterdir() if p.is_file())
    for path, ds in zip(paths, restore_uids([pydicom.dcmread(p) for p in paths], str(source))):
        ds.save_as(target / path.name)
    return [target / p.name for p in paths]


@pytest.mark.parametrize(
    "folder, repair, options",
    [
        ("ibsi_sts_001/dicom/CT/image", False, ()),
        # storescu proposes only uncompressed syntaxes unless told; Orthanc keeps JPEG 2000.
        ("totalsegmentator/tests/reference_files/example_ct_dicom", True, ("--propose-j2k-lossless",)),
    ],
    ids=["ibsi_sts_001", "totalsegmentator_jpeg2000"],
)
def test_real_ct_gets_a_valid_report(routed, tmp_path, folder, repair, options):
    source = SHARED / folder
    if not source.is_dir():
        pytest.skip(f"third-party CT not found at {source}")
    pacs, node, work = routed
    files = with_uids_restored(source, tmp_path / "ct") if repair else sorted(p for p in source.iterdir() if p.is_file())
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    store_to_pacs(pacs, files, *options)

    jobs, held = wait_for_outcome(pacs, node, work, study_uid, want_seg=None)
    assert [s for s, _ in jobs] == ["delivered"], jobs
    assert len(held["SR"]) == 1
    assert len(held.get("SEG", [])) <= 1
    validate_files(tmp_path, held)
    sr = held["SR"][0]
    if held.get("SEG"):
        seg = held["SEG"][0]
        segments = {(seg.SOPInstanceUID, int(s.SegmentNumber)) for s in seg.SegmentSequence}
        assert referenced_segments(sr) == segments
    else:
        assert referenced_segments(sr) == set()
    print(f"{folder}: {jobs[-1][1]}; SEG {'yes' if held.get('SEG') else 'no'}")


def test_three_slice_ct_is_refused_with_a_reason(routed):
    source = SHARED / "dcmqi/data/segmentations/ct-3slice"
    if not source.is_dir():
        pytest.skip(f"third-party CT not found at {source}")
    pacs, node, work = routed
    files = sorted(source.glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    store_to_pacs(pacs, files)

    jobs, held = wait_for_outcome(pacs, node, work, study_uid, want_seg=None)
    assert [s for s, _ in jobs] == ["failed"], jobs
    assert "too few slices: found 3, at least 10" in jobs[0][1], jobs[0][1]
    assert "SEG" not in held and "SR" not in held
    listed = [j for j in node.jobs() if j["study_uid"] == study_uid]
    assert listed[0]["state"] == "failed" and listed[0]["reason"] == jobs[0][1]
