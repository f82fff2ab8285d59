"""Regional-variation and shape features of seed 003 (Wu et al., Nat. Mach. Intell. 2021).

Every feature name starts with ``wu_``; the order is fixed by the configuration
(:class:`~dicomnode.config.RegionalConfig`) and given by :attr:`RegionalExtractor.feature_names`.

Regional variation (after the paper's public code, GitHub WuLabMDA/PanCancer,
``python/main.py``), on every axial slice that contains lesion:

- **core**: lesion pixels whose in-plane distance to the nearest non-lesion pixel exceeds half
  of that slice's largest such distance; **rim**: the other lesion pixels;
- **ring** of width ``w`` mm: pixels within ``w`` mm (in-plane) of the slice's lesion, kept
  only inside the organ mask (the public code used a lung mask) or, without one, inside the
  body, *plus the lesion itself* as in the public code (``ring_includes_lesion``; false keeps
  the peritumoral pixels only);
- the pixels of all slices are pooled into one histogram per region (``bins`` bins over
  ``hu_min..hu_max``; values outside are not counted), normalised to sum 1;
- histogram pairs (rim, ring) and (core, ring) for every ring width, and (core, rim) once
  (it does not depend on the ring; the public code repeats it per width), each compared by
  the four metrics of OpenCV's ``compareHist`` (see :func:`histogram_metrics`).

Names: ``wu_ring{w}_{first}_{second}_{metric}`` (e.g. ``wu_ring5_rim_ring_chisquare``; a
width of 7.5 mm gives ``ring7p5``) and ``wu_core_rim_{metric}``; metrics ``correlation``,
``chisquare``, ``intersection``, ``bhattacharyya``. The first region of a pair is OpenCV's
``H1`` (the chi-square divides by it).

Where we differ from the public code: distances are in mm from the voxel spacing (the code
counts pixels: ``round(w / pixel spacing)`` pixels, so its 5 mm ring at 0.7 mm pixels is
7 pixels = 4.9 mm); the core uses the in-plane spacing in its distance (identical for square
pixels); histograms are normalised by their sum (the code adds 1e-10 to it) and compared in
float64 (the code uses float32); a region with no pixel in range, and a ring with no pixel
outside the lesion, give NaN with a warning instead of a number computed from an all-zero
histogram.

Shape (the paper: SPHARM-MAT, degree 15, first-order-ellipsoid alignment, coefficients of the
surface's ``(x, y, z)`` parameterisation). Ours is a practical reimplementation that agrees
only approximately: the lesion is aligned to its principal axes (major axis = polar axis); the
surface radius ``r`` is sampled from the lesion's centroid along ``8 (L + 1)^2`` nearly uniform
directions (the outermost crossing of the 0.5 level of the trilinearly interpolated mask); a
least-squares fit of real spherical harmonics up to degree ``L`` gives coefficients
``a_lm``, divided by the mean radius. Features:

- ``wu_shape_energy_lXX`` (``l = 1..L``): ``sqrt(sum_m a_lm^2)`` (degree 0 is the mean radius
  itself, always ``sqrt(4 pi)`` after normalisation, so it is left out);
- ``wu_shape_entropy_lXX``: Shannon entropy of ``a_lm^2 / sum_m a_lm^2`` over ``m``, with the
  paper code's ``log(p + 1e-5)`` (0 when the degree carries no energy);
- ``wu_shape_axis_minor|middle|major``: principal semi-axes ``sqrt(5 lambda)`` (exact for a
  solid ellipsoid) over the mean radius, ascending (the paper: degree-1 SPHARM scales);
- ``wu_shape_volume_ml``: voxel count times voxel volume.

A radial function describes star-shaped lesions only, and its degrees do not match the
paper's: a sphere puts all energy in degree 0 here but in degree 1 of the paper's vector
expansion, an ellipsoid's elongation shows in the even degrees here. Subtype models must be
trained on these features, never on the paper's values.

PURE: no disk access.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from dicomnode.config import RegionalConfig
from dicomnode.errors import ConfigError, InputRejected
from dicomnode.types import LabelVolume, LesionFeatures, Volume

log = logging.getLogger(__name__)

PREFIX = "wu_"
METRICS = ("correlation", "chisquare", "intersection", "bhattacharyya")
#: Region pairs compared per ring width; the (core, rim) pair is compared once.
RING_PAIRS = (("rim", "ring"), ("core", "ring"))
#: Highest supported shape degree: (L + 1)^2 coefficients from 8 (L + 1)^2 rays.
MAX_SHAPE_DEGREE = 20
#: Added to p in the entropy's log, as in the paper's code (spharm_coeff.m).
_ENTROPY_EPS = 1e-5
#: Voxels (in-plane) added around the widest ring when cropping, so that the ring's edge and
#: the lesion's own border never touch the crop's.
_CROP_MARGIN_VOXELS = 2


# ----------------------------------------------------------------------------- histograms
def normalised_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray | None:
    """Histogram of ``values`` over ``edges`` divided by its sum; ``None`` when nothing falls in.

    Values outside ``edges[0]..edges[-1]`` are not counted (the last bin includes its right
    edge), as with ``np.histogram(values, bins, range)`` in the paper's code.
    """
    counts, _ = np.histogram(values, bins=edges)
    total = counts.sum()
    return counts / total if total > 0 else None


def histogram_metrics(h1: np.ndarray, h2: np.ndarray) -> tuple[float, float, float, float]:
    """The four comparisons of OpenCV's ``compareHist``, in :data:`METRICS` order.

    - correlation: Pearson correlation of the bin values (1 when either is constant,
      as OpenCV returns);
    - chi-square (asymmetric): ``sum (h1 - h2)^2 / h1`` over bins where ``h1 > 0``;
    - intersection: ``sum min(h1, h2)``;
    - Bhattacharyya (OpenCV's, i.e. the Hellinger distance):
      ``sqrt(1 - sum sqrt(h1 h2) / sqrt(sum h1 sum h2))``: 0 for identical histograms,
      1 for disjoint ones.
    """
    h1, h2 = np.asarray(h1, dtype=np.float64), np.asarray(h2, dtype=np.float64)
    d1, d2 = h1 - h1.mean(), h2 - h2.mean()
    variance_product = float(np.sum(d1 * d1) * np.sum(d2 * d2))
    eps = np.finfo(np.float64).eps
    correlation = (
        float(np.sum(d1 * d2)) / math.sqrt(variance_product) if variance_product > eps else 1.0
    )
    occupied = h1 > 0
    chisquare = float(np.sum((h1[occupied] - h2[occupied]) ** 2 / h1[occupied]))
    intersection = float(np.sum(np.minimum(h1, h2)))
    overlap = float(np.sum(np.sqrt(h1 * h2))) / math.sqrt(float(h1.sum() * h2.sum()))
    bhattacharyya = math.sqrt(max(1.0 - overlap, 0.0))
    return correlation, chisquare, intersection, bhattacharyya


# ----------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class Regions:
    """Boolean ``(z, y, x)`` masks of one lesion's regions on a crop.

    ``peritumoral[i]`` holds the pixels of ring ``i`` outside the lesion; ``rings[i]`` is the
    region whose histogram is compared (the same, plus the lesion when it is included).
    """

    core: np.ndarray
    rim: np.ndarray
    rings: tuple[np.ndarray, ...]
    peritumoral: tuple[np.ndarray, ...]


def lesion_regions(
    lesion: np.ndarray,
    support: np.ndarray,
    spacing_yx: Sequence[float],
    ring_widths_mm: Sequence[float],
    *,
    ring_includes_lesion: bool,
) -> Regions:
    """Core, rim and rings of ``lesion``, built slice by slice as in the paper's code.

    Parameters
    ----------
    lesion:
        Boolean ``(z, y, x)`` lesion mask.
    support:
        Boolean mask (organ or body) that bounds the rings.
    spacing_yx:
        In-plane pixel spacing (mm).
    ring_widths_mm:
        Ring widths (mm), measured in-plane from the lesion's pixel centres.
    ring_includes_lesion:
        Add the lesion to every ring (the paper's code does).
    """
    core = np.zeros_like(lesion)
    near = [np.zeros_like(lesion) for _ in ring_widths_mm]
    for z in np.flatnonzero(lesion.any(axis=(1, 2))):
        inside = ndimage.distance_transform_edt(lesion[z], sampling=spacing_yx)
        core[z] = inside > inside.max() / 2
        # 0 on lesion pixels: "near" holds the lesion too, as the code's dilation does.
        outside = ndimage.distance_transform_edt(~lesion[z], sampling=spacing_yx)
        for ring, width in zip(near, ring_widths_mm):
            ring[z] = outside <= width
    allowed = support | lesion
    peritumoral = tuple(ring & allowed & ~lesion for ring in near)
    rings = tuple(p | lesion for p in peritumoral) if ring_includes_lesion else peritumoral
    return Regions(core=core, rim=lesion & ~core, rings=rings, peritumoral=peritumoral)


def body_mask(hu: np.ndarray, threshold_hu: float,
              slices: np.ndarray | None = None) -> np.ndarray:
    """The patient's body: voxels above ``threshold_hu`` in the largest 3D connected component
    (6-connectivity; drops the table and noise), holes filled slice by slice (so that the
    lungs, the airways and a nodule within them belong to the body).

    The extractor applies it to the slab of slices that holds the lesions only (seconds
    saved on a whole CT); an arm that joins the trunk only outside that slab is then not body.
    ``slices``: the indices of the only slices wanted (the component is still found in the
    whole volume); every other slice is left false.
    """
    labels, count = ndimage.label(hu > threshold_hu)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    # Counted slice by slice: a bincount of the whole volume would first copy the labels
    # into a 64-bit array (a quarter of a GB for a 512 x 512 x 134 CT).
    sizes = np.zeros(count + 1, dtype=np.int64)
    for plane in labels:
        sizes += np.bincount(plane.ravel(), minlength=count + 1)
    sizes[0] = 0
    largest = np.argmax(sizes)
    if slices is not None:
        body = np.zeros(hu.shape, dtype=bool)
        for z in slices:
            body[z] = ndimage.binary_fill_holes(labels[z] == largest)
        return body
    body = labels == largest
    del labels
    for z in np.flatnonzero(body.any(axis=(1, 2))):
        body[z] = ndimage.binary_fill_holes(body[z])
    return body


# ----------------------------------------------------------------------------- shape
def fibonacci_directions(count: int) -> np.ndarray:
    """``count`` nearly uniformly spread unit vectors ``(x, y, z)`` (a Fibonacci lattice)."""
    index = np.arange(count) + 0.5
    z = 1.0 - 2.0 * index / count
    azimuth = index * math.pi * (3.0 - math.sqrt(5.0))
    radius = np.sqrt(1.0 - z * z)
    return np.column_stack([radius * np.cos(azimuth), radius * np.sin(azimuth), z])


def real_spherical_harmonics(degree: int, directions: np.ndarray) -> np.ndarray:
    """Orthonormal real spherical harmonics at unit vectors ``(x, y, z)``.

    Returns ``(n, (degree + 1)^2)``; column ``l^2 + l + m`` holds ``Y_lm``: ``m > 0`` the
    cosine, ``m < 0`` the sine terms. The polar axis is ``z``.
    """
    x, y, z = directions.T
    cos_polar, azimuth = np.clip(z, -1.0, 1.0), np.arctan2(y, x)
    basis = np.empty((len(directions), (degree + 1) ** 2))
    for l in range(degree + 1):
        for m in range(l + 1):
            log_ratio = special.gammaln(l - m + 1) - special.gammaln(l + m + 1)
            norm = math.sqrt((2 * l + 1) / (4 * math.pi) * math.exp(log_ratio))
            legendre = norm * special.lpmv(m, l, cos_polar)
            if m == 0:
                basis[:, l * l + l] = legendre
            else:
                basis[:, l * l + l + m] = math.sqrt(2) * legendre * np.cos(m * azimuth)
                basis[:, l * l + l - m] = math.sqrt(2) * legendre * np.sin(m * azimuth)
    return basis


@dataclass(frozen=True)
class ShapeBasis:
    """Fixed ray directions in the lesion's principal frame and their least-squares projector."""

    degree: int
    directions: np.ndarray  # (n, 3) unit (x', y', z'); z' is the major axis
    projector: np.ndarray  # ((degree + 1)^2, n): radii -> coefficients

    @classmethod
    @functools.cache
    def build(cls, degree: int) -> ShapeBasis:
        """The basis of ``degree`` (built once per process: it depends on nothing else)."""
        directions = fibonacci_directions(8 * (degree + 1) ** 2)
        design = real_spherical_harmonics(degree, directions)
        # Normal equations: on these 8x oversampled directions the Gram matrix is within a
        # few percent of (n / 4 pi) I (condition ~1.02), and solving them is much cheaper than
        # an SVD-based pseudo-inverse.
        projector = np.linalg.solve(design.T @ design, design.T)
        return cls(degree=degree, directions=directions, projector=projector)


def shape_descriptors(
    lesion: np.ndarray, spacing_zyx: Sequence[float], basis: ShapeBasis
) -> np.ndarray:
    """Radius-normalised shape descriptors of a lesion (see the module docstring).

    Returns ``L`` energies, ``L`` entropies, three axis scales (ascending) and the volume (ml),
    in that order; NaN except the volume when the surface could not be sampled.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    points = np.argwhere(lesion) * spacing
    centroid = points.mean(axis=0)
    # Each voxel is a small box, not a point: its own variance spacing^2 / 12 is added.
    covariance = np.cov(points.T, bias=True).reshape(3, 3) + np.diag(spacing**2 / 12)
    variances, axes = np.linalg.eigh(covariance)  # ascending: minor, middle, major
    # Principal frame (x', y', z') = (middle, minor, major), written in (z, y, x) mm.
    rays = basis.directions @ axes[:, [1, 0, 2]].T
    radii = _surface_radii(lesion, spacing, centroid, rays)
    volume_ml = float(lesion.sum() * np.prod(spacing) / 1000.0)
    mean_radius = float(radii.mean())
    if not mean_radius > 0:
        return np.concatenate([np.full(2 * basis.degree + 3, np.nan), [volume_ml]])
    coefficients = basis.projector @ radii / mean_radius
    energies, entropies = _degree_energies_and_entropies(coefficients, basis.degree)
    axis_scales = np.sqrt(5 * np.clip(variances, 0, None)) / mean_radius
    return np.concatenate([energies, entropies, axis_scales, [volume_ml]])


def _surface_radii(
    lesion: np.ndarray, spacing: np.ndarray, centroid_mm: np.ndarray, rays: np.ndarray
) -> np.ndarray:
    """Distance (mm) from the centroid to the lesion's outermost surface along each ray.

    The surface is the 0.5 level of the trilinearly interpolated mask; the crossing is
    interpolated linearly between the last sample inside and the next one. A ray that never
    meets the lesion (the centroid of a non-convex lesion may lie outside it) has radius 0.
    """
    padded = np.pad(lesion.astype(np.float32), 1)
    step = float(spacing.min()) / 2
    reach = float(np.linalg.norm(np.argwhere(lesion) * spacing - centroid_mm, axis=1).max())
    t = np.arange(0.0, reach + 2 * float(spacing.max()) + step, step)
    # Voxel coordinates in the padded array of every sample: (3, rays, samples).
    samples_mm = centroid_mm[:, None, None] + rays.T[:, :, None] * t[None, None, :]
    coordinates = samples_mm / spacing[:, None, None] + 1.0
    values = ndimage.map_coordinates(padded, coordinates.reshape(3, -1), order=1, cval=0.0)
    values = values.reshape(len(rays), len(t))
    inside = values >= 0.5
    last = len(t) - 1 - np.argmax(inside[:, ::-1], axis=1)
    rows = np.arange(len(rays))
    before, after = values[rows, last], values[rows, np.minimum(last + 1, len(t) - 1)]
    fraction = np.where(before > after, (before - 0.5) / np.maximum(before - after, 1e-12), 0.0)
    return np.where(inside.any(axis=1), t[last] + step * fraction, 0.0)


def _degree_energies_and_entropies(
    coefficients: np.ndarray, degree: int
) -> tuple[np.ndarray, np.ndarray]:
    energies, entropies = np.empty(degree), np.empty(degree)
    for l in range(1, degree + 1):
        power = coefficients[l * l : (l + 1) ** 2] ** 2
        total = float(power.sum())
        energies[l - 1] = math.sqrt(total)
        p = power / total if total > 0 else np.zeros_like(power)
        entropies[l - 1] = float(-np.sum(p * np.log(p + _ENTROPY_EPS)))
    return energies, entropies


# ----------------------------------------------------------------------------- extractor
def _width_tag(width_mm: float) -> str:
    return f"{width_mm:g}".replace(".", "p")


def regional_feature_names(ring_widths_mm: Sequence[float]) -> tuple[str, ...]:
    """Names of the histogram features, in extraction order."""
    names = [
        f"{PREFIX}ring{_width_tag(w)}_{first}_{second}_{metric}"
        for w in ring_widths_mm
        for first, second in RING_PAIRS
        for metric in METRICS
    ]
    names += [f"{PREFIX}core_rim_{metric}" for metric in METRICS]
    return tuple(names)


def shape_feature_names(degree: int) -> tuple[str, ...]:
    """Names of the shape descriptors, in extraction order."""
    return (
        *(f"{PREFIX}shape_energy_l{l:02d}" for l in range(1, degree + 1)),
        *(f"{PREFIX}shape_entropy_l{l:02d}" for l in range(1, degree + 1)),
        f"{PREFIX}shape_axis_minor",
        f"{PREFIX}shape_axis_middle",
        f"{PREFIX}shape_axis_major",
        f"{PREFIX}shape_volume_ml",
    )


class RegionalExtractor:
    """Wu et al.'s regional-variation histograms and our radius-normalised shape descriptors.

    Parameters
    ----------
    cfg:
        The ``[regional]`` section; see :class:`~dicomnode.config.RegionalConfig`.

    Raises
    ------
    ConfigError
        A value of ``cfg`` is unusable; the message names the key.
    """

    def __init__(self, cfg: RegionalConfig) -> None:
        self.cfg = _checked(cfg)
        self._edges = np.linspace(cfg.hu_min, cfg.hu_max, cfg.bins + 1)
        self._basis = ShapeBasis.build(cfg.shape_degree)
        self._names = regional_feature_names(cfg.ring_widths_mm) + shape_feature_names(
            cfg.shape_degree
        )

    @classmethod
    def from_config(cls, cfg: RegionalConfig) -> RegionalExtractor:
        """The extractor of the ``[regional]`` section."""
        return cls(cfg)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self._names

    def extract(self, volume: Volume, labels: LabelVolume) -> tuple[LesionFeatures, ...]:
        """Features of every lesion of ``labels``, in the order of ``labels.lesions``.

        The rings are bounded by the body (see :func:`body_mask`), computed once per volume.
        """
        if labels.labels.shape != volume.hu.shape:
            raise InputRejected(
                f"segmentation grid {labels.labels.shape} differs from "
                f"the CT grid {volume.hu.shape}"
            )
        if not labels.lesions:
            return ()
        spacing = _checked_spacing(volume.geometry.spacing)
        boxes = ndimage.find_objects(labels.labels)
        body = self._body_on_lesion_slabs(volume.hu, [b for b in boxes if b is not None])
        return tuple(
            self._lesion_features(
                volume.hu,
                labels.labels,
                spacing,
                body,
                "body",
                lesion.label,
                boxes[lesion.label - 1] if lesion.label <= len(boxes) else None,
            )
            for lesion in labels.lesions
        )

    def extract_arrays(
        self,
        hu: np.ndarray,
        mask: np.ndarray,
        spacing_zyx: Sequence[float],
        *,
        organ_mask: np.ndarray | None = None,
        label: int = 1,
    ) -> LesionFeatures:
        """Features of the voxels of ``mask`` equal to ``label``.

        Parameters
        ----------
        hu:
            ``(z, y, x)`` image in Hounsfield units.
        mask:
            ``(z, y, x)`` label map (or boolean mask, with ``label=1``) on the same grid.
        spacing_zyx:
            Voxel spacing in mm, ``(z, y, x)`` order.
        organ_mask:
            Boolean mask of the organ that bounds the rings (e.g. the lung); without it the
            rings are bounded by the body (:func:`body_mask` of ``hu``).
        label:
            The lesion's value in ``mask``; it becomes :attr:`LesionFeatures.label`.

        Raises
        ------
        InputRejected
            The lesion's mask is empty, the grids differ or the spacing is not usable.
        """
        hu, mask = np.asarray(hu), np.asarray(mask)
        spacing = _checked_spacing(spacing_zyx)
        if hu.ndim != 3 or hu.shape != mask.shape:
            raise InputRejected(
                f"image {hu.shape} and mask {mask.shape} must be 3D arrays on one grid"
            )
        if organ_mask is not None and np.shape(organ_mask) != hu.shape:
            raise InputRejected(
                f"organ mask {np.shape(organ_mask)} is not on the image grid {hu.shape}"
            )
        found = ndimage.find_objects((mask == label).astype(np.uint8))
        box = found[0] if found else None
        if organ_mask is None:
            support, support_name = self._body_on_lesion_slabs(hu, found), "body"
        else:
            support, support_name = np.asarray(organ_mask, dtype=bool), "organ mask"
        return self._lesion_features(hu, mask, spacing, support, support_name, label, box)

    # ------------------------------------------------------------------------- internals
    def _body_on_lesion_slabs(
        self, hu: np.ndarray, boxes: Sequence[tuple[slice, ...]]
    ) -> np.ndarray:
        """:func:`body_mask` of the slices from the first to the last lesion slice (false on
        the others)."""
        body = np.zeros(hu.shape, dtype=bool)
        if boxes:
            first, last = min(b[0].start for b in boxes), max(b[0].stop for b in boxes)
            body[first:last] = body_mask(hu[first:last], self.cfg.body_threshold_hu)
        return body

    def _lesion_features(
        self,
        hu: np.ndarray,
        mask: np.ndarray,
        spacing: tuple[float, float, float],
        support: np.ndarray,
        support_name: str,
        label: int,
        lesion_box: tuple[slice, ...] | None,
    ) -> LesionFeatures:
        if lesion_box is None:
            raise InputRejected(f"lesion {label}: its mask is empty, there is nothing to measure")
        box = _crop_box(lesion_box, mask.shape, spacing, max(self.cfg.ring_widths_mm))
        lesion = mask[box] == label
        regional, warnings = self._regional(
            hu[box], lesion, support[box], spacing, support_name, label
        )
        shape = shape_descriptors(lesion[_lesion_box_within(box, lesion_box)], spacing, self._basis)
        if not np.isfinite(shape[:-1]).all():
            warnings.append(
                f"lesion {label}: its surface could not be sampled from its centroid; "
                "the shape descriptors except the volume are NaN"
            )
        for message in warnings:
            log.warning(message)
        values = tuple(float(v) for v in np.concatenate([regional, shape]))
        return LesionFeatures(
            label=label, names=self._names, values=values, warnings=tuple(warnings)
        )

    def _regional(
        self,
        hu: np.ndarray,
        lesion: np.ndarray,
        support: np.ndarray,
        spacing: tuple[float, float, float],
        support_name: str,
        label: int,
    ) -> tuple[np.ndarray, list[str]]:
        cfg = self.cfg
        regions = lesion_regions(
            lesion,
            support,
            spacing[1:],
            cfg.ring_widths_mm,
            ring_includes_lesion=cfg.ring_includes_lesion,
        )
        warnings: list[str] = []
        hu_range = f"{cfg.hu_min:g}..{cfg.hu_max:g} HU"
        core = self._histogram(
            hu, regions.core, f"lesion {label}: no core voxel lies within {hu_range}", warnings
        )
        rim_reason = (
            f"lesion {label}: the inner rim is empty (on every slice each lesion pixel lies in the "
            "core: the lesion is too thin)"
            if not regions.rim.any()
            else f"lesion {label}: no inner-rim voxel lies within {hu_range}"
        )
        rim = self._histogram(hu, regions.rim, rim_reason, warnings)
        values: list[float] = []
        for width, ring_mask, outside in zip(
            cfg.ring_widths_mm, regions.rings, regions.peritumoral
        ):
            if outside.any():
                ring = self._histogram(
                    hu,
                    ring_mask,
                    f"lesion {label}: no {width:g} mm ring voxel lies within {hu_range}",
                    warnings,
                )
            else:
                warnings.append(
                    f"lesion {label}: no voxel of the {width:g} mm ring lies in the {support_name}"
                )
                ring = None
            values += [*self._compare(rim, ring), *self._compare(core, ring)]
        values += self._compare(core, rim)
        if warnings:
            missing = sum(1 for v in values if math.isnan(v))
            warnings.append(f"lesion {label}: {missing} of {len(values)} regional features are NaN")
        return np.asarray(values), warnings

    def _histogram(
        self, hu: np.ndarray, region: np.ndarray, reason: str, warnings: list[str]
    ) -> np.ndarray | None:
        histogram = normalised_histogram(hu[region], self._edges)
        if histogram is None:
            warnings.append(reason)
        return histogram

    @staticmethod
    def _compare(first: np.ndarray | None, second: np.ndarray | None) -> tuple[float, ...]:
        if first is None or second is None:
            return (math.nan,) * len(METRICS)
        return histogram_metrics(first, second)


def _lesion_box_within(crop: tuple[slice, ...], lesion_box: tuple[slice, ...]) -> tuple[slice, ...]:
    """``lesion_box`` (volume indices) expressed in the indices of ``crop``."""
    return tuple(slice(b.start - c.start, b.stop - c.start) for c, b in zip(crop, lesion_box))


def _crop_box(
    lesion_box: tuple[slice, ...],
    shape: tuple[int, ...],
    spacing: tuple[float, float, float],
    widest_ring_mm: float,
) -> tuple[slice, slice, slice]:
    """The lesion's box grown in-plane by the widest ring plus a margin.

    Rings are per slice, so the lesion's own slices suffice along ``z``.
    """
    box = [lesion_box[0]]
    for axis in (1, 2):
        pad = math.ceil(widest_ring_mm / spacing[axis]) + _CROP_MARGIN_VOXELS
        start, stop = lesion_box[axis].start, lesion_box[axis].stop
        box.append(slice(max(0, start - pad), min(shape[axis], stop + pad)))
    return (box[0], box[1], box[2])


def _checked_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputRejected(
            f"voxel spacing must be three positive numbers (z, y, x) in mm, got {spacing_zyx!r}"
        )
    return spacing  # type: ignore[return-value]


def _checked(cfg: RegionalConfig) -> RegionalConfig:
    widths = cfg.ring_widths_mm
    if not widths or not all(math.isfinite(w) and w > 0 for w in widths):
        raise ConfigError(
            f"regional.ring_widths_mm: need one or more widths > 0 mm, got {widths!r}"
        )
    if len({_width_tag(w) for w in widths}) != len(widths):
        raise ConfigError(f"regional.ring_widths_mm: widths must differ, got {widths!r}")
    if not (math.isfinite(cfg.hu_min) and math.isfinite(cfg.hu_max) and cfg.hu_min < cfg.hu_max):
        raise ConfigError(
            f"regional.hu_min/hu_max: need hu_min < hu_max, got {cfg.hu_min}..{cfg.hu_max}"
        )
    if cfg.bins < 2:
        raise ConfigError(f"regional.bins: need at least 2 bins, got {cfg.bins}")
    if not 1 <= cfg.shape_degree <= MAX_SHAPE_DEGREE:
        raise ConfigError(
            f"regional.shape_degree: must lie in 1..{MAX_SHAPE_DEGREE}, got {cfg.shape_degree}"
        )
    if not math.isfinite(cfg.body_threshold_hu):
        raise ConfigError(
            f"regional.body_threshold_hu: must be finite, got {cfg.body_threshold_hu}"
        )
    return cfg
