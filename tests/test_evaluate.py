"""`lungsys evaluate` run again: each study evaluated before is taken from the dataset's
cache, not analysed again, and the report is the same; a study whose files changed, another
model, or --no-cache analyses again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from inference.checkpoint import LungSysModel, save_checkpoint
from inference.engine import Engine
from training.dataset import read_manifest
from training.evaluate import evaluate
from training.evaluated import EvaluationCache


def _figures(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "studies_kept_before"}


def test_an_evaluation_run_again_analyses_no_study_twice(tiny, tmp_path, monkeypatch):
    tiny = Path(shutil.copytree(tiny, tmp_path / "data"))   # its files change below
    model = tmp_path / "m.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=1), model)
    cache = tmp_path / "cache"
    first = evaluate(model, tiny, "test", "cpu", cache_dir=cache)
    assert first["studies_kept_before"] == 0 and first["patients"] == 4

    def refuse(self, series, progress=None):
        raise AssertionError("a study evaluated before was analysed again")

    with monkeypatch.context() as m:
        m.setattr(Engine, "analyze", refuse)
        again = evaluate(model, tiny, "test", "cpu", cache_dir=cache)
    assert again["studies_kept_before"] == 4
    assert _figures(again) == _figures(first)

    # a study whose annotations were written again is analysed again; the others are not
    changed = read_manifest(tiny, "test")[0].annotations
    changed.write_text(changed.read_text())
    assert evaluate(model, tiny, "test", "cpu", cache_dir=cache)["studies_kept_before"] == 3
    # nor is anything taken for another model's weights, or another machine
    other = tmp_path / "other.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=2), other)
    keys = {EvaluationCache(cache, Engine(m, device="cpu"), machine).key
            for m in (model, other) for machine in ("this CPU", "another CPU")}
    assert len(keys) == 4

    # the command says so; --no-cache analyses every study again
    exe = str(Path(sys.executable).with_name("lungsys"))
    command = [exe, "evaluate", "--model", str(model), "--data", str(tiny), "--device", "cpu",
               "--cache-dir", str(cache)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "4 of 4 studies as evaluated before with this model, code and machine" in \
        proc.stdout
    proc = subprocess.run(command + ["--no-cache"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "evaluated before" not in proc.stdout, proc.stderr


def test_only_the_most_recently_used_evaluations_are_kept(tiny, tmp_path):
    """Every model and code change starts a new evaluation folder in the cache: the oldest
    beyond KEEP_EVALUATIONS go when an evaluation is kept, unless used in the last hour (a
    comparison of many models run again), and nothing else in the cache is touched (a file
    or folder not named as the cache names its own, a link)."""
    import os
    import time

    from training.evaluated import KEEP_EVALUATIONS, Collected

    cache, now = tmp_path / "cache", time.time()
    folders = []
    for age in range(KEEP_EVALUATIONS + 6):        # 0 the newest; 13 used within the hour
        folder = cache / f"evaluated-{age:016x}"
        folder.mkdir(parents=True)
        (folder / f"{age:024x}.json").write_text("{}")
        when = now - 60 - age if age <= KEEP_EVALUATIONS else now - 7200 - age
        os.utime(folder, (when, when))
        folders.append(folder)
    theirs = cache / "evaluated-0000000000000099"       # holds a file the cache never writes
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    os.utime(theirs, (1, 1))
    crops = cache / "crops-256"
    crops.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{1:024x}.json").write_text("{}")
    os.utime(elsewhere, (1, 1))
    linked = cache / f"evaluated-{'f' * 16}"            # a link, however old: not followed
    linked.symlink_to(elsewhere)
    os.utime(linked, (1, 1), follow_symlinks=False)
    model = tmp_path / "m.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=1), model)
    kept = EvaluationCache(cache, Engine(model, device="cpu"), "this CPU")
    entry = read_manifest(tiny, "test")[0]
    kept.put(entry, Collected())
    # this evaluation is the newest; the 13 others used within the hour stay, older go
    assert (cache / f"evaluated-{kept.key}").is_dir()
    assert [f.is_dir() for f in folders] == [True] * (KEEP_EVALUATIONS + 1) + [False] * 5
    assert (theirs / "notes.txt").read_text() == "mine" and crops.is_dir()
    assert linked.is_symlink() and (elsewhere / f"{1:024x}.json").exists()
    assert kept.get(entry) is not None
