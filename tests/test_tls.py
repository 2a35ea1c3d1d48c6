"""DICOM TLS at the front door, and DICOM TLS to a destination.

What an administrator checks after turning on ``[tls]``: a modality with a certificate
from the configured CA stores, and nothing else gets in (plain TCP, no certificate, a
stranger's certificate, a TLS version or cipher outside the profile); a peer that stalls
its handshake is dropped within ARTIM without holding others up; deliveries over TLS
reach a TLS PACS only when its certificate checks out; and a configuration that names
missing files is refused with the key's name. (User identity: test_user_identity.py.)

Peers are DCMTK's storescu/storescp and pynetdicom, on loopback (tests/tls_peer.py). The
certificates are made with the openssl command for the session.
"""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pydicom
import pytest

import pacs_node.scp
from config import ConfigError, Destination, load_config
from pacs_node.delivery import DeliveryError, send_dimse
from pacs_node.peers import PeerGate
from pacs_node.security import server_context
from store.api import JobStore

from conftest import require_tool
from orthanc import free_port
from raw_peer import ENV
from tls_peer import (raw_handshake, stored_uids, storescu, tls_associate, tls_client,
                      tls_config, uids)


# --- 1. the node as a TLS server ----------------------------------------------------------
def test_a_modality_with_a_certificate_from_the_ca_stores_over_tls(pki, ct_files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    proc = storescu(receiver.port, ct_files, "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Received Store Response (Success)") == 3
    assert stored_uids(store) == uids(ct_files)
    assert store.counts()["instances"] == 3


@pytest.mark.parametrize("profile_flag", ["+px", "+py"])
def test_both_dcmtk_bcp195_profiles_are_accepted(pki, ct_files, start_node, profile_flag):
    receiver, store = start_node(server_context(tls_config(pki)))
    proc = storescu(receiver.port, ct_files[:1], "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]), profile_flag)
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1


def _refused(proc: subprocess.CompletedProcess, store: JobStore) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Received Store Response" not in text
    assert "Association Accepted" not in text
    assert store.counts()["instances"] == 0


def test_plain_tcp_to_the_tls_port_stores_nothing(pki, ct_files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, ct_files), store)


def test_a_client_without_a_certificate_is_refused_when_one_is_required(pki, ct_files,
                                                                       start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, ct_files, "+tla", "+cf", str(pki["ca_pem"])), store)
    assert not tls_associate(receiver.port, tls_client(pki, cert=None)).is_established


def test_a_self_signed_client_certificate_is_refused(pki, ct_files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    _refused(storescu(receiver.port, ct_files, "+tls", str(pki["rogue_key"]),
                      str(pki["rogue_pem"]), "+cf", str(pki["ca_pem"])), store)
    assert not tls_associate(receiver.port, tls_client(pki, cert="rogue")).is_established


def test_without_require_client_certificate_anonymous_tls_is_accepted_but_a_rogue_is_not(
        pki, ct_files, start_node):
    receiver, store = start_node(server_context(tls_config(
        pki, require_client_certificate=False)))
    proc = storescu(receiver.port, ct_files, "+tla", "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert stored_uids(store) == uids(ct_files)
    # a certificate that is shown is still checked
    rogue = storescu(receiver.port, ct_files, "+tls", str(pki["rogue_key"]),
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
    capped = tls_associate(receiver.port, tls_client(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert not capped.is_established
    with pytest.raises(ssl.SSLError):
        raw_handshake(receiver.port, tls_client(pki, maximum=ssl.TLSVersion.TLSv1_2))
    # the same client without the cap gets in, over TLS 1.3
    assert raw_handshake(receiver.port, tls_client(pki))[0] == "TLSv1.3"
    assoc = tls_associate(receiver.port, tls_client(pki))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


# --- 2. pynetdicom as the TLS peer ----------------------------------------------------------
def test_pynetdicom_echoes_and_stores_over_tls(pki, ct_files, start_node):
    receiver, store = start_node(server_context(tls_config(pki)))
    assoc = tls_associate(receiver.port, tls_client(pki))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for f in ct_files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0x0000
    finally:
        assoc.release()
    assert stored_uids(store) == uids(ct_files)


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
        pki, ct_files, start_node, monkeypatch):
    monkeypatch.setattr(pacs_node.scp, "ARTIM_SECONDS", ARTIM)
    receiver, store = start_node(server_context(tls_config(pki)))
    stallers = [Staller(receiver.port, trickle) for trickle in (False, True, False, True)]
    for s in stallers:
        s.start()
    time.sleep(0.2)
    began = time.monotonic()
    proc = storescu(receiver.port, ct_files, "+tls", str(pki["client_key"]),
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


def test_stalled_handshakes_give_their_places_back(pki, ct_files, start_node, monkeypatch):
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
    proc = storescu(receiver.port, ct_files[:1], "+tls", str(pki["client_key"]),
                    str(pki["client_pem"]), "+cf", str(pki["ca_pem"]))
    assert proc.returncode == 0, proc.stderr
    assert store.counts()["instances"] == 1


# --- 4. delivery over TLS ------------------------------------------------------------
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


def test_delivery_over_tls_reaches_a_tls_pacs(pki, ct_files, tls_pacs):
    port, out = tls_pacs()
    send_dimse(destination(pki, port), ct_files, "LUNGSYS", timeout=15)
    arrived = [p for p in out.iterdir() if p.is_file()]
    assert uids(arrived) == uids(ct_files)


def test_delivery_refuses_a_pacs_whose_certificate_does_not_check_out(pki, ct_files, tls_pacs,
                                                                      monkeypatch):
    port, out = tls_pacs()
    with pytest.raises(DeliveryError):            # its CA is not the one we trust
        send_dimse(destination(pki, port, ca="rogue_pem"), ct_files, "LUNGSYS", timeout=15)
    assert not [p for p in out.iterdir() if p.is_file()]
    other, other_out = tls_pacs("elsewhere")      # from our CA, but for another name
    with pytest.raises(DeliveryError):
        send_dimse(destination(pki, other), ct_files, "LUNGSYS", timeout=15)
    assert not [p for p in other_out.iterdir() if p.is_file()]


def test_delivery_over_tls_to_the_node_itself(pki, ct_files, start_node):
    """Our client and our server agree: a node delivering to another node over TLS."""
    receiver, store = start_node(server_context(tls_config(pki)))
    dest = Destination("peer", "dimse", "LUNGSYS", "127.0.0.1", receiver.port, tls=True,
                       ca_certificates=str(pki["ca_pem"]), certificate=str(pki["client_pem"]),
                       private_key=str(pki["client_key"]))
    send_dimse(dest, ct_files, "LUNGSYS", timeout=15)
    assert stored_uids(store) == uids(ct_files)
    with pytest.raises(DeliveryError):            # the node wants our certificate
        send_dimse(destination(pki, receiver.port, client=None), ct_files, "LUNGSYS",
                   timeout=15)


# --- 5. configuration --------------------------------------------------------------
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


def test_a_complete_tls_section_loads_and_makes_a_working_node(tmp_path, pki, ct_files,
                                                               start_node):
    cfg = _config(tmp_path, f'[tls]\nenabled = true\ncertificate = "{pki["server_pem"]}"\n'
                            f'private_key = "{pki["server_key"]}"\n'
                            f'ca_certificates = "{pki["ca_pem"]}"\nprofile = "tls13"\n')
    context = server_context(cfg.tls)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    receiver, store = start_node(context)
    proc = storescu(receiver.port, ct_files[:1], "+tls", str(pki["client_key"]),
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
