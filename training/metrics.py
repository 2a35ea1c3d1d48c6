"""The paper's metrics (IV-B), bootstrap intervals and p-values, localisation scores.

Patient level, classes 0 Healthy, 1 COVID-19, 2 H1N1, 3 CAP:

- per class, one against the rest: sensitivity (true positive rate),
  specificity (true negative rate), AUC of the class's score;
- accuracy;
- FPE, false positive error: healthy patients called diseased / healthy;
- FNE, false negative error: diseased patients called healthy / diseased;
- FDPE, false disease prediction error: diseased patients called diseased
  but with the wrong disease / diseased;
- 95% bootstrap intervals (1000 resamples of the patients) and bootstrap
  p-values between two methods on the same patients (paired resamples).

Localisation: the pointing game (the map's maximum falls inside a true
lesion), Dice of a thresholded map against the true lesion mask.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

N_CLASSES = 4
BOOTSTRAP_RESAMPLES = 1000


def confusion(y_true, y_pred, k: int = N_CLASSES) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return m


def roc_auc(positive, scores) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); nan without both classes."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_curve(positive, scores) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(scores)[::-1]
    fpr, tpr = [0.0], [0.0]
    n_pos, n_neg = max(positive.sum(), 1), max((~positive).sum(), 1)
    for t in thresholds:
        called = scores >= t
        tpr.append((called & positive).sum() / n_pos)
        fpr.append((called & ~positive).sum() / n_neg)
    return np.array(fpr), np.array(tpr)


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def _rate(numerator: int, denominator: int) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def fpe(y_true, y_pred) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    healthy = t == 0
    return _rate(int((p[healthy] != 0).sum()), int(healthy.sum()))


def fne(y_true, y_pred) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    diseased = t != 0
    return _rate(int((p[diseased] == 0).sum()), int(diseased.sum()))


def fdpe(y_true, y_pred) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    diseased = t != 0
    wrong = diseased & (p != 0) & (p != t)
    return _rate(int(wrong.sum()), int(diseased.sum()))


def per_class(y_true, y_pred, scores) -> list[dict]:
    """Sensitivity, specificity and AUC of every class, one against the rest."""
    t, p, s = np.asarray(y_true), np.asarray(y_pred), np.asarray(scores)
    out = []
    for k in range(N_CLASSES):
        pos = t == k
        out.append({"sensitivity": _rate(int((p[pos] == k).sum()), int(pos.sum())),
                    "specificity": _rate(int((p[~pos] != k).sum()), int((~pos).sum())),
                    "auc": roc_auc(pos, s[:, k])})
    return out


def bootstrap_ci(y_true, y_pred, metric: Callable, n: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(y_true, y_pred)`` over patients."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(t), len(t))
        v = metric(t[idx], p[idx])
        if not np.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def bootstrap_p_value(y_true, pred_a, pred_b, metric: Callable, n: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value that methods a and b differ in ``metric``.

    The same resampled patients score both methods; p is twice the smaller
    share of resamples on either side of no difference (at most 1).
    """
    t, a, b = np.asarray(y_true), np.asarray(pred_a), np.asarray(pred_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = rng.integers(0, len(t), len(t))
        diffs.append(metric(t[idx], a[idx]) - metric(t[idx], b[idx]))
    d = np.array(diffs)
    return float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def pointing_hit(lesion_map: np.ndarray, lesion_mask: np.ndarray) -> bool:
    """Whether the map's maximum lies on the true lesion.

    Ties go to the first maximum in raster order, so a flat map scores no hit
    by luck.
    """
    peak = np.unravel_index(int(np.argmax(lesion_map)), lesion_map.shape)
    return bool(lesion_mask[peak])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0
