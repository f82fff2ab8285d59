"""The fuzz run: over 2,000 damaged CT instances through the real node's listener and pipeline.

``tests/fuzz.py`` builds a seeded corpus (synthetic series in three transfer syntaxes, plus
real series from ``../shared/data`` when it is there), each series mixing valid and damaged
slices. Eight threads send it, one association per series, to ``python -m dicomnode serve``
(folder destination), the damaged bytes exactly as built. The run happens once (the ``run``
fixture); each check is a test of its own:

- ``statuses``: every C-STORE got a response within the DIMSE timeout (none means a hang),
  and the node neither aborted nor refused an association or a presentation context;
- ``survived``: the node is alive, answers C-ECHO, and stores and delivers a valid series
  afterwards;
- ``index``, ``stored_as_sent``: every instance answered Success is in the index, and its
  spool file exists and ends with the damaged bytes as built (so nothing re-encoded the
  damage away on the way);
- ``jobs``: every job ends delivered or failed (with a reason) within a bounded wait, every
  series with acknowledged instances became a job, every undamaged control series was
  delivered;
- ``log``: no traceback in the node's log; ``retries``: no job waited for a retry (nothing is
  temporary on a healthy disk with a folder destination).

The three node bugs the first runs found (``docs/bad-input.md``, "Fuzz run") are fixed; a
test per case that showed one keeps them fixed.
The figures (statuses per mutation kind, jobs, times, the node's peak RSS) are printed and
written to ``test-artifacts/fuzz/summary.json``. ``DICOMNODE_FUZZ_SEED`` picks another
corpus; each problem names the ``(seed, index)`` that replays it
(``python tests/fuzz.py show --seed S --index I --out case.dcm``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fuzz
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from nodeproc import NodeProcess, query, write_config
from orthanc import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "fuzz"
SEED = int(os.environ.get("DICOMNODE_FUZZ_SEED", fuzz.DEFAULT_SEED))
STRICT = os.environ.get("CI", "").lower() == "true"  # as tests/conftest.py: nothing may skip
SENDERS = 8  # parallel associations (the node allows 10 per host by default)
RESPONSE_SECONDS = 30  # a C-STORE unanswered by then is a hang
SETTLE_SECONDS = 240  # for every job to end once the last instance was answered
QUIET_SECONDS, GAP_SECONDS, MIN_SLICES = 2, 4, 8
# What stands in for a status when there is none.
HANG, NODE_ABORT = "hang", "aborted by the node"
NO_CONTEXT, REFUSED = "no context", "association refused"
FINAL = ("delivered", "failed")


@dataclass(frozen=True)
class Item:
    """One corpus instance as written to disk (the bytes stay there, not in memory)."""

    index: int
    series: int
    source: str  # "phantom" or the name of a real series
    profile: str
    kind: str
    mutation: str
    syntax: str
    sop_class: str
    sop_instance: str
    series_uid: str
    path: Path


@dataclass(frozen=True)
class Sent:
    item: Item
    status: int | str  # the DIMSE status, or HANG / NODE_ABORT / NO_CONTEXT / REFUSED
    seconds: float


def acknowledged(status: int | str) -> bool:
    """Success or a Warning (0xB000-0xBFFF, PS3.4 B.2.3): the node says it stored the instance."""
    return isinstance(status, int) and (status == 0 or 0xB000 <= status <= 0xBFFF)


def status_name(status: int | str) -> str:
    return f"0x{status:04X}" if isinstance(status, int) else status


# ------------------------------------------------------------------------------ corpus
def write_corpus(folder: Path, real_root: Path | None) -> list[list[Item]]:
    """The corpus of SEED as files under ``folder``, one list of items per series."""
    plans = fuzz.plan(SEED, real_root)
    series = []
    for entry in plans:
        target = folder / f"{entry.number:03d}"
        target.mkdir(parents=True)
        items = []
        for case in fuzz.series_cases(SEED, entry, real_root):
            path = target / f"{case.index:05d}.dcm"
            path.write_bytes(case.data)
            items.append(Item(case.index, entry.number, entry.source, entry.profile, case.kind,
                              case.mutation.describe() if case.mutation else "",
                              case.syntax, case.sop_class, case.sop_instance,
                              case.series_uid, path))
        series.append(items)
    return series


def clean_series(folder: Path) -> list[Item]:
    """A valid series of the same kind, sent after the fuzz run (its number is out of range)."""
    entry = fuzz.SeriesPlan(9999, "phantom", ExplicitVRLittleEndian, 12, "clean", frozenset(), 0)
    folder.mkdir(parents=True)
    items = []
    for case in fuzz.series_cases(SEED, entry):
        path = folder / f"{case.slice:05d}.dcm"
        path.write_bytes(case.data)
        items.append(Item(case.index, entry.number, "phantom", "after", "valid", "", case.syntax,
                          case.sop_class, case.sop_instance, case.series_uid, path))
    return items


# ------------------------------------------------------------------------------ sending
def send_series(port: int, items: list[Item], calling_ae: str) -> list[Sent]:
    """C-STORE every item in order over one association (a new one if the node dropped it)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 30
    ae.dimse_timeout = RESPONSE_SECONDS
    ae.add_requested_context(Verification)  # keeps the association up if all else is rejected
    for sop_class, syntax in sorted({(item.sop_class, item.syntax) for item in items}):
        ae.add_requested_context(sop_class, syntax)
    sent: list[Sent] = []
    assoc = None
    for item in items:
        started = time.monotonic()
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            if not assoc.is_established:
                sent.append(Sent(item, REFUSED, time.monotonic() - started))
                assoc = None
                continue
        try:
            response = assoc.send_c_store(item.path)
        except ValueError:  # no accepted presentation context for the file's syntax
            sent.append(Sent(item, NO_CONTEXT, time.monotonic() - started))
            continue
        seconds = time.monotonic() - started
        if "Status" in response:
            status: int | str = int(response.Status)
        else:  # pynetdicom aborts after dimse_timeout; sooner, the node aborted
            status = HANG if seconds >= RESPONSE_SECONDS - 1 else NODE_ABORT
        sent.append(Sent(item, status, seconds))
    if assoc is not None and assoc.is_established:
        assoc.release()
    return sent


def echo(port: int) -> bool:
    ae = AE(ae_title="FUZZECHO")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return False
    response = assoc.send_c_echo()
    assoc.release()
    return "Status" in response and int(response.Status) == 0


# ------------------------------------------------------------------------------ the node's state
def peak_rss_mb(pid: int) -> float:
    """VmHWM (the process' peak resident set) from /proc, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_jobs(data_dir: Path) -> list[tuple[str, str, str, str]]:
    return query(data_dir / "jobs.sqlite", "SELECT id, series_uid, state, reason FROM jobs")


def untaken_series(data_dir: Path) -> list[tuple[str, int, int]]:
    """Routable series with acknowledged instances that no job has covered yet."""
    return query(data_dir / "index.sqlite",
                 "SELECT series_uid, instance_count, processed_count FROM series "
                 "WHERE routable AND instance_count > processed_count")


def settle(data_dir: Path, timeout: float) -> float:
    """Seconds until every series was taken and every job ended (or ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        jobs = read_jobs(data_dir)
        if not untaken_series(data_dir) and all(state in FINAL for _, _, state, _ in jobs):
            return time.monotonic() - started
        time.sleep(1.0)
    return time.monotonic() - started


def reason_shape(reason: str) -> str:
    """A failure reason without its UIDs, numbers and paths, to count reasons by kind."""
    reason = re.sub(r"[0-9][0-9.]{5,}", "<uid>", reason)
    reason = re.sub(r"/\S+", "<path>", reason)
    return re.sub(r"\d+(\.\d+)?", "<n>", reason)[:110]


# ------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """What the fuzz run did and left behind (the node is stopped by then)."""

    corpus: list[list[Item]]
    after: list[Item]  # the valid series sent once the fuzz run had settled
    sent: list[Sent]
    after_sent: list[Sent]
    alive: bool
    answered_echo: bool
    data_dir: Path
    jobs: list[tuple[str, str, str, str]]  # id, series UID, state, reason
    journal: list[tuple[str, str, str]]  # job id, to state, reason
    log: str
    summary: dict

    def item(self, index: int) -> Sent | None:
        return next((s for s in self.sent if s.item.index == index), None)

    def job_of(self, sop_instance: str) -> tuple[str, str, str] | None:
        """(id, state, reason) of the last job whose inputs hold the instance."""
        path = str(spooled(self.data_dir).get(sop_instance))
        rows = query(self.data_dir / "jobs.sqlite",
                     "SELECT id, state, reason, inputs FROM jobs ORDER BY created_at")
        found = [(job_id, state, reason) for job_id, state, reason, inputs in rows
                 if path in json.loads(inputs)]
        return found[-1] if found else None


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The whole fuzz run, once for every check below."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    t0 = time.monotonic()
    real_root = fuzz.real_root_if_present()
    missing = [folder for _, folder, _, _ in fuzz.REAL_SOURCES
               if real_root is None or not (real_root / folder).is_dir()]
    if missing and STRICT:
        pytest.fail(f"CI=true, but the real series are missing under {fuzz.SHARED_DATA}: {missing}")
    if missing:  # a laptop without the shared data: the synthetic part still runs in full
        print(f"\nfuzz run without the real series (not found under {fuzz.SHARED_DATA}): {missing}")
    corpus = write_corpus(tmp_path / "corpus", real_root)
    after = clean_series(tmp_path / "after")
    built = time.monotonic() - t0

    port, data_dir, results = free_port(), tmp_path / "node", tmp_path / "results"
    config = write_config(
        tmp_path / "node.toml", port=port, data_dir=data_dir,
        destinations=[{"kind": "folder", "name": "results", "path": results}],
        completion={"quiet_seconds": QUIET_SECONDS, "gap_timeout_seconds": GAP_SECONDS},
        assembly={"min_slices": MIN_SLICES},
    )
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send file bytes as built, damage and all
    try:
        t1 = time.monotonic()
        with ThreadPoolExecutor(SENDERS) as pool:
            sent = [s for series in pool.map(
                lambda items: send_series(port, items, f"FUZZ{items[0].series:03d}"), corpus)
                for s in series]
        sending = time.monotonic() - t1
        settling = settle(data_dir, SETTLE_SECONDS)
        # Afterwards: still alive, answering, storing and delivering a valid series.
        alive = node.process is not None and node.process.poll() is None
        answered = alive and echo(port)
        after_sent = send_series(port, after, "FUZZAFTER") if answered else []
        settle(data_dir, 60)
        rss = peak_rss_mb(node.process.pid) if alive else float("nan")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        node.stop()
    jobs = read_jobs(data_dir)
    journal = query(data_dir / "jobs.sqlite", "SELECT job_id, to_state, reason FROM journal")
    log = node.log_path.read_text(errors="replace")
    summary = figures(sent, jobs, corpus, after, data_dir, built=built, sending=sending,
                      settling=settling, total=time.monotonic() - t0, rss=rss)
    result = Run(corpus, after, sent, after_sent, alive, answered, data_dir, jobs, journal, log,
                 summary)
    summary["problems"] = {name: check(result) for name, check in CHECKS.items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nfuzz run:", json.dumps(summary, indent=2))
    return result


# ------------------------------------------------------------------------------ the checks
def replay(item: Item) -> str:
    return f"seed {SEED} index {item.index} ({item.kind}: {item.mutation[:160]})"


def check_statuses(run: Run) -> list[str]:
    """Every instance got an answer: no hang, no abort, no refused association, and no
    context refused (the node negotiates every syntax of the corpus, so the damage reached it)."""
    return [f"{status_name(s.status)} after {s.seconds:.1f} s: {replay(s.item)}"
            for s in run.sent if s.status in (HANG, NODE_ABORT, REFUSED, NO_CONTEXT)]


def check_survived(run: Run) -> list[str]:
    """Alive, answering C-ECHO, and a valid series afterwards is stored and delivered."""
    if not run.alive:
        return ["the node exited during the fuzz run"]
    if not run.answered_echo:
        return ["the node no longer answers C-ECHO"]
    statuses = Counter(status_name(s.status) for s in run.after_sent)
    if statuses != {"0x0000": len(run.after)}:
        return [f"a valid series sent afterwards: {dict(statuses)}"]
    return []


def spooled(data_dir: Path) -> dict[str, Path]:
    """SOP Instance UID -> spooled file, from the index."""
    rows = query(data_dir / "index.sqlite", "SELECT sop_instance_uid, path FROM instances")
    return {uid: Path(path) if Path(path).is_absolute() else data_dir / path for uid, path in rows}


def check_index(run: Run) -> list[str]:
    """Every acknowledged instance is indexed and its spool file exists."""
    files = spooled(run.data_dir)
    problems = []
    for s in run.sent + run.after_sent:
        if not acknowledged(s.status):
            continue
        path = files.get(s.item.sop_instance)
        if path is None:
            problems.append(f"acknowledged but not indexed: {replay(s.item)}")
        elif not path.exists():
            problems.append(f"indexed, but the spool file {path} is gone: {replay(s.item)}")
    return problems


def check_stored_as_sent(run: Run) -> list[str]:
    """The damage reached the node: each acknowledged file ends with the data set bytes we
    built (nothing on the way, pynetdicom included, re-encoded them)."""
    files = spooled(run.data_dir)
    problems = []
    for s in run.sent:
        path = files.get(s.item.sop_instance)
        if not acknowledged(s.status) or path is None or not path.exists():
            continue  # check_index reports those
        body = fuzz.data_set_bytes(s.item.path.read_bytes())
        if not path.read_bytes().endswith(body):
            problems.append(f"spooled {path.name} is not the data set as sent (re-encoded on "
                            f"the way, or no longer stored as received): {replay(s.item)}")
    return problems


def check_jobs(run: Run) -> list[str]:
    """Every job ended, failures say why, every series was taken, controls were delivered."""
    problems = [f"job {job_id} of series {series_uid} still {state}"
                for job_id, series_uid, state, _ in run.jobs if state not in FINAL]
    problems += [f"job {job_id} failed without a reason"
                 for job_id, _, state, reason in run.jobs
                 if state == "failed" and not reason.strip()]
    problems += [f"series {uid}: {count} instance(s) acknowledged, {done} taken into a job"
                 for uid, count, done in untaken_series(run.data_dir)]
    states = defaultdict(set)
    for _, series_uid, state, _ in run.jobs:
        states[series_uid].add(state)
    for items in [*(s for s in run.corpus if s[0].profile == "clean"), run.after]:
        uid = items[0].series_uid
        if states.get(uid) != {"delivered"}:
            problems.append(f"undamaged series {items[0].series} ({uid}): jobs {states.get(uid)}")
    return problems


def tracebacks(log: str) -> list[tuple[str, str]]:
    """(the log record that carries it, the traceback's first lines) for each traceback."""
    lines = log.splitlines()
    return [(lines[k - 1] if k else "", " | ".join(lines[k:k + 8]))
            for k, line in enumerate(lines) if line.startswith("Traceback")]


def check_log(run: Run) -> list[str]:
    """No traceback in the node's log (bad input is answered, not crashed on)."""
    return [f"traceback in the node's log after {record!r}: {text}"
            for record, text in tracebacks(run.log)]


def check_retries(run: Run) -> list[str]:
    """Nothing waited for a retry: on a healthy disk, with a folder destination, no failure
    is temporary, so a retry means damaged input was taken for a fault of the node."""
    return [f"job {job_id} waited for a retry: {reason}"
            for job_id, state, reason in run.journal
            if state == "retry_wait"]


def patient_values() -> tuple[str, ...]:
    """Patient name, ID and birth date of the corpus (SECURITY.md: never logged)."""
    return ("Phantom^Demo", f"FUZZ-{SEED}-", "19600101")


def check_privacy(run: Run) -> list[str]:
    """No patient name, patient ID or birth date in the node's log, however damaged the input."""
    problems = []
    for line in run.log.splitlines():
        if any(value in line for value in patient_values()):
            problems.append(f"patient data in the node's log: {line[:300]}")
    return problems


CHECKS = {"statuses": check_statuses, "survived": check_survived, "index": check_index,
          "stored_as_sent": check_stored_as_sent, "jobs": check_jobs, "log": check_log,
          "retries": check_retries, "privacy": check_privacy}


# ------------------------------------------------------------------------------ the tests
def test_at_least_2000_damaged_instances_were_sent(run: Run) -> None:
    damaged = sum(s.item.kind != "valid" for s in run.sent)
    assert damaged >= fuzz.MIN_MUTATED >= 2000, f"only {damaged} damaged instances were sent"
    assert {s.item.kind for s in run.sent} == {"valid", *fuzz.MUTATORS}


@pytest.mark.parametrize("check", CHECKS)
def test_fuzz_run(run: Run, check: str) -> None:
    problems = CHECKS[check](run)
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} in all)"


def known_case(run: Run, index: int, needs_real_data: bool) -> Sent:
    """The acknowledged instance that showed a known bug (skip for other corpora)."""
    if SEED != fuzz.DEFAULT_SEED:
        pytest.skip(f"the known case is index {index} of seed {fuzz.DEFAULT_SEED}, not {SEED}")
    if needs_real_data and fuzz.real_root_if_present() is None:
        pytest.skip(f"the known case is a real series from {fuzz.SHARED_DATA}, not found")
    sent = run.item(index)
    if sent is None or not acknowledged(sent.status):
        pytest.fail(f"index {index} was not acknowledged ({sent}): the corpus changed, "
                    "update the known case")
    return sent


# Found by this run (seed 12006 index 2816, one bit flipped in a JPEG-LS codestream): pydicom
# logged each failing decoder plugin with a traceback; now one DEBUG line each.
def test_undecodable_pixel_data_leaves_no_traceback(run: Run) -> None:
    sent = known_case(run, 2816, needs_real_data=True)
    job = run.job_of(sent.item.sop_instance)
    if job is None or job[1] != "failed" or "cannot be decoded" not in job[2]:
        pytest.fail(f"the known case no longer fails as recorded: {job}")
    lines = run.log.splitlines()
    start = next(k for k, line in enumerate(lines) if f"job {job[0]}: assembling" in line)
    end = next(k for k, line in enumerate(lines) if f"job {job[0]} failed" in line)
    assert not any(line.startswith("Traceback") for line in lines[start:end]), \
        "\n".join(lines[start:end][:12])


# Found by this run (index 1226): pydicom's OSError for damaged data was taken for a disk fault.
def test_a_parse_error_is_not_retried_as_a_storage_fault(run: Run) -> None:
    sent = known_case(run, 1226, needs_real_data=False)
    job = run.job_of(sent.item.sop_instance)
    if job is None or job[1] != "failed" or "No tag to read" not in job[2]:
        pytest.fail(f"the known case no longer fails as recorded: {job}")
    states = [state for job_id, state, _ in run.journal if job_id == job[0]]
    assert "retry_wait" not in states, f"job {job[0]}: {states}; {job[2]}"


# Found by this run (index 2639): pydicom's exception quoted the raw value (a patient ID).
def test_a_value_pydicom_cannot_parse_does_not_reach_the_log(run: Run) -> None:
    sent = known_case(run, 2639, needs_real_data=False)
    job = run.job_of(sent.item.sop_instance)
    if job is None or job[1] != "failed" or "BytesLengthException" not in job[2]:
        pytest.fail(f"the known case no longer fails as recorded: {job}")
    lines = [line for line in run.log.splitlines() if job[0] in line]
    assert not any(f"FUZZ-{SEED}-" in line for line in lines), "\n".join(lines)


def damaged_analysed(data_dir: Path, sent: list[Sent]) -> dict:
    """Delivered jobs that analysed damaged (acknowledged) instances, how many such instances
    they analysed, and by which mutation: damage the pipeline read through."""
    damaged = {s.item.sop_instance: s.item.kind for s in sent
               if acknowledged(s.status) and s.item.kind != "valid"}
    by_path = {str(path): uid for uid, path in spooled(data_dir).items()}
    jobs, kinds = 0, Counter()
    for (inputs,) in query(data_dir / "jobs.sqlite",
                           "SELECT inputs FROM jobs WHERE state = 'delivered'"):
        hits = [damaged[uid] for path in json.loads(inputs)
                if (uid := by_path.get(str(path))) in damaged]
        jobs, kinds = jobs + bool(hits), kinds + Counter(hits)
    return {"jobs": jobs, "instances": sum(kinds.values()), "kinds": dict(sorted(kinds.items()))}


def figures(sent: list[Sent], jobs: list[tuple[str, str, str, str]], corpus: list[list[Item]],
            after: list[Item], data_dir: Path, *, built: float, sending: float, settling: float,
            total: float, rss: float) -> dict:
    """The run's figures, as docs/bad-input.md quotes them."""
    by_kind: dict[str, Counter] = defaultdict(Counter)
    by_syntax: dict[str, Counter] = defaultdict(Counter)
    for s in sent:
        by_kind[s.item.kind][status_name(s.status)] += 1
        by_syntax[UID(s.item.syntax).name][status_name(s.status)] += 1
    # Real series are named by their source, synthetic ones by their profile ("after": the
    # valid series sent once the run had settled).
    group_of = {items[0].series_uid: items[0].profile if items[0].source == "phantom"
                else items[0].source for items in [*corpus, after]}
    by_group: dict[str, Counter] = defaultdict(Counter)
    for _, series_uid, state, _ in jobs:
        by_group[group_of.get(series_uid, "split off (damaged UID)")][state] += 1
    reasons = Counter(reason_shape(reason) for _, _, state, reason in jobs if state == "failed")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": SEED,
        "series": len(corpus),
        "real_series": [items[0].source for items in corpus if items[0].source != "phantom"],
        "instances_sent": len(sent),
        "damaged_sent": sum(s.item.kind != "valid" for s in sent),
        "statuses": dict(Counter(status_name(s.status) for s in sent)),
        "statuses_by_kind": {kind: dict(c) for kind, c in sorted(by_kind.items())},
        "statuses_by_syntax": {syntax: dict(c) for syntax, c in sorted(by_syntax.items())},
        "jobs": dict(Counter(state for _, _, state, _ in jobs)),
        "jobs_by_series": {group: dict(c) for group, c in sorted(by_group.items())},
        "delivered_with_damaged_instances": damaged_analysed(data_dir, sent),
        "top_failure_reasons": reasons.most_common(12),
        "slowest_response_s": round(max((s.seconds for s in sent), default=0.0), 2),
        "seconds": {"build": round(built, 1), "send": round(sending, 1),
                    "settle": round(settling, 1), "total": round(total, 1)},
        "node_peak_rss_mb": round(rss, 1),
    }
