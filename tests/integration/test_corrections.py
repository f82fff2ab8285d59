"""The corrections loop against a real Orthanc: a radiologist corrects our SEG in a viewer and
sends it back; the node measures the corrected SEG, delivers a new SR that replaces the first
(Predecessor Documents Sequence), and ``dicomnode cohort export`` lists the pair for training.

The segmenter here is a plug-in that calls every voxel above 1500 HU a lesion
(``tests/segment_plugin.py``, set by configuration): the first result then has exactly the two
lesions painted into the CT, so that the test knows every volume. The real U-Net's results on
people are tested in ``tests/unit/test_segment.py`` and ``test_end_to_end.py``.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests

from dicomnode.cohort import load_case, read_cohort
from dicomnode.phantom import make_phantom_study, write_study
from nodeproc import REPO, NodeProcess, write_config
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port
from routing import ROUTE_CT_AND_SEGMENTATIONS, node_jobs, series_in_study, store_to_pacs
from validate import dciodvfy_errors, dsrdump_ok

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

TESTS = Path(__file__).resolve().parents[1]
DENSE_HU = 2000.0
BIG = (slice(20, 28), slice(40, 60), slice(40, 60))  # 3200 voxels: lesion 1
SMALL = (slice(10, 14), slice(80, 90), slice(80, 90))  # 400 voxels: lesion 2
SHRUNK = (slice(21, 27), slice(42, 58), slice(42, 58))  # 1536 voxels: lesion 1 corrected


def ct_with_two_dense_lesions(folder: Path) -> tuple[list[pydicom.Dataset], list[Path]]:
    phantom = make_phantom_study(10005)  # reserved seed
    for z, ds in enumerate(phantom.datasets):
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for box in (BIG, SMALL):
            if box[0].start <= z < box[0].stop:
                hu[box[1], box[2]] = DENSE_HU
        stored = (hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)
        ds.PixelData = stored.astype(ds.pixel_array.dtype).tobytes()
    return list(phantom.datasets), write_study(phantom, folder)


def corrected_seg(ct: list[pydicom.Dataset], path: Path) -> pydicom.Dataset:
    """What a viewer writes after a radiologist deleted lesion 2 and shrank lesion 1."""
    mask = np.zeros((len(ct), int(ct[0].Rows), int(ct[0].Columns)), dtype=bool)
    mask[SHRUNK] = True
    seg = hd.seg.Segmentation(
        source_images=ct, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lesion 1 corrected",
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT",
                                                           "Morphologically Abnormal Structure"),
            segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )],
        series_instance_uid=hd.UID(), series_number=990, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="A viewer", manufacturer_model_name="Viewer",
        software_versions="1", device_serial_number="1", omit_empty_frames=True,
    )
    seg.ContentCreatorName = "Reader^Radiology"
    seg.save_as(path)
    return seg


def wait_for(condition, what: str, node: NodeProcess, pacs: Orthanc, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\nnode log:\n{node.log_tail()}\n"
                         f"Orthanc log:\n{pacs.log_tail()}")


def volumes_in(sr: pydicom.Dataset) -> list[float]:
    return sorted(m.value for g in hd.sr.Comprehensive3DSR.from_dataset(sr).content
                  .get_volumetric_roi_measurement_groups()
                  for m in g.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume")))


def test_a_corrected_seg_gives_a_new_report_and_a_training_pair(tmp_path, monkeypatch):
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the node process imports the plug-in
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", lua_script=ROUTE_CT_AND_SEGMENTATIONS,
                   modalities={"node": ("DICOMNODE", "127.0.0.1", node_port)}, stable_age=2).start()
    config = write_config(
        tmp_path / "node.toml", port=node_port, data_dir=tmp_path / "node",
        destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
        completion={"quiet_seconds": 2}, segmentation={"plugin": "segment_plugin:make"},
    )
    node = NodeProcess(config, node_port, tmp_path / "node.log").start()
    try:
        ct, files = ct_with_two_dense_lesions(tmp_path / "ct")
        study = ct[0].StudyInstanceUID
        voxel_ml = 2.5 * 1.5 * 1.5 / 1000
        store_to_pacs(pacs, files)

        first = wait_for(lambda: (held := series_in_study(pacs, study)).get("SR") and
                         held.get("SEG") and held, "the first SEG and SR", node, pacs)
        (our_seg,), (first_sr,) = first["SEG"], first["SR"]
        assert len(our_seg.SegmentSequence) == 2
        assert volumes_in(first_sr) == pytest.approx(sorted([3200 * voxel_ml, 400 * voxel_ml]))
        # Orthanc routes our own SEG back to the node (the rule sends every SEG): not measured.
        wait_for(lambda: "a SEG this node wrote" in node.log_tail(400), "our SEG recognised",
                 node, pacs)
        assert [state for state, _ in node_jobs(tmp_path, study)] == ["delivered"]

        correction = corrected_seg(ct, tmp_path / "corrected.dcm")
        # A viewer stores through DICOMweb (OHIF: STOW-RS); Orthanc's REST upload is the same.
        requests.post(f"{pacs.http_url}/instances", data=(tmp_path / "corrected.dcm").read_bytes(),
                      auth=pacs.auth, timeout=30).raise_for_status()
        second = wait_for(lambda: len((held := series_in_study(pacs, study)).get("SR", [])) == 2
                          and held, "the SR of the corrected SEG", node, pacs)
        assert len(second["SEG"]) == 2  # ours and the correction: a supplied SEG gets no new SEG
        new_sr = next(sr for sr in second["SR"] if sr.SOPInstanceUID != first_sr.SOPInstanceUID)
        assert volumes_in(new_sr) == pytest.approx([1536 * voxel_ml])
        (predecessor,) = new_sr.PredecessorDocumentsSequence
        assert predecessor.StudyInstanceUID == study
        previous = predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert previous.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
        references = [ref for item in new_sr.ContentSequence
                      for ref in _walk(item) if "ReferencedSegmentNumber" in ref]
        assert {(r.ReferencedSOPInstanceUID, int(r.ReferencedSegmentNumber))
                for r in references} == {(correction.SOPInstanceUID, 1)}
        notes = " ".join(str(i.get("TextValue", "")) for item in new_sr.ContentSequence
                         for i in _walk(item))
        assert f"SEG {correction.SOPInstanceUID}" in notes and "Reader^Radiology" in notes
        new_sr.save_as(tmp_path / "new_sr.dcm")
        assert dciodvfy_errors(tmp_path / "new_sr.dcm") == []
        ok, text = dsrdump_ok(tmp_path / "new_sr.dcm")
        assert ok, text
        assert [state for state, _ in node_jobs(tmp_path, study)] == ["delivered", "delivered"]
    finally:
        node.stop()
        pacs.stop()

    export = subprocess.run(
        [sys.executable, "-m", "dicomnode", "cohort", "export", "--config", str(config),
         "--out", str(tmp_path / "corrections.csv")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert export.returncode == 0, export.stderr
    with (tmp_path / "corrections.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["case_id"] == ct[0].SeriesInstanceUID
    (parsed,) = read_cohort(tmp_path / "corrections.csv")
    case = load_case(parsed, base_dir=tmp_path)
    assert int(case.mask.sum()) == 1536 and case.hu.shape == (len(ct), 128, 128)


def _walk(item: pydicom.Dataset):
    yield item
    for key in ("ContentSequence", "ReferencedSOPSequence"):
        for child in item.get(key, []):
            yield from _walk(child)
