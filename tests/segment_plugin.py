"""A segmenter plugged in by configuration (``[segmentation] plugin``), for tests.

Lesions are the voxels above a HU threshold: no model, so that a test sees exactly which
voxels the pipeline was given.
"""

from __future__ import annotations

from dicomnode.analyse.segment import label_lesions
from dicomnode.types import LabelVolume, ModelInfo, Volume

THRESHOLD_HU = 1500.0


class DenseThings:
    info = ModelInfo(name="dense-things", version="0.0.1", family="Thresholding",
                     task="segmentation")

    def segment(self, volume: Volume) -> LabelVolume:
        labels, lesions = label_lesions(volume.hu > THRESHOLD_HU, volume, 0.0)
        return LabelVolume(labels=labels, lesions=lesions, model_name=self.info.name,
                           model_version=self.info.version)


def make(section, config) -> DenseThings:
    return DenseThings()


def make_nothing(section, config) -> object:
    return object()
