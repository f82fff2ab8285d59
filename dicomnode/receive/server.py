"""The listener's TCP server: every connection guarded, TLS handshakes off the accept thread
(EDGE).

pynetdicom's :class:`~pynetdicom.transport.ThreadedAssociationServer`, changed where a hostile
or broken peer could otherwise stall others:

- the thread that accepts connections only accepts; each connection's own thread does the TLS
  handshake (pynetdicom wraps each socket on the accepting thread, so one peer that connects
  and sends nothing would stall every other) within ``node.association_request_seconds``;
- each socket is wrapped in a :class:`~dicomnode.receive.guard.GuardedConnection` before
  pynetdicom sees it, and counted in the server's
  :class:`~dicomnode.receive.guard.ConnectionBudget`;
- :meth:`GuardedServer.shutdown` closes every connection, so stopping never waits for a peer;
  connection threads are daemons.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, cast

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from dicomnode.receive.guard import (
    ConnectionBudget,
    GuardedAssociationSocket,
    GuardedConnection,
    IncomingOpener,
    Limits,
)
from dicomnode.receive.tls import address_text, tls_failure

log = logging.getLogger("dicomnode.receive")


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's handler, with the association told about its guarded connection."""

    request: GuardedConnection

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The same object, seen as a socket whose readiness includes the guard's buffer.
        assoc.dul.socket.__class__ = GuardedAssociationSocket
        self.request.attach(assoc)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """See the module docstring. ``guard`` is ``(limits, open_incoming)``."""

    daemon_threads = True
    block_on_close = False

    #: The C-STORE handler (:class:`~dicomnode.receive.scp.Receiver`) and the thread that
    #: serves connections, set by ``start_listener``.
    receiver: Any = None
    serve_thread: Any = None

    def __init__(self, *args: Any, guard: tuple[Limits, IncomingOpener], **kwargs: Any) -> None:
        self.limits, self.open_incoming = guard
        self.budget = ConnectionBudget(self.limits)
        super().__init__(*args, request_handler=GuardedRequestHandler, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Counted from the start, so that stalled handshakes are evicted like stalled requests.
        conn = GuardedConnection(
            request, client_address, budget=self.budget, limits=self.limits,
            open_incoming=self.open_incoming,
        )
        if self.ssl_context:
            tls_socket = self._handshake(request, client_address)
            if tls_socket is None:
                conn.close()
                return
            conn.raw = tls_socket
            conn.connected_at = conn.clock()
        super().process_request_thread(conn, client_address)

    def _handshake(self, request: socket.socket, client_address: Any) -> ssl.SSLSocket | None:
        context = cast(ssl.SSLContext, self.ssl_context)
        try:
            request.settimeout(self.limits.association_request_seconds)
            return context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset, closed
            log.warning("TLS handshake with %s failed, connection closed: %s",
                        address_text(client_address), tls_failure(exc))
            return None

    def shutdown(self) -> None:
        """Stop accepting, then close every connection (peers see the connection close)."""
        super().shutdown()
        self.budget.close_all()
