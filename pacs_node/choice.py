"""Which complete series are analysed, and why the others are not.

A series is analysed when it is an axial CT image series (localizers and other
modalities left out) with at least ``[assembly] min_slices`` slices
(:func:`header_filter`). With ``[assembly] trigger = "study"`` one series per
study is chosen (:func:`choose`), by this rule, each step deciding only among
the series the steps before left tied:

1. eligible as above;
2. the thinnest slices (Slice Thickness; a series without one after those
   with one);
3. a lung kernel (Convolution Kernel or Reconstruction Algorithm naming LUNG,
   or a sharp Siemens kernel B60-B99/I60-I99/Br60-Br99) before any other;
4. the most slices;
5. the earliest received.

The others are recorded as skipped with the reason ("another series of the
study was analysed: UID" or why they are not eligible).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from inference.series import scan

#: Kernels that name a lung (or a sharp, lung-suited) reconstruction.
LUNG_KERNEL = re.compile(r"LUNG|^(B|I|BR)[6-9]\d", re.IGNORECASE)


def header_filter(paths: list[str], min_slices: int) -> str | None:
    """Why a complete series is not analysed (from its headers), or None."""
    return _reason(*scan(paths), min_slices)


def _reason(groups, skipped, min_slices: int) -> str | None:
    if not groups:
        reasons = sorted({s.reason for s in skipped})
        return "; ".join(reasons) or "no CT image"
    members = next(iter(groups.values()))
    if len(members) < min_slices:
        return f"{len(members)} slices, fewer than the minimum of {min_slices}"
    orientation = members[0][1].get("ImageOrientationPatient")
    if orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        if abs(normal[2]) < 0.9 * np.linalg.norm(normal):
            return "not an axial series"
    return None


@dataclass(frozen=True)
class Candidate:
    """One series of a study, as the rule sees it."""

    key: object                  # what the caller knows it by (its Series row, a folder)
    series_instance_uid: str
    slices: int
    thickness: float | None
    kernel: str
    reason: str | None           # why it is not eligible (None: it is)

    @property
    def lung_kernel(self) -> bool:
        return bool(LUNG_KERNEL.search(self.kernel))

    def describe(self) -> str:
        thickness = f"{self.thickness:g} mm" if self.thickness is not None else "thickness ?"
        return f"{self.slices} slices, {thickness}, kernel {self.kernel or '?'}"


def candidate(key, series_instance_uid: str, paths: list[str], min_slices: int) -> Candidate:
    """What the rule needs to know of a series, from its headers."""
    groups, skipped = scan(paths)
    members = next(iter(groups.values()), [])
    header = members[0][1] if members else None

    def value(keyword: str):
        return header.get(keyword) if header is not None else None

    try:
        thickness = float(value("SliceThickness")) if value("SliceThickness") else None
    except (TypeError, ValueError):
        thickness = None
    kernel = value("ConvolutionKernel") or value("ReconstructionAlgorithm") or ""
    if not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    return Candidate(key, series_instance_uid, len(members), thickness, str(kernel).strip(),
                     _reason(groups, skipped, min_slices))


def choose(candidates: list[Candidate]) -> tuple[Candidate | None, list[tuple[Candidate, str]]]:
    """The series to analyse (None when none is eligible) and why each other is not (the
    candidates in the order they were received)."""
    eligible = [c for c in candidates if c.reason is None]
    chosen = min(eligible, key=lambda c: (c.thickness if c.thickness is not None else math.inf,
                                          not c.lung_kernel, -c.slices),
                 default=None)
    others = [(c, c.reason if c.reason is not None else
               f"another series of the study was analysed: {chosen.series_instance_uid}")
              for c in candidates if c is not chosen]
    return chosen, others
