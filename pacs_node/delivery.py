"""Sending results to PACS: DIMSE C-STORE (pynetdicom) or DICOMweb STOW-RS.

One association (or one STOW request) per delivery carries all of a job's
result files, over DICOM TLS when the destination says ``tls = true`` (its
certificate checked against ``ca_certificates``, see :mod:`pacs_node.security`);
every C-STORE status is checked, and any failure (a status, no response in time, an
association aborted midway) fails the attempt, which the scheduler retries with
exponential backoff. Only the outcome and the error text are logged, never patient data.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import time
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from config import Destination, DestinationKind
from pacs_node import one_line
from pacs_node.dimse import STORED

log = logging.getLogger(__name__)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class DeliveryError(Exception):
    """A delivery attempt that did not store every object; the message says why.
    ``permanent``: trying again cannot help (the peer refuses what is sent as it is)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


def send_dimse(destination: Destination, files: list[Path], calling_aet: str,
               timeout: float = 60.0) -> None:
    """C-STORE every file over one association; raise DeliveryError on any failure."""
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    # every SOP class sent, in the uncompressed syntaxes and, for a compressed object (a
    # JPEG 2000 SEG), in its own syntax as a context apart, so the peer can refuse just that
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                     for ds in datasets}):
        if syntax not in UNCOMPRESSED:
            ae.add_requested_context(sop_class, [syntax])
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, list(UNCOMPRESSED))
    tls_args = None
    if destination.tls:
        from pacs_node.security import client_context
        tls_args = (client_context(destination), destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(f"association with {destination.ae_title}@{destination.host}:"
                            f"{destination.port} not established "
                            f"({'rejected' if assoc.is_rejected else _why_not(destination)})")
    failures, refused = [], 0
    try:
        for n, ds in enumerate(datasets):
            syntax = ds.file_meta.TransferSyntaxUID
            if syntax not in UNCOMPRESSED and not any(
                    c.abstract_syntax == ds.SOPClassUID and c.transfer_syntax[0] == syntax
                    for c in assoc.accepted_contexts):
                failures.append(f"{ds.SOPClassUID.name} in {syntax.name} not accepted by the "
                                f"peer (set [results] seg_compression = \"none\")")
                refused += 1
                continue
            started = time.monotonic()
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                # no response in time, an invalid one, or the peer went away: pynetdicom has
                # ended the association (or is ending it), so what is left waits for the
                # next attempt
                failures.append(_no_status(assoc, time.monotonic() - started, timeout))
                failures += ["association aborted"] * (len(datasets) - n - 1)
                break
            if code not in STORED:
                failures.append(f"status 0x{code:04X}")
    finally:
        assoc.release()
    if failures:
        raise DeliveryError(f"{len(failures)} of {len(datasets)} objects not stored "
                            f"({failures[0]})", permanent=refused == len(failures))


def _no_status(assoc, waited: float, timeout: float) -> str:
    """Why a C-STORE got no status (pynetdicom answers each case with an empty one)."""
    if assoc.acse.is_aborted():
        return "association aborted by the peer"
    if waited >= timeout:
        return f"no response within {timeout:g} s"
    return "no valid response"


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """``text`` without the user names and passwords of URLs in it (``http://u:p@host``):
    what errors may say in logs, the job store and webhooks."""
    return _CREDENTIALS.sub("", text or "")


def _why_not(destination: Destination) -> str:
    """Why no association came about, in the words of the network (pynetdicom's own two
    ERROR lines are silenced: see :data:`pacs_node.QUIET_LIBRARIES`)."""
    try:
        socket.create_connection((destination.host, destination.port), timeout=10).close()
    except OSError as exc:
        return (exc.strerror or str(exc) or type(exc).__name__).lower()
    return "no answer"


def send_stow(destination: Destination, files: list[Path], timeout: float = 60.0) -> None:
    """STOW-RS every file in one request; raise DeliveryError when the server refuses."""
    from dicomweb_client.api import DICOMwebClient

    datasets = [pydicom.dcmread(f) for f in files]
    client = DICOMwebClient(url=destination.url)
    try:
        response = client.store_instances(datasets=datasets)
    except Exception as exc:
        raise DeliveryError(f"STOW-RS to {redact(destination.url)} failed: "
                            f"{one_line(exc, redact)}") from None
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise DeliveryError(f"STOW-RS: {len(failed)} of {len(datasets)} objects refused")


def send(destination: Destination, files: list[Path], calling_aet: str) -> None:
    if destination.kind == DestinationKind.dimse:
        send_dimse(destination, files, calling_aet)
    elif destination.kind == DestinationKind.dicomweb:
        send_stow(destination, files)
    else:
        raise DeliveryError(f"unknown destination kind {destination.kind!r}")


def backoff(attempts: int, initial: float, maximum: float) -> dt.timedelta:
    """Wait before the next attempt: initial, doubling after every failure, capped."""
    return dt.timedelta(seconds=min(initial * 2 ** max(attempts - 1, 0), maximum))
