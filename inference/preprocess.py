"""The paper's image preprocessing (M3 Lung-Sys, section III-A).

1. Lung crop, per slice: threshold at -300 HU; morphological opening with a
   1x8 kernel (removes the table's thin structures); remove the background
   (air outside the body) by 8-connected component labelling; opening again;
   the bounding rectangle of what is left, with a 10-pixel margin; resize to
   the model's input size. One refinement: the openings choose the lung
   components, but the rectangle is taken over those components as they were
   before opening, so thin lung (the costophrenic recesses) stays inside. A slice with no
   lung keeps the body's bounding box, and a slice with no body the whole image. A model
   may choose the ``mirrored`` crop instead (its profile's ``crop``): the lung box joined
   with its mirror image about the body's midline, so that a lung filled
   with consolidation (no air: outside the paper's box) stays in the crop.
2. Window levelling: width 1200; training draws the centre uniformly from
   [-700, -500]; inference runs the centres -700, -600 and -500.

Everything works on a whole volume at once: the morphology runs in 3-D with
structuring elements that never connect two slices. Boxes are
``(row0, col0, row1, col1)`` with ``row1``/``col1`` exclusive, in the
original slice's pixel grid, so that maps computed on a crop can be put back
with :func:`uncrop`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from inference.profiles import CROPS

LUNG_THRESHOLD_HU = -300.0
BODY_THRESHOLD_HU = -500.0
#: :func:`lung_envelope` stays this far inside the lungs' outline (the chest wall).
ENVELOPE_MARGIN_MM = 3.0
OPENING_KERNEL = (1, 8)
MARGIN_PX = 10
#: Components of fewer pixels than this are noise, not lung.
MIN_COMPONENT_PX = 64
WINDOW_WIDTH = 1200.0
INFERENCE_CENTRES = (-700.0, -600.0, -500.0)
TRAINING_CENTRE_RANGE = (-700.0, -500.0)

Box = tuple[int, int, int, int]
#: Slices at once in :func:`lung_masks`.
SLAB = 32

_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True  # 8-connected within a slice, never across slices
_RECONSTRUCT = _IN_PLANE_8.copy()
_RECONSTRUCT[0, 1, 1] = _RECONSTRUCT[2, 1, 1] = True  # ... and to the same pixel next door


def _as_volume(hu: np.ndarray) -> np.ndarray:
    hu = np.asarray(hu)
    if hu.ndim == 2:
        return hu[np.newaxis]
    if hu.ndim != 3:
        raise ValueError(f"expected a slice (rows, cols) or a volume (n, rows, cols), "
                         f"got {hu.shape}")
    return hu


def lung_masks(hu: np.ndarray) -> np.ndarray:
    """The paper's lung-candidate mask (steps 2-5) of a slice or a volume.

    The openings decide which components of the air inside the body are lung;
    the lungs' extent comes from the unopened air connected to them, within a
    slice or through the neighbouring slices (opening by reconstruction), so
    that thin parts such as the costophrenic recesses are not cut off the box.
    Memory stays near a quarter of a byte a voxel beyond the volume: everything
    runs on slabs of ``SLAB`` slices, and the components that cross slabs are
    joined as a graph of the slabs' labels (:func:`_joined`).
    """
    vol = _as_volume(hu)
    inside = np.empty(vol.shape, dtype=bool)     # air inside the body: the result's room
    if not vol.shape[0]:
        return inside
    slabs = range(0, vol.shape[0], SLAB)
    offsets, touched, starts, ends, count = [], [], [], [], 0
    for a in slabs:              # each slab's labels numbered after the slab's before it
        low = vol[a:a + SLAB] < LUNG_THRESHOLD_HU
        inside[a:a + SLAB] = _drop_background(low, min_px=1)
        opened = _opening(_drop_background(_opening(low)))
        labels, n = ndimage.label(inside[a:a + SLAB], structure=_RECONSTRUCT)
        kept = np.unique(labels[opened])
        touched.append(kept[kept > 0] + count)
        starts.append(np.where(labels[0] > 0, labels[0] + count, 0))
        ends.append(np.where(labels[-1] > 0, labels[-1] + count, 0))
        offsets.append(count)
        count += n
    keep = _joined(count, np.concatenate(touched), starts, ends)
    for a, offset in zip(slabs, offsets):      # the slabs' labels again, kept or not
        labels, n = ndimage.label(inside[a:a + SLAB], structure=_RECONSTRUCT)
        np.take(np.concatenate([[False], keep[offset + 1:offset + n + 1]]), labels,
                out=inside[a:a + SLAB])
    return inside[0] if np.asarray(hu).ndim == 2 else inside


def _joined(count: int, touched: np.ndarray, starts: list[np.ndarray],
            ends: list[np.ndarray]) -> np.ndarray:
    """Which of ``count`` slab labels (1-based; 0 is background) to keep: those of a 3D
    component holding a ``touched`` one, a component crossing slabs being the labels
    that meet where one slab's last slice faces the next one's first."""
    pairs = [np.stack([end[both], start[both]])
             for end, start in zip(ends, starts[1:]) for both in [(end > 0) & (start > 0)]]
    edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])),
                       shape=(count + 1, count + 1))
    _, component = connected_components(graph, directed=False)
    kept = np.zeros(component.max() + 1, dtype=bool)
    kept[component[touched]] = True
    keep = kept[component]
    keep[0] = False
    return keep


def _opening(mask: np.ndarray) -> np.ndarray:
    """Binary opening of every slice with the paper's 1x8 kernel.

    The same as ``ndimage.binary_opening`` with a (1, 1, 8) structure, as a
    running minimum then a running maximum over the reflected window, which is
    several times faster on a volume.
    """
    assert OPENING_KERNEL[0] == 1
    width = OPENING_KERNEL[1]
    eroded = ndimage.minimum_filter1d(mask.view(np.uint8), width, axis=-1, mode="constant")
    return ndimage.maximum_filter1d(eroded, width, axis=-1, mode="constant",
                                    origin=-1 if width % 2 == 0 else 0).view(bool)


def _drop_background(air: np.ndarray, min_px: int = MIN_COMPONENT_PX) -> np.ndarray:
    """Remove components touching the slice border (air around the body) and noise."""
    labels, count = ndimage.label(air, structure=_IN_PLANE_8)
    if count == 0:
        return air
    border = np.unique(np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
        labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    keep = np.bincount(labels.ravel(), minlength=count + 1) >= min_px
    keep[border] = False
    keep[0] = False
    return keep[labels]


def _bounding_box(mask2d: np.ndarray, margin: int) -> Box | None:
    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask2d.any(axis=0))
    h, w = mask2d.shape
    return (max(int(rows[0]) - margin, 0), max(int(cols[0]) - margin, 0),
            min(int(rows[-1]) + 1 + margin, h), min(int(cols[-1]) + 1 + margin, w))


def lung_bounding_box(hu_slice: np.ndarray) -> Box | None:
    """The paper's lung crop box of one HU slice, or None if it has no lung.

    Returns ``(row0, col0, row1, col1)``, end-exclusive, margin included and
    clipped to the slice.
    """
    hu_slice = np.asarray(hu_slice)
    if hu_slice.ndim != 2:
        raise ValueError(f"expected one slice (rows, cols), got shape {hu_slice.shape}")
    return _bounding_box(lung_masks(hu_slice), MARGIN_PX)


def body_bounding_box(hu_slice: np.ndarray) -> Box | None:
    """Bounding box of the largest non-air component (the body), or None."""
    labels, count = ndimage.label(np.asarray(hu_slice) > BODY_THRESHOLD_HU)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return _bounding_box(labels == int(np.argmax(sizes)), 0)


def lung_envelope(hu_slice: np.ndarray, lung: np.ndarray, spacing_mm: float = 1.0,
                  margin_mm: float = ENVELOPE_MARGIN_MM, *,
                  holes_filled: bool = False) -> np.ndarray:
    """Where lung can be on a slice, aerated or not: the filled lung mask joined with its
    mirror image about the body's midline, ``margin_mm`` in from its edge.

    A consolidated lobe is not air, so the lung mask leaves it out; the other lung's
    mirror image covers it. The margin keeps the chest wall out. The union's holes are
    not filled: where a lung and the other's mirror image meet in front of and behind
    the mediastinum, that would take in the mediastinum whole. ``holes_filled``: the lung
    mask's own holes are filled already (the engine fills them once a slice).
    """
    lung = np.asarray(lung, dtype=bool)
    filled = lung if holes_filled else ndimage.binary_fill_holes(lung)
    body = body_bounding_box(hu_slice)
    if body is None or not filled.any():
        return filled
    twice_mid = body[1] + body[3]
    cols = twice_mid - 1 - np.arange(filled.shape[1])
    inside = (cols >= 0) & (cols < filled.shape[1])
    mirrored = np.zeros_like(filled)
    mirrored[:, inside] = filled[:, cols[inside]]
    envelope = filled | mirrored
    radius = max(int(round(margin_mm / spacing_mm)), 1)
    yy, xx = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return ndimage.binary_erosion(envelope, structure=(xx * xx + yy * yy) <= radius * radius)


def crop_boxes(hu: np.ndarray, masks: np.ndarray | None = None,
               crop: str = "lungs") -> np.ndarray:
    """Crop box of every slice of a volume, shape (n, 4), int64.

    The lung box where there is lung (``mirrored``: joined with its mirror image about the
    middle column of the body's box); else the body box; else the whole slice.
    ``masks`` are the volume's :func:`lung_masks`, when already computed.
    """
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; expected one of {', '.join(CROPS)}")
    vol = _as_volume(hu)
    masks = lung_masks(vol) if masks is None else masks
    n, h, w = vol.shape
    boxes = np.empty((n, 4), dtype=np.int64)
    for i in range(n):
        lung = _bounding_box(masks[i], MARGIN_PX)
        body = body_bounding_box(vol[i]) if lung is None or crop == "mirrored" else None
        if lung is not None and body is not None:      # mirrored: both sides of the body
            r0, c0, r1, c1 = lung
            twice_mid = body[1] + body[3]                # (col0 + col1) of the body
            lung = (r0, max(min(c0, twice_mid - c1), 0), r1, min(max(c1, twice_mid - c0), w))
        boxes[i] = lung or body or (0, 0, h, w)
    return boxes


def crop_and_resize(hu: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut each slice to its box and resize it to ``size`` x ``size`` (HU, float32).

    Bilinear with antialiasing, so that downsizing does not alias fine
    structures.
    """
    vol = _as_volume(hu)
    out = np.empty((vol.shape[0], size, size), dtype=np.float32)
    with torch.no_grad():
        for i, (r0, c0, r1, c1) in enumerate(np.asarray(boxes)):
            crop = torch.from_numpy(np.ascontiguousarray(vol[i, r0:r1, c0:c1], dtype=np.float32))
            resized = F.interpolate(crop[None, None], size=(size, size), mode="bilinear",
                                    align_corners=False, antialias=True)
            out[i] = resized[0, 0].numpy()
    return out


def window(hu: np.ndarray, centre: float, width: float = WINDOW_WIDTH) -> np.ndarray:
    """Window-level HU values to [0, 1] (float32)."""
    low = centre - width / 2.0
    out = (np.asarray(hu, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def random_centre(rng: np.random.Generator) -> float:
    """A training window centre drawn uniformly from [-700, -500]."""
    return float(rng.uniform(*TRAINING_CENTRE_RANGE))


def to_channels(windowed: np.ndarray) -> np.ndarray:
    """Repeat windowed slices (n, h, w) to the network's 3 channels (n, 3, h, w)."""
    return np.repeat(np.asarray(windowed)[:, np.newaxis], 3, axis=1)


@dataclass
class PreparedSlices:
    """Cropped and resized slices of a volume, still in HU, with their boxes."""

    crops: np.ndarray  # (n, size, size) float32, HU
    boxes: np.ndarray  # (n, 4) int64, (row0, col0, row1, col1) in the source grid
    source_shape: tuple[int, int]
    lung: np.ndarray | None = None  # (n, rows, cols) bool: the lung masks the boxes came from

    def windowed(self, centre: float, width: float = WINDOW_WIDTH) -> np.ndarray:
        """Network input for one window centre, (n, 3, size, size) float32."""
        return to_channels(window(self.crops, centre, width))


def prepare(hu: np.ndarray, size: int, crop: str = "lungs") -> PreparedSlices:
    """Lung crop every slice of a volume (``crop``: :data:`CROPS`) and resize it to the
    input size."""
    vol = _as_volume(hu)
    masks = lung_masks(vol)
    boxes = crop_boxes(vol, masks, crop)
    return PreparedSlices(crop_and_resize(vol, boxes, size), boxes, (vol.shape[1], vol.shape[2]),
                          masks)


def uncrop(maps: np.ndarray, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Put maps computed on crops back on the original slice grid.

    ``maps`` (n, h, w) of any resolution are resized to each box and pasted
    into zeros of ``shape``; the result is (n, rows, cols) float32.
    """
    maps = np.asarray(maps, dtype=np.float32)
    out = np.zeros((maps.shape[0], *shape), dtype=np.float32)
    with torch.no_grad():
        for i, (r0, c0, r1, c1) in enumerate(np.asarray(boxes)):
            m = torch.from_numpy(np.ascontiguousarray(maps[i]))[None, None]
            out[i, r0:r1, c0:c1] = F.interpolate(m, size=(int(r1 - r0), int(c1 - c0)),
                                                 mode="bilinear", align_corners=False)[0, 0].numpy()
    return out
