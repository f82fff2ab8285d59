"""Durable storage of received instances (EDGE).

- :mod:`dicomnode.spool.store`: every instance as the sender encoded it, one Part 10 file per
  SOP Instance UID, written atomically and fsynced before the C-STORE is acknowledged;
- :mod:`dicomnode.spool.index`: SQLite index of the spooled instances and per-series counters
  that the completion rule and the job runner read.
"""
