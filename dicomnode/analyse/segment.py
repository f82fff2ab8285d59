"""Tumour segmentation: a 3D U-Net turns a CT :class:`~dicomnode.types.Volume` into lesions.

PURE: reads the model once in :meth:`Segmenter.load`, writes nothing.

The model folder (``models/segmentation/`` by default) holds ``weights.pt`` (a PyTorch
``state_dict``) and ``manifest.json``, which says how to rebuild the network and how its
input was prepared during training, so that retraining can change either without touching
this code::

    {
      "name": "...", "version": "...", "family": "3D U-Net",
      "architecture": {"class": "UNet", "params": {...monai.networks.nets.UNet arguments...}},
      "preprocessing": {"spacing_mm": [z, y, x], "hu_window": [low, high]},
      "inference": {"roi_size": [z, y, x]},
      "weights": {"file": "weights.pt", "sha256": "..."},
      "training": {...provenance, free form...}
    }

Inference: HU are clipped to the window and scaled to [-1, 1], the volume is resampled to the
training spacing (with a Gaussian pre-filter where it is downsampled, against aliasing), the
network runs over it in overlapping windows (Gaussian-weighted sliding-window inference), the
lesion probability is resampled back to the native grid and thresholded, kept only inside the
body (``body_only``), split into 3D connected components (26-connectivity), each with its
confidence (mean probability inside it); components below ``min_lesion_ml`` or
``min_confidence`` are dropped, at most ``max_lesions`` of the most confident are kept
(0: all), and they are numbered 1..N from the largest to the smallest.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.nets import BasicUNet, UNet
from numpy.typing import NDArray
from scipy import ndimage

from dicomnode.analyse.regional import body_mask
from dicomnode.config import Config, SegmentationConfig
from dicomnode.errors import ModelError
from dicomnode.types import LabelVolume, Lesion, ModelInfo, Volume

#: Network classes a manifest may name (a whitelist: the manifest never imports code).
ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"UNet": UNet, "BasicUNet": BasicUNet}
MANIFEST_FILE = "manifest.json"
#: HU above which a voxel may belong to the body (air and blankets lie below).
BODY_THRESHOLD_HU = -500.0
#: Normalised value of air (the bottom of the HU window): what padding must look like.
PAD_VALUE = -1.0


@dataclass(frozen=True)
class Preprocessing:
    """How HU volumes are turned into network input (from the manifest's ``preprocessing``)."""

    spacing_mm: tuple[float, float, float]
    hu_window: tuple[float, float]

    def normalise(self, hu: NDArray[np.floating]) -> NDArray[np.float32]:
        """Clip to the HU window and scale it linearly to [-1, 1]."""
        low, high = self.hu_window
        # One new array, scaled in place (the same float32 operations in the same order).
        out = np.clip(hu, low, high, dtype=np.float32)
        out -= np.float32(low)
        out *= np.float32(2.0 / (high - low))
        out -= np.float32(1.0)
        return out

    def grid_shape(
        self, shape: tuple[int, ...], spacing: tuple[float, float, float]
    ) -> tuple[int, int, int]:
        """Shape of the training-spacing grid that covers the same extent as ``shape``."""
        return tuple(  # type: ignore[return-value]
            max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, self.spacing_mm)
        )

    def to_training_grid(
        self, image: NDArray[np.float32], spacing: tuple[float, float, float], *,
        overwrite: bool = False,
    ) -> NDArray[np.float32]:
        """Resample a normalised image (or a mask as float) onto the training-spacing grid.

        Both grids span the same physical extent (``n * spacing``), so
        ``align_corners=False`` interpolation puts voxel centres where they belong, and
        :func:`from_training_grid` is its exact geometric inverse. ``overwrite``: ``image``
        is a temporary that the anti-aliasing filter may write over (no second copy).
        """
        factors = np.asarray(self.spacing_mm) / np.asarray(spacing)
        sigma = np.where(factors > 1, 0.5 * (factors - 1), 0.0)  # anti-aliasing when shrinking
        if np.any(sigma > 0):
            image = ndimage.gaussian_filter(image, sigma, mode="nearest",
                                            output=image if overwrite else None)
        return resize(image, self.grid_shape(image.shape, spacing))


def resize(image: NDArray[np.floating], shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Trilinear resampling of a ``(z, y, x)`` array to ``shape`` over the same extent."""
    if tuple(image.shape) == tuple(shape):
        return np.asarray(image, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(tensor, size=tuple(int(n) for n in shape), mode="trilinear",
                        align_corners=False)
    return out[0, 0].numpy()


@dataclass(frozen=True)
class SegmentationManifest:
    """The validated content of ``manifest.json``."""

    name: str
    version: str
    family: str
    architecture: str
    params: dict[str, Any]
    preprocessing: Preprocessing
    roi_size: tuple[int, int, int]
    weights_file: str
    weights_sha256: str
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = MANIFEST_FILE) -> SegmentationManifest:
        try:
            arch = data["architecture"]
            prep = data["preprocessing"]
            manifest = cls(
                name=str(data["name"]),
                version=str(data["version"]),
                family=str(data.get("family", "3D U-Net")),
                architecture=str(arch["class"]),
                params=dict(arch["params"]),
                preprocessing=Preprocessing(
                    spacing_mm=_triple(prep["spacing_mm"], float),
                    hu_window=(float(prep["hu_window"][0]), float(prep["hu_window"][1])),
                ),
                roi_size=_triple(data["inference"]["roi_size"], int),
                weights_file=str(data["weights"]["file"]),
                weights_sha256=str(data["weights"].get("sha256", "")),
                raw=data,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"{where}: malformed segmentation manifest ({exc!r})") from None
        if manifest.architecture not in ARCHITECTURES:
            raise ModelError(
                f"{where}: architecture {manifest.architecture!r} is not one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        low, high = manifest.preprocessing.hu_window
        if not high > low or min(manifest.preprocessing.spacing_mm) <= 0:
            raise ModelError(f"{where}: preprocessing needs high > low HU and positive spacing")
        return manifest

    def build_network(self) -> torch.nn.Module:
        """A fresh, untrained network with the manifest's architecture."""
        try:
            return ARCHITECTURES[self.architecture](**self.params)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelError(f"{self.architecture} parameters in the manifest are invalid: {exc}")

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(name=self.name, version=self.version, family=self.family, task="segmentation")


def _triple(values: Any, kind: type) -> tuple:
    out = tuple(kind(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"expected 3 values, got {values!r}")
    return out


def pick_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"segmentation device {device!r} is not valid: {exc}") from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@runtime_checkable
class LesionSource(Protocol):
    """What the pipeline needs from a segmenter: the seam where another one plugs in.

    :class:`Segmenter` is the shipped one; ``[segmentation] plugin = "pkg.mod:factory"``
    names another (:func:`make_lesion_source`). ``segment`` must return labels on the grid of
    the volume, numbered 1..N as ``lesions`` are, and must not write anything.
    """

    @property
    def info(self) -> ModelInfo: ...

    def segment(self, volume: Volume) -> LabelVolume: ...


def make_lesion_source(cfg: SegmentationConfig, config: Config) -> LesionSource:
    """The configured segmenter: a plugin's factory, or the U-Net in ``cfg.model_dir``."""
    if not cfg.plugin:
        return Segmenter.from_config(cfg)
    module_name, _, attribute = cfg.plugin.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"segmentation.plugin {cfg.plugin!r} cannot be loaded: {exc}") from None
    source = factory(cfg, config)
    if not isinstance(source, LesionSource):
        raise ModelError(f"segmentation.plugin {cfg.plugin!r} returned {type(source).__name__}, "
                         "which has no info and segment(volume)")
    return source


class Segmenter:
    """Finds lesions in CT volumes with a 3D U-Net loaded once.

    Build it with :meth:`load` (or :meth:`from_config`); the constructor takes an in-memory
    network, which training uses to validate the model it is fitting with this exact code.
    ``settings`` is the ``[segmentation]`` section: threshold, false-positive controls and
    the sliding window (:class:`~dicomnode.config.SegmentationConfig` holds every default).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        manifest: SegmentationManifest,
        settings: SegmentationConfig = SegmentationConfig(),  # noqa: B008 - frozen
    ) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.network = network.to(self.device).eval()
        self.manifest = manifest

    @classmethod
    def load(
        cls,
        model_dir: Path,
        settings: SegmentationConfig = SegmentationConfig(),  # noqa: B008 - frozen
    ) -> Segmenter:
        """Read ``manifest.json`` and the weights it names from ``model_dir``.

        Raises
        ------
        ModelError
            When the folder, the manifest or the weights are missing, the weights' checksum
            differs from the manifest's, or the weights do not fit the architecture.
        """
        model_dir = Path(model_dir)
        manifest_path = model_dir / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ModelError(f"segmentation model: {manifest_path} not found "
                             "(train one with `dicomnode train segmentation`)")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelError(f"{manifest_path}: not valid JSON: {exc}") from None
        manifest = SegmentationManifest.from_dict(data, str(manifest_path))
        weights_path = model_dir / manifest.weights_file
        if not weights_path.is_file():
            raise ModelError(f"segmentation model: weights {weights_path} not found")
        if manifest.weights_sha256 and sha256_of(weights_path) != manifest.weights_sha256:
            raise ModelError(f"{weights_path}: SHA-256 differs from the manifest's; the weights "
                             "and the manifest do not belong together")
        network = manifest.build_network()
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            network.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, OSError, ValueError) as exc:
            raise ModelError(f"{weights_path}: weights do not match the manifest's "
                             f"{manifest.architecture}: {str(exc).splitlines()[0]}") from None
        return cls(network, manifest, settings)

    @classmethod
    def from_config(cls, cfg: SegmentationConfig) -> Segmenter:
        """:meth:`load` with the ``[segmentation]`` section (its model folder resolved by
        :class:`~dicomnode.config.Config`)."""
        return cls.load(cfg.model_dir, cfg)

    @property
    def info(self) -> ModelInfo:
        return self.manifest.info

    def probabilities(self, volume: Volume) -> NDArray[np.float32]:
        """Lesion probability per voxel of ``volume`` (native grid, ``float32`` in [0, 1])."""
        prep = self.manifest.preprocessing
        spacing = volume.geometry.spacing
        image = prep.to_training_grid(prep.normalise(volume.hu), spacing, overwrite=True)
        tensor = torch.from_numpy(image)[None, None].to(self.device)
        with torch.inference_mode():
            logits: torch.Tensor = sliding_window_inference(  # type: ignore[assignment]
                tensor,
                roi_size=self.manifest.roi_size,
                sw_batch_size=self.settings.sw_batch_size,
                predictor=self.network,
                overlap=self.settings.overlap,
                mode="gaussian",
                cval=PAD_VALUE,
            )
            # Interpolate logits, not probabilities: the 0.5 boundary moves smoothly.
            logits = F.interpolate(logits, size=volume.shape, mode="trilinear",
                                   align_corners=False)
            probability = torch.sigmoid(logits)[0, 0]
        return probability.float().cpu().numpy()

    def segment(self, volume: Volume) -> LabelVolume:
        """Label the lesions of ``volume`` (see the module docstring for the steps)."""
        settings = self.settings
        probability = self.probabilities(volume)
        mask = probability >= settings.probability_threshold
        if settings.body_only:
            # The body is needed only on the slices where the model found something.
            mask &= body_mask(volume.hu, BODY_THRESHOLD_HU,
                              slices=np.flatnonzero(mask.any(axis=(1, 2))))
        labels, lesions = label_lesions(
            mask, volume, settings.min_lesion_ml, probability=probability,
            min_confidence=settings.min_confidence, max_lesions=settings.max_lesions,
        )
        return LabelVolume(labels=labels, lesions=lesions, model_name=self.info.name,
                           model_version=self.info.version)


def label_lesions(
    mask: NDArray[np.bool_],
    volume: Volume,
    min_lesion_ml: float,
    *,
    probability: NDArray[np.floating] | None = None,
    min_confidence: float = 0.0,
    max_lesions: int = 0,
) -> tuple[NDArray[np.uint16], tuple[Lesion, ...]]:
    """Connected components of ``mask`` as lesions, numbered 1..N from the largest.

    Parameters
    ----------
    mask:
        Foreground on the grid of ``volume``.
    volume:
        Supplies the voxel size and the affine for the centroids (patient mm, PS3.3 C.7.6.2).
    min_lesion_ml:
        Components smaller than this are dropped.
    probability:
        The model's probability on the same grid: each lesion's confidence is its mean inside
        the lesion. ``None`` (a mask a person drew): no confidence, no confidence filter.
    min_confidence:
        Components whose confidence is below this are dropped.
    max_lesions:
        Keep at most this many, the most confident first (0: all).
    """
    # Components are found in the box around the foreground only (the same components: the
    # box holds all of it), which is a small part of a whole CT.
    box = _foreground_box(mask)
    if box is None:
        return np.zeros(mask.shape, dtype=np.uint16), ()
    components, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    voxel_ml = volume.geometry.voxel_volume_mm3 / 1000.0
    flat = components.ravel()
    counts = np.bincount(flat, minlength=n + 1)[1:]
    if probability is None:
        confidence = None
        kept = np.flatnonzero(counts * voxel_ml >= min_lesion_ml)
    else:
        sums = np.bincount(flat, weights=np.asarray(probability[box], np.float64).ravel(),
                           minlength=n + 1)[1:]
        confidence = sums / np.maximum(counts, 1)
        kept = np.flatnonzero((counts * voxel_ml >= min_lesion_ml) & (confidence >= min_confidence))
        if max_lesions:
            kept = kept[np.argsort(-confidence[kept], kind="stable")][:max_lesions]
    kept = kept[np.argsort(-counts[kept], kind="stable")]
    relabel = np.zeros(n + 1, dtype=np.uint16)
    relabel[kept + 1] = np.arange(1, len(kept) + 1, dtype=np.uint16)
    labels = np.zeros(mask.shape, dtype=np.uint16)
    labels[box] = relabel[components]
    confidences = None if confidence is None else [round(float(confidence[c]), 4) for c in kept]
    return labels, describe_lesions(labels, volume, confidences, box=box)


def _foreground_box(mask: NDArray[np.bool_]) -> tuple[slice, slice, slice] | None:
    """The smallest box that holds every true voxel of ``mask``; ``None`` when there is none."""
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if not present.size:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def describe_lesions(
    labels: NDArray[np.integer], volume: Volume, confidences: Sequence[float | None] | None = None,
    *, box: tuple[slice, slice, slice] | None = None,
) -> tuple[Lesion, ...]:
    """The :class:`Lesion` of each label 1..N of ``labels`` (every label must be present):
    size, volume, centroid in patient mm (PS3.3 C.7.6.2) and bounding box. ``box``: a part
    of ``labels`` known to hold every labelled voxel (only it is searched)."""
    box = box or (slice(None),) * 3
    within = labels[box]
    offset = [s.indices(n)[0] for s, n in zip(box, labels.shape)]
    voxel_ml = volume.geometry.voxel_volume_mm3 / 1000.0
    affine = volume.geometry.affine()
    lesions = []
    for label, local_box in enumerate(ndimage.find_objects(within), start=1):
        if local_box is None:
            raise ValueError(f"label {label} has no voxel")
        found = tuple(slice(s.start + o, s.stop + o) for s, o in zip(local_box, offset))
        local = np.argwhere(within[local_box] == label)
        centroid = local.mean(axis=0) + [s.start for s in found]
        centre_mm = affine @ np.append(centroid, 1.0)
        lesions.append(Lesion(
            label=label,
            voxel_count=len(local),
            volume_ml=len(local) * voxel_ml,
            centroid_mm=tuple(float(v) for v in centre_mm[:3]),  # type: ignore[arg-type]
            bbox=tuple((int(s.start), int(s.stop)) for s in found),  # type: ignore[arg-type]
            confidence=None if confidences is None else confidences[label - 1],
        ))
    return tuple(lesions)
