"""The STOW-RS receiver at its limits: many senders, hostile peers, slow or broken
bodies, big instances, a full disk, hostile UIDs, a job store gone from under it.

Everything runs over loopback against an in-process :class:`StowServer`; the
deadlines are shortened (``HEADER_SECONDS``, ``IDLE_SECONDS``) to keep the file fast.
What is asserted is what an admin would check: the HTTP status each sender got
(never a reset), what the job store holds, and which files lie where on disk.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import io
import json
import os
import re
import select
import shutil
import socket
import struct
import threading
import time
import tracemalloc
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
from pacs_node.storage import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, STUDY_MISMATCH,
                               InstanceStorage)
from pacs_node.stow import StowServer
from store.api import JobStore
from store.models import Instance, Series

DEADLINE = 1.5          # HEADER_SECONDS and IDLE_SECONDS while these tests run
PATH = "/dicom-web/studies"


# --- helpers -----------------------------------------------------------------------------
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


def wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def recorded(store: JobStore) -> dict[str, str]:
    """SOP Instance UID -> path of every recorded instance."""
    with store.read_session() as s:
        return dict(s.execute(sql_select(Instance.sop_instance_uid, Instance.path)).all())


def dcm_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == ".dcm")


def partial_files(storage: InstanceStorage) -> list[Path]:
    return [p for p in storage.partial.iterdir()]


@pytest.fixture
def node(tmp_path, monkeypatch):
    """Start a StowServer: node(gate=..., max_request_mb=...) -> (server, store)."""
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


# --- 1. many senders at once ------------------------------------------------------------
def _fire(port: int, bodies: list[tuple[bytes, str]], send_with=post) -> list:
    """POST each body from its own thread, all at once; the answers (or the errors)."""
    barrier = threading.Barrier(len(bodies))
    results: list = [None] * len(bodies)

    def send(i: int) -> None:
        barrier.wait()
        try:
            results[i] = send_with(port, bodies[i][0], bodies[i][1], timeout=30)
        except Exception as exc:          # a reset, a broken pipe, a timeout
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_fifty_concurrent_senders_are_all_answered_and_recorded(node):
    server, store = node(gate=PeerGate(max_total=64, max_per_peer=64))
    study, series = generate_uid(), generate_uid()
    sent = [instance(study=study, series=series) for _ in range(50)]
    results = _fire(server.port, [multipart([("application/dicom", d)]) for d, _ in sent])

    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, f"{len(errors)} senders got no HTTP answer: {errors[:3]}"
    assert [r[0] for r in results] == [200] * 50
    stored = {store_response(r[2]).ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for r in results}
    assert stored == {ds.SOPInstanceUID for _, ds in sent}
    rows = recorded(store)
    assert set(rows) == stored
    assert all(Path(rows[uid]).is_file() for uid in stored)
    assert len(dcm_files(server.storage.incoming)) == 50
    with store.read_session() as s:
        [row] = s.query(Series).all()
        assert row.instance_count == 50
    assert wait_for(lambda: server.gate.open == 0)
    assert not partial_files(server.storage)


def test_senders_beyond_the_gate_get_503_with_retry_after_never_a_reset(node):
    server, store = node(gate=PeerGate(max_total=4, max_per_peer=4))
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    assert wait_for(lambda: server.gate.open == 3)            # one place left for 50
    sent = [instance() for _ in range(50)]
    try:
        results = _fire(server.port, [multipart([("application/dicom", d)])
                                      for d, _ in sent], send_with=post_tolerant)
    finally:
        for s in idle:
            s.close()

    errors = [r for r in results if not isinstance(r, tuple)]
    assert not errors, f"{len(errors)} of 50 senders got no HTTP answer: {errors[:3]}"
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses
    assert all(r[1].get("Retry-After") for r in results if r[0] == 503)
    ok = {store_response(r[2]).ReferencedSOPSequence[0].ReferencedSOPInstanceUID
          for r in results if r[0] == 200}
    assert ok and set(recorded(store)) == ok
    assert len(dcm_files(server.storage.incoming)) == len(ok)


# --- 2. the gate ------------------------------------------------------------------------
def test_the_gate_limits_each_peer_and_keeps_room_for_the_others(node):
    server, store = node(gate=PeerGate(max_total=4, max_per_peer=2))
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        assert wait_for(lambda: server.gate.open == 2)
        third = socket.create_connection(("127.0.0.1", server.port))
        raw, waited, how = read_until_closed(third, 5)
        third.close()
        assert status_of(raw) == 503 and b"Retry-After:" in raw and how == "closed"

        data, ds = instance()
        body, ctype = multipart([("application/dicom", data)])
        status, headers, _ = post_tolerant(server.port, body, ctype)   # 127.0.0.1 again
        assert status == 503 and headers.get("Retry-After")
        assert ds.SOPInstanceUID not in recorded(store)

        status, _, answer = post_one(server.port, data, source="127.0.0.2")
        assert status == 200
        assert ds.SOPInstanceUID in recorded(store)
    finally:
        for s in idle:
            s.close()
    assert wait_for(lambda: server.gate.open == 0)        # the places are given back
    assert post_one(server.port, instance()[0])[0] == 200

    shared = server.storage
    only_2, _ = node(gate=PeerGate(["127.0.0.2/32"]), storage=shared)
    data, ds = instance()
    body, ctype = multipart([("application/dicom", data)])
    assert post_tolerant(only_2.port, body, ctype)[0] == 503
    assert ds.SOPInstanceUID not in recorded(store)
    assert post_one(only_2.port, data, source="127.0.0.2")[0] == 200
    assert ds.SOPInstanceUID in recorded(store)


# --- 3. slow and silent senders ---------------------------------------------------------
def test_slow_headers_and_a_silent_body_are_cut_off_and_the_receiver_goes_on(node):
    server, store = node()
    # One header byte every 0.4 s: no single read waits IDLE_SECONDS, yet the
    # headers are not complete after HEADER_SECONDS.
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /dicom-web/studies HTTP/1.1\r\n")
    trickle = b"X-Slow: " + b"a" * 200
    start = time.monotonic()
    how = "open"
    for byte in trickle:
        try:
            slow.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            how = "send failed"
            break
        readable, _, _ = select.select([slow], [], [], 0.4)
        if readable:
            try:
                chunk = slow.recv(65536)
            except ConnectionResetError:
                how = "reset"
                break
            if not chunk:
                how = "closed"
                break
        if time.monotonic() - start > 4 * DEADLINE + 2:
            break
    cut_after = time.monotonic() - start
    slow.close()
    assert how != "open", f"a slowloris sender was still connected after {cut_after:.1f} s"
    assert DEADLINE - 0.5 <= cut_after <= DEADLINE + 2.0, cut_after

    # Complete headers, part of the body, then silence: cut after IDLE_SECONDS.
    data, ds = instance(rows=64, columns=64)
    body, ctype = multipart([("application/dicom", data)])
    silent = socket.create_connection(("127.0.0.1", server.port))
    silent.sendall(raw_head(len(body), ctype) + body[:len(body) // 2])
    raw, waited, how = read_until_closed(silent, 4 * DEADLINE + 2)
    silent.close()
    assert how in ("closed", "reset"), f"a silent sender was still connected after {waited} s"
    assert DEADLINE - 0.5 <= waited <= DEADLINE + 2.0, waited
    assert status_of(raw) in (None, 400, 408), raw[:100]     # never a success

    assert wait_for(lambda: server.gate.open == 0)
    assert not partial_files(server.storage)
    assert ds.SOPInstanceUID not in recorded(store)
    assert not dcm_files(server.storage.incoming)
    status, _, answer = post_one(server.port, data)
    assert status == 200
    assert ds.SOPInstanceUID in recorded(store)


# --- 4. an unterminated part ------------------------------------------------------------
def test_an_unterminated_last_part_keeps_the_parts_before_it(node):
    server, store = node()
    study = generate_uid()
    first, ds1 = instance(study=study)
    second, ds2 = instance(study=study)
    third, ds3 = instance(study=study)
    body, ctype = multipart([("application/dicom", first), ("application/dicom", second)])
    boundary = ctype.rsplit("=", 1)[1]
    body = body[:-len(b"--%s--\r\n" % boundary.encode())]                 # not closed yet
    body += b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary.encode() + third

    status, _, answer = post(server.port, body, ctype)
    assert status == 202
    response = store_response(answer)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        ds1.SOPInstanceUID, ds2.SOPInstanceUID]
    assert [i.FailureReason for i in response.FailedSOPSequence] == [CANNOT_UNDERSTAND]
    rows = recorded(store)
    assert set(rows) == {ds1.SOPInstanceUID, ds2.SOPInstanceUID}
    files = dcm_files(server.storage.incoming)
    assert sorted(files) == sorted(Path(p) for p in rows.values())
    assert {p.read_bytes() for p in files} == {first, second}   # whole, as sent
    assert not partial_files(server.storage)


# --- 5. memory ------------------------------------------------------------------------------
def test_a_100_mb_instance_is_stored_without_holding_it_in_memory(node, tmp_path):
    server, store = node()
    rows = columns = 7168                                  # 16-bit: 98 MiB of pixel data
    pixel_bytes = rows * columns * 2
    ds = dataset(rows=rows, columns=columns, pixels=False)
    head = encode(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    boundary = uuid.uuid4().hex.encode()
    body_file = tmp_path / "body.bin"
    block = bytes(range(256)) * 4096                        # 1 MiB
    with open(body_file, "wb") as f:
        f.write(b"--%s\r\nContent-Type: application/dicom\r\n\r\n" % boundary + head)
        left = pixel_bytes
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.write(b"\r\n--%s--\r\n" % boundary)
    size = body_file.stat().st_size
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
    gc.collect()

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with open(body_file, "rb") as f:
            status, _, answer = post(server.port, f, ctype, length=size, timeout=120)
        peak = tracemalloc.get_traced_memory()[1] - base
        print(f"peak {peak / 2**20:.1f} MiB")
    finally:
        tracemalloc.stop()
    body_file.unlink()

    assert status == 200, answer
    assert peak < 30 * 1024 * 1024, f"{peak / 2**20:.0f} MiB allocated for one request"
    path = Path(recorded(store)[ds.SOPInstanceUID])
    assert path.stat().st_size == len(head) + pixel_bytes
    with open(path, "rb") as f:                    # the instance as sent, to its last byte
        assert f.read(len(head)) == head
        assert pixel_bytes % len(block) == 0
        f.seek(-len(block), os.SEEK_END)
        assert f.read() == block
    assert not partial_files(server.storage)


# --- 6. disk accounting ------------------------------------------------------------------
@pytest.fixture
def free_disk(monkeypatch):
    """Fix the free disk the node sees (other processes share the real disk)."""
    real = shutil.disk_usage
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real(path)._replace(free=free["bytes"]))
    return free


def test_reservations_count_against_the_free_disk_until_released(node, free_disk):
    server, _ = node()
    storage = server.storage
    n = 64 * 1024 * 1024
    free_disk["bytes"] = storage.min_free + n + n // 2
    assert storage.has_room(n)
    assert storage.reserve(n)
    assert not storage.has_room(n)
    assert not storage.reserve(n)             # a second request of the same size: no room
    storage.release(n)
    assert storage.has_room(n)
    assert storage.reserve(n)
    storage.release(n)
    storage.release(n)                        # released twice: never below nothing
    assert not storage.has_room(2 * n)


def test_two_requests_in_flight_cannot_both_take_the_last_disk(node, free_disk):
    server, store = node()
    storage = server.storage
    data_a, ds_a = instance(rows=1024, columns=1024)                 # 2 MiB each
    data_b, ds_b = instance(rows=1024, columns=1024)
    data_c, ds_c = instance(rows=1024, columns=1024)
    body_a, ctype_a = multipart([("application/dicom", data_a)])
    body_b, ctype_b = multipart([("application/dicom", data_b)])
    body_c, ctype_c = multipart([("application/dicom", data_c)])
    length = len(body_a)
    # Room for one request (its spool and its stored copy: 2x its size) and a half.
    free_disk["bytes"] = storage.min_free + 2 * length + length // 2
    assert storage.has_room(2 * length)

    a = socket.create_connection(("127.0.0.1", server.port))
    b = socket.create_connection(("127.0.0.1", server.port))
    try:
        a.sendall(raw_head(length, ctype_a) + body_a[:length // 2])       # A in flight
        assert wait_for(lambda: not storage.has_room(2 * length)), "A reserved nothing"
        b.sendall(raw_head(len(body_b), ctype_b) + body_b[:65536])
        raw_b, _, how_b = read_until_closed(b, 10)
        assert status_of(raw_b) == 507, (how_b, raw_b[:200])
        a.sendall(body_a[length // 2:])
        a.settimeout(10)
        resp = http.client.HTTPResponse(a)
        resp.begin()
        answer = json.loads(resp.read())
        assert resp.status == 200, answer
    finally:
        a.close()
        b.close()
    rows = recorded(store)
    assert ds_a.SOPInstanceUID in rows and ds_b.SOPInstanceUID not in rows
    # A's reservation is given back: a third request of the same size fits.
    assert post(server.port, body_c, ctype_c)[0] == 200
    assert ds_c.SOPInstanceUID in recorded(store)
    assert storage.has_room(2 * length), "a reservation was never released"
    assert not partial_files(storage)


def test_a_refused_sender_reads_the_refusal_not_a_broken_pipe(node):
    """A sender refused before its body is read (the gate: 503; above the size limit:
    413) must be able to read why. Python's http.client (urllib.request) sends the whole
    body before it reads: if the server closes on unread data, the kernel resets the
    connection and the sender sees a broken pipe, not the status (RFC 9112 9.6: close
    the sending half, then read until the client closes: a lingering close)."""
    shut_out, store = node(gate=PeerGate(["10.255.255.0/24"]))
    too_small, _ = node(max_request_mb=1, storage=shut_out.storage)
    data, ds = instance(rows=64, columns=64)
    seen: list = []
    for _ in range(10):
        try:
            seen.append(post_one(shut_out.port, data)[0])
        except OSError as exc:
            seen.append(type(exc).__name__)
    big, ctype = multipart([("application/dicom", bytes(8 << 20))])
    for _ in range(3):
        try:
            seen.append(post(too_small.port, big, ctype, timeout=20)[0])
        except OSError as exc:
            seen.append(type(exc).__name__)
    assert seen == [503] * 10 + [413] * 3, f"the senders saw: {seen}"
    assert ds.SOPInstanceUID not in recorded(store)


# --- 7. hostile UIDs ------------------------------------------------------------------------
_HASHED = re.compile(r"_[0-9a-f]{40}")
_CONFORMANT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def test_hostile_uids_never_leave_the_incoming_folder(node, tmp_path):
    evil = Path("/tmp/evil")
    evil_before = evil.exists()
    parent_before = set(os.listdir(tmp_path.parent))
    server, store = node()
    series = generate_uid()
    long_uid = "1." + "2" * 63                                           # 65 characters
    with hostile_writing():
        dotdot_dot = dataset(study="..", series=".")
        dotdot_evil = dataset(study="..", series="/tmp/evil")
        slash = dataset(study=generate_uid(), series=series, sop="1.2/3")
        underscore = dataset(study=slash.StudyInstanceUID, series=series, sop="1.2_3")
        too_long = dataset(sop=long_uid)
        datas = [encode(d) for d in (dotdot_dot, dotdot_evil, slash, underscore, too_long)]

    body, ctype = multipart([("application/dicom", d) for d in datas])
    status, _, answer = post(server.port, body, ctype)
    assert status == 202
    response = store_response(answer)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        dotdot_dot.SOPInstanceUID, dotdot_evil.SOPInstanceUID, "1.2/3", "1.2_3"]
    [failed] = response.FailedSOPSequence
    assert failed.FailureReason == CANNOT_UNDERSTAND
    assert failed.ReferencedSOPInstanceUID == long_uid[:64]

    rows = recorded(store)
    assert {"1.2/3", "1.2_3"} <= set(rows) and long_uid not in rows
    assert rows["1.2/3"] != rows["1.2_3"]
    assert pydicom.dcmread(rows["1.2/3"]).SOPInstanceUID == "1.2/3"
    assert pydicom.dcmread(rows["1.2_3"]).SOPInstanceUID == "1.2_3"
    incidents = store.incidents(kind="refused")
    assert any(i.sop_instance_uid == long_uid[:64] and i.origin == "STOW-RS"
               for i in incidents), [(i.sop_instance_uid, i.detail) for i in incidents]

    # POST /dicom-web/studies/.. : only instances of study ".." are accepted.
    with hostile_writing():
        of_dotdot = dataset(study="..", series=".")
        other = dataset()
        body, ctype = multipart([("application/dicom", encode(of_dotdot)),
                                 ("application/dicom", encode(other))])
    status, _, answer = post(server.port, body, ctype, path="/dicom-web/studies/..")
    assert status == 202
    response = store_response(answer)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        of_dotdot.SOPInstanceUID]
    assert [i.FailureReason for i in response.FailedSOPSequence] == [STUDY_MISMATCH]
    assert other.SOPInstanceUID not in recorded(store)
    for bad_path in ("/dicom-web/studies/../../etc", "/dicom-web/studies/..%2F..%2Fetc/x"):
        assert post(server.port, body, ctype, path=bad_path)[0] in (400, 404)

    incoming = (tmp_path / "data" / "incoming").resolve()
    every = dcm_files(tmp_path)
    assert len(every) == 5
    for path in every:
        relative = path.resolve().relative_to(incoming)               # raises if outside
        study_name, series_name, file_name = relative.parts
        for name in (study_name, series_name, file_name[:-len(".dcm")]):
            assert _CONFORMANT.fullmatch(name) or _HASHED.fullmatch(name), relative
    assert set(os.listdir(tmp_path.parent)) == parent_before
    assert evil.exists() == evil_before
    assert not partial_files(server.storage)


# --- 8. the job store gone ------------------------------------------------------------------
def test_a_job_store_deleted_under_the_receiver_acknowledges_nothing(node, tmp_path):
    server, store = node()
    data, ds = instance()
    assert post_one(server.port, data)[0] == 200
    before = dcm_files(server.storage.incoming)

    db = tmp_path / "lungsys.db"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists():
            os.remove(path)

    new, new_ds = instance()
    status, headers, answer = post_one(server.port, new)
    assert status == 503, (status, answer)            # every part: the store cannot record
    again = post_one(server.port, data)                # even one recorded before
    assert again[0] == 503

    body, ctype = multipart([("application/dicom", b"not DICOM at all"),
                             ("application/dicom", new)])
    status, _, answer = post(server.port, body, ctype)
    assert status == 409                               # not all for want of the store
    response = store_response(answer)
    assert len(response.ReferencedSOPSequence) == 0
    assert [i.FailureReason for i in response.FailedSOPSequence] == [CANNOT_UNDERSTAND,
                                                                    OUT_OF_RESOURCES]
    assert dcm_files(server.storage.incoming) == before   # nothing new on disk
    assert not partial_files(server.storage)


# --- 9. a trickled body, a flood of headers ---------------------------------------------
def test_a_trickled_body_ends_and_gives_back_its_disk(node):
    """A byte every 0.3 s: no piece waits IDLE_SECONDS, but the body is far below the
    minimum rate: the request ends (408), the connection closes, the reservation of twice
    its Content-Length is released."""
    server, store = node()
    length = 8 * 1024 * 1024
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(raw_head(length, 'multipart/related; type="application/dicom"; boundary=b'))
    start, answer = time.monotonic(), b""
    assert wait_for(lambda: server.storage._reserved == 2 * length)   # reserved up front
    while time.monotonic() - start < 6 * DEADLINE:
        try:
            slow.sendall(b"x")
        except (BrokenPipeError, ConnectionResetError):
            break
        readable, _, _ = select.select([slow], [], [], 0.3)
        if readable:
            chunk = slow.recv(65536)
            if not chunk:
                break
            answer += chunk
    waited = time.monotonic() - start
    slow.close()
    assert status_of(answer) == 408 and b"slower than" in answer, answer[:200]
    assert waited < 4 * DEADLINE, waited
    assert wait_for(lambda: server.storage._reserved == 0 and server.gate.open == 0)
    assert not partial_files(server.storage)


def test_a_flood_of_headers_is_refused_with_memory_flat(node):
    """A megabyte of header lines is refused at the head limit (h11: 64 KiB), not held."""
    server, _ = node()
    tracemalloc.start()
    try:
        flood = socket.create_connection(("127.0.0.1", server.port))
        flood.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            while sent < 1 << 20:
                flood.sendall(b"X-Flood: " + b"a" * 1000 + b"\r\n")
                sent += 1011
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw, _, how = read_until_closed(flood, 10)
        flood.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status_of(raw) in (None, 400, 431), raw[:100]
    assert how in ("closed", "reset")
    assert peak < 8 << 20, peak
    status, _, _ = post_one(server.port, instance(rows=16, columns=16)[0])
    assert status == 200


def test_what_the_parser_cannot_read_is_answered_in_json(node):
    """A request h11 cannot parse gets 400 with a JSON error (like every other answer),
    the connection closes, and the receiver goes on."""
    server, _ = node()
    bad = socket.create_connection(("127.0.0.1", server.port))
    bad.sendall(b"POST /dicom-web/studies HTTP/1.1\r\nContent-Length: 5\r\n"
                b"Content-Length: 7\r\n\r\nhello")          # two lengths: smuggling's start
    raw, _, how = read_until_closed(bad, 10)
    bad.close()
    assert status_of(raw) == 400 and how in ("closed", "reset")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"].startswith("bad HTTP request")
    assert post_one(server.port, instance(rows=16, columns=16)[0])[0] == 200
