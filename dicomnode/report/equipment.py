"""Who made a result: the pipeline and each model, as equipment with a Device UID (PURE).

IHE AI Results (AIR, RAD TF-3 6.5.3.1) asks every result object to list the algorithms that
produced it in the Contributing Equipment Sequence (0018,A001), purpose (109102, DCM,
"Processing Equipment"), each with a Device UID that changes when the algorithm changes, and
the SR's device observer to be the same device. The UIDs are derived from names and versions,
so that they are stable across jobs and restarts and new for every new model or release.
"""

from __future__ import annotations

from collections.abc import Iterable

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicomnode import __version__
from dicomnode.config import ReportConfig
from dicomnode.report.template import SrTemplate
from dicomnode.types import Analysis, ModelInfo


def pipeline_uid(config: ReportConfig, models: Iterable[ModelInfo]) -> str:
    """Device UID of this node's pipeline: its identity, release and the models it ran."""
    versions = sorted(f"{m.task}:{m.name}:{m.version}" for m in models)
    return str(generate_uid(entropy_srcs=["dicomnode pipeline", config.manufacturer,
                                          config.device_observer_name, __version__, *versions]))


def model_uid(config: ReportConfig, model: ModelInfo) -> str:
    """Device UID of one model at one version."""
    return str(generate_uid(entropy_srcs=["dicomnode model", config.manufacturer, model.task,
                                          model.name, model.version]))


def contributing_models(analysis: Analysis) -> tuple[ModelInfo, ...]:
    """The models whose output the result holds: no segmentation model when the lesions were
    drawn by someone else (a supplied RTSTRUCT or SEG)."""
    supplied = analysis.segmentation.supplied is not None
    return tuple(m for m in analysis.models if not (supplied and m.task == "segmentation"))


def contributing_equipment(
    analysis: Analysis,
    config: ReportConfig,
    template: SrTemplate,
    *,
    tasks: Iterable[str] = ("segmentation", "tmb", "subtype"),
) -> list[hd.ContributingEquipment]:
    """The pipeline, then each contributing model of ``tasks``, as Processing Equipment."""
    wanted = set(tasks)
    pipeline = _equipment(config.manufacturer, template.device_model_name, __version__,
                          pipeline_uid(config, analysis.models), config)
    models = [
        _equipment(config.manufacturer, model.name, model.version, model_uid(config, model), config)
        for model in contributing_models(analysis) if model.task in wanted
    ]
    return [pipeline, *models]


def _equipment(manufacturer: str, model_name: str, version: str, uid: str,
               config: ReportConfig) -> hd.ContributingEquipment:
    item = hd.ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name[:64],
        software_versions=version[:64],
        institution_name=config.institution_name or None,
    )
    item.DeviceUID = uid  # (0018,1002): highdicom has no argument for it
    return item
