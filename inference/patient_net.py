"""The patient-level network of M3 Lung-Sys (paper III-C, Fig. 6).

Input: one feature per slice (D wide), any number of slices. A shared
"refinement and aggregation head" turns a run of slices into one D-vector:

- Refinement (2 layers, Eq. 1-3): three parallel FC layers map the slices to
  F1, F2, F3 (h heads of D' each); H = softmax(F1^T F2 / n) over its last axis
  is an h x D' x D' correlation between feature channels across the n slices
  (dividing by n, the number of slices summed over, is the stable form of
  Eq. 2's normalisation); F3 H goes through an FC back to D and is added to
  the input. Slice features are layer-normalised on entry and after each
  residual add (post-norm, as in the Transformer): the paper is silent on
  normalisation, and without it training diverges.
- Aggregation (1 layer): a learnable query k (1 x D') scores every slice
  against FC(F), the softmax over slices weighs FC'(F), and the weighted sum is
  the pooled D-vector.

Multi-scale: for each s in S the slices are split evenly into s runs (a run
repeats slices when there are fewer slices than runs), the head pools every
run, and the sum(S) pooled vectors are concatenated, mapped by an FC to the
patient feature (D) and classified by FC(4).

Patients of different lengths share a batch through ``lengths``: padded
slices are masked out of every sum and softmax, so a patient's output does
not depend on what else is in the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from inference.profiles import CLASSES, Profile


class Refinement(nn.Module):
    """The refinement module: correlation between feature channels across slices, per head,
    back to the feature width, added to its input (paper III-C, Eq. 2)."""

    def __init__(self, dim: int, d_prime: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_prime = heads, d_prime
        self.f1 = nn.Linear(dim, heads * d_prime)
        self.f2 = nn.Linear(dim, heads * d_prime)
        self.f3 = nn.Linear(dim, heads * d_prime)
        self.f4 = nn.Linear(heads * d_prime, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (P, L, D), mask (P, L) True for real slices -> (P, L, D)."""
        p, length, _ = x.shape
        m = mask.unsqueeze(-1).to(x.dtype)
        n = mask.sum(dim=1).clamp(min=1).to(x.dtype).view(p, 1, 1, 1)

        def split(t: Tensor) -> Tensor:  # (P, L, h*D') -> (P, h, L, D')
            return t.view(p, length, self.heads, self.d_prime).transpose(1, 2)

        f1, f2, f3 = split(self.f1(x) * m), split(self.f2(x) * m), split(self.f3(x))
        h = torch.softmax(f1.transpose(-1, -2) @ f2 / n, dim=-1)   # (P, h, D', D')
        refined = (f3 @ h).transpose(1, 2).reshape(p, length, self.heads * self.d_prime)
        return self.norm(x + self.f4(refined))


class Aggregation(nn.Module):
    """The aggregation module: a learnable query attends over the slices and pools them."""

    def __init__(self, dim: int, d_prime: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, d_prime) / math.sqrt(d_prime))
        self.f2 = nn.Linear(dim, d_prime)
        self.f3 = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(d_prime)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x (P, L, D), mask (P, L) -> (P, D)."""
        scores = (self.f2(x) @ self.query.t()).squeeze(-1) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        return torch.einsum("pl,pld->pd", weights, self.f3(x))


class Head(nn.Module):
    """Two refinement layers and one aggregation layer, shared by all runs."""

    def __init__(self, dim: int, d_prime: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.refine = nn.ModuleList([Refinement(dim, d_prime, heads) for _ in range(2)])
        self.aggregate = Aggregation(dim, d_prime)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.norm(x)
        for layer in self.refine:
            x = layer(x, mask)
        return self.aggregate(x, mask)


def run_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Split n slices evenly into ``parts`` runs of at least one slice each."""
    bounds = []
    for i in range(parts):
        start = min((i * n) // parts, n - 1)
        stop = max(((i + 1) * n) // parts, start + 1)
        bounds.append((start, stop))
    return bounds


class PatientNet(nn.Module):
    """The patient-level network: a shared head over S = [1, 2, 3, 4] splits of the slices,
    fused, then four classes (paper Fig. 6)."""

    def __init__(self, profile: Profile) -> None:
        super().__init__()
        dim = profile.slice_feature_dim
        self.profile = profile
        self.scales = tuple(profile.scales)
        self.head = Head(dim, profile.d_prime, profile.heads)
        self.fuse = nn.Linear(sum(self.scales) * dim, dim)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Linear(dim, len(CLASSES))

    def patient_feature(self, features: Tensor, lengths: Tensor | None = None) -> Tensor:
        """features (B, N, D), lengths (B,) -> patient features (B, D)."""
        b, n_max, dim = features.shape
        if lengths is None:
            lengths = torch.full((b,), n_max, dtype=torch.long)
        lengths_list = [int(v) for v in lengths]
        if min(lengths_list) < 1 or max(lengths_list) > n_max:
            raise ValueError("every patient needs between 1 and N slices")
        runs = [(i, start, stop) for i, n in enumerate(lengths_list)
                for s in self.scales for start, stop in run_bounds(n, s)]
        run_len = max(stop - start for _, start, stop in runs)
        idx = torch.zeros(len(runs), run_len, dtype=torch.long)
        mask = torch.zeros(len(runs), run_len, dtype=torch.bool)
        owner = torch.tensor([i for i, _, _ in runs])
        for r, (_, start, stop) in enumerate(runs):
            idx[r, : stop - start] = torch.arange(start, stop)
            mask[r, : stop - start] = True
        idx, mask, owner = idx.to(features.device), mask.to(features.device), \
            owner.to(features.device)
        gathered = features[owner.unsqueeze(1), idx]                # (R, run_len, D)
        pooled = self.head(gathered, mask)                          # (R, D)
        pooled = pooled.view(b, sum(self.scales) * dim)             # runs are patient-major
        return self.relu(self.fuse(pooled))

    def forward(self, features: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class logits (B, 4) of patients given their slice features."""
        return self.classifier(self.patient_feature(features, lengths))
