"""The paper's preprocessing: lung crop boxes, window levelling, uncropping."""

from __future__ import annotations

import numpy as np
import pytest

from inference import preprocess
from inference.preprocess import (INFERENCE_CENTRES, crop_boxes, lung_bounding_box, prepare,
                                  random_centre, uncrop, window)
from inference.series import load_series

MIN_LUNG_MM2 = 100.0  # a slice "has lung" from 1 cm^2 of it


@pytest.mark.parametrize("label, seed", [("healthy", 1), ("healthy", 3), ("covid", 2),
                                         ("h1n1", 3), ("cap", 2)])
def test_lung_box_holds_the_lung_and_little_else(study_factory, label, seed):
    study = study_factory(label, seed, 40)
    series = load_series(study.directory)
    masks = np.load(study.directory / "masks.npz")
    lung, lesion = masks["lung"], masks["lesion"]
    pixel_mm2 = study.truth["pixel_spacing_mm"] ** 2
    boxes = crop_boxes(series.hu)
    checked = 0
    for i in range(len(series)):
        if lung[i].sum() * pixel_mm2 < MIN_LUNG_MM2:
            continue
        checked += 1
        r0, c0, r1, c1 = boxes[i]
        # consolidation (> -300 HU) is not air, so the paper's threshold cannot
        # see it; everything else of the lung must be inside the box
        aerated = lung[i] & ~(lesion[i] & (series.hu[i] > -300))
        if label == "healthy":
            assert aerated.sum() == lung[i].sum()
        assert aerated[r0:r1, c0:c1].sum() >= 0.98 * aerated.sum(), i
        rows = np.flatnonzero(lung[i].any(axis=1))
        cols = np.flatnonzero(lung[i].any(axis=0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        if min(h, w) >= 100:  # the 10-pixel margin alone is 1.5x a smaller box
            assert (r1 - r0) * (c1 - c0) <= 1.5 * h * w, i
    assert checked >= 25


def test_volume_boxes_contain_single_slice_boxes(covid_study):
    """A volume's neighbouring slices can only add lung to a slice's box."""
    series = load_series(covid_study.directory)
    boxes = crop_boxes(series.hu)
    for i in range(len(series)):
        box = lung_bounding_box(series.hu[i])
        if box is None:
            continue
        assert all(isinstance(v, int) for v in box)
        assert tuple(crop_boxes(series.hu[i])[0]) == box
        r0, c0, r1, c1 = boxes[i]
        assert r0 <= box[0] and c0 <= box[1] and box[2] <= r1 and box[3] <= c1


def test_slices_without_lung_do_not_fail():
    air = np.full((64, 64), -1000.0, dtype=np.float32)
    assert lung_bounding_box(air) is None
    body = air.copy()
    body[10:50, 20:44] = 40.0  # soft tissue, no lung
    assert lung_bounding_box(body) is None
    boxes = crop_boxes(np.stack([air, body]))
    assert tuple(boxes[0]) == (0, 0, 64, 64)       # nothing: the whole slice
    assert tuple(boxes[1]) == (10, 20, 50, 44)     # the body's box
    out = prepare(np.stack([air, body]), 32)
    assert out.crops.shape == (2, 32, 32) and np.isfinite(out.crops).all()


def test_lung_inside_body_is_found_and_table_air_is_not():
    hu = np.full((128, 128), -1000.0, dtype=np.float32)
    hu[20:100, 10:118] = 40.0                      # body
    hu[40:80, 25:55] = -850.0                      # right lung
    hu[40:80, 70:105] = -850.0                     # left lung
    hu[110:116, :] = 200.0                         # table, air core open to the sides
    hu[112:114, :] = -900.0
    assert lung_bounding_box(hu) == (30, 15, 90, 115)
    with pytest.raises(ValueError):
        lung_bounding_box(np.zeros((2, 3, 4)))


def test_window_levelling():
    hu = np.array([-1300.0, -1200.0, -600.0, 0.0, 100.0])
    np.testing.assert_allclose(window(hu, -600.0), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window(hu, -700.0), [0.0, 1 / 12, 7 / 12, 1.0, 1.0])
    assert INFERENCE_CENTRES == (-700.0, -600.0, -500.0)
    assert preprocess.WINDOW_WIDTH == 1200.0
    rng = np.random.default_rng(0)
    centres = [random_centre(rng) for _ in range(1000)]
    assert -700.0 <= min(centres) < -690.0 and -510.0 < max(centres) <= -500.0


def test_prepare_gives_three_channel_network_input(covid_study):
    series = load_series(covid_study.directory)
    prepared = prepare(series.hu, 128)
    x = prepared.windowed(-600.0)
    assert x.shape == (len(series), 3, 128, 128) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(x[:, 0], x[:, 2])


def test_uncrop_puts_maps_back_on_the_original_grid():
    boxes = np.array([[30, 200, 130, 450]])  # off-centre, not square
    maps = np.zeros((1, 64, 64), dtype=np.float32)
    maps[0, :, 32:] = 1.0                     # the right half of the crop
    out = uncrop(maps, boxes, (512, 512))
    assert out.shape == (1, 512, 512)
    assert out[0, :30].max() == 0 and out[0, 130:].max() == 0 and out[0, :, :200].max() == 0
    assert out[0, 30:130, 330:450].min() > 0.99  # right half of the box, 125 columns
    assert out[0, 30:130, 200:320].max() < 0.01


def test_fast_opening_equals_scipy_binary_opening():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    mask = rng.random((3, 40, 60)) < 0.7
    expected = ndimage.binary_opening(mask, structure=np.ones((1, 1, 8), dtype=bool))
    np.testing.assert_array_equal(preprocess._opening(mask), expected)


@pytest.mark.parametrize("slices", [1, 31, 32, 33, 70])
def test_lung_masks_on_slabs_equal_one_labelling_of_the_whole_volume(slices):
    """The masks are made 32 slices at a time, components crossing slabs joined after:
    exactly what labelling the whole volume at once gives, including components that wind
    through several slab boundaries."""
    from scipy import ndimage

    from inference import preprocess as P

    rng = np.random.default_rng(slices)
    vol = np.full((slices, 48, 48), 40, dtype=np.int16)              # a body ...
    vol[:, 4:44, 4:44] = np.where(rng.random((slices, 40, 40)) < 0.55, -850, 40)  # ... of air
    vol[:, 0, :] = vol[:, :, 0] = -1000                               # air around it
    low = vol < P.LUNG_THRESHOLD_HU
    opened = P._opening(P._drop_background(P._opening(low)))         # as before the slabs
    labels, count = ndimage.label(P._drop_background(low, min_px=1), structure=P._RECONSTRUCT)
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[opened])] = True
    keep[0] = False
    assert np.array_equal(P.lung_masks(vol), keep[labels])
    assert P.lung_masks(vol[0]).shape == (48, 48)


@pytest.mark.parametrize("seed", [6, 7])
def test_the_mirrored_crop_keeps_a_consolidated_lung(study_factory, seed):
    """Where consolidation fills much of one lung, the paper's box (air below -300 HU)
    leaves up to half of that lung out; the mirrored crop (the box joined with its mirror
    image about the body's midline) keeps all of it, and still holds the paper's box."""
    study = study_factory("cap", seed, 40)
    series = load_series(study.directory)
    lung = np.load(study.directory / "masks.npz")["lung"]
    paper, mirrored = crop_boxes(series.hu), crop_boxes(series.hu, crop="mirrored")

    def inside(box, i):
        r0, c0, r1, c1 = box
        return lung[i][r0:r1, c0:c1].sum() / lung[i].sum()

    slices = [i for i in range(len(series)) if lung[i].sum() >= 200]
    assert min(inside(paper[i], i) for i in slices) < 0.6
    assert min(inside(mirrored[i], i) for i in slices) >= 0.98
    for i in slices:
        (a0, b0, a1, b1), (m0, n0, m1, n1) = paper[i], mirrored[i]
        assert m0 == a0 and m1 == a1 and n0 <= b0 and b1 <= n1


def test_the_mirrored_crop_of_healthy_lungs_is_about_the_papers(study_factory):
    """Two healthy lungs are about symmetric: mirroring adds little to their box."""
    series = load_series(study_factory("healthy", 1, 40).directory)
    paper, mirrored = crop_boxes(series.hu), crop_boxes(series.hu, crop="mirrored")
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])       # noqa: E731
    assert (area(mirrored) <= 1.25 * area(paper)).mean() >= 0.9
    with pytest.raises(ValueError, match="unknown crop 'both'"):
        crop_boxes(series.hu, crop="both")
