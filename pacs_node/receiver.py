"""The Storage and Verification SCP (pynetdicom): receive, write, record, acknowledge.

For every C-STORE: the dataset is written exactly as the peer encoded it
(``event.encoded_dataset()``, never decoded; only its header is parsed for the
UIDs), atomically (a temporary file, fsync, rename), recorded in the job
store, and only then acknowledged with Success. A SOP Instance UID already
stored is acknowledged without writing it again. With less free disk than
configured the node answers 0xA700 (Out of Resources) and stores nothing.
Accepted sockets get TCP_NODELAY, or every small PDU waits ~40 ms on Nagle's
algorithm. A non-empty allow-list of calling AE titles rejects other callers
at association.

Logs carry UIDs and AE titles, never patient names or IDs.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import threading
from pathlib import Path

import pydicom
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
                         ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
                         JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from store.api import JobStore, ReceivedInstance

log = logging.getLogger(__name__)

#: What the node accepts: everything the series loader decodes.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                     DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEGLosslessSV1,
                     JPEGLossless, JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
                     RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                "Modality", "ImagesInAcquisition"]


class Receiver:
    """Receives instances into ``data_dir/incoming`` and records them in the store."""

    def __init__(self, store: JobStore, data_dir: str | Path, ae_title: str = "LUNGSYS",
                 allowed_calling_aets: list[str] | None = None,
                 min_free_disk_mb: int = 1024) -> None:
        self.store = store
        self.incoming = Path(data_dir) / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.min_free = min_free_disk_mb * 1024 * 1024
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_associations = 16
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        if allowed_calling_aets:
            self.ae.require_calling_aet = list(allowed_calling_aets)
        self.server = None
        self._lock = threading.Lock()
        self.received = 0

    def start(self, host: str, port: int) -> None:
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda e: SUCCESS),
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
        calling = event.assoc.requestor.ae_title
        try:
            if shutil.disk_usage(self.incoming).free < self.min_free:
                log.error("refusing C-STORE from %s: free disk below the configured minimum",
                          calling)
                return OUT_OF_RESOURCES
            data = event.encoded_dataset(include_meta=True)
            try:
                header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                         specific_tags=_HEADER_TAGS)
                sop_uid = str(header.SOPInstanceUID)
                series_uid, study_uid = str(header.SeriesInstanceUID), str(
                    header.StudyInstanceUID)
            except Exception as exc:
                log.warning("C-STORE from %s cannot be understood: %s", calling, exc)
                return CANNOT_UNDERSTAND
            path = self.incoming / _safe(study_uid) / _safe(series_uid) / f"{_safe(sop_uid)}.dcm"
            if path.exists():  # the path is the UID's: this instance is stored already
                log.debug("instance %s already stored", sop_uid)
                return SUCCESS
            _write_atomically(path, data)
            expected = header.get("ImagesInAcquisition")
            self.store.record_instance(ReceivedInstance(
                sop_instance_uid=sop_uid, sop_class_uid=str(header.SOPClassUID),
                series_instance_uid=series_uid, study_instance_uid=study_uid,
                modality=str(header.get("Modality", "")), path=str(path), size=len(data),
                transfer_syntax_uid=str(event.context.transfer_syntax), calling_aet=calling,
                images_in_acquisition=int(expected) if expected not in (None, "") else None))
            with self._lock:
                self.received += 1
            return SUCCESS
        except OSError as exc:
            log.error("C-STORE from %s not stored: %s", calling, exc)
            return OUT_OF_RESOURCES
        except Exception:
            log.exception("C-STORE from %s failed", calling)
            return PROCESSING_FAILURE


def _safe(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    return "".join(c if c.isdigit() or c == "." else "_" for c in uid)[:64] or "_"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _nodelay(event) -> None:
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # not fatal: only slower
        log.debug("TCP_NODELAY not set: %s", exc)


def _log_rejected(event) -> None:
    log.warning("association from %s rejected", event.assoc.requestor.ae_title)
