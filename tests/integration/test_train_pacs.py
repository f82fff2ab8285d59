"""The PACS route for training: sarcoma patients loaded into a real Orthanc, the segmentation
model trained from ``dicomweb:`` rows of a cohort CSV, on exactly the voxels a local load gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests

from dicomnode.analyse.segment import Segmenter
from dicomnode.cohort import DicomwebSource, load_case, read_cohort
from dicomnode.config import SegmentationConfig
from dicomnode.train.segmentation import Recipe, train_segmentation

PATIENTS = ("STS_003", "STS_008", "STS_019")  # three of the smallest crops: a quick test
#: A few minutes' worth of the shipped recipe, on the shipped grid.
QUICK = Recipe(epochs=1, iterations_per_epoch=4, batch_size=1, patch_size=(16, 64, 64),
               channels=(4, 8, 16, 32, 64), warmup_iterations=1)


def upload_patient(pacs, folder: Path) -> tuple[str, str, str]:
    """POST the CT slices and the RTSTRUCT as stored (JPEG-LS); (study, CT series, RT series)."""
    files = sorted((folder / "CT" / "image").iterdir()) + [folder / "CT" / "rtstruct" / "RS.dcm"]
    for path in files:
        requests.post(f"{pacs.http_url}/instances", data=path.read_bytes(), auth=pacs.auth,
                      timeout=30).raise_for_status()
    ct = pydicom.dcmread(files[0], stop_before_pixels=True)
    rt = pydicom.dcmread(files[-1], stop_before_pixels=True)
    return ct.StudyInstanceUID, ct.SeriesInstanceUID, rt.SeriesInstanceUID


@pytest.mark.orthanc
def test_segmentation_trains_from_dicomweb_rows(orthanc_factory, shared_data, tmp_path):
    cohort_dir = shared_data / "sts_cohort"
    local_rows = {row.case_id: row for row in read_cohort(cohort_dir / "cohort.csv")}
    pacs = orthanc_factory()
    lines = ["case_id,image,mask,roi"]
    for case_id in PATIENTS:
        study, ct_series, rt_series = upload_patient(pacs, cohort_dir / case_id)
        lines.append(f"{case_id},dicomweb:{study}/{ct_series},dicomweb:{study}/{rt_series},"
                     "GTV_Mass_CT")
    cohort = tmp_path / "pacs-cohort.csv"
    cohort.write_text("\n".join(lines) + "\n", encoding="utf-8")
    source = DicomwebSource.from_url(pacs.dicomweb_url)

    for row in read_cohort(cohort):  # the PACS gives the very voxels the files hold
        remote = load_case(row, base_dir=tmp_path, dicomweb=source)
        local = load_case(local_rows[row.case_id], base_dir=cohort_dir)
        assert np.array_equal(remote.hu, local.hu) and np.array_equal(remote.mask, local.mask)
        assert remote.spacing_zyx == local.spacing_zyx

    report = train_segmentation(tmp_path / "model", cohort=cohort, dicomweb=source, seed=0,
                                device="cpu", recipe=QUICK, log=lambda _: None)
    assert report.split == (PATIENTS[:2], PATIENTS[2:])
    (validated,) = report.per_patient
    truth = load_case(local_rows[PATIENTS[2]], base_dir=cohort_dir)
    voxel_ml = float(np.prod(truth.spacing_zyx)) / 1000.0
    assert validated["case"] == PATIENTS[2]
    assert validated["drawn_ml"] == pytest.approx(truth.mask.sum() * voxel_ml, abs=0.05)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["training"]["split"] == {"train": list(PATIENTS[:2]),
                                             "validation": [PATIENTS[2]]}
    assert manifest["training"]["cohort"] == str(cohort)
    Segmenter.load(tmp_path / "model", SegmentationConfig(device="cpu"))
