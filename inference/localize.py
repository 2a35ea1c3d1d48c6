"""Lesion regions and boxes from a lesion map (weakly supervised, Hu 2020).

The maps are the slice network's lesion evidence, each slice's scaled to its
lesion probability (:func:`evidence_maps`), then each slice's map averaged with
its neighbours' along the slice normal (:func:`through_plane`: a lesion is a
body in three dimensions, and the tip of one that task 1 hardly sees on its
own slice lies where its neighbours point). On the original slice grid:
Gaussian blur of the map, an Isodata threshold (never below an absolute
floor, so that faint evidence yields nothing), morphological closing, the
non-aerated lung tissue the region touches (:func:`extend_by_density`), and
connected components above a minimum area; each component gives a bounding
box with the map's peak inside it as its score. The infected fraction of a
slice is the lesion region's share of the lung (the filled lung mask of the
preprocessing, with the lesion region counted as lung: consolidation is lung
even though it is not air).

The blur, the floor, the through-plane weight and the density threshold were
chosen on the validation split of the shipped model's training set (pointing
game, Dice and infected-fraction error against the phantom's masks), never on
a test set: docs/localisation.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_isodata

from inference.preprocess import lung_envelope

#: Map values below this are never lesion, whatever Isodata says.
MAP_FLOOR = 0.1
BLUR_MM = 4.0
CLOSING_MM = 3.0
MIN_AREA_MM2 = 20.0
#: A neighbouring slice's map weighs exp(-distance / THROUGH_PLANE_MM) in a slice's map...
THROUGH_PLANE_MM = 4.5
#: ...and not at all below this weight (beyond 13.5 mm).
MIN_NEIGHBOUR_WEIGHT = 0.05
#: Non-aerated lung: the paper's lung threshold (inference.preprocess.LUNG_THRESHOLD_HU).
DENSE_HU = -300.0


@dataclass(frozen=True)
class LesionBox:
    """A lesion's bounding box on the slice grid: rows/cols end-exclusive."""

    row0: int
    col0: int
    row1: int
    col1: int
    score: float      # the map's peak inside the component
    area_px: int      # pixels of the component

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.row0, self.col0, self.row1, self.col1


def evidence_maps(evidence: np.ndarray, lesion_probability: np.ndarray) -> np.ndarray:
    """Lesion maps in [0, 1] from the slice network's raw evidence (n, h, w).

    Each slice's evidence over its own maximum, times the slice's lesion
    probability: the peak of a slice says how sure task 1 is, the shape says
    where; a slice without evidence stays zero.
    """
    evidence = np.asarray(evidence, dtype=np.float32)
    peak = evidence.reshape(len(evidence), -1).max(axis=1)
    scale = np.divide(np.asarray(lesion_probability, dtype=np.float32), peak,
                      out=np.zeros_like(peak), where=peak > 0)
    return evidence * scale[:, None, None]


def through_plane(maps: np.ndarray, boxes: np.ndarray, along_mm: np.ndarray) -> np.ndarray:
    """Each slice's map as the weighted mean of its own and its neighbours' (n, h, w).

    ``maps`` are at the network's resolution on each slice's crop ``boxes`` (row0, col0,
    row1, col1 on the slice grid); ``along_mm`` are the slices' positions along the
    normal, in order. A neighbour's map is resampled into the slice's crop (zero outside
    its own box) and weighs exp(-distance / ``THROUGH_PLANE_MM``); a slice's map keeps
    weight 1, so that the mean of maps in [0, 1] stays in [0, 1].
    """
    maps = np.asarray(maps, dtype=np.float32)
    n, h, w = maps.shape
    boxes = np.asarray(boxes, dtype=np.float64)
    along = np.asarray(along_mm, dtype=np.float64)
    total = maps.astype(np.float64)
    weights = np.ones(n)
    for i in range(n):
        for j in range(i + 1, n):
            weight = float(np.exp(-abs(along[j] - along[i]) / THROUGH_PLANE_MM))
            if weight < MIN_NEIGHBOUR_WEIGHT:
                break
            total[i] += weight * _into_crop(maps[j], boxes[j], boxes[i])
            total[j] += weight * _into_crop(maps[i], boxes[i], boxes[j])
            weights[i] += weight
            weights[j] += weight
    return (total / weights[:, None, None]).astype(np.float32)


def _into_crop(source: np.ndarray, source_box: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A map on one crop box resampled onto another box's crop of the same size (bilinear,
    pixel centres as in :func:`inference.preprocess.uncrop`; zero outside the source)."""
    h, w = source.shape
    scale = (box[2:] - box[:2]) / (source_box[2:] - source_box[:2])
    shape = np.array([h, w], dtype=np.float64)
    offset = (box[:2] - source_box[:2]) * shape / (source_box[2:] - source_box[:2]) \
        + 0.5 * scale - 0.5
    return ndimage.affine_transform(source, scale, offset=offset, order=1,
                                    mode="grid-constant", cval=0.0)


def smooth(lesion_map: np.ndarray, spacing_mm: float = 1.0) -> np.ndarray:
    """The map blurred by ``BLUR_MM``: what regions are cut from and heatmaps show."""
    return ndimage.gaussian_filter(np.asarray(lesion_map, dtype=np.float32),
                                   sigma=BLUR_MM / spacing_mm)


def lesion_region(lesion_map: np.ndarray, spacing_mm: float = 1.0,
                  floor: float = MAP_FLOOR) -> np.ndarray:
    """Boolean lesion region of one map on the slice grid (blurred, thresholded, closed)."""
    blurred = smooth(lesion_map, spacing_mm)
    if blurred.max() < floor:
        return np.zeros(blurred.shape, dtype=bool)
    candidates = blurred[blurred > 0]
    threshold = floor
    if candidates.size and candidates.max() > candidates.min():
        threshold = max(float(threshold_isodata(candidates)), floor)
    region = blurred >= threshold
    radius = max(int(round(CLOSING_MM / spacing_mm)), 1)
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return ndimage.binary_closing(region, structure=(xx * xx + yy * yy) <= radius * radius)


def slice_region(lesion_map: np.ndarray, hu_slice: np.ndarray, lung: np.ndarray,
                 spacing_mm: float = 1.0, *, holes_filled: bool = False) -> np.ndarray:
    """A slice's lesion region as users get it: the map's region (:func:`lesion_region`)
    joined with the non-aerated lung it touches (:func:`extend_by_density`) inside the
    lungs' envelope made from ``lung`` (``holes_filled``: its holes are filled already)."""
    return extend_by_density(
        lesion_region(lesion_map, spacing_mm), hu_slice,
        lung_envelope(hu_slice, lung, spacing_mm, holes_filled=holes_filled))


def extend_by_density(region: np.ndarray, hu_slice: np.ndarray,
                      envelope: np.ndarray) -> np.ndarray:
    """The region joined with the non-aerated tissue it touches inside the lungs' envelope.

    The map marks the most telling part of a lesion, not its extent: a lobar
    consolidation (a quarter of the lung) came out as 3-7% of it. Tissue above
    ``DENSE_HU`` inside the :func:`inference.preprocess.lung_envelope` that is connected
    to the region is the rest of that lesion (the map says where, the density how far).
    """
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return region
    dense = (np.asarray(hu_slice) > DENSE_HU) & np.asarray(envelope, dtype=bool)
    labels, _ = ndimage.label(dense | region)
    touched = np.unique(labels[region])
    return np.isin(labels, touched[touched > 0])


def boxes_from_region(region: np.ndarray, lesion_map: np.ndarray, spacing_mm: float = 1.0,
                      min_area_mm2: float = MIN_AREA_MM2) -> list[LesionBox]:
    """One box per connected component of at least ``min_area_mm2``, largest first."""
    labels, count = ndimage.label(region, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    min_px = min_area_mm2 / (spacing_mm * spacing_mm)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    out = []
    for index, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or sizes[index] < min_px:
            continue
        peak = float(np.asarray(lesion_map)[sl][labels[sl] == index].max())
        out.append(LesionBox(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop,
                             peak, int(sizes[index])))
    return sorted(out, key=lambda b: -b.area_px)


def infected_pixels(region: np.ndarray, filled_lung: np.ndarray) -> tuple[int, int]:
    """(lesion pixels, lung pixels) of a slice; the lesion region counts as lung.

    ``filled_lung``: the lung mask with its holes (vessels, airways) filled.
    """
    return int(region.sum()), int((filled_lung | region).sum())
