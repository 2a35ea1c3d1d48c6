"""The dual-sampling attention network (Ouyang et al. 2020), read top to bottom.

A patient-level model over the whole lung volume, not over slices: two 3D
ResNet-34s with the paper's online attention, one trained with uniform
sampling (US), one with infection-size-balanced sampling (SS), ensembled by
the infected share of the lung. What the paper says and what lungsys chose
where it is silent is in docs/models.md, section 3; in short:

- input (§IV-B): the CT cropped to the box of the lungs over all slices (one
  box: per-slice boxes would break the volume), resampled to a fixed
  ``depth x input_size x input_size`` (the paper: 138 x 256 x 256 after
  resampling to fixed spacing and padding), windowed [-1350, 150] HU to
  [0, 1]. The paper masks out what is not lung (VB-Net's segmentation); the
  air-threshold lung mask of the preprocessing leaves consolidation outside,
  so lungsys does not mask;
- network (§III-A): ResNet-34 in 3D, the last stage at stride 1, features at
  1/16 (1/8 below a 256 input, so that the small profile's 64-pixel volumes
  keep 8 x 8 maps), global average pooling, one linear layer; four classes
  (the paper's two extended: softmax cross-entropy instead of BCE);
- online attention (§III-B, Eq. 1-2): the linear layer's row of a class as
  a 1 x 1 x 1 convolution over the features, ReLU, upsampled to the input,
  divided by its maximum, ``T(A) = sigmoid(100 (A - 0.4))``; the row is
  copied, never trained through the attention;
- attention loss (§III-D, Eq. 3-4): ``sum (T(A) - M)^2 / (sum T(A) + sum M)``
  against the infection mask M, weight 0.5, on every diseased study with a
  mask (the paper's COVID-19 cases of its binary task), each with its class's
  row (training.train_volume);
- ensemble (§III-E, Eq. 5): ``P = w P_US + (1 - w) P_SS``, w = 0.35 where
  the infected ratio is below 0.001 or above 0.030, else 0.96; the ratio is
  the US attention above 0.5 over the lungs (holes filled, the attention
  counted as lung, as the engine's infected fraction), where the paper used
  VB-Net's segmentation.

For the engine it yields what a slice model yields, derived from the volume:
each slice's lesion map is the ensembled attention on its depth; its lesion
probability is the diseased probability times the map's maximum on it; its
class probabilities are the patient's (a volume model has no per-slice
class). The attention needs the infection masks of the training set (the
phantom's ``masks.npz``), as the paper's needed VB-Net's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from inference.preprocess import MARGIN_PX, lung_masks

WINDOW_HU = (-1350.0, 150.0)
ALPHA, BETA = 100.0, 0.4
#: The ensemble (Eq. 5): below LOW or above HIGH infected ratio the SS model weighs more.
RATIO_LOW, RATIO_HIGH = 0.001, 0.030
W_US_OUTSIDE, W_US_INSIDE = 0.35, 0.96
BLOCKS = (3, 4, 6, 3)           # ResNet-34
SLAB = 64                       # slices resampled in-plane at a time
MASK_CUT = 0.25                 # a resampled infection mask's voxel is lesion from here
STRIDES = (1, 2, 2, 1)          # the last stage at stride 1 (§III-A)


def volume_shape(profile) -> tuple[int, int, int]:
    return profile.depth, profile.input_size, profile.input_size


# ------------------------------------------------------------------ the volume

@dataclass
class PreparedVolume:
    """A series as the network reads it, and what puts its maps back on the slices."""

    volume: np.ndarray          # (D, H, W) float32 in [0, 1]
    lung: np.ndarray            # (D, H, W) bool, the lung mask (holes filled) resampled
    box: tuple[int, int, int, int]   # rows/cols of the crop on the source grid
    z: tuple[int, int]          # the source slices the volume covers, end-exclusive
    source_lung: np.ndarray     # (n, rows, cols) bool, the source slices' lung masks

    def depth_of(self, n: int) -> np.ndarray:
        """(n,) the volume depth of each source slice; -1 outside the covered slices."""
        z0, z1 = self.z
        depth = self.volume.shape[0]
        index = np.full(n, -1)
        index[z0:z1] = np.minimum(((np.arange(z1 - z0) + 0.5) * depth / (z1 - z0)).astype(int),
                                  depth - 1)
        return index


def prepare_volume(hu: np.ndarray, shape: tuple[int, int, int]) -> PreparedVolume:
    """Crop a series (n, rows, cols) to its lungs' box, resample, window."""
    lung = lung_masks(hu)
    n, rows, cols = lung.shape
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    if zs.size:
        rs, cs = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
        box = (max(int(rs[0]) - MARGIN_PX, 0), max(int(cs[0]) - MARGIN_PX, 0),
               min(int(rs[-1]) + 1 + MARGIN_PX, rows), min(int(cs[-1]) + 1 + MARGIN_PX, cols))
        z = (int(zs[0]), int(zs[-1]) + 1)
    else:                        # no lung found: the whole series
        box, z = (0, 0, rows, cols), (0, n)
    (r0, c0, r1, c1), (z0, z1) = box, z
    low, high = WINDOW_HU
    volume = _resample(hu[z0:z1, r0:r1, c0:c1], shape)
    filled = np.stack([ndimage.binary_fill_holes(m) for m in lung[z0:z1, r0:r1, c0:c1]]) \
        if z1 > z0 else lung[:0, r0:r1, c0:c1]
    resampled = _resample(filled, shape) >= 0.5
    volume = np.clip((volume - low) / (high - low), 0, 1)
    return PreparedVolume(volume, resampled, box, z, lung)


def _resample(block: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample a (n, h, w) block to ``shape`` as float32: in-plane bilinear with
    antialiasing (as the slice models' crops), a slab of slices at a time, then along the
    slices by area averaging when there are fewer (no aliasing), linearly when more. The
    float copy is of the in-plane result, not of the source block."""
    depth, rows, cols = shape
    planes = np.empty((len(block), rows, cols), dtype=np.float32)
    with torch.no_grad():
        for a in range(0, len(block), SLAB):
            slab = torch.from_numpy(np.ascontiguousarray(block[a:a + SLAB], dtype=np.float32))
            planes[a:a + SLAB] = F.interpolate(slab[:, None], size=(rows, cols),
                                               mode="bilinear", align_corners=False,
                                               antialias=True)[:, 0]
        flat = torch.from_numpy(planes).reshape(len(block), -1).T[:, None]   # (hw, 1, n)
        along = F.interpolate(flat, size=depth, mode="area") if len(block) > depth else \
            F.interpolate(flat, size=depth, mode="linear", align_corners=False)
    return along[:, 0].T.reshape(depth, rows, cols).contiguous().numpy()


def resample_mask(mask: np.ndarray, prepared: PreparedVolume) -> np.ndarray:
    """A (n, rows, cols) mask of the source (the infection truth) on the volume's grid."""
    (r0, c0, r1, c1), (z0, z1) = prepared.box, prepared.z
    # a lower cut than 0.5: a lesion of a few voxels' width still leaves a mark
    return _resample(mask[z0:z1, r0:r1, c0:c1], prepared.volume.shape) >= MASK_CUT


# ------------------------------------------------------------------ the network

class BasicBlock3d(nn.Module):
    """ResNet-34's two-convolution block in 3D (torchvision's BasicBlock, Conv3d)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm3d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionResNet34(nn.Module):
    """One branch (US or SS): 3D ResNet-34, GAP, linear; its online attention maps."""

    def __init__(self, width: int, max_pool: bool, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.maxpool = nn.MaxPool3d(3, 2, 1) if max_pool else nn.Identity()
        layers, inplanes = [], width
        for i, (blocks, stride) in enumerate(zip(BLOCKS, STRIDES)):
            planes = width * 2 ** i
            stage = [BasicBlock3d(inplanes, planes, stride)]
            stage += [BasicBlock3d(planes, planes) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 1, D, H, W) -> class logits (B, classes) and features f before the GAP."""
        f = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        f = self.layer4(self.layer3(self.layer2(self.layer1(f))))
        return self.fc(f.mean(dim=(2, 3, 4))), f

    def attention(self, f: Tensor, classes: Tensor) -> Tensor:
        """Eq. 1: A = ReLU(conv1x1x1(f, w_c)) for each volume's class c, (B, d, h, w); the
        linear layer's row is copied (detached): the attention loss never trains it."""
        w = self.fc.weight.detach()[classes]                  # (B, C)
        return F.relu(torch.einsum("bcdhw,bc->bdhw", f, w))


def soft_mask(a: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Eq. 2: A upsampled to the input, divided by its maximum, through the steep sigmoid."""
    a = F.interpolate(a[:, None].float(), size=shape, mode="trilinear", align_corners=False)[:, 0]
    peak = a.flatten(1).amax(dim=1).clamp_min(1e-6)
    return torch.sigmoid(ALPHA * (a / peak[:, None, None, None] - BETA))


def attention_loss(t: Tensor, m: Tensor) -> Tensor:
    """Eq. 3 per volume, averaged: sum (T - M)^2 / (sum T + sum M)."""
    num = ((t - m) ** 2).flatten(1).sum(1)
    return (num / (t.flatten(1).sum(1) + m.flatten(1).sum(1)).clamp_min(1.0)).mean()


@dataclass
class VolumeOutput:
    """The ensembled outputs for a batch of volumes."""

    probabilities: Tensor     # (B, 4), Eq. 5
    attention: Tensor         # (B, D, H, W) in [0, 1], the ensembled T(A)
    us_weight: Tensor         # (B,) w of Eq. 5
    ratio: Tensor             # (B,) the infected ratio that chose w


class DualSamplingNet(nn.Module):
    """Both branches and the ensemble layer (the checkpoint's ``volume.*``)."""

    def __init__(self, profile) -> None:
        super().__init__()
        self.profile = profile
        pool = profile.input_size >= 256
        self.us = AttentionResNet34(profile.width, pool)
        self.ss = AttentionResNet34(profile.width, pool)

    def forward(self, x: Tensor, lung: Tensor | None = None) -> VolumeOutput:
        """``x`` (B, 1, D, H, W); ``lung`` (B, D, H, W) bool for the infected ratio (the whole
        volume when None)."""
        shape = tuple(x.shape[2:])
        (lu, fu), (ls, fs) = self.us(x), self.ss(x)
        pu, ps = torch.softmax(lu.float(), 1), torch.softmax(ls.float(), 1)
        disease = 1 + ((pu + ps)[:, 1:]).argmax(1)      # the maps show the likeliest disease
        tu = soft_mask(self.us.attention(fu, disease), shape)
        ts = soft_mask(self.ss.attention(fs, disease), shape)
        hot = tu > 0.5
        room = torch.ones_like(hot) if lung is None else (lung.bool() | hot)
        ratio = (hot & room).flatten(1).sum(1) / room.flatten(1).sum(1).clamp_min(1)
        inside = (ratio >= RATIO_LOW) & (ratio <= RATIO_HIGH)
        w = torch.where(inside, W_US_INSIDE, W_US_OUTSIDE).to(pu)
        return VolumeOutput(w[:, None] * pu + (1 - w[:, None]) * ps,
                            w[:, None, None, None] * tu + (1 - w[:, None, None, None]) * ts,
                            w, ratio.float())


# ------------------------------------------------------------------ for the engine

@dataclass
class VolumeAnalysis:
    """A volume model's outputs in the engine's terms (one row per source slice)."""

    probabilities: np.ndarray   # (4,) the patient's
    lesion: np.ndarray          # (n, 2) no lesion / lesion
    classes: np.ndarray         # (n, 4) the patient's, on every slice
    maps: np.ndarray            # (n, H, W) the attention on each slice's depth (0 outside)
    boxes: np.ndarray           # (n, 4) the one crop box, for every slice
    lung: np.ndarray            # (n, rows, cols) the source slices' lung masks


@torch.no_grad()
def analyse_volume(net: DualSamplingNet, hu: np.ndarray, device: torch.device) -> VolumeAnalysis:
    """Run the network on one series and spread its outputs over the source slices."""
    prepared = prepare_volume(hu, volume_shape(net.profile))
    x = torch.from_numpy(prepared.volume)[None, None].to(device)
    out = net(x, torch.from_numpy(prepared.lung)[None].to(device))
    probs = out.probabilities[0].cpu().numpy().astype(np.float64)
    attention = out.attention[0].float().cpu().numpy()
    n = len(hu)
    depth = prepared.depth_of(n)
    maps = np.zeros((n, *attention.shape[1:]), dtype=np.float32)
    maps[depth >= 0] = attention[depth[depth >= 0]]
    lesion_p = (1.0 - probs[0]) * maps.reshape(n, -1).max(axis=1)
    return VolumeAnalysis(probs, np.stack([1 - lesion_p, lesion_p], axis=1),
                          np.repeat(probs[None], n, axis=0), maps,
                          np.repeat(np.asarray(prepared.box)[None], n, axis=0),
                          prepared.source_lung)
