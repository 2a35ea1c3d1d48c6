"""What each file of a series says about its frames: where each lies, how its stored
values become HU, and the geometry every frame of a series must share.

:mod:`inference.series` reads every header first and orders the frames by
position before it decodes a pixel; this is that first pass, for single-frame
CT and for the per-frame functional groups of (Enhanced / Legacy Converted
Enhanced) multi-frame CT alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset

from inference.errors import InconsistentGeometryError, MissingPositionError

#: Two orientation or spacing values closer than this are the same.
GEOMETRY_TOLERANCE = 1e-3


@dataclass
class Frame:
    """One slice before pixel decoding: where it is and how to read it."""

    path: Path
    sop_instance_uid: str
    frame: int | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    slope: float
    intercept: float


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of a plane given as Image Orientation (Patient)."""
    row = np.asarray(orientation[:3], dtype=np.float64)
    col = np.asarray(orientation[3:6], dtype=np.float64)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm == 0:
        raise InconsistentGeometryError(f"degenerate Image Orientation (Patient) "
                                        f"{list(orientation)}")
    return n / norm


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
    """Describe every frame of an instance (one for single-frame CT)."""
    uid = str(ds.SOPInstanceUID)
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:                      # not needed by the model: a bad one is no reason to fail
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    if "PerFrameFunctionalGroupsSequence" not in ds:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if not ipp or not iop:
            raise MissingPositionError(f"{path.name}: no Image Position/Orientation (Patient)")
        return [Frame(path, uid, None, number, floats3(ipp), tuple(float(v) for v in iop),
                       spacing(ds.get("PixelSpacing")), rows, cols,
                       finite(ds.get("RescaleSlope", 1) or 1, "Rescale Slope"),
                       finite(ds.get("RescaleIntercept", 0) or 0, "Rescale Intercept"))]

    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    out = []
    for i, per in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        def group(keyword: str) -> Dataset | None:
            for source in (per, shared):
                seq = source.get(keyword)
                if seq:
                    return seq[0]
            return None

        pos, ori = group("PlanePositionSequence"), group("PlaneOrientationSequence")
        if pos is None or ori is None or "ImagePositionPatient" not in pos:
            raise MissingPositionError(f"{path.name} frame {i}: no Plane Position/Orientation")
        measures = group("PixelMeasuresSequence")
        transform = group("PixelValueTransformationSequence")
        out.append(Frame(
            path, uid, i, number, floats3(pos.ImagePositionPatient),
            tuple(float(v) for v in ori.ImageOrientationPatient),
            spacing(measures.get("PixelSpacing") if measures else None), rows, cols,
            finite(transform.get("RescaleSlope", 1), "Rescale Slope") if transform else 1.0,
            finite(transform.get("RescaleIntercept", 0), "Rescale Intercept") if transform
            else 0.0))
    return out


def common_geometry(frames: list[Frame]
                     ) -> tuple[tuple[float, ...], tuple[float, float], int, int]:
    """The orientation, spacing and size every frame must share."""
    first = frames[0]
    if first.orientation is None or len(first.orientation) != 6:
        raise MissingPositionError(f"{frame_name(first)}: no usable Image Orientation (Patient)")
    for f in frames[1:]:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise InconsistentGeometryError(
                f"slices differ in size: {first.rows}x{first.columns} ({frame_name(first)}) "
                f"vs {f.rows}x{f.columns} ({frame_name(f)})")
        if f.orientation is None or not np.allclose(f.orientation, first.orientation,
                                                    atol=GEOMETRY_TOLERANCE):
            raise InconsistentGeometryError(
                f"slices differ in orientation: {frame_name(first)} vs {frame_name(f)}")
        if (f.pixel_spacing is None) != (first.pixel_spacing is None) or (
                f.pixel_spacing and not np.allclose(f.pixel_spacing, first.pixel_spacing,
                                                    atol=GEOMETRY_TOLERANCE)):
            raise InconsistentGeometryError(
                f"slices differ in pixel spacing: {frame_name(first)} vs {frame_name(f)}")
    if first.pixel_spacing is None:
        raise InconsistentGeometryError(f"{frame_name(first)}: no Pixel Spacing")
    return first.orientation, first.pixel_spacing, first.rows, first.columns


def finite(value, name: str) -> float:
    """A number of the header that must be finite (NaN or infinity: ValueError)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} is {value}")
    return number


def floats3(value: Sequence) -> tuple[float, float, float]:
    if len(value) != 3:
        raise MissingPositionError(f"Image Position (Patient) has {len(value)} values, not 3")
    return float(value[0]), float(value[1]), float(value[2])


def spacing(value: Sequence | None) -> tuple[float, float] | None:
    if not value or len(value) != 2:
        return None
    return float(value[0]), float(value[1])


def frame_name(f: Frame) -> str:
    return f.path.name if f.frame is None else f"{f.path.name} frame {f.frame}"
