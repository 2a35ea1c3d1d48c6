"""The slice-level network of M3 Lung-Sys (paper III-B, Fig. 5).

ResBlock1-3 of a ResNet-50 give features F3. Task 1: GAP(F3) -> FC(2), lesion
or not. The two rows of that FC's weight are prototypes of "no lesion" and
"lesion"; the cosine similarity of every spatial feature vector of F3 to a
prototype, mapped from [-1, 1] to [0, 1], is a lesion attention map. The map of
the predicted class's prototype, three coordinate channels (x and y in
[-1, 1], distance to the centre) and F3 are concatenated and go through
ResBlock4 (its first block takes C3 + 4 channels) -> GAP -> FC(4): Healthy,
COVID-19, H1N1, CAP (task 2). The per-slice feature for the patient network is
GAP(F3) concatenated with GAP(F4).

The "lesion" prototype's map is in every output, whatever the prediction
(the paper's footnote shows the other one for healthy slices). What users see
is finer: :meth:`SliceNet.lesion_evidence` attributes task 1's lesion score to
ResBlock1's positions, which finds the lesions where the 1/16 attention map,
trained only through classification losses, does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.backbone import ResNet50
from inference.profiles import CLASSES, Profile

NO_LESION, LESION = 0, 1
COORD_CHANNELS = 3


@dataclass
class SliceOutput:
    """What the slice network gives for a batch of slices."""

    lesion_logits: Tensor   # (B, 2): task 1
    class_logits: Tensor    # (B, 4): task 2
    lesion_map: Tensor      # (B, h, w) in [0, 1]: similarity to the lesion prototype
    feature: Tensor         # (B, C3 + C4): GAP(F3) ++ GAP(F4)
    lesion_type_logits: Tensor | None = None  # (B, 5): a lesion-typing model's (LA-DNN)
    level_logits: tuple[Tensor, ...] | None = None  # (B, 4) each: per-level scores (Hu 2020)


def coordinate_maps(height: int, width: int, device=None, dtype=None) -> Tensor:
    """(3, h, w): x and y normalised to [-1, 1], and the distance to the centre."""
    def axis(n: int) -> Tensor:  # index i -> (2i - (n - 1)) / (n - 1): exact -1, 0, 1
        i = torch.arange(n, device=device, dtype=torch.float64)
        return ((2 * i - (n - 1)) / max(n - 1, 1)).to(dtype or torch.get_default_dtype())

    y, x = torch.meshgrid(axis(height), axis(width), indexing="ij")
    return torch.stack([x, y, torch.sqrt(x * x + y * y)])


def prototype_maps(features: Tensor, prototypes: Tensor) -> Tensor:
    """Cosine similarity of every spatial feature to every prototype, in [0, 1].

    ``features`` (B, C, h, w), ``prototypes`` (K, C) -> (B, K, h, w).
    """
    f = F.normalize(features, dim=1)
    p = F.normalize(prototypes, dim=1).to(f.dtype)
    return (torch.einsum("bchw,kc->bkhw", f, p) + 1.0) / 2.0


class SliceNet(nn.Module):
    """The slice-level network: ResNet-50, the lesion head on ResBlock3, the lesion map and
    coordinate maps into ResBlock4, the four-class head (paper Fig. 5)."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        self.profile = profile
        self.backbone = ResNet50(width=profile.width, num_classes=len(CLASSES),
                                 layer4_extra_in=1 + COORD_CHANNELS)
        self.lesion_fc = nn.Linear(profile.layer3_channels, 2)

    @property
    def class_fc(self) -> nn.Linear:
        """Task 2's head: ResNet's own ``fc``, with the four classes."""
        return self.backbone.fc

    def forward(self, x: Tensor) -> SliceOutput:
        return self.heads(self.backbone.stem_to_layer3(x))

    def heads(self, f3: Tensor) -> SliceOutput:
        """Everything after ResBlock3: task 1, the attention map, ResBlock4, task 2."""
        g3 = f3.mean(dim=(2, 3))
        lesion_logits = self.lesion_fc(g3)
        maps = prototype_maps(f3, self.lesion_fc.weight)
        predicted = lesion_logits.argmax(dim=1)
        b, _, h, w = f3.shape
        attention = maps[torch.arange(b, device=f3.device), predicted].unsqueeze(1)
        coords = coordinate_maps(h, w, device=f3.device, dtype=f3.dtype).expand(b, -1, -1, -1)
        f4 = self.backbone.layer4(torch.cat([f3, attention.to(f3.dtype), coords], dim=1))
        g4 = f4.mean(dim=(2, 3))
        return SliceOutput(lesion_logits=lesion_logits, class_logits=self.class_fc(g4),
                           lesion_map=maps[:, LESION], feature=torch.cat([g3, g4], dim=1))

    def lesion_evidence(self, x: Tensor) -> tuple[SliceOutput, Tensor]:
        """The forward pass, and where in the slice task 1 found its lesion evidence.

        The evidence map is gradient times activation at ResBlock1 (1/4 of the
        input size) of the lesion-minus-no-lesion logit: each position's
        first-order share of the score, the positive part kept. Task 1 sees
        only GAP(F3), so its attention map at 1/16 carries no position the
        loss ever asked for; attributed back to ResBlock1 the same score lands
        on the lesions (docs/localisation.md has the measurements). Gradients
        flow only to ResBlock1's output, never into the weights; call it under
        ``torch.no_grad()`` or with grad enabled alike.
        """
        with torch.no_grad():
            f1 = self.backbone.stem_to_layer1(x)
        with torch.enable_grad():
            f1 = f1.detach().requires_grad_(True)
            f3 = self.backbone.layer3(self.backbone.layer2(f1))
            logits = self.lesion_fc(f3.mean(dim=(2, 3)))
            margin = logits[:, LESION] - logits[:, NO_LESION]
            (grad,) = torch.autograd.grad(margin.sum(), f1)
        evidence = F.relu((grad * f1).sum(dim=1)).detach()
        with torch.no_grad():
            return self.heads(f3.detach()), evidence
