"""Synthetic contrast-enhanced abdominal CT with known lesions.

Used by the demo, the tests and segmentation training. Everything here is pure (arrays and
in-memory :class:`pydicom.Dataset` objects) except :func:`write_study`, which writes files.

The phantom imitates a portal-venous-phase abdominal CT (the phase in which colorectal liver
metastases are usually staged). HU values, chosen from the usual textbook ranges and
documented here because the tests and the model card depend on them:

==========================  ==================  ===========================================
structure                   HU                  notes
==========================  ==================  ===========================================
air outside the body        -1000
subcutaneous / visceral fat -100 / -90
muscle, abdominal wall      45-55
liver parenchyma            100-120             portal phase; drawn per seed
portal / hepatic veins      165-185             tubes of 1.5-4.5 mm radius inside the liver
aorta / IVC                 150-170 / 125-140
spleen                      105-125
kidneys                     cortex 170-190,     lower slices only
                            medulla ~120
vertebral body              cancellous 200-300, discs 80-90 every ~28 mm
                            cortex 700-1000
lungs                       -850                top slices, above a diaphragm dome
bowel                       wall 60, content    air or stool; never fluid, which would look
                            -1000..-80          like a necrotic soft-tissue lesion
==========================  ==================  ===========================================

Lesions (1.5-4 cm diameter, irregular: an ellipsoid whose radius is modulated by a random
polynomial of degree <= 3 in the direction cosines, i.e. low-order spherical harmonics):

- ``hypodense`` liver metastasis (60 %): necrotic core ~30 HU, viable tumour ~60 HU,
  enhancing rim ~90 HU, i.e. 20-90 HU against a 100-120 HU liver;
- ``hyperdense`` (hypervascular) liver metastasis (20 %): 140-180 HU, rim brighter than core;
- ``soft-tissue`` metastasis (20 %): peritoneal/nodal deposit in visceral fat, ~30 HU core,
  ~65 HU solid part, ~85 HU rim.

Each lesion also carries a low-frequency texture (+-5-10 HU). The image is blurred with a small
Gaussian point spread function and gets spatially correlated Gaussian noise (10-20 HU).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from dicomnode import __version__
from dicomnode.types import Geometry

#: Lesion kinds and how often :func:`make_phantom_study` draws them.
LESION_KINDS: tuple[str, ...] = ("hypodense", "hyperdense", "soft-tissue")
_LESION_KIND_P = (0.6, 0.2, 0.2)
#: Lesion diameters (mm) drawn uniformly in this range.
LESION_DIAMETER_MM: tuple[float, float] = (15.0, 40.0)
#: Rescale applied to the stored pixels (PS3.3 C.11.1.1.2): HU = pixel * 1 - 1024.
_RESCALE_INTERCEPT = -1024.0
_HU_MIN, _HU_MAX = -1024.0, 3071.0


@dataclass(frozen=True)
class PhantomLesion:
    """Where a lesion was put and what it looks like (for tests and documentation)."""

    label: int
    kind: str
    centre_index: tuple[float, float, float]  # (z, y, x) voxel index
    diameter_mm: float
    voxel_count: int


@dataclass(frozen=True)
class Phantom:
    """A synthetic CT series and its ground truth.

    Attributes
    ----------
    datasets:
        One CT Image Storage instance per slice (PS3.3 A.3), in order of increasing position
        along the slice normal; ``datasets[k]`` holds ``hu[k]``.
    hu:
        ``float32`` ``(z, y, x)`` Hounsfield units, exactly what the stored pixels rescale to.
    lesion_mask:
        ``bool`` ``(z, y, x)``: true inside any lesion.
    lesion_labels:
        One integer per lesion, ``(1, ..., n)``: the values of ``label_map``.
    label_map:
        ``uint16`` ``(z, y, x)``: the lesion's integer inside each lesion, 0 elsewhere.
    geometry:
        Placement of the grid in patient space.
    lesions:
        Description of each lesion; ``lesions[k].label == k + 1``.
    seed:
        The seed the phantom was made from.
    """

    datasets: tuple[Dataset, ...]
    hu: NDArray[np.float32]
    lesion_mask: NDArray[np.bool_]
    lesion_labels: tuple[int, ...]
    label_map: NDArray[np.uint16]
    geometry: Geometry
    lesions: tuple[PhantomLesion, ...]
    seed: int

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing


# --------------------------------------------------------------------------------------------
# Lesions: shape and intensity, shared by the phantom and by insertion into real CT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LesionLook:
    """HU of the necrotic core, the viable tumour and the rim, and the core's relative size."""

    core: float
    body: float
    rim: float
    core_fraction: float


def _fibonacci_sphere(n: int) -> NDArray[np.float64]:
    """``n`` nearly evenly spread unit vectors."""
    k = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * k / n)
    azimuth = np.pi * (1 + 5**0.5) * k
    return np.stack(
        [np.cos(polar), np.sin(polar) * np.sin(azimuth), np.sin(polar) * np.cos(azimuth)], axis=-1
    )


def _direction_monomials(u: NDArray[np.float64]) -> NDArray[np.float64]:
    """Monomials of degree 1..3 of unit vectors ``u`` (..., 3): a basis of low-order harmonics."""
    a, b, c = u[..., 0], u[..., 1], u[..., 2]
    terms = [a, b, c, a * a - b * b, 2 * c * c - a * a - b * b, a * b, b * c, a * c,
             a**3, b**3, c**3, a * b * c, a * a * b, a * a * c, b * b * a, b * b * c, c * c * a,
             c * c * b]
    return np.stack(terms, axis=-1)


@dataclass(frozen=True)
class _LesionShape:
    """An irregular ellipsoid: rotation, axis scales and radial modulation coefficients."""

    radius_mm: float
    rotation: NDArray[np.float64]
    scales: NDArray[np.float64]
    coefficients: NDArray[np.float64]

    @classmethod
    def random(cls, radius_mm: float, rng: np.random.Generator) -> _LesionShape:
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        scales = rng.uniform(0.8, 1.2, size=3)
        scales /= np.prod(scales) ** (1 / 3)  # keep the volume of the unmodulated ellipsoid
        coefficients = rng.normal(size=18)
        # Scale the modulation so that the radius varies by at most 10-25 %.
        peak = np.abs(_direction_monomials(_fibonacci_sphere(256)) @ coefficients).max()
        coefficients *= rng.uniform(0.10, 0.25) / peak
        return cls(radius_mm, q, scales, coefficients)

    def shrunk(self, factor: float) -> _LesionShape:
        """The same shape, ``factor`` times smaller, never below the smallest lesion we make."""
        radius = max(self.radius_mm * factor, LESION_DIAMETER_MM[0] / 2)
        return _LesionShape(radius, self.rotation, self.scales, self.coefficients)

    @property
    def extent_mm(self) -> float:
        """A radius that surely contains the lesion."""
        return self.radius_mm * float(self.scales.max()) * 1.3

    def normalised_radius(self, offsets_mm: NDArray[np.float64]) -> NDArray[np.float64]:
        """``rho``: 0 at the centre, 1 on the lesion surface, for offsets ``(..., 3)`` in mm."""
        local = offsets_mm @ self.rotation / self.scales
        dist = np.linalg.norm(local, axis=-1)
        u = local / np.maximum(dist, 1e-6)[..., None]
        radius = self.radius_mm * (1.0 + _direction_monomials(u) @ self.coefficients)
        return dist / radius


def _lesion_box(
    shape: tuple[int, ...], spacing: tuple[float, float, float], centre: NDArray[np.float64],
    extent_mm: float,
) -> tuple[slice, slice, slice]:
    """Index box around a lesion centre (voxel indices) clipped to the grid."""
    half = np.ceil(extent_mm / np.asarray(spacing)).astype(int) + 1
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + half + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _lesion_profile(
    rho: NDArray[np.float64], look: _LesionLook, texture: NDArray[np.float64]
) -> NDArray[np.float64]:
    """HU inside a lesion as a function of ``rho``: core, viable tumour, rim, plus texture."""
    c = look.core_fraction
    knots = [0.0, c, min(c + 0.2, 0.72), 0.78, 0.92, 1.5]
    values = [look.core, look.core, look.body, look.body, look.rim, look.rim]
    return np.interp(rho, knots, values) + texture


def _blend_weight(rho: NDArray[np.float64], radius_mm: float, voxel_mm: float) -> NDArray[np.float64]:
    """Partial-volume weight: 1 inside, 0 outside, a linear ramp one voxel wide at ``rho = 1``."""
    half_width = 0.5 * voxel_mm / radius_mm
    return np.clip((1.0 + half_width - rho) / (2 * half_width), 0.0, 1.0)


def _paint_lesion(
    hu: NDArray[np.float32],
    spacing: tuple[float, float, float],
    centre: NDArray[np.float64],
    shape: _LesionShape,
    look: _LesionLook,
    rng: np.random.Generator,
    *,
    keep_noise: bool,
    allowed: NDArray[np.bool_] | None = None,
) -> tuple[tuple[slice, slice, slice], NDArray[np.bool_]]:
    """Paint one lesion into ``hu`` in place; return its box and its mask within the box.

    ``keep_noise`` (real CT): the lesion replaces only the local mean of the image, so the
    scanner's own noise and texture stay on top of it; otherwise (noise-free phantom anatomy)
    it replaces the intensity outright.
    """
    box = _lesion_box(hu.shape, spacing, centre, shape.extent_mm)
    grids = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
    offsets = np.stack([(g - c) * d for g, c, d in zip(grids, centre, spacing)], axis=-1)
    rho = shape.normalised_radius(offsets)
    weight = _blend_weight(rho, shape.radius_mm, float(min(spacing)))
    if allowed is not None:
        weight = weight * allowed[box]
    texture = ndimage.gaussian_filter(rng.normal(size=rho.shape), 2.0)
    texture *= rng.uniform(5.0, 10.0) / max(float(texture.std()), 1e-6)
    lesion_hu = _lesion_profile(rho, look, texture)
    region = hu[box].astype(np.float64)
    if keep_noise:
        sigma = 1.5 / np.asarray(spacing)  # 1.5 mm: removes noise, keeps structure
        region = region + weight * (lesion_hu - ndimage.gaussian_filter(region, sigma))
    else:
        region = (1 - weight) * region + weight * lesion_hu
    hu[box] = region.astype(np.float32)
    return box, (rho <= 1.0) & (weight > 0)


def _random_look(kind: str, background_hu: float, rng: np.random.Generator) -> _LesionLook:
    """HU levels of a lesion of ``kind`` placed in tissue of ``background_hu``."""
    if kind == "hypodense":
        body = background_hu - rng.uniform(40, 60)
        return _LesionLook(
            core=max(background_hu - rng.uniform(70, 90), 5.0),
            body=max(body, 15.0),
            rim=max(background_hu - rng.uniform(15, 25), 30.0),
            core_fraction=rng.uniform(0.2, 0.5),
        )
    if kind == "hyperdense":
        return _LesionLook(
            core=background_hu + rng.uniform(25, 40),
            body=background_hu + rng.uniform(45, 65),
            rim=background_hu + rng.uniform(60, 75),
            core_fraction=rng.uniform(0.0, 0.3),
        )
    if kind == "soft-tissue":
        return _LesionLook(
            core=rng.uniform(20, 35),
            body=rng.uniform(55, 75),
            rim=rng.uniform(80, 95),
            core_fraction=rng.uniform(0.0, 0.4),
        )
    raise ValueError(f"unknown lesion kind {kind!r} (known: {', '.join(LESION_KINDS)})")


def _pick_centre(
    room_mm: NDArray[np.float64],
    radius_mm: float,
    spacing: tuple[float, float, float],
    placed: list[tuple[NDArray[np.float64], float]],
    rng: np.random.Generator,
    *,
    fraction: float,
    tries: int = 200,
) -> NDArray[np.float64] | None:
    """A voxel at least ``fraction * radius_mm`` inside its region and clear of placed lesions.

    ``placed`` holds ``(centre index, radius mm)`` of the lesions already there; a new lesion
    keeps 3 mm of tissue between itself and each of them.
    """
    candidates = np.flatnonzero(room_mm.ravel() >= fraction * radius_mm)
    if len(candidates) == 0:
        return None
    step = np.asarray(spacing)
    for flat in rng.choice(candidates, size=min(tries, len(candidates)), replace=False):
        centre = np.asarray(np.unravel_index(flat, room_mm.shape), dtype=np.float64)
        if all(np.linalg.norm((centre - c) * step) >= radius_mm + r + 3.0 for c, r in placed):
            return centre
    return None


def insert_lesions(
    hu: NDArray[np.floating],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    *,
    n_lesions: int,
    region_mask: NDArray[np.bool_] | None = None,
    kinds: tuple[str, ...] = ("hypodense", "hyperdense"),
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Insert synthetic metastases into a real CT volume.

    The lesions are the ones of the phantom (see the module docstring), with HU levels set
    relative to the median HU of the tissue around each one, and painted so that the scanner's
    own noise stays on top of them.

    Parameters
    ----------
    hu:
        ``(z, y, x)`` Hounsfield units; not modified.
    spacing:
        ``(z, y, x)`` voxel spacing in mm.
    rng:
        Source of randomness (the result is deterministic for a seeded generator).
    n_lesions:
        How many lesions to try to insert; fewer are inserted when the region has no room
        (no lesion overlaps another).
    region_mask:
        Where lesion centres may go. By default: soft tissue (smoothed HU in -50..150), eroded
        by 3 mm, so that lesions sit in muscle or organs and not in fat, air or bone.
    kinds:
        Lesion kinds to draw from, uniformly.

    Returns
    -------
    tuple
        The new ``float32`` volume and the ``bool`` mask of all inserted lesions.
    """
    out = np.array(hu, dtype=np.float32, copy=True)
    mask = np.zeros(out.shape, dtype=bool)
    if region_mask is None:
        region_mask = soft_tissue_region(out, spacing)
    room = _distance_inside(region_mask, spacing)
    placed: list[tuple[NDArray[np.float64], float]] = []
    for _ in range(n_lesions):
        shape = _LesionShape.random(rng.uniform(*LESION_DIAMETER_MM) / 2, rng)
        centre = _pick_centre(room, shape.radius_mm, spacing, placed, rng, fraction=0.8)
        # Shrink a lesion that does not fit, down to the smallest size we make.
        while centre is None and shape.radius_mm > LESION_DIAMETER_MM[0] / 2:
            shape = shape.shrunk(0.8)
            centre = _pick_centre(room, shape.radius_mm, spacing, placed, rng, fraction=0.8)
        if centre is None:
            break
        box = _lesion_box(out.shape, spacing, centre, shape.extent_mm)
        background = float(np.median(out[box][region_mask[box]]))
        look = _random_look(str(rng.choice(kinds)), background, rng)
        box, inside = _paint_lesion(out, spacing, centre, shape, look, rng, keep_noise=True,
                                    allowed=region_mask)
        mask[box] |= inside
        placed.append((centre, shape.extent_mm))
    return out, mask


def soft_tissue_region(
    hu: NDArray[np.floating], spacing: tuple[float, float, float], *, erode_mm: float = 3.0
) -> NDArray[np.bool_]:
    """Soft tissue (smoothed HU in -50..150), eroded by ``erode_mm``: where lesions may go."""
    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), 1.0 / np.asarray(spacing))
    region = (smooth > -50) & (smooth < 150)
    region = ndimage.binary_opening(region, iterations=1)
    return _distance_inside(region, spacing) > erode_mm


def _distance_inside(
    mask: NDArray[np.bool_], spacing: tuple[float, float, float], step_mm: float = 1.5
) -> NDArray[np.float32]:
    """Distance (mm) from each voxel of ``mask`` to its border, 0 outside.

    Computed on a grid subsampled to about ``step_mm`` and repeated back to full size: exact
    to about ``step_mm``, which is all lesion placement needs, and ten times faster on
    sub-millimetre CT.
    """
    strides = [max(1, int(round(step_mm / s))) for s in spacing]
    coarse = mask[tuple(slice(None, None, k) for k in strides)]
    distance = ndimage.distance_transform_edt(
        coarse, sampling=[s * k for s, k in zip(spacing, strides)]
    ).astype(np.float32)
    index = np.ix_(*(np.arange(n) // k for n, k in zip(mask.shape, strides)))
    return distance[index] * mask


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


class _Grid:
    """Millimetre coordinates of a ``(z, y, x)`` grid, centred in-plane, ``Z`` from the bottom."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        nz, ny, nx = shape
        self.shape = shape
        self.spacing = spacing
        self.z = (np.arange(nz) * spacing[0])[:, None, None]
        self.y = ((np.arange(ny) - (ny - 1) / 2) * spacing[1])[None, :, None]
        self.x = ((np.arange(nx) - (nx - 1) / 2) * spacing[2])[None, None, :]
        self.length_z = nz * spacing[0]

    def ellipsoid(self, centre: tuple[float, float, float], axes: tuple[float, float, float]):
        """Normalised squared radius of an axis-aligned ellipsoid (``<= 1`` inside)."""
        cz, cy, cx = centre
        az, ay, ax = axes
        return ((self.z - cz) / az) ** 2 + ((self.y - cy) / ay) ** 2 + ((self.x - cx) / ax) ** 2

    def index_of(self, point_mm: NDArray[np.float64]) -> NDArray[np.float64]:
        """Fractional ``(z, y, x)`` index of a point in this grid's mm coordinates."""
        nz, ny, nx = self.shape
        offset = np.array([0.0, (ny - 1) / 2, (nx - 1) / 2])
        return point_mm / np.asarray(self.spacing) + offset


def _paint_tube(
    hu: NDArray[np.float32], grid: _Grid, points_mm: NDArray[np.float64],
    radii_mm: NDArray[np.float64], value: float, where: NDArray[np.bool_] | None = None,
) -> None:
    """Paint balls of the given radii along a polyline sampled densely: a tube."""
    spacing = np.asarray(grid.spacing)
    for point, radius in zip(points_mm, radii_mm):
        centre = grid.index_of(point)
        box = _lesion_box(hu.shape, grid.spacing, centre, radius)
        if any(s.stop <= s.start for s in box):
            continue
        idx = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
        d2 = sum(((i - c) * d) ** 2 for i, c, d in zip(idx, centre, spacing))
        ball = d2 <= radius**2
        if where is not None:
            ball &= where[box]
        hu[box][ball] = value


def _random_path(
    start: NDArray[np.float64], direction: NDArray[np.float64], length_mm: float,
    rng: np.random.Generator, step_mm: float, wiggle: float,
) -> NDArray[np.float64]:
    """A smooth random walk (mm points every ``step_mm``)."""
    points = [start]
    d = direction / np.linalg.norm(direction)
    for _ in range(int(length_mm / step_mm)):
        d = d + rng.normal(scale=wiggle, size=3)
        d /= np.linalg.norm(d)
        points.append(points[-1] + step_mm * d)
    return np.asarray(points)


@dataclass(frozen=True)
class _Organs:
    """Masks the lesion placement needs."""

    liver: NDArray[np.bool_]
    visceral_fat: NDArray[np.bool_]
    liver_hu: float


def _body_masks(grid: _Grid, rng: np.random.Generator):
    """Body outline, abdominal wall muscle and cavity, from a per-seed perturbed ellipse."""
    nz, ny, nx = grid.shape
    half_x, half_y = 0.44 * nx * grid.spacing[2], 0.33 * ny * grid.spacing[1]
    angle = np.arctan2(grid.y, grid.x)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = 1 + sum(0.02 * np.cos(k * angle + p) for k, p in zip((2, 3, 5), phases))
    r = np.sqrt((grid.x / half_x) ** 2 + (grid.y / half_y) ** 2) / wobble
    r = np.broadcast_to(r, grid.shape)
    fat = rng.uniform(0.07, 0.13)
    return r <= 1.0, r <= 1.0 - fat, r <= 1.0 - fat - 0.07, (half_x, half_y)


def _anatomy(grid: _Grid, rng: np.random.Generator) -> tuple[NDArray[np.float32], _Organs]:
    """Noise-free portal-venous-phase abdomen (see the module docstring for HU values)."""
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    body, inside_fat, cavity, (half_x, half_y) = _body_masks(grid, rng)
    scale = min(half_x / 85.0, half_y / 63.0)  # organ sizes follow the body
    lz = grid.length_z
    hu[body] = -100.0
    hu[inside_fat] = 50.0
    hu[cavity] = -90.0

    def jitter(v: float, amount: float = 0.05) -> float:
        return v * (1 + rng.uniform(-amount, amount))

    # Lungs: above a dome-shaped diaphragm in the top slices.
    lung_base = jitter(0.72) * lz
    for side in (-1, 1):
        cx, cy = side * 0.45 * half_x, 0.05 * half_y
        r2 = ((grid.x - cx) / (0.42 * half_x)) ** 2 + ((grid.y - cy) / (0.75 * half_y)) ** 2
        dome = lung_base + 0.12 * lz * np.clip(1 - r2, 0, 1)
        hu[(r2 <= 1) & (grid.z > dome) & cavity] = -850.0
    # Heart: anterior, left of centre, top slices.
    heart = grid.ellipsoid((lz * 1.02, -0.25 * half_y, 0.1 * half_x),
                           (0.2 * lz, 0.35 * half_y, 0.32 * half_x)) <= 1
    hu[heart & cavity] = 135.0
    # Spleen (left, posterior) and kidneys (lower slices).
    spleen = grid.ellipsoid((jitter(0.62) * lz, 0.25 * half_y, 0.58 * half_x),
                            (0.2 * lz, 0.3 * half_y, 0.17 * half_x)) <= 1
    hu[spleen & cavity] = rng.uniform(105, 125)
    for side in (-1, 1):
        centre = (jitter(0.28) * lz, 0.45 * half_y, side * 0.42 * half_x)
        r2 = grid.ellipsoid(centre, (0.2 * lz, 0.2 * half_y, 0.13 * half_x))
        hu[(r2 <= 1) & cavity] = rng.uniform(170, 190)
        hu[(r2 <= 0.35) & cavity] = 120.0
    # Liver: large ellipsoid on the patient's right (negative x in LPS), under the diaphragm.
    liver_hu = float(rng.uniform(100, 120))
    liver_r2 = grid.ellipsoid(
        (jitter(0.46) * lz, jitter(-0.05, 0.5) * half_y, jitter(-0.38) * half_x),
        (jitter(0.42) * lz, jitter(0.62) * half_y, jitter(0.5) * half_x),
    )
    liver = (liver_r2 <= 1) & cavity
    hu[liver] = liver_hu
    _paint_liver_vessels(hu, grid, liver, rng, scale)
    # Great vessels and spine, posterior midline.
    for cx, cy, radius, value in ((0.14, 0.42, 11, 160.0), (-0.2, 0.36, 10, 132.0)):
        r2 = (grid.x - cx * half_x) ** 2 + (grid.y - cy * half_y) ** 2
        hu[np.broadcast_to(r2 <= (radius * scale) ** 2, grid.shape) & cavity] = value
    _paint_spine(hu, grid, rng, half_y, scale)
    visceral_fat = cavity & (hu == -90.0)
    _paint_bowel(hu, grid, rng, visceral_fat, half_x, half_y, scale)
    return hu, _Organs(liver=liver, visceral_fat=cavity & (hu == -90.0),
                       liver_hu=liver_hu)


def _paint_liver_vessels(hu, grid: _Grid, liver, rng, scale: float) -> None:
    """Portal and hepatic veins: tapering random tubes from the hilum, clipped to the liver."""
    coords = np.argwhere(liver)
    if len(coords) == 0:
        return
    centre_idx = coords.mean(axis=0)
    nz, ny, nx = grid.shape
    centre_mm = (centre_idx - np.array([0, (ny - 1) / 2, (nx - 1) / 2])) * np.asarray(grid.spacing)
    hilum = centre_mm + np.array([0.0, 0.0, 15.0 * scale])  # medial side of the liver
    value = float(rng.uniform(165, 185))
    step = 0.5 * min(grid.spacing)
    for _ in range(int(rng.integers(6, 10))):
        direction = rng.normal(size=3) * np.array([0.6, 1.0, 1.0]) + np.array([0, 0, -0.8])
        path = _random_path(hilum, direction, rng.uniform(40, 80) * scale, rng, step, 0.08)
        radii = np.linspace(rng.uniform(3.0, 4.5), 1.5, len(path))
        _paint_tube(hu, grid, path, radii, value, where=liver)


def _paint_spine(hu, grid: _Grid, rng, half_y: float, scale: float) -> None:
    """Vertebral bodies with cortex, discs every ~28 mm, spinal canal and posterior elements."""
    cy = 0.66 * half_y
    radius = 15.0 * scale
    r2 = np.broadcast_to(grid.x**2 + (grid.y - cy) ** 2, grid.shape)
    disc = np.broadcast_to((grid.z + rng.uniform(0, 28)) % 28.0 < 5.0, grid.shape)
    hu[r2 <= radius**2] = rng.uniform(700, 1000)
    hu[r2 <= (radius - 2.0) ** 2] = rng.uniform(200, 300)
    hu[(r2 <= radius**2) & disc] = 85.0
    canal = np.broadcast_to(grid.x**2 + (grid.y - cy - radius - 6 * scale) ** 2, grid.shape)
    hu[canal <= (9 * scale) ** 2] = 600.0
    hu[canal <= (6 * scale) ** 2] = 15.0


def _paint_bowel(hu, grid: _Grid, rng, fat, half_x: float, half_y: float, scale: float) -> None:
    """Bowel loops in the lower anterior abdomen: an enhancing wall, air or stool inside.

    Fluid-filled loops are left out on purpose: at this resolution a fluid loop cut across is
    indistinguishable from the necrotic soft-tissue lesions, and the ground truth must be
    decidable from the image.
    """
    lz = grid.length_z
    step = 0.5 * min(grid.spacing)
    for _ in range(int(rng.integers(4, 8))):
        start = np.array([rng.uniform(0.05, 0.45) * lz, rng.uniform(-0.6, 0.0) * half_y,
                          rng.uniform(-0.4, 0.6) * half_x])
        path = _random_path(start, rng.normal(size=3), rng.uniform(30, 70) * scale, rng, step, 0.15)
        radius = rng.uniform(7, 11) * scale
        content = float(rng.choice([-1000.0, -180.0, -80.0]))
        _paint_tube(hu, grid, path, np.full(len(path), radius), 60.0, where=fat)
        _paint_tube(hu, grid, path, np.full(len(path), radius - 2.5), content, where=fat)


def _correlated_noise(shape, sigma_hu: float, rng: np.random.Generator) -> NDArray[np.float32]:
    """Gaussian noise with the short-range correlation of filtered back-projection."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), (0.3, 0.8, 0.8))
    return noise * np.float32(sigma_hu / float(noise.std()))


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def make_phantom_study(
    seed: int,
    *,
    shape: tuple[int, int, int] = (48, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    n_lesions: int = 2,
    patient_name: str = "Phantom^Demo",
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    noise_hu: float | None = None,
    study_datetime: _dt.datetime = _dt.datetime(2024, 1, 15, 9, 30),
) -> Phantom:
    """A synthetic portal-venous abdominal CT with ``n_lesions`` known metastases.

    Deterministic: the same arguments give the same pixels and the same UIDs (UIDs derive from
    the seed, the patient ID and ``study_uid``), so a re-sent phantom is the same study.

    Parameters
    ----------
    seed:
        Seed of the random generator. Seeds >= 10000 are reserved for tests and the demo and
        are never used to train the shipped segmentation model.
    shape, spacing:
        ``(z, y, x)`` grid size and voxel spacing (mm).
    n_lesions:
        Number of lesions (fewer when the liver or fat has no room left for another).
    patient_name, patient_id:
        Patient module values; ``patient_id`` defaults to ``PHANTOM-<seed>``.
    study_uid, series_uid:
        Fixed UIDs, or ``None`` to derive them from the seed.
    noise_hu:
        Standard deviation of the noise; drawn in 10-20 HU when ``None``.
    study_datetime:
        Study, series and acquisition date and time.

    Returns
    -------
    Phantom
    """
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)
    hu, organs = _anatomy(grid, rng)
    labels, lesions = _add_phantom_lesions(hu, grid, organs, n_lesions, rng)
    hu = ndimage.gaussian_filter(hu, (0.4, 0.6, 0.6))  # scanner point spread function
    hu += _correlated_noise(shape, noise_hu if noise_hu is not None else rng.uniform(10, 20), rng)
    # Quantise exactly as the stored pixels will be, so ``hu`` equals what a reader gets back.
    hu = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.float32)

    patient_id = patient_id or f"PHANTOM-{seed}"
    entropy = [str(seed), patient_id, study_uid or ""]
    study_uid = study_uid or generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = series_uid or generate_uid(entropy_srcs=[*entropy, "series"])
    geometry = Geometry(
        origin=(-(shape[2] - 1) / 2 * spacing[2], -(shape[1] - 1) / 2 * spacing[1], -200.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        slice_direction=(0.0, 0.0, 1.0),
        spacing=spacing,
    )
    ids = _StudyIds(
        patient_name=patient_name, patient_id=patient_id, study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=generate_uid(entropy_srcs=[*entropy, "frame of reference"]),
        when=study_datetime,
    )
    datasets = tuple(
        _ct_slice(hu[k], k, geometry, ids, generate_uid(entropy_srcs=[*entropy, series_uid, str(k)]))
        for k in range(shape[0])
    )
    return Phantom(
        datasets=datasets, hu=hu, lesion_mask=labels > 0,
        lesion_labels=tuple(lesion.label for lesion in lesions), label_map=labels,
        geometry=geometry, lesions=lesions, seed=seed,
    )


def _add_phantom_lesions(
    hu: NDArray[np.float32], grid: _Grid, organs: _Organs, n_lesions: int, rng: np.random.Generator
) -> tuple[NDArray[np.uint16], tuple[PhantomLesion, ...]]:
    """Paint lesions into the noise-free anatomy; return the label map and their description."""
    labels = np.zeros(grid.shape, dtype=np.uint16)
    rooms = {
        "liver": _distance_inside(organs.liver, grid.spacing),
        "fat": _distance_inside(organs.visceral_fat, grid.spacing),
    }
    placed: list[tuple[NDArray[np.float64], float]] = []
    lesions: list[PhantomLesion] = []
    for _ in range(n_lesions):
        kind = str(rng.choice(LESION_KINDS, p=_LESION_KIND_P))
        room = rooms["fat" if kind == "soft-tissue" else "liver"]
        shape = _LesionShape.random(rng.uniform(*LESION_DIAMETER_MM) / 2, rng)
        centre = _pick_centre(room, shape.extent_mm, grid.spacing, placed, rng, fraction=0.85)
        while centre is None and shape.radius_mm > LESION_DIAMETER_MM[0] / 2:
            shape = shape.shrunk(0.85)
            centre = _pick_centre(room, shape.extent_mm, grid.spacing, placed, rng, fraction=0.85)
        if centre is None:
            continue
        background = organs.liver_hu if kind != "soft-tissue" else -90.0
        look = _random_look(kind, background, rng)
        box, inside = _paint_lesion(hu, grid.spacing, centre, shape, look, rng, keep_noise=False)
        label = len(lesions) + 1
        labels[box][inside & (labels[box] == 0)] = label
        placed.append((centre, shape.extent_mm))
        lesions.append(PhantomLesion(
            label=label, kind=kind, centre_index=tuple(float(c) for c in centre),
            diameter_mm=2 * shape.radius_mm, voxel_count=int((labels[box] == label).sum()),
        ))
    return labels, tuple(lesions)


@dataclass(frozen=True)
class _StudyIds:
    patient_name: str
    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    when: _dt.datetime


def _ct_slice(
    hu_slice: NDArray[np.float32], index: int, geometry: Geometry, ids: _StudyIds, sop_uid: str
) -> Dataset:
    """One CT Image Storage instance (PS3.3 A.3) holding ``hu_slice``."""
    date, time = ids.when.strftime("%Y%m%d"), ids.when.strftime("%H%M%S")
    position = np.asarray(geometry.origin) + index * geometry.spacing[0] * np.asarray(
        geometry.slice_direction)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"DICOMNODE_{__version__}"[:16]
    # SOP Common (C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    # Patient (C.7.1.1)
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = ids.study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ids.patient_id[-16:]
    ds.StudyDescription = "Synthetic abdominal CT (dicomnode phantom)"
    # General Series (C.7.3.1)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = ids.series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "Phantom portal venous 2.5 mm"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "FFS"
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = ids.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = "phantom"
    ds.SoftwareVersions = __version__
    ds.InstitutionName = "Synthetic"
    # General Acquisition / General Image (C.7.6.1)
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BurnedInAnnotation = "NO"
    # Image Plane (C.7.6.2)
    ds.PixelSpacing = [f"{geometry.spacing[1]:g}", f"{geometry.spacing[2]:g}"]
    ds.ImageOrientationPatient = [*map(float, geometry.row_direction),
                                  *map(float, geometry.column_direction)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.SliceThickness = f"{geometry.spacing[0]:g}"
    ds.SliceLocation = round(float(position[2]), 4)
    # Contrast/Bolus (C.7.6.4): the phantom imitates a portal venous phase.
    ds.ContrastBolusAgent = "Iodinated contrast (simulated)"
    ds.ContrastBolusRoute = "IV"
    # CT Image (C.8.2.1) and Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu_slice.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{_RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.WindowCenter = "50"
    ds.WindowWidth = "400"
    ds.PixelData = (hu_slice - _RESCALE_INTERCEPT).astype("<i2").tobytes()
    return ds


def write_study(phantom: Phantom, folder: Path | str) -> list[Path]:
    """Write one Part 10 file (PS3.10) per slice into ``folder``; return their paths in order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ds in enumerate(phantom.datasets):
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
