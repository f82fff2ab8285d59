"""Radiomics features of each lesion, computed by pyradiomics with the seed-001 protocol.

The protocol lives in a pyradiomics parameter file (``models/radiomics/tmb_protocol.yaml``:
1037 features per lesion). pyradiomics is the reference implementation: this module crops the
CT around the lesion by as much as the protocol's filters need (:meth:`RadiomicsExtractor.
margin_voxels`), hands the lesion as SimpleITK images built from ``(z, y, x)`` arrays to
:class:`~dicomnode.analyse.radiomics_engine.ProtocolRunner` (pyradiomics' own steps, faster,
on a pool of processes), and puts the result in a fixed order. Every feature stays within 1e-6
relative of pyradiomics on the whole image (``tests/integration/test_radiomics_exact.py``);
``crop_margin_mm = 0`` is pyradiomics to the bit.

Failure policy (documented in ``models/radiomics/README.md``):

- an empty lesion mask, or an image and mask on different grids, is a caller error and raises
  :class:`~dicomnode.errors.InputRejected`;
- a lesion that pyradiomics refuses (e.g. fewer than two voxels inside the resegmentation
  range, or a mask that is flat in two dimensions) does not fail the job: its features are all
  NaN and :attr:`LesionFeatures.warnings` says why; single features that pyradiomics could not
  compute are NaN with a warning too.

PURE: no disk writes (the parameter file is read once, at construction).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pykwalify.errors
import radiomics
import SimpleITK as sitk
import yaml
from radiomics import featureextractor

from dicomnode.analyse.radiomics_engine import ProtocolRunner, grow, wavelet_reach
from dicomnode.config import AUTO_MARGIN, RadiomicsConfig, crop_margin
from dicomnode.errors import ConfigError, InputRejected, ModelError
from dicomnode.types import LabelVolume, LesionFeatures, Volume

log = logging.getLogger(__name__)

#: pyradiomics logs this for every image because Sum Average (one of the paper's 24 GLCM
#: features) equals twice Joint Average on a symmetrical GLCM: it says nothing about a lesion.
_SUM_AVERAGE_NOTICE = "GLCM is symmetrical, therefore Sum Average"

#: pyradiomics skips every LoG image of an image with fewer voxels than this along any axis.
_LOG_MIN_VOXELS = 4

#: How many sigmas of the largest LoG the automatic crop keeps around a lesion. SimpleITK's LoG
#: is a recursive (IIR) Gaussian whose response to the crop's edge decays about as
#: exp(-1.3 d / sigma): on pyradiomics' lung1 case the largest feature difference from the
#: whole image was 3e-5 at 6.7 sigmas, 3e-9 at 14 and 0 at 16; lung2 and ibsi_sts_001 were
#: within 2e-12 and 1e-9 at 16 (see models/radiomics/README.md).
LOG_TAIL_SIGMAS = 16

#: How many feature names a warning quotes before "...".
_NAMES_QUOTED = 3


class _DropSumAverageNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _SUM_AVERAGE_NOTICE not in record.getMessage()


def quiet_pyradiomics() -> None:
    """Keep pyradiomics (and pykwalify, its parameter-file validator) at WARNING.

    Also drops the notice every lesion triggers. Idempotent; called by
    :class:`RadiomicsExtractor` so that worker processes are quiet too.
    """
    radiomics.setVerbosity(logging.WARNING)
    for name in ("radiomics", "pykwalify"):
        logging.getLogger(name).setLevel(logging.WARNING)
    glcm_logger = logging.getLogger("radiomics.glcm")
    if not any(isinstance(f, _DropSumAverageNotice) for f in glcm_logger.filters):
        glcm_logger.addFilter(_DropSumAverageNotice())


class RadiomicsExtractor:
    """Compute a pyradiomics protocol's features for lesions given as ``(z, y, x)`` arrays.

    Parameters
    ----------
    params_file:
        pyradiomics parameter file (YAML) of the protocol.
    crop_margin_mm:
        ``"auto"`` (the default): image and mask are cropped to the lesion's bounding box
        plus the margin the protocol's filters need (:meth:`margin_voxels`) before the LoG
        and wavelet filters run, so that every feature equals pyradiomics' on the whole image
        to within 1e-9 relative (tested on the shared cases and real sarcoma patients), at a
        fraction of the cost on a whole CT. ``0`` filters the whole image: bit-identical to
        ``RadiomicsFeatureExtractor.execute``. A positive number is a fixed margin in mm:
        20 mm keeps features within about 5e-5, 10 mm changes wavelet features near zero by
        up to 100% (see ``models/radiomics/README.md``).
    workers:
        Processes computing a lesion's images in parallel (1: all in this process). The
        values do not depend on it.

    Raises
    ------
    ModelError
        The parameter file is missing, invalid, or asks for something dicomnode cannot name
        in advance (an image type other than Original, LoG and Wavelet, or 2D extraction).
    ConfigError
        ``crop_margin_mm`` is neither ``"auto"`` nor a finite number >= 0, or ``workers`` < 1.
    """

    def __init__(
        self, params_file: Path, *, crop_margin_mm: float | str = AUTO_MARGIN, workers: int = 1
    ) -> None:
        self.crop_margin_mm = crop_margin(crop_margin_mm)
        if not (isinstance(workers, int) and workers >= 1):
            raise ConfigError(f"radiomics.workers: must be an integer >= 1, got {workers!r}")
        quiet_pyradiomics()
        self.params_file = Path(params_file)
        self._extractor = _load_protocol(self.params_file)
        self.feature_names: tuple[str, ...] = protocol_feature_names(self._extractor)
        #: Value of the lesion in the mask image handed to pyradiomics (the protocol's label).
        self._mask_value = int(self._extractor.settings.get("label", 1))
        self._log_sigmas_mm = _log_sigmas_mm(self._extractor)
        wavelet = self._extractor.enabledImagetypes.get("Wavelet")
        self._wavelet_reach = (
            0 if wavelet is None else wavelet_reach({**self._extractor.settings, **wavelet})
        )
        # The automatic margin crops each LoG image to its own sigma's reach; a fixed margin
        # (or none) filters every image on the same crop.
        # No crop is pyradiomics to the bit, its quadratic shape loop included.
        tail = LOG_TAIL_SIGMAS if self.crop_margin_mm == AUTO_MARGIN else None
        self._runner = ProtocolRunner(
            self._extractor, workers, log_tail_sigmas=tail, fast_shape=self.crop_margin_mm != 0
        )

    @property
    def workers(self) -> int:
        return self._runner.workers

    def warm_up(self) -> None:
        """Start the worker processes in the background, so that the first lesion need not."""
        self._runner.warm_up()

    def worker_pids(self) -> tuple[int, ...]:
        """Process ids of the running worker processes (for memory figures)."""
        return self._runner.worker_pids()

    def close(self) -> None:
        """Stop the worker processes."""
        self._runner.close()

    @classmethod
    def from_config(cls, cfg: RadiomicsConfig) -> RadiomicsExtractor:
        """The extractor described by the ``[radiomics]`` section of a configuration (its
        paths resolved by :class:`~dicomnode.config.Config`)."""
        return cls(
            cfg.params_file,
            crop_margin_mm=cfg.crop_margin_mm,
            workers=cfg.worker_processes,
        )

    def extract(self, volume: Volume, labels: LabelVolume) -> tuple[LesionFeatures, ...]:
        """Features of every lesion of ``labels``, in the order of ``labels.lesions``."""
        if labels.labels.shape != volume.hu.shape:
            raise InputRejected(
                f"segmentation grid {labels.labels.shape} differs from "
                f"the CT grid {volume.hu.shape}"
            )
        spacing = volume.geometry.spacing
        return tuple(
            self.extract_arrays(volume.hu, labels.labels, spacing, label=lesion.label)
            for lesion in labels.lesions
        )

    def extract_arrays(
        self,
        hu: np.ndarray,
        mask: np.ndarray,
        spacing_zyx: Sequence[float],
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
        lesion = mask == label
        if not lesion.any():
            raise InputRejected(f"lesion {label}: its mask is empty, there is nothing to measure")
        if self.crop_margin_mm != 0:
            box = _crop_box(lesion, self.margin_voxels(spacing), self._min_extent(spacing))
            hu, lesion = hu[box], lesion[box]
        image = _sitk_image(hu.astype(np.float64, copy=False), spacing)
        mask_image = _sitk_image(lesion.astype(np.uint8) * np.uint8(self._mask_value), spacing)
        try:
            raw = self._runner.execute(image, mask_image)
        except ValueError as exc:
            # pyradiomics' own mask checks (too few voxels left by the resegmentation range,
            # a lesion flat in two dimensions): one bad lesion must not fail the whole series.
            return self._all_missing(label, str(exc))
        return self._in_protocol_order(label, raw)

    def margin_voxels(self, spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
        """Voxels kept around the lesion's bounding box on each side, per axis ``(z, y, x)``.

        With ``crop_margin_mm = "auto"`` the margin follows from the protocol: the wavelet's
        reach (filter length and levels, in voxels) and :data:`LOG_TAIL_SIGMAS` times the
        largest LoG sigma. A fixed margin in mm is converted per axis.
        """
        margins = []
        for step in spacing_zyx:
            if self.crop_margin_mm == AUTO_MARGIN:
                log_reach = LOG_TAIL_SIGMAS * max(self._log_sigmas_mm, default=0.0)
                margins.append(max(math.ceil(log_reach / step), self._wavelet_reach))
            else:
                margins.append(math.ceil(float(self.crop_margin_mm) / step))
        return (margins[0], margins[1], margins[2])

    def _min_extent(self, spacing: tuple[float, float, float]) -> tuple[int, int, int]:
        """Smallest crop, in voxels per axis, on which pyradiomics still applies every LoG sigma."""
        extents = []
        for step in spacing:
            needed = [math.ceil(sigma / step) + 1 for sigma in self._log_sigmas_mm]
            extents.append(max([_LOG_MIN_VOXELS, *needed]))
        return (extents[0], extents[1], extents[2])

    def _all_missing(self, label: int, reason: str) -> LesionFeatures:
        message = (
            f"lesion {label}: pyradiomics could not measure it ({reason.strip()}); "
            f"all {len(self.feature_names)} radiomics features are NaN"
        )
        log.warning(message)
        nan = (math.nan,) * len(self.feature_names)
        return LesionFeatures(
            label=label, names=self.feature_names, values=nan, warnings=(message,)
        )

    def _in_protocol_order(self, label: int, raw: Mapping[str, Any]) -> LesionFeatures:
        computed = {k: float(v) for k, v in raw.items() if not k.startswith("diagnostics_")}
        unexpected = sorted(set(computed) - set(self.feature_names))
        if unexpected:
            raise ModelError(
                f"{self.params_file}: pyradiomics produced features dicomnode did not expect from "
                f"this protocol: {_quote(unexpected)}"
            )
        values = tuple(computed.get(name, math.nan) for name in self.feature_names)
        warnings = []
        not_produced = [n for n in self.feature_names if n not in computed]
        if not_produced:
            warnings.append(
                f"lesion {label}: pyradiomics did not produce {len(not_produced)} feature(s) "
                f"(image too small for a filter?), set to NaN: {_quote(not_produced)}"
            )
        failed = [n for n, v in computed.items() if not math.isfinite(v)]
        if failed:
            warnings.append(
                f"lesion {label}: {len(failed)} feature(s) could not be computed (not finite): "
                f"{_quote(failed)}"
            )
        for message in warnings:
            log.warning(message)
        return LesionFeatures(
            label=label, names=self.feature_names, values=values, warnings=tuple(warnings)
        )


def protocol_feature_names(
    extractor: featureextractor.RadiomicsFeatureExtractor,
) -> tuple[str, ...]:
    """The names a configured pyradiomics extractor will produce, in pyradiomics' own order.

    Shape features first (computed once, on the original image), then for every filtered
    image every enabled feature class in the parameter file's order; within a class, the
    listed features, or all non-deprecated ones in pyradiomics' (alphabetical) order.
    """
    classes = radiomics.getFeatureClasses()
    enabled: Mapping[str, Sequence[str] | None] = extractor.enabledFeatures
    names = []
    if "shape" in enabled:
        shape = _class_features(classes["shape"], enabled["shape"])
        names += [f"original_shape_{f}" for f in shape]
    # shape2D yields features only with force2D, which _image_names refuses.
    texture = [
        (c, _class_features(classes[c], listed))
        for c, listed in enabled.items()
        if not c.startswith("shape")
    ]
    for image in _image_names(extractor):
        names += [f"{image}_{c}_{f}" for c, features in texture for f in features]
    return tuple(names)


def _class_features(feature_class: Any, listed: Sequence[str] | None) -> list[str]:
    # pyradiomics enables every non-deprecated feature when a class lists none.
    if listed:
        return list(listed)
    return [name for name, deprecated in feature_class.getFeatureNames().items() if not deprecated]


def _image_names(extractor: featureextractor.RadiomicsFeatureExtractor) -> Iterator[str]:
    """Names of the images pyradiomics derives, in the order it derives them."""
    for image_type, custom in extractor.enabledImagetypes.items():
        args = {**extractor.settings, **(custom or {})}
        if args.get("force2D"):
            raise ModelError("force2D (2D extraction) is not supported by dicomnode")
        if image_type == "Original":
            yield "original"
        elif image_type == "LoG":
            for sigma in args.get("sigma", []):
                if not sigma > 0:
                    raise ModelError(f"LoG sigma must be > 0 mm, got {sigma!r}")
                yield "log-sigma-%s-mm-3D" % str(sigma).replace(".", "-")
        elif image_type == "Wavelet":
            yield from _wavelet_names(int(args.get("level", 1)))
        else:
            raise ModelError(
                f"image type {image_type!r} is not supported "
                "(dicomnode supports Original, LoG, Wavelet)"
            )


def _wavelet_names(levels: int) -> Iterator[str]:
    # pyradiomics yields the 7 detail decompositions of each level in pywt's order (LLH ... HHH),
    # then the last level's approximation LLL; only levels above the first carry their number.
    for level in range(1, levels + 1):
        prefix = "wavelet-" if level == 1 else f"wavelet{level}-"
        for combo in product("LH", repeat=3):
            if combo != ("L", "L", "L"):
                yield prefix + "".join(combo)
    yield ("wavelet-" if levels == 1 else f"wavelet{levels}-") + "LLL"


def _log_sigmas_mm(extractor: featureextractor.RadiomicsFeatureExtractor) -> tuple[float, ...]:
    custom = extractor.enabledImagetypes.get("LoG")
    if custom is None:
        return ()
    args = {**extractor.settings, **(custom or {})}
    return tuple(float(s) for s in args.get("sigma", []))


def _load_protocol(params_file: Path) -> featureextractor.RadiomicsFeatureExtractor:
    if not params_file.is_file():
        raise ModelError(f"{params_file}: radiomics protocol file not found")
    try:
        return featureextractor.RadiomicsFeatureExtractor(str(params_file))
    except (pykwalify.errors.PyKwalifyException, yaml.YAMLError) as exc:
        raise ModelError(f"{params_file}: not a valid pyradiomics parameter file: {exc}") from None


def _checked_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputRejected(
            f"voxel spacing must be three positive numbers (z, y, x) in mm, got {spacing_zyx!r}"
        )
    return spacing  # type: ignore[return-value]


def _sitk_image(array: np.ndarray, spacing_zyx: tuple[float, float, float]) -> sitk.Image:
    """A SimpleITK image of a ``(z, y, x)`` array: SimpleITK wants spacing in ``(x, y, z)``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _crop_box(
    lesion: np.ndarray, margin_voxels: Sequence[int], min_extent: Sequence[int]
) -> tuple[slice, slice, slice]:
    """The lesion's bounding box grown by ``margin_voxels`` (to the whole axis where it reaches
    an edge, see :func:`~dicomnode.analyse.radiomics_engine.grow`) and to ``min_extent``."""
    box = []
    for axis, (pad, need) in enumerate(zip(margin_voxels, min_extent)):
        occupied = np.flatnonzero(lesion.any(axis=tuple(a for a in range(3) if a != axis)))
        start, stop = grow(int(occupied[0]), int(occupied[-1]), pad, lesion.shape[axis], need)
        box.append(slice(start, stop))
    return (box[0], box[1], box[2])


def _quote(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_QUOTED])
    return shown + (", ..." if len(names) > _NAMES_QUOTED else "")
