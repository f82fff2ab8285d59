"""Everything measured on a lesion: the radiomics protocol, then Wu's regional features.

The node (:class:`~dicomnode.pipeline.Pipeline`) and the training commands (``dicomnode
features``) measure lesions through this one class, so a model is always fed features made
exactly as its training features were. A lesion's :class:`~dicomnode.types.LesionFeatures`
holds the 1037 protocol features first (``models/radiomics/tmb_protocol.yaml``), then the
``wu_`` regional-variation and shape features (:mod:`dicomnode.analyse.regional`); the
models pick their inputs by name.

PURE: reads its protocol file once, at construction.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import radiomics

from dicomnode import __version__
from dicomnode.analyse import mesh as mesh_module
from dicomnode.analyse import radiomics as radiomics_module
from dicomnode.analyse import radiomics_engine as engine_module
from dicomnode.analyse import regional as regional_module
from dicomnode.analyse.radiomics import RadiomicsExtractor
from dicomnode.analyse.regional import RegionalExtractor
from dicomnode.config import Config
from dicomnode.types import LabelVolume, LesionFeatures, Volume


class Measurer:
    """Radiomics and regional features of lesions, as one :class:`LesionFeatures` each."""

    def __init__(
        self, radiomics_extractor: RadiomicsExtractor, regional_extractor: RegionalExtractor
    ) -> None:
        self.radiomics = radiomics_extractor
        self.regional = regional_extractor

    @classmethod
    def from_config(cls, config: Config) -> Measurer:
        """The measurer of the ``[radiomics]`` and ``[regional]`` sections of ``config``."""
        return cls(
            RadiomicsExtractor.from_config(config.radiomics),
            RegionalExtractor.from_config(config.regional),
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.radiomics.feature_names + self.regional.feature_names

    @property
    def fingerprint(self) -> str:
        """Changes whenever the same lesion could be measured differently.

        It covers the protocol file's bytes, every radiomics and regional setting, the source
        of the measuring modules, and the versions of dicomnode and pyradiomics; caches of
        features are keyed by it.
        """
        code = hashlib.sha256()
        for module in (radiomics_module, engine_module, mesh_module, regional_module,
                       sys.modules[__name__]):
            code.update(Path(module.__file__).read_bytes())
        settings = {
            "code_sha256": code.hexdigest(),
            "protocol_sha256": hashlib.sha256(self.radiomics.params_file.read_bytes()).hexdigest(),
            "crop_margin_mm": self.radiomics.crop_margin_mm,
            "regional": repr(self.regional.cfg),
            "dicomnode": __version__,
            "pyradiomics": radiomics.__version__,
        }
        encoded = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def measure(self, volume: Volume, labels: LabelVolume) -> tuple[LesionFeatures, ...]:
        """Features of every lesion of ``labels``, in the order of ``labels.lesions``."""
        return tuple(
            combine(protocol, regional)
            for protocol, regional in zip(
                self.radiomics.extract(volume, labels),
                self.regional.extract(volume, labels),
                strict=True,
            )
        )

    def measure_arrays(
        self,
        hu: np.ndarray,
        mask: np.ndarray,
        spacing_zyx: Sequence[float],
        *,
        organ_mask: np.ndarray | None = None,
        label: int = 1,
    ) -> LesionFeatures:
        """Features of the voxels of ``mask`` equal to ``label`` (see the extractors)."""
        return combine(
            self.radiomics.extract_arrays(hu, mask, spacing_zyx, label=label),
            self.regional.extract_arrays(
                hu, mask, spacing_zyx, organ_mask=organ_mask, label=label
            ),
        )


def combine(first: LesionFeatures, second: LesionFeatures) -> LesionFeatures:
    """One lesion's features from two extractors, ``first``'s then ``second``'s."""
    if first.label != second.label:
        raise ValueError(f"lesion {first.label} and lesion {second.label} cannot be combined")
    return LesionFeatures(
        label=first.label,
        names=first.names + second.names,
        values=first.values + second.values,
        warnings=first.warnings + second.warnings,
    )
