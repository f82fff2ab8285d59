"""The ``dicomnode`` command line: one entry point, one subcommand per job a user has.

Run ``dicomnode --help`` for the list and ``dicomnode <command> --help`` for each.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

from dicomnode import __version__
from dicomnode.config import Config, load
from dicomnode.errors import ConfigError, DicomNodeError

log = logging.getLogger("dicomnode")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2

DESCRIPTION = """\
dicomnode receives CT series from a PACS, finds tumours (3D U-Net), measures them
(pyradiomics, 1037 features), predicts tumour mutational burden (High/Low) and an imaging
subtype, and sends back a DICOM SEG and a TID 1500 Structured Report.
All predictions are research predictions from imaging, not clinical results.

typical use:
  dicomnode demo                                        watch the whole flow on a synthetic CT
  dicomnode serve --config listeners/default.toml       run the DICOM listener
  dicomnode process ./ct-series --out ./results         same pipeline on a folder, no network
  dicomnode jobs                                        what the node did, with reasons
"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # pyradiomics, pynetdicom and highdicom are chatty at INFO; their warnings still show.
    for name in ("radiomics", "pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    # Over-long or malformed values in received CT would otherwise be reported once per
    # element per slice; they are dealt with where they matter (assembly, report).
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _load_config(path: str | None) -> Config:
    return load(path)


# --------------------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.node import Node

    config = _load_config(args.config)
    node = Node(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    print(f"dicomnode listening as {config.node.ae_title} on {config.node.host}:{node.port} (Ctrl-C stops)",
          flush=True)
    stop.wait()
    log.info("stopping")
    node.stop()
    return EXIT_OK


# --------------------------------------------------------------------------- process
def _read_folder(folder: Path) -> tuple[dict[tuple[str, str], list], list[str]]:
    """DICOM files under ``folder`` grouped by (study, series); plus notes on skipped files."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[tuple[str, str], list] = defaultdict(list)
    skipped: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            skipped.append(f"{path.name}: not readable as DICOM ({exc})")
            continue
        if "SeriesInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            skipped.append(f"{path.name}: no study/series UID")
            continue
        series[(ds.StudyInstanceUID, ds.SeriesInstanceUID)].append(ds)
    return series, skipped


def cmd_process(args: argparse.Namespace) -> int:
    from dicomnode.pipeline import Pipeline
    from dicomnode.report import summarize_sr, summary_json
    from dicomnode.results import save
    from dicomnode.types import SeriesKey

    config = _load_config(args.config)
    folder = Path(args.input)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return EXIT_ERROR
    series, skipped = _read_folder(folder)
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    if not series:
        print(f"refused: no DICOM series found in {folder}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"found {len(series)} series in {folder}; loading models ...", flush=True)
    pipeline = Pipeline.from_config(config)
    out = Path(args.out)
    produced = 0
    for (study_uid, series_uid), datasets in series.items():
        print(f"series {series_uid} ({len(datasets)} instances)", flush=True)
        try:
            outcome = pipeline.run(
                datasets,
                uid_seed=uuid.uuid4().hex,
                key=SeriesKey(study_uid, series_uid),
                allow_gaps=args.allow_gaps,
                progress=lambda stage: print(f"  - {stage}", flush=True),
            )
        except DicomNodeError as exc:
            print(f"  refused: {exc}", file=sys.stderr)
            continue
        except Exception as exc:  # one series' bug must not cost the others their reports
            log.exception("series %s failed with an internal error", series_uid)
            print(f"  failed: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        files = save(out / series_uid, outcome.reports, summary_json(outcome.analysis, outcome.reports))
        produced += 1
        print(summarize_sr(outcome.reports.sr))
        print(f"  wrote {', '.join(str(p) for p in (files.seg, files.sr, files.summary) if p)}")
    if not produced:
        print("refused: no series could be processed (reasons above)", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


# --------------------------------------------------------------------------- jobs / retry
def _job_store(config: Config):
    from dicomnode.jobs.store import JobStore

    db = config.resolve(config.node.data_dir) / "jobs.sqlite"
    if not db.exists():
        raise ConfigError(f"no job database at {db}: has the node run with this configuration?")
    return JobStore(db)


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _job_store(_load_config(args.config))
    jobs = store.all()
    if args.json:
        print(json.dumps([
            {"id": j.id, "state": j.state.value, "reason": j.reason, "study_uid": j.key.study_uid,
             "series_uid": j.key.series_uid, "instances": len(j.inputs), "attempts": j.attempts,
             "warnings": list(j.warnings), "created_at": j.created_at, "updated_at": j.updated_at}
            for j in jobs
        ], indent=2))
        return EXIT_OK
    if not jobs:
        print("no jobs yet")
    for j in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.updated_at))
        print(f"{j.id}  {j.state.value:<10}  {when}  {len(j.inputs):>4} inst  series …{j.key.series_uid[-12:]}  {j.reason}")
        if args.verbose:
            for e in store.journal(j.id):
                t = time.strftime("%H:%M:%S", time.localtime(e.at))
                print(f"      {t} {e.from_state or '-'} -> {e.to_state}: {e.reason}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from dicomnode.jobs.machine import IllegalTransition, JobEvent

    store = _job_store(_load_config(args.config))
    try:
        job = store.find(args.job)
        job = store.transition(job.id, JobEvent.RETRY, "retry requested on the command line")
    except (KeyError, IllegalTransition) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    print(f"job {job.id} is {job.state.value} again; a running node picks it up")
    return EXIT_OK


# --------------------------------------------------------------------------- config
def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    for section in ("segmentation", "radiomics", "prediction"):
        for name, value in vars(getattr(config, section)).items():
            if isinstance(value, Path) and not config.resolve(value).exists():
                raise ConfigError(f"{section}.{name}: {config.resolve(value)} does not exist")
    template = config.resolve(config.report.template_file)
    if not template.exists():
        raise ConfigError(f"report.template_file: {template} does not exist")
    print(f"{args.config or 'defaults'}: configuration is valid")
    return EXIT_OK


# --------------------------------------------------------------------------- train
def cmd_train_segmentation(args: argparse.Namespace) -> int:
    from dicomnode.train.segmentation import train_segmentation

    report = train_segmentation(
        Path(args.out),
        data_root=Path(args.data_root) if args.data_root else None,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
    )
    print(report)
    return EXIT_OK


def cmd_train_predictors(args: argparse.Namespace) -> int:
    from dicomnode.train.predictors import train_demo_models

    print(train_demo_models(Path(args.out), n_cases=args.cases, seed=args.seed, workers=args.workers))
    return EXIT_OK


# --------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import run_demo

    return run_demo(Path(args.out), seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", metavar="TOML",
                       help="listener configuration (e.g. listeners/default.toml); defaults when omitted. "
                            "Any key can be overridden by DICOMNODE_<SECTION>__<KEY> in the environment")

    p = sub.add_parser("serve", help="run the DICOM listener and the job runner",
                       description="Listen for C-ECHO and C-STORE, spool every instance durably, run the "
                                   "pipeline on each complete series and deliver the SEG and SR.")
    config_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("process", help="run the pipeline on a folder of DICOM files (no network)",
                       description="Analyse every CT series found under INPUT_DIR and write seg.dcm, sr.dcm and "
                                   "summary.json into OUTPUT_DIR/<SeriesInstanceUID>/. Exit 0 when a report was "
                                   "produced, 2 when the input was refused.")
    p.add_argument("input", metavar="INPUT_DIR")
    p.add_argument("--out", "-o", required=True, metavar="OUTPUT_DIR")
    p.add_argument("--allow-gaps", action="store_true",
                   help="process a stack with missing slices (a warning goes into the report)")
    config_option(p)
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("demo", help="synthetic CT -> listener -> SEG + SR, end to end, on this machine",
                       description="Make a synthetic CT study with known lesions, start a listener on a free "
                                   "loopback port, send the study by C-STORE and show what came out.")
    p.add_argument("--out", default="demo-output", help="folder for the demo's files (default: %(default)s)")
    p.add_argument("--seed", type=int, default=10001, help="phantom seed (10000+ are never used in training)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("jobs", help="list jobs with their state and reason")
    config_option(p)
    p.add_argument("--verbose", "-v", action="store_true", help="show each job's journal of transitions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("retry", help="re-queue a failed job")
    p.add_argument("job", metavar="JOB", help="job id (a unique prefix is enough)")
    config_option(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("check-config", help="validate a listener configuration and the files it names")
    config_option(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("train", help="train the models the node runs")
    tsub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    t = tsub.add_parser("segmentation", help="train the 3D U-Net on synthetic lesions (phantoms and real CT)")
    t.add_argument("--out", default="models/segmentation")
    t.add_argument("--data-root", help="../shared/data-like folder of real CT to insert lesions into")
    t.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.set_defaults(func=cmd_train_segmentation)
    t = tsub.add_parser("predictors", help="fit the demonstration TMB and subtype models on a synthetic cohort")
    t.add_argument("--out", default="models", help="models root: writes tmb/ and subtypes/ in it")
    t.add_argument("--cases", type=int, default=None, help="cohort size (default: the recipe's)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2)
    t.set_defaults(func=cmd_train_predictors)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
