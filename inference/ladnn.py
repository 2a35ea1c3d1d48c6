"""LA-DNN, the lesion-attention network (seeds/la-dnn.txt), as lungsys's slice network.

The paper: an ImageNet backbone (DenseNet-169 its best, VGG-16 beside it)
whose last features feed two heads, the diagnosis and an auxiliary
multi-label head for five CT lesion types (ground-glass opacity,
consolidation, crazy paving, air bronchogram, interlobular septal
thickening); both losses train the shared backbone, and that is the only way
the lesion task reaches the diagnosis (§2.2). lungsys reads it so
(docs/models.md has every choice and why):

- the diagnosis head has the four classes (the paper's is COVID-19 or not);
- task 1 (lesion or not, which every lungsys model gives per slice) is the
  chance that a slice shows at least one of the five types, as independent
  sigmoids (noisy-OR): no head of its own;
- the slice feature for the patient network is the pooled backbone features
  and the five type probabilities (a lungsys addition: the paper classifies
  images, and the patient network is M3's);
- the lesion map is the lesion score attributed to the end of the second
  dense block (gradient times activation at 1/8 of the input, as M3's at
  ResBlock1): the paper's §4.1 map, Grad-CAM++ on the last features (1/32),
  pointed at a lesion on 25% of the tuning set's lesion slices, this one on
  48% (docs/localisation.md); on VGG-16 (not measured) it stays the paper's.
  The attention map is a class activation map of the type head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.densenet import BLOCKS, DenseNet169
from inference.profiles import CLASSES, Profile
from inference.slice_net import SliceOutput
from inference.vgg import VGG16

#: The auxiliary task's labels, in the order of its head (the phantom's names).
LESION_TYPES = ("ground_glass_opacity", "consolidation", "crazy_paving", "air_bronchogram",
                "interlobular_septal_thickening")
_EPS = 1e-6   # (the lesion map's normalisation)
#: Where each backbone's lesion score is attributed (its ``features`` module's name);
#: a backbone not named keeps the paper's Grad-CAM++ on the last features.
EVIDENCE_STAGE = {"densenet169": "denseblock2"}


def backbone_channels(profile: Profile) -> int:
    """The channels of the backbone's last features at this profile's width."""
    if profile.backbone == "vgg16":
        return 8 * profile.width
    channels = 2 * profile.width                      # DenseNet: growth = width
    for i, layers in enumerate(BLOCKS):
        channels += layers * profile.width
        if i != len(BLOCKS) - 1:
            channels //= 2
    return channels


def lesion_log_odds(type_logits: Tensor) -> Tensor:
    """Task 1's two logits, ``[log P(no type), log P(some type)]`` under independent types
    (noisy-OR), in log space and fp32: the chance of "no type" can be far below what
    ``1 - p`` keeps (bf16 rounds it to zero at 0.998), and its gradient must not vanish
    on the surest slices."""
    none = F.logsigmoid(-type_logits.float()).sum(dim=1).clamp(max=-1e-7)
    return torch.stack([none, torch.log(-torch.expm1(none))], dim=1)


def feature_dim(profile: Profile) -> int:
    """D for the patient network: the pooled features and the type probabilities."""
    return backbone_channels(profile) + len(LESION_TYPES)


class LaDnnSliceNet(nn.Module):
    """The backbone (torchvision's names: ImageNet weights load into ``backbone``, its
    classifier left out), the diagnosis head and the lesion-type head."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile
        if profile.backbone == "densenet169":
            self.backbone: nn.Module = DenseNet169(growth=profile.width)
        elif profile.backbone == "vgg16":
            self.backbone = VGG16(width=profile.width)
        else:
            raise ValueError(f"LA-DNN has no backbone {profile.backbone!r}")
        self.backbone.classifier = nn.Identity()     # ImageNet's head: never used
        channels = backbone_channels(profile)
        self.class_fc = nn.Linear(channels, len(CLASSES))
        self.type_fc = nn.Linear(channels, len(LESION_TYPES))

    def features(self, x: Tensor) -> Tensor:
        """The backbone's last feature map (1/32 of the input)."""
        if isinstance(self.backbone, DenseNet169):
            return self.backbone.feature_map(x)
        return self.backbone.features(x)

    def forward(self, x: Tensor) -> SliceOutput:
        return self.heads(self.features(x))

    def heads(self, fmap: Tensor) -> SliceOutput:
        pooled = fmap.mean(dim=(2, 3))
        type_logits = self.type_fc(pooled)
        types = torch.sigmoid(type_logits)
        cam = F.relu(torch.einsum("bchw,kc->bkhw", fmap, self.type_fc.weight.to(fmap.dtype)))
        cam = (cam * types[:, :, None, None]).sum(1)
        cam = cam / cam.flatten(1).amax(1).clamp_min(_EPS)[:, None, None]
        return SliceOutput(lesion_logits=lesion_log_odds(type_logits),
                           class_logits=self.class_fc(pooled), lesion_map=cam,
                           feature=torch.cat([pooled, types], dim=1),
                           lesion_type_logits=type_logits)

    def lesion_evidence(self, x: Tensor) -> tuple[SliceOutput, Tensor]:
        """The forward pass, and the lesion score (the log-odds that the slice shows a
        lesion type) attributed to the backbone's :data:`EVIDENCE_STAGE`, or by Grad-CAM++
        to its last features. Gradients reach the features only, never the weights."""
        stage = EVIDENCE_STAGE.get(self.profile.backbone)
        if stage is None:
            return self._grad_cam_pp(x)
        modules = list(self.backbone.features.named_children())
        cut = [name for name, _ in modules].index(stage) + 1
        with torch.no_grad():
            a = x
            for _, module in modules[:cut]:
                a = module(a)
        with torch.enable_grad():
            a = a.detach().float().requires_grad_(True)      # (fp32 under bf16 autocast)
            h = a
            for _, module in modules[cut:]:
                h = module(h)
            fmap = F.relu(h)                                  # as DenseNet169.feature_map
            out = self.heads(fmap)
            score = out.lesion_logits[:, 1] - out.lesion_logits[:, 0]
            (g,) = torch.autograd.grad(score.sum(), a)
        evidence = F.relu((g.float() * a.detach()).sum(dim=1))
        with torch.no_grad():
            return self.heads(fmap.detach()), evidence

    def _grad_cam_pp(self, x: Tensor) -> tuple[SliceOutput, Tensor]:
        """Grad-CAM++ of the lesion score on the last features (the paper's §4.1 map)."""
        with torch.no_grad():
            fmap = self.features(x)
        with torch.enable_grad():
            a = fmap.detach().float().requires_grad_(True)     # (fp32 under bf16 autocast)
            out = self.heads(a)
            score = out.lesion_logits[:, 1] - out.lesion_logits[:, 0]
            (g,) = torch.autograd.grad(score.sum(), a)
        a, g = a.detach(), g.float()
        g2, g3 = g * g, g * g * g
        denominator = 2 * g2 + (a * g3).sum(dim=(2, 3), keepdim=True)
        alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * F.relu(g)).sum(dim=(2, 3))
        evidence = F.relu((weights[:, :, None, None] * a).sum(dim=1))
        with torch.no_grad():
            return self.heads(a), evidence
