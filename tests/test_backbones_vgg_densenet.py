"""VGG-16 and DenseNet-169 (the backbones of Hu et al. 2020 and LA-DNN) match torchvision's,
so a user's ImageNet weight files load strictly by key name, old DenseNet keys included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from inference.backbone import WeightsError, read_state_dict
from inference.densenet import DenseNet169, load_torchvision_densenet169
from inference.vgg import VGG16, load_torchvision_vgg16

DATA = Path(__file__).parent / "data"


def _reference(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (DATA / f"torchvision_{name}_state_dict.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, shape = line.partition(" ")
            rows.append((key, tuple(int(v) for v in shape.split(",")) if shape else ()))
    return rows


def _shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_the_state_dicts_equal_torchvision_vgg16_and_densenet169():
    with torch.device("meta"):
        vgg, dense = VGG16(), DenseNet169()
    assert _shapes(vgg) == _reference("vgg16") and len(_reference("vgg16")) == 32
    assert _shapes(dense) == _reference("densenet169")
    assert sum(p.numel() for p in vgg.parameters()) == 138_357_544
    assert len(list(dense.parameters())) == 508
    assert sum(p.numel() for p in dense.parameters()) == 14_149_480


def _file(tmp_path: Path, model: torch.nn.Module, name: str, rename=None) -> dict:
    """A plain state dict file as torchvision writes one (random values); ``rename``
    changes the keys written (as older torchvision releases named them)."""
    torch.manual_seed(0)
    state = {k: (torch.randn(v.shape) if v.dtype.is_floating_point else v)
             for k, v in model.state_dict().items()}
    written = {rename(k) if rename else k: v for k, v in state.items()
               if not (rename and k.endswith("num_batches_tracked"))}  # (not in old files)
    torch.save(written, tmp_path / name)
    return state


def test_imagenet_vgg16_weights_load_strictly(tmp_path):
    state = _file(tmp_path, VGG16(), "vgg16-397923af.pth")
    model = VGG16(num_classes=4)
    load_torchvision_vgg16(model, read_state_dict(tmp_path / "vgg16-397923af.pth"))
    own = model.state_dict()
    assert torch.equal(own["features.28.weight"], state["features.28.weight"])
    assert own["classifier.6.weight"].shape == (4, 4096)      # our head, not ImageNet's
    state.pop("features.0.bias")
    with pytest.raises(WeightsError, match="not a torchvision vgg16 .* 1 missing"):
        load_torchvision_vgg16(model, state)


def test_imagenet_densenet169_weights_load_strictly_old_keys_too(tmp_path):
    def old(key: str) -> str:       # ...denselayer1.norm1.weight -> ...denselayer1.norm.1.weight
        return re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)

    state = _file(tmp_path, DenseNet169(), "densenet169-b2777c0a.pth", rename=old)
    written = read_state_dict(tmp_path / "densenet169-b2777c0a.pth")
    assert "features.denseblock4.denselayer32.conv.2.weight" in written
    model = DenseNet169(num_classes=4)
    load_torchvision_densenet169(model, written)
    own = model.state_dict()
    for key in ("features.denseblock4.denselayer32.conv2.weight",
                "features.transition3.conv.weight", "features.norm5.running_var"):
        assert torch.equal(own[key], state[key]), key
    assert own["classifier.weight"].shape == (4, 1664)
    written["features.conv0.weight"] = torch.zeros(32, 3, 7, 7)
    with pytest.raises(WeightsError, match="features.conv0.weight has shape"):
        load_torchvision_densenet169(model, written)


def test_narrow_networks_of_the_same_layout_run_on_slices():
    """The small CPU profiles' widths: the same keys, fewer channels; 1/32 feature maps."""
    vgg, dense = VGG16(width=8, num_classes=4, hidden=64), DenseNet169(growth=8, num_classes=4)
    x = torch.rand(2, 3, 64, 64)
    assert vgg(x).shape == dense(x).shape == (2, 4)
    assert [s.shape[-1] for s in vgg.stages(x)] == [64, 32, 16, 8, 4]
    assert dense.feature_map(x).shape == (2, dense.out_channels, 2, 2)
    assert [k for k, _ in _shapes(vgg)] == [k for k, _ in _reference("vgg16")]
