"""The weakly supervised multi-scale network of Hu et al. 2020, as lungsys's slice network.

The paper (seeds/weakly-supervised-hu2020.txt): a VGG-style network of five
blocks (2, 2, 3, 3, 3 convolutions of 3x3 with batch norm and ReLU, 32, 64,
128, 256, 256 channels, each block ending in a max-pool); at the end of
blocks 3, 4 and 5 a 1x1 convolution gives a score map per class (a class
activation map), global max pooling turns each into class scores, and the
three scores are summed into the prediction (multi-scale learning). Lesions
are located by integrated gradients (zero baseline, m steps) of each level's
score, the three maps multiplied pixel by pixel. lungsys reads it so
(docs/models.md has every choice and why):

- four classes (the paper's three, H1N1 added); the summed scores are the
  four-class head;
- task 1 (lesion or not) is not a head of its own: a slice shows a lesion as
  much as it is not Healthy, ``[s_healthy, logsumexp(s_diseases)]``;
- the slice feature for the patient network is GAP of blocks 4 and 5 (the
  paper classifies slices; M3's patient network decides for the patient);
- the lesion map is the most likely disease's activation map at block 3, the
  evidence the product of the three levels' integrated gradients of that
  disease's score, each smoothed first (the paper blurs after the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.profiles import CLASSES, Profile
from inference.slice_net import SliceOutput

#: Convolutions per block, and each block's channels as multiples of ``width / 2``
#: (the paper: 32, 64, 128, 256, 256 at width 64).
CONVS = (2, 2, 3, 3, 3)
CHANNELS = (1, 2, 4, 8, 8)
#: The blocks whose ends carry a class activation map (blocks 3, 4, 5).
CAM_BLOCKS = (2, 3, 4)
#: Integrated-gradient steps (the paper's m = 25; the small profile takes 4, for a CPU).
IG_STEPS = {"paper": 25, "small": 4}


def channels(profile: Profile) -> tuple[int, ...]:
    return tuple(c * profile.width // 2 for c in CHANNELS)


def feature_dim(profile: Profile) -> int:
    """D for the patient network: GAP of blocks 4 and 5."""
    widths = channels(profile)
    return widths[3] + widths[4]


def lesion_of(scores: Tensor) -> Tensor:
    """Task 1's logits from class scores (B, 4): [Healthy's, the diseases' log-sum-exp], so
    that P(lesion) = 1 - P(Healthy)."""
    return torch.stack([scores[:, 0], torch.logsumexp(scores[:, 1:], dim=1)], dim=1)


class HuSliceNet(nn.Module):
    """Five convolution blocks and three class activation heads (see the module)."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile
        blocks, cams, before = [], [], 3
        for i, (convs, width) in enumerate(zip(CONVS, channels(profile))):
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(before, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                before = width
            blocks.append(nn.Sequential(*layers))
            if i in CAM_BLOCKS:
                cams.append(nn.Conv2d(width, len(CLASSES), kernel_size=1))
        self.blocks = nn.ModuleList(blocks)
        self.cams = nn.ModuleList(cams)
        self.pool = nn.MaxPool2d(2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def levels(self, x: Tensor) -> list[Tensor]:
        """The five blocks' outputs, before their pools."""
        out = []
        for block in self.blocks:
            x = block(x)
            out.append(x)
            x = self.pool(x)
        return out

    def scores(self, levels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Each CAM level's class activation maps and its max-pooled class scores."""
        maps = [cam(levels[b]) for cam, b in zip(self.cams, CAM_BLOCKS)]
        return maps, [m.amax(dim=(2, 3)) for m in maps]

    def forward(self, x: Tensor) -> SliceOutput:
        levels = self.levels(x)
        maps, scores = self.scores(levels)
        logits = torch.stack(scores).sum(0)                      # multi-scale: summed
        lesion_logits = lesion_of(logits)
        disease = logits[:, 1:].argmax(dim=1) + 1
        cam = F.relu(maps[0][torch.arange(x.shape[0], device=x.device), disease])
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-6)[:, None, None]
        feature = torch.cat([levels[3].mean(dim=(2, 3)), levels[4].mean(dim=(2, 3))], dim=1)
        return SliceOutput(lesion_logits=lesion_logits, class_logits=logits, lesion_map=cam,
                           feature=feature, level_logits=tuple(scores))

    def lesion_evidence(self, x: Tensor) -> tuple[SliceOutput, Tensor]:
        """The forward pass, and the product of the three levels' integrated gradients (zero
        baseline, :data:`IG_STEPS` steps) of the most likely disease's score, at the input's
        size. Gradients reach the input only, never the weights."""
        with torch.no_grad():
            out = self(x)
        disease = out.class_logits[:, 1:].argmax(dim=1) + 1
        rows = torch.arange(x.shape[0], device=x.device)
        steps = IG_STEPS.get(self.profile.name.rsplit("-", 1)[-1], 8)
        totals = [torch.zeros_like(x) for _ in CAM_BLOCKS]
        with torch.enable_grad():
            for k in range(1, steps + 1):
                scaled = (x * (k / steps)).detach().requires_grad_(True)
                _, scores = self.scores(self.levels(scaled))
                for level, score in enumerate(scores):
                    (grad,) = torch.autograd.grad(score[rows, disease].sum(), scaled,
                                                  retain_graph=level < len(scores) - 1)
                    totals[level] += grad
        # IG = input x mean gradient, per level; each level's map smoothed over a sixteenth of
        # the slice (a max-pooled score's gradient runs through one position's receptive
        # field, so the raw maps of the three levels rarely meet) and scaled to its maximum,
        # then multiplied: where all three levels find the disease
        # (where they never meet on a slice, their mean stands in: a map is never empty
        # while a level found something)
        size = max(3, x.shape[-1] // 16) | 1
        levels = []
        for total in totals:
            level = (x * total / steps).sum(dim=1, keepdim=True).abs()
            level = F.avg_pool2d(level, size, stride=1, padding=size // 2)[:, 0]
            levels.append(level / level.flatten(1).amax(1).clamp_min(1e-12)[:, None, None])
        product = torch.stack(levels).prod(dim=0)
        met = product.flatten(1).amax(1) > 0
        evidence = torch.where(met[:, None, None], product, torch.stack(levels).mean(dim=0))
        return out, evidence.detach()
