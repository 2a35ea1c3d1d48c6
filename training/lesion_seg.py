"""A radiologist's lesion segmentation (a DICOM SEG) as a study's truth for a dataset.

Readers outline lesions in a viewer (OHIF's segmentation mode, 3D Slicer) and save a
DICOM Segmentation whose frames reference the CT slices they were drawn on. `lungsys
dataset` takes such a file per study (the labels file's ``segmentation`` column) instead
of lesion slices by Instance Number; from it come, slice by slice, the lesion flag, the
lesion mask (what the pointing game, Dice and the dual-sampling network's infection
mask need) and, where the segments are coded as LA-DNN's five lesion types, each slice's
types (what LA-DNN's auxiliary task learns from).

Which segments are lesions: those whose Segmented Property Category is Morphologically
abnormal structure (SCT 49755003, or SNOMED-RT's M-01000 as older viewers code it), or
whose type is SCT Lesion or one of the lesion types (coded as lungsys's SRs and SEGs code
them, :data:`inference.sr.LESION_TYPE_CODES`, or named by their meaning, "consolidation",
"crazy paving"), or labelled "lesion" or "infection". Others (a lung, a vessel a tool
segmented too) are left out and named. A slice an untyped lesion segment covers has
unknown types (not "none of the five"). A fractional segment counts from 0.5 on. Each
frame must name the CT slice it was drawn on (its Derivation Image Sequence, as OHIF,
3D Slicer and highdicom write it). The file is read once to check it and once more to
write its masks, one segment at a time, so a dataset of hundreds of studies never holds
more than one study's masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.model_file import one_line
from inference.sr import LESION_TYPE_CODES

#: Segmented Property Category of a lesion (SCT 49755003; SNOMED-RT's M-01000 is the same
#: code: pydicom's Code compares them so).
ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure
#: Segmented Property Type of an untyped lesion (SCT 52988006).
LESION = codes.SCT.Lesion
#: Segment labels taken for a lesion whatever their codes (a viewer's new segment is coded
#: "Tissue" until its reader picks a terminology).
LESION_LABELS = {"lesion", "lesions", "infection", "infected region"}


def _words(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(text)).strip().lower()


#: Each lesion type by its name in words ("crazy paving", "crazy paving pattern").
_TYPE_BY_WORDS = {**{_words(t): t for t in LESION_TYPE_CODES},
                  **{_words(c.meaning): t for t, c in LESION_TYPE_CODES.items()}}


class SegmentationError(ValueError):
    """A segmentation that cannot be a study's lesion truth, in one line."""


@dataclass
class LesionTruth:
    """What a study's segmentation says, slice by slice in the series' order."""

    has_lesion: list[bool]
    lesion_fraction: list[float]     # the lesion's share of the slice's lungs
    #: each slice's lesion types (LESION_TYPE_CODES' keys; None on a slice that an untyped
    #: lesion segment covers too: its types are unknown), or None when no segment is typed
    lesion_types: list[list[str] | None] | None
    left_out: list[str]          # the segments that are not lesions, by label
    infected_fraction: float     # the lesions' share of the lungs (with the lesions)


def _code(item) -> Code | None:
    try:
        return Code(str(item.CodeValue), str(item.CodingSchemeDesignator),
                    str(item.get("CodeMeaning", "") or "-"))
    except (AttributeError, ValueError, TypeError):
        return None


def _segments(seg, name: str) -> tuple[dict[int, str | None], list[str]]:
    """The lesion segments (number -> lesion type or None) and the others' labels."""
    lesions, others = {}, []
    try:
        for item in seg.SegmentSequence:
            category = _code(item.SegmentedPropertyCategoryCodeSequence[0])
            kind = item.SegmentedPropertyTypeCodeSequence[0]
            code, label = _code(kind), _words(item.get("SegmentLabel", ""))
            typed = next((t for t, c in LESION_TYPE_CODES.items() if code == c), None) \
                or _TYPE_BY_WORDS.get(_words(kind.get("CodeMeaning", ""))) \
                or _TYPE_BY_WORDS.get(label)
            if typed or category == ABNORMAL or code == LESION or label in LESION_LABELS:
                lesions[int(item.SegmentNumber)] = typed
            else:
                others.append(str(item.get("SegmentLabel", "") or
                                  f"segment {item.SegmentNumber}"))
    except (AttributeError, IndexError, TypeError, ValueError) as exc:
        raise SegmentationError(f"{name}: its segments are not described as a SEG's are "
                                f"({exc})") from None
    return lesions, others


def _frame_sources(seg, name: str) -> list[str]:
    """The slices the SEG's frames were drawn on, from each frame's Derivation Image
    Sequence (not the header's lists of referenced instances, which may name slices no
    frame lies on)."""
    sources = []
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if str(source.get("SpatialLocationsPreserved", "YES")).upper() != "YES":
                    raise SegmentationError(f"{name}: its frames do not lie on the pixels of "
                                            f"the slices they come from (Spatial Locations "
                                            f"Preserved {source.SpatialLocationsPreserved})")
                sources.append(str(source.ReferencedSOPInstanceUID))
    if not sources:
        raise SegmentationError(f"{name}: its frames do not say which CT slice each was "
                                f"drawn on (no Derivation Image Sequence)")
    return sources


def _open(path: Path, slices: list[str], size: tuple[int, int]):
    """The SEG, checked against the series (its slices' SOP Instance UIDs in order, their
    rows and columns): its frames on this series' slices, its size; the slices its frames
    reference, in the series' order, and their positions in the series."""
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:                     # not DICOM, not a SEG, not well-formed
        raise SegmentationError(f"{path.name} is not a readable DICOM Segmentation "
                                f"({one_line(exc)})") from None
    if (int(seg.Rows), int(seg.Columns)) != tuple(size):
        raise SegmentationError(f"{path.name} is {seg.Rows} x {seg.Columns}, the series "
                                f"{size[0]} x {size[1]}")
    ours = set(slices)
    drawn = set(_frame_sources(seg, path.name))
    if not drawn & ours:
        raise SegmentationError(f"{path.name}: its frames lie on no slice of this series (the "
                                f"segmentation of another series, or of the CT before it was "
                                f"de-identified with new UIDs?)")
    if drawn - ours:
        raise SegmentationError(f"{path.name}: {len(drawn - ours)} of the slices its frames "
                                f"lie on are not in this series")
    uids = [uid for uid in slices if uid in drawn]
    return seg, uids, [i for i, uid in enumerate(slices) if uid in drawn]


def _masks(seg, name: str, uids: list[str], number: int) -> np.ndarray:
    """(len(uids), rows, columns) bool: one segment on the slices its frames lie on (a
    fractional segment's pixels from 0.5 on). The frames' positions were checked by
    :func:`_frame_sources` (OHIF's and DCMTK's SEGs do not say Spatial Locations Preserved,
    which highdicom otherwise requires)."""
    try:
        pixels = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[number], ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True)
    except Exception as exc:                 # highdicom's many refusals: the row's error
        raise SegmentationError(f"{name}: segment {number} cannot be read "
                                f"({one_line(exc)})") from None
    return pixels[..., 0] >= 0.5 if pixels.dtype.kind == "f" else pixels[..., 0] > 0


def lesion_masks(path: Path, slices: list[str], size: tuple[int, int]) -> np.ndarray:
    """(slices, rows, columns) bool in the series' order: the union of the lesion
    segments."""
    seg, uids, rows = _open(path, slices, size)
    lesions, _ = _segments(seg, path.name)
    out = np.zeros((len(slices), *size), dtype=bool)
    for number in lesions:
        out[rows] |= _masks(seg, path.name, uids, number)
    return out


def read_truth(path: Path, slices: list[str], lung: np.ndarray) -> LesionTruth:
    """The study's lesion truth from its segmentation (``slices``: the series' SOP Instance
    UIDs in order; ``lung``: its lung masks, for the infected fraction).
    SegmentationError when it cannot be."""
    seg, uids, rows = _open(path, slices, lung.shape[1:])
    lesions, others = _segments(seg, path.name)
    if not lesions:
        raise SegmentationError(f"{path.name} has no lesion segment (its segments: "
                                f"{', '.join(others)[:160]}); give a lesion segment the "
                                f"category Morphologically abnormal structure (SCT 49755003) "
                                f"in the viewer, or the label 'lesion'")
    union = np.zeros((len(uids), *lung.shape[1:]), dtype=bool)
    shown = np.zeros((len(slices), len(LESION_TYPE_CODES)), dtype=bool)
    untyped = np.zeros(len(slices), dtype=bool)      # slices whose types are unknown
    kinds = list(LESION_TYPE_CODES)
    for number, typed in lesions.items():
        mask = _masks(seg, path.name, uids, number)
        union |= mask
        if typed is not None:
            shown[rows, kinds.index(typed)] |= mask.any(axis=(1, 2))
        else:
            untyped[rows] |= mask.any(axis=(1, 2))
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
        lesion_types=[None if unknown else [kinds[k] for k in np.flatnonzero(row)]
                      for row, unknown in zip(shown, untyped)] if typed_any else None,
        left_out=others,
        infected_fraction=round(lesion_pixels / lung_pixels, 6) if lung_pixels else 0.0)
