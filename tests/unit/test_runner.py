"""The job runner's state handling, with the real index and job store and a controlled clock.

The analysis and the destinations are replaced by small stand-ins here, so that each test
decides what they answer; the real pipeline and real destinations run in the integration tests.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import CompletionConfig, Config, DeliveryConfig, SegmentationConfig
from dicomnode.errors import AssemblyError
from dicomnode.jobs.machine import JobEvent, JobState
from dicomnode.jobs.runner import Runner
from dicomnode.jobs.store import JobStore
from dicomnode.spool.index import Index, InstanceRecord
from dicomnode.types import DeliveryResult, InstanceOutcome, SeriesKey

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


def write_instance(path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.save_as(path, enforce_file_format=True)


def test_temporary_delivery_failures_back_off_then_deliver(parts, tmp_path):
    index, jobs, _ = parts
    clock = Clock()
    down = DeliveryResult("pacs", retryable=True, error="connection refused")
    up = DeliveryResult("pacs", outcomes=(InstanceOutcome("1.2", True),))
    destination = ScriptedDestination(down, down, up)
    runner = make_runner(parts, clock, destinations=[destination])
    job = delivering_job(jobs)
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
    job = delivering_job(jobs)
    (job,) = runner.deliver_interrupted()
    assert job.state is JobState.FAILED and "0x0110" in job.reason


def test_temporary_failures_give_up_after_the_limit(parts):
    index, jobs, _ = parts
    clock = Clock()
    down = DeliveryResult("pacs", retryable=True, error="HTTP 503")
    runner = make_runner(parts, clock, destinations=[ScriptedDestination(*[down] * 20)])
    job = delivering_job(jobs)
    runner.deliver_interrupted()
    while (job := jobs.get(job.id)).state is not JobState.FAILED:
        clock.now = job.next_attempt_at or clock.now
        runner.work_once()
    assert "gave up after" in job.reason and clock.now - T0 >= 1000


def delivering_job(jobs: JobStore):
    """A job whose reports are written and whose delivery is due (as after a crash)."""
    job = jobs.create(KEY, [], now=T0)
    jobs.transition(job.id, JobEvent.START, now=T0)
    return jobs.transition(job.id, JobEvent.REPORTED, now=T0)


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
