"""The paper's parameter-free patient assessment (appendix, Eq. 4-5).

Per slice i, the four class probabilities combine both tasks (Eq. 4):

    p0_i = Pl0_i + Pl1_i * Pm0_i,   pk_i = Pl1_i * Pmk_i  (k = 1, 2, 3)

with Pl the lesion head's probabilities (0: no lesion, 1: lesion) and Pm the
four-class head's. N_k counts the slices whose largest p is class k. The
patient is Healthy when N_0 / N > T (T = 0.99: "all or most slices are
normal"), otherwise the disease with the most slices (Eq. 5); a tie between
diseases goes to the one with the larger summed probability.

Where task 1 is not a head of its own but derived from the class scores (Hu et al.
2020: P(lesion) = 1 - Pm0), Eq. 4 would count Healthy twice (p0 = Pm0 + (1 - Pm0) Pm0)
and tilt every slice towards it; there the class head's probabilities are the slice's
(``task1_from_classes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_T = 0.99


@dataclass(frozen=True)
class Assessment:
    """The parameter-free patient decision (paper appendix, Eq. 4-5)."""

    diagnosis: int            # class index
    slice_counts: np.ndarray  # N_k, shape (4,)
    scores: np.ndarray        # N_k / N: the patient's score per class, sums to 1


def slice_class_probabilities(lesion_probs: np.ndarray, class_probs: np.ndarray) -> np.ndarray:
    """Eq. 4: (N, 2) lesion and (N, 4) class probabilities -> (N, 4)."""
    lesion_probs = np.asarray(lesion_probs, dtype=np.float64)
    class_probs = np.asarray(class_probs, dtype=np.float64)
    p = lesion_probs[:, 1:2] * class_probs
    p[:, 0] += lesion_probs[:, 0]
    return p


def assess(lesion_probs: np.ndarray, class_probs: np.ndarray, t: float = DEFAULT_T, *,
           task1_from_classes: bool = False) -> Assessment:
    """Eq. 5: the patient's class from its slices' probabilities (Eq. 4's, or the class
    head's alone when ``task1_from_classes``)."""
    p = np.asarray(class_probs, dtype=np.float64) if task1_from_classes \
        else slice_class_probabilities(lesion_probs, class_probs)
    if p.shape[0] == 0:
        raise ValueError("a patient needs at least one slice")
    counts = np.bincount(p.argmax(axis=1), minlength=4)
    n = p.shape[0]
    if counts[0] / n > t:
        diagnosis = 0
    else:
        disease = counts[1:]
        best = np.flatnonzero(disease == disease.max()) + 1
        diagnosis = int(best[np.argmax(p[:, best].sum(axis=0))])
    return Assessment(diagnosis=diagnosis, slice_counts=counts, scores=counts / n)
