"""LA-DNN as a lungsys model: it builds, trains its lesion-type task from the phantom's
truth, round-trips through its checkpoint (which names the architecture), analyses a
series with the engine, and starts from torchvision DenseNet-169 weights."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.checkpoint import LungSysModel, load_checkpoint, read_metadata
from inference.ladnn import LESION_TYPES
from training.train_slice import SliceTrainConfig, train_slice


def test_the_lesion_score_is_the_chance_of_any_lesion_type():
    model = LungSysModel.create("ladnn-small", seed=1).eval()
    with torch.no_grad():
        out = model.slice_net(torch.rand(3, 3, 128, 128))
    types = torch.sigmoid(out.lesion_type_logits)
    assert out.lesion_type_logits.shape == (3, len(LESION_TYPES)) == (3, 5)
    lesion = torch.softmax(out.lesion_logits, dim=1)[:, 1]
    assert torch.allclose(lesion, 1 - torch.prod(1 - types, dim=1), atol=1e-5)
    assert out.feature.shape == (3, model.profile.slice_feature_dim)
    assert out.lesion_map.min() >= 0 and out.lesion_map.max() <= 1


def test_the_lesion_evidence_is_the_score_attributed_at_an_eighth_of_the_input():
    """The map users see: the lesion score's gradient times the activation at the end of
    the second dense block (16 x 16 for 128 pixels), the forward pass unchanged; on VGG-16
    the paper's Grad-CAM++ on the last features (4 x 4)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128)
    model = LungSysModel.create("ladnn-small", seed=1).eval()
    net = model.slice_net
    out, evidence = net.lesion_evidence(x)
    with torch.no_grad():
        plain = net(x)
    assert evidence.shape == (2, 16, 16) and (evidence >= 0).all() and evidence.sum() > 0
    assert torch.allclose(out.class_logits, plain.class_logits, atol=1e-4)
    a = net.backbone.features[:7](x).requires_grad_(True)          # ... denseblock2
    scored = net.heads(torch.relu(net.backbone.features[7:](a)))
    score = scored.lesion_logits[:, 1] - scored.lesion_logits[:, 0]
    (g,) = torch.autograd.grad(score.sum(), a)
    assert torch.allclose(evidence, torch.relu((g * a).sum(dim=1)), atol=1e-5)
    vgg = LungSysModel.create("ladnn-vgg16-small", seed=1).eval().slice_net
    assert vgg.lesion_evidence(x)[1].shape == (2, 4, 4)


def test_ladnn_trains_its_lesion_types_round_trips_and_analyses(tiny, tmp_path, study_factory):
    from inference.engine import Engine
    from inference.series import load_series

    out = tmp_path / "ladnn.safetensors"
    meta = train_slice(SliceTrainConfig(data=str(tiny), out=str(out), arch="ladnn", epochs=3,
                                        lr=0.002, optimizer="adamw", batch_size=16,
                                        device="cpu"))
    with (tmp_path / "ladnn.run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["type_loss"]) < float(rows[0]["type_loss"])   # it learns them
    assert read_metadata(out)["profile"]["arch"] == "ladnn"
    model = load_checkpoint(out)
    assert model.profile.name == "ladnn-small" and model.version.startswith("ladnn-small-")
    assert model.content_sha256 == meta["content_sha256"]

    from training.evaluate import evaluate, report_lines

    report = evaluate(out, tiny, "test", "cpu")   # its types scored on the test slices
    assert set(report["lesion_type_auc"]) == set(LESION_TYPES)
    assert report["lesion_type_auc"]["ground_glass_opacity"] is not None
    lines = report_lines(report)
    assert any(line.startswith("lesion-type AUC (slices): ground glass opacity ")
               for line in lines)
    # the text says what --json says: the slice-level AUCs and the seconds per study
    covid = report["slice_auc"]["COVID-19"]
    assert any(line.startswith(f"slice-level AUC ({report['slices']} slices; ") and
               f"COVID-19 {'-' if np.isnan(covid) else f'{covid:.3f}'}" in line
               for line in lines)
    assert f"seconds per 300-slice study: {report['seconds_per_300_slices']:.1f} (timed on " \
           f"{report['timed_on']})" in lines

    series = load_series(study_factory("covid", 2, 24).directory)
    result = Engine(model, device="cpu").analyze(series)
    assert result.model.profile == "ladnn-small" and len(result.slices) == 24
    surest = max(result.slices, key=lambda s: s.lesion_probability).index
    grid = result.maps.on_grid(surest)          # the surest slice has a map, not zeros
    assert grid.shape == series.hu.shape[1:] and 0 < grid.max() <= 1 and grid.min() >= 0

    # the patient network learns from its features, and the whole model's SR names it
    from conftest import dciodvfy_errors, require_tool
    from inference.export import write_results
    from training.train_patient import PatientTrainConfig, train_patient

    both = tmp_path / "ladnn-both.safetensors"
    train_patient(PatientTrainConfig(data=str(tiny), slice_model=str(out), out=str(both),
                                     epochs=2, batch_size=4, device="cpu"))
    whole = load_checkpoint(both)
    assert whole.profile.name == "ladnn-small"
    assert whole.metadata["provenance"]["patient"]["epochs"] == 2
    assert not torch.equal(next(iter(whole.patient_net.state_dict().values())),
                           next(iter(model.patient_net.state_dict().values())))
    files = write_results(Engine(whole, device="cpu").analyze(series), series,
                          tmp_path / "results")
    assert dciodvfy_errors(files.sr) == []
    shown = subprocess.run([require_tool("dsrdump"), str(files.sr)], capture_output=True,
                           text=True, timeout=60).stdout
    assert '"lungsys LA-DNN"' in shown and "ladnn-small" in shown


def test_model_init_ladnn_from_torchvision_densenet169_weights(tmp_path):
    from inference.densenet import DenseNet169

    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) if v.dtype.is_floating_point else v
             for k, v in DenseNet169().state_dict().items()}
    torch.save(state, tmp_path / "densenet169-imagenet.pth")
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "model", "init", "--arch", "ladnn", "--profile", "paper",
                           "--backbone-weights", str(tmp_path / "densenet169-imagenet.pth"),
                           "--out", str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "profile ladnn-paper" in proc.stdout
    model = load_checkpoint(tmp_path / "m.safetensors")
    own = model.slice_net.backbone.state_dict()
    assert torch.equal(own["features.denseblock3.denselayer7.conv1.weight"],
                       state["features.denseblock3.denselayer7.conv1.weight"])
    bad = subprocess.run([str(exe), "model", "init", "--arch", "hu1999", "--out",
                          str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown architecture 'hu1999'" in bad.stderr
    # a profile by its whole name, as `model info` prints it, is the same profile; one of
    # another architecture is refused with the sizes this one has
    whole = subprocess.run([str(exe), "model", "init", "--arch", "ladnn", "--profile",
                            "ladnn-small", "--out", str(tmp_path / "s.safetensors")],
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0 and "profile ladnn-small" in whole.stdout, whole.stderr
    other = subprocess.run([str(exe), "model", "init", "--arch", "ladnn", "--profile",
                            "hu2020-small", "--out", str(tmp_path / "h.safetensors")],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "ladnn has no profile 'hu2020-small'; expected one " \
        "of paper, small, vgg16-paper, vgg16-small" in other.stderr


def test_ladnn_on_vgg16_starts_from_torchvision_vgg16_weights(tmp_path):
    """The paper's other backbone: ``--arch ladnn --profile vgg16-small`` builds LA-DNN on
    VGG-16 (torchvision's names), whose backbone loads a VGG-16 state dict strictly."""
    from inference.checkpoint import load_backbone_weights
    from inference.profiles import profile_for
    from inference.vgg import VGG16

    profile = profile_for("ladnn", "vgg16-small")
    assert profile.backbone == "vgg16" and profile.name == "ladnn-vgg16-small"
    model = LungSysModel.create(profile, seed=0).eval()
    torch.manual_seed(1)
    state = {k: torch.randn(v.shape) for k, v in VGG16(width=8).state_dict().items()}
    torch.save(state, tmp_path / "vgg16.pth")
    load_backbone_weights(model, tmp_path / "vgg16.pth")
    assert torch.equal(model.slice_net.backbone.state_dict()["features.28.weight"],
                       state["features.28.weight"])
    with torch.no_grad():
        out = model.slice_net(torch.rand(2, 3, 128, 128))
    assert out.lesion_type_logits.shape == (2, 5)
    assert out.feature.shape == (2, profile.slice_feature_dim)
    del state["features.0.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="features.0.bias"):
        load_backbone_weights(model, tmp_path / "broken.pth")


def test_analyze_prints_each_lesion_slices_types(study_factory, tmp_path):
    """`lungsys analyze` names the architecture and, on each lesion slice's line, the lesion
    types the model finds there (here a checkpoint whose type head says ground glass and
    crazy paving on every slice)."""
    from inference.checkpoint import save_checkpoint

    model = LungSysModel.create("ladnn-small", seed=0)
    with torch.no_grad():
        model.slice_net.type_fc.weight.zero_()
        model.slice_net.type_fc.bias.copy_(torch.tensor([8.0, -8.0, 8.0, -8.0, -8.0]))
    save_checkpoint(model, tmp_path / "typed.safetensors")
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "analyze", str(study_factory("covid", 1, 8).directory),
                           "--model", str(tmp_path / "typed.safetensors"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "(LA-DNN), cpu)" in lines[0]
    slices = [line for line in lines if line.startswith("  image ")]
    assert len(slices) == 8
    assert all(line.endswith(" (ground glass opacity, crazy paving)") for line in slices)
