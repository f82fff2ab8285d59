"""Radiomics features of each lesion, computed by pyradiomics with the seed-001 protocol.

The protocol lives in a pyradiomics parameter file (``models/radiomics/tmb_protocol.yaml``:
1037 features per lesion). pyradiomics itself is the reference implementation; this module
only hands it the lesion as SimpleITK images built from ``(z, y, x)`` arrays and puts the
result in a fixed order.

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

from dicomnode.config import Config, RadiomicsConfig
from dicomnode.errors import ConfigError, InputRejected, ModelError
from dicomnode.types import LabelVolume, LesionFeatures, Volume

log = logging.getLogger(__name__)

#: pyradiomics logs this for every image because Sum Average (one of the paper's 24 GLCM
#: features) equals twice Joint Average on a symmetrical GLCM: it says nothing about a lesion.
_SUM_AVERAGE_NOTICE = "GLCM is symmetrical, therefore Sum Average"

#: pyradiomics skips every LoG image of an image with fewer voxels than this along any axis.
_LOG_MIN_VOXELS = 4

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
        When positive, image and mask are cropped to the lesion's bounding box plus this
        margin (mm) before the LoG and wavelet filters run, which makes extraction much faster
        on a whole CT. The crop changes filtered features only through the filters' border
        handling; shape and original-image features are unchanged. ``0`` filters the whole
        image: exactly pyradiomics' behaviour. Use 20 mm or more: on pyradiomics' lung1 case
        20 mm keeps every feature within 5e-5 (relative) of the exact value, while 10 mm
        changes wavelet features near zero by up to 100% (see ``models/radiomics/README.md``).

    Raises
    ------
    ModelError
        The parameter file is missing, invalid, or asks for something dicomnode cannot name
        in advance (an image type other than Original, LoG and Wavelet, or 2D extraction).
    ConfigError
        ``crop_margin_mm`` is negative or not finite.
    """

    def __init__(self, params_file: Path, *, crop_margin_mm: float = 0.0) -> None:
        if not (math.isfinite(crop_margin_mm) and crop_margin_mm >= 0):
            raise ConfigError(f"radiomics.crop_margin_mm: must be >= 0 mm, got {crop_margin_mm!r}")
        quiet_pyradiomics()
        self.params_file = Path(params_file)
        self.crop_margin_mm = float(crop_margin_mm)
        self._extractor = _load_protocol(self.params_file)
        self.feature_names: tuple[str, ...] = protocol_feature_names(self._extractor)
        #: Value of the lesion in the mask image handed to pyradiomics (the protocol's label).
        self._mask_value = int(self._extractor.settings.get("label", 1))
        self._log_sigmas_mm = _log_sigmas_mm(self._extractor)

    @classmethod
    def from_config(cls, cfg: RadiomicsConfig, config: Config) -> RadiomicsExtractor:
        """The extractor described by the ``[radiomics]`` section of a configuration."""
        return cls(config.resolve(cfg.params_file), crop_margin_mm=cfg.crop_margin_mm)

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
        if self.crop_margin_mm > 0:
            box = _crop_box(lesion, spacing, self.crop_margin_mm, self._min_extent(spacing))
            hu, lesion = hu[box], lesion[box]
        image = _sitk_image(hu.astype(np.float64, copy=False), spacing)
        mask_image = _sitk_image(lesion.astype(np.uint8) * np.uint8(self._mask_value), spacing)
        try:
            raw = self._extractor.execute(image, mask_image)
        except ValueError as exc:
            # pyradiomics' own mask checks (too few voxels left by the resegmentation range,
            # a lesion flat in two dimensions): one bad lesion must not fail the whole series.
            return self._all_missing(label, str(exc))
        return self._in_protocol_order(label, raw)

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
    lesion: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    margin_mm: float,
    min_extent: tuple[int, int, int],
) -> tuple[slice, slice, slice]:
    """The lesion's bounding box grown by ``margin_mm``, and to ``min_extent`` where it allows."""
    box = []
    for axis, (step, need) in enumerate(zip(spacing_zyx, min_extent)):
        others = tuple(a for a in range(3) if a != axis)
        occupied = np.flatnonzero(lesion.any(axis=others))
        pad = math.ceil(margin_mm / step)
        size = lesion.shape[axis]
        start, stop = max(0, occupied[0] - pad), min(size, occupied[-1] + 1 + pad)
        missing = need - (stop - start)
        if missing > 0:
            start = max(0, start - (missing + 1) // 2)
            stop = min(size, start + need)
            start = max(0, stop - need)
        box.append(slice(int(start), int(stop)))
    return (box[0], box[1], box[2])


def _quote(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMES_QUOTED])
    return shown + (", ..." if len(names) > _NAMES_QUOTED else "")
