"""The data folder: the one place where a UID becomes a path, and where paths are checked.

Every UID a sender names is hostile until proved otherwise. A Study Instance
UID of ``..`` or ``/etc`` must never turn into a folder that the receiver
writes to or the retention sweep deletes, and two different UIDs must never
share a file name. So the node files nothing by a UID directly; it asks
:class:`DataLayout`, which applies one policy everywhere (DIMSE, STOW-RS,
the worker's results, retention):

- a *conformant* UID (PS3.5 9.1: components of digits without leading zeros,
  separated by single dots, at most 64 characters) is its own file name: an
  admin can find an instance on disk by its UID;
- a *non-conformant but usable* UID (1 to 64 printable ASCII characters
  without a backslash: e.g. a component with a leading zero, which older
  modalities still write) is filed under ``_`` and the first 40 hex digits of
  its SHA-256 (a conformant UID never starts with ``_``, so the two kinds
  never meet, and two hashed UIDs collide with a chance of 2^-160);
- anything else (empty, longer than 64 characters, control or non-ASCII
  characters) is *refused* (:class:`UIDRefused`: C-STORE 0xC000, a STOW-RS
  Failure Reason), as the node could neither record it nor refer to it in
  its results.

Besides, every path that is written or deleted is resolved and proved to lie
inside the data folder first (:meth:`DataLayout.inside`), so that a bug
elsewhere cannot turn into a write or a delete outside it.

The folder holds::

    .lock                     held by the running node (one node per data folder)
    incoming/.partial/        instances being received (removed at start-up)
    incoming/STUDY/SERIES/    received instances, SOP.dcm
    results/STUDY/SERIES/vN/aK/  what a job wrote (version N of the series, claim K)
    quarantine/               files found at start-up that cannot be recorded
    work/job-J-aK/            a worker over WADO-RS (its own folder): claim K of job J's
                              instances and results while it runs (removed after)
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import threading
import zlib
from pathlib import Path

_CONFORMANT = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_USABLE = re.compile(r"[\x21-\x5b\x5d-\x7e]{1,64}")     # printable ASCII, no backslash
MAX_UID = 64
#: Receiving into a series and removing it (retention) take turns on one of these.
_GUARDS = [threading.Lock() for _ in range(64)]


class UIDRefused(ValueError):
    """A UID the node cannot file, record or refer to; the message says which and why."""


class OutsideDataDir(ValueError):
    """A path that would leave the data folder (never written or deleted)."""


class DataDirInUse(OSError):
    """Another process holds the data folder's lock."""


def is_conformant(uid: str) -> bool:
    """A UID as PS3.5 9.1 defines it."""
    return len(uid) <= MAX_UID and _CONFORMANT.fullmatch(uid) is not None


def uid_name(uid: str, what: str = "UID") -> str:
    """The file or folder name of a UID under the policy above; UIDRefused if none."""
    if is_conformant(uid):
        return uid
    if _USABLE.fullmatch(uid):
        return "_" + hashlib.sha256(uid.encode("ascii")).hexdigest()[:40]
    if not uid:
        raise UIDRefused(f"{what} is missing")
    if len(uid) > MAX_UID:
        raise UIDRefused(f"{what} is {len(uid)} characters long, above {MAX_UID}")
    raise UIDRefused(f"{what} holds characters a UID cannot have")


class DataLayout:
    """The data folder's paths; the only code that turns UIDs into paths."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir).absolute().resolve()
        self.incoming = self.root / "incoming"
        self.partial = self.incoming / ".partial"
        self.results = self.root / "results"
        self.quarantine = self.root / "quarantine"
        self.work = self.root / "work"
        self._lock: LockFile | None = None

    # --- UIDs to paths ---------------------------------------------------------
    def series_folder(self, study_uid: str, series_uid: str) -> Path:
        return self.incoming / uid_name(study_uid, "Study Instance UID") / uid_name(
            series_uid, "Series Instance UID")

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives; UIDRefused for a UID the policy refuses."""
        return (self.series_folder(study_uid, series_uid)
                / f"{uid_name(sop_uid, 'SOP Instance UID')}.dcm")

    def results_folder(self, study_uid: str, series_uid: str, version: int | None = None,
                       attempt: int | None = None) -> Path:
        """Where the results of a series are written (of one version of it; of one claim
        of that version's job: a job taken over from a worker still writing never shares
        its files)."""
        folder = self.results / uid_name(study_uid, "Study Instance UID") / uid_name(
            series_uid, "Series Instance UID")
        if version is not None:
            folder = folder / f"v{int(version)}"
        return folder if attempt is None else folder / f"a{int(attempt)}"

    def work_folder(self, job_id: int, attempt: int) -> Path:
        """Where a worker over WADO-RS keeps one claim of a job while it runs it."""
        return self.work / f"job-{int(job_id)}-a{int(attempt)}"

    @staticmethod
    def series_guard(series_uid: str) -> threading.Lock:
        """The lock that storing into a series and removing it take in turn, so that
        retention never removes an instance acknowledged meanwhile."""
        return _GUARDS[zlib.crc32(series_uid.encode("utf-8", "replace")) % len(_GUARDS)]

    # --- checks ----------------------------------------------------------------
    def inside(self, path: str | os.PathLike) -> Path:
        """``path`` resolved (links followed), if it lies strictly inside the data folder."""
        resolved = Path(path).absolute().resolve()
        if resolved == self.root or self.root not in resolved.parents:
            raise OutsideDataDir(f"{path} is not inside the data folder {self.root}")
        return resolved

    def remove_series(self, study_uid: str, series_uid: str) -> None:
        """Delete a series' received instances and results (retention)."""
        for folder in (self.series_folder(study_uid, series_uid),
                       self.results_folder(study_uid, series_uid)):
            self.remove_tree(folder)

    def remove_tree(self, folder: str | os.PathLike) -> None:
        """Delete a folder below incoming/, results/ or work/ (never one of those);
        OSError when something in it could not be removed."""
        path = Path(folder).absolute()
        if path.is_symlink():               # a link is removed, never what it points to
            path = self.inside(path.parent) / path.name
            path.unlink()
            return
        resolved = self.inside(path)
        if not any(top in resolved.parents for top in (self.incoming, self.results,
                                                       self.work)):
            raise OutsideDataDir(f"{folder} is not below {self.incoming}, {self.results} "
                                 f"or {self.work}")
        if resolved.exists():
            shutil.rmtree(resolved)

    def quarantine_file(self, path: str | os.PathLike) -> Path:
        """Move a file found in incoming/ to quarantine/, keeping its relative path."""
        source = self.inside(path)
        target = self.quarantine / source.relative_to(self.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return target

    # --- one node per folder ---------------------------------------------------
    def lock(self, holder: str = "lungsys serve") -> None:
        """Take the data folder's exclusive lock for this process (DataDirInUse if held)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = LockFile(self.root / ".lock")
        self._lock.acquire(holder)

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()


class LockFile:
    """An exclusive lock held by this process while it lives (flock).

    The lock goes with the process: a node that dies, however it dies,
    leaves the file free for the next. The file says who holds it.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, holder: str = "lungsys serve") -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DataDirInUse(f"{self.path.parent} is in use by {owner}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({holder})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
