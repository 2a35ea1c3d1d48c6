"""DICOM TLS and user identity at the front door, and DICOM TLS to a destination.

What an administrator checks after turning on ``[tls]`` or ``user_identity``:
a modality with a certificate from the configured CA stores, and nothing
else gets in (plain TCP, no certificate, a stranger's certificate, a TLS
version or cipher outside the profile); a peer that stalls its handshake is
dropped within ARTIM without holding others up; users and tokens from
``lungsys users add`` are checked and their secrets are never kept in clear;
deliveries over TLS reach a TLS PACS only when its certificate checks out;
and a configuration that names missing files is refused with the key's name.

Peers are DCMTK's storescu/storescp and pynetdicom, on loopback. The
certificates are made with the openssl command for the session.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import CTImageStorage, Verification

import pacs_node.scp
from config import ConfigError, Destination, TlsProfile, TlsSection, load_config
from pacs_node.delivery import DeliveryError, send_dimse
from pacs_node.peers import PeerGate
from pacs_node.receiver import Receiver
from pacs_node.security import UserDirectory, server_context
from store.api import JobStore

from conftest import require_tool
from orthanc import free_port

ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK leaves Nagle on otherwise
PASSWORD = "s3cret"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtb2RhbGl0eS03In0.c2lnbmF0dXJl"


# --- certificates ------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run([require_tool("openssl"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA; a server certificate for 127.0.0.1/localhost and one for another
    name, both from the CA; a client certificate from the CA; a self-signed rogue."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "2", "-subj", "/CN=Test CA", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext",
             "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    exts = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                      "extendedKeyUsage=serverAuth\n",
            "elsewhere": "subjectAltName=DNS:pacs.elsewhere.example\n"
                         "extendedKeyUsage=serverAuth\n",
            "client": "extendedKeyUsage=clientAuth\n"}
    for name, ext in exts.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out",
             "rogue.pem", "-days", "2", "-subj", "/CN=client", "-addext",
             "subjectAltName=IP:127.0.0.1,DNS:localhost", cwd=d)
    return {f"{p.stem}_{p.suffix[1:]}": p for p in d.iterdir() if p.suffix in (".pem", ".key")}


@pytest.fixture(scope="session")
def files(study_factory) -> list[Path]:
    return list(study_factory("covid", 1, 24).files[:3])


# --- the node --------------------------------------------------------------------------
def tls_config(pki, **overrides) -> TlsSection:
    tls = {"enabled": True, "certificate": str(pki["server_pem"]),
           "private_key": str(pki["server_key"]), "ca_certificates": str(pki["ca_pem"]),
           "require_client_certificate": True, "profile": "bcp195"}
    tls.update(overrides)
    return TlsSection(**{**tls, "profile": TlsProfile(tls["profile"])})


@pytest.fixture
def start_node(tmp_path):
    """start_node(tls=context or None, authenticate=..., gate=...) -> (receiver, store)."""
    started = []

    def start(tls=None, **kw):
        folder = tmp_path / f"node{len(started)}"
        store = JobStore(f"sqlite:///{tmp_path}/lungsys{len(started)}.db")
        receiver = Receiver(store, folder / "data", min_free_disk_mb=1, tls=tls, **kw)
        receiver.start("127.0.0.1", 0)
        started.append(receiver)
        return receiver, store

    yield start
    for receiver in started:
        receiver.stop()


def storescu(port: int, files, *options: str, aet: str = "CT1") -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-v", *options, "-aet", aet, "-aec",
                           "LUNGSYS", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, env=ENV, timeout=60)


def tls_client(pki, cert: str | None = "client", maximum=None, ciphers: str | None = None
               ) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_pem"]))
    if cert:
        ctx.load_cert_chain(pki[f"{cert}_pem"], pki[f"{cert}_key"])
    if maximum is not None:
        ctx.maximum_version = maximum
    if ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


def associate(port: int, ctx: ssl.SSLContext | None, identity=None, aet: str = "CT1"):
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.requested_contexts = [build_context(Verification), build_context(CTImageStorage)]
    return ae.associate("127.0.0.1", port, ae_title="LUNGSYS",
                        ext_neg=[identity] if identity is not None else None,
                        tls_args=(ctx, "127.0.0.1") if ctx is not None else None)


def raw_handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str]:
    """A bare TLS handshake with the node: (TLS version, cipher), or ssl.SSLError."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            return tls.version(), tls.cipher()[0]


def stored_uids(store: JobStore) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for s in store.series() for p in store.instance_paths(s.id)}


def uids(files) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


# --- 1. the node as a TLS server ----------------------------------------------------------
def test_a_modality_with_a_certificate_from_the_ca_stores_over_tls(pki, files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    proc = storescu(receiver.port, files, "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Received Store Response (Success)") == 3
    assert stored_uids(store) == uids(files)
    assert store.counts()["instances"] == 3


@pytest.mark.parametrize("profile_flag", ["+px", "+py"])
def test_both_dcmtk_bcp195_profiles_are_accepted(pki, files, start_node, profile_flag):
    receiver, store = start_node(server_context(tls_config(pki)))
    proc = storescu(receiver.port, files[:1], "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]), profile_flag)
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1


def _refused(proc: subprocess.CompletedProcess, store: JobStore) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Received Store Response" not in text
    assert "Association Accepted" not in text
    assert store.counts()["instances"] == 0


def test_plain_tcp_to_the_tls_port_stores_nothing(pki, files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, files), store)


def test_a_client_without_a_certificate_is_refused_when_one_is_required(pki, files,
                                                                       start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, files, "+tla", "+cf", str(pki["ca_pem"])), store)
    assert not associate(receiver.port, tls_client(pki, cert=None)).is_established


def test_a_self_signed_client_certificate_is_refused(pki, files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, files, "+tls", str(pki["rogue_key"]),
                      str(pki["rogue_pem"]), "+cf", str(pki["ca_pem"])), store)
    assert not associate(receiver.port, tls_client(pki, cert="rogue")).is_established


def test_without_require_client_certificate_anonymous_tls_is_accepted_but_a_rogue_is_not(
        pki, files, start_node):
    receiver, store = start_node(server_context(tls_config(
        pki, require_client_certificate=False)))
    proc = storescu(receiver.port, files, "+tla", "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert stored_uids(store) == uids(files)
    # a certificate that is shown is still checked
    rogue = storescu(receiver.port, files, "+tls", str(pki["rogue_key"]),
                     str(pki["rogue_pem"]), "+cf", str(pki["ca_pem"]))
    assert rogue.returncode != 0
    assert "Received Store Response" not in rogue.stderr


def test_the_bcp195_profile_offers_tls12_with_forward_secret_aead_suites_only(pki,
                                                                            start_node):
    receiver, _ = start_node(server_context(tls_config(pki)))
    version, cipher = raw_handshake(receiver.port, tls_client(pki))
    assert version in ("TLSv1.2", "TLSv1.3")
    version, cipher = raw_handshake(receiver.port, tls_client(pki,
                                                              maximum=ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"
    assert cipher.startswith(("ECDHE-", "DHE-")) and ("GCM" in cipher or "CHACHA20" in cipher)
    # a TLS 1.2 client offering only CBC (non-AEAD) or static-RSA suites is refused
    for ciphers in ("ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA384",
                    "AES128-GCM-SHA256:AES256-GCM-SHA384"):
        with pytest.raises(ssl.SSLError, match="ALERT_HANDSHAKE_FAILURE"):
            raw_handshake(receiver.port, tls_client(pki, maximum=ssl.TLSVersion.TLSv1_2,
                                                    ciphers=ciphers))


def test_the_tls13_profile_refuses_a_client_capped_at_tls12(pki, start_node):
    receiver, _ = start_node(server_context(tls_config(pki, profile="tls13")))
    capped = associate(receiver.port, tls_client(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert not capped.is_established
    with pytest.raises(ssl.SSLError):
        raw_handshake(receiver.port, tls_client(pki, maximum=ssl.TLSVersion.TLSv1_2))
    # the same client without the cap gets in, over TLS 1.3
    assert raw_handshake(receiver.port, tls_client(pki))[0] == "TLSv1.3"
    assoc = associate(receiver.port, tls_client(pki))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# --- 2. pynetdicom as the TLS peer ----------------------------------------------------------
def test_pynetdicom_echoes_and_stores_over_tls(pki, files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    assoc = associate(receiver.port, tls_client(pki))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    finally:
        assoc.release()
    assert stored_uids(store) == uids(files)


# --- 3. a stalled handshake ------------------------------------------------------------
def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                       server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


class Staller(threading.Thread):
    """Connects and never completes the TLS handshake: silent, or trickling the
    ClientHello a byte every 0.1 s. ``closed_after``: when the node closed it."""

    def __init__(self, port: int, trickle: bool) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.start_time = time.monotonic()
        self.trickle = trickle
        self.closed_after: float | None = None
        self.sent = 0

    def run(self) -> None:
        if self.trickle:
            threading.Thread(target=self._trickle, daemon=True).start()
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        self.closed_after = time.monotonic() - self.start_time

    def _trickle(self) -> None:
        for byte in _client_hello():
            try:
                self.sock.send(bytes([byte]))
            except OSError:
                return
            self.sent += 1
            time.sleep(0.1)


ARTIM = 2.0


def test_a_stalled_handshake_is_closed_within_artim_and_others_still_store(
        pki, files, start_node, monkeypatch):
    monkeypatch.setattr(pacs_node.scp, "ARTIM_SECONDS", ARTIM)
    receiver, store = start_node(server_context(tls_config(pki)))
    stallers = [Staller(receiver.port, trickle) for trickle in (False, True, False, True)]
    for s in stallers:
        s.start()
    time.sleep(0.2)
    began = time.monotonic()
    proc = storescu(receiver.port, files, "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - began < ARTIM      # not held up by the stalled peers
    assert store.counts()["instances"] == 3
    for s in stallers:
        s.join(timeout=10)
        assert s.closed_after is not None, "the node never closed a stalled handshake"
        assert ARTIM - 0.2 <= s.closed_after <= ARTIM + 1.0, s.closed_after
        s.sock.close()
    assert all(s.sent < len(_client_hello()) for s in stallers if s.trickle)


def test_a_stalled_handshake_is_closed_by_the_node_not_left_to_the_garbage_collector(
        pki, start_node, monkeypatch):
    """The node closes the TLS socket of a handshake that ran out of time itself:
    Python warns (ResourceWarning) about a socket only the garbage collector closed."""
    monkeypatch.setattr(pacs_node.scp, "ARTIM_SECONDS", 0.5)
    receiver, _ = start_node(server_context(tls_config(pki)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        staller = Staller(receiver.port, trickle=False)
        staller.start()
        staller.join(timeout=10)
        staller.sock.close()
        time.sleep(0.2)
        gc.collect()
    assert staller.closed_after is not None
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)
                and f"laddr=('127.0.0.1', {receiver.port})" in str(w.message)]
    assert unclosed == []


def test_stalled_handshakes_give_their_places_back(pki, files, start_node, monkeypatch):
    """Two stallers fill a gate of two places per address; once ARTIM closes them,
    a modality from the same address gets in again."""
    monkeypatch.setattr(pacs_node.scp, "ARTIM_SECONDS", ARTIM)
    receiver, store = start_node(server_context(tls_config(pki)),
                                 gate=PeerGate(max_total=4, max_per_peer=2))
    stallers = [Staller(receiver.port, trickle) for trickle in (False, True)]
    for s in stallers:
        s.start()
    for s in stallers:
        s.join(timeout=10)
        assert s.closed_after is not None and s.closed_after <= ARTIM + 1.0
        s.sock.close()
    time.sleep(0.1)
    proc = storescu(receiver.port, files[:1], "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1


# --- 4. user identity ---------------------------------------------------------------
def lungsys_users_add(users: Path, name: str, secret: str | None, *flags: str):
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "users", "add", name, "--file", str(users), *flags],
                          input=(secret + "\n") if secret is not None else "",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="session")
def users_file(tmp_path_factory) -> Path:
    users = tmp_path_factory.mktemp("users") / "users"
    lungsys_users_add(users, "alice", PASSWORD)
    lungsys_users_add(users, "modality-7", TOKEN, "--token")
    lungsys_users_add(users, "bob", None, "--no-password")
    return users


def test_the_users_file_keeps_no_secret_in_clear(users_file):
    text = users_file.read_text()
    assert PASSWORD not in text and TOKEN not in text
    assert TOKEN.split(".")[0] not in text and TOKEN.split(".")[1] not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"user alice pbkdf2_sha256\$\d+\$[0-9a-f]{32}\$[0-9a-f]{64}", lines[0])
    assert re.fullmatch(r"token modality-7 pbkdf2_sha256\$\d+\$[0-9a-f]{32}\$[0-9a-f]{64}",
                        lines[1])
    assert lines[2] == "user bob -"
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600


def test_the_users_command_refuses_an_empty_secret(tmp_path):
    users = tmp_path / "users"
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "users", "add", str(users), "carol"], input="\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert not users.exists() or "carol" not in users.read_text()


def identity(kind: int, primary: bytes, secondary: bytes = b"", response: bool = False):
    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.primary_field = primary
    if kind == 2:
        item.secondary_field = secondary
    item.positive_response_requested = response
    return item


#: A-ASSOCIATE-RJ: rejected permanent, DICOM UL service-provider (ACSE related
#: function), no reason given: what PS3.7 D.3.3.7 asks for a user identity refused.
RJ_USER_IDENTITY = bytes.fromhex("03 00 00000004 00 01 02 01")


def raw_associate(port: int, ctx: ssl.SSLContext | None, item=None) -> bytes:
    """Send an A-ASSOCIATE-RQ (Verification; ``item``: a user identity) and return
    the PDU the node answers; after an A-ASSOCIATE-RJ the node must close.

    By hand rather than with pynetdicom: when the acceptor closes the connection
    right after its A-ASSOCIATE-RJ, pynetdicom's requestor now and then (about 1 in
    100 under load) reports an abort instead of the rejection."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "CT1", "LUNGSYS"
    cx = build_context(Verification)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    primitive.user_information = [max_length] + ([item] if item is not None else [])
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ctx is not None:
        sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(rq.encode())
        answer = b""
        while len(answer) < 6 or len(answer) < 6 + int.from_bytes(answer[2:6], "big"):
            chunk = sock.recv(4096)
            assert chunk, f"the node closed the connection after {answer.hex()!r}"
            answer += chunk
        if answer[:1] == b"\x03":
            assert sock.recv(4096) == b"", "a rejected association was left open"
        else:
            sock.sendall(bytes.fromhex("05 00 00000004 00000000"))   # A-RELEASE-RQ
    return answer


def assert_rejected_for_identity(port: int, ctx: ssl.SSLContext | None, item=None) -> None:
    assert raw_associate(port, ctx, item) == RJ_USER_IDENTITY


@pytest.fixture
def id_node(pki, users_file, start_node):
    """A TLS node that requires a user identity: start(required=True) -> (receiver, store)."""
    def start(required: bool = True, tls: bool = True):
        return start_node(server_context(tls_config(pki)) if tls else None,
                          authenticate=UserDirectory(users_file, required=required))
    return start


def test_user_and_password_from_storescu(pki, files, id_node):
    receiver, store = id_node()
    tls = ("+tls", str(pki["client_key"]), str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    proc = storescu(receiver.port, files, *tls, "--user", "alice", "--password", PASSWORD,
                    "-rsp")
    assert proc.returncode == 0, proc.stderr
    assert stored_uids(store) == uids(files)
    for wrong in (["--user", "alice", "--password", "wrong"],
                  ["--user", "mallory", "--password", PASSWORD],
                  ["--user", "alice"],                        # alice has a password
                  []):                                        # none, and one is required
        proc = storescu(receiver.port, files, *tls, *wrong)
        assert proc.returncode != 0, wrong
        assert "Association Rejected" in proc.stdout + proc.stderr, (wrong, proc.stderr)
    assert store.counts()["instances"] == 3


def test_a_user_known_by_name_alone(files, id_node):
    receiver, store = id_node(tls=False)
    proc = storescu(receiver.port, files[:1], "--user", "bob")
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1
    # bob has no password to give: a password is not a way around the '-'
    proc = storescu(receiver.port, files[:1], "--user", "bob", "--password", "anything")
    assert "Association Rejected" in proc.stdout + proc.stderr


def test_a_jwt_file_from_storescu_is_accepted_trailing_newline_and_all(files, id_node,
                                                                      tmp_path):
    receiver, store = id_node(tls=False)
    jwt = tmp_path / "token.jwt"
    jwt.write_text(TOKEN + "\n")
    proc = storescu(receiver.port, files[:1], "--jwt", str(jwt))
    assert proc.returncode == 0, proc.stderr
    jwt.write_text(TOKEN[:-1] + "x\n")
    proc = storescu(receiver.port, files[:1], "--jwt", str(jwt))
    assert "Association Rejected" in proc.stdout + proc.stderr
    assert store.counts()["instances"] == 1


def test_rejections_carry_the_user_identity_reason(pki, id_node):
    receiver, _ = id_node()
    ctx = tls_client(pki)
    assert_rejected_for_identity(receiver.port, ctx, identity(2, b"alice", b"wrong"))
    assert_rejected_for_identity(receiver.port, ctx)                    # none given
    assert_rejected_for_identity(receiver.port, ctx, identity(5, b"not-the-token"))
    assert_rejected_for_identity(receiver.port, ctx, identity(1, b"alice"))   # has a password
    assert_rejected_for_identity(receiver.port, ctx, identity(3, b"kerberos"))
    # the same request with the right password is accepted (an A-ASSOCIATE-AC, type 2)
    answer = raw_associate(receiver.port, ctx, identity(2, b"alice", PASSWORD.encode()))
    assert answer[:1] == b"\x02"


def test_a_good_password_and_a_token_are_accepted_with_a_positive_response(pki, id_node):
    receiver, _ = id_node()
    ctx = tls_client(pki)
    for item in (identity(2, b"alice", PASSWORD.encode(), response=True),
                 identity(5, TOKEN.encode(), response=True)):
        assoc = associate(receiver.port, ctx, item)
        assert assoc.is_established, item
        responses = [i for i in assoc.acceptor.user_information
                     if isinstance(i, UserIdentityNegotiation)]
        assert len(responses) == 1 and responses[0].server_response == b""
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    # no positive response asked for: none sent
    assoc = associate(receiver.port, ctx, identity(2, b"alice", PASSWORD.encode()))
    assert assoc.is_established
    assert not [i for i in assoc.acceptor.user_information
                if isinstance(i, UserIdentityNegotiation)]
    assoc.release()


def test_optional_identity_accepts_none_but_still_checks_what_is_sent(pki, id_node):
    receiver, _ = id_node(required=False)
    ctx = tls_client(pki)
    assoc = associate(receiver.port, ctx)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert_rejected_for_identity(receiver.port, ctx, identity(2, b"alice", b"no"))
    assert_rejected_for_identity(receiver.port, ctx, identity(5, b"forged"))


# --- 5. delivery over TLS ------------------------------------------------------------
def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return True
    return False


@pytest.fixture
def tls_pacs(pki, tmp_path):
    """storescp with DICOM TLS (client certificates verified): start(cert) -> (port, out)."""
    procs = []

    def start(cert: str = "server"):
        out = tmp_path / f"pacs{len(procs)}"
        out.mkdir()
        port = free_port()
        proc = subprocess.Popen([require_tool("storescp"), "+tls", str(pki[f"{cert}_key"]),
                                 str(pki[f"{cert}_pem"]), "+cf", str(pki["ca_pem"]), "-od",
                                 str(out), str(port)], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert proc.poll() is None, "storescp exited"
            assert time.monotonic() < deadline, "storescp did not listen"
            time.sleep(0.05)
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def destination(pki, port: int, ca: str = "ca_pem", client: str | None = "client",
                host: str = "127.0.0.1") -> Destination:
    return Destination("pacs", "dimse", "STORESCP", host, port, tls=True,
                       ca_certificates=str(pki[ca]),
                       certificate=str(pki[f"{client}_pem"]) if client else "",
                       private_key=str(pki[f"{client}_key"]) if client else "")


def test_delivery_over_tls_reaches_a_tls_pacs(pki, files, tls_pacs):
    port, out = tls_pacs()
    send_dimse(destination(pki, port), files, "LUNGSYS", timeout=15)
    arrived = [p for p in out.iterdir() if p.is_file()]
    assert uids(arrived) == uids(files)


def test_delivery_refuses_a_pacs_whose_certificate_does_not_check_out(pki, files, tls_pacs,
                                                                      monkeypatch):
    port, out = tls_pacs()
    with pytest.raises(DeliveryError):            # its CA is not the one we trust
        send_dimse(destination(pki, port, ca="rogue_pem"), files, "LUNGSYS", timeout=15)
    assert not [p for p in out.iterdir() if p.is_file()]
    other, other_out = tls_pacs("elsewhere")      # from our CA, but for another name
    with pytest.raises(DeliveryError):
        send_dimse(destination(pki, other), files, "LUNGSYS", timeout=15)
    assert not [p for p in other_out.iterdir() if p.is_file()]


def test_delivery_over_tls_to_the_node_itself(pki, files, start_node):
    """Our client and our server agree: a node delivering to another node over TLS."""
    receiver, store = start_node(server_context(tls_config(pki)))
    dest = Destination("peer", "dimse", "LUNGSYS", "127.0.0.1", receiver.port, tls=True,
                       ca_certificates=str(pki["ca_pem"]), certificate=str(pki["client_pem"]),
                       private_key=str(pki["client_key"]))
    send_dimse(dest, files, "LUNGSYS", timeout=15)
    assert stored_uids(store) == uids(files)
    with pytest.raises(DeliveryError):            # the node wants our certificate
        send_dimse(destination(pki, receiver.port, client=None), files, "LUNGSYS",
                   timeout=15)


# --- 6. configuration --------------------------------------------------------------
def _config(tmp_path, text: str):
    f = tmp_path / "node.toml"
    f.write_text(text)
    return load_config(f, environ={})


def test_tls_enabled_without_its_files_names_the_key(tmp_path, pki):
    with pytest.raises(ConfigError, match=r"tls\.certificate"):
        _config(tmp_path, "[tls]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"tls\.private_key"):
        _config(tmp_path, f'[tls]\nenabled = true\ncertificate = "{pki["server_pem"]}"\n')
    with pytest.raises(ConfigError, match=r"tls\.ca_certificates"):
        _config(tmp_path, f'[tls]\nenabled = true\ncertificate = "{pki["server_pem"]}"\n'
                          f'private_key = "{pki["server_key"]}"\n')
    missing = tmp_path / "gone.pem"
    for key in ("certificate", "private_key", "ca_certificates"):
        paths = {"certificate": pki["server_pem"], "private_key": pki["server_key"],
                 "ca_certificates": pki["ca_pem"], key: missing}
        body = "".join(f'{k} = "{v}"\n' for k, v in paths.items())
        with pytest.raises(ConfigError, match=rf"tls\.{key}: no such file"):
            _config(tmp_path, "[tls]\nenabled = true\n" + body)


def test_a_complete_tls_section_loads_and_makes_a_working_node(tmp_path, pki, files,
                                                               start_node):
    cfg = _config(tmp_path, f'[tls]\nenabled = true\ncertificate = "{pki["server_pem"]}"\n'
                            f'private_key = "{pki["server_key"]}"\n'
                            f'ca_certificates = "{pki["ca_pem"]}"\nprofile = "tls13"\n')
    context = server_context(cfg.tls)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    receiver, store = start_node(context)
    proc = storescu(receiver.port, files[:1], "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1
    with pytest.raises(ConfigError, match=r"tls\.profile"):
        _config(tmp_path, '[tls]\nprofile = "tls11"\n')


def test_a_key_that_does_not_match_the_certificate_is_an_error(pki):
    with pytest.raises(ValueError, match="tls"):
        server_context(tls_config(pki, private_key=str(pki["client_key"])))


def test_a_tls_destination_with_a_missing_ca_file_names_the_key(tmp_path, pki):
    base = ('[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\n'
            'host = "127.0.0.1"\nport = 2762\ntls = true\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.ca_certificates: no such file"):
        _config(tmp_path, base + f'ca_certificates = "{tmp_path / "gone.pem"}"\n')
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.certificate: no such file"):
        _config(tmp_path, base + f'ca_certificates = "{pki["ca_pem"]}"\n'
                                 f'certificate = "{tmp_path / "gone.pem"}"\n')
    [dest] = _config(tmp_path, base + f'ca_certificates = "{pki["ca_pem"]}"\n').destinations
    assert dest.tls is True and dest.ca_certificates == str(pki["ca_pem"])
