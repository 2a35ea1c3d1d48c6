"""The inference engine on phantom studies: shapes, determinism, geometry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from inference.checkpoint import LungSysModel, save_checkpoint
from inference import localize
from inference.engine import Engine
from inference.preprocess import lung_masks
from inference.profiles import CLASSES
from inference.series import load_series

from doubles import hotspot_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "init.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=2), path)
    return path


@pytest.fixture(scope="module")
def series(study_factory):
    return load_series(study_factory("covid", 1, 24).directory)


def test_engine_result_describes_every_slice(checkpoint, series):
    result = Engine(checkpoint, device="cpu", batch_size=5).analyze(series)
    assert [s.sop_instance_uid for s in result.slices] == series.sop_instance_uids
    assert result.probabilities.shape == (4,) and abs(result.probabilities.sum() - 1) < 1e-6
    assert result.diagnosis in CLASSES
    assert 0.0 <= result.infected_fraction <= 1.0
    assert result.maps.maps.shape == (24, 64, 64)       # ResBlock1: 256 input / 4
    grid = result.maps.on_grid(10)
    assert grid.shape == series.hu.shape[1:] and 0 <= grid.min() and grid.max() <= 1
    r0, c0, r1, c1 = result.maps.boxes[10]
    assert grid[:r0].max() == 0 and grid[r1:].max() == 0 and grid[:, :c0].max() == 0
    for s in result.slices:
        assert 0 <= s.lesion_probability <= 1 and abs(s.class_probabilities.sum() - 1) < 1e-5
    assert set(result.timings) == {"preprocess", "slice_network", "patient", "localisation"}
    assert result.model.version.startswith("small-")


def test_batch_size_and_method_do_not_change_slice_results(checkpoint, series):
    a = Engine(checkpoint, device="cpu", batch_size=24).analyze(series)
    b = Engine(checkpoint, device="cpu", batch_size=7, method="nonparametric").analyze(series)
    np.testing.assert_allclose([s.lesion_probability for s in a.slices],
                               [s.lesion_probability for s in b.slices], atol=1e-5)
    np.testing.assert_allclose(a.network_probabilities, b.network_probabilities, atol=1e-5)
    assert b.method == "nonparametric"
    np.testing.assert_allclose(b.probabilities, b.nonparametric_scores)
    assert b.diagnosis_index == b.nonparametric_diagnosis_index


def test_maps_and_boxes_land_on_the_original_grid(checkpoint, series):
    # the double's hot spot ignores the slice, so its mirror view would put a second
    # spot on the other side: the mirror image is proved in test_localize.py
    result = Engine(hotspot_model(), device="cpu", mirror=False).analyze(series)
    spacing = float(np.mean(series.pixel_spacing))
    checked = 0
    for s in result.slices:
        r0, c0, r1, c1 = result.maps.boxes[s.index]
        h, w = r1 - r0, c1 - c0
        if abs((r0 + r1) / 2 - 256) < 10 and abs((c0 + c1) / 2 - 256) < 10:
            continue  # only off-centre crops prove the registration
        if min(h, w) < 100:
            continue  # a sliver of lung: the hot spot is smaller than a lesion box
        expected = (r0 + 2 / 16 * h, c0 + 10 / 16 * w, r0 + 6 / 16 * h, c0 + 14 / 16 * w)
        assert len(s.boxes) == 1, s.index
        box = s.boxes[0]
        tol_r, tol_c = h / 64 + 3, w / 64 + 3
        # the hot spot, and what non-aerated lung it touches (extend_by_density): never less
        assert box.row0 <= expected[0] + tol_r and box.row1 >= expected[2] - tol_r
        assert box.col0 <= expected[1] + tol_c and box.col1 >= expected[3] - tol_c
        spot = localize.lesion_region(result.maps.on_grid(s.index), spacing)
        rows, cols = np.nonzero(spot)
        assert abs(rows.min() - expected[0]) <= tol_r and abs(rows.max() + 1 - expected[2]) <= tol_r
        assert abs(cols.min() - expected[1]) <= tol_c and abs(cols.max() + 1 - expected[3]) <= tol_c
        grid = result.maps.on_grid(s.index)
        peak = np.unravel_index(np.argmax(grid), grid.shape)
        assert expected[0] <= peak[0] <= expected[2] and expected[1] <= peak[1] <= expected[3]
        checked += 1
    assert checked >= 10
    assert result.infected_fraction > 0
    # the infected fraction: the regions over the lungs joined with them, the vessels and
    # airways inside a lung counted as lung (its mask's holes filled)
    lung = lung_masks(series.hu)
    regions = [result.maps.region(s.index) for s in result.slices]
    lesion_px = sum(int(r.sum()) for r in regions)
    lung_px = sum(int((ndimage.binary_fill_holes(lung[i]) | r).sum())
                  for i, r in enumerate(regions))
    assert (lung_px > sum(int(m.sum()) for m in lung)) and lesion_px > 0
    assert result.infected_fraction == pytest.approx(lesion_px / lung_px)


def lungsys(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lungsys")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_cli_analyze_runs_on_a_phantom_study(checkpoint, study_factory):
    study = study_factory("covid", 1, 24)
    proc = lungsys("analyze", str(study.directory), "--model", str(checkpoint), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["diagnosis"] in CLASSES
    assert set(report["probabilities"]) == set(CLASSES)
    assert abs(sum(report["probabilities"].values()) - 1) < 1e-4
    assert 0 <= report["infected_fraction"] <= 1
    assert len(report["slices"]) == 24
    assert {"sop_instance_uid", "lesion_probability", "boxes"} <= set(report["slices"][0])
    text = lungsys("analyze", str(study.directory), "--model", str(checkpoint))
    assert text.returncode == 0 and text.stdout.startswith("diagnosis: ")
    assert "infected fraction of the lung" in text.stdout


def test_cli_analyze_defaults_to_the_shipped_model_and_refuses_a_bad_one(study_factory,
                                                                         tmp_path):
    study = study_factory("covid", 1, 24)
    proc = lungsys("analyze", str(study.directory))
    assert proc.returncode == 0 and proc.stdout.startswith("diagnosis: ")
    assert "not a clinical model" in proc.stderr        # the shipped model says what it is
    bad = tmp_path / "bad.safetensors"
    bad.write_text("x")
    proc = lungsys("analyze", str(study.directory), "--model", str(bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    both = tmp_path / "two"                     # a folder of two series: which one, and how
    shutil.copytree(study.directory, both / "a")
    shutil.copytree(study_factory("h1n1", 2, 4).directory, both / "b")
    proc = lungsys("analyze", str(both))
    assert proc.returncode == 1 and "2 CT series found where one was expected" in proc.stderr
    assert proc.stderr.rstrip().endswith("; choose one with --series-uid")
    assert "not a clinical model" not in proc.stderr    # no model loaded for a study unread


def test_evidence_maps_peak_at_each_slices_lesion_probability():
    from inference.localize import evidence_maps
    evidence = np.zeros((3, 4, 4), dtype=np.float32)
    evidence[0, 1, 2], evidence[0, 3, 3] = 8.0, 2.0
    evidence[1, 0, 0] = 0.5
    maps = evidence_maps(evidence, np.array([0.9, 0.2, 0.7]))
    assert maps[0, 1, 2] == pytest.approx(0.9) and maps[0, 3, 3] == pytest.approx(0.225)
    assert maps[1].max() == pytest.approx(0.2)
    assert not maps[2].any()                          # no evidence: nothing, not NaN
