"""The audit trail: who sent what, which job it became, what was delivered where, who retried
(EDGE: SQLite, in the index database).

Append-only: rows are only ever inserted, and the database itself refuses an UPDATE or a DELETE
of the ``audit`` table (triggers), so that a bug or a hurried operator cannot rewrite history.
Rows hold what finds a study and a sender, never more patient data: study and series instance
UIDs, AE titles, peer addresses, job ids, destination names, SOP instance UIDs of what was
delivered, and counts. ``dicomnode audit`` queries it (:meth:`AuditTrail.query`).

Events (``event`` column):

- ``received``: instances of one series stored during one association (actor: the calling AE
  title and its address);
- ``association_rejected``: an association refused by the AE title policy;
- ``job_created``: a complete series became a job (actor ``dicomnode``);
- ``delivered`` / ``delivery_failed``: a job's results sent to a destination;
- ``retried``: a person re-queued a job (actor: the user name on the status page, or the
  command line's user).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.observe.events import AssociationSummary, Observer
from dicomnode.types import DeliveryResult, SeriesKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    actor TEXT NOT NULL,
    job_id TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    destination TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
CREATE INDEX IF NOT EXISTS audit_by_study ON audit (study_uid);
CREATE INDEX IF NOT EXISTS audit_by_job ON audit (job_id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""

#: The events, in the order of a series' life.
EVENTS = ("received", "association_rejected", "job_created", "delivered", "delivery_failed",
          "retried")


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    event: str
    actor: str
    job_id: str
    study_uid: str
    series_uid: str
    destination: str
    detail: Mapping[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "event": self.event, "actor": self.actor,
                "job_id": self.job_id, "study_uid": self.study_uid,
                "series_uid": self.series_uid, "destination": self.destination,
                "detail": dict(self.detail)}


class AuditTrail(Observer):
    """The ``audit`` table of the index database; records the events it observes."""

    def __init__(self, db_path: Path, *, clock: Any = time.time) -> None:
        self._conn = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None,
                                     timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.clock = clock

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def record(self, event: str, actor: str, *, job_id: str = "", key: SeriesKey | None = None,
               destination: str = "", detail: Mapping[str, Any] | None = None) -> None:
        """Append one row."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        with self._lock:
            self._conn.execute(
                "INSERT INTO audit (at, event, actor, job_id, study_uid, series_uid, destination,"
                " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (self.clock(), event, actor, job_id, key.study_uid if key else "",
                 key.series_uid if key else "", destination,
                 json.dumps(dict(detail or {}), sort_keys=True)),
            )

    def query(self, *, since: float | None = None, until: float | None = None,
              event: str = "", job_id: str = "", study_uid: str = "", series_uid: str = "",
              limit: int = 1000) -> list[AuditEntry]:
        """Rows in time order, filtered; ``job_id`` may be a prefix of the id."""
        where, params = [], []
        for clause, value in (("at >= ?", since), ("at < ?", until), ("event = ?", event or None),
                              ("job_id LIKE ?", f"{job_id}%" if job_id else None),
                              ("study_uid = ?", study_uid or None),
                              ("series_uid = ?", series_uid or None)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "")
        # The newest ``limit`` rows, shown oldest first.
        sql = f"SELECT * FROM ({sql} ORDER BY seq DESC LIMIT ?) ORDER BY seq"
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [AuditEntry(seq=r[0], at=r[1], event=r[2], actor=r[3], job_id=r[4],
                           study_uid=r[5], series_uid=r[6], destination=r[7],
                           detail=json.loads(r[8])) for r in rows]

    # -- events ------------------------------------------------------------------------------
    def association_rejected(self, calling_ae: str, peer: str, reason: str) -> None:
        self.record("association_rejected", _sender(calling_ae, peer), detail={"reason": reason})

    def association_ended(self, summary: AssociationSummary) -> None:
        actor = _sender(summary.calling_ae, summary.peer)
        for key, count in summary.series.items():
            self.record("received", actor, key=key,
                        detail={"instances": count, "association": summary.id,
                                "association_ended": summary.how})

    def job_created(self, job_id: str, key: SeriesKey, instances: int) -> None:
        self.record("job_created", "dicomnode", job_id=job_id, key=key,
                    detail={"instances": instances})

    def delivery_attempted(self, job_id: str, key: SeriesKey, destination: str,
                           result: DeliveryResult) -> None:
        detail: dict[str, Any] = {
            "sop_instance_uids": [o.sop_instance_uid for o in result.outcomes if o.ok]}
        if not result.ok:
            detail["error"] = result.error or "; ".join(
                o.reason for o in result.outcomes if not o.ok)
            detail["retryable"] = result.retryable
        self.record("delivered" if result.ok else "delivery_failed", "dicomnode",
                    job_id=job_id, key=key, destination=destination, detail=detail)

    def job_retried(self, job_id: str, who: str) -> None:
        self.record("retried", who, job_id=job_id)


def _sender(calling_ae: str, peer: str) -> str:
    """``AE_TITLE@host``: the calling AE title and the address it came from (no port: the
    port changes with every connection)."""
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    return f"{calling_ae}@{host}"
