"""Association establishment for the Storage SCP: TLS, the A-ASSOCIATE-RQ, AC or RJ.

A connection becomes an association here, and nothing of the peer's is
trusted on the way: the TLS handshake and the A-ASSOCIATE-RQ must be whole
by one deadline (ARTIM), however slowly their bytes trickle; the request's
announced length is checked before anything is allocated, and its buffer
grows only as bytes arrive; AE titles that are not printable ASCII are
refused before pynetdicom decodes the request (its decoder logs them with a
traceback); whatever else the decoder raises is a :class:`ProtocolError`, and so is
a presentation context id proposed twice (which of the two would a C-STORE on it mean?).
A request is rejected (PS3.8 Table 9-21) for a protocol version without bit
0, an application context other than DICOM's, a calling AE title not on the
allow-list, a user identity that does not check out, or too many
associations; otherwise pynetdicom negotiates the presentation contexts and
roles, and the A-ASSOCIATE-AC announces ``MAX_PDU``.

The deadline-bound reads are here too, for the data phase
(:mod:`pacs_node.scp`) uses them as well.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Callable, NamedTuple

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (A_ASSOCIATE, ImplementationClassUIDNotification,
                                       ImplementationVersionNameNotification,
                                       MaximumLengthNotification, UserIdentityNegotiation)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pacs_node.dimse import (A_ASSOCIATE_RQ_PDU, RJ_APPLICATION_CONTEXT, RJ_CALLING_AE,
                             RJ_LOCAL_LIMIT, RJ_PROTOCOL_VERSION, _PDU_HEADER, ProtocolError)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: The largest PDU the node accepts (the PDUs it receives may be this long).
MAX_PDU = 1 << 20
#: The largest A-ASSOCIATE-RQ: 128 presentation contexts, each with all 13 transfer syntaxes
#: the node takes, are 46 KiB; with all 39 pydicom knows, 134 KiB. Decoding one costs CPU as
#: it grows (0.34 s at 165 KiB on the 2-core machine), before the peer is known.
MAX_ASSOCIATE_RQ = 160 << 10


class Context(NamedTuple):
    """An accepted presentation context: what its messages are about, and how encoded."""

    abstract_syntax: str
    transfer_syntax: str


class Rejected(Exception):
    """The association is rejected: (result, source, reason) and why, for the log."""

    def __init__(self, code: tuple[int, int, int], why: str) -> None:
        super().__init__(why)
        self.code = code


#: authenticate(user identity item of the A-ASSOCIATE-RQ or None, the peer's address) ->
#: the server response to send (b"" for none), or raise Rejected.
Authenticator = Callable[[object, str], bytes | None]


class Acceptor:
    """Turns connections into associations (see the module)."""

    def __init__(self, contexts: list[PresentationContext], allowed: set[str],
                 tls: ssl.SSLContext | None = None,
                 authenticate: Authenticator | None = None) -> None:
        self.contexts = contexts
        self.allowed = allowed
        self.tls = tls
        self.authenticate = authenticate

    def handshake(self, conn: socket.socket, deadline: float) -> ssl.SSLSocket:
        """The TLS handshake, whole within ``deadline``; OSError when it fails."""
        tls = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        while True:   # the whole handshake within the deadline, however slow the peer
            tls.settimeout(_remaining(deadline))
            try:
                tls.do_handshake()
                return tls
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                continue
            except ssl.SSLError as exc:
                tls.close()
                raise OSError(f"TLS handshake failed: {exc.reason or exc}") from None
            except BaseException:           # out of time, or gone: the TLS socket is ours
                tls.close()
                raise

    def read_request(self, conn: socket.socket, deadline: float) -> A_ASSOCIATE:
        """The A-ASSOCIATE-RQ, whole by ``deadline``, checked before pynetdicom decodes it."""
        pdu_type, length, _ = _read_header(conn, deadline)
        if pdu_type != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type {pdu_type:#x}")
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, above {MAX_ASSOCIATE_RQ}")
        if length < 68:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes, too short")
        body = _read_growing(conn, length, deadline)
        for title in (body[4:20], body[20:36]):   # pynetdicom logs bad ones with a traceback
            if any(b < 0x20 or b > 0x7E or b == 0x5C for b in title) or not title.strip():
                raise ProtocolError("an AE title in the A-ASSOCIATE-RQ is not printable ASCII")
        try:
            rq = A_ASSOCIATE_RQ()
            rq.decode(_PDU_HEADER.pack(A_ASSOCIATE_RQ_PDU, 0, length) + body)
            request = rq.to_primitive()
            _ = [str(cx.abstract_syntax) for cx in request.presentation_context_definition_list]
        except Exception as exc:   # pynetdicom's decoder raises whatever broken bytes make
            raise ProtocolError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})") from None
        ids = [cx.context_id for cx in request.presentation_context_definition_list]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:   # PS3.8 7.1.1.13: an unused id for each; the AC would answer one twice
            raise ProtocolError(f"A-ASSOCIATE-RQ proposes presentation context {twice[0]} "
                                f"more than once")
        request.protocol_version = struct.unpack_from(">H", body, 0)[0]
        return request

    def associate(self, conn: socket.socket, request: A_ASSOCIATE, busy: str | None,
                  address: str = "?") -> dict[int, Context]:
        """Accept: the accepted contexts by id; or reject (Rejected). ``busy``: why there is
        no place for it (None: there is)."""
        response = None
        try:
            if not request.protocol_version & 0x0001:
                raise Rejected(RJ_PROTOCOL_VERSION, f"protocol version "
                                                    f"{request.protocol_version:#06x}")
            if str(request.application_context_name) != APPLICATION_CONTEXT:
                raise Rejected(RJ_APPLICATION_CONTEXT, "application context "
                                                       f"{request.application_context_name}")
            if self.allowed and str(request.calling_ae_title).strip() not in self.allowed:
                raise Rejected(RJ_CALLING_AE, "calling AE title not on the allow-list")
            if self.authenticate is not None:
                identity = next((item for item in request.user_information
                                 if type(item).__name__ == "UserIdentityNegotiation"), None)
                response = self.authenticate(identity, address)
                if response is not None and not getattr(identity, "positive_response_requested",
                                                        False):
                    response = None
            if busy:
                raise Rejected(RJ_LOCAL_LIMIT, f"no association place: {busy}")
        except Rejected as exc:
            primitive = A_ASSOCIATE()
            primitive.result, primitive.result_source, primitive.diagnostic = exc.code
            rj = A_ASSOCIATE_RJ()
            rj.from_primitive(primitive)
            conn.sendall(rj.encode())
            raise
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
        if response is not None:
            item = UserIdentityNegotiation()
            item.server_response = response
            primitive.user_information.append(item)
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(primitive)
        conn.sendall(ac.encode())
        return {cx.context_id: Context(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in results if cx.result == 0}


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the peer took too long")
    return left


def _read_exact(conn: socket.socket, n: int, deadline: float) -> bytearray:
    """``n`` bytes, all of them by ``deadline`` (checked length: allocated at once)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        conn.settimeout(_remaining(deadline))
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            raise OSError("the peer closed the connection")
        got += k
    return buf


def _read_growing(conn: socket.socket, n: int, deadline: float) -> bytearray:
    """``n`` bytes by ``deadline``, the buffer growing only as they arrive."""
    buf = bytearray()
    while len(buf) < n:
        buf += _read_exact(conn, min(n - len(buf), 16 << 10), deadline)
    return buf


def _read_header(conn: socket.socket, first_byte_by: float, rest_within: float | None = None
                 ) -> tuple[int, int, float]:
    """A PDU's type, length and the deadline for the rest of it: the first byte
    by ``first_byte_by``; the rest within ``rest_within`` seconds of it (None:
    by ``first_byte_by`` too)."""
    first = _read_exact(conn, 1, first_byte_by)
    deadline = first_byte_by if rest_within is None else time.monotonic() + rest_within
    pdu_type, _, length = _PDU_HEADER.unpack(bytes(first + _read_exact(conn, 5, deadline)))
    return pdu_type, length, deadline
