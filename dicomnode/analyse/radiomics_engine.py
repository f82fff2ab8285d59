"""Run a pyradiomics protocol on one lesion with pyradiomics' own numerics, several times faster.

``RadiomicsFeatureExtractor.execute`` spends a large lesion's time discretising each filtered
image six times (once per feature class, with Python's ``min``/``max`` over every voxel) and
computing the eleven images one after the other on one core. This module runs the same steps
with pyradiomics' own functions, in the same order and on the same inputs:

- the same mask checks, resegmentation, shape class and image filters (``getLoGImage``,
  ``getWaveletImage``, ...), each image cropped to the resegmented mask's bounding box as
  pyradiomics crops it;
- one discretisation per image, shared by its feature classes: pyradiomics' fixed-bin-width
  rule (:func:`discretise`), computed once instead of six times;
- pyradiomics' own feature classes (their C texture matrices and their feature formulas);
- the shape class and every image's feature classes as separate tasks on a pool of worker
  processes (``workers``), so that a 2-core machine computes two images at a time.

The values are therefore pyradiomics' to the last bit on the image it is given: a test checks
every feature of three cases for equality with ``RadiomicsFeatureExtractor.execute``. Segment-based
extraction only (no voxel-based maps), and no ``binCount`` (the protocol bins by width).

PURE: no disk access; worker processes receive arrays and return numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import numpy as np
import pywt
import SimpleITK as sitk
import threadpoolctl
from radiomics import featureextractor, getFeatureClasses, imageoperations

from dicomnode.analyse.mesh import FastShape, calibration
from dicomnode.errors import ModelError

log = logging.getLogger(__name__)

#: Settings key under which the feature classes of one image find their shared discretisation.
_SHARED = "_dicomnode_shared_discretisation"


def discretise(
    values: np.ndarray, mask: np.ndarray, bin_width: float
) -> tuple[np.ndarray, np.ndarray]:
    """pyradiomics' fixed-bin-width discretisation (``imageoperations.binImage``), vectorised.

    Bin edges are multiples of ``bin_width`` from the one at or below the ROI's minimum; a
    voxel inside ``mask`` gets the 1-based index of its bin, every other voxel 0. pyradiomics
    finds the ROI's minimum and maximum with Python's ``min``/``max`` over a numpy array, one
    element at a time; ``ndarray.min``/``max`` return the same numbers, so the edges and every
    bin are identical (a unit test compares the two on random and flat regions).

    Returns the discretised array (``int``, the shape of ``values``) and the grey levels
    present in the ROI, ascending.
    """
    roi = values[mask]
    low, high = roi.min(), roi.max()
    edges = np.arange(low - (low % bin_width), high + 2 * bin_width, bin_width)
    if len(edges) == 1:  # a flat ROI: one bin around its value, as pyradiomics does
        edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
    binned = np.zeros(values.shape, dtype=int)
    binned[mask] = np.digitize(roi, edges)
    return binned, np.unique(binned[mask])


def check_mask(mask: sitk.Image, settings: Mapping[str, Any]) -> np.ndarray:
    """pyradiomics' ``checkMask`` for a mask on the image's own grid: the label's bounding box.

    The same bounding box (``(L_x, U_x, L_y, U_y, L_z, U_z)``) and the same refusals (label
    absent, one voxel, fewer dimensions than ``minimumROIDimensions``, no more voxels than
    ``minimumROISize``), from numpy instead of a ``LabelStatisticsImageFilter`` over every
    voxel's intensity. The geometry check has nothing to check: dicomnode builds the image and
    the mask on one grid.
    """
    label = settings.get("label", 1)
    lesion = sitk.GetArrayViewFromImage(mask) == label
    if not lesion.any():
        raise ValueError(f"Label ({label}) not present in mask")
    box = []
    for axis in (2, 1, 0):  # x, y, z: SimpleITK's index order
        occupied = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != axis)))
        box += [int(occupied[0]), int(occupied[-1])]
    bounds = np.array(box)
    dimensions = int(np.sum((bounds[1::2] - bounds[0::2] + 1) > 1))
    if dimensions == 0:
        raise ValueError("mask only contains 1 segmented voxel! Cannot extract features for a single voxel.")
    minimum = settings.get("minimumROIDimensions", 2)
    if dimensions < minimum:
        raise ValueError(
            f"mask has too few dimensions (number of dimensions {dimensions}, minimum required {minimum})"
        )
    min_size = settings.get("minimumROISize")
    if min_size is not None and int(lesion.sum()) <= min_size:
        raise ValueError(f"Size of the ROI is too small (minimum size: {min_size}, ROI size: {int(lesion.sum())}")
    return bounds


class _SharedDiscretisation:
    """Mixin for a pyradiomics feature class: take the image's discretisation from the cache
    shared by all classes of that image, computing it only for the first class."""

    settings: dict[str, Any]
    maskArray: np.ndarray
    coefficients: dict[str, Any]

    def _applyBinning(self, matrix: np.ndarray) -> np.ndarray:  # noqa: N802 (pyradiomics' name)
        shared = self.settings[_SHARED]
        if "binned" not in shared:
            shared["binned"], shared["levels"] = discretise(
                matrix, self.maskArray, self.settings.get("binWidth", 25)
            )
        self.coefficients["grayLevels"] = shared["levels"]
        self.coefficients["Ng"] = int(shared["levels"].max())
        # A copy, as pyradiomics gives every class its own array.
        return shared["binned"].copy()


class _FirstOrderOnce:
    """Mixin for pyradiomics' first-order class: each moment and the percentiles computed once
    per image, not once per feature that uses them, with the same numpy operations.

    pyradiomics works with NaN-aware reductions (``nanmean``, ``nanpercentile``) that copy the
    voxels for each feature. In segment-based extraction the voxel array holds no NaN; there
    ``mean`` and ``percentile`` take the same sums and order statistics, so the values are
    bit-identical (checked against pyradiomics by ``tests/integration/test_radiomics_exact.py``).
    Anything else goes to pyradiomics' own code.
    """

    targetVoxelArray: np.ndarray

    def _initCalculation(self, voxelCoordinates: Any = None) -> None:  # noqa: N802, N803
        super()._initCalculation(voxelCoordinates)  # type: ignore[misc]
        self._once: dict[Any, np.ndarray] = {}
        self._plain = voxelCoordinates is None and not np.isnan(self.targetVoxelArray).any()

    def _moment(self, a: np.ndarray, moment: int = 1) -> Any:
        if moment == 1 or not self._plain or a is not self.targetVoxelArray:
            return super()._moment(a, moment)  # type: ignore[misc]
        if moment not in self._once:
            centred = a - self._mean()
            self._once[moment] = np.mean(np.power(centred, moment), 1)
        # pyradiomics' callers change the moment they get in place.
        return self._once[moment].copy()

    def _mean(self) -> np.ndarray:
        if "mean" not in self._once:
            self._once["mean"] = np.mean(self.targetVoxelArray, 1, keepdims=True)
        return self._once["mean"]

    def _percentile(self, q: int) -> np.ndarray:
        if "percentiles" not in self._once:
            self._once["percentiles"] = np.percentile(self.targetVoxelArray, _PERCENTILES, axis=1)
        return self._once["percentiles"][_PERCENTILES.index(q)].copy()

    def get10PercentileFeatureValue(self) -> Any:  # noqa: N802 (pyradiomics' names)
        if not self._plain:
            return super().get10PercentileFeatureValue()  # type: ignore[misc]
        return self._percentile(10)

    def get90PercentileFeatureValue(self) -> Any:  # noqa: N802
        if not self._plain:
            return super().get90PercentileFeatureValue()  # type: ignore[misc]
        return self._percentile(90)

    def getInterquartileRangeFeatureValue(self) -> Any:  # noqa: N802
        if not self._plain:
            return super().getInterquartileRangeFeatureValue()  # type: ignore[misc]
        return self._percentile(75) - self._percentile(25)

    def getMeanFeatureValue(self) -> Any:  # noqa: N802
        if not self._plain:
            return super().getMeanFeatureValue()  # type: ignore[misc]
        return self._mean()[:, 0].copy()

    def getMeanAbsoluteDeviationFeatureValue(self) -> Any:  # noqa: N802
        if not self._plain:
            return super().getMeanAbsoluteDeviationFeatureValue()  # type: ignore[misc]
        return np.mean(np.absolute(self.targetVoxelArray - self._mean()), 1)


#: The percentiles first-order features use (10th, 90th, quartiles).
_PERCENTILES = [10, 25, 75, 90]


def _mixins(name: str) -> tuple[type, ...]:
    return (_FirstOrderOnce, _SharedDiscretisation) if name == "firstorder" else (_SharedDiscretisation,)


# Each keeps its pyradiomics module name, so that it logs to pyradiomics' loggers.
_CLASSES: dict[str, type] = {
    name: type(f"Shared{cls.__name__}", (*_mixins(name), cls), {"__module__": cls.__module__})
    for name, cls in getFeatureClasses().items()
}


#: A padding that reaches past any image's edge: :func:`grow` then keeps the whole axis.
_WHOLE_AXIS = 2**31 - 1

#: Image types whose filter runs in a worker, one task per sigma: a LoG needs the wide crop
#: (16 sigmas around the lesion), costs as much as the features of its image, and gives one
#: image. The other filters run in the calling process on the tightest crop they allow.
_FILTERED_IN_WORKER = "LoG"


@dataclass(frozen=True)
class ImageTask:
    """What a worker needs to compute a part of one lesion's features (picklable).

    ``kind`` says which part: ``"shape"`` (the shape classes, on the original image),
    ``"image"`` (the texture classes of one image, named ``name``) or ``"filter"`` (apply the
    pyradiomics image type ``name`` with ``settings``, then the texture classes of each image
    it gives).
    """

    kind: Literal["shape", "image", "filter"]
    name: str
    #: The image, as small an integer type as holds its values exactly (see :func:`_compact`);
    #: :attr:`image_dtype` is its own type.
    image: np.ndarray
    image_dtype: str
    #: The mask on its own bounding box (pyradiomics crops every image to it before the
    #: feature classes), and where that box starts in :attr:`image`, ``(z, y, x)``.
    mask: np.ndarray
    mask_at: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    settings: Mapping[str, Any]
    #: Feature class name -> the listed features, or ``None`` for all non-deprecated ones.
    classes: Mapping[str, Sequence[str] | None]
    #: Shape coefficients from :mod:`dicomnode.analyse.mesh` (linear time, within 1e-11)
    #: rather than pyradiomics' pairwise C loop (bit-identical).
    fast_shape: bool = True


def compute(task: ImageTask) -> dict[str, float]:
    """The features of one :class:`ImageTask`, named as pyradiomics names them."""
    image = _image(task.image, task.spacing_xyz, task.image_dtype)
    mask = _image(task.mask, task.spacing_xyz)
    if task.kind == "shape":
        classes = {**_CLASSES, "shape": FastShape} if task.fast_shape else _CLASSES
        return _class_features("original", image, mask, task.settings, task.classes, classes)
    if task.kind == "image":
        return _class_features(task.name, image, mask, task.settings, task.classes)
    features: dict[str, float] = {}
    on_mask = _sitk_region(task.mask_at, task.mask.shape)
    # pyradiomics' filters read the image only: the mask argument is not used.
    derived = getattr(imageoperations, f"get{task.name}Image")(image, mask, **task.settings)
    for derived_image, name, kwargs in derived:
        features |= _class_features(name, derived_image[on_mask], mask, kwargs, task.classes)
    return features


def _class_features(
    prefix: str,
    image: sitk.Image,
    mask: sitk.Image,
    settings: Mapping[str, Any],
    classes: Mapping[str, Sequence[str] | None],
    implementations: Mapping[str, type] = _CLASSES,
) -> dict[str, float]:
    """pyradiomics' ``computeFeatures`` (or ``computeShape``) on an image already cut to the
    mask's bounding box, its texture classes sharing one discretisation."""
    settings = {**settings, _SHARED: {}}
    features: dict[str, float] = {}
    for class_name, listed in classes.items():
        feature_class = implementations[class_name](image, mask, **settings)
        for feature in listed or ():
            feature_class.enableFeatureByName(feature)
        for feature, value in feature_class.execute().items():
            features[f"{prefix}_{class_name}_{feature}"] = float(value)
    return features


def wavelet_reach(settings: Mapping[str, Any]) -> int:
    """How far (voxels) a wavelet coefficient sees, for pyradiomics' wavelet ``settings``: the
    stationary transform's filter, dilated by 2 at each level up to the last one pyradiomics
    computes, plus the voxel pyradiomics wraps onto an odd axis."""
    taps = pywt.Wavelet(settings.get("wavelet", "coif1")).dec_len
    levels = int(settings.get("start_level", 0)) + int(settings.get("level", 1))
    return (taps - 1) * (2**levels - 1) + 1


def grow(first: int, last: int, pad: int, size: int, need: int = 0) -> tuple[int, int]:
    """The range ``[start, stop)`` of an axis of ``size`` voxels that keeps voxels ``first`` to
    ``last`` with ``pad`` more on each side, and at least ``need`` voxels where the axis has
    them.

    Where the padded range goes past an end of the axis it takes the whole axis: pyradiomics'
    wavelet wraps each axis around (periodic extension), so a voxel near one end sees the
    voxels at the other, and only the whole axis gives it the same neighbours.
    """
    start, stop = first - pad, last + 1 + pad
    if start < 0 or stop > size:
        return 0, size
    missing = need - (stop - start)
    if missing > 0:
        start = max(0, start - (missing + 1) // 2)
        stop = min(size, start + need)
        start = max(0, stop - need)
    return int(start), int(stop)


class ProtocolRunner:
    """Run one pyradiomics extractor's protocol on lesions, with a pool of ``workers``.

    Parameters
    ----------
    extractor:
        The configured pyradiomics extractor (its settings, image types and feature classes).
    workers:
        Worker processes for the images of a lesion; 1 computes everything in this process.
        The pool starts on first use (or :meth:`warm_up`) and lives until :meth:`close`.
    fast_shape:
        Shape coefficients in linear time (:mod:`dicomnode.analyse.mesh`, within 1e-11 of
        pyradiomics) rather than by pyradiomics' pairwise loop (bit-identical, quadratic).
    log_tail_sigmas:
        Filter each LoG image on the lesion's bounding box grown by this many of its sigmas
        (the recursive Gaussian's border effect decays as exp(-1.3 d / sigma)); ``None``
        filters the whole image given, as pyradiomics does.

    Raises
    ------
    ModelError
        The protocol asks for something this runner does not do (voxel-based extraction,
        ``binCount``) or names a feature class pyradiomics does not have.
    """

    def __init__(
        self,
        extractor: featureextractor.RadiomicsFeatureExtractor,
        workers: int = 1,
        log_tail_sigmas: float | None = None,
        fast_shape: bool = True,
    ):
        settings = extractor.settings
        if settings.get("binCount") is not None:
            raise ModelError("binCount is not supported: dicomnode's protocols bin by width")
        unknown = sorted(set(extractor.enabledFeatures) - set(_CLASSES))
        if unknown:
            raise ModelError(f"unknown pyradiomics feature classes: {', '.join(unknown)}")
        self.extractor = extractor
        self.workers = max(1, int(workers))
        self.log_tail_sigmas = log_tail_sigmas
        self.fast_shape = fast_shape
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def execute(self, image: sitk.Image, mask: sitk.Image) -> dict[str, float]:
        """Features of ``mask``'s label in ``image``, as ``extractor.execute`` computes them.

        Raises ``ValueError`` where pyradiomics does (a mask it refuses).
        """
        tasks = self._tasks(image, mask)
        if self.workers == 1:
            parts = [compute(task) for task in tasks]
        else:
            try:
                futures = [self._submit(task) for task in tasks]
                parts = [future.result() for future in futures]
            except BrokenProcessPool:
                # A worker died (killed for memory?): the next lesion gets a fresh pool.
                self.close()
                raise RuntimeError(
                    "a radiomics worker process died (out of memory?); "
                    "set [radiomics] workers = 1 to compute in the node's own process"
                ) from None
        return dict(chain.from_iterable(part.items() for part in parts))

    def warm_up(self) -> None:
        """Start the worker processes now (they import pyradiomics), without waiting for them;
        nothing when they run already."""
        if self.workers > 1 and self._pool is None:
            for _ in range(self.workers):
                self._submit_call(os.getpid)

    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the running workers (none before the first use)."""
        with self._lock:
            return self.worker_pids_locked()

    def worker_pids_locked(self) -> tuple[int, ...]:
        return tuple(getattr(self._pool, "_processes", None) or {})

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`execute` starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _tasks(self, image: sitk.Image, mask: sitk.Image) -> Iterator[ImageTask]:
        """pyradiomics' ``execute``, segment-based, as a stream of tasks, longest first.

        A generator: workers compute the first tasks while this process still filters the
        images of the next ones.
        """
        settings = self.extractor.settings.copy()
        enabled = self.extractor.enabledFeatures
        if image.GetSize() != mask.GetSize():
            raise ValueError(f"image {image.GetSize()} and mask {mask.GetSize()} differ in size")
        image, mask = self.extractor.loadImage(image, mask, None, **settings)
        box = check_mask(mask, settings)
        # From here the mask matters on its bounding box only: resegmentation goes voxel by
        # voxel, and pyradiomics crops every image to that box before its feature classes.
        shape_mask = texture_mask = mask[_sitk_box(box)]
        if settings.get("resegmentRange") is not None:
            resegmented = imageoperations.resegmentMask(image[_sitk_box(box)], shape_mask, **settings)
            inner = check_mask(resegmented, settings)
            box = inner + np.repeat(box[0::2], 2)
            shape_mask, texture_mask = shape_mask[_sitk_box(inner)], resegmented[_sitk_box(inner)]
            if settings.get("resegmentShape", False):
                shape_mask = texture_mask
        shape = {name: listed for name, listed in enabled.items() if name == "shape"}
        texture = {name: listed for name, listed in enabled.items() if not name.startswith("shape")}
        image_types = self.extractor.enabledImagetypes
        # Longest first: the LoG images (widest sigma first), whose filters run in the workers.
        if _FILTERED_IN_WORKER in image_types:
            args = {**settings, **image_types[_FILTERED_IN_WORKER]}
            for sigma in sorted(args.get("sigma", []), reverse=True):
                part = {**args, "sigma": [sigma]}
                cut, at = _cut(box, self._log_reach(sigma, image.GetSpacing()), image.GetSize())
                yield _task("filter", _FILTERED_IN_WORKER, image[cut], texture_mask, at, part, texture)
        if shape:
            yield _task("shape", "shape", image[_sitk_box(box)], shape_mask, (0, 0, 0), settings,
                        shape, self.fast_shape)
        for image_type, custom in image_types.items():
            if image_type == _FILTERED_IN_WORKER:
                continue
            args = {**settings, **custom}
            reach = wavelet_reach(args) if image_type == "Wavelet" else 0
            cut, at = _cut(box, (reach,) * 3, image.GetSize())
            on_mask = _sitk_region(at, texture_mask.GetSize()[::-1])
            derived = getattr(imageoperations, f"get{image_type}Image")(image[cut], mask, **args)
            for derived_image, name, kwargs in derived:
                yield _task("image", name, derived_image[on_mask], texture_mask, (0, 0, 0), kwargs,
                            texture)

    def _log_reach(self, sigma: float, spacing_xyz: Sequence[float]) -> tuple[int, int, int]:
        """Voxels kept around the lesion for a LoG of ``sigma`` mm, per axis ``(x, y, z)``."""
        if self.log_tail_sigmas is None:
            return (_WHOLE_AXIS,) * 3
        reach = [math.ceil(self.log_tail_sigmas * sigma / step) for step in spacing_xyz]
        return (reach[0], reach[1], reach[2])

    def _submit(self, task: ImageTask) -> Future:
        return self._submit_call(compute, task)

    def _submit_call(self, function: Any, *args: Any) -> Future:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                # Workers fork from a server that has imported pyradiomics once.
                context.set_forkserver_preload([__name__])
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(self.fast_shape, os.getpid()),
                )
            if len(self.worker_pids_locked()) >= self.workers:
                return self._pool.submit(function, *args)
            with _without_main_module():  # this submit may start a worker
                return self._pool.submit(function, *args)


def _task(
    kind: Literal["shape", "image", "filter"],
    name: str,
    image: sitk.Image,
    mask: sitk.Image,
    mask_at: tuple[int, int, int],
    settings: Mapping[str, Any],
    classes: Mapping[str, Sequence[str] | None],
    fast_shape: bool = True,
) -> ImageTask:
    array = sitk.GetArrayViewFromImage(image)
    return ImageTask(
        kind=kind,
        name=name,
        image=_compact(array),
        image_dtype=array.dtype.str,
        mask=_compact(sitk.GetArrayViewFromImage(mask)),
        mask_at=mask_at,
        spacing_xyz=tuple(image.GetSpacing()),  # type: ignore[arg-type]
        settings=settings,
        classes=classes,
        fast_shape=fast_shape,
    )


def _sitk_box(box: np.ndarray) -> tuple[slice, slice, slice]:
    """SimpleITK's ``[x, y, z]`` slices of a bounding box ``(L_x, U_x, L_y, U_y, L_z, U_z)``."""
    return tuple(slice(int(box[2 * a]), int(box[2 * a + 1]) + 1) for a in range(3))  # type: ignore[return-value]


def _sitk_region(start_zyx: Sequence[int], shape_zyx: Sequence[int]) -> tuple[slice, slice, slice]:
    """SimpleITK's ``[x, y, z]`` slices of the region of ``shape_zyx`` at ``start_zyx``."""
    return tuple(  # type: ignore[return-value]
        slice(int(start), int(start) + int(size))
        for start, size in zip(reversed(start_zyx), reversed(shape_zyx))
    )


def _cut(
    box: np.ndarray, pad_xyz: Sequence[int], size_xyz: Sequence[int]
) -> tuple[tuple[slice, slice, slice], tuple[int, int, int]]:
    """SimpleITK's ``[x, y, z]`` slices of ``box`` grown by ``pad_xyz`` (see :func:`grow`), and
    where the box starts in that cut, ``(z, y, x)``."""
    ranges = [grow(box[2 * a], box[2 * a + 1], pad_xyz[a], size_xyz[a]) for a in range(3)]
    cut = tuple(slice(start, stop) for start, stop in ranges)
    at = [int(box[2 * a]) - ranges[a][0] for a in range(3)]
    return cut, (at[2], at[1], at[0])  # type: ignore[return-value]


def _compact(array: np.ndarray) -> np.ndarray:
    """A copy of ``array`` (which may be a view of a SimpleITK image's memory), as uint8 or
    int16 where that type holds every value exactly (a mask, the HU of a CT): a quarter or
    less of the bytes to send to a worker, and the same numbers back."""
    if array.size:
        low, high = array.min(), array.max()  # NaN compares false: kept as it is
        for kind in (np.uint8, np.int16):
            limits = np.iinfo(kind)
            if array.dtype.itemsize > limits.bits // 8 and limits.min <= low and high <= limits.max:
                small = array.astype(kind)
                if np.array_equal(small, array):
                    return small
    return array.copy()


def _exit_when_gone(pid: int, poll_seconds: float = 1.0) -> None:
    """End this worker once process ``pid`` has gone (the node was killed with SIGKILL).

    Nothing in concurrent.futures ends the workers of a killed owner: they, and the forkserver
    they came from, were found alive long after the node.
    """
    while True:
        time.sleep(poll_seconds)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Start processes that do not import this process's main module.

    multiprocessing's forkserver (and spawn) makes every new process import the parent's
    ``__main__`` (the ``dicomnode`` command, which imports torch and every model's code:
    about 320 MB per worker that a worker never uses). A worker needs only this module, so
    while a worker is started ``__main__`` is an empty module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start_worker(fast_shape: bool, owner_pid: int) -> None:
    """A worker: ends with the process that owns the pool, quiet pyradiomics, one BLAS and one
    ITK thread (the pool is the parallelism), and the shape calibration done now, while the
    node is still busy with other things."""
    from dicomnode.analyse.radiomics import quiet_pyradiomics

    threading.Thread(
        target=_exit_when_gone, args=(owner_pid,), name="exit-with-owner", daemon=True
    ).start()
    quiet_pyradiomics()
    threadpoolctl.threadpool_limits(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    if fast_shape:
        calibration()


#: SimpleITK's pixel type for a compacted image's own type (see :func:`_compact`).
_PIXEL_TYPES = {np.dtype(np.float64).str: sitk.sitkFloat64, np.dtype(np.float32).str: sitk.sitkFloat32}


def _image(
    array: np.ndarray, spacing_xyz: tuple[float, float, float], dtype: str | None = None
) -> sitk.Image:
    """A SimpleITK image of ``array`` in the type ``dtype``: cast by SimpleITK, which spares a
    full-size numpy copy of a large LoG crop."""
    image = sitk.GetImageFromArray(array)
    if dtype is not None and np.dtype(dtype) != array.dtype:
        pixel_type = _PIXEL_TYPES.get(np.dtype(dtype).str)
        if pixel_type is None:
            image = sitk.GetImageFromArray(array.astype(dtype))
        else:
            image = sitk.Cast(image, pixel_type)
    image.SetSpacing(spacing_xyz)
    return image
