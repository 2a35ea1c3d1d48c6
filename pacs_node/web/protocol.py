"""uvicorn's HTTP/1.1 protocol (h11) with the front door a PACS-facing port needs.

uvicorn (on h11) bounds a request's head (h11's incomplete-event limit) and
idle keep-alive, but has no deadline for receiving a request: a client
trickling one byte of its headers at a time holds a connection for ever
(Slowloris); nor for a client that never reads its answers. So, per
connection, before a byte is parsed:

- the :class:`~pacs_node.peers.PeerGate` admits it (allowed networks, at most
  so many connections, so many from one address); a refused one is answered
  503 and closed;
- each request's line and headers must arrive within ``header_seconds`` of
  its first byte (the connection is closed otherwise);
- an answer the client does not read within ``idle_seconds`` (the socket's
  send buffer full) closes the connection;
- a body parsed into many tiny pieces (h11 Data events: chunks of a chunked
  body, socket reads otherwise) is refused (400) once it has ``MANY_PIECES``
  of under ``MIN_PIECE`` bytes on average: each costs the server's one thread
  far more than its bytes (1-byte chunks held a CPU until the minimum body
  rate stopped them, and the console answered in seconds meanwhile);
- a request with both a Content-Length and a Transfer-Encoding is refused
  (400, the connection closed: RFC 9112 6.3 lets a server refuse it, and a
  proxy in front might frame the body the other way);
- a connection closed with a body left unread (a 413, a refusal) is closed
  lingering (RFC 9112 9.6): the node stops sending, reads and drops what the
  client still sends for a moment, then closes, so that the client reads the
  answer instead of a reset. At most ``MAX_LINGERING`` linger at once.

Body reads have their own deadlines in the application (each piece within
``IDLE_SECONDS``, at a minimum rate: see :func:`pacs_node.stow.spool_body`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pacs_node.peers import PeerGate

log = logging.getLogger("pacs_node.web")

#: A refused client's unread body is read and dropped for at most this long, this much.
LINGER_SECONDS, LINGER_BYTES = 2.0, 16 << 20
#: Connections lingering at once (beyond: closed at once).
MAX_LINGERING = 16
#: A request body's pieces must average MIN_PIECE bytes once there are MANY_PIECES (a
#: client's chunks are kilobytes; a socket read of a fast body is tens of them).
MIN_PIECE, MANY_PIECES = 256, 4096
#: A refused peer is logged at most once in this many seconds (a connect flood is one line).
LOG_EVERY_SECONDS = 10.0
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 5\r\nConnection: close\r\nContent-Length: 50\r\n\r\n"
           b'{"error": "too many connections, or not allowed"}\n')


class _Transport:
    """The connection's transport as uvicorn sees it: closing it lingers (see module)."""

    def __init__(self, transport: asyncio.Transport, protocol: "GuardedProtocol") -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.linger()

    def is_closing(self) -> bool:
        return self._protocol._dropping >= 0 or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_closing():        # nothing more once the answer is out
            self._transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class GuardedProtocol:
    """uvicorn's HTTP protocol behind the gate, with deadlines for each request's head and
    for answers the client does not read (mixed in before :class:`H11Protocol`)."""

    gate: PeerGate
    header_seconds: float = 30.0
    idle_seconds: float = 30.0
    lingering = 0                            # connections lingering now (all of them)
    _logged: dict[str, float] = {}           # peer -> when its refusal was last logged

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        self._deadline: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._stuck: asyncio.TimerHandle | None = None   # the client does not read
        self._dropping = -1                  # >= 0: lingering, bytes dropped so far
        sock = transport.get_extra_info("socket")
        if sock is not None:            # an answer's head and body go out at once, not 40 ms
            try:                        # apart (Nagle against the client's delayed ACK)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if peer else ""
        why = self.gate.enter(self._peer)
        self._admitted = why is None
        super().connection_made(_Transport(transport, self))   # type: ignore[arg-type]
        self._pieces = self._piece_bytes = 0
        self._refusal = ""
        self.conn.next_event = self._counting(self.conn.next_event)
        if why is not None:
            self._warn_once(f"HTTP connection from {self._peer} refused: {why}")
            transport.write(REFUSAL)
            self.linger()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.gate.leave(self._peer)
        for timer in (self._deadline, self._linger_timer, self._stuck):
            if timer is not None:
                timer.cancel()
        if self._dropping >= 0:
            self._dropping = -1
            GuardedProtocol.lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._dropping >= 0:              # lingering: read and drop
            self._dropping += len(data)
            if self._dropping > LINGER_BYTES:
                self._raw.close()
            return
        if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()                      # the first byte of the next request
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before and self._deadline is not None:
            self._deadline.cancel()          # its head arrived in time
            self._deadline = None

    def _counting(self, next_event):
        """h11's ``next_event``, counting the pieces of each request's body; a body of
        too many tiny pieces ends in RemoteProtocolError, which uvicorn answers with
        :meth:`send_400_response`."""
        def counted():
            event = next_event()
            if type(event) is h11.Data:
                self._pieces += 1
                self._piece_bytes += len(event.data)
                if (self._pieces >= MANY_PIECES
                        and self._piece_bytes < MIN_PIECE * self._pieces):
                    self._refusal = (f"body sent in pieces of under {MIN_PIECE} bytes on "
                                     f"average")
                    raise h11.RemoteProtocolError(self._refusal)
            elif type(event) is h11.Request:
                self._pieces = self._piece_bytes = 0
                names = {name.lower() for name, _ in event.headers}
                if {b"content-length", b"transfer-encoding"} <= names:   # RFC 9112 6.3
                    self._refusal = "both Content-Length and Transfer-Encoding"
                    raise h11.RemoteProtocolError(self._refusal)
            return event
        return counted

    def _warn_once(self, message: str) -> None:
        """A WARNING, at most once per peer every ``LOG_EVERY_SECONDS``."""
        now, logged = time.monotonic(), GuardedProtocol._logged
        if now - logged.get(self._peer, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            return
        if len(logged) > 4096:
            logged.clear()
        logged[self._peer] = now
        log.warning("%s", message)

    def send_400_response(self, msg: str) -> None:
        """What h11 cannot parse: answered in JSON like every other error (uvicorn answers
        in text), logged once with the peer, the connection closed."""
        msg, self._refusal = self._refusal or msg, ""
        self._warn_once(f"HTTP request from {self._peer} refused: {msg}")
        body = json.dumps({"error": f"bad HTTP request: {msg}"}).encode()
        self._raw.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
        self.linger()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_seconds, self._late)

    def _late(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:
            log.warning("HTTP connection from %s closed: no complete request in %.0f s",
                        self._peer, self.header_seconds)
            self._raw.close()

    def linger(self) -> None:
        """Close lingering (see the module); at once when too many linger already."""
        if self._dropping >= 0 or self._raw.is_closing():
            return
        if GuardedProtocol.lingering >= MAX_LINGERING or not self._raw.can_write_eof():
            self._raw.close()
            return
        GuardedProtocol.lingering += 1
        self._dropping = 0
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            self._raw.write_eof()
        except OSError:                      # the client reset already
            GuardedProtocol.lingering -= 1
            self._dropping = -1
            self._raw.close()
            return
        self._raw.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self._raw.close)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stuck is None:
            self._stuck = self.loop.call_later(self.idle_seconds, self._not_reading)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stuck is not None:
            self._stuck.cancel()
            self._stuck = None

    def _not_reading(self) -> None:
        self._stuck = None
        log.warning("HTTP connection from %s closed: its answer not read in %.0f s",
                    self._peer, self.idle_seconds)
        self._raw.abort()

    def eof_received(self) -> bool | None:
        if self._dropping >= 0:              # the client closed too: done
            self._raw.close()
            return None
        return super().eof_received()


def guarded(gate: PeerGate, header_seconds: float, idle_seconds: float) -> type:
    """A protocol class for one server: its gate and its deadlines. On h11: it bounds a
    request's head (``h11_max_incomplete_event_size``) and parses one pipelined request at
    a time; uvicorn's httptools protocol does neither (a sender grew a test server to 1 GB
    with headers, and to 4 GB with pipelined requests it never read the answers of)."""
    return type("Guarded", (GuardedProtocol, H11Protocol),
                {"gate": gate, "header_seconds": header_seconds, "idle_seconds": idle_seconds})
