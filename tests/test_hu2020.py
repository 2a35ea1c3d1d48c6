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
    series = load_series(study_factory("cap", 3, 24).directory)
    result = Engine(model, device="cpu").analyze(series)
    assert len(result.slices) == 24 and result.model.profile == "hu2020-small"
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
