"""Test doubles with known outputs, for checking geometry and result objects."""

from __future__ import annotations

import torch
from torch import nn

from inference.checkpoint import LungSysModel
from inference.slice_net import SliceOutput


class HotSpot(nn.Module):
    """A slice network whose lesion maps are hot on the same part of every
    slice (rows 2/16-6/16, columns 10/16-14/16 of the crop), called
    lesion-bearing with the given class probabilities."""

    def __init__(self, profile, class_logits=(0.0, 3.0, 0.0, 0.0)):
        super().__init__()
        self.profile = profile
        self.class_logits = torch.tensor(class_logits)

    @staticmethod
    def hot(b: int, size: int) -> torch.Tensor:
        m = torch.zeros(b, size, size)
        m[:, 2 * size // 16:6 * size // 16, 10 * size // 16:14 * size // 16] = 1.0
        return m

    def forward(self, x):
        b = x.shape[0]
        return SliceOutput(lesion_logits=torch.tensor([[-5.0, 5.0]]).repeat(b, 1),
                           class_logits=self.class_logits.repeat(b, 1),
                           lesion_map=self.hot(b, x.shape[-1] // 16),
                           feature=torch.zeros(b, self.profile.slice_feature_dim))

    def lesion_evidence(self, x):
        return self(x), self.hot(x.shape[0], x.shape[-1] // 4)


def hotspot_model(seed: int = 2) -> LungSysModel:
    model = LungSysModel.create("small", seed=seed)
    model.slice_net = HotSpot(model.profile)
    return model


class TypedHotSpot(HotSpot):
    """The hot spot of :class:`HotSpot`, with a lesion-typing head's outputs (LA-DNN's):
    ground-glass opacity, crazy paving and septal thickening sure, the other two not."""

    TYPES = torch.tensor([5.0, -5.0, 5.0, -5.0, 5.0])

    def forward(self, x):
        out = super().forward(x)
        out.lesion_type_logits = self.TYPES.repeat(x.shape[0], 1)
        return out


def typed_hotspot_model(seed: int = 2) -> LungSysModel:
    model = LungSysModel.create("small", seed=seed)
    model.slice_net = TypedHotSpot(model.profile)
    return model
