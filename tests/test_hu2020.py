"""Hu et al. 2020 as a lungsys model: three class activation maps max-pooled and summed into
the four classes, task 1 as "not Healthy", integrated-gradient lesion evidence; it trains,
round-trips through its checkpoint and analyses a series with the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from inference.checkpoint import LungSysModel, load_checkpoint
from training.train_slice import SliceTrainConfig, train_slice


def test_the_scores_are_the_summed_multi_scale_cams_and_task_1_is_not_healthy():
    model = LungSysModel.create("hu2020-small", seed=1).eval()
    net = model.slice_net
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        out = net(x)
        maps, scores = net.scores(net.levels(x))
    assert [m.shape[-1] for m in maps] == [32, 16, 8]                 # blocks 3, 4, 5
    assert torch.allclose(out.class_logits, sum(m.amax(dim=(2, 3)) for m in maps))
    healthy = torch.softmax(out.class_logits, dim=1)[:, 0]
    assert torch.allclose(torch.softmax(out.lesion_logits, dim=1)[:, 1], 1 - healthy, atol=1e-5)
    assert out.feature.shape == (2, model.profile.slice_feature_dim)
    _, evidence = net.lesion_evidence(x)
    assert evidence.shape == (2, 128, 128) and (evidence >= 0).all()
    assert sum(p.numel() for p in LungSysModel.create("hu2020-paper").slice_net.parameters()) \
        == 3_684_844                       # the paper's 32-256 channels, 13 convolutions


def test_hu2020_trains_round_trips_and_analyses(tiny, tmp_path, study_factory):
    from inference.engine import Engine
    from inference.series import load_series

    out = tmp_path / "hu.safetensors"
    meta = train_slice(SliceTrainConfig(data=str(tiny), out=str(out), arch="hu2020", epochs=2,
                                        lr=0.002, optimizer="adamw", batch_size=16,
                                        device="cpu"))
    model = load_checkpoint(out)
    assert model.profile.arch == "hu2020" and model.version.startswith("hu2020-small-")
    assert model.content_sha256 == meta["content_sha256"]
    series = load_series(study_factory("cap", 3, 12).directory)   # (integrated gradients:
    result = Engine(model, device="cpu").analyze(series)          # half a second a slice)
    assert len(result.slices) == 12 and result.model.profile == "hu2020-small"
    surest = max(result.slices, key=lambda s: s.lesion_probability).index
    grid = result.maps.on_grid(surest)          # the surest slice has a map, not zeros
    assert grid.shape == series.hu.shape[1:] and 0 < grid.max() <= 1 and grid.min() >= 0
    # the parameter-free vote counts each slice's likeliest class (Eq. 4 would count
    # Healthy twice: task 1 is 1 - P(Healthy))
    votes = np.bincount([int(np.argmax(s.class_probabilities)) for s in result.slices],
                        minlength=4)
    np.testing.assert_allclose(result.nonparametric_scores, votes / len(result.slices))

    # the patient network learns from its features (GAP of blocks 4 and 5)
    from training.train_patient import PatientTrainConfig, train_patient

    both = tmp_path / "hu-both.safetensors"
    train_patient(PatientTrainConfig(data=str(tiny), slice_model=str(out), out=str(both),
                                     epochs=2, batch_size=4, device="cpu"))
    whole = load_checkpoint(both)
    assert whole.profile.arch == "hu2020" and whole.metadata["provenance"]["patient"]
    again = Engine(whole, device="cpu").analyze(series)
    assert not np.allclose(again.network_probabilities, result.network_probabilities)
    assert abs(float(np.sum(again.network_probabilities)) - 1) < 1e-5


def test_hu2020_has_no_imagenet_weights_to_start_from(tmp_path):
    exe = Path(sys.executable).with_name("lungsys")
    (tmp_path / "w.pth").write_bytes(b"")
    proc = subprocess.run([str(exe), "model", "init", "--arch", "hu2020", "--backbone-weights",
                           str(tmp_path / "w.pth"), "--out", str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "train their network from scratch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_hu2020s_focal_loss_weighs_classes_by_inverse_frequency_with_gamma_one():
    """Eq. 1 of Hu et al. 2020: -w_c (1 - p_c)^gamma log p_c, w_c the inverse of class c's
    frequency (normalised to mean 1), gamma = 1."""
    from training.losses import HU2020_GAMMA, focal_loss, inverse_frequency_weights

    w = inverse_frequency_weights([10, 30, 30, 30])
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 2 / 3, 2 / 3]))
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)[[0, 1], target]
    expected = (-w[target] * (1 - p) * torch.log(p)).mean()
    assert HU2020_GAMMA == 1.0
    assert torch.allclose(focal_loss(logits, target, w, HU2020_GAMMA), expected)


def test_hu2020s_own_schedule_levels_first_then_joint_adam_and_early_stopping(tiny, tmp_path):
    """The paper's schedule (§Experiments Setup, §Training Configurations) as settings: Adam
    with beta 0.5/0.9, each level's classifier trained on its own before the joint one, early
    stopping on the validation loss, the epoch of the best validation accuracy written."""
    import csv
    import json

    from training.runs import make_optimizer

    def run(name, **kw):
        cfg = SliceTrainConfig(data=str(tiny), out=str(tmp_path / f"{name}.safetensors"),
                               arch="hu2020", lr=0.003, lr_step=50, batch_size=16, seed=2,
                               device="cpu", optimizer="adam", beta1=0.5, beta2=0.9, **kw)
        meta = train_slice(cfg)
        with (tmp_path / f"{name}.run" / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        return cfg, meta, rows

    cfg, meta, rows = run("paper", epochs=8, level_epochs=1, early_stop=2, focal=True)
    prov = meta["provenance"]
    adam = make_optimizer(cfg, torch.nn.Linear(2, 2))
    assert type(adam) is torch.optim.Adam and adam.defaults["betas"] == (0.5, 0.9)
    config = json.loads((tmp_path / "paper.run" / "config.json").read_text())
    assert (config["optimizer"], config["beta1"], config["beta2"]) == ("adam", 0.5, 0.9)
    log = (tmp_path / "paper.run" / "train.log").read_text()
    assert "epoch 2: each level's classifier trained, now the joint one" in log

    # the first phase's losses are each level's own classifier's, summed
    from inference.hu2020 import lesion_of
    from training.train_slice import task_losses

    net = LungSysModel.create("hu2020-small", seed=1).slice_net
    out = net(torch.rand(4, 3, 128, 128))
    lesion, label = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.functional.cross_entropy
    alone = task_losses(out, lesion, label, ce, ce, levels_alone=True)
    assert len(out.level_logits) == 3
    assert torch.allclose(alone[1], sum(ce(s, label) for s in out.level_logits))
    assert torch.allclose(alone[0], sum(ce(lesion_of(s), lesion) for s in out.level_logits))
    joint = task_losses(out, lesion, label, ce, ce)
    assert torch.allclose(joint[1], ce(sum(out.level_logits), label))

    # early stopping: the run ends once the validation loss has not fallen for 2 epochs
    losses = [float(r["val_loss"]) for r in rows]
    lowest = losses.index(min(losses))
    if len(rows) < 8:
        assert len(rows) - 1 - lowest == 2
        assert f"stopping early after epoch {len(rows)} of 8" in log
    else:
        assert len(rows) - 1 - lowest < 2 and "stopping early" not in log
    # the epoch written is the one of the best validation accuracy (both tasks' mean)
    accuracy = [(float(r["val_lesion_acc"]) + float(r["val_class_acc"])) / 2 for r in rows]
    assert prov["kept_epoch"] == accuracy.index(max(accuracy)) + 1
    assert prov["level_epochs"] == 1 and prov["early_stop"] == 2

    # started again, a run that stopped early stays stopped and writes the same weights
    again = train_slice(cfg)
    assert again["provenance"]["kept_epoch"] == prov["kept_epoch"]
    assert again["content_sha256"] == meta["content_sha256"]
    assert len(rows) == sum(1 for _ in (tmp_path / "paper.run" / "metrics.csv").open()) - 1


def test_the_first_phase_is_hu2020s_only(tiny, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="--arch hu2020 only"):
        train_slice(SliceTrainConfig(data=str(tiny), out=str(tmp_path / "m.safetensors"),
                                     epochs=1, level_epochs=1, device="cpu"))
