"""The STOW-RS receiver against hostile senders: UIDs made to escape its folders, a job
store deleted under it, a body trickled byte by byte, a flood of headers, what its
parser cannot read, and thousands of tiny broken parts. Over loopback against an
in-process :class:`StowServer` (``stow_client``); asserted is what an admin would check:
the HTTP status each sender got, what the job store holds, which files lie where, and
that memory stays flat."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import time
import tracemalloc
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from pacs_node.storage import (CANNOT_UNDERSTAND, INCIDENTS_PER_MINUTE, OUT_OF_RESOURCES,
                               STUDY_MISMATCH)
from pacs_node.stow import MAX_FAILED_PARTS

from conftest import wait_for
from stow_client import (DEADLINE, dataset, dcm_files, encode, hostile_writing, instance,
                         multipart, partial_files, post, post_one, raw_head,
                         read_until_closed, recorded, status_of, store_response)

# --- 1. hostile UIDs ------------------------------------------------------------------------
_HASHED = re.compile(r"_[0-9a-f]{40}")
_CONFORMANT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def test_hostile_uids_never_leave_the_incoming_folder(stow_node, tmp_path):
    evil = Path("/tmp/evil")
    evil_before = evil.exists()
    parent_before = set(os.listdir(tmp_path.parent))
    server, store = stow_node()
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


# --- 2. the job store gone ------------------------------------------------------------------
def test_a_job_store_deleted_under_the_receiver_acknowledges_nothing(stow_node, tmp_path):
    server, store = stow_node()
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


# --- 3. a trickled body, a flood of headers ---------------------------------------------
def test_a_trickled_body_ends_and_gives_back_its_disk(stow_node):
    """A byte every 0.3 s: no piece waits IDLE_SECONDS, but the body is far below the
    minimum rate: the request ends (408), the connection closes. Disk is reserved as the
    body comes, not for its Content-Length (the client's word: 23 such requests announcing
    gigabytes had held the disk, and the modalities' C-STOREs were answered 0xA700)."""
    server, store = stow_node()
    length = 8 * 1024 * 1024
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(raw_head(length, 'multipart/related; type="application/dicom"; boundary=b'))
    start, answer = time.monotonic(), b""
    assert wait_for(lambda: server.gate.open == 1)
    time.sleep(0.5)
    assert server.storage._reserved == 0 and server.storage.has_room(2 * length)
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


def test_a_flood_of_headers_is_refused_with_memory_flat(stow_node):
    """A megabyte of header lines is refused at the head limit (h11: 64 KiB), not held."""
    server, _ = stow_node()
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


def test_what_the_parser_cannot_read_is_answered_in_json(stow_node):
    """A request h11 cannot parse gets 400 with a JSON error (like every other answer),
    the connection closes, and the receiver goes on."""
    server, _ = stow_node()
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


# --- 6. many tiny broken parts -------------------------------------------------------------
def test_a_request_of_thousands_of_broken_parts_is_cut_after_a_hundred(stow_node, caplog):
    """Each broken part costs a log line, an incident and a response item, and can be a few
    bytes long: a request stops being read after MAX_FAILED_PARTS of them (a sender once
    took a node to 40,000 log lines, 10,000 incidents and 17 s of CPU with 3 MB)."""
    server, store = stow_node()
    good, ds = instance()
    body, ctype = multipart([("application/dicom", good)]
                            + [("application/dicom", b"not DICOM %d" % i) for i in range(5000)])
    status, _, answer = post(server.port, body, ctype)
    assert status == 202
    response = store_response(answer)
    assert [i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence] == [
        ds.SOPInstanceUID]
    assert [i.FailureReason for i in response.FailedSOPSequence] == (
        [CANNOT_UNDERSTAND] * (MAX_FAILED_PARTS + 1))       # and one: the rest was not read
    assert len(store.incidents(limit=10_000)) == min(MAX_FAILED_PARTS, INCIDENTS_PER_MINUTE)
    assert "a STOW-RS request was cut after 100 failed parts" in caplog.text
    assert sum("cannot be understood" in r.getMessage()
               for r in caplog.records) == MAX_FAILED_PARTS
    assert not partial_files(server.storage)

    # exactly MAX_FAILED_PARTS broken parts: each answered, nothing cut
    body, ctype = multipart([("application/dicom", b"not DICOM")] * MAX_FAILED_PARTS)
    status, _, answer = post(server.port, body, ctype)
    assert status == 409
    assert len(store_response(answer).FailedSOPSequence) == MAX_FAILED_PARTS
