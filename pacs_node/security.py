"""Transport security and caller identity: DICOM TLS contexts and user identity checks.

DICOM TLS follows the BCP 195 TLS Secure Transport Connection Profile
(PS3.15 B.9, RFC 9325): TLS 1.2 or 1.3 only, no compression, no
renegotiation, and for TLS 1.2 only the forward-secret AEAD suites BCP 195
recommends (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites all
are). The ``tls13`` profile allows TLS 1.3 alone. The node checks client
certificates against the configured CAs (required, or checked only when a
client sends one); as a client it checks the destination's certificate and
its address or name.

User identity negotiation (PS3.7 D.3.3.7) names the caller beyond its AE
title. The users file holds one line per user or token, the secret never
in clear::

    user alice pbkdf2_sha256$100000$SALT$HASH
    token modality-7 pbkdf2_sha256$100000$SALT$HASH

Username and password (type 2) are checked against ``user`` lines;
a username alone (type 1) only against a ``user`` line whose hash is ``-``
(a user allowed without a password); a JWT or SAML assertion (types 5 and 4)
is compared, as an opaque bearer token, with the ``token`` lines; Kerberos
is not supported. A caller that does not check out is rejected (permanent,
ACSE related function, PS3.7 D.3.3.7). Failed tries are limited per name and
address as the console's sign-ins (:mod:`pacs_node.failures`; all tokens are
one name): past the limit a try is rejected before any hash is computed; and
an unknown name costs the hash a known one does, so that the time of a
rejection does not tell which names exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import ssl
from pathlib import Path

from config import Destination, TlsProfile, TlsSection
from pacs_node.dimse import RJ_USER_IDENTITY
from pacs_node.failures import FailureLimit
from pacs_node.scp import Rejected

log = logging.getLogger(__name__)

#: TLS 1.2 suites of BCP 195 (RFC 9325 4.2); TLS 1.3 suites are set apart by OpenSSL.
BCP195_CIPHERS = "ECDHE+AESGCM:DHE+AESGCM:ECDHE+CHACHA20:DHE+CHACHA20:!aNULL:!eNULL"
PBKDF2_ITERATIONS = 100_000


def _harden(context: ssl.SSLContext, profile: TlsProfile) -> ssl.SSLContext:
    context.minimum_version = (ssl.TLSVersion.TLSv1_3 if profile == TlsProfile.tls13
                               else ssl.TLSVersion.TLSv1_2)
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_NO_RENEGOTIATION)
    return context


def server_context(tls: TlsSection) -> ssl.SSLContext:
    """The node's DICOM TLS context from the ``[tls]`` section."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.profile)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates:
            context.load_verify_locations(cafile=tls.ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls: the certificate, key or CAs cannot be used ({exc})") from None
    context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                           else ssl.CERT_OPTIONAL if tls.ca_certificates else ssl.CERT_NONE)
    return context


def https_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """The HTTP service's TLS context (``[http] tls_certificate``): BCP 195 as DICOM TLS,
    no client certificate (users sign in, machines send tokens)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), TlsProfile.bcp195)
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"http: the certificate or key cannot be used ({exc})") from None
    return context


def client_context(destination: Destination) -> ssl.SSLContext:
    """The context for DICOM TLS to a destination: its certificate checked, ours shown."""
    context = _harden(ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=destination.ca_certificates or None), TlsProfile.bcp195)
    if destination.certificate:
        context.load_cert_chain(destination.certificate, destination.private_key or None)
    return context


# --- user identity -------------------------------------------------------------
def hash_secret(secret: str, salt: bytes | None = None,
                iterations: int = PBKDF2_ITERATIONS) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode("utf-8"), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def _matches(secret: bytes, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        computed = hashlib.pbkdf2_hmac("sha256", secret, bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


def _iterations(stored: str) -> int:
    """The PBKDF2 iterations of a stored hash (0 for none: ``-``, or not one of ours)."""
    try:
        return int(stored.split("$")[1])
    except (IndexError, ValueError):
        return 0


class UserDirectory:
    """Checks a caller's user identity item against the users file (see the module)."""

    def __init__(self, path: str | os.PathLike, required: bool) -> None:
        self.required = required
        self.failures = FailureLimit()
        self.users: dict[str, str] = {}
        self.tokens: list[str] = []
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 3 or words[0] not in ("user", "token"):
                raise ValueError(f"{path}:{number}: expected 'user NAME HASH' or "
                                 f"'token LABEL HASH'")
            if words[0] == "user":
                self.users[words[1]] = words[2]
            else:
                self.tokens.append(words[2])
        # checked for an unknown name: as costly as the costliest known one
        self._unknown = hash_secret(os.urandom(16).hex(), iterations=max(
            [_iterations(h) for h in self.users.values()] + [PBKDF2_ITERATIONS]))

    def __call__(self, item, peer: str = "?") -> bytes | None:
        """The server response for an accepted caller from ``peer``; Rejected otherwise."""
        if item is None:
            if self.required:
                raise Rejected(RJ_USER_IDENTITY, "no user identity given, and one is required")
            return None
        kind = item.user_identity_type
        if kind not in (1, 2, 4, 5):
            raise Rejected(RJ_USER_IDENTITY, f"user identity type {kind} is not supported")
        primary, secondary = bytes(item.primary_field or b""), bytes(item.secondary_field or b"")
        name = primary.decode("utf-8", "replace") if kind in (1, 2) else "(a token)"
        if self.failures.waiting(peer, name) > 0:
            raise Rejected(RJ_USER_IDENTITY, "too many user identities not accepted from "
                                             "this address: it must wait")
        try:
            return self._check(kind, name, primary, secondary)
        except Rejected:
            # counted once it failed (not before, as the console's sign-in: a sender's
            # associations at once, all with the right password, would wait on each other's
            # checks); concurrent guesses are as many as the peer gate lets connect at once
            self.failures.count(peer, name)
            raise

    def _check(self, kind: int, name: str, primary: bytes, secondary: bytes) -> bytes:
        if kind in (1, 2):
            stored = self.users.get(name)
            if kind == 1:
                ok = stored == "-"
            else:    # an unknown name costs the hash a known one does
                ok = _matches(secondary, stored if stored not in (None, "-")
                              else self._unknown) and stored not in (None, "-")
            if not ok:
                raise Rejected(RJ_USER_IDENTITY, "user name or password not accepted")
            log.info("user identity: %s", name)
        elif not any(_matches(primary.strip(), stored) for stored in self.tokens):
            raise Rejected(RJ_USER_IDENTITY, "token not accepted")
        return b""
