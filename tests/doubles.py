"""Test doubles with known outputs, for checking geometry and result objects; a series
recorded in the job store as the receivers record one."""

from __future__ import annotations

import pydicom
import torch
from torch import nn

from inference.checkpoint import LungSysModel
from inference.slice_net import SliceOutput
from store.api import ReceivedInstance


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


def send_series(store, files, calling: str, tmp_path, **attributes) -> None:
    """Record a series as the receivers do, its files changed as a modality would."""
    folder = tmp_path / f"sent-{calling}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    series_uid = pydicom.uid.generate_uid()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, pydicom.uid.generate_uid()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path = folder / f.name
        ds.save_as(path)
        store.record_instance(ReceivedInstance(
            str(ds.SOPInstanceUID), str(ds.SOPClassUID), series_uid, str(ds.StudyInstanceUID),
            "CT", str(path), path.stat().st_size, str(ds.file_meta.TransferSyntaxUID),
            calling_aet=calling))
