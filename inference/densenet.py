"""DenseNet-169, written to match torchvision's ``densenet169`` parameter for parameter.

LA-DNN's second backbone. Module names and shapes are torchvision's:
``features.conv0``/``norm0``, ``features.denseblockB.denselayerL.{norm1, conv1,
norm2, conv2}`` (bottleneck 1x1 to 4 x growth, then 3x3 to growth),
``features.transitionB.{norm, conv}`` (halving), ``features.norm5`` and
``classifier``; blocks of 6, 12, 32 and 32 layers, growth 32, 64 initial
features. ImageNet weight files written before torchvision 0.3 name the
layers ``norm.1``, ``conv.2`` ...: :func:`modern_keys` renames them as
torchvision's own loader does, so either loads strictly
(:func:`inference.backbone.load_strict`).

``growth`` scales the network (32 is torchvision's; the initial features are
twice the growth); the small CPU profiles use a narrower one of the same layout.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKS = (6, 12, 32, 32)
BOTTLENECK = 4
#: A key of the old layout: ``...denselayer1.norm.1.weight`` for ``...denselayer1.norm1.weight``.
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
                      r"running_mean|running_var))$")


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to ``4 x growth``, BN-ReLU-3x3 conv to ``growth`` new features."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, BOTTLENECK * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(BOTTLENECK * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(BOTTLENECK * growth, growth, kernel_size=3, padding=1,
                               bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    """Layers each fed every feature map before it in the block, concatenated."""

    def __init__(self, layers: int, channels: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self[f"denselayer{i + 1}"] = DenseLayer(channels + i * growth, growth)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, then a 2x2 average pool."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(channels, out, kernel_size=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet169(nn.Module):
    """DenseNet-169 with torchvision's names; ``out_channels`` features at 1/32."""

    def __init__(self, growth: int = 32, num_classes: int = 1000) -> None:
        super().__init__()
        self.growth = growth
        channels = 2 * growth
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, channels, kernel_size=7, stride=2,
                                                    padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(channels))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        for i, layers in enumerate(BLOCKS):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(layers, channels, growth))
            channels += layers * growth
            if i != len(BLOCKS) - 1:
                self.features.add_module(f"transition{i + 1}",
                                         Transition(channels, channels // 2))
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def feature_map(self, x: Tensor) -> Tensor:
        """The last feature map (after norm5 and ReLU), at 1/32 of the input size."""
        return F.relu(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(self.feature_map(x), (1, 1))
        return self.classifier(torch.flatten(pooled, 1))


def modern_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with old-layout DenseNet keys (``norm.1``) renamed (``norm1``)."""
    out = {}
    for key, value in state.items():
        match = _OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_torchvision_densenet169(model: DenseNet169, state: dict[str, Tensor],
                                 skip_classifier: bool = True) -> None:
    """Load a torchvision densenet169 state dict (ImageNet; old or new key names) into
    ``model``, strictly; the ImageNet classifier is checked, not loaded, when
    ``skip_classifier``."""
    from inference.backbone import load_strict

    with torch.device("meta"):                  # the shapes only, no memory
        reference = DenseNet169(growth=model.growth).state_dict()
    load_strict(model, reference, modern_keys(state), f"densenet169 (growth {model.growth})",
                ("classifier.",) if skip_classifier else ())
