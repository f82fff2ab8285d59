"""Cohorts: a CSV with one row per case or lesion, and how one row becomes arrays.

A cohort CSV names, per row, a ``case_id``, an ``image``, a lesion ``mask`` and whatever
target columns a command needs (``tmb``, ``label``, ...); ``docs/cohorts.md`` is the
format's reference. :func:`read_cohort` checks the file and returns :class:`CohortRow` s;
:func:`load_case` turns one row into a :class:`CaseImage`: HU and masks on one ``(z, y, x)``
grid, ready for :meth:`dicomnode.analyse.measure.Measurer.measure_arrays`.

Images: a folder of DICOM CT files (assembled by :func:`dicomnode.assemble.assemble`, with
all its checks), one Enhanced CT file, a NIfTI/NRRD/MetaImage volume (read by SimpleITK), or
``dicomweb:<StudyInstanceUID>/<SeriesInstanceUID>`` fetched from a PACS with QIDO-RS and
WADO-RS (:class:`DicomwebSource`).

Masks: a label map volume (NIfTI/NRRD/MetaImage) on the image's grid, a DICOM SEG, a DICOM
RTSTRUCT, or a SEG/RTSTRUCT series on the PACS. Every mask is placed on the image grid in
patient coordinates (LPS, mm): a label map may store its axes in another order or direction
(e.g. ``dcm2niix`` output next to the DICOM series it came from) and is reoriented, but it
must cover the same voxels; SEG frames go to the slice at their Plane Position; RTSTRUCT
contours are filled on the slice they lie on.

Every problem is a :class:`~dicomnode.errors.CohortError` whose message names the file, line
and column (reading the CSV) or the case (loading it), and says what is wrong.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import pydicom
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.assemble import assemble
from dicomnode.config import AssemblyConfig, DestinationConfig
from dicomnode.deliver.stow import StowDestination, authenticated_session
from dicomnode.errors import AssemblyError, CohortError, ConfigError, MaskError
from dicomnode.masks import (
    ON_GRID_VOXELS,
    PARALLEL,
    ImageGrid,
    dims_text,
    mm_text,
    rtstruct_mask,
    seg_mask,
)
from dicomnode.types import Geometry

#: Columns every cohort needs, and the optional ones :class:`CohortRow` reads by name.
REQUIRED_COLUMNS = ("case_id", "image", "mask")
OPTIONAL_COLUMNS = ("roi", "mask_label", "organ_mask")
#: Prefix of a reference to a series on the PACS: ``dicomweb:<study UID>/<series UID>``.
DICOMWEB_PREFIX = "dicomweb:"
#: File names SimpleITK reads as one volume (anything else is read as DICOM).
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_HTTP_MEANINGS = {401: "wrong or missing credentials", 403: "not allowed", 404: "not found"}


# --------------------------------------------------------------------------------------------
# The CSV
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortRow:
    """One row of a cohort CSV, as written (paths are resolved by :func:`load_case`).

    Attributes
    ----------
    case_id:
        The case (patient, lesion) this row describes.
    image, mask:
        Where the image and the lesion mask are: a path (relative paths are relative to the
        CSV's folder) or ``dicomweb:<StudyInstanceUID>/<SeriesInstanceUID>``.
    roi:
        Column ``roi``: the RTSTRUCT ROI name, or the SEG segment label or number, of the
        lesion; ``None`` when the column is absent or empty.
    mask_label:
        Column ``mask_label``: the lesion's voxel value in a label-map mask; ``None`` takes
        every non-zero voxel.
    organ_mask:
        Column ``organ_mask``: an optional mask of the organ around the lesion (same kinds
        as ``mask``; every segment, the only ROI, or every non-zero voxel of it counts).
    targets:
        Every other column, raw text (e.g. ``tmb``, ``label``).
    line:
        Line of the CSV the row starts on, for messages.
    """

    case_id: str
    image: str
    mask: str
    roi: str | None
    mask_label: int | None
    organ_mask: str | None
    targets: Mapping[str, str] = field(hash=False)
    line: int

    @property
    def description(self) -> str:
        """How messages name the row: case, lesion selection and line."""
        parts = [f"case {self.case_id!r}"]
        if self.roi is not None:
            parts.append(f"roi {self.roi!r}")
        if self.mask_label is not None:
            parts.append(f"mask_label {self.mask_label}")
        return f"{' '.join(parts)} (line {self.line})"


def read_cohort(path: Path) -> tuple[CohortRow, ...]:
    """Read and check a cohort CSV.

    Parameters
    ----------
    path:
        UTF-8 CSV (a byte-order mark from a spreadsheet is fine) with a header row holding
        at least ``case_id``, ``image`` and ``mask``. Blank lines are skipped.

    Returns
    -------
    tuple of CohortRow
        In file order.

    Raises
    ------
    CohortError
        The file cannot be read, a column is missing or repeated, a row has the wrong number
        of cells, a required cell is empty, ``mask_label`` is not a positive integer, a
        ``dicomweb:`` reference is malformed, or two rows describe the same lesion (same
        ``case_id``, ``roi`` and ``mask_label``). The message names file, line and column.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _parse_rows(path, handle)
    except FileNotFoundError:
        raise CohortError(f"{path}: cohort file not found") from None
    except UnicodeDecodeError as exc:
        raise CohortError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise CohortError(f"{path}: not a valid CSV file: {exc}") from None


def _parse_rows(path: Path, handle: TextIO) -> tuple[CohortRow, ...]:
    reader = csv.reader(handle)
    header = [cell.strip() for cell in next(reader, [])]
    _check_header(path, header)
    rows: list[CohortRow] = []
    first_line: dict[tuple[str, str | None, int | None], int] = {}
    line = reader.line_num + 1
    for cells in reader:
        if any(cell.strip() for cell in cells):
            row = _row(path, line, header, [cell.strip() for cell in cells])
            identity = (row.case_id, row.roi, row.mask_label)
            if identity in first_line:
                raise CohortError(
                    f"{path}, line {line}: {row.description} repeats line "
                    f"{first_line[identity]}; give each lesion of a case its own roi or mask_label"
                )
            first_line[identity] = line
            rows.append(row)
        line = reader.line_num + 1
    if not rows:
        raise CohortError(f"{path}: the cohort has a header but no rows")
    return tuple(rows)


def _check_header(path: Path, header: list[str]) -> None:
    if not any(header):
        raise CohortError(f"{path}: the file is empty; line 1 must name the columns")
    repeated = sorted(name for name, n in Counter(header).items() if n > 1)
    if repeated:
        raise CohortError(f"{path}, line 1: column {repeated[0]!r} appears more than once")
    if "" in header:
        raise CohortError(f"{path}, line 1: column {header.index('') + 1} has no name")
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise CohortError(
            f"{path}, line 1: missing column {missing[0]!r} (a cohort needs "
            f"{', '.join(REQUIRED_COLUMNS)}; found {', '.join(header)})"
        )


def _row(path: Path, line: int, header: list[str], cells: list[str]) -> CohortRow:
    if len(cells) != len(header):
        raise CohortError(
            f"{path}, line {line}: {len(cells)} cells for {len(header)} columns "
            "(a comma inside a value needs quotes)"
        )
    values = dict(zip(header, cells, strict=True))
    for name in REQUIRED_COLUMNS:
        if not values[name]:
            raise CohortError(f"{path}, line {line}, column {name!r}: empty")
    for name in ("image", "mask", "organ_mask"):
        if values.get(name, "").startswith(DICOMWEB_PREFIX):
            _dicomweb_uids(values[name], f"{path}, line {line}, column {name!r}")
    return CohortRow(
        case_id=values["case_id"],
        image=values["image"],
        mask=values["mask"],
        roi=values.get("roi") or None,
        mask_label=_mask_label(values.get("mask_label", ""), f"{path}, line {line}"),
        organ_mask=values.get("organ_mask") or None,
        targets={k: v for k, v in values.items()
                 if k not in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)},
        line=line,
    )


def _mask_label(text: str, where: str) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise CohortError(
            f"{where}, column 'mask_label': {text!r} is not a positive whole number (the "
            "lesion's voxel value in the label map; leave it empty for every non-zero voxel)"
        )
    return value


def _dicomweb_uids(text: str, where: str) -> tuple[str, str]:
    """``(study UID, series UID)`` of ``dicomweb:<study>/<series>``."""
    study, _, series = text[len(DICOMWEB_PREFIX):].partition("/")
    for uid, what in ((study, "StudyInstanceUID"), (series, "SeriesInstanceUID")):
        if not (_UID.match(uid) and len(uid) <= 64):
            raise CohortError(
                f"{where}: {text!r} is not dicomweb:<StudyInstanceUID>/<SeriesInstanceUID> "
                f"({what} {uid!r} is not a UID: digits and dots, at most 64 characters)"
            )
    return study, series


# --------------------------------------------------------------------------------------------
# The PACS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb server that ``dicomweb:`` references are fetched from.

    The server and its credentials are described exactly like a STOW-RS destination
    (``url``, ``username`` with ``password_env``/``password_file``, or ``token_env``/
    ``token_file`` for a bearer token, ``ca_file``, ``timeout_seconds``), and the
    authenticated session is built by the same code (:class:`~dicomnode.deliver.stow.
    StowDestination`), so secrets are read from the environment or a file, never the CSV.
    Picklable: worker processes fetch their own cases.
    """

    server: DestinationConfig

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str = "",
        password_env: str = "",
        password_file: str = "",
        token_env: str = "",
        token_file: str = "",
        ca_file: str = "",
        timeout_seconds: float = 60.0,
    ) -> DicomwebSource:
        """A source for the DICOMweb root ``url`` (e.g. ``http://pacs:8042/dicom-web``).

        Raises
        ------
        ConfigError
            The URL is not http(s), or the credentials do not fit together (a password
            without a user, a user and a token).
        """
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"DICOMweb URL {url!r}: expected http:// or https://")
        if (password_env or password_file) and not username:
            raise ConfigError("a DICOMweb password needs a user name")
        if username and (token_env or token_file):
            raise ConfigError("give a DICOMweb user (with a password) or a token, not both")
        return cls(DestinationConfig(
            kind="stow", name="cohort PACS", url=url.rstrip("/"), username=username,
            password_env=password_env, password_file=password_file, token_env=token_env,
            token_file=token_file, ca_file=ca_file, timeout_seconds=timeout_seconds,
        ))

    @property
    def url(self) -> str:
        return self.server.url

    def retrieve_series(self, study_uid: str, series_uid: str) -> list[Dataset]:
        """Every instance of one series: found with QIDO-RS, fetched with WADO-RS.

        Raises
        ------
        CohortError
            The series is not on the server, or the server cannot be reached or refuses.
        ConfigError
            A secret named in the credentials is missing.
        """
        # Same session (credentials, CA) as STOW-RS; dicomweb-client's own retries stay on,
        # since a batch read can afford to wait out a busy server.
        server = StowDestination(self.server)
        client = DICOMwebClient(
            self.url, session=authenticated_session(self.server),
            timeout=self.server.timeout_seconds,
        )
        what = f"series {series_uid} of study {study_uid} on {server.url_for_logs}"
        try:
            found = client.search_for_series(
                study_uid, search_filters={"SeriesInstanceUID": series_uid}
            )
            if not found:
                raise CohortError(f"{what}: not found (QIDO-RS answered no match)")
            return client.retrieve_series(study_uid, series_uid)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            meaning = _HTTP_MEANINGS.get(status, "refused by the server")
            raise CohortError(f"{what}: HTTP {status} ({meaning})") from None
        except requests.RequestException as exc:
            raise CohortError(f"{what}: cannot fetch: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseImage:
    """One case's image and masks on one grid, ready to measure.

    Attributes
    ----------
    hu:
        ``(z, y, x)`` ``float32`` Hounsfield units.
    mask:
        ``(z, y, x)`` ``bool``: the lesion, on the image grid.
    spacing_zyx:
        Voxel spacing in mm.
    organ_mask:
        ``(z, y, x)`` ``bool`` organ mask, or ``None`` when the row names none.
    """

    case_id: str
    hu: np.ndarray
    mask: np.ndarray
    spacing_zyx: tuple[float, float, float]
    organ_mask: np.ndarray | None


def load_case(
    row: CohortRow,
    *,
    base_dir: Path,
    dicomweb: DicomwebSource | None = None,
    assembly: AssemblyConfig = AssemblyConfig(),  # noqa: B008 - frozen, safe to share
) -> CaseImage:
    """Load one cohort row: the image, the lesion mask and the organ mask, on one grid.

    Parameters
    ----------
    row:
        A row from :func:`read_cohort`.
    base_dir:
        Folder that relative paths in the row are relative to (the CSV's folder).
    dicomweb:
        Server for ``dicomweb:`` references; ``None`` when the cohort uses none.
    assembly:
        Checks a DICOM CT series must pass (minimum slice count, tolerances).

    Raises
    ------
    CohortError
        Naming the case, and saying what is wrong: a file is missing or unreadable, the
        series cannot be assembled, a mask is not on the image grid, the selected ROI or
        segment does not exist, the lesion mask is empty, the PACS cannot be reached, ...
    """
    try:
        image = _load_image(row.image, base_dir, dicomweb, assembly)
        lesion = _load_mask(row.mask, image, base_dir, dicomweb, row.roi, row.mask_label,
                            what="mask")
        if not lesion.any():
            raise CohortError(f"mask {row.mask!r}: the lesion mask is empty on the image grid")
        organ = None
        if row.organ_mask is not None:
            organ = _load_mask(row.organ_mask, image, base_dir, dicomweb, None, None,
                               what="organ_mask")
    except (CohortError, ConfigError, MaskError) as exc:
        raise CohortError(f"{row.description}: {exc}") from None
    return CaseImage(
        case_id=row.case_id,
        hu=image.hu,
        mask=lesion,
        spacing_zyx=image.geometry.spacing,
        organ_mask=organ,
    )


def _local_path(text: str, base_dir: Path, what: str) -> Path:
    path = Path(text).expanduser()
    path = path if path.is_absolute() else Path(base_dir) / path
    if not path.exists():
        raise CohortError(f"{what} {text!r}: {path} does not exist")
    return path


def _fetch(text: str, dicomweb: DicomwebSource | None, what: str) -> list[Dataset]:
    where = f"{what} {text!r}"
    study, series = _dicomweb_uids(text, where)
    if dicomweb is None:
        raise CohortError(f"{where} is on a PACS, but no DICOMweb server was given "
                          "(--dicomweb-url)")
    try:
        return dicomweb.retrieve_series(study, series)
    except CohortError as exc:
        raise CohortError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _load_image(
    text: str, base_dir: Path, dicomweb: DicomwebSource | None, assembly: AssemblyConfig
) -> ImageGrid:
    where = f"image {text!r}"
    if text.startswith(DICOMWEB_PREFIX):
        return _assembled(_fetch(text, dicomweb, "image"), where, assembly)
    path = _local_path(text, base_dir, "image")
    if path.is_dir():
        return _assembled(_ct_series_in(path, where), where, assembly)
    if _is_volume_file(path):
        return _volume_image(path, where)
    return _assembled([_read_dicom(path, where)], where, assembly)


def _assembled(datasets: Sequence[Dataset], where: str, assembly: AssemblyConfig) -> ImageGrid:
    cts = [ds for ds in datasets if str(ds.get("Modality", "")) == "CT"]
    if not cts:
        modalities = sorted({str(ds.get("Modality", "") or "?") for ds in datasets})
        raise CohortError(f"{where}: no CT image (found modality {', '.join(modalities)})")
    try:
        volume = assemble(cts, assembly)
    except AssemblyError as exc:
        raise CohortError(f"{where}: {exc}") from None
    return ImageGrid(volume.hu, volume.geometry, volume.frame_of_reference_uid)


def _ct_series_in(folder: Path, where: str) -> list[Dataset]:
    """The CT instances under ``folder``, which must hold exactly one CT series.

    Other DICOM objects (a SEG or RTSTRUCT kept next to the images) and non-DICOM files are
    ignored.
    """
    by_series: dict[str, list[Dataset]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(ds.get("Modality", "")) == "CT":
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not by_series:
        raise CohortError(f"{where}: no CT DICOM file in {folder}")
    if len(by_series) > 1:
        shown = "; ".join(f"{uid or '(no UID)'}: {len(s)} files" for uid, s in by_series.items())
        raise CohortError(
            f"{where}: {folder} holds {len(by_series)} CT series ({shown}); give one folder "
            "per series"
        )
    return next(iter(by_series.values()))


def _read_dicom(path: Path, where: str) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise CohortError(
            f"{where}: {path} is not a DICOM file ({exc}) nor a volume "
            f"({', '.join(VOLUME_SUFFIXES)})"
        ) from None


def _is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def _read_volume(path: Path, where: str) -> tuple[np.ndarray, Geometry]:
    """A NIfTI/NRRD/MetaImage volume as a ``(z, y, x)`` array and its patient geometry.

    SimpleITK reports origin and direction in LPS (it converts NIfTI's RAS), the patient
    coordinate system of DICOM, so the geometry compares directly with a DICOM series.
    """
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise CohortError(f"{where}: SimpleITK cannot read {path}: {_itk_reason(exc)}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CohortError(
            f"{where}: {path} is a {image.GetDimension()}D image with "
            f"{image.GetNumberOfComponentsPerPixel()} value(s) per voxel; a 3D scalar volume "
            "is needed"
        )
    directions = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-3):
        raise CohortError(f"{where}: {path} has a sheared grid (its axes are not orthogonal)")
    sx, sy, sz = image.GetSpacing()
    geometry = Geometry(
        origin=tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
        # SimpleITK's array is (k, j, i): x runs along ITK's first axis, z along its third.
        row_direction=tuple(float(v) for v in directions[:, 0]),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in directions[:, 1]),  # type: ignore[arg-type]
        slice_direction=tuple(float(v) for v in directions[:, 2]),  # type: ignore[arg-type]
        spacing=(float(sz), float(sy), float(sx)),
    )
    return sitk.GetArrayFromImage(image), geometry


def _volume_image(path: Path, where: str) -> ImageGrid:
    array, geometry = _read_volume(path, where)
    return ImageGrid(array.astype(np.float32, copy=False), geometry, "")


def _itk_reason(exc: Exception) -> str:
    """The last line of an ITK exception: the lines before it are source file and line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _load_mask(
    text: str,
    image: ImageGrid,
    base_dir: Path,
    dicomweb: DicomwebSource | None,
    roi: str | None,
    mask_label: int | None,
    *,
    what: str,
) -> np.ndarray:
    """The selected structure of a mask reference as a ``bool`` array on the image grid.

    ``what`` is "mask" for the lesion (``roi``/``mask_label`` select it) or "organ_mask"
    (every segment or non-zero voxel).
    """
    where = f"{what} {text!r}"
    if text.startswith(DICOMWEB_PREFIX):
        datasets = [ds for ds in _fetch(text, dicomweb, what)
                    if str(ds.get("Modality", "")) in ("SEG", "RTSTRUCT")]
        if len(datasets) != 1:
            raise CohortError(
                f"{where}: the series holds {len(datasets)} SEG/RTSTRUCT instances, expected 1"
            )
        return _dicom_mask(datasets[0], image, roi, mask_label, where)
    path = _local_path(text, base_dir, what)
    if path.is_dir():
        raise CohortError(f"{where}: {path} is a folder; a mask is one SEG, RTSTRUCT or "
                          "label-map file")
    if _is_volume_file(path):
        if roi is not None:
            raise CohortError(
                f"{where}: roi {roi!r} selects an RTSTRUCT ROI or a SEG segment; a label "
                "map's lesion is chosen by mask_label"
            )
        return _label_map_mask(path, image, mask_label, where)
    return _dicom_mask(_read_dicom(path, where), image, roi, mask_label, where)


def _dicom_mask(
    ds: Dataset, image: ImageGrid, roi: str | None, mask_label: int | None, where: str
) -> np.ndarray:
    if mask_label is not None:
        raise CohortError(
            f"{where}: mask_label {mask_label} selects a value of a label map; a SEG "
            "segment or RTSTRUCT ROI is chosen by roi"
        )
    modality = str(ds.get("Modality", ""))
    if modality == "SEG":
        return seg_mask(ds, image, roi, where)
    if modality == "RTSTRUCT":
        return rtstruct_mask(ds, image, roi, where)
    raise CohortError(f"{where}: a {modality or 'DICOM object without modality'} is not a "
                      "SEG or an RTSTRUCT")


# ----------------------------------------------------------------------------- label maps


def _label_map_mask(path: Path, image: ImageGrid, label: int | None, where: str) -> np.ndarray:
    array, geometry = _read_volume(path, where)
    labels = _on_image_grid(array, geometry, image, where)
    if label is None:
        return labels != 0
    lesion = labels == label
    if not lesion.any():
        present = np.unique(labels[labels != 0])[:10]
        raise CohortError(
            f"{where}: no voxel has the value mask_label {label} (values present: "
            f"{', '.join(str(v) for v in present) or 'none'})"
        )
    return lesion


def _axes(geometry: Geometry) -> np.ndarray:
    """Rows: unit vectors along which ``z``, ``y`` and ``x`` grow."""
    return np.array([geometry.slice_direction, geometry.column_direction,
                     geometry.row_direction], dtype=np.float64)


def _on_image_grid(array: np.ndarray, geometry: Geometry, image: ImageGrid, where: str) -> np.ndarray:
    """``array`` reordered and flipped onto the image's ``(z, y, x)``, or an error.

    A volume converted from the same series may store its axes in another order or
    direction; it is still on the image grid when its voxel centres are the image's.
    """
    cosines = _axes(image.geometry) @ _axes(geometry).T
    order = np.argmax(np.abs(cosines), axis=1)
    parallel = np.abs(cosines[np.arange(3), order]) >= PARALLEL
    if not parallel.all() or sorted(order) != [0, 1, 2]:
        raise CohortError(
            f"{where}: its axes are rotated against the image's; resample the mask onto the "
            "image first"
        )
    array = np.transpose(array, order)
    spacing = np.asarray(geometry.spacing)[order]
    origin = np.asarray(geometry.origin, dtype=np.float64)
    for axis in range(3):
        if cosines[axis, order[axis]] < 0:
            # Its last voxel along this axis is the image's first.
            array = np.flip(array, axis)
            origin = origin + _axes(geometry)[order[axis]] * spacing[axis] * (array.shape[axis] - 1)
    problems = []
    if array.shape != image.shape:
        problems.append(f"size (z, y, x) {dims_text(array.shape)}, image {dims_text(image.shape)}")
    if not np.allclose(spacing, image.geometry.spacing, rtol=1e-3):
        problems.append(f"spacing {mm_text(spacing)} mm, image {mm_text(image.geometry.spacing)} mm")
    offset = image.to_index(origin[None, :])[0]
    if np.abs(offset).max() > ON_GRID_VOXELS:
        problems.append(f"first voxel at {mm_text(origin)} mm, image "
                        f"{mm_text(image.geometry.origin)} mm")
    if problems:
        raise CohortError(
            f"{where}: not on the image grid ({'; '.join(problems)}); resample the mask onto "
            "the image first"
        )
    return np.ascontiguousarray(array)
