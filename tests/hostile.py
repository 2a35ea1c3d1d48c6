"""The hostile sender's tools, shared by the CI suite (tests/test_hostile_suite.py) and the
soak (bench/bench_hostile.py): instances with any UIDs, raw bytes, trickling sockets,
STOW-RS bodies. Loopback only."""

from __future__ import annotations

import http.client
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

import pydicom
from pydicom import config


def with_uids(source: Path, folder: Path, study: str, series: str, sop: str) -> Path:
    """A copy of ``source`` in ``folder`` that names these UIDs, however hostile."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    path = folder / f"{uuid.uuid4().hex}.dcm"
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = mode
    return path


def raw(port: int, payload: bytes, linger: float = 0.0) -> None:
    """Send bytes, wait a little, read what comes back (an A-ABORT, or nothing)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(payload)
            time.sleep(linger)
            s.recv(64)
    except OSError:
        pass


def trickle(port: int, go_on: Callable[[], bool]) -> None:
    """An A-ASSOCIATE-RQ begun, then a byte every 0.5 s while ``go_on()``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x01\x00\x00\x00\x10")
            while go_on():
                time.sleep(0.5)
                s.sendall(b"\x00")
    except OSError:
        pass                                       # closed by the node: as it should be


def stow(port: int, parts: list[bytes], close: bool = True, token: str = "") -> int:
    """POST the parts to /dicom-web/studies (without the close delimiter unless ``close``),
    with ``token`` as a bearer token when given; the HTTP status, 0 when the connection
    failed."""
    boundary = uuid.uuid4().hex.encode()
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary, p)
                    for p in parts) + (b"--%s--\r\n" % boundary if close else b"")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/dicom-web/studies", body=body, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; '
                            f'boundary={boundary.decode()}',
            **({"Authorization": f"Bearer {token}"} if token else {})})
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()
