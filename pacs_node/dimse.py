"""The DICOM Upper Layer and DIMSE wire format the node reads and writes.

PDU types (PS3.8 9.3.1), A-ASSOCIATE-RJ codes (PS3.8 Table 9-21), the DIMSE
command fields and elements used (PS3.7 9.3, E.1), every status the node
sends or reads (:class:`Status`, citing where the standard defines it), the
command-set codec (Implicit VR Little Endian, group 0000; its UIDs checked by the
node's one UID policy, :func:`pacs_node.layout.uid_name`), the one walker of
little-endian data elements (the command sets here, the received data sets'
first bytes in :mod:`pacs_node.header`) and the Part-10 file meta header of
a received instance. No networking: :mod:`pacs_node.scp` uses these.
"""

from __future__ import annotations

import enum
import struct
from typing import Iterator

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from pacs_node.layout import UIDRefused, uid_name

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ_PDU, A_RELEASE_RQ_PDU, A_ABORT_PDU, P_DATA_TF_PDU = 0x01, 0x05, 0x07, 0x04
# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
# Command elements, group 0000 (PS3.7 E.1)
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID = 0x0002, 0x0100, 0x0110
COMMAND_DATA_SET_TYPE, STATUS, AFFECTED_SOP_INSTANCE = 0x0800, 0x0900, 0x1000
NO_DATA_SET = 0x0101                     # Command Data Set Type: no data set follows


class Status(enum.IntEnum):
    """The DIMSE statuses the node sends (C-STORE, C-ECHO) or reads (its deliveries);
    STOW-RS reuses them as Failure Reasons (PS3.18 Table I.2-2)."""

    SUCCESS = 0x0000                     # PS3.7 C.1.1
    COERCION_OF_DATA_ELEMENTS = 0xB000   # warning, PS3.4 Table GG.4-1 (Storage)
    ELEMENTS_DISCARDED = 0xB006          # warning, PS3.4 Table GG.4-1
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007   # warning, PS3.4 Table GG.4-1
    PROCESSING_FAILURE = 0x0110          # PS3.7 C.5.21
    DUPLICATE_SOP_INSTANCE = 0x0111      # PS3.7 C.5 (a SOP Instance UID in use elsewhere)
    SOP_CLASS_NOT_SUPPORTED = 0x0122     # PS3.7 C.5, "Refused: SOP Class Not Supported"
                                         # (here: not on the presentation context it came on)
    OUT_OF_RESOURCES = 0xA700            # PS3.4 Table GG.4-1 (Refused: Out of Resources)
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900           # PS3.4 Table GG.4-1
    CANNOT_UNDERSTAND = 0xC000           # PS3.4 Table GG.4-1 (Error: Cannot understand)
    STUDY_MISMATCH = 0xC409              # implementation-specific (C0xx-CFxx): STOW-RS only,
                                         # the instance is not of the study the URL names


#: A C-STORE answered with one of these stored the instance (PS3.4 GG.4.2).
STORED = frozenset({Status.SUCCESS, Status.COERCION_OF_DATA_ELEMENTS,
                    Status.ELEMENTS_DISCARDED, Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING})
OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
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


#: Explicit VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
UNDEFINED_LENGTH = 0xFFFFFFFF
_TAG_LENGTH = struct.Struct("<HHL")
_TAG_VR_LENGTH = struct.Struct("<HH2sH")


def iter_elements(data: bytes | memoryview, implicit_vr: bool
                  ) -> Iterator[tuple[int, int, int]]:
    """(tag, value offset, value length) of each top-level little-endian data element.

    Stops where the bytes end, or where an element's header is cut short; the
    length may be ``UNDEFINED_LENGTH`` or run past the bytes: the caller
    decides (the walker never reads a value, so nothing is allocated).
    """
    pos, end = 0, len(data)
    while pos + 8 <= end:
        if implicit_vr:
            group, element, length = _TAG_LENGTH.unpack_from(data, pos)
            pos += 8
        else:
            group, element, vr, length = _TAG_VR_LENGTH.unpack_from(data, pos)
            pos += 8
            if vr in LONG_VRS:
                if pos + 4 > end:
                    return
                length = struct.unpack_from("<L", data, pos)[0]
                pos += 4
        yield group << 16 | element, pos, length
        if length == UNDEFINED_LENGTH:
            return
        pos += length


def parse_command(data: bytes) -> dict[int, bytes]:
    """A DIMSE command set (Implicit VR Little Endian, group 0000): element -> value.

    An element given twice is a :class:`ProtocolError` (PS3.5 7.1: at most once): which
    of two Affected SOP Instance UIDs would the node file, and which would a proxy in
    front of it have checked? Elements out of order are read (nothing is ambiguous)."""
    out, end = {}, 0
    for tag, pos, length in iter_elements(data, implicit_vr=True):
        if tag >> 16 != 0x0000:
            raise ProtocolError(f"command set holds group {tag >> 16:04X}")
        if pos + length > len(data):
            raise ProtocolError("a command element runs past the command set")
        if tag in out:
            raise ProtocolError(f"command element (0000,{tag:04X}) given twice")
        out[tag & 0xFFFF] = bytes(data[pos:pos + length])
        end = pos + length
    if end != len(data):
        raise ProtocolError("the command set ends inside an element")
    return out


def command_number(command: dict[int, bytes], element: int) -> int:
    """An unsigned short of a parsed command set (0 when missing or short)."""
    return struct.unpack("<H", command.get(element, b"")[:2].ljust(2, b"\0"))[0]


def text_value(value: bytes) -> str:
    """A text or UID value as the node reads it, a command's or a data set's: trailing NULs
    and spaces on either side are padding (as pydicom reads a UID); bytes that are not
    ASCII become U+FFFD (a UID the node refuses)."""
    return value.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")


def command_uid(cmd: dict[int, bytes], element: int, what: str) -> tuple[str, str]:
    """A UID of a command set, and why the node refuses it ("" when it does not: missing,
    not printable ASCII, too long: :func:`pacs_node.layout.uid_name`)."""
    uid = text_value(cmd.get(element, b""))
    try:
        uid_name(uid, f"the command's {what}")
    except UIDRefused as exc:
        return uid, str(exc)
    return uid, ""


def encode_response(command_field: int, message_id: int, sop_class: str | None, status: int,
                    sop_instance: str | None = None) -> bytes:
    """A response command set (PS3.7 9.3), group length first; the Affected SOP Class and
    Instance UIDs (optional in a response: U(=)) left out when None or empty."""
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0x0000, tag, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\x00" * (len(raw) % 2)

    body = element(AFFECTED_SOP_CLASS, uid(sop_class)) if sop_class else b""
    body += element(COMMAND_FIELD, struct.pack("<H", command_field))
    body += element(0x0120, struct.pack("<H", message_id))   # Message ID Being Responded To
    body += element(COMMAND_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET))
    body += element(STATUS, struct.pack("<H", status))
    if sop_instance:
        body += element(AFFECTED_SOP_INSTANCE, uid(sop_instance))
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
            + element(0x0002, b"UI", text(text_value(cmd.get(AFFECTED_SOP_CLASS, b"")), b"\x00"))
            + element(0x0003, b"UI", text(text_value(cmd.get(AFFECTED_SOP_INSTANCE, b"")), b"\x00"))
            + element(0x0010, b"UI", text(transfer_syntax, b"\x00"))
            + element(0x0012, b"UI", text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"))
            + element(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))
    if calling:
        body += element(0x0016, b"AE", text(calling[:16], b" "))
    return (b"\x00" * 128 + b"DICM" + element(0x0000, b"UL", struct.pack("<L", len(body)))
            + body)
