"""The job runner's state handling, with the real index and job store and a controlled clock.

The analysis and the destinations are replaced by small stand-ins here, so that each test
decides what they answer; the real pipeline and real destinations run in the integration tests.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest

from dicomnode.config import (
    CompletionConfig,
    Config,
    DeliveryConfig,
    JobsConfig,
    SegmentationConfig,
)
from dicomnode.errors import AssemblyError, InputRejected
from dicomnode.jobs import runner as runner_module
from dicomnode.jobs.machine import JobEvent, JobState
from dicomnode.jobs.runner import Runner, read_inputs, without_values
from dicomnode.jobs.store import JobStore
from dicomnode.results import discard, save
from dicomnode.spool.index import Index, InstanceRecord
from dicomnode.types import DeliveryResult, InstanceOutcome, ReportSet, SeriesKey

KEY = SeriesKey("1.2.3", "1.2.3.4")
AXIAL = "1.000000,0.000000,0.000000,0.000000,1.000000,0.000000"
T0 = 1_000_000.0


def record(n: int, at: float, folder: Path = Path("/spool")) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{KEY.series_uid}.{n}", key=KEY, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1", path=folder / f"{n}.dcm", received_at=at,
        calling_ae="PACS", association_id="a1", routable=True, modality="CT",
        position_along_normal=2.5 * n, orientation=AXIAL, instance_number=n + 1, rows=64, cols=64,
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class RefusingPipeline:
    def run(self, *args, **kwargs):
        raise AssemblyError("3 slices found; at least 10 are needed")


class ScriptedDestination:
    """Answers each send with the next scripted result."""

    name = "scripted"

    def __init__(self, *results: DeliveryResult) -> None:
        self.results = list(results)
        self.sent: list[int] = []

    def send(self, datasets):
        self.sent.append(len(datasets))
        return self.results.pop(0)


@pytest.fixture
def parts(tmp_path):
    index = Index(tmp_path / "index.sqlite")
    jobs = JobStore(tmp_path / "jobs.sqlite")
    yield index, jobs, tmp_path
    index.close()
    jobs.close()


def make_runner(parts, clock, *, pipeline=None, destinations=()):
    index, jobs, tmp = parts
    config = Config(
        completion=CompletionConfig(quiet_seconds=5, gap_timeout_seconds=60, gap_policy="fail"),
        delivery=DeliveryConfig(retry_initial_seconds=10, retry_factor=2, retry_max_seconds=100,
                                give_up_after_seconds=1000),
    )
    return Runner(config, index=index, jobs=jobs, destinations=destinations,
                  pipeline=pipeline, results_root=tmp / "results", clock=clock)


def test_series_is_taken_once_quiet_and_again_when_more_instances_arrive(parts):
    index, jobs, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    for n in range(20):
        index.record_instance(record(n, T0))
    clock.now = T0 + 4
    assert runner.take_complete_series() == []
    clock.now = T0 + 5
    first = runner.take_complete_series()
    assert len(first) == 1 and len(first[0].inputs) == 20
    assert runner.take_complete_series() == []  # taken: not taken twice
    for n in range(20, 25):  # the PACS sends more of the series later
        index.record_instance(record(n, T0 + 100))
    clock.now = T0 + 105
    second = runner.take_complete_series()
    assert len(second) == 1 and len(second[0].inputs) == 25
    assert second[0].id != first[0].id  # a new job: its reports get new UIDs (seeded by job id)


def test_the_loop_wakes_when_a_quiet_period_ends_not_a_poll_later(parts):
    index, _, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    assert runner.idle_wait(0.5) == 0.5  # nothing is waiting
    for n in range(3):
        index.record_instance(record(n, T0))
    clock.now = T0 + 2
    assert runner.take_complete_series() == []
    assert runner.idle_wait(0.5) == 0.5  # its quiet period (5 s) ends in 3 s
    clock.now = T0 + 4.8
    assert runner.take_complete_series() == []
    assert runner.idle_wait(0.5) == pytest.approx(0.2)
    clock.now = T0 + 5
    assert len(runner.take_complete_series()) == 1
    assert runner.idle_wait(0.5) == 0.5


def test_the_same_series_sent_again_makes_no_second_job(parts):
    index, jobs, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    for n in range(20):
        index.record_instance(record(n, T0))
    clock.now = T0 + 5
    assert len(runner.take_complete_series()) == 1
    for n in range(20):  # the PACS routes the whole series a second time (identical copies)
        index.record_instance(record(n, T0 + 50))
    clock.now = T0 + 100
    assert runner.take_complete_series() == []
    assert len(jobs.all()) == 1


def test_a_reopened_series_is_processed_again_as_a_new_job(parts):
    index, jobs, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    for n in range(20):
        index.record_instance(record(n, T0))
    clock.now = T0 + 5
    first = runner.take_complete_series()
    key = first[0].key
    # What the receiver does for an identical resend with completion.resent_series = "reprocess"
    for n in range(20):
        index.record_instance(record(n, T0 + 50))
        assert index.reopen(key) is (n == 0)  # only the first copy reopens the covered series
    clock.now = T0 + 52
    assert runner.take_complete_series() == []  # still in its quiet period
    clock.now = T0 + 100
    second = runner.take_complete_series()
    assert len(second) == 1 and len(second[0].inputs) == 20
    assert second[0].id != first[0].id  # its SEG and SR get new UIDs (seeded by the job id)
    assert runner.take_complete_series() == []


def test_a_gap_fails_the_series_with_the_reason_under_the_fail_policy(parts):
    index, jobs, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    for n in [*range(10), *range(12, 20)]:
        index.record_instance(record(n, T0))
    clock.now = T0 + 30
    assert runner.take_complete_series() == []  # waiting for the missing slices
    clock.now = T0 + 60
    (job,) = runner.take_complete_series()
    assert job.state is JobState.FAILED and "2 missing slices" in job.reason


def test_refused_input_fails_the_job_and_keeps_its_inputs(parts):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=RefusingPipeline())
    for n in range(3):
        write_instance(tmp / f"{n}.dcm")
        index.record_instance(record(n, T0, tmp))
    clock.now = T0 + 5
    runner.take_complete_series()
    job = runner.work_once()
    assert job.state is JobState.FAILED and "at least 10" in job.reason
    assert len(jobs.get(job.id).inputs) == 3
    assert runner.work_once() is None  # nothing loops on a failed job


def test_a_spooled_file_that_vanished_fails_the_job_naming_it(parts):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=RefusingPipeline())
    index.record_instance(record(0, T0, tmp))
    clock.now = T0 + 5
    runner.take_complete_series()
    job = runner.work_once()
    assert job.state is JobState.FAILED and "0.dcm cannot be read" in job.reason


def write_instance(path: Path, **elements: object) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    for keyword, value in elements.items():  # e.g. Rows, Columns: headers only, no pixels
        setattr(ds, keyword.capitalize(), value)
    ds.save_as(path, enforce_file_format=True)


def test_temporary_delivery_failures_back_off_then_deliver(parts, tmp_path):
    index, jobs, _ = parts
    clock = Clock()
    down = DeliveryResult("pacs", retryable=True, error="connection refused")
    up = DeliveryResult("pacs", outcomes=(InstanceOutcome("1.2", True),))
    destination = ScriptedDestination(down, down, up)
    runner = make_runner(parts, clock, destinations=[destination])
    job = delivering_job(parts)
    assert runner.deliver_interrupted()[0].state is JobState.RETRY_WAIT
    assert jobs.get(job.id).next_attempt_at == T0 + 10
    assert runner.work_once() is None  # not due yet
    clock.now = T0 + 10
    assert runner.work_once().state is JobState.RETRY_WAIT
    assert jobs.get(job.id).next_attempt_at == T0 + 10 + 20  # doubled
    clock.now = T0 + 30
    assert runner.work_once().state is JobState.DELIVERED
    assert len(destination.sent) == 3


def test_permanent_delivery_failure_fails_at_once(parts):
    index, jobs, _ = parts
    rejected = DeliveryResult("pacs", outcomes=(InstanceOutcome("1.2", False, "failure reason 0x0110"),))
    runner = make_runner(parts, Clock(), destinations=[ScriptedDestination(rejected)])
    job = delivering_job(parts)
    (job,) = runner.deliver_interrupted()
    assert job.state is JobState.FAILED and "0x0110" in job.reason


def test_temporary_failures_give_up_after_the_limit(parts):
    index, jobs, _ = parts
    clock = Clock()
    down = DeliveryResult("pacs", retryable=True, error="HTTP 503")
    runner = make_runner(parts, clock, destinations=[ScriptedDestination(*[down] * 20)])
    job = delivering_job(parts)
    runner.deliver_interrupted()
    while (job := jobs.get(job.id)).state is not JobState.FAILED:
        clock.now = job.next_attempt_at or clock.now
        runner.work_once()
    assert "gave up after" in job.reason and clock.now - T0 >= 1000


def delivering_job(parts):
    """A job whose reports are written and whose delivery is due (as after a crash)."""
    _, jobs, tmp = parts
    job = jobs.create(KEY, [], now=T0)
    jobs.transition(job.id, JobEvent.START, now=T0)
    save(tmp / "results" / job.id, ReportSet(sr=report_object()), {"outputs": {}})
    return jobs.transition(job.id, JobEvent.REPORTED, now=T0)


def report_object() -> pydicom.Dataset:
    """A minimal SR that a destination can be sent."""
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.33", "1.2.3.4.5.7"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = KEY.study_uid, "1.2.3.4.8", "SR"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    return ds


# -- supplied segmentations: a radiologist's RTSTRUCT or SEG with the CT it was drawn on ---------


def record_file(path: Path, at: float) -> InstanceRecord:
    """What the receiver records for a real file (the header elements the index keeps)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    position = ds.get("ImagePositionPatient")
    return InstanceRecord(
        sop_instance_uid=ds.SOPInstanceUID, key=SeriesKey(ds.StudyInstanceUID, ds.SeriesInstanceUID),
        sop_class_uid=ds.SOPClassUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, path=path,
        received_at=at, calling_ae="PACS", association_id="a1", routable=True,
        modality=ds.Modality, position_along_normal=float(position[2]) if position else None,
        orientation=AXIAL if position else None, instance_number=ds.get("InstanceNumber"),
        rows=ds.get("Rows"), cols=ds.get("Columns"),
    )


@pytest.fixture
def sarcoma(shared_data: Path) -> tuple[list[Path], Path]:
    folder = shared_data / "ibsi_sts_001" / "dicom" / "CT"
    return sorted((folder / "image").iterdir()), folder / "mask" / "RS.dcm"


def supplied_runner(parts, clock, source: str) -> Runner:
    runner = make_runner(parts, clock)
    runner.config = dataclasses.replace(runner.config,
                                        segmentation=SegmentationConfig(source=source))
    return runner


def test_an_rtstruct_sent_before_its_ct_goes_with_the_ct_into_one_job(parts, sarcoma):
    index, jobs, _ = parts
    ct, rtstruct = sarcoma
    clock = Clock()
    runner = supplied_runner(parts, clock, "auto")
    index.record_instance(record_file(rtstruct, T0))
    clock.now = T0 + 10
    assert runner.take_complete_series() == []  # its CT is not here yet: it waits
    for path in ct:
        index.record_instance(record_file(path, T0 + 20))
    clock.now = T0 + 30
    (job,) = runner.take_complete_series()
    assert set(job.inputs) == {*ct, rtstruct}  # the CT job measures the radiologist's contours
    clock.now = T0 + 60
    assert runner.take_complete_series() == [] and len(jobs.all()) == 1


def test_an_rtstruct_sent_right_after_its_ct_goes_with_it_into_one_job(parts, sarcoma):
    # Both series fall quiet before the same turn of the loop: the CT's job takes the
    # contours, which then make no second job (a "correction" of the same contours).
    index, jobs, _ = parts
    ct, rtstruct = sarcoma
    clock = Clock()
    runner = supplied_runner(parts, clock, "auto")
    for path in ct:
        index.record_instance(record_file(path, T0))
    index.record_instance(record_file(rtstruct, T0 + 0.5))
    clock.now = T0 + 30
    (job,) = runner.take_complete_series()
    assert set(job.inputs) == {*ct, rtstruct}
    clock.now = T0 + 60
    assert runner.take_complete_series() == [] and len(jobs.all()) == 1


def test_an_rtstruct_sent_after_its_ct_is_a_job_of_its_own(parts, sarcoma):
    index, jobs, _ = parts
    ct, rtstruct = sarcoma
    clock = Clock()
    runner = supplied_runner(parts, clock, "auto")
    for path in ct:
        index.record_instance(record_file(path, T0))
    clock.now = T0 + 10
    (model_job,) = runner.take_complete_series()
    assert set(model_job.inputs) == set(ct)
    index.record_instance(record_file(rtstruct, T0 + 100))
    clock.now = T0 + 110
    (supplied_job,) = runner.take_complete_series()
    assert set(supplied_job.inputs) == {*ct, rtstruct}
    assert supplied_job.key.series_uid == pydicom.dcmread(rtstruct).SeriesInstanceUID


def test_with_source_supplied_a_ct_alone_waits_for_its_contours(parts, sarcoma):
    index, jobs, _ = parts
    ct, rtstruct = sarcoma
    clock = Clock()
    runner = supplied_runner(parts, clock, "supplied")
    for path in ct:
        index.record_instance(record_file(path, T0))
    clock.now = T0 + 10
    assert runner.take_complete_series() == [] and jobs.all() == []
    index.record_instance(record_file(rtstruct, T0 + 100))
    clock.now = T0 + 110
    (job,) = runner.take_complete_series()
    assert set(job.inputs) == {*ct, rtstruct}


def test_our_own_seg_back_from_the_pacs_is_not_measured(parts, sarcoma, tmp_path):
    index, jobs, tmp = parts
    ct, _ = sarcoma
    clock = Clock()
    runner = supplied_runner(parts, clock, "auto")
    seg = pydicom.Dataset()
    seg.SOPClassUID, seg.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.4.5.6"
    seg.StudyInstanceUID = pydicom.dcmread(ct[0]).StudyInstanceUID
    seg.SeriesInstanceUID, seg.Modality = "1.2.3.4.5", "SEG"
    seg.ReferencedSeriesSequence = [pydicom.Dataset()]
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = pydicom.dcmread(ct[0]).SeriesInstanceUID
    seg.file_meta = pydicom.dataset.FileMetaDataset()
    seg.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    seg.file_meta.MediaStorageSOPClassUID, seg.file_meta.MediaStorageSOPInstanceUID = (
        seg.SOPClassUID, seg.SOPInstanceUID)
    seg.save_as(tmp_path / "ours.dcm", enforce_file_format=True)
    (tmp / "results" / "job1").mkdir(parents=True)  # a result of ours that wrote this SEG
    (tmp / "results" / "job1" / "summary.json").write_text(json.dumps(
        {"outputs": {"seg": {"sop_instance_uid": seg.SOPInstanceUID}}}))
    for path in ct:
        index.record_instance(record_file(path, T0))
    index.record_instance(record_file(tmp_path / "ours.dcm", T0 + 100))
    clock.now = T0 + 10
    assert len(runner.take_complete_series()) == 1  # the CT
    clock.now = T0 + 110
    assert runner.take_complete_series() == [] and len(jobs.all()) == 1
    assert index.pending_series() == []  # taken, not left waiting


# -- faults of the node's own storage, crashes, and the job size limit ----------------------------


class ReportingPipeline:
    """Reports one SR with no lesion for any series, counting its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, datasets, **kwargs):
        self.runs += 1
        analysis = SimpleNamespace(segmentation=SimpleNamespace(lesions=()), warnings=())
        return SimpleNamespace(analysis=analysis, reports=ReportSet(sr=report_object()),
                               seconds={"assemble": 0.25, "segment": 1.5})


class Crash(BaseException):
    """Stands for the node being killed in the middle of an analysis (nothing is caught)."""


class CrashingPipeline:
    def run(self, *args, **kwargs):
        raise Crash


def delivered() -> ScriptedDestination:
    ok = DeliveryResult("pacs", outcomes=(InstanceOutcome("1.2", True),))
    return ScriptedDestination(*[ok] * 5)


@pytest.fixture
def no_summary(monkeypatch):
    """The summary of the stand-in analysis (the real one needs a real analysis)."""
    monkeypatch.setattr(runner_module, "summary_json", lambda analysis, reports: {"outputs": {}})


def full_disk(monkeypatch, folder: Path, error: int = errno.ENOSPC) -> None:
    """Every file written under ``folder`` fails at its rename, as on a full disk (the
    temporary file has been written by then)."""
    replace = os.replace

    def refuse(src, dst, *args, **kwargs):
        if Path(dst).is_relative_to(folder):
            raise OSError(error, os.strerror(error), str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)


def series_job(parts, clock, runner, n: int = 3, **size):
    """Spool ``n`` readable instances (``size``: Rows, Columns) and return the job the runner
    makes of them."""
    index, _, tmp = parts
    for k in range(n):
        write_instance(tmp / f"{k}.dcm", **size)
        index.record_instance(record(k, T0, tmp))
    clock.now = T0 + 5
    (job,) = runner.take_complete_series()
    return job


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_each_stage_of_a_job_is_timed_in_its_record(parts, no_summary):
    _, jobs, _ = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[delivered()])
    job = series_job(parts, clock, runner)
    assert runner.work_once().state is JobState.DELIVERED
    seconds = jobs.get(job.id).seconds
    assert list(seconds) == ["read", "assemble", "segment", "save", "deliver"]
    assert seconds["segment"] == 1.5 and all(v >= 0 for v in seconds.values())


def test_a_full_disk_while_saving_waits_then_analyses_again(parts, monkeypatch, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    pipeline, destination = ReportingPipeline(), delivered()
    runner = make_runner(parts, clock, pipeline=pipeline, destinations=[destination])
    job = series_job(parts, clock, runner)
    with monkeypatch.context() as m:
        full_disk(m, tmp / "results")
        job = runner.work_once()
    assert job.state is JobState.RETRY_WAIT
    assert job.reason == "cannot save results: No space left on device"
    assert job.next_attempt_at == T0 + 5 + 10 and destination.sent == []
    assert leftovers(tmp / "results") == []  # no partial result, no temporary file
    assert runner.work_once() is None  # waits for its time
    clock.now = T0 + 15  # space was freed meanwhile
    job = runner.work_once()
    assert job.state is JobState.DELIVERED and pipeline.runs == 2 and destination.sent == [1]
    assert [e.to_state for e in jobs.journal(job.id)] == [
        "pending", "running", "retry_wait", "pending", "running", "delivering", "delivered"]
    assert jobs.journal(job.id)[3].reason == "retrying the analysis"


def test_a_disk_that_stays_full_fails_the_job_and_retry_runs_it_again(
        parts, monkeypatch, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[delivered()])
    job = series_job(parts, clock, runner)
    with monkeypatch.context() as m:
        full_disk(m, tmp / "results")
        while job.state is not JobState.FAILED:
            clock.now = max(clock.now, job.next_attempt_at or clock.now)
            job = runner.work_once()
    assert job.analysis_starts == 3 == runner.config.jobs.max_attempts
    assert job.reason == ("cannot save results: No space left on device (analysis started 3 "
                          "times, jobs.max_attempts = 3); `dicomnode retry` runs it again")
    assert clock.now == T0 + 5 + 10 + 20  # the backoff between the starts
    assert leftovers(tmp / "results") == [] and runner.work_once() is None
    job = jobs.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    assert job.analysis_starts == 0
    assert runner.work_once().state is JobState.DELIVERED


def test_a_write_that_waiting_cannot_fix_fails_at_once(parts, monkeypatch, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[delivered()])
    series_job(parts, clock, runner)
    full_disk(monkeypatch, tmp / "results", errno.EACCES)
    job = runner.work_once()
    assert job.state is JobState.FAILED and job.reason == "cannot save results: Permission denied"


def test_an_io_error_reading_the_spool_waits_and_reads_again(parts, monkeypatch, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[delivered()])
    series_job(parts, clock, runner)
    read = pydicom.dcmread
    broken = tmp / "1.dcm"

    def failing_disk(path, *args, **kwargs):
        if Path(path) == broken:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pydicom, "dcmread", failing_disk)
        job = runner.work_once()
    assert job.state is JobState.RETRY_WAIT
    assert job.reason == "cannot read spooled instance 1.dcm: Input/output error"
    clock.now = job.next_attempt_at
    assert runner.work_once().state is JobState.DELIVERED


def test_a_series_over_max_voxels_fails_before_its_pixels_are_read(parts, monkeypatch):
    index, jobs, tmp = parts
    clock = Clock()
    pipeline = ReportingPipeline()
    runner = make_runner(parts, clock, pipeline=pipeline)
    runner.config = dataclasses.replace(runner.config, jobs=JobsConfig(max_voxels=512 * 512 * 2))
    series_job(parts, clock, runner, rows=512, columns=512)
    monkeypatch.setattr(runner_module, "read_inputs", lambda paths: pytest.fail("pixels read"))
    job = runner.work_once()
    assert job.state is JobState.FAILED and pipeline.runs == 0
    assert job.reason == ("series too large: 786,432 voxels (3 slices of up to 512 x 512), "
                          "more than jobs.max_voxels = 524,288; not analysed")


def test_a_series_that_crashes_the_node_fails_after_max_attempts(parts, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock, pipeline=CrashingPipeline())
    job = series_job(parts, clock, runner)
    for _ in range(3):
        with pytest.raises(Crash):
            runner.work_once()
        assert jobs.get(job.id).state is JobState.RUNNING
        runner = make_runner(parts, clock, pipeline=CrashingPipeline())  # the node restarts
        runner.recover()
    job = jobs.get(job.id)
    assert job.state is JobState.FAILED and job.analysis_starts == 3
    assert job.reason == (
        "analysis started 3 times (jobs.max_attempts = 3), the last one interrupted: the node "
        "crashed or was killed while analysing it; not retried: see the log; "
        "`dicomnode retry` runs it again")
    assert [e.to_state for e in jobs.journal(job.id)].count("running") == 3
    assert runner.work_once() is None  # no crash loop
    jobs.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[delivered()])
    assert runner.work_once().state is JobState.DELIVERED


def test_a_step_that_cannot_write_the_job_database_is_resumed_at_the_next_turn(
        parts, monkeypatch, no_summary, caplog):
    index, jobs, tmp = parts
    clock = Clock()
    pipeline = ReportingPipeline()
    runner = make_runner(parts, clock, pipeline=pipeline, destinations=[delivered()])
    job = series_job(parts, clock, runner)
    transition = jobs.transition

    def database_full_once(job_id, event, *args, **kwargs):
        if event is JobEvent.REPORTED and pipeline.runs == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return transition(job_id, event, *args, **kwargs)

    monkeypatch.setattr(jobs, "transition", database_full_once)
    assert runner.step() is None and "runner loop error" in caplog.text
    assert jobs.get(job.id).state is JobState.RUNNING
    assert runner.step().state is JobState.DELIVERED  # resumed, analysed again, delivered
    assert "resumed after an interruption" in [e.reason for e in jobs.journal(job.id)]


def test_a_job_whose_index_update_failed_is_not_made_twice(parts, monkeypatch):
    index, jobs, tmp = parts
    clock = Clock()
    runner = make_runner(parts, clock)
    for n in range(20):
        index.record_instance(record(n, T0))
    clock.now = T0 + 5

    def index_locked(key, count):
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as m:
        m.setattr(index, "mark_taken", index_locked)
        with pytest.raises(sqlite3.OperationalError):
            runner.take_complete_series()
    (made,) = jobs.all()
    assert index.pending_series()  # the series is still pending ...
    clock.now = T0 + 6
    (job,) = runner.take_complete_series()  # ... and the same job now covers it
    assert job.id == made.id and len(jobs.all()) == 1 and index.pending_series() == []


def test_delivering_results_that_are_gone_fails_and_retry_analyses_again(parts, no_summary):
    index, jobs, tmp = parts
    clock = Clock()
    destination = delivered()
    runner = make_runner(parts, clock, pipeline=ReportingPipeline(), destinations=[destination])
    job = delivering_job(parts)
    discard(tmp / "results" / job.id)
    (job,) = runner.deliver_interrupted()
    assert job.state is JobState.FAILED and destination.sent == []
    assert job.reason.startswith("the saved results are missing from ")
    jobs.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    assert runner.work_once().state is JobState.DELIVERED and destination.sent == [1]


def test_a_destination_that_raises_fails_its_job_not_the_loop(parts, caplog):
    class Broken:
        name = "broken"

        def send(self, datasets):
            raise KeyError("bug")

    runner = make_runner(parts, Clock(), destinations=[Broken()])
    job = delivering_job(parts)
    (job,) = runner.deliver_interrupted()
    assert job.state is JobState.FAILED
    assert job.reason == "broken: internal error: KeyError: 'bug'"


def test_recovery_removes_partial_results_of_a_killed_save(parts):
    _, _, tmp = parts
    partial = tmp / "results" / "0123456789abcdef" / ".sr.k3j2.tmp"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half an SR")
    make_runner(parts, Clock()).recover()
    assert not partial.exists()


def test_a_parse_error_pydicom_raises_as_oserror_fails_the_job_without_its_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pydicom raises OSError without an errno for damaged data (a sequence item cut short):
    # bad input, not a disk fault. Its exceptions quote raw values, which may be a patient ID.
    def damaged(*args: object, **kwargs: object) -> None:
        raise OSError("No tag to read at file position 57E near b'SECRET-ID'")

    monkeypatch.setattr(pydicom, "dcmread", damaged)
    with pytest.raises(InputRejected) as refused:
        read_inputs([tmp_path / "damaged.dcm"])
    assert "cannot be read: OSError: No tag to read at file position 57E" in str(refused.value)
    assert "SECRET-ID" not in str(refused.value)
    assert without_values("received b'SECRET-ID' with format 'l'") == \
        "received '...' with format '...'"
