"""The lungsys command as an admin runs it: exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def lungsys(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lungsys")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)


def test_help_teaches_the_commands():
    proc = lungsys("--help")
    assert proc.returncode == 0
    assert "phantom" in proc.stdout and "scan" in proc.stdout
    assert lungsys("--version").stdout.startswith("lungsys ")


def test_phantom_writes_a_study(tmp_path):
    proc = lungsys("phantom", "--out", str(tmp_path / "s"), "--label", "cap", "--seed", "3",
                   "--slices", "6")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 CT slices" in proc.stdout
    truth = json.loads((tmp_path / "s" / "truth.json").read_text())
    assert truth["label"] == "cap" and truth["seed"] == 3 and len(truth["slices"]) == 6
    assert (tmp_path / "s" / "masks.npz").exists()
    assert len(list((tmp_path / "s").glob("CT*.dcm"))) == 6

    scan = lungsys("scan", "--json", str(tmp_path / "s"))
    assert scan.returncode == 0
    report = json.loads(scan.stdout)
    assert report["series"][0]["files"] == 6
    assert {Path(s["path"]).name for s in report["skipped"]} == {"truth.json", "masks.npz"}


@pytest.mark.parametrize("args, words", [
    (["phantom", "--out", "x", "--label", "flu", "--seed", "1"], "unknown label 'flu'"),
    (["scan", "/nonexistent/folder"], "no such file or folder"),
])
def test_bad_input_is_one_line_and_status_1(tmp_path, args, words):
    proc = lungsys(*args)
    assert proc.returncode == 1
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_scan_of_a_folder_without_ct_fails(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    proc = lungsys("scan", str(tmp_path))
    assert proc.returncode == 1
    assert "readme.txt: not a DICOM file" in proc.stdout
    assert "no CT image series found" in proc.stderr


def test_usage_error_is_status_2():
    assert lungsys("phantom", "--label", "covid").returncode == 2


def test_a_phantom_set_too_small_for_its_splits_is_warned_of(tmp_path):
    """3 studies a class leave the test split empty: phantom-set says so when it writes the
    set, and evaluating the empty split is a one-line error that says why."""
    proc = lungsys("phantom-set", "--out", str(tmp_path / "set"), "--per-class", "3",
                   "--seed", "5", "--slices-range", "4", "5")
    assert proc.returncode == 0, proc.stderr
    assert "warning: with 3 studies per class the splits hold train 2, val 1, test 0" in \
        proc.stderr
    manifest = (tmp_path / "set" / "manifest.csv").read_text()
    wrong = lungsys("phantom-set", "--out", str(tmp_path / "other"), "--per-class", "3",
                    "--seed", "6", "--slices-range", "20", "16")
    assert wrong.returncode == 2 and "the fewest slices must be at least 1 and at most the " \
        "most" in wrong.stderr and "warning" not in wrong.stderr
    again = lungsys("phantom-set", "--out", str(tmp_path / "set"), "--per-class", "1",
                    "--seed", "6", "--slices-range", "4", "5")    # a set is never overwritten
    assert again.returncode == 1 and again.stderr == f"lungsys: error: {tmp_path / 'set'} " \
        f"already holds a dataset (manifest.csv): choose another folder, or remove that one " \
        f"first\n"                                     # and no split warning before it
    assert (tmp_path / "set" / "manifest.csv").read_text() == manifest
    shipped = Path(__file__).parents[1] / "inference/models/lungsys-small-phantom.safetensors"
    proc = lungsys("evaluate", "--model", str(shipped), "--data", str(tmp_path / "set"),
                   "--split", "test")
    assert proc.returncode == 1 and "no test studies in the manifest" in proc.stderr
    assert "fewer than 5" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_training_warns_of_an_empty_or_incomplete_split(tmp_path):
    """A set whose validation split is empty and whose training split lacks a class still
    trains, but each training command says so first (nothing to follow, a class never
    learnt)."""
    import csv

    assert lungsys("phantom-set", "--out", str(tmp_path / "set"), "--per-class", "3",
                   "--seed", "5", "--slices-range", "4", "5").returncode == 0
    manifest = tmp_path / "set" / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [dict(r, split="test" if r["split"] == "val" else r["split"]) for r in rows
            if not (r["split"] == "train" and r["label"] == "cap")]
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    typo = lungsys("train", "slice", "--data", str(tmp_path / "set"), "--out",
                   str(tmp_path / "s.safetensors"), "--profile", "huge")
    assert typo.returncode == 1 and typo.stderr == "lungsys: error: m3 has no profile " \
        "'huge'; expected one of paper, small\n"                   # no warning before it
    for command, arch, refusal in (("slice", "dualsampling", "is a volume model: lungsys "
                                    "train volume"),
                                   ("volume", "m3", "is a slice model: lungsys train slice")):
        wrong = lungsys("train", command, "--arch", arch, "--data", str(tmp_path / "set"),
                        "--out", str(tmp_path / "w.safetensors"))
        assert wrong.returncode == 1 and wrong.stderr == \
            f"lungsys: error: --arch {arch} {refusal}\n"            # nor before this
    for command, refusal in (
            (["slice", "--optimizer", "adamm"], "unknown optimizer 'adamm'; expected sgd, "
                                                "adam or adamw"),
            (["patient", "--slice-model", str(tmp_path / "gone.safetensors")],
             f"{tmp_path / 'gone.safetensors'}: no such checkpoint file")):
        wrong = lungsys("train", *command, "--data", str(tmp_path / "set"), "--out",
                        str(tmp_path / "w.safetensors"))
        assert wrong.returncode == 1 and wrong.stderr == f"lungsys: error: {refusal}\n"
    proc = lungsys("train", "slice", "--data", str(tmp_path / "set"), "--out",
                   str(tmp_path / "s.safetensors"), "--epochs", "1", "--batch-size", "8",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: the train split of {tmp_path / 'set'} has no CAP study" in proc.stderr
    assert f"warning: the val split of {tmp_path / 'set'} is empty: no validation accuracy " \
        "will be measured" in proc.stderr
    assert (tmp_path / "s.safetensors").is_file()
