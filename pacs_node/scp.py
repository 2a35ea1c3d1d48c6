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
group 0000 of PS3.7 9.3, parsed and written here.

Every byte is the peer's until checked (the front door; the association is
established by :mod:`pacs_node.acse`):

- a connection must pass the :class:`~pacs_node.peers.PeerGate` (allowed
  networks; at most so many connections not yet associated, in all and per
  address), else it is closed at once; associations are counted apart
  (``max_associations``, ``max_associations_per_peer`` of them from one address:
  more are rejected, transient, local limit exceeded);
- the TLS handshake (DICOM TLS, when configured) and the whole A-ASSOCIATE-RQ
  must arrive within ``ARTIM_SECONDS``, every later PDU within ``timeout``
  seconds of its first byte, and no PDU may be awaited longer than
  ``timeout``: deadlines, not per-read timeouts, so a peer trickling a byte
  at a time cannot hold a place; nor can one sending a PDU of one byte just
  within each timeout: a message (command and data set) must come at
  ``MIN_RATE`` on average after its first ``timeout`` seconds;
- a PDU's announced length is checked before anything is allocated: an
  A-ASSOCIATE-RQ up to ``MAX_ASSOCIATE_RQ``, a P-DATA-TF up to the
  ``MAX_PDU`` the node announced, every other PDU its fixed size; command
  sets up to ``MAX_COMMAND``; a data set only while the disk has room;
- an A-ASSOCIATE-RQ that pynetdicom cannot decode, or any other broken PDU,
  is answered with an A-ABORT and one log line; an unknown application
  context or protocol version, a calling AE title not on the allow-list or a
  user identity that does not check out is rejected (PS3.8 Table 9-21);
- a C-STORE whose Affected SOP Class or Instance UID is missing, not printable
  ASCII or longer than 64 characters is answered 0xC000 (Cannot Understand;
  the response leaves out what is not a UID), one whose SOP Class is not the
  abstract syntax of the presentation context it came on 0x0122 (SOP Class
  Not Supported); its data set is read and dropped, the refusal told to
  ``refused`` (and so is a C-STORE of the Verification SOP Class, which is
  C-ECHO's alone: PS3.4 A); a C-ECHO is answered 0x0122 for either; a C-STORE-RQ that says
  no data set follows ends the association with an A-ABORT;
- a data set cut short, however the association ends, leaves no file.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from pacs_node.acse import (MAX_PDU, Acceptor, Authenticator, Context,  # noqa: F401
                            Rejected, _read_exact, _read_header)
from pacs_node.dimse import (A_ABORT_PDU, A_RELEASE_RQ_PDU, AFFECTED_SOP_CLASS,
                             AFFECTED_SOP_INSTANCE, C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ,
                             C_STORE_RSP, COMMAND_DATA_SET_TYPE, COMMAND_FIELD, MESSAGE_ID,
                             NO_DATA_SET, OUT_OF_RESOURCES, P_DATA_TF_PDU, RELEASE_RP,
                             ProtocolError, Status, _file_header, abort_pdu,  # noqa: F401
                             command_number, command_uid, encode_response, p_data,
                             parse_command)
from pacs_node.peers import PeerGate

log = logging.getLogger(__name__)

#: The whole TLS handshake and A-ASSOCIATE-RQ must arrive within this (PS3.8 9.1.5 ARTIM).
ARTIM_SECONDS = 30.0
#: The largest DIMSE command set (a C-STORE-RQ takes a few hundred bytes).
MAX_COMMAND = 16 << 10
#: While a data set streams in, the free disk is looked at again every this many bytes.
DISK_CHECK_BYTES = 64 << 20
#: A message must come at this many bytes a second on average after its first ``timeout``
#: seconds (64 KiB/s: half a megabit; a CT image's message is whole within the first
#: minute on any link). Four associations each sent a byte every 15 s for as long as
#: they liked, and every other sender was rejected meanwhile (local limit exceeded).
MIN_RATE = 64 << 10

#: store(temp file with the Part-10 instance, calling AE title, transfer syntax, the data
#: set's first fragment, the command's (SOP Class UID, SOP Instance UID)) -> status.
StoreCallback = Callable[[Path, str, str, bytes, tuple[str, str]], int]
#: refused(calling AE title, why, the command's SOP Instance UID): a C-STORE refused before
#: its data set reached ``store`` (an incident, for the admin).
RefusedCallback = Callable[[str, str, str], None]


@dataclass
class _Message:
    """The C-STORE (or C-ECHO) being received on an association."""

    context_id: int
    command: dict[int, bytes]
    sop_class: str | None = None       # the command's UIDs, checked once: None when not
    sop_instance: str | None = None    # a UID (then left out of the response)
    file: BinaryIO | None = None
    path: Path | None = None
    start: bytes = b""          # the data set's first fragment (its header, usually)
    discard: bool = False       # read the data set to its end, store nothing, answer ...
    refusal: int = OUT_OF_RESOURCES                  # ... this
    written: int = 0
    next_disk_check: int = DISK_CHECK_BYTES


@dataclass
class _Association:
    """What one association's thread knows."""

    address: str
    calling: str = "?"
    contexts: dict[int, Context] = field(default_factory=dict)   # the accepted, by id
    message: _Message | None = None
    since: float | None = None        # when the message under way began (its command)
    received: int = 0                 # and its bytes so far


class StorageSCP:
    """Accepts associations and C-STOREs; ``store`` decides each instance's status.

    ``temp_file()`` gives a new temporary path beside the received instances;
    ``has_room()`` says whether there is disk for one more (else 0xA700);
    ``gate`` admits connections (see :mod:`pacs_node.peers`); ``tls``, a
    server-side SSL context, makes every connection DICOM TLS;
    ``authenticate`` checks the user identity (see :data:`Authenticator`); ``refused``
    is told of each C-STORE refused before its data set is read (see
    :data:`RefusedCallback`).
    """

    def __init__(self, ae_title: str, contexts: list[PresentationContext],
                 store: StoreCallback, temp_file: Callable[[], Path],
                 has_room: Callable[[], bool], allowed_calling_aets: list[str] | None = None,
                 max_associations: int = 16, timeout: float = 60.0,
                 gate: PeerGate | None = None, tls: ssl.SSLContext | None = None,
                 authenticate: Authenticator | None = None,
                 refused: RefusedCallback | None = None,
                 max_associations_per_peer: int | None = None) -> None:
        self.ae_title = ae_title
        self.store = store
        self.refused = refused
        self.temp_file = temp_file
        self.has_room = has_room
        self.timeout = timeout
        self.gate = gate or PeerGate(max_total=2 * max_associations, max_per_peer=8)
        # AE titles: leading and trailing spaces are not significant (PS3.5 6.2, PS3.8 9.3.2)
        allowed = {a.strip() for a in allowed_calling_aets or []}
        self.acceptor = Acceptor(contexts, allowed, tls, authenticate)
        self._listener: socket.socket | None = None
        #: the association places: so many at once, so many of them from one address
        self.places = PeerGate(max_total=max_associations,
                               max_per_peer=max_associations_per_peer or max_associations,
                               what="associations")
        self._stopping = threading.Event()

    # --- life cycle ----------------------------------------------------------
    def start(self, host: str, port: int) -> None:
        sock = socket.create_server((host, port), reuse_port=False, backlog=128)
        self._listener = sock
        self._stopping.clear()
        threading.Thread(target=self._accept_loop, name="lungsys-scp", daemon=True).start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1] if self._listener else 0

    @property
    def associations(self) -> int:
        """Associations established now."""
        return self.places.open

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
                if self._stopping.is_set():
                    return              # the listener was closed
                time.sleep(0.1)         # out of file descriptors: let others close
                continue
            why = self.gate.enter(address[0])
            if why is not None:
                log.warning("connection from %s refused: %s", address[0], why)
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, address[0]),
                             name=f"lungsys-assoc-{address[0]}:{address[1]}",
                             daemon=True).start()

    # --- one association -----------------------------------------------------
    def _serve(self, conn: socket.socket, address: str) -> None:
        assoc = _Association(address)
        gated, counted = True, False
        try:
            deadline = time.monotonic() + ARTIM_SECONDS
            if self.acceptor.tls is not None:
                conn = self.acceptor.handshake(conn, deadline)
            request = self.acceptor.read_request(conn, deadline)
            assoc.calling = str(request.calling_ae_title).strip()
            busy = self.places.enter(address)
            counted = busy is None
            self.gate.leave(address)
            gated = False
            assoc.contexts = self.acceptor.associate(conn, request, busy, address)
            log.info("association from %s (%s) accepted", assoc.calling, address)
            self._data_phase(conn, assoc)
        except Rejected as exc:
            log.warning("association from %s (%s) rejected: %s", assoc.calling, address, exc)
        except (ProtocolError, ValueError, struct.error) as exc:
            log.warning("association from %s (%s) aborted: %s", assoc.calling, address, exc)
            _send_quietly(conn, abort_pdu())
        except (OSError, TimeoutError) as exc:
            log.warning("association from %s (%s) ended: %s", assoc.calling, address,
                        str(exc) or type(exc).__name__)
        except Exception as exc:               # a bug must not leave a file or a place
            log.exception("association from %s (%s) failed: %s", assoc.calling, address, exc)
            _send_quietly(conn, abort_pdu())
        finally:
            self._drop(assoc.message)
            conn.close()
            if gated:
                self.gate.leave(address)
            if counted:
                self.places.leave(address)

    def _data_phase(self, conn: socket.socket, assoc: _Association) -> None:
        command = bytearray()
        contexts = assoc.contexts
        while True:
            # a PDU begins within the idle timeout, and is whole within as long again
            pdu_type, length, deadline = _read_header(conn, time.monotonic() + self.timeout,
                                                      self.timeout)
            if pdu_type != P_DATA_TF_PDU:
                if length != 4:
                    raise ProtocolError(f"PDU type {pdu_type:#x} of {length} bytes")
                _read_exact(conn, 4, deadline)
                if pdu_type == A_RELEASE_RQ_PDU:
                    conn.sendall(RELEASE_RP)
                    return
                if pdu_type == A_ABORT_PDU:
                    log.warning("association from %s aborted by the peer", assoc.calling)
                    return
                raise ProtocolError(f"unexpected PDU type {pdu_type:#x}")
            if length > MAX_PDU:
                raise ProtocolError(f"P-DATA-TF of {length} bytes, above the {MAX_PDU} "
                                    f"negotiated")
            body = _read_exact(conn, length, deadline)
            view, pos = memoryview(body), 0
            while pos < len(view):
                if pos + 6 > len(view):
                    raise ProtocolError("a PDV item is cut short")
                pdv_length, context_id, control = struct.unpack_from(">LBB", view, pos)
                if pdv_length < 2 or pos + 4 + pdv_length > len(view):
                    raise ProtocolError(f"a PDV item of {pdv_length} bytes does not fit its PDU")
                fragment = view[pos + 6:pos + 4 + pdv_length]
                pos += 4 + pdv_length
                if context_id not in contexts:
                    raise ProtocolError(f"presentation context {context_id} not accepted")
                if assoc.since is None:
                    assoc.since, assoc.received = time.monotonic(), 0
                assoc.received += len(fragment)
                if control & 0x01:                 # command fragment
                    if assoc.message is not None:
                        raise ProtocolError("a command arrived inside a data set")
                    if len(command) + len(fragment) > MAX_COMMAND:
                        raise ProtocolError(f"a command set above {MAX_COMMAND} bytes")
                    command += fragment
                    if control & 0x02:
                        assoc.message = self._command(conn, bytes(command), context_id,
                                                      contexts[context_id], assoc.calling)
                        command.clear()
                        if assoc.message is None:          # a C-ECHO, answered
                            assoc.since = None
                    continue
                message = assoc.message
                if message is None:
                    raise ProtocolError("a data set arrived without its command")
                if context_id != message.context_id:
                    raise ProtocolError("a data set fragment on another presentation context")
                syntax = contexts[message.context_id].transfer_syntax
                self._write(message, fragment, assoc.calling, syntax)
                if control & 0x02:                 # the data set's last fragment
                    assoc.message, assoc.since = None, None
                    self._finish(conn, message, assoc.calling, syntax)
            late = time.monotonic() - assoc.since - self.timeout if assoc.since else 0
            if late > 0 and assoc.received < MIN_RATE * late:
                raise ProtocolError(f"a message slower than {MIN_RATE >> 10} KiB/s after "
                                    f"{self.timeout:g} s")

    def _command(self, conn, raw: bytes, context_id: int, context: Context,
                 calling: str) -> _Message | None:
        cmd = parse_command(raw)
        field_ = command_number(cmd, COMMAND_FIELD)
        message_id = command_number(cmd, MESSAGE_ID)
        if field_ not in (C_ECHO_RQ, C_STORE_RQ):
            raise ProtocolError(f"DIMSE command {field_:#06x} is not supported")
        echo = field_ == C_ECHO_RQ
        if not echo and command_number(cmd, COMMAND_DATA_SET_TYPE) == NO_DATA_SET:
            raise ProtocolError("a C-STORE-RQ whose command says no data set follows")
        sop_class, class_why = command_uid(cmd, AFFECTED_SOP_CLASS, "Affected SOP Class UID")
        sop_instance, instance_why = ("", "") if echo else command_uid(
            cmd, AFFECTED_SOP_INSTANCE, "Affected SOP Instance UID")
        why = class_why or instance_why
        status = Status.CANNOT_UNDERSTAND if why and not echo else Status.SUCCESS
        if (echo and why) or (not why and sop_class != context.abstract_syntax):
            status = Status.SOP_CLASS_NOT_SUPPORTED
            why = why or (f"SOP Class {sop_class} sent on the presentation context "
                          f"negotiated for {context.abstract_syntax}")
        elif not echo and not why and sop_class == Verification:
            status = Status.SOP_CLASS_NOT_SUPPORTED      # PS3.4 A: C-ECHO only, nothing kept
            why = "a C-STORE of the Verification SOP Class"
        if why:
            log.warning("refusing a %s from %s (0x%04X): %s", "C-ECHO" if echo else "C-STORE",
                        calling, status, why)
        answer_class = None if class_why else sop_class
        if echo:
            conn.sendall(p_data(context_id, encode_response(
                C_ECHO_RSP, message_id, answer_class, status)))
            return None
        message = _Message(context_id, cmd, answer_class,
                           None if instance_why else sop_instance)
        if why:
            message.discard, message.refusal = True, status
            if self.refused is not None:
                self.refused(calling, why, "" if class_why else sop_instance)
        elif not self.has_room():
            log.error("refusing C-STORE from %s: free disk below the configured minimum",
                      calling)
            message.discard = True
        return message

    def _write(self, message: _Message, fragment: memoryview, calling: str,
               transfer_syntax: str) -> None:
        if message.discard:
            return
        try:
            self._append(message, fragment, calling, transfer_syntax)
        except OSError as exc:           # disk full, I/O error: 0xA700 when the data set ends
            log.error("refusing C-STORE from %s: %s", calling, exc.strerror or exc)
            self._drop(message)
            message.discard = True

    def _append(self, message: _Message, fragment: memoryview, calling: str,
                transfer_syntax: str) -> None:
        if message.file is None:
            message.path = self.temp_file()
            message.file = open(message.path, "wb")
            message.file.write(_file_header(message.command, transfer_syntax, calling))
            message.start = bytes(fragment)
        message.file.write(fragment)
        message.written += len(fragment)
        if message.written >= message.next_disk_check:   # a data set that never ends
            message.next_disk_check += DISK_CHECK_BYTES
            if not self.has_room():
                log.error("refusing C-STORE from %s: the disk filled up while it arrived",
                          calling)
                self._drop(message)
                message.discard = True

    def _finish(self, conn, message: _Message, calling: str, transfer_syntax: str) -> None:
        sop_class, sop_instance = message.sop_class, message.sop_instance
        message_id = command_number(message.command, MESSAGE_ID)
        if message.discard or message.file is None:
            status = message.refusal
            self._drop(message)
        else:
            assert message.path is not None
            try:
                message.file.close()
                message.file = None
                status = self.store(message.path, calling, transfer_syntax, message.start,
                                    (sop_class or "", sop_instance or ""))
            except OSError as exc:
                log.error("refusing C-STORE from %s: %s", calling, exc.strerror or exc)
                self._drop(message)
                status = OUT_OF_RESOURCES
        conn.sendall(p_data(message.context_id, encode_response(
            C_STORE_RSP, message_id, sop_class, status, sop_instance)))

    @staticmethod
    def _drop(message: _Message | None) -> None:
        """Remove what a data set cut short left (the file, if one was begun)."""
        if message is None:
            return
        if message.file is not None:
            message.file.close()
            message.file = None
        if message.path is not None:
            message.path.unlink(missing_ok=True)
            message.path = None


def _send_quietly(conn: socket.socket, data: bytes) -> None:
    try:
        conn.sendall(data)
    except OSError:
        pass
