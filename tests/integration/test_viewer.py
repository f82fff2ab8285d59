"""What a radiologist sees: our objects in the real viewer, OHIF 3.13.2 in headless Chromium.

A CT and everything dicomnode produced for it (SEG, SR, key images, PDF) go into a real
Orthanc; OHIF's own ``dist/`` is served in front of it (``tests/viewer.py``) and driven by
playwright-core (``tests/viewer/probe.mjs``) as a user would: open the study, double-click
the SEG, then the SR, then the key images and the PDF. The test then checks

- the SEG: the labelmap OHIF decoded (and draws) equals highdicom's reading of the same SEG, on
  every CT slice, matched by SOP Instance UID;
- the SR: opening it raises no error, and each lesion's outline is drawn on the CT image it
  references, with the numbers OHIF reads from our measurement groups as its text;
- the key images (Secondary Capture, Modality OT) and the PDF (Encapsulated PDF, Modality DOC)
  are series of the study as OHIF lists them, and open without an error.

Cases: a real sarcoma CT the model never trained on (206 x 218 pixels: BINARY frames would start
mid-byte, which OHIF 3.13 decodes wrongly) and the demo phantom (128 x 128). Screenshots go to
``$DICOMNODE_TEST_ARTIFACTS/viewer`` (default ``test-artifacts/viewer`` in the checkout).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc
from sarcoma import held_out_series
from viewer import OHIF_DIST, ViewerServer, probe, require_viewer

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("DICOMNODE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "viewer"
#: A held-out patient whose 206 x 218 frames do not fill whole bytes (every second BINARY
#: frame starts mid-byte).
SARCOMA_CASE = "STS_016"
PHANTOM_SEED = 10001  # the demo's
SECONDARY_CAPTURE = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1",
                     "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3",
                     "1.2.840.10008.5.1.4.1.1.7.4"}
#: How OHIF's SR viewport writes a measurement's name (SHORT_HAND_MAP in its SR extension).
OHIF_SHORTHAND = {"Short Axis": "W: ", "Long Axis": "L: ", "AREA": "Area: ", "Length": ""}


# -- what dicomnode produced -------------------------------------------------------------------

@cache
def _pipeline():
    from dicomnode.config import home, load
    from dicomnode.pipeline import Pipeline

    return Pipeline.from_config(load(home() / "listeners" / "default.toml"))


class _KnownLesions:
    """A lesion source that returns given masks (the phantom's own lesions), so that the
    phantom, which lies outside the model's domain, still gets a SEG and an SR."""

    def __init__(self, masks_by_sop_uid: dict[str, np.ndarray]) -> None:
        from dicomnode.types import ModelInfo

        self.masks = masks_by_sop_uid
        self.info = ModelInfo(name="phantom-truth", version="1", family="Known lesions",
                              task="segmentation")

    def segment(self, volume):
        from dicomnode.analyse.segment import label_lesions
        from dicomnode.types import LabelVolume

        mask = np.stack([self.masks[str(ds.SOPInstanceUID)] for ds in volume.sources])
        labels, lesions = label_lesions(mask, volume, 0.0)
        return LabelVolume(labels=labels, lesions=lesions, model_name=self.info.name,
                           model_version=self.info.version)


def objects_dicomnode_produced(ct: Sequence[Dataset], *, uid_seed: str,
                               lesion_masks: dict[str, np.ndarray] | None = None
                               ) -> tuple[Dataset, ...]:
    """The objects dicomnode produced for this CT, in delivery order (SEG, SR, key images,
    PDF): the shipped default configuration's pipeline, as the listener and ``dicomnode
    process`` run it. ``lesion_masks`` (per CT SOP Instance UID) replace the segmentation
    model by known lesions."""
    from dicomnode.pipeline import Pipeline

    pipeline = _pipeline()
    if lesion_masks is not None:
        pipeline = Pipeline(pipeline.config, segmenter=_KnownLesions(lesion_masks),
                            measurer=pipeline.measurer, predictor=pipeline.predictor,
                            template=pipeline.template)
    return pipeline.run(list(ct), uid_seed=uid_seed).reports.datasets()


# -- the cases -----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    ct: list[Dataset]
    ct_files: list[Path]
    produced: tuple[Dataset, ...]
    files: dict[str, Path]  # SOP Instance UID of each produced object -> its file

    @property
    def study_uid(self) -> str:
        return str(self.ct[0].StudyInstanceUID)

    def of_modality(self, modality: str) -> list[Dataset]:
        return [ds for ds in self.produced if ds.Modality == modality]


def _write(datasets: Sequence[Dataset], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for k, ds in enumerate(datasets):
        path = folder / f"{ds.Modality}-{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files[str(ds.SOPInstanceUID)] = path
    return files


def sarcoma_case(work: Path) -> Case:
    paths = held_out_series(SARCOMA_CASE, work / "ct")
    ct = [pydicom.dcmread(p) for p in paths]
    produced = objects_dicomnode_produced(ct, uid_seed=f"viewer-{SARCOMA_CASE}")
    return Case(f"sarcoma-{SARCOMA_CASE}", ct, paths, produced, _write(produced, work / "out"))


def phantom_case(work: Path) -> Case:
    from dicomnode.phantom import make_phantom_study

    phantom = make_phantom_study(PHANTOM_SEED)
    ct = list(phantom.datasets)
    masks = {str(ds.SOPInstanceUID): phantom.lesion_mask[k] for k, ds in enumerate(ct)}
    produced = objects_dicomnode_produced(ct, uid_seed=f"viewer-phantom-{PHANTOM_SEED}",
                                          lesion_masks=masks)
    ct_files = list(_write(ct, work / "ct").values())
    return Case(f"phantom-{PHANTOM_SEED}", ct, ct_files, produced, _write(produced, work / "out"))


def upload(pacs: Orthanc, case: Case) -> None:
    """Every CT file and every object into Orthanc (its REST API, as a PACS import)."""
    with requests.Session() as session:
        for path in [*case.ct_files, *case.files.values()]:
            response = session.post(f"{pacs.http_url}/instances", data=path.read_bytes(),
                                    timeout=30)
            response.raise_for_status()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    """One Orthanc (DICOMweb) and OHIF in front of it for the module."""
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (orthanc, orthanc-dicomweb)")
    require_viewer()
    pacs = Orthanc(tmp_path_factory.mktemp("viewer") / "orthanc").start()
    server = ViewerServer(f"{pacs.http_url}/dicom-web", OHIF_DIST,
                          friendly_name="dicomnode test Orthanc").start()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield pacs, server
    server.stop()
    pacs.stop()


@pytest.fixture(scope="module", params=["sarcoma", "phantom"])
def opened(request, viewer, tmp_path_factory):
    """A case uploaded and opened in OHIF: SEG, SR, then each key-image and PDF series."""
    pacs, server = viewer
    if request.param == "sarcoma":
        from sarcoma import require_cohort

        require_cohort()
    started = time.perf_counter()
    work = tmp_path_factory.mktemp(request.param)
    case = sarcoma_case(work) if request.param == "sarcoma" else phantom_case(work)
    produced_at = time.perf_counter()
    upload(pacs, case)
    steps = []
    for modality, kind in (("SEG", "seg"), ("SR", "sr"), ("OT", "open"), ("DOC", "open")):
        for series in dict.fromkeys(str(ds.SeriesInstanceUID) for ds in case.of_modality(modality)):
            steps.append({"kind": kind, "series": series, "name": modality.lower()})
    result = probe({
        "url": server.viewer_url(case.study_uid), "outDir": str(ARTIFACTS), "name": case.name,
        "expectSeries": 1 + len({str(ds.SeriesInstanceUID) for ds in case.produced}),
        "steps": steps,
    })
    # What the browser saw, beside the screenshots, for a failure in CI.
    (ARTIFACTS / f"{case.name}-probe.json").write_text(json.dumps(result, indent=1))
    print(f"{case.name}: dicomnode {produced_at - started:.1f} s, OHIF {result['seconds']:.1f} s; "
          f"screenshots: {', '.join(result['screenshots'])}")
    return case, result


def _step(result: dict, kind: str) -> dict:
    found = [s for s in result["steps"] if s["kind"] == kind]
    assert found, f"no {kind} step was run: {[s['kind'] for s in result['steps']]}"
    step = found[0]
    assert "error" not in step, f"the {kind} step failed in the browser:\n{step['error']}"
    return step


def _errors(result: dict, step_prefix: str) -> list[str]:
    """Uncaught exceptions in the page while a step ran."""
    return [e["message"] for e in result["pageErrors"] if e["step"].startswith(step_prefix)]


def _console(result: dict, step_prefix: str) -> list[str]:
    return [e["text"][:300] for e in result["consoleErrors"] if e["step"].startswith(step_prefix)]


def test_the_study_opens_with_every_ct_image(opened):
    case, result = opened
    assert not _errors(result, "open study"), _errors(result, "open study")
    ct = [d for d in result["displaySets"] if d["SeriesInstanceUID"] == case.ct[0].SeriesInstanceUID]
    assert len(ct) == 1 and ct[0]["Modality"] == "CT" and ct[0]["numInstances"] == len(case.ct), ct


# -- the SEG ---------------------------------------------------------------------------------

def highdicom_labels(seg_path: Path, sop_uids: Sequence[str]) -> dict[str, np.ndarray]:
    """highdicom's reading of a SEG: the segment number of each pixel (0: none) on each CT
    image, by SOP Instance UID; zeros where the SEG has no frame."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    shape = (int(seg.Rows), int(seg.Columns))
    labels = {}
    for uid in sop_uids:
        if uid in referenced:
            labels[uid] = np.asarray(seg.get_pixels_by_source_instance(
                [uid], combine_segments=True, skip_overlap_checks=True)[0], dtype=np.int32)
        else:
            labels[uid] = np.zeros(shape, np.int32)
    return labels


def ohif_labels(slice_: dict) -> np.ndarray:
    """One slice of the probe's run-length labelmap as an array."""
    flat = np.zeros(slice_["rows"] * slice_["columns"], np.int32)
    runs = slice_["runs"]
    for start, length, value in zip(runs[0::3], runs[1::3], runs[2::3]):
        flat[start:start + length] = value
    return flat.reshape(slice_["rows"], slice_["columns"])


def test_ohif_decodes_the_seg_as_highdicom_does_on_every_slice(opened):
    case, result = opened
    segs = case.of_modality("SEG")
    assert len(segs) == 1, f"dicomnode produced {len(segs)} SEGs for {case.name}"
    seg = segs[0]
    step = _step(result, "seg")
    assert not step["errorPage"] and not _errors(result, "seg"), _errors(result, "seg")
    sop_uids = [str(ds.SOPInstanceUID) for ds in case.ct]
    expected = highdicom_labels(case.files[str(seg.SOPInstanceUID)], sop_uids)
    slices = step["slices"]
    assert set(slices) == set(sop_uids), "OHIF's labelmap does not cover exactly the CT's images"
    assert sum(int((m > 0).sum()) for m in expected.values()) > 0, "the SEG is empty"
    wrong = {}
    for ds in case.ct:
        uid = str(ds.SOPInstanceUID)
        got = ohif_labels(slices[uid])
        if got.shape != expected[uid].shape or not np.array_equal(got, expected[uid]):
            wrong[int(ds.InstanceNumber)] = (
                int((got != expected[uid]).sum()) if got.shape == expected[uid].shape else "shape")
    assert not wrong, (
        f"{case.name} ({seg.SegmentationType}, {seg.Rows}x{seg.Columns}): OHIF's labelmap differs "
        f"from highdicom's on {len(wrong)} of {len(sop_uids)} slices "
        f"(instance number: pixels that differ) {wrong}; see {result['screenshots']}")


# -- the SR ----------------------------------------------------------------------------------

@dataclass
class Outline:
    """One lesion as OHIF should draw it from our SR."""

    tracking_uid: str
    points: int
    sop_uid: str
    lines: list[tuple[str, float, str]]  # (name as OHIF writes it, value, unit code)


def sr_outlines(sr: Dataset) -> dict[str, Outline]:
    """Per Tracking Unique Identifier: the SCOORD OHIF draws (number of points, the image it
    is on) and the NUM items it writes beside it, in the order OHIF reads them (the groups of
    one Tracking UID merged, at most 5 lines, as its SR extension does)."""
    def code(item, key="ConceptNameCodeSequence"):
        return item[key][0].CodeValue if key in item else None

    measurements = next(i for i in sr.ContentSequence if code(i) == "126010")
    merged: dict[str, list[Dataset]] = {}
    for group in measurements.ContentSequence:
        if code(group) != "125007":
            continue
        items = list(group.ContentSequence)
        uid = next(str(i.UID) for i in items if code(i) == "112040")
        merged.setdefault(uid, []).extend(items)
    outlines = {}
    for uid, items in merged.items():
        scoord = next((i for i in items if i.ValueType == "SCOORD"), None)
        if scoord is None:
            continue
        image = next(i for i in scoord.ContentSequence if i.ValueType == "IMAGE")
        lines = []
        for item in items:
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                value = item.MeasuredValueSequence[0]
                meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning)
                name = OHIF_SHORTHAND.get(meaning, f"{meaning}: ")
                lines.append((name, float(value.NumericValue),
                              str(value.MeasurementUnitsCodeSequence[0].CodeValue)))
        outlines[uid] = Outline(uid, len(scoord.GraphicData) // 2,
                                str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                                lines[:5])
    return outlines


def _drawn(line: tuple[str, float, str], drawn: Sequence[str]) -> bool:
    name, value, unit = line
    for text in drawn:
        if text.startswith(name) and text.endswith(f" {unit}"):
            number = text[len(name):-len(unit) - 1].strip()
            try:
                if abs(float(number) - value) <= 0.0051:
                    return True
            except ValueError:
                continue
    return False


def test_opening_the_sr_draws_each_outline_with_its_numbers(opened):
    case, result = opened
    srs = case.of_modality("SR")
    assert len(srs) == 1, f"dicomnode produced {len(srs)} SRs for {case.name}"
    sr = srs[0]
    step = _step(result, "sr")
    raised = _errors(result, "sr")
    assert not step["errorPage"] and not raised, (
        f"opening the SR in OHIF: {step['errorDetails'] or 'no error page'}; "
        f"page errors: {raised}; console errors: {_console(result, 'sr')}")
    outlines = sr_outlines(sr)
    assert outlines, "the SR has no measurement group with an outline (SCOORD) for OHIF to draw"
    annotations = {a["trackingUniqueIdentifier"]: a for a in step["annotations"]}
    for uid, outline in outlines.items():
        drawn = annotations.get(uid)
        assert drawn is not None, f"OHIF made no annotation of {uid}: {step['annotations']}"
        assert drawn["graphicType"] == "POLYLINE" and drawn["points"] == outline.points >= 3
        assert drawn["referencedSOPInstanceUID"] == outline.sop_uid
    # The viewport shows the first outline's image, the contour and its text drawn on it.
    shown = [o for o in outlines.values() if o.sop_uid == step["currentSOPInstanceUID"]]
    assert shown, f"the SR viewport shows {step['currentSOPInstanceUID']}, no outlined image"
    assert step["drawn"]["shapes"] >= 1, "no contour was drawn"
    for outline in shown:
        missing = [line for line in outline.lines if not _drawn(line, step["drawn"]["text"])]
        assert outline.lines and not missing, (
            f"not drawn beside the outline: {missing}; drawn: {step['drawn']['text']}")


# -- key images and the PDF -----------------------------------------------------------------

def test_key_images_and_pdf_are_series_of_the_study_in_ohif(opened):
    case, result = opened
    key_images = [ds for ds in case.produced if ds.SOPClassUID in SECONDARY_CAPTURE]
    pdfs = [ds for ds in case.produced if ds.SOPClassUID == EncapsulatedPDFStorage]
    assert key_images and all(ds.Modality == "OT" for ds in key_images), \
        "dicomnode produced no key image (Secondary Capture, Modality OT)"
    assert pdfs and all(ds.Modality == "DOC" for ds in pdfs), \
        "dicomnode produced no Encapsulated PDF (Modality DOC)"
    listed = {d["SeriesInstanceUID"]: d for d in result["displaySets"]}
    thumbnails = {t["id"] for t in result["thumbnails"]}
    for ds, modality in [*((k, "OT") for k in key_images), *((p, "DOC") for p in pdfs)]:
        shown = listed.get(str(ds.SeriesInstanceUID))
        assert shown is not None, f"OHIF does not list the {modality} series: {result['displaySets']}"
        assert shown["Modality"] == modality and shown["SOPClassUID"] == ds.SOPClassUID, shown
        assert not shown["unsupported"], f"OHIF cannot show the {modality} series: {shown}"
        assert f"thumbnail-{shown['displaySetInstanceUID']}" in thumbnails, \
            f"the study browser has no thumbnail of the {modality} series"
    for step in (s for s in result["steps"] if s["kind"] == "open"):
        assert "error" not in step, step["error"]
        assert not step["errorPage"], f"OHIF shows 'Something went wrong' for {step['name']}"
        assert not _errors(result, f"open {step['name']}"), _errors(result, f"open {step['name']}")

