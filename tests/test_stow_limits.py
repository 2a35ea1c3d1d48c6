"""The STOW-RS receiver at its limits: many senders, hostile peers, slow or broken
bodies, big instances, a full disk, hostile UIDs, a job store gone from under it.

Everything runs over loopback against an in-process :class:`StowServer`; the
deadlines are shortened (``HEADER_SECONDS``, ``IDLE_SECONDS``) to keep the file fast.
What is asserted is what an admin would check: the HTTP status each sender got
(never a reset), what the job store holds, and which files lie where on disk.
"""

from __future__ import annotations

import gc
import http.client
import json
import os
import select
import shutil
import socket
import struct
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacs_node.peers import PeerGate
from pacs_node.storage import CANNOT_UNDERSTAND
from store.models import Series

from conftest import wait_for
from stow_client import (DEADLINE, dataset, dcm_files, encode, instance, multipart,
                         partial_files, post, post_one, post_tolerant,
                         raw_head, read_until_closed, recorded, status_of, store_response)


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


def test_fifty_concurrent_senders_are_all_answered_and_recorded(stow_node):
    server, store = stow_node(gate=PeerGate(max_total=64, max_per_peer=64))
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


def test_senders_beyond_the_gate_get_503_with_retry_after_never_a_reset(stow_node):
    server, store = stow_node(gate=PeerGate(max_total=4, max_per_peer=4))
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
def test_the_gate_limits_each_peer_and_keeps_room_for_the_others(stow_node):
    server, store = stow_node(gate=PeerGate(max_total=4, max_per_peer=2))
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
    only_2, _ = stow_node(gate=PeerGate(["127.0.0.2/32"]), storage=shared)
    data, ds = instance()
    body, ctype = multipart([("application/dicom", data)])
    assert post_tolerant(only_2.port, body, ctype)[0] == 503
    assert ds.SOPInstanceUID not in recorded(store)
    assert post_one(only_2.port, data, source="127.0.0.2")[0] == 200
    assert ds.SOPInstanceUID in recorded(store)


# --- 3. slow and silent senders ---------------------------------------------------------
def test_slow_headers_and_a_silent_body_are_cut_off_and_the_receiver_goes_on(stow_node):
    server, store = stow_node()
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
def test_an_unterminated_last_part_keeps_the_parts_before_it(stow_node):
    server, store = stow_node()
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
def test_a_100_mb_instance_is_stored_without_holding_it_in_memory(stow_node, tmp_path):
    server, store = stow_node()
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
    """Fix the free disk the stow_node sees (other processes share the real disk)."""
    real = shutil.disk_usage
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real(path)._replace(free=free["bytes"]))
    return free


def test_reservations_count_against_the_free_disk_until_released(stow_node, free_disk):
    server, _ = stow_node()
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


def test_two_requests_in_flight_cannot_both_take_the_last_disk(stow_node, free_disk):
    server, store = stow_node()
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


def test_a_refused_sender_reads_the_refusal_not_a_broken_pipe(stow_node):
    """A sender refused before its body is read (the gate: 503; above the size limit:
    413) must be able to read why. Python's http.client (urllib.request) sends the whole
    body before it reads: if the server closes on unread data, the kernel resets the
    connection and the sender sees a broken pipe, not the status (RFC 9112 9.6: close
    the sending half, then read until the client closes: a lingering close)."""
    shut_out, store = stow_node(gate=PeerGate(["10.255.255.0/24"]))
    too_small, _ = stow_node(max_request_mb=1, storage=shut_out.storage)
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
