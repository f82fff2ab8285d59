"""SQLite index of the spool: one row per instance, counters per series (EDGE).

The C-STORE handler records each instance after its file is durable and before it answers
Success; the job runner reads :meth:`Index.pending_series` to find series with instances that
no job has covered yet, and calls :meth:`Index.mark_taken` when it creates a job. An instance
that arrives after that makes the series pending again, and the next job covers the whole
series afresh (reprocessing). An identical copy of an instance changes nothing, so a series
re-sent unchanged makes no second job, unless the receiver calls :meth:`Index.reopen` (it does
with ``completion.resent_series = "reprocess"``).

Durability: WAL journal with ``synchronous=FULL``, so every committed row is on disk when
:meth:`Index.record_instance` returns, exactly like the spooled file it points to. With
``NORMAL`` a power cut could roll back the last commits while their files and the
acknowledgements survived, and a series would be processed without instances the node had
acknowledged. ``FULL`` costs one WAL fsync per instance (0.8 ms per instance against 0.35 ms
with ``NORMAL`` here, while the file and its folder take about 3 ms), and each instance is one
transaction of three short statements (look up, upsert the instance, upsert its series
counters), not one statement per column.

Reconciliation: a file can lie in the spool without its row, when the C-STORE was answered
Out of Resources because the index could not be written after the file was (the sender sends
it again, or does not). :meth:`Index.index_orphans` indexes such files at start-up from their
headers, as if just received, so that their series completes.

Thread safety: one connection guarded by a lock. Writes are serialised by SQLite anyway, and a
per-thread connection would mean one new connection per association thread (pynetdicom runs
each association in its own thread).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicomnode.series.completion import SeriesState
from dicomnode.types import SeriesKey

log = logging.getLogger(__name__)

#: Two orientations whose cosines differ by less than this count as one.
ORIENTATION_TOLERANCE = 1e-4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid      TEXT PRIMARY KEY,
    study_uid             TEXT NOT NULL,
    series_uid            TEXT NOT NULL,
    sop_class_uid         TEXT NOT NULL,
    transfer_syntax       TEXT NOT NULL,
    path                  TEXT NOT NULL,
    position_along_normal REAL,
    orientation           TEXT,
    instance_number       INTEGER,
    rows                  INTEGER,
    cols                  INTEGER,
    frames                INTEGER NOT NULL DEFAULT 1,
    received_at           REAL NOT NULL,
    calling_ae            TEXT NOT NULL,
    association_id        TEXT NOT NULL,
    modality              TEXT NOT NULL DEFAULT '',
    routable              INTEGER NOT NULL,
    replaced              INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (study_uid, series_uid);
CREATE TABLE IF NOT EXISTS series (
    study_uid       TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    first_arrival   REAL NOT NULL,
    last_arrival    REAL NOT NULL,
    instance_count  INTEGER NOT NULL,
    processed_count INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL,
    routable        INTEGER NOT NULL,
    replaced_count  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (study_uid, series_uid)
);
CREATE INDEX IF NOT EXISTS series_pending ON series (last_arrival)
    WHERE routable AND instance_count > processed_count;
"""

_UPSERT_INSTANCE = """
INSERT INTO instances (
    sop_instance_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, path,
    position_along_normal, orientation, instance_number, rows, cols, frames, received_at,
    calling_ae, association_id, modality, routable, replaced
) VALUES (
    :sop_instance_uid, :study_uid, :series_uid, :sop_class_uid, :transfer_syntax, :path,
    :position_along_normal, :orientation, :instance_number, :rows, :cols, :frames, :received_at,
    :calling_ae, :association_id, :modality, :routable, :replaced
)
ON CONFLICT (sop_instance_uid) DO UPDATE SET
    study_uid = excluded.study_uid, series_uid = excluded.series_uid,
    sop_class_uid = excluded.sop_class_uid, transfer_syntax = excluded.transfer_syntax,
    path = excluded.path, position_along_normal = excluded.position_along_normal,
    orientation = excluded.orientation, instance_number = excluded.instance_number,
    rows = excluded.rows, cols = excluded.cols, frames = excluded.frames,
    received_at = excluded.received_at, calling_ae = excluded.calling_ae,
    association_id = excluded.association_id, modality = excluded.modality,
    routable = excluded.routable, replaced = instances.replaced + excluded.replaced
"""

# A duplicate adds no instance but still counts as activity: it moves last_arrival (a PACS
# resending a series is still sending it).
_UPSERT_SERIES = """
INSERT INTO series (
    study_uid, series_uid, first_arrival, last_arrival, instance_count, processed_count, state,
    routable, replaced_count
) VALUES (?, ?, ?, ?, ?, 0, 'receiving', ?, ?)
ON CONFLICT (study_uid, series_uid) DO UPDATE SET
    last_arrival = max(last_arrival, excluded.last_arrival),
    instance_count = instance_count + excluded.instance_count,
    state = CASE WHEN excluded.instance_count > 0 THEN 'receiving' ELSE state END,
    routable = max(routable, excluded.routable),
    replaced_count = replaced_count + excluded.replaced_count
"""

_SERIES_COLUMNS = (
    "study_uid, series_uid, first_arrival, last_arrival, instance_count, processed_count, "
    "routable, replaced_count"
)


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as the index stores it.

    ``position_along_normal`` and ``orientation`` are ``None`` when the instance has no
    ImagePositionPatient / ImageOrientationPatient (or more than one frame: an Enhanced CT
    keeps them per frame). ``orientation`` is the six cosines as comma-separated text.
    ``replaced`` marks a copy whose content replaced an earlier copy of the same instance.
    """

    sop_instance_uid: str
    key: SeriesKey
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    received_at: float
    calling_ae: str
    association_id: str
    routable: bool
    modality: str = ""
    position_along_normal: float | None = None
    orientation: str | None = None
    instance_number: int | None = None
    rows: int | None = None
    cols: int | None = None
    frames: int = 1
    replaced: bool = False


class Index:
    """SQLite index of spooled instances and series counters (see the module docstring)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(
            self.db_path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """Raise ``sqlite3.Error`` when the database cannot be read."""
        with self._lock:
            self._db.execute("SELECT 1 FROM instances LIMIT 1").fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE takes the write lock up front: no upgrade deadlock with other writers.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def record_instance(self, record: InstanceRecord) -> None:
        """Insert or update one instance and its series counters in one transaction.

        A new SOP Instance UID adds one to its series' ``instance_count``; a repeated one adds
        nothing (an instance that moved to another series is taken from the old one's count).
        Every call moves the series' ``last_arrival``.
        """
        key = record.key
        with self._transaction() as db:
            previous = db.execute(
                "SELECT study_uid, series_uid FROM instances WHERE sop_instance_uid = ?",
                (record.sop_instance_uid,),
            ).fetchone()
            if previous is not None and tuple(previous) != (key.study_uid, key.series_uid):
                db.execute(
                    "UPDATE series SET instance_count = instance_count - 1 "
                    "WHERE study_uid = ? AND series_uid = ?",
                    tuple(previous),
                )
            added = previous is None or tuple(previous) != (key.study_uid, key.series_uid)
            db.execute(_UPSERT_INSTANCE, _instance_row(record))
            db.execute(
                _UPSERT_SERIES,
                (
                    key.study_uid,
                    key.series_uid,
                    record.received_at,
                    record.received_at,
                    int(added),
                    int(record.routable),
                    int(record.replaced),
                ),
            )

    def mark_taken(self, key: SeriesKey, count: int) -> None:
        """Record that a job now covers ``count`` instances of the series.

        Instances beyond ``count`` (arrived while the job was being created, or later) keep
        the series pending.

        Raises
        ------
        KeyError
            The series is not in the index.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE series SET processed_count = ?, "
                "state = CASE WHEN ? >= instance_count THEN 'taken' ELSE 'receiving' END "
                "WHERE study_uid = ? AND series_uid = ?",
                (count, count, key.study_uid, key.series_uid),
            )
            if cursor.rowcount == 0:
                raise KeyError(key)

    def reopen(self, key: SeriesKey) -> bool:
        """Make a series that a job covers pending again, so that its next job covers it all.

        Used when a series is sent again unchanged and the node is configured to reprocess
        resent series. Returns whether the series was covered (and so is now reopened).
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE series SET processed_count = 0, state = 'receiving' "
                "WHERE study_uid = ? AND series_uid = ? AND processed_count > 0",
                (key.study_uid, key.series_uid),
            )
            return cursor.rowcount > 0

    def pending_series(self) -> list[SeriesState]:
        """Routable series with instances that no job covers yet, oldest activity first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series "
                "WHERE routable AND instance_count > processed_count ORDER BY last_arrival"
            ).fetchall()
            return [self._state(row) for row in rows]

    def series_state(self, key: SeriesKey) -> SeriesState:
        """The state of one series; raises :class:`KeyError` if it is unknown."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE study_uid = ? AND series_uid = ?",
                (key.study_uid, key.series_uid),
            ).fetchone()
            if row is None:
                raise KeyError(key)
            return self._state(row)

    def series_modalities(self, key: SeriesKey) -> set[str]:
        """The Modality values of the series' instances (empty for an unknown series)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT modality FROM instances WHERE study_uid = ? AND series_uid = ?",
                (key.study_uid, key.series_uid),
            ).fetchall()
        return {modality for (modality,) in rows}

    def find_series(self, series_uid: str) -> SeriesState | None:
        """The routable series with this Series Instance UID, in whichever study; ``None``
        when the node holds none."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_uid = ? AND routable "
                "ORDER BY last_arrival DESC LIMIT 1",
                (series_uid,),
            ).fetchone()
            return None if row is None else self._state(row)

    def instance_paths(self, key: SeriesKey) -> list[Path]:
        """Spool paths of the series' routable instances, ordered along the slice normal.

        Instances without a position come last, in InstanceNumber order.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE study_uid = ? AND series_uid = ? AND routable "
                "ORDER BY position_along_normal IS NULL, position_along_normal, "
                "instance_number, sop_instance_uid",
                (key.study_uid, key.series_uid),
            ).fetchall()
        return [Path(path) for (path,) in rows]

    def index_orphans(self, spool_root: Path, routable: Collection[str],
                      now: float | None = None) -> int:
        """Index the spooled files that the index does not know, as received at ``now``, and
        log one warning with their number; returns it.

        Call at start-up, before the listener opens: a file being received is not indexed
        yet either. Hidden files (temporaries) are skipped, and so is a file whose SOP
        Instance UID the index holds at another path (a copy that was replaced). A file whose
        header cannot be read is left where it is and logged.

        Parameters
        ----------
        spool_root
            The spool's root folder (``<study>/<series>/<sop>.dcm`` under it).
        routable
            The SOP classes the node processes (as the listener indexes them).
        """
        now = time.time() if now is None else now
        indexed = 0
        for series_dir in sorted(spool_root.glob("*/*")):
            if series_dir.parent.name.startswith(".") or not series_dir.is_dir():
                continue
            known = self._sop_uids(SeriesKey(series_dir.parent.name, series_dir.name))
            for path in sorted(series_dir.glob("*.dcm")):
                if path.name.startswith(".") or path.stem in known or self._knows(path.stem):
                    continue
                record = _orphan_record(path, routable, now)
                if record is not None:
                    self.record_instance(record)
                    indexed += 1
        if indexed:
            log.warning("indexed %d spooled instance(s) that the index did not know (a store "
                        "answered Out of Resources, or a crash); their series complete as if "
                        "just received", indexed)
        return indexed

    def _sop_uids(self, key: SeriesKey) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_uid = ? AND series_uid = ?",
                (key.study_uid, key.series_uid),
            ).fetchall()
        return {uid for (uid,) in rows}

    def _knows(self, sop_instance_uid: str) -> bool:
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone() is not None

    def _state(self, row: Sequence) -> SeriesState:
        """Build a :class:`SeriesState` from a series row and its instances (lock held)."""
        study, series, first, last, count, processed, routable, replaced = row
        instances = self._db.execute(
            "SELECT position_along_normal, orientation, frames FROM instances "
            "WHERE study_uid = ? AND series_uid = ?",
            (study, series),
        ).fetchall()
        positions = sorted(p for p, _, frames in instances if p is not None and frames <= 1)
        orientations = {o for _, o, _ in instances if o is not None}
        return SeriesState(
            key=SeriesKey(study, series),
            first_arrival=first,
            last_arrival=last,
            instance_count=count,
            processed_count=processed,
            positions=tuple(positions),
            orientation_consistent=_orientations_agree(orientations),
            multiframe=any(frames > 1 for _, _, frames in instances),
            routable=bool(routable),
            replaced_count=replaced,
        )


def _instance_row(record: InstanceRecord) -> dict[str, object]:
    return {
        "sop_instance_uid": record.sop_instance_uid,
        "study_uid": record.key.study_uid,
        "series_uid": record.key.series_uid,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax": record.transfer_syntax,
        "path": str(record.path),
        "position_along_normal": record.position_along_normal,
        "orientation": record.orientation,
        "instance_number": record.instance_number,
        "rows": record.rows,
        "cols": record.cols,
        "frames": record.frames,
        "received_at": record.received_at,
        "calling_ae": record.calling_ae,
        "association_id": record.association_id,
        "modality": record.modality,
        "routable": int(record.routable),
        "replaced": int(record.replaced),
    }


def _orphan_record(path: Path, routable: Collection[str], now: float) -> InstanceRecord | None:
    """What the listener would have recorded for a spooled file, read from its header;
    ``None`` (logged) when the header cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID)
        frames = int(ds.get("NumberOfFrames") or 1)
        position, orientation = _geometry(ds, frames)
        return InstanceRecord(
            sop_instance_uid=str(ds.SOPInstanceUID),
            key=SeriesKey(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)),
            sop_class_uid=sop_class,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            path=path,
            received_at=now,
            calling_ae="",
            association_id="reconciled",
            routable=sop_class in routable,
            modality=str(ds.get("Modality", "")),
            position_along_normal=position,
            orientation=orientation,
            instance_number=_optional_int(ds.get("InstanceNumber")),
            rows=_optional_int(ds.get("Rows")),
            cols=_optional_int(ds.get("Columns")),
            frames=frames,
        )
    except Exception as exc:  # noqa: BLE001 - any unreadable header: the file is only reported
        log.warning("spooled file %s is not indexed: its header cannot be read: %s: %s",
                    path, type(exc).__name__, exc)
        return None


def _geometry(ds: pydicom.Dataset, frames: int) -> tuple[float | None, str | None]:
    """ImagePositionPatient projected on the slice normal (PS3.3 C.7.6.2.1.1) and the six
    orientation cosines as the index's text, as the listener computes them."""
    try:
        orientation = [float(c) for c in ds.get("ImageOrientationPatient") or ()]
        position = [float(c) for c in ds.get("ImagePositionPatient") or ()]
    except (TypeError, ValueError):  # unparsable geometry: unknown, as the listener has it
        return None, None
    text = ",".join(f"{c:.6f}" for c in orientation) if len(orientation) == 6 else None
    if frames > 1 or text is None or len(position) != 3:
        return None, text
    row, col = orientation[:3], orientation[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0])
    length = math.sqrt(sum(n * n for n in normal))
    if length < 1e-6:
        return None, text
    return sum(p * n for p, n in zip(position, normal)) / length, text


def _optional_int(value: object) -> int | None:
    try:
        return None if value is None or value == "" else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _orientations_agree(orientations: set[str]) -> bool:
    """Whether all orientation texts (six comma-separated cosines) agree within tolerance."""
    if len(orientations) <= 1:
        return True
    vectors = [[float(v) for v in text.split(",")] for text in orientations]
    first = vectors[0]
    return all(
        max(abs(a - b) for a, b in zip(first, other)) <= ORIENTATION_TOLERANCE
        for other in vectors[1:]
    )
