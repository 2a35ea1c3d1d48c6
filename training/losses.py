"""Losses beyond cross-entropy: the class-balanced focal loss of Hu et al. 2020."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_balanced_weights(counts: list[int] | Tensor, beta: float = 0.999) -> Tensor:
    """Weights by the effective number of samples, (1 - beta) / (1 - beta^n), mean 1."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1 - beta) / (1 - beta ** n)
    return (w / w.mean()).float()


def inverse_frequency_weights(counts: list[int] | Tensor) -> Tensor:
    """Hu et al. 2020's class weights (Eq. 1): the inverse of each class's frequency,
    normalised to mean 1 (a class with no sample counts as one)."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = n.sum() / n
    return (w / w.mean()).float()


#: Hu et al. 2020's focusing parameter (Eq. 1); lungsys's default focal loss uses 2.
HU2020_GAMMA = 1.0


def focal_loss(logits: Tensor, target: Tensor, weights: Tensor | None = None,
               gamma: float = 2.0) -> Tensor:
    """Mean of -w_y (1 - p_y)^gamma log p_y."""
    log_p = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if weights is not None:
        loss = loss * weights.to(logits.device)[target]
    return loss.mean()
