"""dcmqi (QIICR, the reader behind 3D Slicer's QuantitativeReporting) reads our SEG and SR.

Both SEG encodings that ``seg_encoding = "auto"`` chooses are read back voxel for voxel, and the
SR's planar and volumetric groups come back with their numbers.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_report import TEMPLATE, make_analysis, synthetic_ct, written

from dicomnode.config import ReportConfig
from dicomnode.report import build_reports, load_template


def dcmqi_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip package dcmqi)")
    return path


def read_nrrd(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The voxels ``(z, y, x)`` and the origin of a gzip-encoded NRRD written by dcmqi."""
    raw = path.read_bytes()
    header, _, body = raw.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:]
                  if ": " in line)
    assert fields["type"] == "short" and fields["encoding"] == "gzip", fields
    x, y, z = (int(n) for n in fields["sizes"].split())
    origin = tuple(float(v) for v in fields["space origin"].strip("()").split(","))
    return np.frombuffer(gzip.decompress(body), "<i2").reshape(z, y, x), origin


@pytest.mark.parametrize(("rows", "cols", "choice", "encoding"), [
    (24, 24, "auto", "BINARY"),
    (23, 21, "auto", "FRACTIONAL"),
    (23, 21, "binary", "BINARY"),  # frames that start mid-byte: dcmqi unpacks them right
])
def test_dcmqi_reads_our_seg_voxel_for_voxel(rows, cols, choice, encoding, tmp_path):
    tool = dcmqi_tool("segimage2itkimage")
    analysis = make_analysis(synthetic_ct(rows=rows, cols=cols))
    reports = build_reports(analysis, template=load_template(TEMPLATE),
                            config=ReportConfig(seg_encoding=choice), uid_seed=f"dcmqi-{rows}")
    assert reports.seg.SegmentationType == encoding
    seg_path, _ = written(reports, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run([tool, "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                          "--outputType", "nrrd"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    labels = analysis.segmentation.labels
    slice_mm = analysis.volume.geometry.spacing[0]
    for segment in (1, 2):
        voxels, origin = read_nrrd(out / f"{segment}.nrrd")
        first = round(origin[2] / slice_mm)  # the CT's slice 0 lies at z = 0 mm
        expected = labels[first:first + voxels.shape[0]] == segment
        assert np.array_equal(voxels != 0, expected), segment
        assert (labels == segment).sum() == (voxels != 0).sum()  # no slice of it left out


def test_dcmqi_reads_both_groups_of_every_lesion(tmp_path):
    tool = dcmqi_tool("tid1500reader")
    analysis = make_analysis(synthetic_ct(rows=23, cols=21))
    reports = build_reports(analysis, template=load_template(TEMPLATE), config=ReportConfig(),
                            uid_seed="dcmqi-sr")
    _, sr_path = written(reports, tmp_path)
    out = tmp_path / "sr.json"
    run = subprocess.run([tool, "--inputDICOM", str(sr_path), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    groups = json.loads(out.read_text())["Measurements"]
    assert [g["TrackingIdentifier"] for g in groups] == ["Lesion 1"] * 2 + ["Lesion 2"] * 2
    planar, volumetric = groups[0], groups[1]
    assert planar["TrackingUniqueIdentifier"] == volumetric["TrackingUniqueIdentifier"]
    assert volumetric["ReferencedSegment"] == 1
    numbers = {item["quantity"]["CodeMeaning"]: float(item["value"])
               for g in (planar, volumetric) for item in g["measurementItems"]}
    assert numbers["Area"] > 0
    assert numbers["Volume"] == pytest.approx(analysis.segmentation.lesions[0].volume_ml)
    assert numbers["TMB-high probability (research)"] == pytest.approx(81.0)
