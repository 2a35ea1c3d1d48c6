"""Training and evaluation end to end on a handful of phantom patients."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference.checkpoint import load_checkpoint, read_metadata
from inference.engine import Engine
from training.evaluate import studies_seen
from training.train_patient import PatientTrainConfig, train_patient
from training.train_slice import SliceTrainConfig, train_slice


def _metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _config(tiny, tmp_path, name, epochs):
    return SliceTrainConfig(data=str(tiny), out=str(tmp_path / f"{name}.safetensors"),
                            run_dir=str(tmp_path / f"{name}.run"), epochs=epochs, lr=0.001,
                            optimizer="adamw", lr_step=10, batch_size=16, seed=3,
                            device="cpu")  # AdamW: what the shipped model trains with


def test_slice_training_lowers_the_loss_and_writes_a_loadable_model(tiny, tmp_path):
    meta = train_slice(_config(tiny, tmp_path, "a", 5))
    rows = _metrics(tmp_path / "a.run")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    first = float(rows[0]["lesion_loss"]) + float(rows[0]["class_loss"])
    last = float(rows[-1]["lesion_loss"]) + float(rows[-1]["class_loss"])
    assert last < first
    model = load_checkpoint(tmp_path / "a.safetensors")
    assert model.metadata["provenance"]["kind"] == "slice-trained"
    assert model.metadata["provenance"]["epochs"] == 5
    assert meta["content_sha256"] == model.content_sha256
    config = json.loads((tmp_path / "a.run" / "config.json").read_text())
    assert config["lr"] == 0.001 and config["seed"] == 3 and config["optimizer"] == "adamw"
    assert "val_class_acc" in rows[0]
    # its patient network was never trained: whoever reads the network's diagnosis is told
    assert model.untrained() == "patient" and model.untrained(network_diagnosis=False) == ""
    info = Engine(model, device="cpu").model_info
    assert info.caution == "this model's patient-level network is untrained: its diagnosis " \
        "means nothing"                                                     # to a reader
    assert "'lungsys train patient --slice-model MODEL'" in info.advice   # to who runs it
    assert Engine(model, device="cpu", method="nonparametric").model_info.caution == ""
    proc = subprocess.run([str(Path(sys.executable).with_name("lungsys")), "evaluate",
                           "--model", str(tmp_path / "a.safetensors"), "--data",
                           str(tmp_path / "no-such-set")], capture_output=True, text=True,
                          timeout=300)
    assert f"lungsys: warning: {tmp_path / 'a.safetensors'}: this model's patient-level " \
           f"network is untrained" in proc.stderr and proc.returncode == 1


def test_what_a_model_learnt_from_is_found_however_deep_its_provenance(tiny, tmp_path):
    """A patient network trained on another model's networks: the datasets of both, and an
    untrained slice network below it, are found (evaluate and analyze warn of them)."""
    from inference.checkpoint import LungSysModel, save_checkpoint

    model = LungSysModel.create("small")
    model.metadata["provenance"] = {
        "kind": "trained", "patient": {"data": str(tmp_path / "gone")},  # moved: not read
        "slice": {"kind": "trained", "slice": {"kind": "slice-trained", "data": str(tiny)},
                  "patient": {"data": 5}}}                      # odd values are passed over
    save_checkpoint(model, tmp_path / "deep.safetensors")
    meta = read_metadata(tmp_path / "deep.safetensors")
    assert studies_seen(meta, tiny, "all") == 16
    assert studies_seen(meta, tiny, "test") == 0
    assert model.untrained() == ""
    model.metadata["provenance"]["slice"] = {"kind": "init"}
    assert model.untrained() == "model"


def test_resume_continues_from_the_saved_epoch_and_matches(tiny, tmp_path):
    whole = train_slice(_config(tiny, tmp_path / "whole", "m", 3))
    cfg = _config(tiny, tmp_path / "split", "m", 1)
    train_slice(cfg)
    saved = tmp_path / "split" / "m.run" / "config.json"     # as an older lungsys wrote it
    older = json.loads(saved.read_text())
    del older["arch"]
    saved.write_text(json.dumps(older))
    cfg.epochs = 3
    resumed = train_slice(cfg)
    rows = _metrics(tmp_path / "split" / "m.run")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert "1 of 3 epochs done; continuing with epoch 2" in (
        tmp_path / "split" / "m.run" / "train.log").read_text()
    assert resumed["content_sha256"] == whole["content_sha256"]  # deterministic with a seed
    cfg.lr = 0.5  # other settings on a run that has state: refused
    with pytest.raises(ValueError, match="other settings"):
        train_slice(cfg)


def test_patient_training_and_evaluation(tiny, tmp_path):
    slice_model = tmp_path / "s.safetensors"
    train_slice(SliceTrainConfig(data=str(tiny), out=str(slice_model), epochs=1,
                                 batch_size=16, device="cpu"))
    out = tmp_path / "model.safetensors"
    train_patient(PatientTrainConfig(data=str(tiny), slice_model=str(slice_model),
                                     out=str(out), epochs=15, lr=0.01, batch_size=4,
                                     device="cpu"))
    rows = _metrics(out.with_suffix(".run"))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    model = load_checkpoint(out)
    assert model.metadata["provenance"]["kind"] == "trained"
    assert "synthetic" in model.metadata["intended_use"]       # a phantom-trained model says so
    slice_net = load_checkpoint(slice_model).slice_net.state_dict()
    for key, value in model.slice_net.state_dict().items():  # the slice network stayed frozen
        assert (value == slice_net[key]).all(), key

    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "evaluate", "--model", str(out), "--data", str(tiny),
                           "--json", "--out", str(tmp_path / "eval"), "--record"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("patient_accuracy", "per_class", "fpe", "fne", "fdpe", "pointing_game",
                "infected_fraction_mae"):
        assert key in report, key
    assert report["patients"] == 4
    assert 0 <= report["lesion_slices_flagged"] <= report["lesion_slices_scored"]
    assert report["small_sample"] is True and report["patients_per_class"]["CAP"] == 1
    assert set(report["per_class"]) == {"Healthy", "COVID-19", "H1N1", "CAP"}
    assert {"sensitivity", "specificity", "auc"} <= set(report["per_class"]["CAP"])
    assert report["nonparametric"]["patient_accuracy"] is not None
    assert 0 <= report["p_value_accuracy_network_vs_nonparametric"] <= 1
    assert all(Path(p).is_file() for p in report["roc_png"])
    recorded = load_checkpoint(out).metadata["metrics"]
    assert recorded["patient_accuracy"] == report["patient_accuracy"]
    assert recorded["pointing_game_flagged"] == report["pointing_game_flagged"]
    # its test split is unseen; its val split chose the slice network's epochs: said so
    assert "trained it or chose its epochs" not in proc.stderr
    meta = read_metadata(out)
    assert (studies_seen(meta, tiny, "test"), studies_seen(meta, tiny, "all")) == (0, 16)
    proc = subprocess.run([str(exe), "evaluate", "--model", str(out), "--data", str(tiny),
                           "--split", "val"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"lungsys: warning: {out}: 4 of the studies evaluated " \
        f"trained it or chose its epochs" in proc.stderr


def test_training_says_each_epoch_stops_on_ctrl_c_and_goes_on(tiny, tmp_path):
    """What a data scientist sees in a log: a line per epoch with the time left; Ctrl-C
    says which epochs were kept and how to continue; the same command continues."""
    import signal
    import time

    exe = Path(sys.executable).with_name("lungsys")
    command = [str(exe), "train", "slice", "--data", str(tiny), "--out",
               str(tmp_path / "s.safetensors"), "--epochs", "40", "--lr", "0.001",
               "--optimizer", "adamw", "--batch-size", "16", "--device", "cpu"]
    metrics = tmp_path / "s.run" / "metrics.csv"
    # as from a terminal: Ctrl-C not ignored, even when the suite itself was started in the
    # background (a shell's background job inherits SIGINT ignored, and so would this one)
    as_from_a_terminal = [sys.executable, "-c", "import os, signal, sys; "
                          "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                          "os.execv(sys.argv[1], sys.argv[1:])"]
    proc = subprocess.Popen(as_from_a_terminal + command, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3) \
            and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    kept = len(metrics.read_text().splitlines()) - 1          # rows after the header
    assert 2 <= kept < 40
    assert "epoch 1/40: lesion loss" in err and "validation class accuracy" in err
    assert "left" in err.split("epoch 2/40:")[1].splitlines()[0]      # the time left
    assert f"stopped in epoch {kept + 1} of 40" in err
    assert f"run the same command again to continue with epoch {kept + 1}" in err
    assert "Traceback" not in err and not (tmp_path / "s.safetensors").exists()

    command[command.index("--epochs") + 1] = str(kept + 1)       # now: one more epoch
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"{kept} of {kept + 1} epochs done; continuing with epoch {kept + 1}" in done.stderr
    assert f"epoch {kept + 1}/{kept + 1}:" in done.stderr
    assert (tmp_path / "s.safetensors").is_file()


def test_evaluate_compares_models_on_the_same_studies(tiny, tmp_path):
    """Two models side by side: one table (a column each, the errors named, the time per
    300-slice study), and the bootstrap p-value of the pair."""
    from inference.checkpoint import default_model

    other = tmp_path / "other.safetensors"
    train_slice(SliceTrainConfig(data=str(tiny), out=str(other), epochs=1, batch_size=16,
                                 device="cpu"))
    exe = Path(sys.executable).with_name("lungsys")
    command = [str(exe), "evaluate", "--model", str(default_model()), "--model", str(other),
               "--data", str(tiny), "--device", "cpu"]
    proc = subprocess.run([*command, "--json", "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    comparison = json.loads(proc.stdout)
    assert json.loads((tmp_path / "eval" / "comparison.json").read_text()) == comparison
    names = list(comparison["models"])
    assert len(names) == 2 and names[1].startswith("other (")
    [pair] = comparison["pairs"]
    assert (pair["a"], pair["b"]) == tuple(names) and 0 <= pair["p_value_accuracy"] <= 1
    for report in comparison["models"].values():
        assert report["patients"] == comparison["patients"] == 4
        assert report["seconds_per_300_slices"] > 0
        assert report["timed_on"].endswith(" threads") and " cores, " in report["timed_on"]
    table = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr
    for words in ("FPE: healthy called diseased", "FDPE: diseased, wrong disease",
                  "seconds per 300-slice study", f"p-value (accuracy, {names[0]} vs",
                  "small sample: 1 patient a class",
                  f"seconds per 300-slice study timed on {report['timed_on']}"):
        assert words in table.stdout, words
    # the same table in Markdown, for a README: a row per model, a column per metric
    markdown = (tmp_path / "eval" / "comparison.md").read_text().splitlines()
    header = markdown[0].strip("| ").split(" | ")
    assert header[:3] == [f"model (4 patients, split {comparison['split']})",
                          "accuracy [95% CI]", "FPE / FNE / FDPE (%)"]
    assert markdown[1] == "| --- |" + " ---: |" * (len(header) - 1)
    rows = {line.strip("| ").split(" | ")[0]: dict(zip(header, line.strip("| ").split(" | ")))
            for line in markdown[2:4]}
    assert list(rows) == names
    first, second = (comparison["models"][name] for name in names)
    assert rows[names[0]]["accuracy [95% CI]"].startswith(
        f"{100 * first['patient_accuracy']:.1f}% [")
    assert len(rows[names[1]]["AUC Healthy / COVID-19 / H1N1 / CAP (%)"].split(" / ")) == 4
    assert rows[names[1]]["seconds per 300-slice study"] == \
        f"{second['seconds_per_300_slices']:.1f}"
    stems = [default_model().stem, "other"]             # the pair named by file name
    assert comparison["files"] == dict(zip(names, stems))
    assert markdown[5].startswith("FPE: the share of healthy patients called diseased;")
    assert f": {stems[0]} vs {stems[1]} {pair['p_value_accuracy']:.3f}. Seconds timed on " \
        f"{first['timed_on']}." in markdown[5]


def test_a_model_trained_on_the_mirrored_crop_keeps_it(tiny, tmp_path, study_factory):
    """``--crop mirrored``: the slices are cached and trained on that crop, the checkpoint's
    profile and preprocessing record it, patient training and the engine crop the same
    way; a checkpoint without it reads the paper's crop."""
    from inference.engine import Engine
    from inference.preprocess import crop_boxes
    from inference.profiles import Profile
    from inference.series import load_series

    slice_model, out = tmp_path / "s.safetensors", tmp_path / "m.safetensors"
    train_slice(SliceTrainConfig(data=str(tiny), out=str(slice_model), epochs=1,
                                 batch_size=16, device="cpu", crop="mirrored",
                                 cache_dir=str(tmp_path / "cache")))
    train_patient(PatientTrainConfig(data=str(tiny), slice_model=str(slice_model),
                                     out=str(out), epochs=2, batch_size=4, device="cpu",
                                     cache_dir=str(tmp_path / "cache")))
    assert [p.name for p in (tmp_path / "cache").glob("crops*")] == ["crops-mirrored-256"]
    model = load_checkpoint(out)
    assert model.profile.crop == "mirrored"
    assert model.metadata["preprocessing"]["crop"] == "mirrored"
    series = load_series(study_factory("cap", 6, 40).directory)
    result = Engine(model, device="cpu").analyze(series)
    assert (result.maps.boxes == crop_boxes(series.hu, crop="mirrored")).all()
    assert (result.maps.boxes != crop_boxes(series.hu)).any()
    from inference.identity import AlgorithmIdentity      # the results say which crop

    assert "crop=mirrored" in AlgorithmIdentity.from_model_info(result.model, "network").parameters
    old = {k: v for k, v in model.profile.to_dict().items() if k != "crop"}
    assert Profile.from_dict(old).crop == "lungs"


def test_fine_tuning_starts_from_a_models_slice_network(tiny, tmp_path):
    """``--from-model``: the slice network starts from another checkpoint's (the shipped
    model's, retrained on one's own studies), which the provenance names; a model of
    other sizes or a volume model is refused in one line."""
    import torch

    from inference.checkpoint import LungSysModel, save_checkpoint

    start = tmp_path / "start.safetensors"
    save_checkpoint(LungSysModel.create("small", seed=9), start)
    meta = train_slice(SliceTrainConfig(data=str(tiny), out=str(tmp_path / "ft.safetensors"),
                                        epochs=1, lr=1e-9, optimizer="adamw", batch_size=16,
                                        device="cpu", from_model=str(start)))
    assert meta["provenance"]["from_model"] == load_checkpoint(start).version
    tuned, original = load_checkpoint(tmp_path / "ft.safetensors"), load_checkpoint(start)
    weight = "backbone.conv1.weight"
    assert torch.allclose(tuned.slice_net.state_dict()[weight],
                          original.slice_net.state_dict()[weight], atol=1e-6)
    fresh = LungSysModel.create("small", seed=0).slice_net.state_dict()[weight]
    assert not torch.allclose(tuned.slice_net.state_dict()[weight], fresh)
    for other in ("ladnn-small", "dualsampling-small"):
        save_checkpoint(LungSysModel.create(other), tmp_path / f"{other}.safetensors")
        with pytest.raises(ValueError, match="does not fit 'small'"):
            train_slice(SliceTrainConfig(data=str(tiny), out=str(tmp_path / "x.safetensors"),
                                         run_dir=str(tmp_path / f"{other}.run"), epochs=1,
                                         batch_size=16, device="cpu",
                                         from_model=str(tmp_path / f"{other}.safetensors")))


def test_early_stopping_counts_the_epochs_since_the_lowest_validation_loss(tmp_path):
    """The stop rule read back from metrics.csv, as a resumed run reads it: N epochs
    without a validation loss below the lowest so far (an equal one is not lower)."""
    import torch

    from training.runs import Epochs, Run

    run = Run(tmp_path / "r.run", {"x": 1})
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.8, 0.85], start=1):
        run.record({"epoch": epoch, "val_loss": loss})
    net = torch.nn.Linear(1, 1)

    def stalled(patience, finished):
        cfg = SliceTrainConfig(data="d", out="o", epochs=10, early_stop=patience)
        epochs = Epochs(run, cfg, net, torch.optim.SGD(net.parameters(), lr=0.1))
        epochs.finished = finished
        return epochs.stalled()

    assert stalled(3, 5) and not stalled(4, 5)     # lowest at epoch 2; 3 epochs since
    assert not stalled(2, 3) and stalled(1, 3)     # only the epochs finished count
    assert not stalled(0, 5)                       # 0: never
    assert "has not fallen since epoch 2 (0.8000) for 3 epoch(s)" in run.log_path.read_text()


def test_metrics_gain_a_column_when_a_resumed_run_records_more(tmp_path):
    from training.runs import Run

    run = Run(tmp_path / "r.run", {"x": 1})
    run.record({"epoch": 1, "loss": 0.5})             # as an older lungsys recorded it
    run.record({"epoch": 2, "loss": 0.4, "val_loss": 0.6})
    assert run.rows() == [{"epoch": "1", "loss": "0.5", "val_loss": ""},
                          {"epoch": "2", "loss": "0.4", "val_loss": "0.6"}]
