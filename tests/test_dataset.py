"""Datasets: manifest parsing and its errors; phantom sets split by patient."""

from __future__ import annotations

import csv

import pytest

from training.dataset import ManifestError, read_manifest, write_manifest
from training.phantom_set import generate_phantom_set


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("set")
    generate_phantom_set(out, per_class=5, seed=3, slices_range=(4, 6), workers=2)
    return out


def test_phantom_set_has_a_manifest_split_by_patient(tiny_set):
    entries = read_manifest(tiny_set)
    assert len(entries) == 20
    by_split = {s: [e for e in entries if e.split == s] for s in ("train", "val", "test")}
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    for split in by_split.values():
        assert sorted({e.label for e in split}) == [0, 1, 2, 3]
    assert len({e.path for e in entries}) == 20
    assert all(e.annotations and e.annotations.name == "truth.json" for e in entries)
    assert read_manifest(tiny_set / "manifest.csv", "test") == by_split["test"]
    first = entries[0]
    assert first.slice_annotations() and first.lesion_masks()[1].ndim == 3


def test_different_seeds_share_no_patient(tmp_path):
    a = generate_phantom_set(tmp_path / "a", 2, seed=10, slices_range=(2, 2), workers=1)
    b = generate_phantom_set(tmp_path / "b", 2, seed=11, slices_range=(2, 2), workers=1)
    names = lambda m: {e.path.name for e in read_manifest(m)}  # noqa: E731
    assert not names(a) & names(b)


def _write(folder, rows, header=("study", "label", "split")):
    folder.mkdir(exist_ok=True)
    with (folder / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return folder


@pytest.mark.parametrize("rows, header, words", [
    ([["s1", "covid", "train"]], ("study", "label"), "missing column(s) split"),
    ([["s1", "flu", "train"]], None, "line 2: unknown label 'flu'"),
    ([["s1", "covid", "holdout"]], None, "line 2: unknown split 'holdout'"),
    ([["nowhere", "covid", "train"]], None, "line 2: study folder 'nowhere' does not exist"),
    ([["s1", "covid", "train"], ["s1", "cap", "test"]], None, "line 3: study 's1' already on "
                                                            "line 2"),
    ([], None, "no studies"),
])
def test_manifest_errors(tmp_path, rows, header, words):
    (tmp_path / "s1").mkdir()
    folder = _write(tmp_path, rows, header or ("study", "label", "split"))
    with pytest.raises(ManifestError) as err:
        read_manifest(folder)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_missing_set_and_a_split_say_what_they_are(tmp_path):
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path / "no-such-set")
    assert str(err.value) == f"{tmp_path / 'no-such-set'}: no such folder or file"
    (tmp_path / "s1").mkdir()
    folder = _write(tmp_path, [["s1", "covid", "train"]])
    assert [e.path.name for e in read_manifest(folder, "all")] == ["s1"]   # every split
    with pytest.raises(ManifestError) as err:
        read_manifest(folder, "bogus")
    assert str(err.value) == "unknown split 'bogus'; expected one of train, val, test or all"


def test_manifest_optional_columns(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "truth.json").write_text('{"slices": []}')
    write_manifest(tmp_path / "manifest.csv", [
        {"study": "s1", "label": "COVID-19", "split": "train", "masks": "s1/masks.npz",
         "annotations": "s1/truth.json"}])
    with pytest.raises(ManifestError) as err:
        read_manifest(tmp_path)
    assert "masks file 's1/masks.npz' does not exist" in str(err.value)
    write_manifest(tmp_path / "manifest.csv", [
        {"study": "s1", "label": "COVID-19", "split": "train", "annotations": "s1/truth.json"}])
    entry = read_manifest(tmp_path)[0]
    assert entry.label == 1 and entry.class_name == "COVID-19" and entry.masks is None
    with pytest.raises(ManifestError):
        read_manifest(tmp_path / "missing")
