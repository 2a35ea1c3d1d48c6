"""Each study's part of an evaluation, kept on disk, so that no study is analysed twice.

`lungsys evaluate` spends nearly all its time in the engine: about 35 s per 300-slice
study on a 2-core CPU, ten minutes for a fresh set of 100 phantom patients. `--split
test` followed by `--split all`, a comparison naming a model evaluated before, or an
evaluation stopped with Ctrl-C and started again would analyse the same studies again.
What a study adds to the report (its patient scores, its slices' scores, its
pointing-game hits, Dice and infected-fraction error, and its seconds) is small, and is
kept under the dataset's cache (``DATA/.lungsys-cache/evaluated-KEY``, a file per study
named by a digest of its folder). The key names
everything the figures depend on: the model's weights and profile, the engine's
settings, the machine the seconds were timed on, and the source of the code that
computed them; a study is analysed again when its files, its annotations, its masks or
its label changed since. Each new model or code change starts a new folder, so only the
:data:`KEEP_EVALUATIONS` most recently used are kept; older ones are removed (nothing but
this module's own files is ever removed).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.choices import PatientMethod
from training.cache import files_signature
from training.dataset import StudyEntry

log = logging.getLogger(__name__)

METHODS = tuple(PatientMethod)
#: Bumped when what a study's part holds changes (older parts are then not read).
VERSION = "1"
#: How many evaluations' folders a cache keeps (the most recently used; each is small,
#: a few kilobytes a study, but every model and every code change adds one); one used in
#: the last hour is kept whatever their number (a comparison of many models, run again).
KEEP_EVALUATIONS = 12
KEEP_SECONDS = 3600
_FOLDER = re.compile(r"evaluated-[0-9a-f]{16}")
_PART = re.compile(r"[0-9a-f]{24}\.json")


@dataclass
class Collected:
    """What the studies of an evaluation add to its report, study after study."""

    labels: list[int] = field(default_factory=list)
    scores: dict[str, list] = field(default_factory=lambda: {m: [] for m in METHODS})
    preds: dict[str, list[int]] = field(default_factory=lambda: {m: [] for m in METHODS})
    slice_labels: list[int] = field(default_factory=list)
    slice_scores: list = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)
    #: the hits on the lesion slices the model flags (task 1 says lesion: a region, a box)
    flagged_hits: list[bool] = field(default_factory=list)
    dices: list[float] = field(default_factory=list)
    fraction_errors: list[float] = field(default_factory=list)
    #: a lesion-typing model's slices: the annotated types (0/1) and the predicted chances
    type_truth: list[list[int]] = field(default_factory=list)
    type_scores: list[list[float]] = field(default_factory=list)
    #: each study's seconds in the engine and its number of slices
    seconds: list[float] = field(default_factory=list)
    slice_counts: list[int] = field(default_factory=list)

    def extend(self, other: "Collected") -> None:
        """Add ``other``'s studies after these."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for method in METHODS:
                    mine[method].extend(theirs[method])
            else:
                mine.extend(theirs)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=_plain))

    @classmethod
    def from_json(cls, data: dict) -> "Collected":
        found = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        found.scores = {m: data["scores"][str(m)] for m in METHODS}
        found.preds = {m: data["preds"][str(m)] for m in METHODS}
        return found


def _plain(value):
    """numpy's values as JSON's."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The source of what computes a study's part: the inference package (the engine, the
    maps, the series loading), the evaluation's own modules, and the versions of the
    libraries whose numbers they use."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "inference").glob("*.py")) + [
        root / "training" / name for name in ("evaluate.py", "evaluated.py", "metrics.py",
                                              "dataset.py")]
    h = hashlib.sha256(" ".join(_version(name) for name in (
        "torch", "numpy", "scipy", "scikit-image", "pydicom")).encode())
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _version(name: str) -> str:
    """A library's installed version ("unknown" where its distribution is not named so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return f"{name} unknown"


class EvaluationCache:
    """The studies' parts of one model's evaluation with one engine on one machine."""

    def __init__(self, cache_dir: str | Path, engine, timed_on: str) -> None:
        settings = {"version": VERSION, "model": engine.model_info.to_json(),
                    "metadata_profile": engine.model.metadata.get("profile"),
                    "t": engine.t, "timed_on": timed_on, "code": code_digest()}
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                                  .encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_dir)
        self.writable = True
        self._used = False

    def _where(self, entry: StudyEntry) -> tuple[Path, str]:
        """The study's file (named by a digest of its folder: folder names may be patient
        IDs) and what its files and label are now."""
        extra = [p for p in (entry.annotations, entry.masks) if p is not None]
        signature = f"{files_signature(entry.path, extra, VERSION)}|label {entry.label}"
        name = hashlib.sha256(str(entry.path).encode()).hexdigest()[:24]
        return self.cache_dir / f"evaluated-{self.key}" / f"{name}.json", signature

    def get(self, entry: StudyEntry) -> Collected | None:
        """The study's part, when it was kept for these files, this model and this code."""
        path, signature = self._where(entry)
        try:
            kept = json.loads(path.read_text())
            if kept["signature"] != signature:
                return None
            part = Collected.from_json(kept["part"])
        except (OSError, ValueError, KeyError, TypeError):
            return None                        # not kept, or not readable: analyse again
        self._use()
        return part

    def put(self, entry: StudyEntry, part: Collected) -> None:
        """Keep the study's part (written whole: a file renamed into place)."""
        if not self.writable:
            return
        path, signature = self._where(entry)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:                                   # (another evaluation may write it meanwhile)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"signature": signature, "part": part.to_json()}))
            tmp.replace(path)
            self._use()
        except OSError as exc:                 # a read-only dataset: evaluate all the same
            tmp.unlink(missing_ok=True)
            log.warning("evaluation results are not kept in %s: %s", self.cache_dir,
                        exc.strerror or exc)
            self.writable = exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS)

    def _use(self) -> None:
        """Once per evaluation: mark its folder as used now, and remove the folders of all
        but the :data:`KEEP_EVALUATIONS` most recently used evaluations (none used in the
        last :data:`KEEP_SECONDS`)."""
        if self._used or not self.writable:
            return
        self._used = True
        try:
            os.utime(self.cache_dir / f"evaluated-{self.key}")
            folders = sorted((p for p in self.cache_dir.iterdir() if _FOLDER.fullmatch(p.name)
                              and p.is_dir() and not p.is_symlink()),
                             key=lambda p: p.stat().st_mtime, reverse=True)
        except OSError:
            return                             # (read-only: get() found it; keep it so)
        removed, recent = 0, time.time() - KEEP_SECONDS
        for folder in folders[KEEP_EVALUATIONS:]:
            try:
                if folder.stat().st_mtime > recent:
                    continue
                for part in folder.iterdir():
                    if _PART.fullmatch(part.name) or part.name.endswith(".tmp"):
                        part.unlink()
                folder.rmdir()                 # (not when anything else lies in it)
                removed += 1
            except OSError:
                continue                       # another evaluation's, in use: next time
        if removed:
            log.info("removed the kept results of %d older evaluation(s) from %s", removed,
                     self.cache_dir)
