"""Typed values passed between the pipeline stages.

Every stage takes and returns these frozen dataclasses; no stage passes bare dicts of
metadata. Array axis order is always ``(z, y, x)``: ``z`` runs along the slice normal in the
order of increasing position, ``y`` along the image columns (DICOM rows) and ``x`` along the
image rows (DICOM columns), exactly like ``pydicom``'s ``pixel_array`` stacked slice by slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from pydicom import Dataset


@dataclass(frozen=True)
class SeriesKey:
    """Identifies one series of one study."""

    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class Geometry:
    """Where a ``(z, y, x)`` voxel grid lies in the patient coordinate system (PS3.3 C.7.6.2).

    Attributes
    ----------
    origin:
        Patient position (mm) of the centre of voxel ``(0, 0, 0)``: the
        ImagePositionPatient of the first slice.
    row_direction, column_direction:
        The two ImageOrientationPatient cosines: ``row_direction`` is the direction in which
        ``x`` (the column index) grows, ``column_direction`` the one in which ``y`` grows.
    slice_direction:
        Unit vector along which ``z`` grows (normal of the slices, sign chosen so that
        positions increase).
    spacing:
        ``(z, y, x)`` voxel spacing in mm: slice spacing, then PixelSpacing (row spacing,
        column spacing).
    """

    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_direction: tuple[float, float, float]
    spacing: tuple[float, float, float]

    def affine(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(z, y, x, 1)`` indices to patient mm."""
        a = np.eye(4)
        a[:3, 0] = np.asarray(self.slice_direction) * self.spacing[0]
        a[:3, 1] = np.asarray(self.column_direction) * self.spacing[1]
        a[:3, 2] = np.asarray(self.row_direction) * self.spacing[2]
        a[:3, 3] = self.origin
        return a

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


@dataclass(frozen=True)
class Volume:
    """A CT series assembled into a Hounsfield-unit volume.

    Attributes
    ----------
    hu:
        ``float32`` array ``(z, y, x)`` in Hounsfield units.
    geometry:
        Placement of the grid in patient space.
    key:
        The study and series this volume came from.
    sources:
        The source instances' headers (pixel data removed) in ``z`` order: ``sources[k]``
        describes slice ``k``. For an Enhanced (multi-frame) CT there is one dataset and
        ``frame_numbers`` gives the frame of each slice.
    frame_numbers:
        1-based frame numbers per slice for a multi-frame source, else empty.
    frame_of_reference_uid:
        FrameOfReferenceUID shared by all slices.
    warnings:
        Problems that did not stop processing but must reach the report (e.g. a slice gap).
    """

    hu: np.ndarray
    geometry: Geometry
    key: SeriesKey
    sources: tuple["Dataset", ...]
    frame_of_reference_uid: str
    frame_numbers: tuple[int, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class Lesion:
    """One connected component of the segmentation.

    ``label`` is its value in :attr:`LabelVolume.labels` and the number of its SEG segment.
    """

    label: int
    voxel_count: int
    volume_ml: float
    centroid_mm: tuple[float, float, float]
    bbox: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) per axis
    #: Mean model probability inside the lesion, in [0, 1]; ``None`` when a person drew it.
    confidence: float | None = None


@dataclass(frozen=True)
class SuppliedSegmentation:
    """A segmentation the node was given (a radiologist's RTSTRUCT or SEG) instead of finding
    the lesions itself: what the report names and references.

    Lesion ``k`` of the :class:`LabelVolume` is segment (SEG) or ROI (RTSTRUCT) number
    ``numbers[k-1]`` named ``names[k-1]``.
    """

    kind: Literal["SEG", "RTSTRUCT"]
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    #: Who or what made it, as the object says (Content Creator's Name, Operators' Name,
    #: Manufacturer and model): never invented.
    creator: str
    numbers: tuple[int, ...]
    names: tuple[str, ...]
    #: The object's header (no pixel data), for the SR's evidence list.
    header: "Dataset" = field(repr=False, compare=False)


@dataclass(frozen=True)
class LabelVolume:
    """Labelled lesions on the grid of a :class:`Volume`.

    ``labels`` is ``uint16`` ``(z, y, x)``: 0 is background, ``k`` belongs to ``lesions[k-1]``.
    ``supplied`` is set when the lesions were drawn by someone else, not found by our model.
    """

    labels: np.ndarray
    lesions: tuple[Lesion, ...]
    model_name: str
    model_version: str
    supplied: SuppliedSegmentation | None = None

    def mask(self, label: int) -> np.ndarray:
        return self.labels == label


@dataclass(frozen=True)
class LesionFeatures:
    """Radiomics features of one lesion, in the protocol's fixed order.

    ``values`` may hold NaN where a feature could not be computed; ``warnings`` then says why
    (it must reach the report).
    """

    label: int
    names: tuple[str, ...]
    values: tuple[float, ...]
    warnings: tuple[str, ...] = ()

    def as_array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.values))


@dataclass(frozen=True)
class Subtype:
    """An imaging subtype as coded in the report (private coding scheme)."""

    index: int  # 1..4
    code_value: str
    meaning: str


@dataclass(frozen=True)
class Prediction:
    """Research predictions for one lesion."""

    label: int
    tmb_probability: float
    tmb_threshold: float
    subtype: Subtype

    @property
    def tmb_high(self) -> bool:
        return self.tmb_probability >= self.tmb_threshold


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model that contributed to a result (for the SR and the audit)."""

    name: str
    version: str
    family: str  # e.g. "3D U-Net", "XGBoost", "nearest centroid"
    task: Literal["segmentation", "tmb", "subtype"]


@dataclass(frozen=True)
class Analysis:
    """Everything the analysis stage found in one series."""

    volume: Volume
    segmentation: LabelVolume
    features: tuple[LesionFeatures, ...]
    predictions: tuple[Prediction, ...]
    models: tuple[ModelInfo, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportSet:
    """The DICOM objects written for one analysis: a SEG (absent when no lesion), an SR, and
    the human-readable fallback: one key image per lesion and a PDF report (each optional)."""

    sr: "Dataset"
    seg: "Dataset | None" = None
    key_images: tuple["Dataset", ...] = ()
    pdf: "Dataset | None" = None

    def datasets(self) -> tuple["Dataset", ...]:
        """Every object, in delivery order: SEG, SR, key images, PDF."""
        return tuple(d for d in (self.seg, self.sr, *self.key_images, self.pdf) if d is not None)


@dataclass(frozen=True)
class InstanceOutcome:
    """What the destination said about one instance we sent."""

    sop_instance_uid: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class DeliveryResult:
    """Per-instance outcome of one delivery attempt.

    ``retryable`` says whether a failure is temporary (timeout, 5xx, connection refused,
    408/429) and the same delivery may succeed later; permanent failures are not retried.
    """

    destination: str
    outcomes: tuple[InstanceOutcome, ...] = field(default_factory=tuple)
    retryable: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(o.ok for o in self.outcomes)
