"""Is a peer there? C-ECHO for DICOM peers, a QIDO-RS query for DICOMweb ones.

Used by ``lungsys echo`` (as DCMTK's ``echoscu``) and by the console's "test"
button of a destination: one line saying what answered, or what did not and
why, never a traceback.
"""

from __future__ import annotations

import logging
import socket
import ssl

from config import Destination, DestinationKind
from pacs_node import one_line
from pacs_node.delivery import redact

#: Seconds a probe waits for the peer.
TIMEOUT = 10.0


class ProbeError(Exception):
    """The peer did not answer as it should: one line why."""


def echo(host: str, port: int, aet: str, calling: str = "LUNGSYS",
         tls: ssl.SSLContext | None = None, timeout: float = TIMEOUT) -> str:
    """C-ECHO ``aet`` at ``host:port``; the line to show on success, ProbeError otherwise."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    # a peer that is not there: one line of our own, not pynetdicom's two ERROR lines
    logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    assoc = ae.associate(host, port, ae_title=aet,
                         tls_args=(tls, host) if tls is not None else None)
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "rejected"
        else:
            try:                # why: ask the network once more (only when it failed)
                socket.create_connection((host, port), timeout=timeout).close()
                reason = "no answer"
            except OSError as exc:
                reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        raise ProbeError(f"no association with {aet}@{host}:{port} ({reason})")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if getattr(status, "Status", None) != 0x0000:
        raise ProbeError(f"C-ECHO to {aet}@{host}:{port} failed")
    return f"C-ECHO {aet}@{host}:{port}: Success"


def probe(destination: Destination, calling: str) -> str:
    """Test a destination as a delivery would reach it; the line to show, or ProbeError."""
    if destination.kind == DestinationKind.dimse:
        tls = None
        if destination.tls:
            from pacs_node.security import client_context
            try:
                tls = client_context(destination)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ProbeError(f"{destination.name}: its TLS certificate, key or CAs "
                                 f"cannot be used ({exc})") from None
        return echo(destination.host, destination.port, destination.ae_title, calling, tls)
    import requests

    url = destination.url.rstrip("/") + "/studies"
    try:
        answer = requests.get(url, params={"limit": "1"}, timeout=TIMEOUT,
                              headers={"Accept": "application/dicom+json"})
    except requests.RequestException as exc:
        raise ProbeError(f"{redact(url)}: {one_line(exc, redact)}") from None
    if answer.status_code >= 400:
        raise ProbeError(f"QIDO-RS {redact(url)}: HTTP {answer.status_code}")
    return f"QIDO-RS {redact(url)}: HTTP {answer.status_code}"
