"""The lesion map's two averages: over a slice's mirror image, and along the slice normal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.checkpoint import LungSysModel
from inference.engine import Engine, run_slices
from inference.localize import MIN_NEIGHBOUR_WEIGHT, THROUGH_PLANE_MM, through_plane
from inference.preprocess import uncrop
from inference.identity import AlgorithmIdentity
from inference.series import load_series

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
