"""The ``dicomnode`` command line: one entry point, one subcommand per job a user has.

Run ``dicomnode --help`` for the list and ``dicomnode <command> --help`` for each.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import json
import logging
import shlex
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode import __version__
from dicomnode.config import Config, load
from dicomnode.errors import ConfigError, DicomNodeError
from dicomnode.observe.audit import EVENTS as AUDIT_EVENTS

if TYPE_CHECKING:  # pragma: no cover - typing only; commands import what they run lazily
    from dicomnode.cohort import DicomwebSource
    from dicomnode.node import Node

log = logging.getLogger("dicomnode")

EXIT_OK, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

DESCRIPTION = """\
dicomnode receives CT series from a PACS, finds tumours (3D U-Net), measures them
(pyradiomics, 1037 features), predicts tumour mutational burden (High/Low) and an imaging
subtype, and sends back a DICOM SEG and a TID 1500 Structured Report.
All predictions are research predictions from imaging, not clinical results.

typical use:
  dicomnode demo                                        watch the whole flow on a sarcoma CT
  dicomnode serve --config listeners/default.toml       run the DICOM listener
  dicomnode process ./ct-series --out ./results         same pipeline on a folder, no network
  dicomnode jobs                                        what the node did, with reasons
  dicomnode cohort export --out corrections.csv         radiologists' corrections as a cohort
  dicomnode viewer --dicomweb http://pacs:8042/dicom-web   the results in OHIF, as radiologists see them
"""


#: Control characters (C0, DEL, C1, Unicode line and paragraph separators), each mapped to
#: its Python escape: ``"\n"`` becomes the two characters ``\n``.
_CONTROL_ESCAPES = str.maketrans({
    code: repr(chr(code))[1:-1]
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
})


def escape_control(text: str) -> str:
    """``text`` with every control character written as its escape (``\\n``, ``\\x1b``, ...)."""
    return text.translate(_CONTROL_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """A formatter that escapes control characters in each record's message.

    Messages carry peer-supplied text (UIDs, AE titles), also inside pynetdicom's own
    messages: a newline in it would start a forged log line, an ESC drive the terminal. The
    message becomes one line; a traceback appended after it keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        message = record.message
        record.message = escape_control(message)
        try:
            return super().formatMessage(record)
        finally:
            record.message = message  # other handlers format the record too


class DecoderAttemptsAtDebug(logging.Filter):
    """pydicom logs, with a traceback at ERROR, each decoder plugin that fails on a frame
    before it raises one error naming them all; that error becomes the job's reason. The
    attempts are kept as one DEBUG line each, shown only with ``--log-level DEBUG``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # pyradiomics, pynetdicom and highdicom are chatty at INFO; their warnings still show.
    for name in ("radiomics", "pynetdicom", "highdicom"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("pydicom.pixels.decoders.base").addFilter(DecoderAttemptsAtDebug())
    # Over-long or malformed values in received CT would otherwise be reported once per
    # element per slice; they are dealt with where they matter (assembly, report).
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _load_config(path: str | None) -> Config:
    return load(path)


# --------------------------------------------------------------------------- serve
class StartupError(DicomNodeError):
    """The node cannot start for a reason in its surroundings (port, disk, database); the
    message says which, for the operator."""


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    node = _open_node(config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _start_listening(node)
    print(f"dicomnode listening as {config.node.ae_title} on {config.node.host}:{node.port} (Ctrl-C stops)",
          flush=True)
    if node.status is not None:
        print(f"status page, /metrics and /healthz on {node.status.url}", flush=True)
    stop.wait()
    log.info("stopping")
    node.stop()
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    if config.runner.kind != "celery":
        raise ConfigError("runner.kind: a worker serves a node with runner.kind = \"celery\"; "
                          f"this configuration has {config.runner.kind!r}")
    from dicomnode.worker import run_worker

    run_worker(config, loglevel=args.log_level)
    return EXIT_OK


def _open_node(config: Config) -> Node:
    """The node with its data folder, databases and models open.

    Raises
    ------
    StartupError
        A database is damaged or a file cannot be written (the reason, not a traceback:
        these are for the operator to fix).
    """
    from dicomnode.node import Node

    data_dir = config.resolve(config.node.data_dir)
    try:
        return Node(config)
    except sqlite3.DatabaseError as exc:
        raise _database_error(data_dir, exc) from exc
    except OSError as exc:
        raise StartupError(f"cannot use {exc.filename or data_dir}: {exc.strerror or exc}") from exc


def _start_listening(node: Node) -> None:
    """Start the listener and the runner; :class:`StartupError` when the port cannot be used."""
    try:
        node.start()
    except OSError as exc:
        node.stop()
        if exc.filename:  # a file under the data folder, not the socket
            raise StartupError(f"cannot use {exc.filename}: {exc.strerror}") from exc
        raise StartupError(_listen_error(node.config, exc)) from exc


#: What an operator should check when the listening socket cannot be opened.
_LISTEN_HINTS = {
    errno.EADDRINUSE: "is another node or program using node.port?",
    errno.EACCES: "ports below 1024 need privileges; choose another node.port",
    errno.EADDRNOTAVAIL: "node.host is not an address of this machine",
}


def _listen_error(config: Config, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    hint = _LISTEN_HINTS.get(exc.errno)
    where = f"{config.node.host}:{config.node.port}"
    return f"cannot listen on {where}: {reason}" + (f" ({hint})" if hint else "")


def _database_error(data_dir: Path, exc: sqlite3.DatabaseError) -> StartupError:
    """The error for a database that would not open, naming the damaged file when one is."""
    damaged = next((db for db in sorted(data_dir.glob("*.sqlite")) if not _intact(db)), None)
    if damaged is None:
        return StartupError(f"cannot open the databases in {data_dir}: {exc}")
    return StartupError(f"{damaged} is damaged ({exc}): restore it from a backup, or move it "
                        "aside to start with an empty one")


def _intact(db: Path) -> bool:
    """Whether SQLite's quick check passes on ``db`` (opened read-only)."""
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        return False


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
    from dicomnode.analyse.supplied import is_segmentation, referenced_series
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
    # RTSTRUCTs and SEGs are not series to analyse: they go with the CT they were drawn on.
    supplied = [ds for key in list(series) if is_segmentation(series[key][0])
                for ds in series.pop(key)]
    for ds in supplied:
        if not referenced_series(ds) & {series_uid for _, series_uid in series}:
            skipped.append(f"{ds.Modality} {ds.SOPInstanceUID}: references no CT series here")
    for note in skipped:
        print(f"skipped {note}", file=sys.stderr)
    if not series:
        print(f"refused: no DICOM series found in {folder}", file=sys.stderr)
        return EXIT_REFUSED
    out = Path(args.out)
    _private_output(config, out)
    print(f"found {len(series)} series in {folder}; loading models ...", flush=True)
    pipeline = Pipeline.from_config(config)
    produced = 0
    for (study_uid, series_uid), datasets in series.items():
        print(f"series {series_uid} ({len(datasets)} instances)", flush=True)
        try:
            outcome = pipeline.run(
                [*datasets, *supplied],
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


def _private_output(config: Config, out: Path) -> None:
    """Make what ``process`` writes readable by this user only (or ``node.file_group``).

    An existing folder keeps its mode (it may be the user's own working folder); what is
    written into it is private.
    """
    from dicomnode.filemodes import FileModes, apply, ensure_private_folder

    modes = FileModes.for_group(config.node.file_group)
    apply(modes)
    if not out.exists():
        ensure_private_folder(out, modes, "--out")


# --------------------------------------------------------------------------- jobs / retry
def _node_database(config: Config, name: str, what: str) -> Path:
    """A database of a node that has run with ``config``, or a :class:`ConfigError`."""
    db = config.resolve(config.node.data_dir) / name
    if not db.exists():
        raise ConfigError(f"no {what} database at {db}: has the node run with this configuration?")
    return db


def _job_store(config: Config):
    from dicomnode.jobs.store import JobStore

    return JobStore(_node_database(config, "jobs.sqlite", "job"))


def cmd_jobs(args: argparse.Namespace) -> int:
    store = _job_store(_load_config(args.config))
    jobs = store.all()
    if args.json:
        print(json.dumps([
            {"id": j.id, "state": j.state.value, "reason": j.reason, "study_uid": j.key.study_uid,
             "series_uid": j.key.series_uid, "instances": len(j.inputs), "attempts": j.attempts,
             "analysis_starts": j.analysis_starts, "seconds": dict(j.seconds),
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
            if j.seconds:
                print("      seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in j.seconds.items()))
            for e in store.journal(j.id):
                t = time.strftime("%H:%M:%S", time.localtime(e.at))
                print(f"      {t} {e.from_state or '-'} -> {e.to_state}: {e.reason}")
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from dicomnode.jobs.machine import IllegalTransition, JobEvent

    config = _load_config(args.config)
    store = _job_store(config)
    user = getpass.getuser()
    try:
        job = store.find(args.job)
        job = store.transition(job.id, JobEvent.RETRY,
                               f"retry requested on the command line by {user}")
    except (KeyError, IllegalTransition) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    with closing(_audit_trail(config)) as audit:
        audit.job_retried(job.id, f"{user} (command line)")
    print(f"job {job.id} is {job.state.value} again; a running node picks it up")
    return EXIT_OK


def _audit_trail(config: Config):
    from dicomnode.observe.audit import AuditTrail

    return AuditTrail(_node_database(config, "index.sqlite", "index"))


def cmd_audit(args: argparse.Namespace) -> int:
    with closing(_audit_trail(_load_config(args.config))) as audit:
        entries = audit.query(since=_when(args.since), until=_when(args.until), event=args.event,
                              job_id=args.job or "", study_uid=args.study or "", limit=args.limit)
    if args.json:
        print(json.dumps([e.as_json() for e in entries], indent=2))
        return EXIT_OK
    if not entries:
        print("no audit entries match")
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        where = f" -> {e.destination}" if e.destination else ""
        job = f"  job {e.job_id}" if e.job_id else ""
        series = f"  series ...{e.series_uid[-16:]}" if e.series_uid else ""
        detail = ", ".join(f"{k} {len(v) if isinstance(v, list) else v}" for k, v in e.detail.items())
        print(f"{when}  {e.event:<20} {e.actor}{where}{job}{series}  {detail}")
    return EXIT_OK


def _when(text: str | None) -> float | None:
    """A ``--since``/``--until`` value: an ISO date or date and time (local time)."""
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ConfigError(f"{text!r} is not a date (2026-12-04) or a date and time "
                          "(2026-12-04T13:00)") from None


def cmd_cohort_export(args: argparse.Namespace) -> int:
    from dicomnode.corrections import training_pairs, write_cohort

    config = _load_config(args.config)
    store = _job_store(config)
    pairs = training_pairs(store, config.resolve(config.node.data_dir) / "results")
    if not pairs:
        print("no supplied or corrected segmentation yet: nothing to export", file=sys.stderr)
        return EXIT_REFUSED
    rows = write_cohort(pairs, Path(args.out))
    print(f"wrote {rows} row(s) for {len(pairs)} CT series to {args.out}; train with "
          f"`dicomnode train segmentation --cohort {args.out}`")
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
    from dicomnode.filemodes import FileModes
    from dicomnode.receive import server_tls_context

    server_tls_context(config)  # the node.tls_* files and key password, as serve checks them
    if config.http.enabled:
        from dicomnode.observe.http import Credentials

        server_tls_context(config, "http")
        Credentials.from_config(config)  # the status page's token or password can be read
    FileModes.for_group(config.node.file_group)  # a group that exists
    print(f"{args.config or 'defaults'}: configuration is valid")
    return EXIT_OK


# --------------------------------------------------------------------------- cohorts
def add_dicomweb_options(p: argparse.ArgumentParser) -> None:
    """Options naming the PACS that a cohort's ``dicomweb:`` references are fetched from."""
    g = p.add_argument_group(
        "PACS (for dicomweb:<StudyInstanceUID>/<SeriesInstanceUID> in the cohort)",
        "Secrets are never given on the command line: name the environment variable or file "
        "that holds them.")
    g.add_argument("--dicomweb-url", metavar="URL",
                   help="DICOMweb root, e.g. http://pacs:8042/dicom-web (QIDO-RS + WADO-RS)")
    g.add_argument("--dicomweb-user", default="", metavar="NAME", help="HTTP basic user name")
    secret = g.add_mutually_exclusive_group()
    secret.add_argument("--dicomweb-password-env", default="", metavar="VAR",
                        help="environment variable holding the user's password")
    secret.add_argument("--dicomweb-password-file", default="", metavar="FILE",
                        help="file holding the user's password")
    secret.add_argument("--dicomweb-token-env", default="", metavar="VAR",
                        help="environment variable holding a bearer token (instead of a user)")
    secret.add_argument("--dicomweb-token-file", default="", metavar="FILE",
                        help="file holding a bearer token")
    g.add_argument("--dicomweb-ca-file", default="", metavar="PEM",
                   help="CA certificate(s) to verify an https server signed by a private CA")


def dicomweb_source(args: argparse.Namespace) -> DicomwebSource | None:
    """The :class:`~dicomnode.cohort.DicomwebSource` of :func:`add_dicomweb_options`, or None."""
    from dicomnode.cohort import DicomwebSource

    if not args.dicomweb_url:
        return None
    return DicomwebSource.from_url(
        args.dicomweb_url, username=args.dicomweb_user,
        password_env=args.dicomweb_password_env, password_file=args.dicomweb_password_file,
        token_env=args.dicomweb_token_env, token_file=args.dicomweb_token_file,
        ca_file=args.dicomweb_ca_file,
    )


def cmd_features(args: argparse.Namespace) -> int:
    from dicomnode.train.features import compute_features

    try:
        summary = compute_features(
            Path(args.cohort), Path(args.out), config=_load_config(args.config),
            workers=args.workers, progress=not args.no_progress, dicomweb=dicomweb_source(args),
        )
    except KeyboardInterrupt:
        print(f"interrupted: the rows measured so far are kept in {args.out}.cache/; run the "
              "same command again to measure the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary, file=sys.stdout if summary.ok else sys.stderr)
    return EXIT_OK if summary.ok else EXIT_ERROR


# --------------------------------------------------------------------------- train
def cmd_train_segmentation(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from dicomnode.train.segmentation import Recipe, train_segmentation

    recipe = Recipe() if args.phantoms is None else replace(Recipe(), n_phantoms=args.phantoms)
    report = train_segmentation(
        Path(args.out),
        data_root=Path(args.data_root) if args.data_root else None,
        cohort=Path(args.cohort) if args.cohort else None,
        dicomweb=dicomweb_source(args),
        recipe=recipe,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
    )
    print(report)
    return EXIT_OK


def cmd_train_shipped(args: argparse.Namespace) -> int:
    from dicomnode.train.shipped import train_shipped

    summaries = train_shipped(
        Path(args.out), work_dir=Path(args.work), parts=args.only, seed=args.seed,
        data_root=Path(args.data_root) if args.data_root else None, workers=args.workers,
    )
    print("\n\n".join(summaries))
    return EXIT_OK


def cmd_train_tmb(args: argparse.Namespace) -> int:
    from dicomnode.train.tmb import TmbProtocol, load_training_set, train_tmb

    protocol = TmbProtocol(
        high_cutoff=args.cutoff, rfe_sizes=tuple(args.rfe_sizes), rf_trees=args.rf_trees
    )
    data = load_training_set(
        Path(args.features), Path(args.cohort), tmb_column=args.tmb_column,
        label_column=args.label_column, high_cutoff=args.cutoff,
    )
    for reason in data.dropped:
        print(f"left out: {reason}")
    summary = train_tmb(
        data, Path(args.out), protocol=protocol, seed=args.seed, workers=args.workers,
        name=args.name, cohort_note=args.note,
        sources={"features": args.features, "cohort": args.cohort, "command": args.command_line},
    )
    print(summary)
    return EXIT_OK


def cmd_train_subtypes(args: argparse.Namespace) -> int:
    from dicomnode.train.subtypes import train_subtypes

    print(train_subtypes(
        Path(args.features), Path(args.out), k=args.k, seed=args.seed, resamples=args.resamples,
        command=args.command_line,
    ))
    return EXIT_OK


# --------------------------------------------------------------------------- demo
def cmd_viewer(args: argparse.Namespace) -> int:
    from dicomnode.viewer import ViewerError, ViewerServer

    root = args.dicomweb or _stow_url(_load_config(args.config))
    if not root:
        print("no DICOMweb root: give --dicomweb URL, or a configuration with a stow destination",
              file=sys.stderr)
        return EXIT_ERROR
    try:
        server = ViewerServer(root, Path(args.ohif_dist) if args.ohif_dist else None,
                              host=args.host, port=args.port).start()
    except (ViewerError, OSError) as exc:
        print(f"cannot start the viewer: {exc}", file=sys.stderr)
        return EXIT_ERROR
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"OHIF in front of {root}: open {server.viewer_url(args.study)} (Ctrl-C stops)", flush=True)
    stop.wait()
    server.stop()
    return EXIT_OK


def _stow_url(config: Config) -> str:
    """The DICOMweb root of the first STOW-RS destination, where the results went."""
    return next((d.url for d in config.destinations if d.kind == "stow"), "")


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

    p = sub.add_parser(
        "worker", help="analyse and deliver a node's jobs as a Celery worker ([runner] kind = \"celery\")",
        description="Take jobs from the broker that the node sends them to, one at a time: claim "
                    "the job from the node, read its series (from the spool folder when this "
                    "machine sees it, else from the node over HTTP), run the pipeline (on the "
                    "GPU when there is one), hand the results back and deliver them. Start one "
                    "per GPU or CPU budget, on any machine that reaches the broker and the node. "
                    "SIGTERM stops it after the job at hand.",
        epilog="example: DICOMNODE_WORKER_TOKEN=... dicomnode worker --config listeners/celery.toml")
    config_option(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("process", help="run the pipeline on a folder of DICOM files (no network)",
                       description="Analyse every CT series found under INPUT_DIR and write seg.dcm, sr.dcm and "
                                   "summary.json into OUTPUT_DIR/<SeriesInstanceUID>/. When INPUT_DIR also "
                                   "holds an RTSTRUCT or a DICOM SEG drawn on a CT series, its ROIs or "
                                   "segments are measured instead of running the model ([segmentation] "
                                   "source); a supplied SEG gets no new SEG, an RTSTRUCT gets one. Exit 0 "
                                   "when a report was produced, 2 when the input was refused.")
    p.add_argument("input", metavar="INPUT_DIR")
    p.add_argument("--out", "-o", required=True, metavar="OUTPUT_DIR")
    p.add_argument("--allow-gaps", action="store_true",
                   help="process a stack with missing slices (a warning goes into the report)")
    config_option(p)
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("demo", help="sarcoma CT -> listener -> SEG + SR, end to end, on this machine",
                       description="Take a real sarcoma CT the segmentation model never trained on "
                                   "(../shared/data/sts_cohort/STS_006; a synthetic CT with known lesions "
                                   "when that is not there), start a listener on a free loopback port, send "
                                   "the study by C-STORE and show what came out, with the Dice against the "
                                   "clinician's contour.")
    p.add_argument("--out", default="demo-output", help="folder for the demo's files (default: %(default)s)")
    p.add_argument("--seed", type=int, default=10001, help="phantom seed (10000+ are never used in training)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "viewer", help="OHIF on this machine in front of a PACS's DICOMweb (what radiologists see)",
        description="Serve OHIF's prebuilt dist/ (installed by docker/install.sh --test, or "
                    "--ohif-dist / DICOMNODE_OHIF_DIST) and proxy /dicom-web to the PACS, so "
                    "that a browser on this machine shows the CT with dicomnode's SEG, SR, key "
                    "images and PDF. Open the printed URL; double-click the SEG or SR series "
                    "in the study browser to show it over the CT.",
        epilog="example: dicomnode viewer --dicomweb http://127.0.0.1:8042/dicom-web "
               "--study 1.2.826.0.1.3680043.8.498.1",
    )
    p.add_argument("--dicomweb", metavar="URL",
                   help="the PACS's DICOMweb root (default: the configuration's stow destination)")
    p.add_argument("--study", metavar="UID", help="print a link that opens this study")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=3000, help="port (default: %(default)s)")
    p.add_argument("--ohif-dist", metavar="DIR", help="OHIF's dist/ folder")
    config_option(p)
    p.set_defaults(func=cmd_viewer)

    p = sub.add_parser("jobs", help="list jobs with their state and reason")
    config_option(p)
    p.add_argument("--verbose", "-v", action="store_true", help="show each job's journal of transitions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("retry", help="re-queue a failed or waiting job")
    p.add_argument("job", metavar="JOB", help="job id (a unique prefix is enough)")
    config_option(p)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser(
        "audit", help="who sent what, which job it became, what was delivered where, who retried",
        description="Query the append-only audit trail in the node's index database. Entries hold "
                    "study and series UIDs, AE titles, addresses, job ids and destinations, never "
                    "patient names.",
        epilog="examples: dicomnode audit --since 2026-12-01 --event delivered; "
               "dicomnode audit --study 1.2.826.0.1.3680043.8.498.1 --json")
    p.add_argument("--since", metavar="DATE", help="from this date or date and time (local)")
    p.add_argument("--until", metavar="DATE", help="before this date or date and time (local)")
    p.add_argument("--event", default="", choices=["", *AUDIT_EVENTS], metavar="EVENT",
                   help="only this event: " + ", ".join(AUDIT_EVENTS))
    p.add_argument("--job", metavar="JOB", help="only this job (a prefix of its id is enough)")
    p.add_argument("--study", metavar="UID", help="only this study")
    p.add_argument("--limit", type=int, default=1000, help="at most this many, the newest (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    config_option(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("cohort", help="training cohorts from what the node received")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser(
        "export", help="write the supplied and corrected segmentations as a cohort CSV",
        description="Every RTSTRUCT or SEG the node measured (a radiologist's contours, or a "
        "SEG of ours corrected in a viewer and sent back) is a training pair with its CT. "
        "This writes the newest pair of each CT series as a cohort CSV (docs/cohorts.md) "
        "pointing at the spooled files.",
        epilog="example: dicomnode cohort export --out corrections.csv && dicomnode train "
        "segmentation --cohort corrections.csv --out models/segmentation-ours",
    )
    c.add_argument("--out", required=True, help="the cohort CSV to write")
    config_option(c)
    c.set_defaults(func=cmd_cohort_export)

    p = sub.add_parser("check-config", help="validate a listener configuration and the files it names")
    config_option(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "features", help="measure every lesion of a cohort CSV (1037 radiomics features and more)",
        description="Load each row of a cohort CSV (image + lesion mask; see docs/cohorts.md), "
                    "measure the lesion exactly as the node does and write one row of features "
                    "per cohort row to OUT, warnings and failed rows to OUT.warnings.csv. Rows "
                    "are cached in OUT.cache/: run again after an interruption, it measures only "
                    "what is missing. Exit 0 when every row was measured, 1 when some failed.",
        epilog="example: dicomnode features --cohort cohort.csv --out features.csv "
               "--dicomweb-url http://pacs:8042/dicom-web",
    )
    p.add_argument("--cohort", required=True, metavar="CSV",
                   help="cohort: case_id, image, mask[, roi, mask_label, organ_mask, targets...]")
    p.add_argument("--out", "-o", required=True, metavar="CSV", help="features file to write")
    p.add_argument("--workers", type=int, default=2,
                   help="rows measured in parallel, one core each (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    config_option(p)
    add_dicomweb_options(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train", help="train the models the node runs")
    tsub = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    t = tsub.add_parser(
        "segmentation", help="train the lesion 3D U-Net (your cohort, phantoms, real CT)",
        description="Trains on patches with flips and intensity jitter, validates Dice after "
        "every epoch on held-out patients (every 5th case of the cohort CSV; held-out phantoms "
        "when phantoms are used), ships the last weights, scores every validation patient "
        "(Dice, tumour found, false lesions) and writes a model folder the node loads (weights.pt, manifest.json, "
        "training_curve.png, MODEL_CARD.md, RECIPE.md). Uses CUDA when present.",
        epilog="example: dicomnode train segmentation --cohort cohort.csv "
        "--out models/segmentation-ours   (then point [segmentation] model_dir at it). "
        "The shipped model: --cohort ../shared/data/sts_cohort/cohort.csv --data-root "
        "../shared/data (about 40 min on 2 CPU cores).",
    )
    t.add_argument("--out", default="models/segmentation")
    t.add_argument("--cohort", help="cohort CSV of CT and lesion masks (docs/cohorts.md)")
    t.add_argument("--phantoms", type=int, default=None,
                   help="synthetic phantoms to train on as well (default: the recipe's 0)")
    t.add_argument("--data-root",
                   help="../shared/data-like folder: its chest and abdomen CTs are the "
                   "out-of-domain check (lesions reported where there is no sarcoma)")
    t.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_dicomweb_options(t)
    t.set_defaults(func=cmd_train_segmentation)
    t = tsub.add_parser(
        "shipped", help="regenerate every model shipped in models/ (synthetic cohort included)",
        description="Writes the synthetic cohort, measures it (`dicomnode features`), trains "
        "the TMB and subtype DEMONSTRATION models on it (`train tmb`, `train subtypes`), checks "
        "them on a held-out synthetic cohort, and trains the segmentation U-Net on the real "
        "sarcoma cohort under --data-root (`train segmentation`). About 40 min on 2 CPU "
        "cores, most of it the U-Net.",
    )
    t.add_argument("--out", default="models", help="models root (default: models)")
    t.add_argument("--work", default="var/training", help="cohorts, features and caches")
    t.add_argument("--data-root", default="../shared/data",
                   help="the sarcoma cohort (sts_cohort/cohort.csv) and out-of-domain CTs "
                   "for the segmentation model (default: ../shared/data)")
    t.add_argument("--only", nargs="+", default=["tmb", "subtypes", "segmentation"],
                   choices=["tmb", "subtypes", "segmentation"], help="rebuild only these")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2)
    t.set_defaults(func=cmd_train_shipped)
    t = tsub.add_parser(
        "tmb", help="TMB high/low classifier: seed 001's protocol in nested cross-validation",
        description="Pearson |r| > 0.9 filter, Mann-Whitney U filter, random-forest recursive "
        "feature elimination and XGBoost, inside nested 5 x 5 cross-validation; ROC, Youden "
        "threshold, AUC with bootstrap 95% CI, final refit, model card. Writes model.json, "
        "manifest.json, cv_predictions.csv, roc.png, MODEL_CARD.md and RECIPE.md.",
        epilog="example: dicomnode features --cohort cohort.csv --out features.csv && "
        "dicomnode train tmb --features features.csv --cohort cohort.csv --out models/tmb-ours",
    )
    t.add_argument("--features", required=True, help="CSV written by `dicomnode features`")
    t.add_argument("--cohort", required=True, help="cohort CSV with case_id and the target column")
    t.add_argument("--out", required=True, help="model folder to (re)write")
    t.add_argument("--tmb-column", default="tmb", help="TMB in mutations/Mb (default: tmb)")
    t.add_argument("--label-column", help="use this 1/0 (high/low) column instead of a TMB cut-off")
    t.add_argument("--cutoff", type=float, default=10.0,
                   help="TMB-high means >= this many mutations/Mb (default 10, the paper's)")
    t.add_argument("--rfe-sizes", type=int, nargs="+", default=[5, 10, 20],
                   help="numbers of features the elimination may keep; inner folds choose")
    t.add_argument("--rf-trees", type=int, default=200, help="trees of the elimination's forest")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2, help="outer folds fitted in parallel")
    t.add_argument("--name", default="dicomnode TMB model", help="model name (in the SR)")
    t.add_argument("--note", default="", help="a paragraph about the cohort for the model card")
    t.set_defaults(func=cmd_train_tmb)
    t = tsub.add_parser(
        "subtypes", help="imaging subtypes: consensus clustering of Wu's features, nearest centroid",
        description="Consensus clustering (k-means on resampled lesions, Monti et al.) of the wu_ "
        "features of a features CSV; reports the consensus CDF and PAC for k = 2..6 and fits k "
        "subtypes (default 4, the paper's) with nearest-centroid assignment. Writes model.json, "
        "consensus.json, consensus.png, profiles.png, assignments.csv, MODEL_CARD.md and RECIPE.md.",
        epilog="example: dicomnode features --cohort cohort.csv --out features.csv && "
        "dicomnode train subtypes --features features.csv --out models/subtypes-ours",
    )
    t.add_argument("--features", required=True, help="CSV written by `dicomnode features`")
    t.add_argument("--out", required=True, help="model folder to (re)write")
    t.add_argument("--k", type=int, default=4,
                   help="number of subtypes (default 4, the paper's; the SR template must "
                        "declare that many codes)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resamples", type=int, default=100, help="consensus resamples per k")
    t.set_defaults(func=cmd_train_subtypes)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.command_line = "dicomnode " + shlex.join(argv)  # provenance for model recipes
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        log.debug("configuration error", exc_info=True)  # the traceback, for --log-level DEBUG
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except DicomNodeError as exc:
        log.debug("error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
