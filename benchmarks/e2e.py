"""End to end: from the last CT instance acknowledged to its SEG and SR visible in a real PACS.

One command starts a real Orthanc (with its DICOMweb plugin, ``tests/orthanc.py``) and a real
node (``python -m dicomnode serve`` in its own process, ``tests/nodeproc.py``) with the
embedded defaults except: a STOW-RS destination pointing at that Orthanc, and a short quiet
period (``--quiet``, 1 s). A plain pynetdicom SCU then sends one CT series to the node, one
association, and notes when the last C-STORE response came back. Orthanc is polled every
50 ms until it holds the SEG and the SR of that study.

Printed, per round: the seconds from the last instance acknowledged to SEG and SR visible in
Orthanc, the same minus the quiet period, and their breakdown: how long after the last
instance the series was taken as a job (the quiet period plus the runner's poll), then each
stage as the job's own record has it (``dicomnode jobs --json``: ``read`` the spooled
instances, ``assemble``, ``segment``, ``radiomics``, ``predict``, ``report``, ``save``,
``deliver``), and what is left (bookkeeping, Orthanc indexing, polling). At the end, the
peak resident memory (``VmHWM``) of the node process and of any process it started
(radiomics workers).

Series (no patient in ``../shared/data`` has a 512 x 512 x 134 CT: the IBSI team cropped
the sarcoma CTs around the tumour):

- default: a held-out sarcoma patient of ``../shared/data/sts_cohort`` (``--case``, STS_036:
  68 slices of 192 x 192, 0.98 mm pixels, 3.27 mm slices, never trained on), its pixels and
  geometry unchanged, in the middle of a 134 x 512 x 512 grid of air (-1000 HU), sent
  uncompressed: a full-size series in which the shipped U-Net finds the one real tumour;
- ``--case phantom``: a 134 x 512 x 512 synthetic CT (:mod:`dicomnode.phantom`);
- ``--lesions N``: an RTSTRUCT with N lesions "drawn by a radiologist" (8 mm ellipsoids of
  soft tissue spread over the body) is sent right after the CT, so the node measures and reports those N lesions
  instead of running the U-Net (and writes a SEG of them): the case for the report stage's
  growth with the number of lesions.

``--smoke`` (for CI, seconds): a 20 x 96 x 96 phantom with a supplied one-lesion RTSTRUCT,
one round; its figures mean little. Times are printed, never asserted.

Usage (from the project root)::

    python3 benchmarks/e2e.py [--case STS_036|phantom] [--lesions N] [--rounds 1]
                              [--quiet 1.0] [--set section.key=value ...] [--keep] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from nodeproc import NodeProcess, query, write_config  # noqa: E402
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, free_port  # noqa: E402

COHORT = ROOT.parent / "shared" / "data" / "sts_cohort"
#: Stages as the job record names them, in the order they run.
STAGES = ("read", "assemble", "segment", "radiomics", "predict", "report", "save", "deliver")
AIR_HU = -1000.0
WAIT_SECONDS = 600


# -- series ----------------------------------------------------------------------------------
def _new_uids(datasets: list[Dataset], seed: str) -> list[Dataset]:
    """The series as a new study for node and PACS: new Study, Series, Frame of Reference and
    SOP Instance UIDs derived from ``seed``."""
    study = generate_uid(entropy_srcs=[seed, "study"])
    series = generate_uid(entropy_srcs=[seed, "series"])
    frame = generate_uid(entropy_srcs=[seed, "frame of reference"])
    for k, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, "instance", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return datasets


def sarcoma_in_canvas(case: str, slices: int, size: int) -> list[Dataset]:
    """The held-out patient's CT unchanged in the middle of a ``slices`` x ``size`` x ``size``
    grid of air, Explicit VR Little Endian. The slices added above and below copy the
    nearest slice's header (position moved along the stack) and hold air only."""
    folder = COHORT / case / "CT" / "image"
    if not folder.is_dir():
        sys.exit(f"{folder} not found (the sarcoma cohort, ../shared/data/sts_cohort); "
                 "use --case phantom")
    source = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    normal = np.cross(*np.reshape([float(v) for v in source[0].ImageOrientationPatient], (2, 3)))
    source.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    first = source[0]
    rows, columns = int(first.Rows), int(first.Columns)
    if slices < len(source) or size < max(rows, columns):
        sys.exit(f"{case} is {len(source)} x {rows} x {columns}: larger than the canvas")
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    row_dir = np.array([float(v) for v in first.ImageOrientationPatient[:3]])
    column_dir = np.array([float(v) for v in first.ImageOrientationPatient[3:]])
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    step = np.array([float(v) for v in source[1].ImagePositionPatient]) - p0
    top, left, before = (size - rows) // 2, (size - columns) // 2, (slices - len(source)) // 2
    pixels = [ds.pixel_array for ds in source]
    air = round((AIR_HU - float(first.RescaleIntercept)) / float(first.RescaleSlope))
    out = []
    for k in range(slices):
        j = k - before
        ds = copy.deepcopy(source[min(max(j, 0), len(source) - 1)])
        canvas = np.full((size, size), air, dtype=pixels[0].dtype)
        if 0 <= j < len(source):
            canvas[top:top + rows, left:left + columns] = pixels[j]
        position = p0 + j * step - left * column_mm * row_dir - top * row_mm * column_dir
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        if "SliceLocation" in ds:
            ds.SliceLocation = round(float(np.dot(normal, position)), 4)
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = size
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        del ds.PixelData  # the JPEG-LS element (OB, undefined length): replaced, not edited
        ds.PixelData = canvas.tobytes()
        ds["PixelData"].VR = "OW"
        out.append(ds)
    return out


def phantom(shape: tuple[int, int, int]) -> list[Dataset]:
    from dicomnode.phantom import make_phantom_study

    # 0.8 mm pixels and 2.5 mm slices: a usual diagnostic CT at 512 x 512.
    spacing = (2.5, 0.8, 0.8) if shape[1] >= 256 else (2.5, 1.5, 1.5)
    return [copy.deepcopy(ds) for ds in make_phantom_study(10134, shape=shape, spacing=spacing,
                                                           n_lesions=1).datasets]


def _hu(datasets: list[Dataset]) -> np.ndarray:
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                     for ds in datasets])


def lesion_labels(hu: np.ndarray, spacing: tuple[float, float, float], n: int) -> np.ndarray:
    """``n`` ellipsoids of 8 mm radius inside the body (soft tissue around their centres),
    spread over it: centres on a grid over the body's bounding box, every other one skipped
    until ``n`` remain."""
    radius = np.maximum(np.round(8.0 / np.asarray(spacing)).astype(int), 1)
    offsets = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball = sum((o / r) ** 2 for o, r in zip(offsets, radius)) <= 1.0
    body = np.argwhere(hu > -500)
    low, high = body.min(axis=0) + radius, body.max(axis=0) - radius
    step = np.maximum(2 * radius + 2, 1)
    grid = np.stack(np.meshgrid(*(np.arange(lo, hi + 1, s) for lo, hi, s in zip(low, high, step)),
                                indexing="ij"), axis=-1).reshape(-1, 3)
    inside = [tuple(c) for c in grid
              if (hu[tuple(slice(a - r, a + r + 1) for a, r in zip(c, radius))][ball] > -200).all()]
    if len(inside) < n:
        sys.exit(f"room for {len(inside)} lesions of 8 mm in this body, not {n}")
    labels = np.zeros(hu.shape, dtype=np.uint8)
    for label, k in enumerate(np.linspace(0, len(inside) - 1, n).round().astype(int), start=1):
        box = tuple(slice(c - r, c + r + 1) for c, r in zip(inside[k], radius))
        labels[box][ball] = label
    return labels


def supplied_rtstruct(ct: list[Dataset], n: int) -> Dataset:
    """An RTSTRUCT with ``n`` lesions (closed planar contours, one per slice) drawn on ``ct``,
    as a radiologist's arrives: the node measures them and writes a SEG of them."""
    from dicomnode.report.keyslice import outline

    first = ct[0]
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    row_dir = np.array([float(v) for v in first.ImageOrientationPatient[:3]])
    column_dir = np.array([float(v) for v in first.ImageOrientationPatient[3:]])
    spacing = (float(np.linalg.norm(np.subtract([float(v) for v in ct[1].ImagePositionPatient],
                                                [float(v) for v in first.ImagePositionPatient]))),
               row_mm, column_mm)
    labels = lesion_labels(_hu(ct), spacing, n)

    def item(**values: object) -> Dataset:
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    rs = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID"):
        setattr(rs, keyword, first.get(keyword, ""))
    rs.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    rs.SOPInstanceUID, rs.SeriesInstanceUID = generate_uid(), generate_uid()
    rs.Modality, rs.SeriesNumber, rs.InstanceNumber = "RTSTRUCT", 300, 1
    rs.Manufacturer, rs.OperatorsName = "benchmark", "Radiologist^Benchmark"
    now = datetime.datetime.now()
    rs.StructureSetLabel = "LESIONS"
    rs.StructureSetDate = rs.ContentDate = now.strftime("%Y%m%d")
    rs.StructureSetTime = rs.ContentTime = now.strftime("%H%M%S")
    images = [item(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ds.SOPInstanceUID)
              for ds in ct]
    rs.ReferencedFrameOfReferenceSequence = [item(
        FrameOfReferenceUID=first.FrameOfReferenceUID,
        RTReferencedStudySequence=[item(
            ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
            ReferencedSOPInstanceUID=first.StudyInstanceUID,
            RTReferencedSeriesSequence=[item(SeriesInstanceUID=first.SeriesInstanceUID,
                                             ContourImageSequence=images)])])]
    rois, contours, observations = [], [], []
    for label in range(1, int(labels.max()) + 1):
        rois.append(item(ROINumber=label, ReferencedFrameOfReferenceUID=first.FrameOfReferenceUID,
                         ROIName=f"Lesion {label}", ROIGenerationAlgorithm="MANUAL"))
        sequence = []
        for z in np.flatnonzero((labels == label).any(axis=(1, 2))):
            columns_rows = outline(labels[z] == label) - 0.5  # pixel indices (column, row)
            origin = np.array([float(v) for v in ct[z].ImagePositionPatient])
            points = (origin + np.outer(columns_rows[:-1, 0] * column_mm, row_dir)
                      + np.outer(columns_rows[:-1, 1] * row_mm, column_dir))
            sequence.append(item(
                ContourImageSequence=[images[z]], ContourGeometricType="CLOSED_PLANAR",
                NumberOfContourPoints=len(points),
                ContourData=[round(float(v), 3) for v in points.ravel()]))
        contours.append(item(ReferencedROINumber=label, ROIDisplayColor=[255, 0, 0],
                             ContourSequence=sequence))
        observations.append(item(ObservationNumber=label, ReferencedROINumber=label,
                                 RTROIInterpretedType="GTV", ROIInterpreter=""))
    rs.StructureSetROISequence, rs.ROIContourSequence = rois, contours
    rs.RTROIObservationsSequence = observations
    rs.file_meta = pydicom.dataset.FileMetaDataset()
    rs.file_meta.MediaStorageSOPClassUID = rs.SOPClassUID
    rs.file_meta.MediaStorageSOPInstanceUID = rs.SOPInstanceUID
    rs.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return rs


# -- the run ---------------------------------------------------------------------------------
def send(datasets: list[Dataset], port: int, ae_title: str) -> float:
    """C-STORE every instance in one association; the time.time() of the last response."""
    from pynetdicom import AE

    ae = AE(ae_title="E2EBENCH")
    ae.maximum_pdu_size = 0
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        sys.exit("the node refused the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status.get("Status") != 0:
                sys.exit(f"C-STORE answered {status.get('Status')!r}")
        return time.time()
    finally:
        assoc.release()


def modalities(pacs: Orthanc, study_uid: str) -> set[str]:
    found = requests.post(f"{pacs.http_url}/tools/find", timeout=10, json={
        "Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).json()
    return {s["MainDicomTags"].get("Modality", "") for s in found}


def job_row(data_dir: Path, study_uid: str) -> tuple[str, str, str] | None:
    rows = query(data_dir / "jobs.sqlite", "SELECT id, state, reason FROM jobs WHERE "
                 "study_uid = ? ORDER BY created_at DESC LIMIT 1", (study_uid,))
    return rows[0] if rows else None


@dataclass
class Round:
    lesions: str
    total: float
    quiet: float
    taken_after: float
    started_after: float
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def other(self) -> float:
        return self.total - self.taken_after - self.started_after - sum(self.seconds.values())


def one_round(pacs: Orthanc, node: NodeProcess, data_dir: Path, datasets: list[Dataset],
              quiet: float) -> Round:
    study_uid = str(datasets[0].StudyInstanceUID)
    last_ack = send(datasets, node.port, "DICOMNODE")
    deadline = time.monotonic() + WAIT_SECONDS
    visible = None
    while time.monotonic() < deadline:
        row = job_row(data_dir, study_uid)
        if row is not None and row[1] == "failed":
            sys.exit(f"job failed: {row[2]}\n{node.log_tail()}")
        held = modalities(pacs, study_uid)
        no_lesion = row is not None and row[1] == "delivered" and row[2].startswith("0 lesion")
        if "SR" in held and ("SEG" in held or no_lesion):
            visible = time.time()
            break
        time.sleep(0.05)
    if visible is None:
        sys.exit(f"no SEG and SR in Orthanc within {WAIT_SECONDS} s\n{node.log_tail()}")
    while job_row(data_dir, study_uid)[1] != "delivered":  # its record is written just after
        time.sleep(0.05)
    job_id = job_row(data_dir, study_uid)[0]
    job = next(j for j in node.jobs() if j["id"] == job_id)
    (running_at,) = query(data_dir / "jobs.sqlite", "SELECT MIN(at) FROM journal WHERE "
                          "job_id = ? AND to_state = 'running'", (job_id,))[0]
    reported = next((r for _, r in query(data_dir / "jobs.sqlite", "SELECT to_state, reason "
                     "FROM journal WHERE job_id = ? AND to_state = 'delivering'", (job_id,))), "")
    return Round(lesions=reported.split(" ")[0], total=visible - last_ack, quiet=quiet,
                 taken_after=job["created_at"] - last_ack, started_after=running_at - job["created_at"],
                 seconds={k: float(v) for k, v in job["seconds"].items()})


def peak_rss_mb(pid: int) -> tuple[float, float, int]:
    """VmHWM of ``pid`` and the sum of its descendants' (MB), and how many descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue

    def hwm(p: int) -> float:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    descendants, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        descendants.append(p)
        todo.extend(children.get(p, []))
    return hwm(pid), sum(hwm(p) for p in descendants), len(descendants)


def print_rounds(rounds: list[Round]) -> None:
    header = "| | " + " | ".join(f"round {k}" for k in range(1, len(rounds) + 1)) + " |"
    print(header)
    print("|---|" + "---:|" * len(rounds))

    def row(name: str, values: list[float], unit: str = "s") -> None:
        print(f"| {name} | " + " | ".join(f"{v:.2f} {unit}" for v in values) + " |")

    print("| lesions reported | " + " | ".join(r.lesions for r in rounds) + " |")
    row("**last instance acknowledged -> SEG and SR in Orthanc**", [r.total for r in rounds])
    row("**the same minus the quiet period**", [r.total - r.quiet for r in rounds])
    row("series taken as a job (quiet period + runner poll)", [r.taken_after for r in rounds])
    row("job started", [r.started_after for r in rounds])
    for stage in STAGES:
        if any(stage in r.seconds for r in rounds):
            row(stage, [r.seconds.get(stage, 0.0) for r in rounds])
    row("other (bookkeeping, Orthanc, polling)", [r.other for r in rounds])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="STS_036",
                        help="a held-out sts_cohort patient, or 'phantom' (default STS_036)")
    parser.add_argument("--lesions", type=int, default=0,
                        help="0: the U-Net finds them; N: a supplied RTSTRUCT with N lesions")
    parser.add_argument("--rounds", type=int, default=1, help="series sent one after another")
    parser.add_argument("--quiet", type=float, default=1.0, help="completion.quiet_seconds")
    parser.add_argument("--slices", type=int, default=134)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another node setting (TOML value), e.g. radiomics.workers=1")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--smoke", action="store_true", help="tiny phantom, one round (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.case, args.lesions, args.rounds, args.quiet = "phantom", 1, 1, 0.5
        args.slices, args.size = 20, 96
    if not (ORTHANC.exists() and DICOMWEB_PLUGIN.exists()):
        sys.exit("Orthanc with the DICOMweb plugin is not installed (bash docker/install.sh --test)")

    sections: dict[str, dict] = {"completion": {"quiet_seconds": args.quiet}}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        try:
            import tomllib
            parsed = tomllib.loads(f"v = {value}")["v"]
        except ValueError:
            parsed = value
        sections.setdefault(section, {})[name] = parsed

    started = time.perf_counter()
    if args.case == "phantom":
        template = phantom((args.slices, args.size, args.size))
        what = f"phantom {args.slices}x{args.size}x{args.size}"
    else:
        template = sarcoma_in_canvas(args.case, args.slices, args.size)
        what = (f"{args.case} (real sarcoma CT, never trained on) unchanged in a "
                f"{args.slices}x{args.size}x{args.size} grid of air")
    what += (f", {args.lesions} lesion(s) in a supplied RTSTRUCT (no U-Net)" if args.lesions
             else ", lesions found by the U-Net")
    print(f"series: {what}; made in {time.perf_counter() - started:.1f} s")
    print(f"machine: {len(os.sched_getaffinity(0))} CPU(s), load average "
          f"{os.getloadavg()[0]:.2f} at start, {datetime.date.today()}")

    work = Path(tempfile.mkdtemp(prefix="dicomnode-e2e-"))
    pacs = node = None
    try:
        pacs = Orthanc(work / "orthanc").start()
        port = free_port()
        config = write_config(
            work / "node.toml", port=port, data_dir=work / "node",
            destinations=[{"kind": "stow", "name": "orthanc", "url": pacs.dicomweb_url}],
            **sections,
        )
        started = time.perf_counter()
        node = NodeProcess(config, port, work / "node.log").start(timeout=180)
        print(f"node listening {time.perf_counter() - started:.1f} s after its start "
              f"(models loaded)")
        rounds = []
        for k in range(args.rounds):
            datasets = _new_uids([copy.deepcopy(ds) for ds in template],
                                 f"e2e-{uuid.uuid4().hex}-{k}")
            if args.lesions:
                datasets.append(supplied_rtstruct(datasets, args.lesions))
            rounds.append(one_round(pacs, node, work / "node", datasets, args.quiet))
            print(f"round {k + 1}: {rounds[-1].total - args.quiet:.2f} s from the last instance "
                  f"to SEG and SR in Orthanc, quiet period excluded", flush=True)
        node_mb, children_mb, children = peak_rss_mb(node.process.pid)
        print()
        print_rounds(rounds)
        print()
        if len(rounds) > 1:
            median = statistics.median(r.total - r.quiet for r in rounds)
            print(f"median of {len(rounds)} rounds, quiet period excluded: {median:.2f} s")
        print(f"node peak RSS: {node_mb:.0f} MB"
              + (f" (+ {children_mb:.0f} MB peak in {children} process(es) it started)"
                 if children else ""))
    finally:
        if node is not None:
            node.stop()
        if pacs is not None:
            pacs.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
