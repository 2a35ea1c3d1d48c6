"""A dataset made from one's own studies (`lungsys dataset`): a labels file with each
study's class and the Instance Numbers a radiologist found lesions on becomes a manifest and
slice annotations that training takes; a labels file or study it cannot use is one line
naming the row, and nothing is written."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training.dataset import read_manifest
from training.own_studies import LabelsError, make_dataset, parse_slices


def lungsys(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lungsys")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)


def _ranges(numbers: list[int]) -> str:
    """Instance Numbers as a radiologist writes them down: "3-5 8"."""
    parts, start = [], None
    for n in sorted(numbers) + [None]:
        if start is None:
            start = last = n
        elif n is not None and n == last + 1:
            last = n
        else:
            parts.append(f"{start}-{last}" if last != start else str(start))
            start = last = n
    return " ".join(parts)


def _labels(tiny: Path, where: Path, without_lesions: str = "") -> tuple[Path, dict]:
    """A labels file for the tiny set's studies, copied as one's own (no truth beside them),
    with the lesion slices the phantom's truth names; returns it and the truth by study."""
    truth, rows = {}, []
    for entry in read_manifest(tiny):
        own = where / "studies" / f"patient-{len(rows):02d}"
        shutil.copytree(entry.path, own, ignore=shutil.ignore_patterns("*.json", "*.npz"))
        slices = json.loads(entry.annotations.read_text())["slices"]
        truth[own.name] = {s["sop_instance_uid"]: s["has_lesion"] for s in slices}
        lesions = [s["instance_number"] for s in slices if s["has_lesion"]]
        rows.append({"study": f"studies/{own.name}", "label": entry.class_name,
                     "lesion_slices": "" if own.name == without_lesions else _ranges(lesions)})
    labels = where / "labels.csv"
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["study", "label", "lesion_slices"])
        writer.writeheader()
        writer.writerows(rows)
    return labels, truth


def test_own_studies_become_a_dataset_that_trains(tiny, tmp_path):
    labels, truth = _labels(tiny, tmp_path, without_lesions="patient-07")
    proc = lungsys("dataset", "--labels", str(labels), "--out", str(tmp_path / "ds"))
    assert proc.returncode == 0, proc.stderr
    assert "lungsys: warning: 1 diseased studies have no lesion_slices" in proc.stderr
    entries = read_manifest(tmp_path / "ds")
    assert len(entries) == 20 and not (tmp_path / "studies" / "patient-00" / "truth.json").exists()
    for name in range(4):                           # 60/20/20 by patient within each class
        assert sorted(e.split for e in entries if e.label == name) == \
            ["test", "train", "train", "train", "val"]
    for e in entries:                               # the radiologist's slices, by SOP UID
        if e.path.name == "patient-07":
            assert e.annotations is None
            continue
        flags = {uid: note["has_lesion"] for uid, note in e.slice_annotations().items()}
        assert flags == truth[e.path.name], e.path.name
    assert sum(any(truth[e.path.name].values()) for e in entries if e.label) == 15

    trained = lungsys("train", "slice", "--data", str(tmp_path / "ds"), "--out",
                      str(tmp_path / "s.safetensors"), "--epochs", "1", "--batch-size", "8",
                      "--device", "cpu")
    assert trained.returncode == 0, trained.stderr
    seven = next(e for e in entries if e.path.name == "patient-07")
    assert seven.split == "train"                   # (drawn so with the default seed)
    assert "1 diseased training studies without every slice's lesion annotation are left " \
           "out of slice training" in trained.stdout + trained.stderr
    again = lungsys("dataset", "--labels", str(labels), "--out", str(tmp_path / "ds"))
    assert again.returncode == 1 and "already holds a dataset" in again.stderr


@pytest.mark.parametrize("row, words", [
    ("studies/nowhere,covid,", "line 2: study folder 'studies/nowhere' does not exist"),
    ("studies/a,flu,", "line 2: unknown label 'flu'"),
    ("studies/a,healthy,3", "line 2: a healthy study has no lesion slices"),
    ("studies/a,covid,5-3", "line 2: '5-3': the range runs backwards"),
    ("studies/a,covid,3;x", "line 2: 'x' is not an Instance Number or a range"),
    ("studies/a,covid,2-3 40", "no slice with Instance Number 40 (its slices are numbered 1 "
                               "to"),
    ("studies/two,covid,2", "2 CT series found where one was expected"),
])
def test_a_row_it_cannot_use_is_named_and_nothing_is_written(tiny, tmp_path, row, words):
    entry = read_manifest(tiny, "train")[0]
    shutil.copytree(entry.path, tmp_path / "studies" / "a")
    shutil.copytree(entry.path, tmp_path / "studies" / "two" / "1")
    other = read_manifest(tiny, "train")[1].path
    shutil.copytree(other, tmp_path / "studies" / "two" / "2")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"study,label,lesion_slices\n{row}\n")
    with pytest.raises(LabelsError) as caught:
        make_dataset(labels, tmp_path / "ds")
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "ds").exists()


def test_lesion_slices_are_read_as_a_radiologist_writes_them():
    assert parse_slices("31-33 52, 7;8") == {7, 8, 31, 32, 33, 52}
    assert parse_slices("") == set()
