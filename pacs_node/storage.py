"""Storing one received instance: the contract every receiver keeps.

The DIMSE Storage SCP and the STOW-RS endpoint both hand the instance over
exactly as the sender encoded it (a DICOM Part-10 file, never decoded; only
its header is parsed for the UIDs), in a temporary file beside the received
instances (``incoming/.partial``). It is moved into place atomically (a
rename, after an fsync when ``sync`` is on) under
``data_dir/incoming/STUDY/SERIES/``, recorded in the job store, and only
then reported stored, so that an acknowledged instance survives a crash. An
instance whose SOP Instance UID is stored already is reported stored without
writing it again. Below the configured free disk space nothing is stored
(Out of Resources).

Statuses are the DIMSE C-STORE ones, which STOW-RS reuses as Failure Reasons
(PS3.18 Table I.2-2).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pacs_node.header import InstanceHeader, read_file_header, read_header
from store.api import JobStore, ReceivedInstance

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
#: Implementation-specific (STOW-RS only): the instance is not of the study the URL names.
STUDY_MISMATCH = 0xC409
PROCESSING_FAILURE = 0x0110

_NOT_UID = re.compile(r"[^0-9.]")

@dataclass(frozen=True)
class Outcome:
    """What became of one instance: a status and, when readable, its UIDs."""

    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


class InstanceStorage:
    """Writes received instances into ``data_dir/incoming`` and records them.

    ``sync``: fsync each file before it is recorded (survives a power cut, at
    the disk's fsync latency per instance); without it an acknowledged
    instance survives any crash of the node itself, as the file is complete
    and renamed into place before it is recorded.
    """

    def __init__(self, store: JobStore, data_dir: str | Path, min_free_disk_mb: int = 1024,
                 sync: bool = False) -> None:
        self.store = store
        self.incoming = Path(data_dir) / "incoming"
        self.partial = self.incoming / ".partial"
        self.partial.mkdir(parents=True, exist_ok=True)
        for leftover in self.partial.iterdir():   # never acknowledged: a crash cut them short
            leftover.unlink(missing_ok=True)
        self.min_free = min_free_disk_mb * 1024 * 1024
        self.sync = sync

    def has_room(self) -> bool:
        return shutil.disk_usage(self.incoming).free >= self.min_free

    def temp_file(self) -> Path:
        """A new path for an instance being received (same file system as its home)."""
        return self.partial / f"{uuid.uuid4().hex}.tmp"

    def store_instance(self, data: bytes, origin: str, transfer_syntax: str | None = None,
                       expected_study: str | None = None) -> Outcome:
        """Store one Part-10 encoded instance held in memory (see :meth:`store_file`)."""
        if not self.has_room():
            log.error("refusing an instance from %s: free disk below the configured "
                      "minimum", origin)
            return Outcome(OUT_OF_RESOURCES, reason="free disk below the minimum")
        tmp = self.temp_file()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("an instance from %s was not stored: %s", origin, exc)
            return Outcome(OUT_OF_RESOURCES, reason=f"not stored: {exc}")
        return self.store_file(tmp, origin, transfer_syntax, expected_study)

    def store_file(self, tmp: Path, origin: str, transfer_syntax: str | None = None,
                   expected_study: str | None = None, start: bytes = b"") -> Outcome:
        """Move a received Part-10 file (from :meth:`temp_file`) into place and record it.

        ``origin`` is the calling AE title (or the web client) for the job
        store and the logs; ``transfer_syntax`` defaults to the file meta's;
        ``expected_study`` (STOW-RS ``/studies/{uid}``) refuses other studies;
        ``start``, the data set's first bytes as the SCP received them (with
        ``transfer_syntax``), spares reading the file's header
        (:func:`~pacs_node.header.read_header`).
        The temporary file is gone afterwards, whatever the outcome.
        """
        try:
            try:
                header: InstanceHeader = (read_header(start, transfer_syntax, tmp)
                                          if start and transfer_syntax
                                          else read_file_header(tmp))
                sop_class, sop_uid, study_uid, series_uid = (
                    header.sop_class_uid, header.sop_instance_uid,
                    header.study_instance_uid, header.series_instance_uid)
                syntax = transfer_syntax or header.transfer_syntax_uid
            except Exception as exc:
                log.warning("an instance from %s cannot be understood: %s", origin, exc)
                return Outcome(CANNOT_UNDERSTAND, reason=f"cannot be read: {exc}")
            if expected_study and study_uid != expected_study:
                return Outcome(STUDY_MISMATCH, sop_class, sop_uid, study_uid,
                               "Study Instance UID differs from the one in the URL")
            done = Outcome(SUCCESS, sop_class, sop_uid, study_uid)
            path = self.incoming / _safe(study_uid) / _safe(series_uid) / f"{_safe(sop_uid)}.dcm"
            if path.exists():  # the path is the UID's: this instance is stored already
                log.debug("instance %s already stored", sop_uid)
                return done
            if self.sync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            size = tmp.stat().st_size
            os.replace(tmp, path)
            self.store.record_instance(ReceivedInstance(
                sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                series_instance_uid=series_uid, study_instance_uid=study_uid,
                modality=header.modality, path=str(path), size=size,
                transfer_syntax_uid=syntax, calling_aet=origin[:16],
                images_in_acquisition=header.images_in_acquisition))
            return done
        except OSError as exc:
            log.error("an instance from %s was not stored: %s", origin, exc)
            return Outcome(OUT_OF_RESOURCES, reason=f"not stored: {exc}")
        except Exception as exc:
            log.exception("storing an instance from %s failed", origin)
            return Outcome(PROCESSING_FAILURE, reason=f"processing failure: {exc}")
        finally:
            tmp.unlink(missing_ok=True)


def _safe(uid: str) -> str:
    """A UID as a file name (UIDs are digits and dots; anything else is replaced)."""
    return _NOT_UID.sub("_", uid)[:64] or "_"
