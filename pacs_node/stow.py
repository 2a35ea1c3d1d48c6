"""The STOW-RS receiver (DICOMweb Studies Store, PS3.18 10.5): instances over HTTP.

``POST /dicom-web/studies`` (or ``/dicom-web/studies/{StudyInstanceUID}``,
which refuses instances of other studies) with a ``multipart/related;
type="application/dicom"`` body, one DICOM Part-10 file per part. Each part
goes through the same :class:`~pacs_node.storage.InstanceStorage` as a
C-STORE: written atomically, recorded, and only then listed as stored.

The body is spooled to a file beside the received instances (never held in
memory whole) and split at the boundary through a memory map. The response
is a Store Instances Response (``application/dicom+json``): the Referenced
SOP Sequence for what was stored, the Failed SOP Sequence with a Failure
Reason for the rest; HTTP 200 when all parts were stored, 202 when some
were, 409 when none, 400 for a body that is not multipart, 415 for a
request that is not ``multipart/related; type="application/dicom"``, 411
without a Content-Length or chunked transfer coding, 413 above the configured size, 507 when the disk
cannot hold the body. A part of another media type fails with 0xC000.

No authentication: bind it to a trusted network, or put a reverse proxy
with TLS and authentication in front (as for any DICOMweb origin server).
"""

from __future__ import annotations

import json
import logging
import mmap
import re
import socket
import sys
import tempfile
import threading
import time
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pydicom import Dataset
from pydicom.sequence import Sequence

from pacs_node.layout import UIDRefused, uid_name
from pacs_node.peers import PeerGate
from pacs_node.storage import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STORE_UNAVAILABLE,
                               InstanceStorage, Outcome)

log = logging.getLogger(__name__)

BASE_PATH = "/dicom-web"
ORIGIN = "STOW-RS"
_PATH = re.compile(rf"^{BASE_PATH}/studies(?:/([^/]+))?/?$")
_CHUNK = 1 << 20
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
#: The request line and headers must arrive within this many seconds.
HEADER_SECONDS = 30.0
#: No read or write of a connection may wait longer than this.
IDLE_SECONDS = 30.0
#: Connections waiting to be accepted.
BACKLOG = 128
#: A refused client's unread body is read and dropped for at most this long, this much.
LINGER_SECONDS, LINGER_BYTES = 2.0, 16 << 20
#: Refused connections lingering at once (beyond: closed at once).
MAX_LINGERING = 16


class StowError(Exception):
    """A request that cannot be processed at all: an HTTP status and why."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type (lower case) and parameters (quotes removed)."""
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): v for k, v in msg.get_params()[1:]} if msg.get_params() else {}
    return msg.get_content_type(), params


def split_parts(body: mmap.mmap | bytes, boundary: bytes):
    """Yield (headers, start, end) for each part of a multipart body.

    ``headers`` maps lower-case header names to values; the part's content is
    ``body[start:end]``.
    """
    delimiter = b"--" + boundary
    pos = body.find(delimiter)
    if pos < 0:
        raise StowError(HTTPStatus.BAD_REQUEST, "the body holds no part (boundary not found)")
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":
            return  # the close delimiter
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            raise StowError(HTTPStatus.BAD_REQUEST, "a part has no end of headers")
        headers = {}
        for line in bytes(body[pos:head_end]).decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        start = head_end + 4
        nxt = body.find(b"\r\n" + delimiter, start)
        if nxt < 0:
            raise StowError(HTTPStatus.BAD_REQUEST, "the last part is not closed by the "
                                                    "boundary")
        yield headers, start, nxt
        pos = nxt + 2


def response_dataset(outcomes: list[Outcome]) -> Dataset:
    """The Store Instances Response Module (PS3.18 Annex I) for these outcomes."""
    ds = Dataset()
    stored, failed = Sequence(), Sequence()
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class_uid
        item.ReferencedSOPInstanceUID = o.sop_instance_uid
        if o.ok:
            stored.append(item)
        else:
            item.FailureReason = o.status
            failed.append(item)
    ds.ReferencedSOPSequence = stored
    ds.FailedSOPSequence = failed
    return ds


class _Server(ThreadingHTTPServer):
    """A threading HTTP server whose connections pass the gate and meet deadlines."""

    request_queue_size = BACKLOG
    daemon_threads = True
    gate: PeerGate
    watchdog: "_Watchdog"
    lingering = 0                        # refused connections lingering now
    lingering_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        why = self.gate.enter(client_address[0])
        if why is not None:
            log.warning("STOW-RS connection from %s refused: %s", client_address[0], why)
            _refuse(request)
            with self.lingering_lock:
                linger = self.lingering < MAX_LINGERING
                self.lingering += linger
            if not linger:
                self.shutdown_request(request)
                return
            threading.Thread(target=self._linger_then_close, args=(request,), daemon=True,
                             name="lungsys-stow-linger").start()
            return
        request.settimeout(IDLE_SECONDS)
        super().process_request(request, client_address)

    def _linger_then_close(self, request) -> None:
        try:
            _linger(request)
        finally:
            self.shutdown_request(request)
            with self.lingering_lock:
                self.lingering -= 1

    def handle_error(self, request, client_address) -> None:
        """One line, no traceback: a client that went away mid-answer, say."""
        log.warning("STOW-RS connection from %s ended: %s", client_address[0],
                    sys.exc_info()[1])

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.watchdog.forget(request)
            self.gate.leave(client_address[0])


def _refuse(conn: socket.socket) -> None:
    body = b'{"error": "too many connections, or not allowed"}'
    try:
        conn.settimeout(1.0)
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Retry-After: 5\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
    except OSError:
        pass


def _linger(conn: socket.socket) -> None:
    """A lingering close (RFC 9112 9.6): stop sending, then read and drop what the
    client still sends for a moment, so that closing with unread data does not
    reset the connection before the client has read the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.5)
        deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
        while time.monotonic() < deadline and dropped < LINGER_BYTES:
            chunk = conn.recv(1 << 16)
            if not chunk:
                return
            dropped += len(chunk)
    except OSError:
        pass


class _Watchdog:
    """Shuts down connections that did not send their headers in time."""

    def __init__(self) -> None:
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="lungsys-stow-watchdog", daemon=True).start()

    def watch(self, conn: socket.socket, seconds: float) -> None:
        with self._lock:
            self._deadlines[conn] = time.monotonic() + seconds

    def forget(self, conn: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(conn, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                late = [c for c, t in self._deadlines.items() if t < now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                log.warning("STOW-RS connection closed: no complete request in %.0f s",
                            HEADER_SECONDS)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class StowServer:
    """A threading HTTP server that stores what is POSTed to /dicom-web/studies."""

    def __init__(self, storage: InstanceStorage, max_request_mb: int = 2048,
                 gate: PeerGate | None = None) -> None:
        self.storage = storage
        self.max_bytes = max_request_mb * 1024 * 1024
        self.gate = gate or PeerGate(max_total=32, max_per_peer=8)
        self.httpd: _Server | None = None
        self._watchdog: _Watchdog | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"stow": self})
        self._watchdog = _Watchdog()
        server = type("Server", (_Server,), {"gate": self.gate, "watchdog": self._watchdog})
        self.httpd = server((host, port), handler)
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lungsys-stow",
                                        daemon=True)
        self._thread.start()
        log.info("STOW-RS listening on http://%s:%d%s/studies", host, self.port, BASE_PATH)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1] if self.httpd else 0

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self._watchdog is not None:
            self._watchdog.stop()

    def store_request(self, content_type: str, length: int | None, stream,
                      expected_study: str | None) -> tuple[HTTPStatus, Dataset]:
        """Spool, split and store one request's body; the status and the response.

        ``length`` is the Content-Length, or None for a chunked body.
        """
        media, params = _content_type(content_type)
        if media != "multipart/related":
            raise StowError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"expected multipart/related, got {media}")
        if params.get("type", "application/dicom").lower() != "application/dicom":
            raise StowError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            "only application/dicom parts are accepted")
        boundary = params.get("boundary")
        if not boundary:
            raise StowError(HTTPStatus.BAD_REQUEST, "multipart/related without a boundary")
        if length is not None and length > self.max_bytes:
            raise StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"body of {length} bytes above the limit of {self.max_bytes}")
        reservation = _Reservation(self.storage)
        try:
            if length is not None:
                reservation.add(2 * length)       # the spool, then the stored parts
            with tempfile.TemporaryFile(dir=self.storage.partial, prefix="stow-") as spool:
                size = self._spool(stream, length, spool, reservation)
                spool.flush()
                if size == 0:
                    raise StowError(HTTPStatus.BAD_REQUEST, "empty body")
                with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
                    outcomes = self._store_parts(body, boundary.encode("latin-1"),
                                                 expected_study)
        finally:
            reservation.release()
        stored = sum(o.ok for o in outcomes)
        if not stored and outcomes and all(o.reason == STORE_UNAVAILABLE for o in outcomes):
            raise StowError(HTTPStatus.SERVICE_UNAVAILABLE, "the job store cannot record now")
        status = (HTTPStatus.OK if stored == len(outcomes)
                  else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT)
        return status, response_dataset(outcomes)

    def _store_parts(self, body: mmap.mmap, boundary: bytes, expected_study: str | None
                     ) -> list[Outcome]:
        """Store each part; a broken part ends the body, keeping the parts before it."""
        outcomes: list[Outcome] = []
        try:
            for headers, start, end in split_parts(body, boundary):
                part_type = _content_type(headers.get("content-type", "application/dicom"))[0]
                if part_type != "application/dicom":
                    outcomes.append(Outcome(CANNOT_UNDERSTAND,
                                            reason=f"{part_type}, not application/dicom"))
                    continue
                outcomes.append(self._store_part(body, start, end, expected_study))
        except StowError as exc:
            if not outcomes:
                raise
            outcomes.append(Outcome(CANNOT_UNDERSTAND, reason=str(exc)))
        if not outcomes:
            raise StowError(HTTPStatus.BAD_REQUEST, "the body holds no part")
        return outcomes

    def _store_part(self, body: mmap.mmap, start: int, end: int,
                    expected_study: str | None) -> Outcome:
        tmp = self.storage.temp_file()
        try:
            with open(tmp, "wb") as f:
                for pos in range(start, end, _CHUNK):
                    f.write(body[pos:min(pos + _CHUNK, end)])
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("a STOW-RS part was not stored: %s", exc)
            return Outcome(OUT_OF_RESOURCES, reason=f"not stored: {exc.strerror or exc}")
        return self.storage.store_file(tmp, ORIGIN, expected_study=expected_study)

    def _spool(self, stream, length: int | None, spool, reservation: "_Reservation") -> int:
        """Copy the body (Content-Length or chunked) into ``spool``; its size."""
        def copy(n: int) -> None:
            while n > 0:
                chunk = stream.read(min(_CHUNK, n))
                if not chunk:
                    raise StowError(HTTPStatus.BAD_REQUEST, "the body ended early")
                spool.write(chunk)
                n -= len(chunk)

        if length is not None:
            copy(length)
            return length
        size = 0
        while True:  # Transfer-Encoding: chunked (RFC 9112 7.1), as Orthanc sends
            line = stream.readline(1024).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(line):    # int() would take "-1f" or "0x10"
                raise StowError(HTTPStatus.BAD_REQUEST, "bad chunk size")
            n = int(line, 16)
            if n == 0:
                while stream.readline(1024).strip():
                    pass  # trailer fields
                return size
            size += n
            if size > self.max_bytes:
                raise StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"body above the limit of {self.max_bytes} bytes")
            reservation.add(2 * n)
            copy(n)
            stream.readline(16)  # the CRLF after the chunk


class _Reservation:
    """Disk reserved for one request in flight (see InstanceStorage.reserve)."""

    def __init__(self, storage: InstanceStorage) -> None:
        self.storage = storage
        self.size = 0

    def add(self, size: int) -> None:
        if not self.storage.reserve(size):
            raise StowError(HTTPStatus.INSUFFICIENT_STORAGE, "not enough free disk")
        self.size += size

    def release(self) -> None:
        self.storage.release(self.size)
        self.size = 0


class _Handler(BaseHTTPRequestHandler):
    stow: StowServer
    protocol_version = "HTTP/1.1"
    server_version = "lungsys-stow"

    def handle_one_request(self) -> None:
        self.server.watchdog.watch(self.connection, HEADER_SECONDS)   # each request's head
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.watchdog.forget(self.connection)                  # it arrived in time
        return ok

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        match = _PATH.match(self.path.split("?", 1)[0])
        if match is None:
            return self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such resource: "
                                                      f"POST {BASE_PATH}/studies"})
        study = match.group(1)
        if study is not None:
            try:
                uid_name(study, "the Study Instance UID in the URL")
            except UIDRefused as exc:
                self.close_connection = True
                return self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if "content-length" not in self.headers and not chunked:
            self.close_connection = True
            return self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length or "
                                                            "chunked transfer needed"})
        try:
            length = None if chunked else int(self.headers["content-length"])
            if length is not None and length < 0:
                raise ValueError("negative Content-Length")
            status, response = self.stow.store_request(
                self.headers.get("content-type", ""), length, self.rfile, study)
        except ValueError:
            self.close_connection = True
            return self._reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
        except StowError as exc:
            log.warning("STOW-RS from %s refused (%d): %s", self.client_address[0],
                        exc.status, exc)
            self.close_connection = True
            return self._reply(exc.status, {"error": str(exc)})
        except (OSError, TimeoutError) as exc:     # the client went quiet or away
            log.warning("STOW-RS from %s ended: %s", self.client_address[0], exc)
            self.close_connection = True
            return
        failed = len(response.FailedSOPSequence)
        log.info("STOW-RS from %s: %d stored, %d failed", self.client_address[0],
                 len(response.ReferencedSOPSequence), failed)
        self._reply(status, response.to_json_dict(), "application/dicom+json")

    def do_GET(self) -> None:  # noqa: N802
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "this node only stores "
                                                    f"(POST {BASE_PATH}/studies)"})

    def _reply(self, status: HTTPStatus, body: dict, media: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        if self.close_connection:        # the body may be unread: let the client read this
            self.wfile.flush()
            _linger(self.connection)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.client_address[0], format % args)
