"""DICOM TLS peers for the tests: a test PKI made with the openssl command, and the
clients an administrator would point at a receiver given a TLS context (conftest's
start_node): DCMTK's storescu, pynetdicom, a bare TLS handshake, all on loopback."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from config import TlsProfile, TlsSection
from store.api import JobStore

from conftest import require_tool
from raw_peer import ENV


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
def ct_files(study_factory) -> list[Path]:
    return list(study_factory("covid", 1, 24).files[:3])


# --- the node --------------------------------------------------------------------------
def tls_config(pki, **overrides) -> TlsSection:
    tls = {"enabled": True, "certificate": str(pki["server_pem"]),
           "private_key": str(pki["server_key"]), "ca_certificates": str(pki["ca_pem"]),
           "require_client_certificate": True, "profile": "bcp195"}
    tls.update(overrides)
    return TlsSection(**{**tls, "profile": TlsProfile(tls["profile"])})


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


def tls_associate(port: int, ctx: ssl.SSLContext | None, identity=None, aet: str = "CT1"):
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


