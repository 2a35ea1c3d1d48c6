"""A radiologist's lesion segmentation (a DICOM SEG) as a study's truth for a dataset.

Readers outline lesions in a viewer (OHIF's segmentation mode, 3D Slicer) and save a
DICOM Segmentation whose frames reference the CT slices they were drawn on. `lungsys
dataset` takes such a file per study (the labels file's ``segmentation`` column) instead
of lesion slices by Instance Number; from it come, slice by slice, the lesion flag, the
lesion mask (what the pointing game, Dice and the dual-sampling network's infection
mask need) and, where the segments are coded as LA-DNN's five lesion types, each slice's
types (what LA-DNN's auxiliary task learns from).

Which segments are lesions: those whose Segmented Property Category is Morphologically
abnormal structure (SCT 49755003), or whose type is SCT Lesion or one of the lesion
types (coded as lungsys's SRs and SEGs code them, :data:`inference.sr.LESION_TYPE_CODES`,
or named by their meaning, "consolidation", "crazy paving"). Others (a lung, a vessel a
tool segmented too) are left out and named. A fractional segment counts from 0.5 on.
The file is read whole only to check it and once more to write its masks, one segment at
a time, so a dataset of hundreds of studies never holds more than one study's masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np

from inference.sr import LESION_TYPE_CODES

#: Segmented Property Category: Morphologically abnormal structure (SCT 49755003).
ABNORMAL = ("49755003", "SCT")
#: Segmented Property Type: Lesion (SCT 52988006), untyped.
LESION = ("52988006", "SCT")
_SCHEMES = {"SRT": "SCT", "SNM3": "SCT"}     # SNOMED's older designators


def _words(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(text)).strip().lower()


#: Each lesion type by its code and by its name in words ("crazy paving", "crazy paving
#: pattern").
_TYPE_BY_CODE = {(c.value, c.scheme_designator): t for t, c in LESION_TYPE_CODES.items()}
_TYPE_BY_WORDS = {**{_words(t): t for t in LESION_TYPE_CODES},
                  **{_words(c.meaning): t for t, c in LESION_TYPE_CODES.items()}}


class SegmentationError(ValueError):
    """A segmentation that cannot be a study's lesion truth, in one line."""


@dataclass
class LesionTruth:
    """What a study's segmentation says, slice by slice in the series' order."""

    has_lesion: list[bool]
    lesion_fraction: list[float]     # the lesion's share of the slice's lungs
    #: each slice's lesion types (LESION_TYPE_CODES' keys), or None when no segment is typed
    lesion_types: list[list[str]] | None
    left_out: list[str]          # the segments that are not lesions, by label
    infected_fraction: float     # the lesions' share of the lungs (with the lesions)


def _code(item) -> tuple[str, str]:
    return str(item.CodeValue), _SCHEMES.get(str(item.CodingSchemeDesignator),
                                             str(item.CodingSchemeDesignator))


def _segments(seg) -> tuple[dict[int, str | None], list[str]]:
    """The lesion segments (number -> lesion type or None) and the others' labels."""
    lesions, others = {}, []
    for item in seg.SegmentSequence:
        category = _code(item.SegmentedPropertyCategoryCodeSequence[0])
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        typed = _TYPE_BY_CODE.get(_code(kind)) or _TYPE_BY_WORDS.get(
            _words(getattr(kind, "CodeMeaning", ""))) or _TYPE_BY_WORDS.get(
            _words(item.get("SegmentLabel", "")))
        if typed or category == ABNORMAL or _code(kind) == LESION:
            lesions[int(item.SegmentNumber)] = typed
        else:
            others.append(str(item.get("SegmentLabel", "") or f"segment {item.SegmentNumber}"))
    return lesions, others


def _open(path: Path, slices: list[str], size: tuple[int, int]):
    """The SEG, checked against the series (its slices' SOP Instance UIDs in order, their
    rows and columns): its frames on this series' slices, its size; and the slices its
    frames reference, in the series' order."""
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:                     # not DICOM, not a SEG, not well-formed
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SegmentationError(f"{path.name} is not a readable DICOM Segmentation "
                                f"({first})") from None
    if (int(seg.Rows), int(seg.Columns)) != tuple(size):
        raise SegmentationError(f"{path.name} is {seg.Rows} x {seg.Columns}, the series "
                                f"{size[0]} x {size[1]}")
    ours = set(slices)
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    if not referenced & ours:
        raise SegmentationError(f"{path.name}: its frames reference no slice of this series "
                                f"(the segmentation of another series?)")
    if referenced - ours:
        raise SegmentationError(f"{path.name}: {len(referenced - ours)} of its source images "
                                f"are not slices of this series")
    return seg, [uid for uid in slices if uid in referenced]


def _masks(seg, uids: list[str], number: int) -> np.ndarray:
    """(len(uids), rows, columns) bool: one segment on the referenced slices."""
    pixels = seg.get_pixels_by_source_instance(
        uids, segment_numbers=[number], assert_missing_frames_are_empty=True)
    return pixels[..., 0] >= 0.5 if pixels.dtype.kind == "f" else pixels[..., 0] > 0


def lesion_masks(path: Path, slices: list[str], size: tuple[int, int]) -> np.ndarray:
    """(slices, rows, columns) bool in the series' order: the union of the lesion
    segments."""
    seg, uids = _open(path, slices, size)
    lesions, _ = _segments(seg)
    index = {uid: i for i, uid in enumerate(slices)}
    rows = [index[uid] for uid in uids]
    out = np.zeros((len(slices), *size), dtype=bool)
    for number in lesions:
        out[rows] |= _masks(seg, uids, number)
    return out


def read_truth(path: Path, slices: list[str], lung: np.ndarray) -> LesionTruth:
    """The study's lesion truth from its segmentation (``slices``: the series' SOP Instance
    UIDs in order; ``lung``: its lung masks, for the infected fraction).
    SegmentationError when it cannot be."""
    seg, uids = _open(path, slices, lung.shape[1:])
    lesions, others = _segments(seg)
    if not lesions:
        raise SegmentationError(f"{path.name} has no lesion segment (its segments: "
                                f"{', '.join(others)[:160]}); a lesion segment's category is "
                                f"Morphologically abnormal structure (SCT 49755003)")
    index = {uid: i for i, uid in enumerate(slices)}
    rows = [index[uid] for uid in uids]
    union = np.zeros((len(uids), *lung.shape[1:]), dtype=bool)
    shown = np.zeros((len(slices), len(LESION_TYPE_CODES)), dtype=bool)
    kinds = list(LESION_TYPE_CODES)
    for number, typed in lesions.items():
        mask = _masks(seg, uids, number)
        union |= mask
        if typed is not None:
            shown[rows, kinds.index(typed)] |= mask.any(axis=(1, 2))
    has = np.zeros(len(slices), dtype=bool)
    has[rows] = union.any(axis=(1, 2))
    lesion = np.zeros(len(slices))
    lesion[rows] = union.sum(axis=(1, 2))
    lungs = lung.sum(axis=(1, 2)).astype(float)
    lungs[rows] = (lung[rows] | union).sum(axis=(1, 2))
    lesion_pixels, lung_pixels = float(lesion.sum()), float(lungs.sum())
    typed_any = any(t is not None for t in lesions.values())
    return LesionTruth(
        has_lesion=has.tolist(),
        lesion_fraction=np.round(lesion / np.maximum(lungs, 1), 6).tolist(),
        lesion_types=[[kinds[k] for k in np.flatnonzero(row)] for row in shown]
        if typed_any else None,
        left_out=others,
        infected_fraction=round(lesion_pixels / lung_pixels, 6) if lung_pixels else 0.0)
