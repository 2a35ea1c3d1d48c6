"""The STOW-RS receiver's test harness: an in-process :class:`StowServer` (the ``node``
fixture, deadlines shortened), small CT instances with any UIDs (hostile ones too),
multipart bodies, POSTs as http.client, urllib3 and curl send them or as a raw socket
does (reading whatever the server answers before it closes), and what is on disk and in
the job store afterwards."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import socket
import time
import uuid
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select as sql_select

import pacs_node.stow as stow_module
from pacs_node.peers import PeerGate
from pacs_node.storage import InstanceStorage
from pacs_node.stow import StowServer
from store.api import JobStore
from store.models import Instance

DEADLINE = 1.5          # HEADER_SECONDS and IDLE_SECONDS while these tests run
PATH = "/dicom-web/studies"


@contextlib.contextmanager
def hostile_writing():
    """Let pydicom write UIDs it would otherwise refuse (restored afterwards)."""
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode = before


def dataset(study: str | None = None, series: str | None = None, sop: str | None = None,
            rows: int = 8, columns: int = 8, pixels: bool = True) -> Dataset:
    """A small CT instance (Explicit VR Little Endian) with the given UIDs."""
    sop = sop if sop is not None else generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study if study is not None else generate_uid()
    ds.SeriesInstanceUID = series if series is not None else generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "STOW-LIMITS"
    ds.PatientName = "Limits^Test"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixels:
        ds.PixelData = bytes(range(256)) * (rows * columns * 2 // 256) + bytes(
            rows * columns * 2 % 256)
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def instance(**kw) -> tuple[bytes, Dataset]:
    ds = dataset(**kw)
    return encode(ds), ds


def multipart(parts: list[tuple[str, bytes]], boundary: str | None = None,
              close: bool = True) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(b"--%s\r\nContent-Type: %s\r\n\r\n%s\r\n" % (boundary.encode(),
                                                               t.encode(), d)
                    for t, d in parts)
    if close:
        body += b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(port: int, body, content_type: str, path: str = PATH, source: str | None = None,
         length: int | None = None, timeout: float = 60):
    """POST with http.client; (status, headers, JSON answer or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None,
                                      blocksize=256 * 1024)
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if length is not None:
        headers["Content-Length"] = str(length)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def post_one(port: int, data: bytes, path: str = PATH, source: str | None = None):
    body, ctype = multipart([("application/dicom", data)])
    return post(port, body, ctype, path, source)


def post_tolerant(port: int, body: bytes, content_type: str, path: str = PATH,
                  source: str | None = None, timeout: float = 30):
    """POST as urllib3 (requests, dicomweb-client) and curl do: a send cut short by the
    server (a broken pipe) is not an answer; the answer is what can be read after it.
    (status, headers, JSON answer or None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    try:
        try:
            sock.sendall(raw_head(len(body), content_type, path) + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
    finally:
        sock.close()


def store_response(answer: dict) -> Dataset:
    return Dataset.from_json(answer)


def raw_head(length: int, content_type: str, path: str = PATH) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float, str]:
    """Everything the server sends until it closes; (bytes, seconds waited, how it ended)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received, time.monotonic() - start, "reset"
        if not chunk:
            return received, time.monotonic() - start, "closed"
        received += chunk
    return received, time.monotonic() - start, "open"


def status_of(raw: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw)
    return int(match.group(1)) if match else None


def recorded(store: JobStore) -> dict[str, str]:
    """SOP Instance UID -> path of every recorded instance."""
    with store.read_session() as s:
        return dict(s.execute(sql_select(Instance.sop_instance_uid, Instance.path)).all())


def dcm_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".dcm")


def partial_files(storage: InstanceStorage) -> list[Path]:
    return [p for p in storage.partial.iterdir()]


@pytest.fixture
def stow_node(tmp_path, monkeypatch):
    """Start a StowServer: stow_node(gate=..., max_request_mb=...) -> (server, store)."""
    monkeypatch.setattr(stow_module, "HEADER_SECONDS", DEADLINE)
    monkeypatch.setattr(stow_module, "IDLE_SECONDS", DEADLINE)
    started: list[StowServer] = []
    stores: list[JobStore] = []

    def start(gate: PeerGate | None = None, max_request_mb: int = 2048,
              storage: InstanceStorage | None = None):
        if storage is None:
            store = JobStore(f"sqlite:///{tmp_path}/lungsys.db")
            stores.append(store)
            storage = InstanceStorage(store, tmp_path / "data", min_free_disk_mb=1)
        server = StowServer(storage, max_request_mb=max_request_mb, gate=gate)
        server.start("127.0.0.1", 0)
        started.append(server)
        return server, storage.store

    yield start
    for server in started:
        server.stop()
    for store in stores:
        store.engine.dispose()


def refused_then_stored(tmp_path: Path, hostile: bytes, honest: bytes) -> None:
    """A STOW-RS of ``hostile`` is refused with Failure Reason 0xC000 (Cannot Understand)
    and nothing stored; ``honest``, after it, is stored (a node of its own)."""
    from pacs_node.storage import CANNOT_UNDERSTAND

    store = JobStore(f"sqlite:///{tmp_path}/lungsys.db")
    server = StowServer(InstanceStorage(store, tmp_path / "data", min_free_disk_mb=1))
    server.start("127.0.0.1", 0)
    try:
        body, ctype = multipart([("application/dicom", hostile)])
        status, _, answer = post(server.port, body, ctype)
        assert status == 409
        [failed] = answer["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [CANNOT_UNDERSTAND]
        assert store.counts()["instances"] == 0
        body, ctype = multipart([("application/dicom", honest)])
        assert post(server.port, body, ctype)[0] == 200
    finally:
        server.stop()
