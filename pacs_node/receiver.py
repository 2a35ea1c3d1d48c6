"""The Storage and Verification SCP (pynetdicom): receive, write, record, acknowledge.

For every C-STORE the encoded dataset (``event.encoded_dataset()``, never
decoded) goes to :class:`~pacs_node.storage.InstanceStorage`, which writes
it atomically and records it in the job store; only then is the C-STORE
acknowledged, with Success or the storage's status (0xA700 Out of Resources
on low disk, 0xC000 when the header cannot be read). Accepted sockets get
TCP_NODELAY, or every small PDU waits ~40 ms on Nagle's algorithm. A
non-empty allow-list of calling AE titles rejects other callers at
association.

Logs carry UIDs and AE titles, never patient names or IDs.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from pacs_node.storage import InstanceStorage
from store.api import JobStore

log = logging.getLogger(__name__)

#: What the node accepts: everything the series loader decodes.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1,
                     JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit]


class Receiver:
    """Receives instances over DIMSE into ``data_dir/incoming`` (see InstanceStorage)."""

    def __init__(self, store: JobStore, data_dir: str | Path, ae_title: str = "LUNGSYS",
                 allowed_calling_aets: list[str] | None = None,
                 min_free_disk_mb: int = 1024) -> None:
        self.storage = InstanceStorage(store, data_dir, min_free_disk_mb)
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_associations = 16
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        if allowed_calling_aets:
            self.ae.require_calling_aet = list(allowed_calling_aets)
        self.server = None

    def start(self, host: str, port: int) -> None:
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda e: 0x0000),
                    (evt.EVT_CONN_OPEN, _nodelay), (evt.EVT_REJECTED, _log_rejected)]
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d", self.ae.ae_title, host, port)

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def handle_store(self, event) -> int:
        outcome = self.storage.store_instance(event.encoded_dataset(include_meta=True),
                                              event.assoc.requestor.ae_title,
                                              str(event.context.transfer_syntax))
        return outcome.status


def _nodelay(event) -> None:
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # not fatal: only slower
        log.debug("TCP_NODELAY not set: %s", exc)


def _log_rejected(event) -> None:
    log.warning("association from %s rejected", event.assoc.requestor.ae_title)
