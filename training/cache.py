"""Preprocessed slices cached on disk, so that epochs never re-decode DICOM.

For each study, input size and crop: the lung crops (the paper's, or the
mirrored ones of ``--crop mirrored``) resized to the input size (HU,
float16), the crop boxes, the slices' SOP Instance UIDs in series order, and
from the annotations each slice's lesion flag, lesion fraction and lesion
types (LA-DNN's five; -1 where unknown); for a volume model (dual sampling)
the resampled lung volume with its infection mask and infected ratio. The
cache file is rebuilt when the study's files change.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.ladnn import LESION_TYPES
from inference.preprocess import prepare
from inference.series import load_series
from training.dataset import StudyEntry

CACHE_VERSION = "2"
#: The volumes' own (dual sampling): their lung masks with holes filled since "2".
VOLUME_CACHE_VERSION = "2"


@dataclass
class CachedStudy:
    """One study's preprocessed slices and labels, as the cache holds them."""

    entry: StudyEntry
    crops: np.ndarray        # (n, size, size) float16, HU
    boxes: np.ndarray        # (n, 4) int
    sop_uids: list[str]
    has_lesion: np.ndarray   # (n,) int8: 1 lesion, 0 none, -1 unknown
    lesion_fraction: np.ndarray  # (n,) float32, -1 unknown
    lesion_types: np.ndarray     # (n, 5) int8: 1 shown, 0 not, -1 unknown (inference.ladnn)

    def __len__(self) -> int:
        return len(self.sop_uids)


def files_signature(folder: Path, extra: list[Path], version: str = CACHE_VERSION) -> str:
    """What changes when a study's files (the folder's, and ``extra``) change: their
    names, sizes and modification times."""
    h = hashlib.sha256(version.encode())
    for p in sorted(q for q in folder.rglob("*") if q.is_file()) + extra:
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cache_path(cache_dir: Path, entry: StudyEntry, size: int | str, kind: str = "crops") -> Path:
    key = hashlib.sha256(str(entry.path).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{kind}-{size}" / f"{entry.path.name}-{key}.npz"


def _cached(path: Path, signature: str) -> dict[str, np.ndarray] | None:
    """A cache file's arrays, when it was made from the study's files as they are now."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as npz:
        return dict(npz) if str(npz["signature"]) == signature else None


def _store(path: Path, signature: str, **arrays: np.ndarray) -> None:
    """Write a cache file whole (a temporary file renamed), with its signature."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez(tmp, signature=np.array(signature), **arrays)
    tmp.replace(path)


def load_study(entry: StudyEntry, size: int, cache_dir: Path,
               crop: str = "lungs") -> CachedStudy:
    """The study's preprocessed slices, from the cache or made (and cached) now."""
    extra = [p for p in (entry.annotations,) if p is not None]
    signature = files_signature(entry.path, extra)
    path = cache_path(cache_dir, entry, size, "crops" if crop == "lungs" else f"crops-{crop}")
    npz = _cached(path, signature)
    if npz is not None:
        return CachedStudy(entry, npz["crops"], npz["boxes"], list(npz["sop_uids"]),
                           npz["has_lesion"], npz["lesion_fraction"], npz["lesion_types"])
    series = load_series(entry.path)
    prepared = prepare(series.hu, size, crop)
    annotations = entry.slice_annotations()
    has_lesion = np.full(len(series), -1, dtype=np.int8)
    fraction = np.full(len(series), -1.0, dtype=np.float32)
    types = np.full((len(series), len(LESION_TYPES)), -1, dtype=np.int8)
    for i, uid in enumerate(series.sop_instance_uids):
        note = annotations.get(uid)
        if note is not None:
            has_lesion[i] = int(bool(note.get("has_lesion")))
            fraction[i] = float(note.get("lesion_fraction", -1.0))
            named = [int(t in note.get("lesion_types", ())) for t in LESION_TYPES]
            if "lesion_types" in note and (any(named) or not has_lesion[i]):
                types[i] = named      # (a lesion of none of the five, a nodule: unknown)
        elif entry.label == 0:
            has_lesion[i], fraction[i] = 0, 0.0  # a healthy patient's slices have no lesion
            types[i] = 0
    study = CachedStudy(entry, prepared.crops.astype(np.float16), prepared.boxes,
                        series.sop_instance_uids, has_lesion, fraction, types)
    _store(path, signature, crops=study.crops, boxes=study.boxes,
           sop_uids=np.array(study.sop_uids), has_lesion=has_lesion, lesion_fraction=fraction,
           lesion_types=types)
    return study


@dataclass
class CachedVolume:
    """One study as a volume model reads it (inference.dualsampling), with its truth."""

    entry: StudyEntry
    volume: np.ndarray       # (D, H, W) float16 in [0, 1]
    lung: np.ndarray         # (D, H, W) bool
    infection: np.ndarray | None   # (D, H, W) bool, the lesion mask resampled; None unknown
    ratio: float             # infected share of the lungs (the truth's); -1 unknown


def load_volume(entry: StudyEntry, shape: tuple[int, int, int], cache_dir: Path) -> CachedVolume:
    """The study's resampled volume, from the cache or made (and cached) now."""
    from inference.dualsampling import prepare_volume, resample_mask

    extra = [p for p in (entry.annotations, entry.masks) if p is not None]
    signature = files_signature(entry.path, extra, "volume-" + VOLUME_CACHE_VERSION)
    path = cache_path(cache_dir, entry, "x".join(map(str, shape)), kind="volumes")
    npz = _cached(path, signature)
    if npz is not None:
        infection = npz["infection"] if bool(npz["has_infection"]) else None
        return CachedVolume(entry, npz["volume"], npz["lung"], infection, float(npz["ratio"]))
    series = load_series(entry.path)
    prepared = prepare_volume(series.hu, shape)
    infection, ratio = None, -1.0
    if entry.label == 0:
        infection, ratio = np.zeros(shape, dtype=bool), 0.0
    masks = entry.lesion_masks()
    if masks is not None:
        uids, lesion = masks
        if len(lesion) != len(uids) or lesion.shape[1:] != series.hu.shape[1:]:
            raise ValueError(f"{entry.masks}: lesion masks of shape {lesion.shape} do not "
                             f"fit {len(uids)} annotated slices of "
                             f"{series.hu.shape[1]} x {series.hu.shape[2]}")
        order = {uid: i for i, uid in enumerate(uids)}
        z0, z1 = prepared.z
        if all(uid in order for uid in series.sop_instance_uids[z0:z1]):
            aligned = np.zeros((len(series), *lesion.shape[1:]), dtype=bool)
            for i, uid in enumerate(series.sop_instance_uids):
                if uid in order:
                    aligned[i] = lesion[order[uid]]
            infection = resample_mask(aligned, prepared)
        # (a lung slice without its mask: the infection is unknown, not absent)
    if entry.annotations is not None:
        ratio = float(json.loads(entry.annotations.read_text()).get("infected_fraction", ratio))
    if ratio < 0 and infection is not None:      # no truth given: the mask's share
        ratio = float(infection.sum() / max((prepared.lung | infection).sum(), 1))
    study = CachedVolume(entry, prepared.volume.astype(np.float16), prepared.lung, infection,
                         ratio)
    _store(path, signature, volume=study.volume, lung=study.lung,
           infection=infection if infection is not None else np.zeros(1, dtype=bool),
           has_infection=np.array(infection is not None), ratio=np.array(ratio))
    return study
