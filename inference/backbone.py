"""ResNet-50, written to match torchvision's ``resnet50`` parameter for parameter.

PyPI's torchvision does not load with the CPU build of torch this project
pins, so the backbone lives here. Module and parameter names and shapes are
torchvision's (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``; Bottleneck
blocks with the stride on the 3x3 convolution, "ResNet v1.5"), so that a
user's ImageNet weights file (a plain state dict such as
``resnet50-0676ba61.pth``) loads strictly with :func:`load_torchvision_weights`.

``width`` scales every channel count (64 is torchvision's); the small
profile uses a narrower network of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

LAYERS = (3, 4, 6, 3)
EXPANSION = 4


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand; identity or projection skip."""

    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's names; ``layer4_extra_in`` widens the input
    of layer4's first block (the slice network feeds it 4 more channels)."""

    def __init__(self, width: int = 64, num_classes: int = 1000,
                 layer4_extra_in: int = 0) -> None:
        super().__init__()
        self.width = width
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, LAYERS[0])
        self.layer2 = self._make_layer(width * 2, LAYERS[1], stride=2)
        self.layer3 = self._make_layer(width * 4, LAYERS[2], stride=2)
        self.inplanes += layer4_extra_in
        self.layer4 = self._make_layer(width * 8, LAYERS[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * EXPANSION, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * EXPANSION, stride),
                                       nn.BatchNorm2d(planes * EXPANSION))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem_to_layer1(self, x: Tensor) -> Tensor:
        """The stem and ResBlock1: features at 1/4 of the input size."""
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    def stem_to_layer3(self, x: Tensor) -> Tensor:
        """ResBlock1-3 (with the stem): features at 1/16 of the input size."""
        return self.layer3(self.layer2(self.stem_to_layer1(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer4(self.stem_to_layer3(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: Parameters whose input side layer4_extra_in widens.
_WIDENED = ("layer4.0.conv1.weight", "layer4.0.downsample.0.weight")


class WeightsError(ValueError):
    """A backbone weights file that is not the torchvision state dict expected."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.pth`` (safe, tensors only) or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a readable weights file ({exc.__class__.__name__})") \
            from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def load_strict(model: nn.Module, reference: dict[str, Tensor], state: dict[str, Tensor],
                what: str, skip: tuple[str, ...] = (), widened: tuple[str, ...] = ()) -> None:
    """Load a torchvision state dict into ``model``, strictly: every key of ``reference``
    (the torchvision network's state dict at this width) with its shape, and no other
    (WeightsError naming ``what`` otherwise). Keys starting with a prefix of ``skip`` (the
    ImageNet classifier) are checked, not loaded; where a key of ``widened`` has more input
    channels in ``model``, the extra ones start at zero, so that the network first
    computes what the pretrained one did."""
    # files written before PyTorch 0.4.1 (torchvision's first ImageNet weights among them)
    # have no batch-norm counters: those start at zero, as PyTorch's own loader has them
    missing = sorted(k for k in set(reference) - set(state)
                     if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsError(f"not a torchvision {what} state dict: " + ", ".join(parts))
    for key, ref in reference.items():
        if key in state and tuple(state[key].shape) != tuple(ref.shape):
            raise WeightsError(f"{key} has shape {tuple(state[key].shape)}, expected "
                               f"{tuple(ref.shape)} for this {what}")
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.startswith(skip):
                continue
            target = own[key]
            if key in widened and target.shape[1] != value.shape[1]:
                target.zero_()
                target[:, : value.shape[1]] = value
            else:
                target.copy_(value)


def load_torchvision_weights(model: ResNet50, state: dict[str, Tensor],
                             skip_fc: bool = True) -> None:
    """Load a torchvision ResNet-50 state dict into ``model``, strictly (:func:`load_strict`):
    layer4's first block may be widened (``layer4_extra_in``); ``fc`` (ImageNet's 1000
    classes) is checked but not loaded when ``skip_fc``."""
    with torch.device("meta"):                  # the shapes only, no memory
        reference = ResNet50(width=model.width).state_dict()
    load_strict(model, reference, state,
                f"resnet50 (width {model.width})", ("fc.",) if skip_fc else (), _WIDENED)
