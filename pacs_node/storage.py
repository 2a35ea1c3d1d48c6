"""Storing one received instance: the contract every receiver keeps.

The DIMSE Storage SCP and the STOW-RS endpoint both hand the instance over
exactly as the sender encoded it (a DICOM Part-10 file, never decoded; only
its header is parsed for the UIDs), in a temporary file beside the received
instances (``incoming/.partial``). Its UIDs are checked and turned into a
path by :class:`~pacs_node.layout.DataLayout` (the only code that does so);
the instance is recorded in the job store and moved into place (a rename,
after an fsync when ``sync`` is on) in one transaction, and only then
reported stored, so that an acknowledged instance is on disk *and* recorded.

"Stored already" means recorded: an instance whose SOP Instance UID the job
store holds in the same series is reported stored without being written
again; in another series it is refused (0x0111 Duplicate SOP Instance) and
recorded as an incident, as UIDs are unique and one of the two senders is
wrong. When the job store cannot record (it is locked past its busy
timeout, its file is gone) the file is removed again and the sender told
Out of Resources, so that it sends again later: never Success. Below the
configured free disk space nothing is stored (Out of Resources).

Statuses are the DIMSE C-STORE ones (:class:`pacs_node.dimse.Status`), which
STOW-RS reuses as Failure Reasons (PS3.18 Table I.2-2).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from pacs_node import one_line
from pacs_node.dimse import Status
from pacs_node.header import (InstanceHeader, read_file_header, read_header,
                               refuse_inflation_bomb)
from pacs_node.structure import check_elements
from pacs_node.layout import DataLayout, OutsideDataDir, UIDRefused
from store.api import JobStore, ReceivedInstance, Recorded, StoreUnavailable
from store.models import IncidentKind

log = logging.getLogger(__name__)

# the statuses an instance gets (their table, citing the standard: pacs_node.dimse.Status)
SUCCESS = Status.SUCCESS
OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
CANNOT_UNDERSTAND = Status.CANNOT_UNDERSTAND
STUDY_MISMATCH = Status.STUDY_MISMATCH
PROCESSING_FAILURE = Status.PROCESSING_FAILURE
DUPLICATE_SOP_INSTANCE = Status.DUPLICATE_SOP_INSTANCE
DOES_NOT_MATCH = Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
#: The reason given with Out of Resources when the job store cannot record.
STORE_UNAVAILABLE = "the job store cannot record it now"
#: Incidents recorded for one sender in a minute; its refusals beyond are logged and
#: counted, and the next incident recorded says how many (a sender refused 20 times a
#: second, on each of 16 associations, would otherwise write a million rows an hour).
INCIDENTS_PER_MINUTE = 60


class IncidentBudget:
    """How many incidents each sender may still have recorded this minute."""

    def __init__(self, per_minute: int = INCIDENTS_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._lock = threading.Lock()
        self._senders: dict[str, tuple[float, int, int]] = {}   # origin -> (since, n, skipped)

    def take(self, origin: str) -> int | None:
        """None when ``origin`` has had its incidents this minute (the refusal is counted);
        else how many of its refusals were not recorded since its last incident."""
        now = self.clock()
        with self._lock:
            if len(self._senders) > 4096:            # AE titles are the sender's to choose
                self._senders.clear()
            since, recorded, skipped = self._senders.get(origin, (now, 0, 0))
            if now - since >= 60.0:
                since, recorded = now, 0
            if recorded >= self.per_minute:
                self._senders[origin] = (since, recorded, skipped + 1)
                return None
            self._senders[origin] = (since, recorded + 1, 0)
            return skipped


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
    and renamed into place before it is committed. ``node`` is recorded
    with every series (see :mod:`store.models`).
    """

    def __init__(self, store: JobStore, data_dir: str | Path, min_free_disk_mb: int = 1024,
                 sync: bool = False, node: str = "") -> None:
        self.store = store
        self.layout = DataLayout(data_dir)
        self.incoming = self.layout.incoming
        self.partial = self.layout.partial
        self.partial.mkdir(parents=True, exist_ok=True)
        self.min_free = min_free_disk_mb * 1024 * 1024
        self.sync = sync
        self.node = node
        self._reserved = 0                        # bytes promised to requests in flight
        self._reserved_lock = threading.Lock()
        #: told (origin, status) of every instance offered: the node's metrics
        self.on_outcome: Callable[[str, int], None] | None = None
        self.incident_budget = IncidentBudget()

    def clear_partial(self) -> int:
        """At start-up (under the data folder's lock): remove what a crash cut short.

        Nothing there was acknowledged. Returns how many files were removed.
        """
        removed = 0
        for leftover in self.partial.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def has_room(self, more: int = 0) -> bool:
        """Whether ``more`` bytes fit above the free-disk minimum, besides those
        reserved by requests in flight."""
        return (shutil.disk_usage(self.incoming).free - self._reserved - more
                >= self.min_free)

    def reserve(self, size: int) -> bool:
        """Reserve disk for a request of ``size`` bytes; False when it does not fit."""
        with self._reserved_lock:
            if not self.has_room(size):
                return False
            self._reserved += size
            return True

    def release(self, size: int) -> None:
        with self._reserved_lock:
            self._reserved = max(0, self._reserved - size)

    def temp_file(self) -> Path:
        """A new path for an instance being received (same file system as its home)."""
        return self.partial / f"{uuid.uuid4().hex}.tmp"

    def store_file(self, tmp: Path, origin: str, transfer_syntax: str | None = None,
                   expected_study: str | None = None, start: bytes = b"",
                   announced: tuple[str, str] | None = None) -> Outcome:
        """Record a received Part-10 file and move it into place (see :meth:`_store`);
        the outcome is told to :attr:`on_outcome`."""
        outcome = self._store(tmp, origin, transfer_syntax, expected_study, start, announced)
        if self.on_outcome is not None:
            self.on_outcome(origin, outcome.status)
        return outcome

    def _store(self, tmp: Path, origin: str, transfer_syntax: str | None,
               expected_study: str | None, start: bytes,
               announced: tuple[str, str] | None = None) -> Outcome:
        """Record a received Part-10 file (from :meth:`temp_file`) and move it into place.

        ``origin`` is the calling AE title (or the web client) for the job
        store and the logs; ``transfer_syntax`` defaults to the file meta's;
        ``expected_study`` (STOW-RS ``/studies/{uid}``) refuses other studies;
        ``start``, the data set's first bytes as the SCP received them (with
        ``transfer_syntax``), spares reading the file's header
        (:func:`~pacs_node.header.read_header`); ``announced``, the SOP Class and
        Instance UIDs a C-STORE's command gave, refuses a data set that is another
        (0xA900, as DCMTK's storescp).
        The temporary file is gone afterwards, whatever the outcome.
        """
        placed: int | None = None       # the inode of the file moved into place
        path: Path | None = None
        try:
            for check, status in ((refuse_inflation_bomb, OUT_OF_RESOURCES),
                                  (check_elements, CANNOT_UNDERSTAND)):
                try:
                    check(tmp, transfer_syntax)
                except ValueError as exc:       # (its header unread: the command's UIDs)
                    return self._refused(status, str(exc), origin, InstanceHeader(
                        *(announced or ("", "")), "", "", transfer_syntax or ""))
            try:
                header: InstanceHeader = (read_header(start, transfer_syntax, tmp)
                                          if start and transfer_syntax
                                          else read_file_header(tmp))
            except Exception as exc:
                log.warning("an instance from %s cannot be understood: %s", origin,
                            one_line(exc))
                self.record_refusal(origin, "cannot be read as DICOM",
                                    announced[1] if announced else "")
                return Outcome(CANNOT_UNDERSTAND, reason="cannot be read as DICOM")
            sop_class, sop_uid, study_uid, series_uid = (
                header.sop_class_uid, header.sop_instance_uid,
                header.study_instance_uid, header.series_instance_uid)
            if announced is not None and announced != (sop_class, sop_uid):
                return self._refused(DOES_NOT_MATCH, "the data set's SOP Class or Instance "
                                     "UID is not the one its C-STORE command gave", origin,
                                     header)
            syntax = transfer_syntax or header.transfer_syntax_uid
            try:
                # proved inside the data folder before anything is written there
                path = self.layout.inside(self.layout.instance_path(study_uid, series_uid,
                                                                    sop_uid))
            except UIDRefused as exc:
                return self._refused(CANNOT_UNDERSTAND, str(exc), origin, header)
            except OutsideDataDir as exc:       # a link planted in the data folder, say
                log.error("an instance from %s was not stored: %s", origin, exc)
                return Outcome(OUT_OF_RESOURCES, reason="not stored: path outside the data "
                                                        "folder")
            if expected_study and study_uid != expected_study:
                return Outcome(STUDY_MISMATCH, sop_class, sop_uid, study_uid,
                               "Study Instance UID differs from the one in the URL")
            if self.sync:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            size = tmp.stat().st_size

            def place() -> None:
                nonlocal placed
                inode = tmp.stat().st_ino
                os.replace(tmp, path)
                placed = inode

            with self.layout.series_guard(series_uid):    # never while retention removes it
                path.parent.mkdir(parents=True, exist_ok=True)
                recorded = self.store.record_instance(ReceivedInstance(
                    sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                    series_instance_uid=series_uid, study_instance_uid=study_uid,
                    modality=header.modality, path=str(path), size=size,
                    transfer_syntax_uid=syntax, calling_aet=origin[:16],
                    images_in_acquisition=header.images_in_acquisition, node=self.node),
                    place)
            if recorded is Recorded.other_series:
                return self._refused(DUPLICATE_SOP_INSTANCE, recorded.value, origin, header,
                                     IncidentKind.duplicate)
            if recorded is Recorded.other_study:
                return self._refused(CANNOT_UNDERSTAND, recorded.value, origin, header)
            if recorded is Recorded.stored_already:
                log.debug("instance %s already stored", sop_uid)
            return Outcome(SUCCESS, sop_class, sop_uid, study_uid)
        except (StoreUnavailable, SQLAlchemyError) as exc:
            self._unplace(placed, path)
            log.error("an instance from %s was refused: the job store cannot record it (%s)",
                      origin, one_line(exc))
            return Outcome(OUT_OF_RESOURCES, reason=STORE_UNAVAILABLE)
        except OSError as exc:
            self._unplace(placed, path)
            log.error("an instance from %s was not stored: %s", origin, exc)
            return Outcome(OUT_OF_RESOURCES, reason=f"not stored: {exc.strerror or exc}")
        except Exception as exc:
            self._unplace(placed, path)
            log.exception("storing an instance from %s failed", origin)
            return Outcome(PROCESSING_FAILURE, reason=f"processing failure: "
                                                      f"{type(exc).__name__}")
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _unplace(placed: int | None, path: Path | None) -> None:
        """The file was moved into place but its row never committed: remove it
        (unless another sender of the same instance has put its own there since)."""
        if placed is None or path is None:
            return
        try:
            if path.stat().st_ino == placed:
                path.unlink()
        except OSError:
            pass

    def record_refusal(self, origin: str, reason: str, sop_instance_uid: str = "",
                       series_instance_uid: str = "",
                       kind: IncidentKind = IncidentKind.refused) -> None:
        """An incident for an instance not stored (its UIDs as far as they are known: the
        command's when the header was not read, none over STOW-RS then), within the
        sender's :class:`IncidentBudget`."""
        skipped = self.incident_budget.take(origin)
        if skipped is None:
            return
        if skipped:
            reason += (f" (and {skipped} refusals of this sender before it, not recorded "
                       f"one by one: at most {self.incident_budget.per_minute} a minute; "
                       f"the log has each)")
        try:
            self.store.record_incident(kind, reason, node=self.node, origin=origin,
                                       series_instance_uid=series_instance_uid,
                                       sop_instance_uid=sop_instance_uid)
        except Exception as exc:          # the refusal stands; the log has it
            log.error("the refusal could not be recorded: %s", one_line(exc))

    def _refused(self, status: int, reason: str, origin: str, header: InstanceHeader,
                 kind: IncidentKind = IncidentKind.refused) -> Outcome:
        log.warning("an instance from %s was refused (0x%04X): %s", origin, status, reason)
        self.record_refusal(origin, reason, header.sop_instance_uid,
                            header.series_instance_uid, kind)
        return Outcome(status, header.sop_class_uid, header.sop_instance_uid[:64],
                       header.study_instance_uid[:64], reason)
