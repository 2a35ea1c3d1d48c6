"""Test doubles with known outputs, for checking geometry and result objects."""

from __future__ import annotations

import torch
from torch import nn

from inference.checkpoint import LungSysModel
from inference.slice_net import SliceOutput


class HotSpot(nn.Module):
    """A slice network whose lesion map is hot on map rows 2-5, columns 10-13 of
    every slice, called lesion-bearing with the given class probabilities."""

    def __init__(self, profile, class_logits=(0.0, 3.0, 0.0, 0.0)):
        super().__init__()
        self.profile = profile
        self.class_logits = torch.tensor(class_logits)

    def forward(self, x):
        b, size = x.shape[0], x.shape[-1] // 16
        lesion_map = torch.zeros(b, size, size)
        lesion_map[:, 2:6, 10:14] = 1.0
        return SliceOutput(lesion_logits=torch.tensor([[-5.0, 5.0]]).repeat(b, 1),
                           class_logits=self.class_logits.repeat(b, 1), lesion_map=lesion_map,
                           feature=torch.zeros(b, self.profile.slice_feature_dim))


def hotspot_model(seed: int = 2) -> LungSysModel:
    model = LungSysModel.create("small", seed=seed)
    model.slice_net = HotSpot(model.profile)
    return model
