"""The DICOM Upper Layer and DIMSE wire format the Storage SCP reads and writes.

PDU types (PS3.8 9.3.1), A-ASSOCIATE-RJ codes (PS3.8 Table 9-21), the DIMSE
command fields and statuses used (PS3.7 9.3, Annex C), the command-set codec
(Implicit VR Little Endian, group 0000) and the Part-10 file meta header of
a received instance. No networking: :mod:`pacs_node.scp` uses these.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ_PDU, A_RELEASE_RQ_PDU, A_ABORT_PDU, P_DATA_TF_PDU = 0x01, 0x05, 0x07, 0x04
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
OUT_OF_RESOURCES = 0xA700
# A-ASSOCIATE-RJ (result, source, reason) (PS3.8 Table 9-21)
RJ_NO_REASON = (0x01, 0x01, 0x01)
RJ_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
RJ_CALLING_AE = (0x01, 0x01, 0x03)
RJ_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
RJ_USER_IDENTITY = (0x01, 0x02, 0x01)   # PS3.7 D.3.3.7: permanent, ACSE related function
RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)
_PDU_HEADER = struct.Struct(">BBL")


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


def parse_command(data: bytes) -> dict[int, bytes]:
    """A DIMSE command set (Implicit VR Little Endian, group 0000): element -> value."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, pos)
        if group != 0x0000:
            raise ProtocolError(f"command set holds group {group:04X}")
        if pos + 8 + length > len(data):
            raise ProtocolError("a command element runs past the command set")
        out[element] = bytes(data[pos + 8:pos + 8 + length])
        pos += 8 + length
    if pos != len(data):
        raise ProtocolError("the command set ends inside an element")
    return out


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def encode_response(command_field: int, message_id: int, sop_class: str, status: int,
                    sop_instance: str | None = None) -> bytes:
    """A response command set (PS3.7 9.3), group length first."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, tag, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\x00" * (len(raw) % 2)

    body = element(0x0002, uid(sop_class)) + element(0x0100, struct.pack("<H", command_field))
    body += element(0x0120, struct.pack("<H", message_id))
    body += element(0x0800, struct.pack("<H", NO_DATA_SET))
    body += element(0x0900, struct.pack("<H", status))
    if sop_instance:
        body += element(0x1000, uid(sop_instance))
    return element(0x0000, struct.pack("<L", len(body))) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding one whole command (message control header 0x03)."""
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return _PDU_HEADER.pack(0x04, 0, len(pdv)) + pdv


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    return _PDU_HEADER.pack(0x07, 0, 4) + bytes([0, 0, source, reason])


RELEASE_RP = _PDU_HEADER.pack(0x06, 0, 4) + b"\x00\x00\x00\x00"


def _file_header(cmd: dict[int, bytes], transfer_syntax: str, calling: str) -> bytes:
    """The Part-10 preamble and File Meta Information (PS3.10 7.1) of an instance.

    Encoded here, not with pydicom's ``write_file_meta_info``: that costs
    about as much as the rest of a C-STORE, and these eight Explicit VR
    Little Endian elements never change shape (a test checks the bytes
    against pydicom's).
    """
    def element(number: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sxxL", 0x0002, number, vr, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, number, vr, len(value)) + value

    def text(value: str, pad: bytes) -> bytes:
        raw = value.encode("ascii")
        return raw + pad * (len(raw) % 2)

    body = (element(0x0001, b"OB", b"\x00\x01")
            + element(0x0002, b"UI", text(_uid(cmd.get(0x0002, b"")), b"\x00"))
            + element(0x0003, b"UI", text(_uid(cmd.get(0x1000, b"")), b"\x00"))
            + element(0x0010, b"UI", text(transfer_syntax, b"\x00"))
            + element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + element(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))
    if calling:
        body += element(0x0016, b"AE", text(calling[:16], b" "))
    return (b"\x00" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<L", len(body)))
            + body)
