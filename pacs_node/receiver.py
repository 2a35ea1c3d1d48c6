"""The node's DICOM listener: Verification and Storage for every storage SOP class.

For every C-STORE the data set is streamed, exactly as the peer encoded it
(never decoded), into a temporary file; :class:`~pacs_node.storage.InstanceStorage`
moves it into place and records it in the job store; only then is the
C-STORE answered, with Success or the storage's status (0xA700 Out of
Resources on low disk, 0xC000 when the header cannot be read). Accepted
sockets get TCP_NODELAY, or every small PDU waits ~40 ms on Nagle's
algorithm. A non-empty allow-list of calling AE titles rejects other callers
at association; the gate, DICOM TLS and user identity are the SCP's (see
:mod:`pacs_node.scp`, :mod:`pacs_node.peers`, :mod:`pacs_node.security`).
The association layer is :mod:`pacs_node.scp` (pynetdicom negotiates; the
data phase is lean, see there why).

Logs carry UIDs and AE titles, never patient names or IDs.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AllStoragePresentationContexts, build_context
from pynetdicom.sop_class import Verification

from pacs_node.peers import PeerGate
from pacs_node.scp import Authenticator, StorageSCP
from pacs_node.storage import InstanceStorage
from store.api import JobStore

log = logging.getLogger(__name__)

#: What the node accepts: everything the series loader decodes.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1,
                     JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit]
MAX_ASSOCIATIONS = 16


def supported_contexts():
    """Verification, and every storage SOP class with the transfer syntaxes above."""
    contexts = [build_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
                for cx in AllStoragePresentationContexts]
    return contexts + [build_context(Verification, [ExplicitVRLittleEndian,
                                                    ImplicitVRLittleEndian])]


class Receiver:
    """Receives instances over DIMSE into ``data_dir/incoming`` (see InstanceStorage)."""

    def __init__(self, store: JobStore, data_dir: str | Path, ae_title: str = "LUNGSYS",
                 allowed_calling_aets: list[str] | None = None,
                 min_free_disk_mb: int = 1024, sync: bool = False, *, node: str = "",
                 max_associations: int = MAX_ASSOCIATIONS, timeout: float = 60.0,
                 gate: PeerGate | None = None, tls: ssl.SSLContext | None = None,
                 authenticate: Authenticator | None = None,
                 max_associations_per_peer: int | None = None) -> None:
        self.storage = InstanceStorage(store, data_dir, min_free_disk_mb, sync=sync, node=node)
        self.scp = StorageSCP(ae_title, supported_contexts(), self._store,
                              self.storage.temp_file, self.storage.has_room,
                              allowed_calling_aets, max_associations, timeout, gate, tls,
                              authenticate, refused=self.storage.record_refusal,
                              max_associations_per_peer=max_associations_per_peer)
        self.ae_title = ae_title

    def _store(self, path: Path, calling: str, transfer_syntax: str, start: bytes,
               announced: tuple[str, str]) -> int:
        return self.storage.store_file(path, calling, transfer_syntax, start=start,
                                       announced=announced).status

    def start(self, host: str, port: int) -> None:
        self.scp.start(host, port)
        log.info("listening as %s on %s:%d", self.ae_title, host, self.port)

    @property
    def port(self) -> int:
        return self.scp.port

    def stop(self) -> None:
        self.scp.stop()
