"""VGG-16 (configuration D, no batch norm), written to match torchvision's ``vgg16``.

The weakly supervised network of Hu et al. 2020 and LA-DNN start from an
ImageNet VGG-16. PyPI's torchvision does not load with the torch this project
pins, so the network lives here with torchvision's module names and shapes:
``features.N`` (13 3x3 convolutions, ReLUs and 5 max-pools in one Sequential,
numbered as torchvision numbers them), ``avgpool`` (7x7) and ``classifier.0``,
``.3``, ``.6`` (4096, 4096, 1000), so that a user's ImageNet weights file
(``vgg16-397923af.pth``) loads strictly (:func:`inference.backbone.load_strict`).

``width`` scales every convolution's channels (64 is torchvision's); the small
CPU profiles use a narrower network of the same layout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Configuration D: output channels (as multiples of 64) of each 3x3 convolution, "M" a
#: 2x2 max-pool.
CONFIG = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG16(nn.Module):
    """VGG-16 with torchvision's names; :meth:`stages` gives the feature maps after each
    of the five pools' convolutions (the levels multi-scale CAMs are taken from)."""

    def __init__(self, width: int = 64, num_classes: int = 1000, hidden: int = 4096) -> None:
        super().__init__()
        self.width = width
        layers: list[nn.Module] = []
        channels = 3
        for item in CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out = int(item) * width
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1),
                           nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes))
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def stages(self, x: Tensor) -> list[Tensor]:
        """The feature maps at the end of each block, before its pool (1, 1/2, ... 1/16
        of the input size)."""
        out = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                out.append(x)
            x = layer(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def load_torchvision_vgg16(model: VGG16, state: dict[str, Tensor],
                           skip_classifier: bool = True) -> None:
    """Load a torchvision vgg16 state dict (ImageNet) into ``model``, strictly; the
    ImageNet classifier is checked, not loaded, when ``skip_classifier``."""
    from inference.backbone import load_strict

    with torch.device("meta"):                  # the shapes only, no memory
        reference = VGG16(width=model.width).state_dict()
    load_strict(model, reference, state, f"vgg16 (width {model.width})",
                ("classifier.",) if skip_classifier else ())
