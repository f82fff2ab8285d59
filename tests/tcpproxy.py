"""A loopback HTTP/1.1 proxy for tests that can hold one exchange half-way.

:class:`HoldingProxy` listens on ``127.0.0.1`` (port chosen by the OS) and forwards each
connection to one upstream port, one request/response exchange at a time (plain sockets and
threads). Given an ``ssl.SSLContext`` it serves HTTPS and forwards plain HTTP, as a
TLS-terminating front end (nginx and the like) does for a PACS. Armed with :meth:`~HoldingProxy.hold`, it stops the next exchange at a chosen
point and keeps it there until :meth:`~HoldingProxy.release`:

- ``"request"``: the whole request has arrived from the client and is *not* forwarded (the
  server never sees it); :attr:`~HoldingProxy.request_held` is set;
- ``"response"``: the request was forwarded and the server's whole response has arrived, and it
  is *not* passed on (the client never learns the outcome); :attr:`~HoldingProxy.response_held`
  is set.

A held exchange is dropped on release (both sockets closed, nothing more forwarded): it is
meant for a client that was killed meanwhile. Later connections pass through. Messages are
framed by ``Content-Length`` or chunked transfer encoding (a response with neither ends when
the server closes), which is all a STOW-RS client and server use.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import BinaryIO

HOLD_POINTS = ("request", "response")


class HoldingProxy:
    """Forward ``127.0.0.1:port`` to ``host:upstream_port``; see the module docstring."""

    def __init__(self, upstream_port: int, host: str = "127.0.0.1", timeout: float = 300.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.upstream = (host, upstream_port)
        self.tls = tls
        self.timeout = timeout
        self.request_held = threading.Event()
        self.response_held = threading.Event()
        #: Every complete request seen, in order (held ones included), as raw bytes.
        self.requests: list[bytes] = []
        #: How many requests reached the upstream server.
        self.forwarded = 0
        #: Every complete response from the upstream server, in order (a held one included).
        self.responses: list[bytes] = []
        self._hold: str | None = None
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def hold(self, point: str) -> "HoldingProxy":
        """Hold the next exchange at ``point`` (``"request"`` or ``"response"``)."""
        if point not in HOLD_POINTS:
            raise ValueError(f"hold point must be one of {HOLD_POINTS}, not {point!r}")
        with self._lock:
            self._hold = point
            self._released.clear()
        return self

    def release(self) -> None:
        """Drop the held exchange (if any) and pass everything through from now on."""
        with self._lock:
            self._hold = None
        self._released.set()

    def close(self) -> None:
        self._closed = True
        self.release()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for s in (self._listener, *sockets):
            _close(s)

    def __enter__(self) -> "HoldingProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._track(client)
            thread = threading.Thread(target=self._serve, args=(client,), name="proxy-conn")
            thread.daemon = True
            thread.start()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _claim(self, point: str) -> bool:
        """Whether this exchange is the one to hold at ``point`` (only one exchange is)."""
        with self._lock:
            if self._hold != point:
                return False
            self._hold = "claimed"
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        from_client: BinaryIO | None = None
        from_upstream: BinaryIO | None = None
        try:
            if self.tls is not None:
                client.settimeout(self.timeout)
                client = self.tls.wrap_socket(client, server_side=True)  # handshake here
                self._track(client)
            from_client = client.makefile("rb")
            while True:
                request = read_message(from_client, is_response=False)
                if request is None:
                    return  # the client closed the connection (or was killed)
                with self._lock:
                    self.requests.append(request)
                if self._claim("request"):
                    self.request_held.set()
                    self._released.wait(self.timeout)
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=self.timeout)
                    self._track(upstream)
                    from_upstream = upstream.makefile("rb")
                upstream.sendall(request)
                with self._lock:
                    self.forwarded += 1
                assert from_upstream is not None
                response = read_message(from_upstream, is_response=True)
                if response is None:
                    return
                with self._lock:
                    self.responses.append(response)
                if self._claim("response"):
                    self.response_held.set()
                    self._released.wait(self.timeout)
                    return
                client.sendall(response)
        except OSError:  # ssl.SSLError included: a client that does not trust the certificate
            return
        finally:
            for stream in (from_client, from_upstream):
                if stream is not None:
                    stream.close()
            for s in (client, upstream):
                if s is not None:
                    _close(s)


def read_message(stream: BinaryIO, *, is_response: bool) -> bytes | None:
    """One whole HTTP/1.1 message from ``stream``, raw; ``None`` on a clean end of stream."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = stream.readline()
        if not line:
            if head:
                raise ConnectionError("connection closed in the middle of a message header")
            return None
        if head == b"" and line == b"\r\n":
            continue  # a stray empty line between messages
        head += line
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if is_response:
        status = int(lines[0].split()[1])
        if status < 200 or status in (204, 304):
            return head
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return head + _read_chunked(stream)
    if "content-length" in headers:
        length = int(headers["content-length"])
        body = stream.read(length)
        if len(body) != length:
            raise ConnectionError("connection closed in the middle of a message body")
        return head + body
    return head + (stream.read() if is_response else b"")


def body(message: bytes) -> bytes:
    """The body of a whole message from :func:`read_message`, without chunked framing."""
    head, _, rest = message.partition(b"\r\n\r\n")
    if b"chunked" not in head.lower():
        return rest
    data = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            return data
        data, rest = data + rest[:size], rest[size + 2 :]


def _read_chunked(stream: BinaryIO) -> bytes:
    data = b""
    while True:
        size_line = stream.readline()
        if not size_line:
            raise ConnectionError("connection closed in the middle of a chunked body")
        data += size_line
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        chunk = stream.read(size + 2)
        if len(chunk) != size + 2:
            raise ConnectionError("connection closed in the middle of a chunk")
        data += chunk
    while True:  # trailer fields, then the final empty line
        line = stream.readline()
        if not line:
            raise ConnectionError("connection closed in the middle of a chunked trailer")
        data += line
        if line == b"\r\n":
            return data


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
