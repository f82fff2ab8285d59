"""Jobs: one per taken series snapshot, driven through the pipeline by a state machine.

``machine`` is the PURE transition table and backoff rule, ``store`` keeps jobs and their
journal in SQLite, ``runner`` is the worker loop that moves them.
"""
