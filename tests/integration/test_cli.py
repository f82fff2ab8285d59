"""The command line as a user runs it: ``dicomnode process``, ``demo``, ``check-config``, ``--help``,
and ``serve``'s start-up failures and log lines."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomnode.cli import EscapingFormatter
from dicomnode.phantom import make_phantom_study
from nodeproc import NodeProcess, write_config
from orthanc import free_port
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


# --------------------------------------------------------------------------- check-config
def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.toml"
    config.write_text(text)
    return dicomnode("check-config", "--config", str(config), timeout=120)


STOW_OVER_HTTP = """\
[[destinations]]
kind = "stow"
url = "http://pacs.example.org:8042/dicom-web"
username = "dicomnode"
password_env = "DICOMNODE_PACS_PASSWORD"
"""


def test_check_config_refuses_credentials_over_plain_http_unless_allowed(tmp_path):
    run = check_config(tmp_path, STOW_OVER_HTTP)
    assert run.returncode == 1
    assert "destinations[0].url: username over plain http://" in run.stderr
    assert "use an https:// URL" in run.stderr and "allow_insecure_credentials" in run.stderr
    allowed = check_config(tmp_path, STOW_OVER_HTTP + "allow_insecure_credentials = true\n")
    assert allowed.returncode == 0, allowed.stderr
    https = check_config(tmp_path, STOW_OVER_HTTP.replace("http://", "https://"))
    assert https.returncode == 0, https.stderr


@pytest.mark.parametrize("text, message", [
    ("[node]\nport = 99999\n", "node.port: must lie in 0..65535"),
    ('[[destinations]]\nkind = "stow"\nurl = "https://pacs:99999/dicom-web"\n',
     "destinations[0].url: the port must be a number in 1..65535"),
    ('[[destinations]]\nkind = "cstore"\nae_title = "PACS"\nhost = "pacs"\nport = 70000\n',
     "destinations[0].port: must lie in 1..65535"),
    ('[node]\nfile_group = "no-such-group"\n', "node.file_group: no group 'no-such-group'"),
])
def test_check_config_refuses_bad_ports_urls_and_groups(tmp_path, text, message):
    run = check_config(tmp_path, text)
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr


# --------------------------------------------------------------------------- serve start-up
def serve(tmp_path: Path, data_dir: Path, port: int, **sections: dict) -> subprocess.CompletedProcess[str]:
    """``dicomnode serve`` that is expected to stop at start-up (a node that starts is killed
    by the timeout, which fails the test)."""
    config = write_config(tmp_path / "node.toml", port=port, data_dir=data_dir,
                          destinations=[{"kind": "folder", "path": tmp_path / "out"}], **sections)
    return dicomnode("serve", "--config", str(config), timeout=120)


def assert_one_line(run: subprocess.CompletedProcess[str], message: str) -> None:
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], run.stderr


def private_data_dir(tmp_path: Path, damaged: str = "") -> Path:
    """A data folder as the node leaves it (0700), with garbage bytes in ``damaged``."""
    data_dir = tmp_path / "node"
    data_dir.mkdir(mode=0o700)
    if damaged:
        (data_dir / damaged).write_bytes(b"not a database, random bytes \x00\x17" * 100)
        os.chmod(data_dir / damaged, 0o600)
    return data_dir


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = serve(tmp_path, private_data_dir(tmp_path), port)
    assert_one_line(run, f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
                         "(is another node or program using node.port?)")


def test_serve_with_a_data_dir_that_cannot_be_created_says_so_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    run = serve(tmp_path, tmp_path / "a-file" / "node", free_port())
    assert_one_line(run, f"configuration error: node.data_dir: cannot create "
                         f"{tmp_path / 'a-file' / 'node'}: Not a directory")


@pytest.mark.parametrize("database", ["index.sqlite", "jobs.sqlite"])
def test_serve_with_a_damaged_database_names_it_in_one_line(tmp_path, database):
    data_dir = private_data_dir(tmp_path, damaged=database)
    run = serve(tmp_path, data_dir, free_port())
    assert_one_line(run, f"error: {data_dir / database} is damaged (file is not a database): "
                         "restore it from a backup, or move it aside")


def test_serve_without_its_model_says_so_in_one_line(tmp_path):
    run = serve(tmp_path, private_data_dir(tmp_path), free_port(),
                segmentation={"model_dir": str(tmp_path / "no-model")})
    assert_one_line(run, f"error: segmentation model: {tmp_path / 'no-model' / 'manifest.json'} "
                         "not found")


# --------------------------------------------------------------------------- log escaping
def test_the_log_formatter_escapes_control_characters_in_messages_only():
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("pynetdicom", logging.WARNING, __file__, 1, "UID %r and %s",
                               ("1.2\nFORGED", "AE\r\x1b[31m\x00\u2028\x85"), None)
    assert formatter.format(record) == "WARNING UID '1.2\\nFORGED' and AE\\r\\x1b[31m\\x00\\u2028\\x85"
    assert record.message == "UID '1.2\\nFORGED' and AE\r\x1b[31m\x00\u2028\x85"  # left as it was
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("dicomnode", logging.ERROR, __file__, 1, "job\nFORGED", (),
                                   sys.exc_info())
    lines = formatter.format(failed).splitlines()
    assert lines[0] == "ERROR job\\nFORGED" and lines[1].startswith("Traceback")
    assert lines[-1] == "ValueError: boom"


def test_a_uid_with_a_newline_cannot_forge_a_log_line(tmp_path, monkeypatch):
    """pynetdicom logs a non-conformant UID as received; the node's log shows it escaped."""
    port = free_port()
    config = write_config(tmp_path / "node.toml", port=port, data_dir=tmp_path / "node",
                          destinations=[{"kind": "folder", "path": tmp_path / "out"}])
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    forged = "FORGED INFO    dicomnode.node: all is well"
    try:
        ds = make_phantom_study(10012, shape=(12, 32, 32)).datasets[0]
        # As a hostile sender writes it, without the warnings pydicom and pynetdicom give.
        for mode in ("reading_validation_mode", "writing_validation_mode"):
            monkeypatch.setattr(pydicom.config.settings, mode, pydicom.config.IGNORE)
        ds["SOPInstanceUID"] = pydicom.DataElement("SOPInstanceUID", "UI", f"1.2.3\n{forged}\r\x1b[2J")
        ae = AE(ae_title="FORGER")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        association = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
        assert association.is_established
        status = association.send_c_store(ds)
        association.release()
        assert status.Status == 0xA900  # refused: not a valid UID (logged before the answer)
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    assert "\\nFORGED INFO" in log  # logged, escaped
    assert not [line for line in log.splitlines() if line.startswith(("FORGED", "\r", "\x1b"))]
    assert "\x1b" not in log and "\r" not in log
