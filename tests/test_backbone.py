"""The ResNet-50 backbone matches torchvision's, so ImageNet weights load strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.backbone import ResNet50, WeightsError, load_torchvision_weights, read_state_dict
from inference.checkpoint import load_checkpoint
from inference.profiles import PROFILES
from inference.slice_net import SliceNet

REFERENCE = Path(__file__).parent / "data" / "torchvision_resnet50_state_dict.txt"


def _reference() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in REFERENCE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, shape = line.partition(" ")
            rows.append((key, tuple(int(v) for v in shape.split(",")) if shape else ()))
    return rows


def test_state_dict_equals_torchvision_resnet50():
    ours = [(k, tuple(v.shape)) for k, v in ResNet50().state_dict().items()]
    assert ours == _reference()
    assert len(ours) == 320


def _torchvision_like_file(tmp_path: Path, seed: int = 0) -> tuple[Path, dict]:
    """A plain state dict file as torchvision writes one (values random)."""
    torch.manual_seed(seed)
    state = {k: (torch.randn(v.shape) if v.dtype.is_floating_point else v)
             for k, v in ResNet50().state_dict().items()}
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    return path, state


def test_imagenet_weights_load_into_the_slice_network(tmp_path):
    path, state = _torchvision_like_file(tmp_path)
    net = SliceNet(PROFILES["paper"])
    load_torchvision_weights(net.backbone, read_state_dict(path))
    own = net.backbone.state_dict()
    assert torch.equal(own["layer3.5.conv2.weight"], state["layer3.5.conv2.weight"])
    assert torch.equal(own["bn1.running_var"], state["bn1.running_var"])
    # layer4's first block takes 1028 channels: the pretrained 1024, then zeros
    widened = own["layer4.0.conv1.weight"]
    assert widened.shape == (512, 1028, 1, 1)
    assert torch.equal(widened[:, :1024], state["layer4.0.conv1.weight"])
    assert widened[:, 1024:].abs().sum() == 0
    assert own["fc.weight"].shape == (4, 2048)  # the 4-class head, not ImageNet's


def test_cli_model_init_with_backbone_weights(tmp_path):
    path, state = _torchvision_like_file(tmp_path, seed=1)
    ckpt = tmp_path / "paper.safetensors"
    exe = Path(sys.executable).with_name("lungsys")
    proc = subprocess.run([str(exe), "model", "init", "--profile", "paper", "--seed", "0",
                           "--backbone-weights", str(path), "--out", str(ckpt)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = load_checkpoint(ckpt)
    assert torch.equal(model.slice_net.backbone.layer2[1].conv1.weight,
                       state["layer2.1.conv1.weight"])
    assert model.metadata["provenance"]["backbone_weights"] == path.name


@pytest.mark.parametrize("damage, words", [
    (lambda s: s.pop("layer2.0.bn1.bias"), "missing"),
    (lambda s: s.__setitem__("head.extra", torch.zeros(1)), "unexpected"),
    (lambda s: s.__setitem__("conv1.weight", torch.zeros(32, 3, 7, 7)), "shape"),
])
def test_wrong_weights_are_refused(tmp_path, damage, words):
    _, state = _torchvision_like_file(tmp_path)
    damage(state)
    with pytest.raises(WeightsError) as err:
        load_torchvision_weights(SliceNet(PROFILES["paper"]).backbone, state)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_not_a_weights_file(tmp_path):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        read_state_dict(bad)
