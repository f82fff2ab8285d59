"""``dicomnode demo``: the whole flow on this machine, in a few minutes, with nothing to set up.

A synthetic CT study with known lesions is made, a listener starts on a free loopback port
with a folder destination, the study is sent to it by C-STORE, and the demo waits for the job
while showing its progress; then it prints where the SEG and SR are, a readable summary of the
SR, and how well the SEG matches the lesions the phantom really has (Dice).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicomnode.config import Config, DestinationConfig, NodeConfig, home, load
from dicomnode.deliver import make_destination
from dicomnode.jobs.machine import FINAL_STATES, JobState
from dicomnode.phantom import make_phantom_study, write_study
from dicomnode.pipeline import Pipeline

log = logging.getLogger(__name__)

DEMO_AE = "DICOMNODE"


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
    results = DestinationConfig(kind="folder", name="demo-results", path=out / "results")
    return Config(**{**vars(base), "node": node, "destinations": (results,)})


def run_demo(out: Path, *, seed: int = 10001) -> int:
    from dicomnode.node import Node
    from dicomnode.report import summarize_sr

    started = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    step = _Steps(started)

    step("making a synthetic CT study with known lesions")
    phantom = make_phantom_study(seed)
    write_study(phantom, out / "input")
    shape = phantom.hu.shape
    step(f"  {shape[0]} slices of {shape[1]}x{shape[2]}, {len(phantom.lesion_labels)} lesion(s); files in {out / 'input'}")

    config = demo_config(out)
    step("loading the models (3D U-Net, radiomics protocol, XGBoost TMB, subtypes)")
    pipeline = Pipeline.from_config(config)
    node = Node(config, pipeline=pipeline)
    node.start()
    try:
        step(f"listener {config.node.ae_title} is up on 127.0.0.1:{node.port}; sending the study by C-STORE")
        sender = make_destination(DestinationConfig(
            kind="cstore", name="demo-sender", ae_title=config.node.ae_title, host="127.0.0.1", port=node.port,
        ))
        result = sender.send(list(phantom.datasets))
        if not result.ok:
            step(f"sending failed: {result.error or result.outcomes}")
            return 1
        step(f"  {len(phantom.datasets)} instances acknowledged (each fsynced to the spool first)")
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
    if (folder / "seg.dcm").exists():
        uids = [ds.SOPInstanceUID for ds in phantom.datasets]
        score = dice(seg_mask(pydicom.dcmread(folder / "seg.dcm"), uids), phantom.lesion_mask)
        print(f"Dice of the SEG against the phantom's true lesions: {score:.3f}")
    found = len(pydicom.dcmread(folder / "seg.dcm").SegmentSequence) if (folder / "seg.dcm").exists() else 0
    print(f"Lesions: {len(phantom.lesion_labels)} in the phantom, {found} found by the model")
    print(f"Delivered to the folder destination {out / 'results'}:")
    for path in sorted((out / "results").rglob("*.dcm")):
        print(f"  {pydicom.dcmread(path, stop_before_pixels=True).Modality:<4} {path}")
    print(f"Job files (SEG, SR, summary.json): {folder}")
    print(f"Demo finished in {time.perf_counter() - started:.0f} s. These are research predictions, not clinical results.")
    return 0


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
