"""The synthetic chest CT phantom: valid DICOM, deterministic, and lesion
patterns that follow the seed papers' descriptions of each class."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from training.phantom import LABELS, build_phantom, generate_study

from conftest import dciodvfy_errors


@pytest.mark.parametrize("label", LABELS)
def test_every_file_passes_dciodvfy(study_factory, label):
    study = study_factory(label, 11, 12)
    for f in study.files:
        assert dciodvfy_errors(f) == [], f.name


def test_scanner_attributes(covid_study):
    ds = pydicom.dcmread(covid_study.files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.BodyPartExamined == "CHEST"
    assert ds.AccessionNumber and ds.PatientID and ds.FrameOfReferenceUID
    assert int(ds.ImagesInAcquisition) == len(covid_study.files)
    assert (ds.Rows, ds.Columns) == (512, 512)
    assert 0.6 <= float(ds.PixelSpacing[0]) <= 0.9
    assert 1.0 <= float(ds.SliceThickness) <= 5.0


def test_same_seed_same_study(tmp_path):
    a = generate_study(tmp_path / "a", "h1n1", 42, 6)
    b = generate_study(tmp_path / "b", "h1n1", 42, 6)
    for fa, fb in zip(a.files, b.files):
        assert fa.read_bytes() == fb.read_bytes()
    assert (a.directory / "truth.json").read_bytes() == (b.directory / "truth.json").read_bytes()
    ma, mb = np.load(a.directory / "masks.npz"), np.load(b.directory / "masks.npz")
    np.testing.assert_array_equal(ma["lesion"], mb["lesion"])
    c = generate_study(tmp_path / "c", "h1n1", 43, 6)
    assert a.files[0].read_bytes() != c.files[0].read_bytes()


def test_truth_matches_files_and_masks(covid_study):
    truth = json.loads((covid_study.directory / "truth.json").read_text())
    masks = np.load(covid_study.directory / "masks.npz")
    n = len(covid_study.files)
    assert masks["lung"].shape == masks["lesion"].shape == (n, 512, 512)
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            for f in covid_study.files}
    assert {s["sop_instance_uid"] for s in truth["slices"]} == uids
    assert not (masks["lesion"] & ~masks["lung"]).any()
    for i, s in enumerate(truth["slices"]):
        assert s["has_lesion"] == bool(masks["lesion"][i].any())
        lung = masks["lung"][i].sum()
        expected = masks["lesion"][i].sum() / lung if lung else 0.0
        assert s["lesion_fraction"] == pytest.approx(expected, abs=1e-6)
        assert bool(s["lesion_types"]) == s["has_lesion"]
    total = masks["lesion"].sum() / masks["lung"].sum()
    assert truth["infected_fraction"] == pytest.approx(total, abs=1e-6)


SEEDS = range(20, 30)


def _lesions(label):
    return [(seed, build_phantom(label, seed, 2).lesions) for seed in SEEDS]


def test_covid_is_bilateral_peripheral_and_lower_zone():
    zones = Counter()
    for seed, lesions in _lesions("covid"):
        ggo = [les.truth for les in lesions if les.truth["kind"] == "subpleural_ggo"]
        assert {t["side"] for t in ggo} == {"left", "right"}, seed
        assert all(t["pleural_distance_mm"] <= 12.0 for t in ggo), seed
        zones.update(t["zone"] for t in ggo)
    assert zones["upper"] <= 0.15 * sum(zones.values())
    assert zones["lower"] > zones["upper"]


def test_h1n1_is_peribronchovascular_with_centrilobular_nodules():
    for seed, lesions in _lesions("h1n1"):
        kinds = Counter(les.truth["kind"] for les in lesions)
        assert kinds["peribronchovascular_consolidation"] >= 1
        for les in lesions:
            if les.truth["kind"] == "peribronchovascular_consolidation":
                assert 2 <= les.truth["bundle_generation"] <= 5
            if les.truth["kind"] == "centrilobular_nodule":
                assert les.truth["pleural_distance_mm"] >= 4.0


def test_cap_is_lobar_or_segmental_mostly_in_one_lung():
    unilateral = 0
    for seed, lesions in _lesions("cap"):
        cores = [les.truth for les in lesions if les.truth["kind"].endswith("consolidation")]
        assert cores, seed
        for t in cores:
            assert t["lobe"].startswith(t["side"])
        unilateral += len({t["side"] for t in cores}) == 1
    assert unilateral >= 0.6 * len(SEEDS)


def _pleural_distance(lung: np.ndarray, spacing: float) -> np.ndarray:
    return np.stack([ndimage.distance_transform_edt(s, sampling=spacing) for s in lung])


@pytest.mark.parametrize("label", ["covid", "h1n1", "cap"])
def test_rendered_lesions_show_the_class_pattern(study_factory, label):
    """What a reader sees in the pixels: where the lesion masks lie and what they hold."""
    study = study_factory(label, 5, 32, severity=0.7)
    masks = np.load(study.directory / "masks.npz")
    lung, lesion = masks["lung"], masks["lesion"]
    truth = study.truth
    assert lesion.any()
    spacing = truth["pixel_spacing_mm"]
    columns = np.arange(512)
    right = np.broadcast_to(columns < 256, lesion.shape)  # HFS: the patient's right on the left
    types = set().union(*(s["lesion_types"] for s in truth["slices"]))
    depth = _pleural_distance(lung, spacing)
    if label == "covid":
        assert (lesion & right).sum() > 0 and (lesion & ~right).sum() > 0
        assert "ground_glass_opacity" in types
        # subpleural: most of the lesion lies within 10 mm of the pleura, unlike the lung
        assert (depth[lesion] <= 10).mean() > 2 / 3 > 0.5 > (depth[lung] <= 10).mean()
        rows_with = [i for i, s in enumerate(truth["slices"]) if s["has_lesion"]]
        assert np.mean(rows_with) < len(truth["slices"]) / 2 + 2  # lower half (HFS: feet first)
    if label == "h1n1":
        assert "consolidation" in types
    if label == "cap":
        assert {"consolidation", "air_bronchogram"} <= types
        side_share = max((lesion & right).sum(), (lesion & ~right).sum()) / lesion.sum()
        sides = {t["side"] for t in truth["lesions"]}
        assert side_share > 0.9 or sides == {"left", "right"}


def test_healthy_has_no_lesion(study_factory):
    study = study_factory("healthy", 11, 12)
    assert not any(s["has_lesion"] for s in study.truth["slices"])
    assert not np.load(study.directory / "masks.npz")["lesion"].any()
    assert study.truth["lesions"] == []


def test_severity_sets_the_extent():
    mild = build_phantom("covid", 8, 24, severity=0.05)
    severe = build_phantom("covid", 8, 24, severity=0.95)
    _, lung_m, les_m, _, _ = mild.render()
    _, lung_s, les_s, _, _ = severe.render()
    assert les_m.sum() / lung_m.sum() < 0.03
    assert les_s.sum() / lung_s.sum() > 2 * les_m.sum() / lung_m.sum()
    assert sum(s.any() for s in les_m) < len(les_m) / 2


@pytest.mark.parametrize("label, seed", [("covid", 8), ("h1n1", 5), ("cap", 5)])
def test_lesion_type_truth_matches_the_masks_pixel_by_pixel(study_factory, label, seed):
    """masks.npz ``types`` holds each lesion pixel's types as bits: every lesion pixel has
    one, no other pixel has any, each slice's truth lists the types its pixels show, and
    every lesion of truth.json names its types."""
    from training.phantom.lesions import LESION_TYPES, TYPE_BITS, type_names

    study = study_factory(label, seed, 32, severity=0.8)
    masks = np.load(study.directory / "masks.npz")
    types, lesion, lung = masks["types"], masks["lesion"], masks["lung"]
    truth = study.truth
    assert types.dtype == np.uint8 and types.shape == lesion.shape
    assert np.array_equal(types > 0, lesion) and not types[~lung].any()
    assert truth["lesion_type_bits"] == TYPE_BITS
    for i, s in enumerate(truth["slices"]):
        assert s["lesion_types"] == type_names(int(np.bitwise_or.reduce(types[i], axis=None)))
    shown = set().union(*(s["lesion_types"] for s in truth["slices"]))
    assert shown <= set().union(*(les["types"] for les in truth["lesions"]))
    assert all(set(les["types"]) <= set(LESION_TYPES) and les["types"]
               for les in truth["lesions"])
    consolidation = (types & TYPE_BITS["consolidation"]) > 0
    ggo_only = types == TYPE_BITS["ground_glass_opacity"]
    stacked = np.load(study.directory / "masks.npz")["lesion"]
    assert consolidation.any() and stacked[consolidation].all()
    if label == "cap":       # air bronchograms: the bronchi's air inside the consolidation
        air = (types & TYPE_BITS["air_bronchogram"]) > 0
        assert air.any() and consolidation[air].all()
    if label == "covid":
        assert ggo_only.any()
