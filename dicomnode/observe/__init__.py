"""Seeing what the node does: events, Prometheus metrics, the audit trail, health and the
status page.

- :mod:`.events`: what the listener and the runner report (:class:`~.events.Observer`);
- :mod:`.metrics`: Prometheus metrics of those events and of the node's state (``/metrics``);
- :mod:`.audit`: the append-only audit trail in the index database (``dicomnode audit``);
- :mod:`.health`: the checks behind ``/healthz``;
- :mod:`.page`: the status page's HTML (PURE);
- :mod:`.http`: the HTTP(S) server ``dicomnode serve`` runs beside the listener (EDGE).
"""
