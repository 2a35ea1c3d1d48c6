"""The paper's metrics against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from training import metrics as M

# 10 patients: 3 healthy, 3 COVID-19, 2 H1N1, 2 CAP
Y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
P = np.array([0, 0, 1, 1, 1, 0, 2, 3, 3, 3])


def test_error_rates_by_hand():
    assert M.accuracy(Y, P) == pytest.approx(7 / 10)
    assert M.fpe(Y, P) == pytest.approx(1 / 3)        # one healthy called COVID-19
    assert M.fne(Y, P) == pytest.approx(1 / 7)        # one COVID-19 called healthy
    assert M.fdpe(Y, P) == pytest.approx(1 / 7)       # one H1N1 called CAP
    assert M.confusion(Y, P).tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 1],
                                          [0, 0, 0, 2]]


def test_sensitivity_specificity_auc_by_hand():
    scores = np.eye(4)[P] * 0.7 + 0.075               # the predicted class scores highest
    rows = M.per_class(Y, P, scores)
    assert rows[0]["sensitivity"] == pytest.approx(2 / 3)
    assert rows[0]["specificity"] == pytest.approx(6 / 7)   # 1 of 7 others called healthy
    assert rows[3]["sensitivity"] == 1.0
    assert rows[3]["specificity"] == pytest.approx(7 / 8)
    # AUC with ties: positives {1, 1, 0} vs negatives {0, 1, 0, 0, 0, 0, 0}, ties count half
    # pairs: 2 positives at 1 beat 6 negatives and tie 1 -> 2*(6 + 0.5); the one at 0 ties 6
    assert rows[0]["auc"] == pytest.approx((2 * 6.5 + 6 * 0.5) / 21)
    assert M.roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.3, 0.1]) == 1.0
    assert M.roc_auc([1, 0, 1, 0], [0.2, 0.9, 0.1, 0.8]) == 0.0
    assert np.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_curve_ends():
    fpr, tpr = M.roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert list(tpr) == [0, 0.5, 0.5, 1.0, 1.0]


def test_bootstrap_interval_bounds_on_a_fixed_seed():
    low, high = M.bootstrap_ci(Y, P, M.accuracy, n=1000, seed=7)
    # the same resamples, written out by hand
    rng = np.random.default_rng(7)
    values = []
    for _ in range(1000):
        idx = rng.integers(0, 10, 10)
        values.append(np.mean(Y[idx] == P[idx]))
    assert (low, high) == (np.quantile(values, 0.025), np.quantile(values, 0.975))
    assert low < 0.7 < high and 0.3 <= low and high <= 1.0
    assert M.bootstrap_ci(Y, Y, M.accuracy) == (1.0, 1.0)


def test_bootstrap_p_value():
    assert M.bootstrap_p_value(Y, P, P, M.accuracy) == 1.0
    y = np.repeat([0, 1, 2, 3], 25)
    good, bad = y.copy(), (y + 1) % 4
    bad[:10] = y[:10]
    assert M.bootstrap_p_value(y, good, bad, M.accuracy) < 0.01


def test_pointing_game_on_a_map_with_a_known_peak():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 12:20] = True
    lesion_map = np.zeros((20, 30))
    lesion_map[7, 15] = 1.0
    assert M.pointing_hit(lesion_map, mask)
    lesion_map[7, 15], lesion_map[15, 3] = 0.2, 0.9
    assert not M.pointing_hit(lesion_map, mask)
    assert not M.pointing_hit(np.zeros((20, 30)), mask)   # flat: no lucky hit


def test_dice():
    a = np.zeros((4, 4), dtype=bool)
    b = a.copy()
    a[:2] = True
    b[1:3] = True
    assert M.dice(a, b) == pytest.approx(2 * 4 / 16)
    assert M.dice(a, a) == 1.0
