"""What the node serves to ``lungsys worker`` processes without its data folder.

A worker with ``[worker] instances = "wado"`` has a data folder of its own and
reaches the node only over HTTP (and the job store). It needs three things,
each for a token of the ``worker`` role alone (:class:`store.accounts.Role`):

``GET /worker/node``
    which node this is (its id in the shared job store): the worker claims
    this node's jobs.
``GET /dicom-web/studies/{study}/series/{series}``
    WADO-RS Retrieve Series (PS3.18 10.4): the instances of a series whose
    job the caller runs, as ``multipart/related; type="application/dicom"``,
    each part the file as received (its transfer syntax named in the part's
    Content-Type: the node never transcodes, so it answers
    ``transfer-syntax=*`` requests and those without one; another is 406).
    Streamed from disk a megabyte at a time.
``PUT /worker/jobs/{job}/attempts/{attempt}/results``
    the result objects of that claim of a job, as a STOW-RS body (one Part-10
    file a part, in a transfer syntax lungsys writes), once: written into
    ``results/STUDY/SERIES/vN/aK`` all or none, only objects of the job's
    study. The answer maps each SOP Instance UID to its path here; the worker
    records the job's outcome with those paths in the same transaction as its
    deliveries (:meth:`store.jobs.Jobs.finish_job`), so the node delivers
    each object exactly once, as for its own worker. ``DELETE`` on the same
    resource removes the claim's folder when no result of the job is recorded
    in it (the worker lost its lease, or could not finish).

A token proves a worker; the claim's key (``X-Lungsys-Claim``: a secret the job
store gives the worker that claims a job, a new one at each claim) proves which
job it runs: a worker token alone retrieves no series and hands back nothing,
and a worker whose lease expired is answered 410 Gone.
"""

from __future__ import annotations

import hmac
import logging
import mmap
import os
import shutil
import tempfile
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import anyio
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import pacs_node.web  # noqa: F401  (registers {name:id} for the routes below)
from pacs_node.header import read_file_header
from pacs_node.layout import OutsideDataDir, UIDRefused, uid_name
from pacs_node.multipart import (StowError, media_type, multipart_files, split_parts,
                                 write_part)
from pacs_node.stow import ClientGone, Reservation, StowService, receive_multipart, close_with
from store.accounts import Role
from store.models import JobState

if TYPE_CHECKING:
    from pacs_node.node import Node
    from pacs_node.web.auth import Doorkeeper

log = logging.getLogger(__name__)

#: The header carrying the claim's key (:attr:`store.models.Job.claim_key`).
CLAIM_HEADER = "X-Lungsys-Claim"
#: What result objects come in: the transfer syntaxes lungsys writes (never deflated).
RESULT_SYNTAXES = frozenset({ExplicitVRLittleEndian, JPEG2000Lossless})
_BOUNDARY = "lungsys-wado-rs-boundary"


class Refused(Exception):
    """A request the node answers with an HTTP error status."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _answer(status: HTTPStatus, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def acceptable(accept: str) -> bool:
    """Whether an Accept header takes the files as received (PS3.18 8.7.3.5)."""
    if not accept.strip():
        return True
    for item in accept.split(","):
        try:
            media, params = media_type(item.strip())
        except StowError:                   # a parameter twice: not this one
            continue
        if media in ("*/*", "multipart/*") or (
                media == "multipart/related"
                and params.get("type", "application/dicom").lower() == "application/dicom"
                and params.get("transfer-syntax", "*") == "*"):
            return True
    return False


def _parts(files: list[tuple[str, str, str]], layout) -> Iterator[bytes]:
    """The multipart body of a series: each file as it lies on disk (one removed meanwhile,
    or not in the data folder, is left out: the worker counts)."""
    def inside(path: str) -> Path | None:
        try:
            return layout.inside(path)
        except OutsideDataDir:
            log.warning("WADO-RS: an instance of the series lies outside the data folder")
            return None

    def unreadable(exc: OSError) -> None:
        log.warning("WADO-RS: an instance of the series could not be read: %s",
                    type(exc).__name__)

    parts = ((where, f"application/dicom; transfer-syntax={syntax}")
             for _, path, syntax in files if (where := inside(path)) is not None)
    return multipart_files(parts, _BOUNDARY, unreadable)


def held_claim(node: "Node", job_id: int, attempt: int, key: str) -> dict:
    """The job, when ``key`` holds its claim ``attempt`` now; Refused (404, 410) otherwise."""
    claim = node.store.claim_of(node.node_id, job_id)
    if claim is None:
        raise Refused(HTTPStatus.NOT_FOUND, f"no job {job_id} of this node")
    if (claim["state"] != JobState.running or claim["attempt"] != attempt or not key
            or not hmac.compare_digest(claim["key"], key)):
        raise Refused(HTTPStatus.GONE, f"job {job_id}: claim {attempt} is not held with this "
                                       f"key (its lease expired?)")
    return claim


def _result_part(body, start: int, end: int, folder: Path, study: str) -> tuple[str, Path]:
    """One part written to a file of ``folder``: its SOP Instance UID and the file."""
    tmp = folder / f"part-{start}"
    write_part(body, start, end, tmp)
    try:
        syntax = str(read_file_meta_info(tmp).get("TransferSyntaxUID", ""))
        if syntax not in RESULT_SYNTAXES:
            raise ValueError(f"transfer syntax {syntax[:64]!r} is not one lungsys writes")
        header = read_file_header(tmp)              # hardened: zeros, sizes (pacs_node.header)
        uid_name(header.sop_instance_uid, "SOP Instance UID")
    except Exception as exc:
        raise Refused(HTTPStatus.BAD_REQUEST, f"a part is not a result object the node can "
                                              f"file: {str(exc)[:200]}") from None
    if header.study_instance_uid != study:
        raise Refused(HTTPStatus.CONFLICT, "an object of another study than the job's")
    return header.sop_instance_uid, tmp


def store_results(node: "Node", job_id: int, attempt: int, key: str, spool, size: int,
                  boundary: bytes) -> dict[str, str]:
    """File a claim's result objects, all or none (see the module)."""
    claim = held_claim(node, job_id, attempt, key)
    folder = node.layout.results_folder(claim["study"], claim["series"], claim["version"],
                                        attempt)
    if folder.exists() and any(folder.iterdir()):
        raise Refused(HTTPStatus.CONFLICT, f"job {job_id}: the results of claim {attempt} "
                                           f"were handed back already")
    if size == 0:
        raise Refused(HTTPStatus.BAD_REQUEST, "empty body")
    incoming = node.layout.inside(folder) / f".incoming-{uuid.uuid4().hex}"
    incoming.mkdir(parents=True)
    try:
        parts: dict[str, Path] = {}
        spool.flush()
        with mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ) as body:
            for headers, start, end in split_parts(body, boundary):
                if media_type(headers.get("content-type", "application/dicom"))[0] != \
                        "application/dicom":
                    raise Refused(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                  "a part is not application/dicom")
                sop, path = _result_part(body, start, end, incoming, claim["study"])
                if sop in parts:
                    raise Refused(HTTPStatus.BAD_REQUEST, "one SOP Instance UID twice")
                parts[sop] = path
        if not parts:
            raise Refused(HTTPStatus.BAD_REQUEST, "the body holds no part")
        held_claim(node, job_id, attempt, key)       # still the caller's, as it is filed
        stored = {}
        for sop, path in parts.items():
            target = folder / f"{uid_name(sop, 'SOP Instance UID')}.dcm"
            os.replace(path, target)
            stored[sop] = str(target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    log.info("job %d: %d result object(s) of claim %d handed back", job_id, len(stored),
             attempt)
    return stored


def discard_results(node: "Node", job_id: int, attempt: int, key: str) -> None:
    """Remove a claim's results folder, unless results recorded for the job lie in it or
    another worker holds that claim now."""
    claim = node.store.claim_of(node.node_id, job_id)
    if claim is None:
        raise Refused(HTTPStatus.NOT_FOUND, f"no job {job_id} of this node")
    current = claim["state"] == JobState.running and claim["attempt"] == attempt
    if current and not (key and hmac.compare_digest(claim["key"], key)):
        raise Refused(HTTPStatus.GONE, f"job {job_id}: claim {attempt} is not held with this "
                                       f"key")
    folder = node.layout.results_folder(claim["study"], claim["series"], claim["version"],
                                        attempt)
    if any(os.path.dirname(path) == str(folder) for path in claim["results"]):
        raise Refused(HTTPStatus.CONFLICT, f"job {job_id}: the results of claim {attempt} "
                                           f"are recorded; they stay")
    node.layout.remove_tree(folder)
    log.info("job %d: results of claim %d removed (not recorded)", job_id, attempt)


def wado_routes(node: "Node", door: "Doorkeeper", service: StowService) -> list[Route]:
    """The routes of the module, each for a token of the worker role."""

    async def hello(request: Request) -> Response:
        if (refusal := await door.api(request, Role.worker)):
            return refusal
        return JSONResponse({"node": node.node_id, "ae_title": node.config.node.ae_title})

    async def retrieve_series(request: Request) -> Response:
        if (refusal := await door.api(request, Role.worker)):
            return refusal
        try:
            study = request.path_params["study"]
            series = request.path_params["series"]
            uid_name(study, "Study Instance UID")
            uid_name(series, "Series Instance UID")
        except UIDRefused as exc:
            return _answer(HTTPStatus.BAD_REQUEST, str(exc))
        if not acceptable(request.headers.get("accept", "")):
            return _answer(HTTPStatus.NOT_ACCEPTABLE, 'only multipart/related; type='
                           '"application/dicom" in the transfer syntax received')
        files = await anyio.to_thread.run_sync(
            node.store.claimed_series, node.node_id, study, series,
            request.headers.get(CLAIM_HEADER, ""))
        if not files:
            return _answer(HTTPStatus.NOT_FOUND, f"no series of this node whose job runs "
                                                 f"under the claim in {CLAIM_HEADER}")
        log.info("WADO-RS: %d instance(s) of a series to %s", len(files),
                 request.state.principal.name)
        return StreamingResponse(_parts(files, node.layout), media_type=(
            f'multipart/related; type="application/dicom"; boundary={_BOUNDARY}'))

    async def results(request: Request) -> Response:
        if (refusal := await door.api(request, Role.worker)):
            return refusal
        job_id, attempt = request.path_params["job"], request.path_params["attempt"]
        key = request.headers.get(CLAIM_HEADER, "")
        try:
            if request.method == "DELETE":
                await anyio.to_thread.run_sync(discard_results, node, job_id, attempt, key)
                return JSONResponse({"removed": True})
            # the claim is checked before a byte of the body is read, and again at the end
            await anyio.to_thread.run_sync(held_claim, node, job_id, attempt, key)
            reservation = Reservation(service.storage)
            try:
                with tempfile.TemporaryFile(dir=service.storage.partial,
                                            prefix="results-") as spool:
                    size, boundary = await receive_multipart(request, spool, service,
                                                             reservation)
                    stored = await anyio.to_thread.run_sync(
                        store_results, node, job_id, attempt, key, spool, size, boundary)
            finally:
                reservation.release()
        except (Refused, StowError) as exc:
            log.warning("job %d: results of claim %d refused (%d): %s", job_id, attempt,
                        exc.status, exc)
            return close_with(exc.status, str(exc))
        except ClientGone as exc:
            return close_with(HTTPStatus.REQUEST_TIMEOUT, f"request ended: {exc}")
        except OSError as exc:
            log.error("job %d: results of claim %d not stored: %s", job_id, attempt,
                      exc.strerror or exc)
            return close_with(HTTPStatus.INSUFFICIENT_STORAGE, "the results could not be written")
        return JSONResponse({"stored": stored})

    return [Route("/worker/node", hello, methods=["GET"]),
            Route("/dicom-web/studies/{study}/series/{series}", retrieve_series,
                  methods=["GET"]),
            Route("/worker/jobs/{job:id}/attempts/{attempt:id}/results", results,
                  methods=["PUT", "DELETE"])]
