"""A dataset made from one's own studies (`lungsys dataset`): a labels file with each
study's class and the Instance Numbers a radiologist found lesions on becomes a manifest and
slice annotations that training takes; a labels file or study it cannot use is one line
naming the row, and nothing is written."""

from __future__ import annotations

import csv
import json
import re
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
    assert "lungsys: warning: 1 diseased study without lesion_slices or segmentation " \
           "(line(s) 9): 'lungsys train slice' leaves them out" in proc.stderr
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
    assert "1 diseased training study without every slice's lesion annotation is left out " \
           "of slice training" in trained.stdout + trained.stderr
    again = lungsys("dataset", "--labels", str(labels), "--out", str(tmp_path / "ds"))
    assert again.returncode == 1 and "already holds a dataset" in again.stderr

    # the validation studies not annotated: nothing validates the slice network's epochs
    rows = list(csv.DictReader(labels.open()))
    split = {e.path.name: e.split for e in entries}
    for row in rows:
        row["split"] = split[Path(row["study"]).name]
        if row["split"] == "val":
            row["lesion_slices"] = ""
    with labels.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["study", "label", "split", "lesion_slices"])
        writer.writeheader()
        writer.writerows(rows)
    made = make_dataset(labels, tmp_path / "ds2")
    assert "the val split has no diseased study with lesion_slices or a segmentation: " \
        "'lungsys train slice' has no validation accuracy to choose its epochs by" \
        in made["warnings"]
    stopped = lungsys("train", "slice", "--data", str(tmp_path / "ds2"), "--out",
                      str(tmp_path / "s2.safetensors"), "--epochs", "1", "--early-stop", "1",
                      "--batch-size", "8", "--device", "cpu")
    assert stopped.returncode == 1 and "the validation split has no diseased study with " \
        "lesion annotations" in stopped.stdout + stopped.stderr
    assert "--early-stop follows the validation loss" in stopped.stderr


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
    assert parse_slices("31-33 52, 7;8 10 \u2013 12") == [(31, 33), (52, 52), (7, 7),
                                                         (8, 8), (10, 12)]
    assert parse_slices("") == []
    for bad in ("\u0663", "1" * 5000, "3-"):            # Arabic-Indic three; 5000 digits
        with pytest.raises(ValueError, match="is not an Instance Number or a range"):
            parse_slices(bad)


def _two_studies(tiny: Path, where: Path) -> list[Path]:
    studies = []
    for n, entry in enumerate(read_manifest(tiny, "train")[:2]):
        studies.append(where / "studies" / f"s{n}")
        shutil.copytree(entry.path, studies[-1])
    return studies


def test_every_row_it_cannot_use_is_named_at_once_and_a_huge_range_costs_nothing(
        tiny, tmp_path):
    a, b = _two_studies(tiny, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("study,label,lesion_slices\n"
                      "studies/s0,covid,2-3, 5\n"                  # an unquoted comma
                      "studies/s1,covid,1-99999999\n"              # a typo: no memory spent
                      "studies/gone,cap,\n")
    proc = lungsys("dataset", "--labels", str(labels), "--out", str(tmp_path / "ds"))
    assert proc.returncode == 1 and not (tmp_path / "ds").exists()
    assert proc.stderr.splitlines() == [
        "lungsys: error: labels.csv line 2: more fields than the header has columns (quote a "
        "lesion_slices that holds commas: \"31-38, 52\")",
        "lungsys: error: labels.csv line 4: study folder 'studies/gone' does not exist"]
    labels.write_text("study,label,lesion_slices\nstudies/s1,covid,1-99999999\n")
    with pytest.raises(LabelsError, match=r"no slice with Instance Number 1-99999999 \(its "
                                          r"slices are numbered 1 to \d\)"):
        make_dataset(labels, tmp_path / "ds")


def test_a_labels_file_as_excel_saves_it_is_read(tiny, tmp_path):
    """UTF-8 with a byte-order mark, semicolons, CRLF, column names in capitals, an empty
    row at the end, a split in capitals."""
    _two_studies(tiny, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffStudy;LABEL;Split;Lesion_Slices\r\n"
                       "studies/s0;COVID-19;Train;\"2-3, 5\"\r\n"
                       "studies/s1;healthy;test;\r\n;;;\r\n".encode("utf-8"))
    made = make_dataset(labels, tmp_path / "ds")
    assert made["studies"] == 2
    [covid, healthy] = read_manifest(tmp_path / "ds")
    assert (covid.split, covid.class_name, healthy.split) == ("train", "COVID-19", "test")
    flags = [n["has_lesion"] for n in json.loads(covid.annotations.read_text())["slices"]]
    numbers = [n["instance_number"] for n in json.loads(covid.annotations.read_text())["slices"]]
    assert sorted(n for n, f in zip(numbers, flags) if f) == [2, 3, 5]


def test_a_patients_studies_share_a_split_and_a_series_is_taken_once(tiny, tmp_path):
    import pydicom
    from pydicom.uid import generate_uid

    a, b = _two_studies(tiny, tmp_path)
    follow_up = tmp_path / "studies" / "follow-up"          # patient of s0, another study
    follow_up.mkdir()
    study, series = generate_uid(), generate_uid()
    for f in sorted(a.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(follow_up / f.name)
    patient = str(pydicom.dcmread(next(a.glob("*.dcm"))).PatientID)
    labels = tmp_path / "labels.csv"
    labels.write_text("study,label\nstudies/s0,covid\nstudies/follow-up,covid\n"
                      "studies/s1,cap\n")
    for seed in range(3):                                   # whatever the draw
        out = tmp_path / f"ds{seed}"
        made = make_dataset(labels, out, seed=seed)
        splits = {e.path.name: e.split for e in read_manifest(out)}
        assert splits["s0"] == splits["follow-up"], seed
        assert patient not in json.dumps(made)              # rows by line, never a patient
    for f in b.glob("*.dcm"):                    # an anonymiser's one ID on every study
        ds = pydicom.dcmread(f)
        ds.PatientID = patient
        ds.save_as(f)
    made = make_dataset(labels, tmp_path / "one-id")
    assert any(w.startswith("3 of 3 studies have one Patient ID (line(s) 2, 3, 4)")
               for w in made["warnings"]), made["warnings"]
    copy = tmp_path / "studies" / "copy"                    # the same series twice
    shutil.copytree(a, copy)
    labels.write_text("study,label\nstudies/s0,covid\nstudies/copy,covid\n")
    with pytest.raises(LabelsError, match="line 3 \\(studies/copy\\): the same series as "
                                          "line 2"):
        make_dataset(labels, tmp_path / "dsx")
    labels.write_text("study,label,split\nstudies/s0,covid,train\n"
                      "studies/follow-up,covid,test\n")
    made = make_dataset(labels, tmp_path / "dsy")
    assert made["warnings"][0].startswith("lines 2, 3 are one patient in the test and train "
                                          "splits")


def test_the_dataset_folder_is_checked_before_any_study_is_read(tiny, tmp_path):
    a, _ = _two_studies(tiny, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("study,label\nstudies/s0,covid\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "used" / "annotations").mkdir(parents=True)
    for out, words in ((tmp_path / "a-file", "a file, not a folder"),
                       (a / "dataset", "lies in the study folder of line(s) 2"),
                       (tmp_path / "used", "holds annotations/ already")):
        with pytest.raises(LabelsError, match=re.escape(words)):
            make_dataset(labels, out)
    assert not (a / "dataset").exists()
