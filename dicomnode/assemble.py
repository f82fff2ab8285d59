"""Assemble the instances of one CT series into a Hounsfield-unit volume.

PURE: no disk writes, no network. The input datasets are never modified; the volume keeps
header-only copies of them.

Two kinds of input are accepted (PS3.3 A.3 and A.38):

- single-frame CT Image Storage instances, one slice each;
- one Enhanced (or Legacy Converted Enhanced) CT Image Storage instance whose frames are
  placed by the Plane Position / Plane Orientation functional groups (PS3.3 C.7.6.16.2) and
  rescaled by the Pixel Value Transformation functional group (PS3.3 C.7.6.16.2.9).

Everything that would make the volume geometrically wrong is refused with an
:class:`~dicomnode.errors.AssemblyError` whose message says what is wrong in words a person at
a PACS can act on: localizers, too few slices, mixed series/orientations/frames of reference,
inconsistent matrices or pixel spacing, duplicate positions, gantry tilt, missing slices (a
*gap*) and irregular spacing. A gap is reported apart from irregular spacing because the
series-completion code waits longer for a gap (the missing slice may still be on its way);
:func:`stack_gaps` is the one place that tells them apart.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
)

from dicomnode.config import AssemblyConfig
from dicomnode.errors import AssemblyError
from dicomnode.types import Geometry, SeriesKey, Volume

_MULTI_FRAME_CT = frozenset({EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage})
_CT_SOP_CLASSES = frozenset({CTImageStorage}) | _MULTI_FRAME_CT
#: Pixel data elements dropped from the header-only copies kept in ``Volume.sources``.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: Two positions closer than this (mm) along the normal are the same position.
_SAME_POSITION_MM = 1e-3


# --------------------------------------------------------------------------------------------
# Stack spacing: shared with series completion
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gap:
    """Missing slices between two consecutive positions of a stack.

    Attributes
    ----------
    after_index:
        Index (in sorted order) of the slice before the gap.
    start_mm, end_mm:
        Positions along the slice normal on both sides of the gap.
    missing:
        How many slices would fill it at the median spacing.
    """

    after_index: int
    start_mm: float
    end_mm: float
    missing: int


@dataclass(frozen=True)
class StackCheck:
    """Result of :func:`stack_gaps`.

    Attributes
    ----------
    complete:
        No gap and no irregular step: the stack is evenly spaced.
    gaps:
        Steps that are a whole multiple (>= 2) of the median spacing: slices are missing.
    irregular:
        Indices ``k`` (sorted order) of steps ``k -> k+1`` that are neither the median spacing
        nor a whole multiple of it.
    median_spacing:
        Median distance between consecutive positions (mm); 0 with fewer than two positions.
    """

    complete: bool
    gaps: tuple[Gap, ...]
    irregular: tuple[int, ...]
    median_spacing: float

    @property
    def missing_slices(self) -> int:
        return sum(g.missing for g in self.gaps)


def stack_gaps(positions: Sequence[float] | NDArray[np.floating], tolerance: float) -> StackCheck:
    """Check that slice positions along the normal are evenly spaced.

    Parameters
    ----------
    positions:
        Slice positions along the slice normal (mm), in any order.
    tolerance:
        Largest relative deviation of a step from the median step (e.g. ``0.1`` = 10 %). A step
        within ``tolerance`` of ``n`` times the median (``n >= 2``) is a gap of ``n - 1``
        slices; any other deviating step is irregular.

    Returns
    -------
    StackCheck
    """
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    if len(ordered) < 2:
        return StackCheck(True, (), (), 0.0)
    steps = np.diff(ordered)
    median = float(np.median(steps))
    if median <= 0:
        return StackCheck(False, (), tuple(range(len(steps))), median)
    gaps: list[Gap] = []
    irregular: list[int] = []
    for k, step in enumerate(steps):
        ratio = step / median
        multiple = round(ratio)
        if abs(ratio - 1) <= tolerance:
            continue
        if multiple >= 2 and abs(ratio - multiple) <= tolerance * multiple:
            gaps.append(Gap(k, float(ordered[k]), float(ordered[k + 1]), multiple - 1))
        else:
            irregular.append(k)
    return StackCheck(not gaps and not irregular, tuple(gaps), tuple(irregular), median)


# --------------------------------------------------------------------------------------------
# Per-slice description: single-frame instances and frames of a multi-frame instance alike
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """What assembly needs to know about one slice, wherever it came from."""

    source: int  # index into the input datasets
    frame: int  # 1-based frame number, 0 for a single-frame instance
    position: NDArray[np.float64]
    orientation: NDArray[np.float64]  # 6 direction cosines
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    label: str  # how a person finds it: instance number or frame number

    @property
    def normal(self) -> NDArray[np.float64]:
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)


def _floats(value: Any, n: int, name: str, where: str) -> NDArray[np.float64]:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise AssemblyError(f"{where}: {name} is not numeric ({value!r})") from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise AssemblyError(f"{where}: {name} must hold {n} numbers, found {value!r}")
    return out


def _required(ds: Dataset, keyword: str, where: str) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise AssemblyError(f"{where}: {keyword} is missing")
    return value


def _instance_label(ds: Dataset, index: int) -> str:
    number = ds.get("InstanceNumber")
    return f"instance {number}" if number not in (None, "") else f"instance #{index + 1} received"


def _single_frame_slice(ds: Dataset, index: int) -> _Slice:
    where = _instance_label(ds, index)
    orientation = _floats(_required(ds, "ImageOrientationPatient", where), 6,
                          "ImageOrientationPatient", where)
    spacing = _floats(_required(ds, "PixelSpacing", where), 2, "PixelSpacing", where)
    return _Slice(
        source=index,
        frame=0,
        position=_floats(_required(ds, "ImagePositionPatient", where), 3, "ImagePositionPatient",
                         where),
        orientation=_check_cosines(orientation, where),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        label=where,
    )


def _check_cosines(orientation: NDArray[np.float64], where: str) -> NDArray[np.float64]:
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(
        row @ col
    ) > 0.01:
        raise AssemblyError(
            f"{where}: ImageOrientationPatient {[round(float(c), 6) for c in orientation]} is "
            "not two orthogonal unit vectors"
        )
    return orientation


def functional_group(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of a functional group macro for one frame: per-frame first, then shared.

    PS3.3 C.7.6.16: a macro is in either the Per-Frame or the Shared Functional Groups Sequence.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        item = per_frame[frame_index].get(sequence)
        if item:
            return item[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        item = shared[0].get(sequence)
        if item:
            return item[0]
    return None


def frame_plane(ds: Dataset, frame_index: int) -> tuple[Dataset, Dataset, Dataset] | None:
    """A frame's Plane Position, Plane Orientation and Pixel Measures items (PS3.3
    C.7.6.16.2), or ``None`` when one is missing and the frame cannot be placed in space."""
    items = tuple(functional_group(ds, frame_index, name) for name in
                  ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
    return None if any(item is None for item in items) else items  # type: ignore[return-value]


def _multi_frame_slices(ds: Dataset, index: int) -> list[_Slice]:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    slices = []
    for f in range(n_frames):
        where = f"frame {f + 1}"
        plane = frame_plane(ds, f)
        if plane is None:
            raise AssemblyError(
                f"{where}: the Plane Position, Plane Orientation or Pixel Measures functional "
                "group is missing (PS3.3 C.7.6.16.2); the frame cannot be placed in space"
            )
        position, orientation, measures = plane
        transform = functional_group(ds, f, "PixelValueTransformationSequence")
        rescale = transform if transform is not None else ds
        frame_type = functional_group(ds, f, "CTImageFrameTypeSequence")
        if frame_type is not None and "LOCALIZER" in _upper(frame_type.get("FrameType")):
            raise AssemblyError(f"{where} is a localizer (FrameType LOCALIZER), not an axial image")
        spacing = _floats(_required(measures, "PixelSpacing", where), 2, "PixelSpacing", where)
        slices.append(_Slice(
            source=index,
            frame=f + 1,
            position=_floats(_required(position, "ImagePositionPatient", where), 3,
                             "ImagePositionPatient", where),
            orientation=_check_cosines(_floats(_required(
                orientation, "ImageOrientationPatient", where), 6, "ImageOrientationPatient",
                where), where),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slope=float(rescale.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(rescale.get("RescaleIntercept", 0.0) or 0.0),
            label=where,
        ))
    return slices


def _upper(value: object) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    return [str(v).upper() for v in items]


# --------------------------------------------------------------------------------------------
# Checks on the instances
# --------------------------------------------------------------------------------------------


def _sop_class(ds: Dataset) -> str:
    """SOPClassUID, or the file meta's Media Storage SOP Class UID where it was blanked."""
    value = str(ds.get("SOPClassUID", "") or "")
    if not value and hasattr(ds, "file_meta"):
        value = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return value


#: UIDs every source instance needs so that the SEG and SR can reference it (PS3.3 C.12.1).
_REFERENCED_UIDS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _check_instance(ds: Dataset, index: int) -> None:
    """Refuse anything that is not a monochrome CT image with pixel data."""
    where = _instance_label(ds, index)
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        raise AssemblyError(f"{where}: modality is {modality or 'missing'!s}, not CT")
    sop_class = _sop_class(ds)
    if sop_class and sop_class not in _CT_SOP_CLASSES:
        raise AssemblyError(
            f"{where}: SOP class {UID(sop_class).name} is not a CT image storage class"
        )
    blank = [k for k in _REFERENCED_UIDS if not str(ds.get(k, "") or "").strip()]
    if blank:
        raise AssemblyError(
            f"{where} has no {', '.join(blank)} (blanked by an anonymiser?): a SEG and SR "
            "could not reference it"
        )
    image_type = _upper(ds.get("ImageType"))
    if "LOCALIZER" in image_type:
        raise AssemblyError(
            f"{where} is a localizer (ImageType {'/'.join(image_type)}), not an axial image series"
        )
    if "PixelData" not in ds:
        raise AssemblyError(f"{where} has no pixel data")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise AssemblyError(
            f"{where} is a colour image ({photometric or 'no photometric interpretation'}, "
            f"{samples} samples per pixel); CT must be MONOCHROME (PS3.3 C.8.2.1.1)"
        )


def _check_same(datasets: Sequence[Dataset], keyword: str, what: str) -> str:
    values = {str(ds.get(keyword, "") or "") for ds in datasets}
    if len(values) > 1:
        shown = ", ".join(sorted(v or "(empty)" for v in values)[:3])
        raise AssemblyError(f"the instances belong to {len(values)} different {what}s ({shown})")
    return values.pop()


def _check_matrix(datasets: Sequence[Dataset]) -> tuple[int, int]:
    sizes = {
        (int(_required(ds, "Rows", _instance_label(ds, i))),
         int(_required(ds, "Columns", _instance_label(ds, i))))
        for i, ds in enumerate(datasets)
    }
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise AssemblyError(f"the slices have different matrix sizes (rows x columns: {shown})")
    return sizes.pop()


def _angle_deg(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    cos = float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
    return float(np.degrees(np.arccos(cos)))


def _check_geometry(slices: list[_Slice], config: AssemblyConfig) -> None:
    """Same orientation (within tolerance) and same pixel spacing on every slice."""
    first = slices[0]
    for s in slices[1:]:
        angle = max(_angle_deg(first.orientation[:3], s.orientation[:3]),
                    _angle_deg(first.orientation[3:], s.orientation[3:]))
        if angle > config.orientation_tolerance_deg:
            raise AssemblyError(
                f"mixed orientations: {s.label} is turned {angle:.1f} degrees from "
                f"{first.label} (tolerance {config.orientation_tolerance_deg:g}); the series "
                "holds more than one stack"
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise AssemblyError(
                f"inconsistent pixel spacing: {s.label} has {list(s.pixel_spacing)} mm, "
                f"{first.label} {list(first.pixel_spacing)} mm"
            )


def _check_count(n: int, config: AssemblyConfig) -> None:
    if n == 1:
        raise AssemblyError(
            "the series holds a single slice (a localizer or a key image), not a volume; "
            f"at least {config.min_slices} slices are needed"
        )
    if n < config.min_slices:
        raise AssemblyError(
            f"too few slices: found {n}, at least {config.min_slices} are needed to build a volume"
        )


def _sort_along_normal(slices: list[_Slice]) -> tuple[list[_Slice], NDArray[np.float64],
                                                      NDArray[np.float64]]:
    """Sort slices by position along the normal; refuse duplicates."""
    normal = slices[0].normal
    depth = np.array([s.position @ normal for s in slices])
    order = np.argsort(depth, kind="stable")
    ordered = [slices[i] for i in order]
    depth = depth[order]
    same = np.flatnonzero(np.diff(depth) < _SAME_POSITION_MM)
    if len(same):
        k = int(same[0])
        raise AssemblyError(
            f"duplicate slice positions: {ordered[k].label} and {ordered[k + 1].label} are both "
            f"at {depth[k]:.2f} mm along the slice normal ({len(same)} duplicate(s) in all); "
            "the series mixes several reconstructions or was sent twice with new UIDs"
        )
    return ordered, depth, normal


def _check_tilt(ordered: list[_Slice], normal: NDArray[np.float64],
                config: AssemblyConfig) -> None:
    """The stack must advance along the slice normal: no gantry tilt, no sheared stack."""
    steps = np.diff(np.array([s.position for s in ordered]), axis=0)
    along = steps @ normal
    across = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    angles = np.degrees(np.arctan2(across, along))
    worst = int(np.argmax(angles))
    if angles[worst] > config.orientation_tolerance_deg:
        raise AssemblyError(
            f"gantry tilt: the slices advance {angles[worst]:.1f} degrees away from their normal "
            f"(between {ordered[worst].label} and {ordered[worst + 1].label}); tilted stacks "
            "must be resampled by the scanner before they can be analysed"
        )


def _check_spacing(depth: NDArray[np.float64], ordered: list[_Slice], config: AssemblyConfig,
                   allow_gaps: bool) -> tuple[float, tuple[str, ...]]:
    """Median slice spacing, and warnings for gaps that ``allow_gaps`` lets through."""
    check = stack_gaps(depth, config.spacing_tolerance)
    if check.irregular:
        k = check.irregular[0]
        raise AssemblyError(
            f"irregular slice spacing: {depth[k + 1] - depth[k]:.2f} mm between "
            f"{ordered[k].label} and {ordered[k + 1].label}, median {check.median_spacing:.2f} mm "
            f"(tolerance {config.spacing_tolerance:.0%}); {len(check.irregular)} irregular step(s)"
        )
    messages = tuple(
        f"{g.missing} slice(s) missing between {g.start_mm:.2f} mm and {g.end_mm:.2f} mm along "
        f"the slice normal (after {ordered[g.after_index].label})"
        for g in check.gaps
    )
    if messages and not allow_gaps:
        raise AssemblyError(
            f"gap in the slice stack: {'; '.join(messages)}; {check.missing_slices} slice(s) of "
            f"{len(depth) + check.missing_slices} expected are missing"
        )
    warnings = tuple(
        f"slice gap: {m}; the volume uses the median spacing {check.median_spacing:.2f} mm, "
        "so positions beyond the gap are approximate" for m in messages
    )
    return check.median_spacing, warnings


# --------------------------------------------------------------------------------------------
# Pixels and headers
# --------------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax, inferred for native pixel data when file meta is absent."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return UID(meta.TransferSyntaxUID)
    if ds["PixelData"].is_undefined_length:
        raise AssemblyError(
            "compressed pixel data without a Transfer Syntax UID: cannot decode"
        )
    implicit = ds.original_encoding[0] is False
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _frames(ds: Dataset, where: str) -> Iterator[NDArray[np.generic]]:
    """Decode every frame of ``ds`` without touching the dataset (no cached pixel array)."""
    syntax = _transfer_syntax(ds)
    if not syntax.is_encapsulated:
        _check_native_length(ds, where)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise AssemblyError(f"{where}: transfer syntax {syntax.name} is not supported") from None
    try:
        options = as_pixel_options(ds)
        for frame in range(int(ds.get("NumberOfFrames", 1) or 1)):
            array, _ = decoder.as_array(ds, index=frame, **options)
            yield array
    except (RuntimeError, ValueError, AttributeError, KeyError) as exc:
        raise AssemblyError(f"{where}: the pixel data cannot be decoded ({exc})") from None


def _check_native_length(ds: Dataset, where: str) -> None:
    """Refuse native pixel data whose length is not what the image pixel module says.

    pydicom decodes data that is too long with only a warning, but excess bytes mean Rows,
    Columns, Bits Allocated or Number of Frames do not describe the data, so the image would be
    read with the wrong shape. One trailing pad byte (PS3.5 8.1.1) is allowed.
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    bits = int(ds.get("BitsAllocated", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected = rows * cols * frames * samples * bits // 8
    actual = len(ds.PixelData)
    if actual not in (expected, expected + 1):
        raise AssemblyError(
            f"{where}: pixel data is {actual} bytes, but {rows} rows x {cols} columns x "
            f"{frames} frame(s) x {bits} bits need {expected}"
        )


#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
#: the SEG and SR copy from their source. Type 2 means present but possibly empty; senders and
#: anonymisers sometimes drop them altogether, and the outputs must still be valid.
_TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                  "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _header_only(ds: Dataset) -> Dataset:
    """A deep copy of ``ds`` without its pixel data (the input is left untouched), with absent
    Type 2 patient and study attributes added empty."""
    out = Dataset()
    for element in ds:
        if element.tag not in _PIXEL_TAGS:
            out.add(copy.deepcopy(element))
    for keyword in _TYPE_2_COPIED:
        if keyword not in out:
            setattr(out, keyword, "")
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    implicit, little_endian = ds.original_encoding
    out.set_original_encoding(implicit, little_endian, ds.original_character_set)
    return out


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def assemble(
    datasets: Sequence[Dataset],
    config: AssemblyConfig = AssemblyConfig(),  # noqa: B008 - frozen, safe to share
    *,
    key: SeriesKey | None = None,
    allow_gaps: bool = False,
) -> Volume:
    """Build a :class:`~dicomnode.types.Volume` from the instances of one CT series.

    Parameters
    ----------
    datasets:
        Single-frame CT instances in any order, or one Enhanced CT instance. Not modified.
    config:
        Minimum slice count and the orientation and spacing tolerances.
    key:
        Study and series of the volume; read from the instances when ``None``.
    allow_gaps:
        Assemble a stack with missing slices (nothing is filled in: the slices are stacked
        at the median spacing and a warning goes into ``Volume.warnings``). Irregular spacing
        is refused either way.

    Returns
    -------
    Volume
        HU (``float32``) = stored value x RescaleSlope + RescaleIntercept (PS3.3 C.11.1.1.2),
        slices sorted by position along the normal of ImageOrientationPatient.

    Raises
    ------
    AssemblyError
        With a message that says why the series cannot be used.
    """
    if not datasets:
        raise AssemblyError("no instances to assemble")
    for index, ds in enumerate(datasets):
        _check_instance(ds, index)
    study_uid = _check_same(datasets, "StudyInstanceUID", "study")
    series_uid = _check_same(datasets, "SeriesInstanceUID", "series")
    frame_of_reference = _check_same(datasets, "FrameOfReferenceUID", "frame of reference")
    rows, columns = _check_matrix(datasets)

    slices = _describe_slices(datasets)
    _check_count(len(slices), config)
    _check_geometry(slices, config)
    ordered, depth, normal = _sort_along_normal(slices)
    _check_tilt(ordered, normal, config)
    slice_spacing, warnings = _check_spacing(depth, ordered, config, allow_gaps)

    hu = _rescaled_pixels(datasets, ordered, (rows, columns))
    first = ordered[0]
    geometry = Geometry(
        origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
        row_direction=tuple(float(v) for v in first.orientation[:3]),  # type: ignore[arg-type]
        column_direction=tuple(float(v) for v in first.orientation[3:]),  # type: ignore[arg-type]
        slice_direction=tuple(float(v) for v in normal),  # type: ignore[arg-type]
        spacing=(slice_spacing, *first.pixel_spacing),
    )
    multi_frame = ordered[0].frame > 0
    headers = [_header_only(ds) for ds in datasets]
    return Volume(
        hu=hu,
        geometry=geometry,
        key=key or SeriesKey(study_uid=study_uid, series_uid=series_uid),
        sources=tuple(headers) if multi_frame else tuple(headers[s.source] for s in ordered),
        frame_of_reference_uid=frame_of_reference,
        frame_numbers=tuple(s.frame for s in ordered) if multi_frame else (),
        warnings=warnings,
    )


def _describe_slices(datasets: Sequence[Dataset]) -> list[_Slice]:
    multi = [i for i, ds in enumerate(datasets) if _is_multi_frame(ds)]
    if not multi:
        return [_single_frame_slice(ds, i) for i, ds in enumerate(datasets)]
    if len(datasets) > 1:
        raise AssemblyError(
            f"the series holds {len(multi)} multi-frame and {len(datasets) - len(multi)} other "
            "instance(s); an Enhanced CT series must be a single instance"
        )
    return _multi_frame_slices(datasets[0], 0)


def _is_multi_frame(ds: Dataset) -> bool:
    return _sop_class(ds) in _MULTI_FRAME_CT or "PerFrameFunctionalGroupsSequence" in ds


def _rescaled_pixels(datasets: Sequence[Dataset], ordered: list[_Slice],
                     matrix: tuple[int, int]) -> NDArray[np.float32]:
    """Decode each slice straight into its place in the volume, rescaled to HU."""
    hu = np.empty((len(ordered), *matrix), dtype=np.float32)
    place = {(s.source, max(s.frame, 1)): k for k, s in enumerate(ordered)}
    by_frame = {(s.source, max(s.frame, 1)): s for s in ordered}
    for index, ds in enumerate(datasets):
        where = _instance_label(ds, index)
        for frame, pixels in enumerate(_frames(ds, where), start=1):
            s = by_frame[(index, frame)]
            k = place[(index, frame)]
            np.multiply(pixels, np.float32(s.slope), out=hu[k], casting="unsafe")
            hu[k] += np.float32(s.intercept)
    return hu
