"""``dicomnode features`` on small cohorts: DICOM folders with a SEG, NIfTI volumes, a failing
row, the cache that makes a rerun resume, and images and SEGs fetched from a real Orthanc.

Each lesion's ``original_shape_VoxelVolume`` is checked against the phantom's own voxel count:
the row was measured on the mask it names, not merely measured.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import requests
import SimpleITK as sitk

from dicomfiles import write_seg
from dicomnode.cli import main
from dicomnode.cohort import CohortRow, DicomwebSource, load_case
from dicomnode.config import Config
from dicomnode.errors import CohortError
from dicomnode.phantom import Phantom, make_phantom_study, write_study
from dicomnode.train.features import compute_features
from dicomnode.train.synthetic import write_synthetic_cohort

SHAPE, SPACING = (12, 64, 64), (2.5, 1.5, 1.5)
VOXEL_MM3 = float(np.prod(SPACING))


def write_lesion_seg(phantom: Phantom, path: Path) -> Path:
    """A BINARY SEG of the phantom, one segment per lesion, labelled "tumour <n>"."""
    masks = {f"tumour {label}": phantom.label_map == label for label in phantom.lesion_labels}
    return write_seg(phantom, masks, path)


def write_nifti(array: np.ndarray, path: Path, origin=(0.0, 0.0, 0.0)) -> Path:
    """An axial NIfTI volume of a ``(z, y, x)`` array."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(SPACING)))
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def voxel_volume(header: list[str], row: list[str]) -> float:
    return float(row[header.index("original_shape_VoxelVolume")])


@pytest.fixture(scope="module")
def two_lesions() -> Phantom:
    phantom = make_phantom_study(10001, shape=SHAPE, spacing=SPACING, n_lesions=2)
    assert phantom.lesion_labels == (1, 2)
    return phantom


@pytest.fixture(scope="module")
def one_lesion() -> Phantom:
    return make_phantom_study(10002, shape=SHAPE, spacing=SPACING, n_lesions=1)


@pytest.fixture(scope="module")
def cohort(two_lesions, one_lesion, tmp_path_factory) -> Path:
    """Lesion 1 of a DICOM CT by SEG segment, its lesion 2 by a NIfTI label map, a NIfTI CT,
    and a row whose mask does not exist."""
    folder = tmp_path_factory.mktemp("cohort")
    write_study(two_lesions, folder / "ct_a")
    write_lesion_seg(two_lesions, folder / "a_seg.dcm")
    write_nifti(two_lesions.label_map.astype(np.uint8), folder / "a_labels.nii.gz",
                origin=two_lesions.geometry.origin)
    write_nifti(one_lesion.hu, folder / "b_ct.nii.gz")
    write_nifti(one_lesion.lesion_mask.astype(np.uint8), folder / "b_mask.nii.gz")
    path = folder / "cohort.csv"
    path.write_text(
        "case_id,image,mask,roi,mask_label,tmb\n"
        "A,ct_a,a_seg.dcm,tumour 1,,12.5\n"
        "A,ct_a,a_labels.nii.gz,,2,12.5\n"
        "B,b_ct.nii.gz,b_mask.nii.gz,,,4\n"
        "D,b_ct.nii.gz,missing.nii.gz,,,7\n",
        encoding="utf-8",
    )
    return path


def test_features_cli_measures_every_row_reports_the_failure_and_resumes(
    cohort, two_lesions, one_lesion, tmp_path, capsys
):
    out = tmp_path / "features.csv"

    code = main(["features", "--cohort", str(cohort), "--out", str(out), "--no-progress"])

    captured = capsys.readouterr()
    assert code == 1
    assert "1 row(s) FAILED" in captured.err
    assert f"case 'D' (line 5): mask 'missing.nii.gz': {cohort.parent / 'missing.nii.gz'} does " \
           "not exist" in captured.err
    header, *rows = read_csv(out)
    assert header[:3] == ["case_id", "roi", "mask_label"] and len(header) >= 3 + 1037
    assert [r[:3] for r in rows] == [["A", "tumour 1", ""], ["A", "", "2"], ["B", "", ""]]
    expected_voxels = [two_lesions.lesions[0].voxel_count, two_lesions.lesions[1].voxel_count,
                       one_lesion.lesions[0].voxel_count]
    assert [voxel_volume(header, r) for r in rows] == pytest.approx(
        [n * VOXEL_MM3 for n in expected_voxels])
    errors = [r for r in read_csv(out.with_name("features.csv.warnings.csv")) if r[4] == "error"]
    assert [r[:4] for r in errors] == [["D", "", "", "5"]] and "does not exist" in errors[0][5]
    assert len(list(out.with_name("features.csv.cache").glob("*.json"))) == 3

    # Interrupted after the cache was written: nothing is measured again, same numbers.
    first = out.read_text(encoding="utf-8")
    out.unlink()
    summary = compute_features(cohort, out, config=Config(), workers=2, progress=False)
    assert (summary.computed, summary.cached, len(summary.failures)) == (0, 3, 1)
    assert out.read_text(encoding="utf-8") == first


def test_changed_input_or_protocol_is_measured_again(one_lesion, tmp_path):
    write_nifti(one_lesion.hu, tmp_path / "ct.nii.gz")
    mask = write_nifti(one_lesion.lesion_mask.astype(np.uint8), tmp_path / "mask.nii.gz")
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("case_id,image,mask\nB,ct.nii.gz,mask.nii.gz\n", encoding="utf-8")
    out = tmp_path / "out" / "features.csv"

    def run(config: Config | None = None) -> tuple[int, int]:
        summary = compute_features(cohort, out, config=config or Config(), workers=1,
                                   progress=False)
        assert summary.ok, str(summary)
        return summary.computed, summary.cached

    assert run() == (1, 0)
    assert run() == (0, 1)
    later = mask.stat().st_mtime_ns + 10**9
    os.utime(mask, ns=(later, later))  # the mask was exported again
    assert run() == (1, 0)
    other = Config()
    other = dataclasses.replace(other, radiomics=dataclasses.replace(other.radiomics,
                                                                     crop_margin_mm=25.0))
    assert run(other) == (1, 0)
    assert run(other) == (0, 1)


@pytest.mark.orthanc
def test_image_and_seg_fetched_from_orthanc(orthanc_factory, two_lesions, cohort, tmp_path,
                                            monkeypatch):
    pacs = orthanc_factory(users={"alice": "wonderland"})
    folder = cohort.parent
    for path in [*sorted((folder / "ct_a").iterdir()), folder / "a_seg.dcm"]:
        requests.post(f"{pacs.http_url}/instances", data=path.read_bytes(), auth=pacs.auth,
                      timeout=10).raise_for_status()
    study = two_lesions.datasets[0].StudyInstanceUID
    ct_series = two_lesions.datasets[0].SeriesInstanceUID
    seg = hd.seg.segread(folder / "a_seg.dcm")
    image, mask = f"dicomweb:{study}/{ct_series}", f"dicomweb:{study}/{seg.SeriesInstanceUID}"
    monkeypatch.setenv("COHORT_PACS_PASSWORD", "wonderland")
    source = DicomwebSource.from_url(pacs.dicomweb_url, username="alice",
                                     password_env="COHORT_PACS_PASSWORD")

    case = load_case(CohortRow("A", image, mask, "tumour 2", None, None, {}, 2),
                     base_dir=tmp_path, dicomweb=source)
    assert np.array_equal(case.hu, two_lesions.hu)
    assert np.array_equal(case.mask, two_lesions.label_map == 2)

    wrong = DicomwebSource.from_url(pacs.dicomweb_url, username="alice", password_env="NOPE")
    monkeypatch.setenv("NOPE", "queen")
    with pytest.raises(CohortError, match="case 'A' .*HTTP 401 \\(wrong or missing credentials\\)"):
        load_case(CohortRow("A", image, mask, None, None, None, {}, 2), base_dir=tmp_path,
                  dicomweb=wrong)
    with pytest.raises(CohortError, match=f"series 1.2.3 of study {study} on .*: not found"):
        load_case(CohortRow("A", image, f"dicomweb:{study}/1.2.3", None, None, None, {}, 2),
                  base_dir=tmp_path, dicomweb=source)

    pacs_cohort = tmp_path / "pacs.csv"
    pacs_cohort.write_text(f"case_id,image,mask,roi\nA,{image},{mask},tumour 1\n", encoding="utf-8")
    out = tmp_path / "pacs-features.csv"
    code = main(["features", "--cohort", str(pacs_cohort), "--out", str(out), "--workers", "1",
                 "--no-progress", "--dicomweb-url", pacs.dicomweb_url, "--dicomweb-user", "alice",
                 "--dicomweb-password-env", "COHORT_PACS_PASSWORD"])
    assert code == 0
    header, row = read_csv(out)
    expected = two_lesions.lesions[0].voxel_count * VOXEL_MM3
    assert voxel_volume(header, row) == pytest.approx(expected)


def test_workers_end_when_the_features_command_is_killed(tmp_path):
    """kill -9 of ``dicomnode features`` must not leave its spawned workers measuring."""
    cohort = write_synthetic_cohort(tmp_path / "cohort", 40, seed=7, progress=False)
    command = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "features", "--cohort", str(cohort),
         "--out", str(tmp_path / "features.csv"), "--workers", "2", "--no-progress"],
        cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while len(workers := children(command.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(2)  # let them take a row each
    finally:
        command.kill()
        command.wait(10)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if alive(pid)], "workers outlived the killed command"


def children(pid: int) -> list[int]:
    """Pool workers started by ``pid`` (Linux /proc; multiprocessing's resource tracker aside)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its new parent's reap counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
