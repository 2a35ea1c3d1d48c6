"""A raw DICOM peer for the front-door tests: PDUs built and read byte by byte (PS3.8 9.3),
so that a test can play the peers DCMTK and pynetdicom never would (tricklers, liars
about lengths, senders of garbage), and the good clients that must still be served."""

from __future__ import annotations

import os
import socket
import struct
import subprocess

from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage, Verification

from conftest import require_tool

ENV = {**os.environ, "TCP_NODELAY": "1"}
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
VERIFICATION_ID, CT_ID = 1, 3            # presentation context ids the raw peers propose
SC_ID = 5                                 # ... and Secondary Capture, when asked for


# --- PDUs (PS3.8 9.3) ----------------------------------------------------------------------
def associate_rq(calling: str = "CT1", called: str = "LUNGSYS",
                 application_context: str = APPLICATION_CONTEXT, user_items=(),
                 secondary_capture: bool = False, ct_syntax: str = EXPLICIT) -> bytes:
    """A valid A-ASSOCIATE-RQ (Verification as context 1, CT Image Storage as 3, Secondary
    Capture as 5 when ``secondary_capture``), by pynetdicom; ``user_items``: more user
    information sub-items (a user identity); ``ct_syntax``: CT's one transfer syntax."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    contexts = []
    proposed = [(VERIFICATION_ID, (Verification, IMPLICIT)), (CT_ID, (CTImageStorage, ct_syntax))]
    if secondary_capture:
        proposed.append((SC_ID, (SecondaryCaptureImageStorage, EXPLICIT)))
    for context_id, (abstract, syntax) in proposed:
        cx = build_context(abstract, [syntax])
        cx.context_id = context_id
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.9999.1"
    primitive.user_information = [max_length, class_uid, *user_items]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def pdu_items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(offset, type, length) of the items (and sub-items) of an A-ASSOCIATE-RQ/AC."""
    out, pos = [], start
    while pos + 4 <= end:
        item_type, length = data[pos], struct.unpack_from(">H", data, pos + 2)[0]
        out.append((pos, item_type, length))
        if item_type in (0x20, 0x21):       # presentation context: its sub-items
            out += pdu_items(data, pos + 8, pos + 4 + length)
        elif item_type == 0x50:             # user information: its sub-items
            out += pdu_items(data, pos + 4, pos + 4 + length)
        pos += 4 + length
    return out


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def command(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, Implicit VR Little Endian), group length first."""
    body = b"".join(struct.pack("<HHL", 0, tag, len(v)) + v for tag, v in elements)
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _ui(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\x00" * (len(raw) % 2)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command([(0x0002, _ui(sop_class)), (0x0100, struct.pack("<H", 0x0001)),
                    (0x0110, struct.pack("<H", message_id)), (0x0700, b"\x00\x00"),
                    (0x0800, struct.pack("<H", 0x0000)), (0x1000, _ui(sop_instance))])


def c_echo_rq(message_id: int = 1) -> bytes:
    return command([(0x0002, _ui(Verification)), (0x0100, struct.pack("<H", 0x0030)),
                    (0x0110, struct.pack("<H", message_id)),
                    (0x0800, struct.pack("<H", 0x0101))])


ABORT = struct.pack(">BBL", 0x07, 0, 4) + b"\x00\x00\x00\x00"
RELEASE_RQ = struct.pack(">BBL", 0x05, 0, 4) + b"\x00\x00\x00\x00"


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_pdu(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body); None when the server closed (FIN or RST).
    socket.timeout (TimeoutError) when nothing came within ``timeout``."""
    sock.settimeout(timeout)
    try:
        head = _recv_exact(sock, 6)
        if head is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", head)
        body = _recv_exact(sock, length)
        return None if body is None else (pdu_type, body)
    except (ConnectionResetError, BrokenPipeError):
        return None


def ending(sock: socket.socket, within: float) -> str:
    """What the server did within ``within`` s: 'abort', 'closed', 'open' (nothing came)
    or 'pdu 0xNN'."""
    try:
        pdu = read_pdu(sock, within)
    except TimeoutError:
        return "open"
    if pdu is None:
        return "closed"
    if pdu[0] == 0x07:
        return "abort"
    return f"pdu {pdu[0]:#04x}"


def associate(sock: socket.socket, rq: bytes | None = None) -> dict:
    """Send an A-ASSOCIATE-RQ and expect an AC: {'contexts': {id: result}, 'max_pdu': n}."""
    sock.sendall(rq or associate_rq())
    pdu = read_pdu(sock)
    assert pdu is not None and pdu[0] == 0x02, f"no A-ASSOCIATE-AC: {pdu!r}"
    data = struct.pack(">BBL", 0x02, 0, len(pdu[1])) + pdu[1]
    out = {"contexts": {}, "max_pdu": None}
    for pos, item_type, _ in pdu_items(data, 74, len(data)):
        if item_type == 0x21:
            out["contexts"][data[pos + 4]] = data[pos + 6]
        elif item_type == 0x51:
            out["max_pdu"] = struct.unpack_from(">L", data, pos + 4)[0]
    return out


def rejection(sock: socket.socket, rq: bytes) -> tuple[int, int, int] | str:
    """(result, source, reason) of the A-ASSOCIATE-RJ the RQ gets, or what came instead."""
    sock.sendall(rq)
    pdu = read_pdu(sock)
    if pdu is None:
        return "closed"
    if pdu[0] != 0x03:
        return f"pdu {pdu[0]:#04x}"
    return pdu[1][1], pdu[1][2], pdu[1][3]   # PS3.8 9.3.4: reserved, result, source, reason


def status_of(sock: socket.socket) -> int:
    """The Status (0000,0900) of the next DIMSE response."""
    pdu = read_pdu(sock, 10)
    assert pdu is not None and pdu[0] == 0x04, f"no response: {pdu!r}"
    raw = pdu[1][6:]
    pos = 0
    while pos + 8 <= len(raw):
        _, element, length = struct.unpack_from("<HHL", raw, pos)
        if element == 0x0900:
            return struct.unpack_from("<H", raw, pos + 8)[0]
        pos += 8 + length
    raise AssertionError("the response has no Status")


def store_raw(port: int, sop_class: str, sop_instance: str, body: bytes) -> int:
    """A C-STORE of ``body`` (a data set's bytes, whatever they hold) on an association
    of its own, in PDUs of 16 KiB: the status the node answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        associate(s)
        s.sendall(p_data(CT_ID, 0x03, c_store_rq(sop_class, sop_instance)))
        for at in range(0, len(body), 16000):
            last = at + 16000 >= len(body)
            s.sendall(p_data(CT_ID, 0x02 if last else 0x00, body[at:at + 16000]))
        return status_of(s)


def data_set(path) -> bytes:
    """The data set of a Part-10 file as it would be sent (after the File Meta Information)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + struct.unpack_from("<L", raw, 140)[0]:]


# --- good clients ---------------------------------------------------------------------------
def pynetdicom_echo(port: int, source: str) -> int | None:
    """C-ECHO from ``source`` by pynetdicom: the status, None when not associated."""
    ae = AE(ae_title="CT1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGSYS", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def echoscu(port: int) -> int:
    return subprocess.run([require_tool("echoscu"), "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port)], capture_output=True, env=ENV,
                          timeout=30).returncode
