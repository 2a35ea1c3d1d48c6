"""A lean DICOM Storage SCP: one thread per association, blocking reads, no polling.

pynetdicom negotiates: the A-ASSOCIATE-RQ is decoded by its PDU classes, the
presentation contexts and SCP/SCU roles are negotiated by
``pynetdicom.presentation.negotiate_as_acceptor``, and the A-ASSOCIATE-AC/RJ
are encoded by its PDU classes, so that what the node accepts is exactly
what a pynetdicom AE with the same contexts would accept. The data phase is
done here, because pynetdicom's reactor costs more per instance than the
node's whole budget: its DUL and association threads hand every PDU over
through queues and poll with 1 ms sleeps, so a pynetdicom SCP that only
writes bytes takes about 4-5 ms per 512x512 CT image (165-240 images/s on
a 2-core machine) where DCMTK's storescp takes 1.3-2 ms. Here each
association's thread reads whole PDUs with ``recv_into``, streams the data
set's fragments straight into a temporary file (no reassembly in memory),
and answers each C-STORE as soon as the instance is stored.

The DIMSE commands handled are C-ECHO and C-STORE (the only services
negotiated); the command sets are the small, fixed Implicit VR Little Endian
group 0000 of PS3.7 9.3, parsed and written here. Anything else, or a broken
PDU, aborts the association (A-ABORT). Timeouts: 30 s for the association
request (ARTIM), ``timeout`` seconds without data afterwards.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
ARTIM_SECONDS = 30.0
#: The largest PDU the node accepts (the PDUs it receives may be this long).
MAX_PDU = 1 << 20

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATA_SET = 0x0101
_PDU_HEADER = struct.Struct(">BBL")


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted."""


#: store(temp file with the Part-10 instance, calling AE title, transfer syntax,
#: the data set's first fragment) -> status.
StoreCallback = Callable[[Path, str, str, bytes], int]


def parse_command(data: bytes) -> dict[int, bytes]:
    """A DIMSE command set (Implicit VR Little Endian, group 0000): element -> value."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, pos)
        if group != 0x0000:
            raise ProtocolError(f"command set holds group {group:04X}")
        out[element] = bytes(data[pos + 8:pos + 8 + length])
        pos += 8 + length
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


@dataclass
class _Message:
    """The C-STORE (or C-ECHO) being received on an association."""

    context_id: int
    command: dict[int, bytes]
    file: BinaryIO | None = None
    path: Path | None = None
    start: bytes = b""          # the data set's first fragment (its header, usually)
    discard: bool = False


class StorageSCP:
    """Accepts associations and C-STOREs; ``store`` decides each instance's status.

    ``temp_file()`` gives a new temporary path beside the received instances;
    ``has_room()`` says whether there is disk for one more (else 0xA700).
    """

    def __init__(self, ae_title: str, contexts: list[PresentationContext],
                 store: StoreCallback, temp_file: Callable[[], Path],
                 has_room: Callable[[], bool], allowed_calling_aets: list[str] | None = None,
                 max_associations: int = 16, timeout: float = 60.0) -> None:
        self.ae_title = ae_title
        self.contexts = contexts
        self.store = store
        self.temp_file = temp_file
        self.has_room = has_room
        self.allowed = [a.strip() for a in allowed_calling_aets or []]
        self.max_associations = max_associations
        self.timeout = timeout
        self._listener: socket.socket | None = None
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # --- life cycle ----------------------------------------------------------
    def start(self, host: str, port: int) -> None:
        sock = socket.create_server((host, port), reuse_port=False, backlog=64)
        self._listener = sock
        self._stopping.clear()
        threading.Thread(target=self._accept_loop, name="lungsys-scp", daemon=True).start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else 0

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set() and listener is not None:
            try:
                conn, address = listener.accept()
            except OSError:
                return  # the listener was closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, address),
                             name=f"lungsys-assoc-{address[0]}:{address[1]}",
                             daemon=True).start()

    # --- one association -----------------------------------------------------
    def _serve(self, conn: socket.socket, address) -> None:
        with self._lock:
            self._active += 1
            busy = self._active > self.max_associations
        calling = "?"
        try:
            conn.settimeout(ARTIM_SECONDS)
            pdu_type, body = _read_pdu(conn)
            if pdu_type != 0x01:
                raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type:#x}")
            rq = A_ASSOCIATE_RQ()
            rq.decode(_PDU_HEADER.pack(0x01, 0, len(body)) + body)
            request = rq.to_primitive()
            calling = str(request.calling_ae_title).strip()
            accepted = self._associate(conn, request, busy)
            if accepted is None:
                return
            log.info("association from %s (%s) accepted", calling, address[0])
            conn.settimeout(self.timeout)
            self._data_phase(conn, calling, accepted)
        except (ProtocolError, ValueError, struct.error) as exc:
            log.warning("association from %s aborted: %s", calling, exc)
            _send_quietly(conn, abort_pdu())
        except (OSError, TimeoutError) as exc:
            log.warning("association from %s ended: %s", calling, exc)
        finally:
            conn.close()
            with self._lock:
                self._active -= 1

    def _associate(self, conn: socket.socket, request: A_ASSOCIATE, busy: bool
                   ) -> dict[int, str] | None:
        """Accept (the accepted contexts: id -> transfer syntax) or reject (None)."""
        reject = None
        if self.allowed and str(request.calling_ae_title).strip() not in self.allowed:
            reject = (0x01, 0x01, 0x03)            # calling AE title not recognised
        elif busy:
            reject = (0x02, 0x03, 0x02)            # local limit exceeded
        if reject is not None:
            primitive = A_ASSOCIATE()
            primitive.result, primitive.result_source, primitive.diagnostic = reject
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(primitive)
            conn.sendall(rj.encode())
            log.warning("association from %s rejected (%s)", request.calling_ae_title,
                        "not on the allow-list" if reject[2] == 0x03 else "too many at once")
            return None
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                 for item in request.user_information
                 if type(item).__name__ == "SCP_SCU_RoleSelectionNegotiation"}
        results, ac_roles = negotiate_as_acceptor(
            request.presentation_context_definition_list, self.contexts, roles)
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = MAX_PDU
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT
        primitive.calling_ae_title = request.calling_ae_title
        primitive.called_ae_title = request.called_ae_title
        primitive.result, primitive.result_source = 0x00, 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = [max_length, class_uid, version, *ac_roles]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        conn.sendall(ac.encode())
        return {cx.context_id: str(cx.transfer_syntax[0]) for cx in results if cx.result == 0}

    def _data_phase(self, conn: socket.socket, calling: str, contexts: dict[int, str]) -> None:
        command = bytearray()
        message: _Message | None = None
        while True:
            pdu_type, body = _read_pdu(conn)
            if pdu_type == 0x05:                   # A-RELEASE-RQ
                conn.sendall(RELEASE_RP)
                return
            if pdu_type == 0x07:                   # A-ABORT
                log.warning("association from %s aborted by the peer", calling)
                self._drop(message)
                return
            if pdu_type != 0x04:
                raise ProtocolError(f"unexpected PDU type {pdu_type:#x}")
            view, pos = memoryview(body), 0
            while pos < len(view):
                length, context_id, control = struct.unpack_from(">LBB", view, pos)
                fragment = view[pos + 6:pos + 4 + length]
                pos += 4 + length
                if context_id not in contexts:
                    raise ProtocolError(f"presentation context {context_id} not accepted")
                if control & 0x01:                 # command fragment
                    command += fragment
                    if control & 0x02:
                        message = self._command(conn, bytes(command), context_id,
                                                contexts, calling)
                        command.clear()
                    continue
                if message is None:
                    raise ProtocolError("a data set arrived without its command")
                self._write(message, fragment, calling, contexts[message.context_id])
                if control & 0x02:                 # the data set's last fragment
                    self._finish(conn, message, calling, contexts[message.context_id])
                    message = None

    def _command(self, conn, raw: bytes, context_id: int, contexts, calling: str
                 ) -> _Message | None:
        cmd = parse_command(raw)
        field_ = struct.unpack("<H", cmd.get(0x0100, b"\x00\x00"))[0]
        message_id = struct.unpack("<H", cmd.get(0x0110, b"\x00\x00"))[0]
        if field_ == C_ECHO_RQ:
            rsp = encode_response(C_ECHO_RSP, message_id, _uid(cmd.get(0x0002, b"")), 0x0000)
            conn.sendall(p_data(context_id, rsp))
            return None
        if field_ != C_STORE_RQ:
            raise ProtocolError(f"DIMSE command {field_:#06x} is not supported")
        message = _Message(context_id, cmd)
        if not self.has_room():
            log.error("refusing C-STORE from %s: free disk below the configured minimum",
                      calling)
            message.discard = True
        return message

    def _write(self, message: _Message, fragment: memoryview, calling: str,
               transfer_syntax: str) -> None:
        if message.discard:
            return
        if message.file is None:
            message.path = self.temp_file()
            message.file = open(message.path, "wb")
            message.file.write(_file_header(message.command, transfer_syntax, calling))
            message.start = bytes(fragment)
        message.file.write(fragment)

    def _finish(self, conn, message: _Message, calling: str, transfer_syntax: str) -> None:
        cmd = message.command
        sop_class, sop_instance = _uid(cmd.get(0x0002, b"")), _uid(cmd.get(0x1000, b""))
        message_id = struct.unpack("<H", cmd.get(0x0110, b"\x00\x00"))[0]
        if message.discard:
            status = 0xA700
        else:
            assert message.file is not None and message.path is not None
            message.file.close()
            message.file = None
            status = self.store(message.path, calling, transfer_syntax, message.start)
        conn.sendall(p_data(message.context_id, encode_response(
            C_STORE_RSP, message_id, sop_class, status, sop_instance)))

    @staticmethod
    def _drop(message: _Message | None) -> None:
        if message is not None and message.file is not None:
            message.file.close()
            if message.path is not None:
                message.path.unlink(missing_ok=True)


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


def _read_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise OSError("the peer closed the connection")
        got += k
    return buf


def _read_pdu(conn: socket.socket) -> tuple[int, bytearray]:
    pdu_type, _, length = _PDU_HEADER.unpack(_read_exact(conn, 6))
    if length > MAX_PDU + 6 and pdu_type == 0x04:
        raise ProtocolError(f"P-DATA-TF of {length} bytes, above the {MAX_PDU} negotiated")
    if length > 1 << 24:
        raise ProtocolError(f"PDU of {length} bytes")
    return pdu_type, _read_exact(conn, length)


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass
