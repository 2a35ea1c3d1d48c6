"""Load a CT series from DICOM files into a Hounsfield-unit volume.

Whatever a scanner or PACS sends — single-frame CT Image Storage in any of the
transfer syntaxes pydicom and the pylibjpeg/pyjpegls plugins decode, or an
(Enhanced / Legacy Converted Enhanced) multi-frame CT — ends up as one
:class:`CTSeries`: slices ordered along the normal of Image Orientation
(Patient) by Image Position (Patient) (never by Instance Number or file name),
values in HU from Rescale Slope/Intercept, and per slice the SOP Instance UID
and geometry that results must reference.

Files that are not part of a CT image series (non-DICOM files, truncated
files, other modalities, localizers, other SOP classes) are skipped and each
is reported with its reason in :attr:`CTSeries.skipped`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.errors import (
    DuplicatePositionError,
    MissingPositionError,
    MultipleSeriesError,
    NoCTSeriesError,
)
from inference.frames import Frame, common_geometry, frame_name, frames_of, slice_normal
from inference.headers import header_of, slim

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)

#: Slices closer than this along the normal (mm) are at the same position.
DUPLICATE_POSITION_MM = 1e-2


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not loaded, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SliceInfo:
    """Where one slice of the volume came from, and where it lies.

    ``frame`` is the 1-based frame number inside a multi-frame instance, or
    ``None`` for a single-frame instance.
    """

    sop_instance_uid: str
    position: tuple[float, float, float]
    path: Path
    frame: int | None = None
    instance_number: int | None = None


@dataclass
class CTSeries:
    """One CT series as an HU volume with its geometry.

    ``hu`` has shape (slices, rows, columns), float32, ordered by increasing
    projection of Image Position (Patient) on :attr:`normal`.
    ``pixel_spacing`` is (row spacing, column spacing) in mm, as DICOM's
    Pixel Spacing.
    """

    hu: np.ndarray
    slices: list[SliceInfo]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    header: Dataset
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        """Unit normal of the slices: row direction x column direction."""
        return slice_normal(self.orientation)

    @property
    def positions(self) -> np.ndarray:
        """Image Position (Patient) of every slice, shape (slices, 3)."""
        return np.array([s.position for s in self.slices], dtype=np.float64)

    @property
    def slice_spacing(self) -> float:
        """Median distance between neighbouring slices along the normal (mm)."""
        if len(self.slices) < 2:
            return float(self.slice_thickness or 0.0)
        along = self.positions @ self.normal
        return float(np.median(np.diff(along)))

    @property
    def sop_instance_uids(self) -> list[str]:
        return [s.sop_instance_uid for s in self.slices]

    def __len__(self) -> int:
        return len(self.slices)


def iter_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand a folder (recursively) or a list of files/folders to files."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def _skip_reason(ds: Dataset) -> str | None:
    """Why a dataset is not a slice of a CT image series, or None."""
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if modality and modality != "CT":
        return f"modality {modality}, not CT"
    if sop_class not in CT_SOP_CLASSES:
        name = getattr(pydicom.uid.UID(sop_class), "name", sop_class) if sop_class else "missing"
        return f"SOP class {name} is not a CT image"
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type:
        return "localizer (scout) image"
    if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        return "no Series/SOP Instance UID"
    if "PixelData" not in ds and "Rows" not in ds:
        return "no image"
    return None


def scan(sources: str | os.PathLike | Iterable[str | os.PathLike]
         ) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[SkippedFile]]:
    """Read every file's header and group CT image files by series.

    Returns ``({SeriesInstanceUID: [(path, header), ...]}, skipped)``. No pixel
    data is read here.
    """
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    skipped: list[SkippedFile] = []
    for path in iter_files(sources):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append(SkippedFile(path, "not a DICOM file"))
            continue
        except Exception as exc:  # truncated or otherwise broken header
            skipped.append(SkippedFile(path, f"unreadable DICOM header ({_short(exc)})"))
            continue
        reason = _skip_reason(ds)
        if reason:
            skipped.append(SkippedFile(path, reason))
            continue
        groups[str(ds.SeriesInstanceUID)].append((path, slim(ds)))
    return dict(groups), skipped


def load_series(sources: str | os.PathLike | Iterable[str | os.PathLike],
                series_uid: str | None = None) -> CTSeries:
    """Load exactly one CT series from files or folders.

    With ``series_uid`` the series of that UID is loaded and other series are
    reported as skipped; without it, the input must hold exactly one CT
    series.

    Raises a :class:`~inference.errors.SeriesError` subclass with a one-line
    message when there is no CT series, more than one, or the slices'
    geometry cannot form one volume.
    """
    groups, skipped = scan(sources)
    if series_uid is not None:
        if series_uid not in groups:
            raise NoCTSeriesError(f"no CT series with SeriesInstanceUID {series_uid}"
                                  f" ({_skip_summary(skipped)})")
        for uid, members in groups.items():
            if uid != series_uid:
                skipped.extend(SkippedFile(p, f"other series {uid}") for p, _ in members)
        members = groups[series_uid]
    else:
        if not groups:
            raise NoCTSeriesError(f"no CT image series found ({_skip_summary(skipped)})")
        if len(groups) > 1:
            uids = sorted(groups)
            raise MultipleSeriesError(
                f"{len(uids)} CT series found where one was expected: "
                + ", ".join(f"{u} ({len(groups[u])} files)" for u in uids), uids)
        members = next(iter(groups.values()))
    return _assemble(members, skipped)


def _assemble(members: list[tuple[Path, Dataset]], skipped: list[SkippedFile]) -> CTSeries:
    """Check and order the files of one series by their headers, then decode each file's
    pixels straight into its place in the volume: one copy of the pixels is ever held,
    in int16 when the stored values and rescale make whole HU that fit (CT's usual
    case: half the memory of float32, and exact), else in float32."""
    accepted: list[tuple[Path, list[Frame]]] = []
    spares: dict[str, list[Path]] = defaultdict(list)   # more files of a SOP Instance UID
    seen_uids: set[str] = set()
    header: Dataset | None = None
    for path, hdr in members:
        uid = str(hdr.SOPInstanceUID)
        if uid in seen_uids:
            spares[uid].append(path)       # a stand-in, should the first not decode
            continue
        try:
            file_frames = frames_of(path, hdr)
            described = int(hdr.get("NumberOfFrames", 1) or 1)
        except MissingPositionError:
            raise
        except Exception as exc:
            skipped.append(SkippedFile(path, f"pixel data cannot be decoded ({_short(exc)})"))
            continue
        if described != len(file_frames):
            skipped.append(SkippedFile(path, f"{described} frames of pixels but "
                                             f"{len(file_frames)} frames described"))
            continue
        if header is None:                 # the series' header: its first file's, whole
            try:
                header = header_of(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception as exc:       # gone since it was scanned (retention)
                skipped.append(SkippedFile(path, f"unreadable DICOM header ({_short(exc)})"))
                continue
        seen_uids.add(uid)
        accepted.append((path, file_frames))
    frames = [f for _, file_frames in accepted for f in file_frames]
    if not frames:
        raise NoCTSeriesError(f"no decodable CT image in the series ({_skip_summary(skipped)})")

    orientation, spacing, rows, cols = common_geometry(frames)
    normal = slice_normal(orientation)
    along = np.array([np.dot(f.position, normal) for f in frames])  # type: ignore[arg-type]
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    dup = np.flatnonzero(gaps < DUPLICATE_POSITION_MM)
    if dup.size:
        a, b = frames[order[dup[0]]], frames[order[dup[0] + 1]]
        raise DuplicatePositionError(
            f"{dup.size + 1} slices share a position; e.g. {frame_name(a)} and "
            f"{frame_name(b)} both at {along[order[dup[0]]]:.3f} mm along the normal")

    place = np.empty(len(frames), dtype=np.int64)
    place[order] = np.arange(len(frames))
    hu = np.empty((len(frames), rows, cols), dtype=_hu_type(members, frames))
    decoded = np.ones(len(frames), dtype=bool)
    first = 0
    for path, file_frames in accepted:
        span = range(first, first + len(file_frames))
        first += len(file_frames)
        data = None
        for candidate in (path, *spares.pop(file_frames[0].sop_instance_uid, [])):
            if data is not None:            # decoded already: the others are duplicates
                skipped.append(SkippedFile(candidate, f"duplicate of SOP Instance UID "
                                                      f"{file_frames[0].sop_instance_uid}"))
                continue
            try:
                data = _pixels(candidate, len(file_frames), rows, cols)
            except Exception as exc:
                skipped.append(SkippedFile(candidate, f"pixel data cannot be decoded "
                                                      f"({_short(exc)})"))
        if data is None:
            decoded[list(span)] = False
            continue
        for k, i in enumerate(span):              # (a slice's float64 HU, then cast)
            np.copyto(hu[place[i]], data[k] * frames[i].slope + frames[i].intercept,
                      casting="unsafe")
    for uid, paths in spares.items():         # (not reached: their first had no frames)
        skipped.extend(SkippedFile(path, f"duplicate of SOP Instance UID {uid}")
                       for path in paths)
    if not decoded.all():                     # rare: files whose pixels could not be read
        if not decoded.any():
            raise NoCTSeriesError(f"no decodable CT image in the series "
                                  f"({_skip_summary(skipped)})")
        rows_kept = decoded[order]            # row j holds frame order[j]
        hu, order = hu[rows_kept], order[rows_kept]
    slices = [SliceInfo(sop_instance_uid=frames[i].sop_instance_uid,
                        position=frames[i].position,  # type: ignore[arg-type]
                        path=frames[i].path, frame=frames[i].frame,
                        instance_number=frames[i].instance_number) for i in order]
    assert header is not None
    thickness = header.get("SliceThickness")
    return CTSeries(
        hu=hu, slices=slices, orientation=orientation, pixel_spacing=spacing,
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        series_instance_uid=str(header.SeriesInstanceUID),
        study_instance_uid=str(header.get("StudyInstanceUID", "")),
        sop_class_uid=str(header.SOPClassUID), header=header, skipped=skipped)


def _pixels(path: Path, frames: int, rows: int, cols: int) -> np.ndarray:
    """A file's pixels as (frames, rows, cols); ValueError when they are not that."""
    data = pydicom.dcmread(path).pixel_array
    data = data[np.newaxis] if data.ndim == 2 else data
    if data.shape != (frames, rows, cols):
        raise ValueError(f"pixels of shape {data.shape}, not {(frames, rows, cols)}")
    return data


def _hu_type(members: list[tuple[Path, Dataset]], frames: list[Frame]) -> type:
    """int16 when every stored value, rescaled, is a whole HU within int16; else float32."""
    ranges = []
    for _, hdr in members:
        bits = int(hdr.get("BitsStored", 16) or 16)
        signed = int(hdr.get("PixelRepresentation", 0) or 0) == 1
        ranges.append((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed
                      else (0, (1 << bits) - 1))
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    for f in frames:
        if f.slope != int(f.slope) or f.intercept != int(f.intercept):
            return np.float32
        ends = (low * f.slope + f.intercept, high * f.slope + f.intercept)
        if min(ends) < -32768 or max(ends) > 32767:
            return np.float32
    return np.int16


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _skip_summary(skipped: list[SkippedFile]) -> str:
    if not skipped:
        return "no files"
    reasons: dict[str, int] = defaultdict(int)
    for s in skipped:
        reasons[s.reason.split(" (")[0]] += 1
    return "skipped: " + "; ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
