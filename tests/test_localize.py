"""The lesion map's two averages (over a slice's mirror image, and along the slice normal)
and the region's extent (the non-aerated lung it touches)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from inference.checkpoint import LungSysModel
from inference.engine import Engine, run_slices
from inference.localize import (MIN_NEIGHBOUR_WEIGHT, THROUGH_PLANE_MM, extend_by_density,
                                through_plane)
from inference.preprocess import lung_envelope, lung_masks, uncrop
from inference.identity import AlgorithmIdentity
from inference.series import load_series
from training.metrics import dice

CPU = torch.device("cpu")


def test_the_mirror_view_is_mirrored_back():
    """The map of a mirrored slice is the mirror image of the slice's map, and its
    probabilities are the slice's: the second view's evidence is flipped back."""
    net = LungSysModel.create("small", seed=4).slice_net.eval()
    rng = np.random.default_rng(0)
    crops = rng.uniform(-1000, 200, (3, 256, 256)).astype(np.float32)
    crops[:, 40:90, 150:220] = -300.0                  # something off the midline
    a = run_slices(net, crops, 8, CPU, evidence=True)
    b = run_slices(net, np.ascontiguousarray(crops[:, :, ::-1]), 8, CPU,
                   evidence=True)
    np.testing.assert_allclose(b.evidence, a.evidence[:, :, ::-1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.lesion, a.lesion, atol=1e-6)
    one = run_slices(net, crops, 8, CPU, evidence=True, mirror=False)
    assert not np.allclose(one.evidence, a.evidence)   # the second view counts


def test_a_neighbours_spot_lands_where_it_lies_on_the_slice():
    """Neighbouring slices' crops differ; a spot at one place of the body is averaged in
    at that place, weighed by distance, and slices beyond the reach add nothing."""
    maps = np.zeros((4, 16, 16), dtype=np.float32)
    boxes = np.array([[100, 100, 260, 260], [80, 120, 240, 280], [100, 100, 260, 260],
                      [100, 100, 260, 260]])
    maps[1, 4:8, 4:8] = 1.0                             # grid rows 120-160, cols 160-200
    along = np.array([0.0, 5.0, 10.0, 5.0 + 4 * THROUGH_PLANE_MM])
    out = through_plane(maps, boxes, along)
    grid = uncrop(out, boxes, (512, 512))
    peak = np.unravel_index(np.argmax(grid[0]), grid[0].shape)
    assert 120 <= peak[0] < 160 and 160 <= peak[1] < 200
    w = np.exp(-5.0 / THROUGH_PLANE_MM)
    assert grid[0].max() == pytest.approx(w / (1 + w + np.exp(-10 / THROUGH_PLANE_MM)),
                                          rel=0.02)
    assert out[1].max() == pytest.approx(1 / (1 + 2 * w), rel=1e-5)   # its own weighs 1
    assert np.exp(-4) < MIN_NEIGHBOUR_WEIGHT and not out[3].any()     # 18 mm away: nothing
    assert 0 <= out.min() and out.max() <= 1


def test_a_lesion_tip_is_pointed_at_from_its_neighbours():
    """A slice whose own map points elsewhere (task 1 hardly sees the tip of a lesion)
    gets the place its confident neighbours point at."""
    maps = np.zeros((3, 8, 8), dtype=np.float32)
    boxes = np.tile([0, 0, 80, 80], (3, 1))
    maps[0, 2, 2] = maps[2, 2, 2] = 0.9                  # neighbours: sure, same place
    maps[1, 6, 6] = 0.15                                  # the tip: faint, elsewhere
    out = through_plane(maps, boxes, np.array([0.0, 5.0, 10.0]))
    assert np.unravel_index(np.argmax(out[1]), (8, 8)) == (2, 2)


def test_the_engine_says_it_mirrored(study_factory):
    series = load_series(study_factory("covid", 1, 8).directory)
    model = LungSysModel.create("small", seed=2)
    both = Engine(model, device="cpu").analyze(series)
    one = Engine(model, device="cpu", mirror=False).analyze(series)
    assert both.model.mirror and not one.model.mirror
    assert "views=as acquired and mirrored" in \
        AlgorithmIdentity.from_model_info(both.model, "network").parameters
    assert "views=as acquired" in AlgorithmIdentity.from_model_info(one.model, "network").parameters
    assert not np.allclose(both.maps.maps, one.maps.maps)


def _slice_of(study, pick):
    """(HU, lesion mask, lung mask, spacing) of the slice ``pick`` chooses by lesion area."""
    series = load_series(study.directory)
    truth = json.loads((study.directory / "truth.json").read_text())
    lesion = np.load(study.directory / "masks.npz")["lesion"]
    row = {s["sop_instance_uid"]: i for i, s in enumerate(truth["slices"])}
    masks = np.stack([lesion[row[uid]] for uid in series.sop_instance_uids])
    i = pick(masks.sum(axis=(1, 2)))
    lung = lung_masks(np.asarray(series.hu))[i]          # the volume's: as the engine cuts it
    spacing = float(np.mean(series.pixel_spacing))
    return np.asarray(series.hu[i], np.float32), masks[i], lung, spacing


def test_a_consolidation_is_measured_whole_from_the_part_the_map_marks(study_factory):
    """A lobar consolidation (the CAP phantom's largest, not air, so outside the lung mask):
    a spot the map would mark inside it grows to the consolidation, not to the chest wall
    or the heart next to it."""
    def middle(areas):                                  # the consolidation's middle slice
        large = np.flatnonzero(areas > 0.5 * areas.max())
        return large[len(large) // 2]

    hu, lesion, lung, spacing = _slice_of(study_factory("cap", 2, 24), middle)
    assert (lesion & ~ndimage.binary_fill_holes(lung)).sum() > 0.5 * lesion.sum()
    depth = ndimage.distance_transform_edt(lesion)
    spot = depth >= depth.max() - 3                     # deep inside: a few pixels
    region = extend_by_density(spot, hu, lung_envelope(hu, lung, spacing))
    assert spot.sum() < 0.05 * lesion.sum()
    assert dice(region, lesion) > 0.65, dice(region, lesion)
    assert region.sum() < 1.4 * lesion.sum() and (region & (hu < -500)).sum() == 0


def test_a_spot_on_aerated_lung_stays_small(study_factory):
    """Where there is no consolidation, the region gains at most the vessels it touches."""
    hu, lesion, lung, spacing = _slice_of(study_factory("healthy", 2, 24), lambda a: len(a) // 2)
    assert not lesion.any()
    rows, cols = np.nonzero(lung & (hu < -800))
    spot = np.zeros(hu.shape, dtype=bool)
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]
    spot[r - 3:r + 4, c - 3:c + 4] = True
    region = extend_by_density(spot, hu, lung_envelope(hu, lung, spacing))
    assert region.sum() < 3 * spot.sum() + 400 * (1 / spacing) ** 2   # vessels: < 4 cm^2


def test_a_consolidation_by_the_mediastinum_does_not_take_it_in():
    """A lung wrapping round the mediastinum past the midline, in front and behind: with
    its mirror image it encloses the mediastinum, which must stay out of the envelope and
    out of a consolidation touching it (the heart and vessels are as dense)."""
    yy, xx = np.mgrid[:200, :200]
    hu = np.full((200, 200), -1000.0, dtype=np.float32)
    hu[((yy - 100) / 80) ** 2 + ((xx - 100) / 90) ** 2 < 1] = 40.0     # body, soft tissue
    radius2 = (yy - 100) ** 2 + (xx - 100) ** 2
    ring = (radius2 < 60 ** 2) & (radius2 > 25 ** 2)
    lung = ring & ((xx < 108) | (xx > 120))     # one lung past the midline (col 100)
    consolidation = lung & (xx < 80) & (abs(yy - 100) < 10)             # touches the centre
    hu[lung & ~consolidation] = -850.0
    envelope = lung_envelope(hu, lung & ~consolidation, 1.0)
    assert not envelope[100, 100] and envelope[45, 100] and envelope[100, 60]
    spot = np.zeros(hu.shape, dtype=bool)
    spot[98:102, 50:54] = True
    region = extend_by_density(spot, hu, envelope)
    assert region[100, 60] and not region[100, 100]
    assert region.sum() < 1.2 * consolidation.sum()
