"""``dicomnode demo``: the whole flow on this machine, in a few minutes, with nothing to set up.

The study is a real sarcoma CT the shipped segmentation model never trained on (a validation
patient of ``../shared/data/sts_cohort``, with the clinician's contour as the truth) when that
folder is there, else a synthetic CT with known lesions (which lie outside the model's domain:
expect few or none to be found). A listener starts on a free loopback port with a folder
destination, the study is sent to it by C-STORE, and the demo waits for the job while showing
its progress; then it prints where the SEG, SR, key images and PDF are, a readable summary of
the SR, how well the SEG matches the truth (Dice), and how to look at the results in a viewer.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicomnode.config import Config, DestinationConfig, HttpConfig, NodeConfig, home, load
from dicomnode.deliver import make_destination
from dicomnode.jobs.machine import FINAL_STATES, JobState
from dicomnode.phantom import make_phantom_study
from dicomnode.pipeline import Pipeline

log = logging.getLogger(__name__)

DEMO_AE = "DICOMNODE"
#: A validation patient of the shipped segmentation model (never trained on), relative to home.
DEMO_PATIENT = Path("..") / "shared" / "data" / "sts_cohort" / "STS_006"


@dataclass(frozen=True)
class DemoStudy:
    """What the demo sends, and the truth its SEG is scored against."""

    description: str
    datasets: tuple[Dataset, ...]
    truth: np.ndarray  # (z, y, x) bool, slices in the order of ``slice_uids``
    slice_uids: tuple[str, ...]
    truth_name: str


def real_patient_study(folder: Path) -> DemoStudy:
    """A sarcoma patient's CT (JPEG-LS, as the PACS stores it) and the clinician's GTV."""
    import pydicom

    from dicomnode.assemble import assemble
    from dicomnode.masks import ImageGrid, rtstruct_mask

    datasets = tuple(pydicom.dcmread(p) for p in sorted((folder / "CT" / "image").glob("*.dcm")))
    volume = assemble(list(datasets))
    truth = rtstruct_mask(pydicom.dcmread(folder / "CT" / "rtstruct" / "RS.dcm"),
                          ImageGrid(volume.hu, volume.geometry, volume.frame_of_reference_uid),
                          "GTV_Mass_CT", f"{folder.name} RTSTRUCT")
    return DemoStudy(f"real sarcoma CT {folder.name} (a patient the model never trained on)",
                     datasets, truth, tuple(ds.SOPInstanceUID for ds in volume.sources),
                     "the clinician's tumour contour (GTV)")


def phantom_study(seed: int) -> DemoStudy:
    phantom = make_phantom_study(seed)
    return DemoStudy("synthetic CT with known lesions (outside the shipped model's domain)",
                     tuple(phantom.datasets), phantom.lesion_mask,
                     tuple(ds.SOPInstanceUID for ds in phantom.datasets), "the phantom's lesions")


def seg_mask(seg: Dataset, source_uids: Sequence[str]) -> np.ndarray:
    """Union of all segments of ``seg`` on the frames of ``source_uids`` (in that order)."""
    segmentation = hd.seg.Segmentation.from_dataset(seg)
    referenced = {uid for _, _, uid in segmentation.get_source_image_uids()}
    pixels = np.zeros((0,))
    frames = []
    for uid in source_uids:
        if uid in referenced:
            pixels = segmentation.get_pixels_by_source_instance(
                [uid], combine_segments=True, skip_overlap_checks=True
            )[0]
            frames.append(pixels > 0)
        else:
            frames.append(None)
    shape = next((f.shape for f in frames if f is not None), None)
    if shape is None:
        raise ValueError("the SEG references none of the given source instances")
    return np.stack([f if f is not None else np.zeros(shape, bool) for f in frames])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def demo_config(out: Path) -> Config:
    """The shipped demo listener configuration, with its folders placed under ``out``."""
    base = load(home() / "listeners" / "demo.toml")
    node = NodeConfig(**{**vars(base.node), "port": 0, "data_dir": out / "node"})
    # The status page on a free port too: the demo must not collide with a running node.
    http = HttpConfig(**{**vars(base.http), "port": 0})
    results = DestinationConfig(kind="folder", name="demo-results", path=out / "results")
    return Config(**{**vars(base), "node": node, "http": http, "destinations": (results,)})


def run_demo(out: Path, *, seed: int = 10001) -> int:
    from dicomnode.node import Node
    from dicomnode.report import summarize_sr

    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    step = _Steps(started)

    patient = home() / DEMO_PATIENT
    study = real_patient_study(patient) if patient.is_dir() else phantom_study(seed)
    step(f"the study: {study.description}")
    first = study.datasets[0]
    step(f"  {len(study.datasets)} slices of {first.Rows}x{first.Columns}")

    config = demo_config(out)
    step("loading the models (3D U-Net, radiomics protocol, XGBoost TMB, subtypes)")
    pipeline = Pipeline.from_config(config)
    node = Node(config, pipeline=pipeline)
    node.start()
    try:
        step(f"listener {config.node.ae_title} is up on 127.0.0.1:{node.port}; sending the study by C-STORE")
        if node.status is not None:
            step(f"  the job's progress: {node.status.url} (status page; /metrics, /healthz)")
        sender = make_destination(DestinationConfig(
            kind="cstore", name="demo-sender", ae_title=config.node.ae_title, host="127.0.0.1", port=node.port,
        ))
        result = sender.send(list(study.datasets))
        if not result.ok:
            step(f"sending failed: {result.error or result.outcomes}")
            return 1
        step(f"  {len(study.datasets)} instances acknowledged (each fsynced to the spool first)")
        step(f"waiting for the series to complete ({config.completion.quiet_seconds:g} s of quiet) and the job to run")
        job = _wait_for_job(node, step, timeout=600)
    finally:
        node.stop()
    if job is None or job.state is not JobState.DELIVERED:
        step(f"the job did not finish: {job.state.value + ': ' + job.reason if job else 'no job was created'}")
        return 1

    folder = node.runner.result_folder(job)
    import pydicom

    sr = pydicom.dcmread(folder / "sr.dcm")
    print()
    print(summarize_sr(sr))
    print()
    found = 0
    if (folder / "seg.dcm").exists():
        seg = pydicom.dcmread(folder / "seg.dcm")
        score = dice(seg_mask(seg, study.slice_uids), study.truth)
        found = len(seg.SegmentSequence)
        print(f"Dice of the SEG against {study.truth_name}: {score:.3f}")
    print(f"Lesions found by the model: {found}")
    print(f"Delivered to the folder destination {out / 'results'}:")
    for path in sorted((out / "results").rglob("*.dcm")):
        print(f"  {pydicom.dcmread(path, stop_before_pixels=True).Modality:<4} {path}")
    print(f"Job files (SEG, SR, key images, PDF, summary.json): {folder}")
    print()
    print("\n".join(viewer_instructions(out, folder, str(sr.StudyInstanceUID))))
    print()
    print(f"Demo finished in {time.perf_counter() - started:.0f} s. These are research predictions, not clinical results.")
    return 0


def viewer_instructions(out: Path, folder: Path, study_uid: str) -> list[str]:
    """How to look at the results as a radiologist would: the PDF as a file, any DICOM viewer
    on the delivered files, and OHIF through ``dicomnode viewer`` when it is installed."""
    import pydicom

    from dicomnode.results import PDF_FILE
    from dicomnode.viewer import ViewerError, find_ohif_dist

    lines = ["How to look at the results:"]
    if (folder / PDF_FILE).exists():
        pdf = out / "report.pdf"
        pdf.write_bytes(_pdf_bytes(pydicom.dcmread(folder / PDF_FILE)))
        lines.append(f"  the PDF report (results table and key images): {pdf}")
    lines.append(f"  in any DICOM viewer: open the files under {out / 'results'} (the key images "
                 "show each lesion's outline and results, the SEG and SR need a viewer that reads them)")
    try:
        dist = find_ohif_dist()
    except ViewerError:
        lines.append("  in OHIF: not installed here (bash docker/install.sh --test installs it); "
                     "then send the results and the CT to a PACS with DICOMweb and run "
                     "dicomnode viewer --dicomweb <its DICOMweb root>")
        return lines
    lines += [
        f"  in OHIF ({dist}): send the CT and the results to a PACS with DICOMweb (for example",
        "    Orthanc: storescu -aec ORTHANC +sd +r 127.0.0.1 4242 <CT folder> " + str(out / "results"),
        "    ), then run",
        f"    dicomnode viewer --dicomweb http://127.0.0.1:8042/dicom-web --study {study_uid}",
        "    and open the printed URL: double-click the SEG or the SR series to show it on the CT.",
    ]
    return lines


def _pdf_bytes(document: Dataset) -> bytes:
    """The PDF inside an Encapsulated PDF instance, without the padding byte DICOM adds."""
    data = bytes(document.EncapsulatedDocument)
    return data[: int(document.get("EncapsulatedDocumentLength", len(data)))]


class _Steps:
    """Prints numbered progress lines with the elapsed time."""

    def __init__(self, started: float) -> None:
        self.started = started

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.1f} s] {text}", flush=True)


def _wait_for_job(node, step: _Steps, timeout: float):
    deadline = time.monotonic() + timeout
    seen: dict[str, JobState] = {}
    while time.monotonic() < deadline:
        for job in node.jobs.all():
            if seen.get(job.id) is not job.state:
                seen[job.id] = job.state
                step(f"  job {job.id}: {job.state.value} ({job.reason})")
            if job.state in FINAL_STATES:
                return job
        time.sleep(0.5)
    return None
