"""The STOW-RS receiver (DICOMweb Studies Store, PS3.18 10.5): instances over HTTP.

``POST /dicom-web/studies`` (or ``/dicom-web/studies/{StudyInstanceUID}``,
which refuses instances of other studies) with a ``multipart/related;
type="application/dicom"`` body, one DICOM Part-10 file per part. Each part
goes through the same :class:`~pacs_node.storage.InstanceStorage` as a
C-STORE: written atomically, recorded, and only then listed as stored.

The route runs on the node's HTTP service (:mod:`pacs_node.web`: uvicorn,
behind the peer gate and the header deadline); the body is spooled as it
arrives (each piece within ``IDLE_SECONDS``, at least ``MIN_RATE`` bytes a
second on average) to a file beside the received instances (never held in
memory whole), then split at the boundary through a memory map and stored in
a worker thread. Disk is reserved for it (twice: the spool, then its parts) as
its bytes arrive, after a check that its Content-Length would fit. The
response is a Store Instances Response (``application/dicom+json``): the
Referenced SOP Sequence for what was stored, the Failed SOP Sequence with a
Failure Reason for the rest; HTTP 200 when all parts were stored, 202 when
some were, 409 when none, 400 for a body that is not multipart, 415 for a
request that is not ``multipart/related; type="application/dicom"``, 411
without a Content-Length or chunked transfer coding, 413 above the configured
size, 507 when the disk cannot hold the body, 503 when the job store cannot
record. A part of another media type fails with 0xC000. The parts after
``MAX_FAILED_PARTS`` failed ones are not stored.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import tempfile
import time
from http import HTTPStatus

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pydicom import Dataset
from pydicom.sequence import Sequence

from pacs_node.layout import UIDRefused, uid_name
from pacs_node.multipart import (CHUNK, StowError, boundary_of, media_type, split_parts,
                                 write_part)
from pacs_node.peers import PeerGate
from pacs_node.web.server import HttpServer
from pacs_node.storage import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STORE_UNAVAILABLE,
                               InstanceStorage, Outcome)

log = logging.getLogger(__name__)

BASE_PATH = "/dicom-web"
ORIGIN = "STOW-RS"
#: The request line and headers must arrive within this many seconds.
HEADER_SECONDS = 30.0
#: No read of a body may wait longer than this.
IDLE_SECONDS = 30.0
#: A body must come at this many bytes a second on average, after its first
#: ``IDLE_SECONDS`` (a client trickling a byte at a time holds a connection and its disk
#: reservation no longer): 256 KiB/s, a 10 Mbit/s link a quarter full.
MIN_RATE = 256 * 1024
#: A request is cut after this many failed parts: the parts after them are not stored, and
#: one more failure (0xC000) says so. Each failure costs a log line, an incident and an item
#: of the response, and a part can be 80 bytes: 2 GiB of them would be 27 million.
MAX_FAILED_PARTS = 100
#: The reason of that last failure (in the log; the response has the item).
CUT_SHORT = f"cut after {MAX_FAILED_PARTS} failed parts: the parts after them were not stored"


class ClientGone(ConnectionError):
    """The client went away, or said nothing for too long, before its body ended."""


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


class StowService:
    """What a STOW-RS request does: check it, spool its body, store each part."""

    def __init__(self, storage: InstanceStorage, max_request_mb: int = 2048) -> None:
        self.storage = storage
        self.max_bytes = max_request_mb * 1024 * 1024

    def boundary(self, content_type: str, length: int | None) -> bytes:
        """Check a request before its body is read: its multipart boundary, or StowError.
        ``length``: the Content-Length, or None for a chunked body."""
        media, params = media_type(content_type)
        if media != "multipart/related":
            raise StowError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"expected multipart/related, got {media}")
        if params.get("type", "application/dicom").lower() != "application/dicom":
            raise StowError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            "only application/dicom parts are accepted")
        boundary = boundary_of(params)
        if length is not None and length > self.max_bytes:
            raise StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"body of {length} bytes above the limit of {self.max_bytes}")
        return boundary

    def store_spooled(self, spool, size: int, boundary: bytes,
                      expected_study: str | None) -> tuple[HTTPStatus, Dataset]:
        """Split a spooled body and store each part; the status and the response."""
        if size == 0:
            raise StowError(HTTPStatus.BAD_REQUEST, "empty body")
        spool.flush()
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
            outcomes = self._store_parts(body, boundary, expected_study)
        stored = sum(o.ok for o in outcomes)
        if not stored and all(o.reason in (STORE_UNAVAILABLE, CUT_SHORT) for o in outcomes):
            raise StowError(HTTPStatus.SERVICE_UNAVAILABLE, "the job store cannot record now")
        status = (HTTPStatus.OK if stored == len(outcomes)
                  else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT)
        return status, response_dataset(outcomes)

    def _store_parts(self, body: mmap.mmap, boundary: bytes, expected_study: str | None
                     ) -> list[Outcome]:
        """Store each part; a broken part ends the body, keeping the parts before it, and
        so does the part after :data:`MAX_FAILED_PARTS` failures."""
        outcomes: list[Outcome] = []
        failed = 0
        try:
            for headers, start, end in split_parts(body, boundary):
                if failed == MAX_FAILED_PARTS:          # and here is one part more
                    log.warning("a STOW-RS request was %s", CUT_SHORT)
                    outcomes.append(Outcome(CANNOT_UNDERSTAND, reason=CUT_SHORT))
                    break
                try:
                    part_type = media_type(headers.get("content-type", "application/dicom"))[0]
                    why = f"{part_type}, not application/dicom"
                except StowError as exc:                # this part's failure alone
                    part_type, why = "", str(exc)
                outcome = (self._store_part(body, start, end, expected_study)
                           if part_type == "application/dicom"
                           else Outcome(CANNOT_UNDERSTAND, reason=why))
                outcomes.append(outcome)
                failed += not outcome.ok
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
            write_part(body, start, end, tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("a STOW-RS part was not stored: %s", exc)
            return Outcome(OUT_OF_RESOURCES, reason=f"not stored: {exc.strerror or exc}")
        return self.storage.store_file(tmp, ORIGIN, expected_study=expected_study)


class Reservation:
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


def close_with(status: HTTPStatus, message: str) -> JSONResponse:
    """A refusal of a request with a body; the connection closes (lingering, see
    :mod:`pacs_node.web.protocol`), since the body may be unread."""
    return JSONResponse({"error": message}, status_code=status,
                        headers={"Connection": "close"})


async def spool_body(request: Request, spool, service: StowService,
                     reservation: Reservation) -> int:
    """Copy the body into ``spool`` as it arrives; its size. Every piece must come within
    ``IDLE_SECONDS``, and the whole at ``MIN_RATE`` on average after the first
    ``IDLE_SECONDS``; disk is reserved as the body arrives (a Content-Length is only
    the client's word: 23 requests announcing gigabytes and sending nothing had the
    modalities' C-STOREs answered Out of Resources), and it stops at the limit.
    Written on the event loop: a piece is at most what uvicorn buffers (64 KiB and one
    socket read) and lands in the page cache; storing the parts runs in a thread."""
    receive, size, pending, held = request.receive, 0, [], 0
    started = time.monotonic()
    while True:
        try:
            message = await asyncio.wait_for(receive(), IDLE_SECONDS)
        except asyncio.TimeoutError:
            raise ClientGone(f"no data for {IDLE_SECONDS:.0f} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone("the client went away")
        body = message.get("body", b"")
        if body:
            size += len(body)
            if size > service.max_bytes:
                raise StowError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"body above the limit of {service.max_bytes} bytes")
            pending.append(body)
            held += len(body)
        more = message.get("more_body", False)
        late = time.monotonic() - started - IDLE_SECONDS
        if more and late > 0 and size < MIN_RATE * late:
            raise ClientGone(f"body slower than {MIN_RATE // 1024} KiB/s")
        if held >= CHUNK or (not more and pending):    # one write a megabyte
            reservation.add(2 * held)                   # the spool, then the parts
            spool.write(b"".join(pending))
            pending, held = [], 0
        if not more:
            return size


async def receive_multipart(request: Request, spool, service: StowService,
                            reservation: Reservation) -> tuple[int, bytes]:
    """Check a ``multipart/related; type="application/dicom"`` request and spool its body
    (disk reserved for it and its parts): its size and boundary. StowError, ClientGone."""
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if "content-length" not in request.headers and not chunked:
        raise StowError(HTTPStatus.LENGTH_REQUIRED, "Content-Length or chunked transfer needed")
    try:
        length = None if chunked else int(request.headers["content-length"])
        if length is not None and length < 0:
            raise ValueError("negative Content-Length")
    except ValueError:
        raise StowError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
    boundary = service.boundary(request.headers.get("content-type", ""), length)
    if length is not None and not service.storage.has_room(2 * length):
        raise StowError(HTTPStatus.INSUFFICIENT_STORAGE, "not enough free disk")
    return await spool_body(request, spool, service, reservation), boundary


def stow_routes(service: StowService, authorize=None) -> list[Route]:
    """``POST /dicom-web/studies[/{study}]`` on ``service``, for the node's HTTP app;
    ``authorize(request)`` (async) answers a request that may not store (401, 403) before
    anything of its body is read, or returns None."""

    async def store(request: Request) -> Response:
        if authorize is not None and (refusal := await authorize(request)) is not None:
            return refusal
        study = request.path_params.get("study")
        peer = request.client.host if request.client else "?"
        if study is not None:
            try:
                uid_name(study, "the Study Instance UID in the URL")
            except UIDRefused as exc:
                return close_with(HTTPStatus.BAD_REQUEST, str(exc))
        reservation = Reservation(service.storage)
        try:
            with tempfile.TemporaryFile(dir=service.storage.partial, prefix="stow-") as spool:
                size, boundary = await receive_multipart(request, spool, service, reservation)
                status, response = await anyio.to_thread.run_sync(
                    service.store_spooled, spool, size, boundary, study)
        except StowError as exc:
            log.warning("STOW-RS from %s refused (%d): %s", peer, exc.status, exc)
            return close_with(exc.status, str(exc))
        except ClientGone as exc:                   # the client went quiet or away
            log.warning("STOW-RS from %s ended: %s", peer, exc)
            return close_with(HTTPStatus.REQUEST_TIMEOUT, f"request ended: {exc}")
        except OSError as exc:                      # the spool could not be written
            log.error("STOW-RS from %s not stored: %s", peer, exc.strerror or exc)
            return close_with(HTTPStatus.INSUFFICIENT_STORAGE, "the body could not be spooled")
        finally:
            reservation.release()
        failed = len(response.FailedSOPSequence)
        log.info("STOW-RS from %s: %d stored, %d failed", peer,
                 len(response.ReferencedSOPSequence), failed)
        return JSONResponse(response.to_json_dict(), status_code=status,
                            media_type="application/dicom+json")

    async def only_stores(request: Request) -> Response:
        return JSONResponse({"error": f"this resource only stores (POST {BASE_PATH}/studies)"},
                            status_code=HTTPStatus.METHOD_NOT_ALLOWED,
                            headers={"Allow": "POST"})

    return [Route(f"{BASE_PATH}/studies", store, methods=["POST"]),
            Route(f"{BASE_PATH}/studies/", store, methods=["POST"]),
            Route(f"{BASE_PATH}/studies/{{study}}", store, methods=["POST"]),
            Route(f"{BASE_PATH}/studies/{{study}}/", store, methods=["POST"]),
            Route(f"{BASE_PATH}/studies", only_stores, methods=["GET", "PUT", "DELETE"])]


class StowServer:
    """An HTTP server with the STOW-RS route alone (the node serves it among the others
    of :mod:`pacs_node.web`); for tests and tools that want just the receiver."""

    def __init__(self, storage: InstanceStorage, max_request_mb: int = 2048,
                 gate: PeerGate | None = None, authorize=None) -> None:
        from pacs_node.web.app import make_app

        self.service = StowService(storage, max_request_mb)
        self.storage = storage
        self.gate = gate or PeerGate(max_total=32, max_per_peer=8)
        self.app = make_app(stow_routes(self.service, authorize))
        self.server: HttpServer | None = None

    def start(self, host: str, port: int) -> None:
        self.server = HttpServer(self.app, self.gate, header_seconds=HEADER_SECONDS,
                                 idle_seconds=IDLE_SECONDS)
        self.server.start(host, port)
        log.info("STOW-RS listening on http://%s:%d%s/studies", host, self.port, BASE_PATH)

    @property
    def port(self) -> int:
        return self.server.port if self.server else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
