"""The analysis and reporting core: datasets in, SEG + SR out (PURE: reads models, writes nothing).

The same :class:`Pipeline` serves the listener's jobs, ``dicomnode process`` and the demo, so
what a test proves on one path holds on the others. Models are loaded once, in
:meth:`Pipeline.from_config`; :meth:`Pipeline.run` is then cheap to call per series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom import Dataset

from dicomnode.analyse.measure import Measurer
from dicomnode.analyse.predict import Predictor
from dicomnode.analyse.segment import LesionSource, make_lesion_source
from dicomnode.analyse.supplied import is_segmentation, newest_for_series, supplied_segmentation
from dicomnode.assemble import assemble
from dicomnode.config import Config
from dicomnode.errors import InputRejected
from dicomnode.report import SrTemplate, build_reports, load_template
from dicomnode.types import Analysis, LabelVolume, ReportSet, SeriesKey, Volume

log = logging.getLogger(__name__)

#: Called with a short description of the stage that starts (for progress display).
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Outcome:
    """What one run of the pipeline produced."""

    analysis: Analysis
    reports: ReportSet
    seconds: dict[str, float]


class Pipeline:
    """Assemble, segment, measure, predict and report one CT series."""

    def __init__(
        self,
        config: Config,
        *,
        segmenter: LesionSource,
        measurer: Measurer,
        predictor: Predictor,
        template: SrTemplate,
    ) -> None:
        self.config = config
        self.segmenter = segmenter
        self.measurer = measurer
        self.predictor = predictor
        self.template = template

    @classmethod
    def from_config(cls, config: Config) -> "Pipeline":
        """Load every model and the SR template named by ``config`` (the expensive part)."""
        return cls(
            config,
            segmenter=make_lesion_source(config.segmentation, config),
            measurer=Measurer.from_config(config),
            predictor=Predictor.from_config(config.prediction),
            template=load_template(config.resolve(config.report.template_file)),
        )

    def assemble(
        self, datasets: Sequence[Dataset], *, key: SeriesKey | None = None, allow_gaps: bool = False
    ) -> Volume:
        return assemble(datasets, self.config.assembly, key=key, allow_gaps=allow_gaps)

    def analyse(
        self, volume: Volume, progress: Progress = _quiet, supplied: Dataset | None = None
    ) -> tuple[Analysis, dict[str, float]]:
        """Segment (or take the ``supplied`` RTSTRUCT/SEG, see ``[segmentation] source``),
        measure and predict."""
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        segmentation, warnings = self._segmentation(volume, supplied, progress)
        seconds["segment"] = time.perf_counter() - started
        n = len(segmentation.lesions)
        progress(f"measuring {n} lesion(s)" if n else "no lesion found")
        started = time.perf_counter()
        features = self.measurer.measure(volume, segmentation) if n else ()
        seconds["radiomics"] = time.perf_counter() - started
        started = time.perf_counter()
        predictions = self.predictor.predict(features) if n else ()
        seconds["predict"] = time.perf_counter() - started
        models = self.predictor.models if segmentation.supplied else (
            self.segmenter.info, *self.predictor.models)
        analysis = Analysis(
            volume=volume,
            segmentation=segmentation,
            features=tuple(features),
            predictions=tuple(predictions),
            models=tuple(models),
            warnings=(*volume.warnings, *warnings),
        )
        return analysis, seconds

    def _segmentation(
        self, volume: Volume, supplied: Dataset | None, progress: Progress
    ) -> tuple[LabelVolume, tuple[str, ...]]:
        source = self.config.segmentation.source
        if supplied is not None and source != "model":
            progress(f"measuring the supplied {supplied.Modality} instead of running the model")
            return supplied_segmentation(supplied, volume)
        if source == "supplied":
            raise InputRejected("no RTSTRUCT or SEG references this CT series, and "
                                "[segmentation] source = \"supplied\" measures only those")
        progress(f"segmenting {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}")
        return self.segmenter.segment(volume), ()

    def report(self, analysis: Analysis, uid_seed: str,
               predecessors: Sequence[Dataset] = ()) -> ReportSet:
        return build_reports(
            analysis, template=self.template, config=self.config.report, uid_seed=uid_seed,
            predecessors=predecessors,
        )

    def warm_up(self) -> None:
        """Start what starts slowly (the radiomics worker processes) in the background."""
        self.measurer.radiomics.warm_up()

    def close(self) -> None:
        """Stop the radiomics worker processes (a later run starts them again)."""
        self.measurer.radiomics.close()

    def run(
        self,
        datasets: Sequence[Dataset],
        *,
        uid_seed: str,
        key: SeriesKey | None = None,
        allow_gaps: bool = False,
        progress: Progress = _quiet,
        predecessors: Sequence[Dataset] = (),
    ) -> Outcome:
        """The whole core for one series; raises a :class:`~dicomnode.errors.DicomNodeError` on refusal.

        ``datasets`` are the CT's instances, and may also hold RTSTRUCTs or SEGs drawn on it
        (the newest one that references the series is measured, see ``[segmentation] source``).
        ``predecessors`` are earlier SRs this report replaces.
        """
        ct = [ds for ds in datasets if not is_segmentation(ds)]
        self.warm_up()  # the radiomics workers start while the series is assembled and segmented
        progress(f"assembling {len(ct)} instance(s)")
        started = time.perf_counter()
        volume = self.assemble(ct, key=key, allow_gaps=allow_gaps)
        assembled = time.perf_counter() - started
        supplied = newest_for_series([ds for ds in datasets if is_segmentation(ds)],
                                     volume.key.series_uid)
        analysis, seconds = self.analyse(volume, progress, supplied)
        progress("writing DICOM SEG and TID 1500 SR")
        started = time.perf_counter()
        reports = self.report(analysis, uid_seed, predecessors)
        seconds = {"assemble": assembled, **seconds, "report": time.perf_counter() - started}
        log.info(
            "series analysed: %d lesion(s); %s",
            len(analysis.segmentation.lesions),
            ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()),
        )
        return Outcome(analysis=analysis, reports=reports, seconds=seconds)
