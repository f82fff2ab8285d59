"""The command line as a user runs it: ``dicomnode process``, ``demo``, ``check-config``, ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from sarcoma import held_out_series, require_cohort
from validate import dciodvfy_errors, dsrdump_ok

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def dicomnode(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_help_teaches_every_command():
    run = dicomnode("--help")
    assert run.returncode == 0
    for command in ("serve", "process", "demo", "jobs", "retry", "train", "cohort", "check-config"):
        assert command in run.stdout


def test_check_config_names_the_bad_key(tmp_path):
    assert dicomnode("check-config", "--config", "listeners/default.toml").returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[completion]\nquiet_secs = 3\n')
    run = dicomnode("check-config", "--config", str(bad))
    assert run.returncode == 1
    assert "completion.quiet_secs: unknown key" in run.stderr


@pytest.mark.slow
def test_process_writes_seg_sr_and_summary_for_a_sarcoma_ct(tmp_path):
    files = held_out_series("STS_026", tmp_path / "in")
    ct = pydicom.dcmread(files[0], stop_before_pixels=True)
    run = dicomnode("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    folder = tmp_path / "out" / ct.SeriesInstanceUID
    summary = json.loads((folder / "summary.json").read_text())
    assert len(summary["lesions"]) >= 1
    for lesion in summary["lesions"]:
        assert 0.0 <= lesion["tmb_probability"] <= 1.0
        assert lesion["tmb_status"] in {"high", "low"}
        assert 0.8 <= lesion["confidence"] <= 1.0  # the default min_confidence
    assert summary["segmentation_source"] == {"kind": "model"}
    assert dciodvfy_errors(folder / "seg.dcm") == []
    assert dciodvfy_errors(folder / "sr.dcm") == []
    assert dsrdump_ok(folder / "sr.dcm")[0]
    # Nothing identifying in what the command printed or the summary.
    for text in (run.stdout, run.stderr, json.dumps(summary)):
        assert str(ct.PatientName) not in text and ct.PatientID not in text


def test_process_refuses_three_slices_with_a_reason(tmp_path):
    source = SHARED / "dcmqi/data/segmentations/ct-3slice"
    if not source.is_dir():
        pytest.skip(f"third-party CT not found at {source}")
    run = dicomnode("process", str(source), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "too few slices: found 3, at least 10" in run.stderr and "refused" in run.stderr
    assert not any((tmp_path / "out").rglob("*.dcm"))


def test_process_refuses_a_folder_without_dicom(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not dicom")
    run = dicomnode("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    assert "no DICOM series" in run.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    require_cohort()  # the demo sends a real sarcoma CT when the shared data is there
    run = dicomnode("demo", "--out", str(tmp_path / "demo"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "real sarcoma CT STS_006" in run.stdout
    marker = "Dice of the SEG against the clinician's tumour contour (GTV):"
    assert marker in run.stdout
    score = float(run.stdout.split(marker)[1].split()[0])
    assert score >= 0.6
    srs = list((tmp_path / "demo" / "results").rglob("*.dcm"))
    assert any(pydicom.dcmread(p).Modality == "SR" for p in srs)
    assert any(pydicom.dcmread(p).Modality == "SEG" for p in srs)


@pytest.mark.slow
def test_process_measures_the_clinicians_rtstruct_then_its_seg_instead_of_the_model(tmp_path):
    patient = require_cohort() / "STS_011"
    source = tmp_path / "with-rtstruct"
    source.mkdir()
    for path in [*(patient / "CT" / "image").iterdir(), patient / "CT" / "rtstruct" / "RS.dcm"]:
        (source / path.name).write_bytes(path.read_bytes())
    run = dicomnode("process", str(source), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    assert "measuring the supplied RTSTRUCT instead of running the model" in run.stdout
    (folder,) = (tmp_path / "out").iterdir()
    summary = json.loads((folder / "summary.json").read_text())
    rtstruct = pydicom.dcmread(patient / "CT" / "rtstruct" / "RS.dcm", stop_before_pixels=True)
    assert summary["segmentation_source"]["kind"] == "RTSTRUCT"
    assert summary["segmentation_source"]["sop_instance_uid"] == rtstruct.SOPInstanceUID
    assert [lesion["confidence"] for lesion in summary["lesions"]] == [None]
    for name in ("seg.dcm", "sr.dcm"):  # an RTSTRUCT input also gets a SEG, for viewers
        assert dciodvfy_errors(folder / name) == [], name
    sr = pydicom.dcmread(folder / "sr.dcm")
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for item in series.ReferencedSOPSequence}
    assert rtstruct.SOPInstanceUID in evidence
    assert f"RTSTRUCT {rtstruct.SOPInstanceUID}" in run.stdout

    # The SEG that came out, given back as the input: measured, and no new SEG is written.
    again = tmp_path / "with-seg"
    again.mkdir()
    for path in (patient / "CT" / "image").iterdir():
        (again / path.name).write_bytes(path.read_bytes())
    (again / "seg.dcm").write_bytes((folder / "seg.dcm").read_bytes())
    run = dicomnode("process", str(again), "--out", str(tmp_path / "out2"))
    assert run.returncode == 0, run.stderr
    (folder2,) = (tmp_path / "out2").iterdir()
    assert not (folder2 / "seg.dcm").exists()
    second = json.loads((folder2 / "summary.json").read_text())
    assert second["segmentation_source"]["kind"] == "SEG"
    assert [lesion["volume_ml"] for lesion in second["lesions"]] == \
        [lesion["volume_ml"] for lesion in summary["lesions"]]
    assert dciodvfy_errors(folder2 / "sr.dcm") == [] and dsrdump_ok(folder2 / "sr.dcm")[0]
