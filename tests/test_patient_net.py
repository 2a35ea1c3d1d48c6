"""The patient-level network (paper III-C, Fig. 6) and the non-parametric rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from inference.nonparametric import assess, slice_class_probabilities
from inference.patient_net import PatientNet, run_bounds
from inference.profiles import PROFILES


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PatientNet(PROFILES["small"]).eval()


def test_output_does_not_depend_on_padding(net):
    d = PROFILES["small"].slice_feature_dim
    torch.manual_seed(1)
    alone = torch.randn(1, 23, d)
    other = torch.randn(1, 57, d)
    with torch.no_grad():
        single = net(alone)
        batch = torch.zeros(2, 57, d)
        batch[0, :23] = alone[0]
        batch[0, 23:] = 1e3                               # garbage in the padding
        batch[1] = other[0]
        both = net(batch, torch.tensor([23, 57]))
    torch.testing.assert_close(both[0], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], net(other)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 1000])
def test_any_number_of_slices(net, n):
    d = PROFILES["small"].slice_feature_dim
    with torch.no_grad():
        out = net(torch.randn(1, n, d))
    assert out.shape == (1, 4) and torch.isfinite(out).all()


def test_paper_profile_shapes():
    p = PROFILES["paper"]
    pn = PatientNet(p)
    assert pn.head.refine[0].f1.out_features == 12 * 512
    assert pn.head.aggregate.query.shape == (1, 512)
    assert pn.fuse.in_features == 10 * 3072 and pn.fuse.out_features == 3072
    assert len(pn.head.refine) == 2


def test_run_bounds_split_evenly_and_repeat_when_short():
    assert run_bounds(10, 1) == [(0, 10)]
    assert run_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert run_bounds(1, 4) == [(0, 1)] * 4
    assert run_bounds(2, 3) == [(0, 1), (0, 1), (1, 2)]


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    pn = PatientNet(PROFILES["small"]).train()
    d = PROFILES["small"].slice_feature_dim
    feats = torch.randn(8, 30, d)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    feats[torch.arange(8), :, labels] += 3.0             # a class signal in the features
    lengths = torch.tensor([30, 25, 20, 12, 30, 8, 17, 3])
    opt = torch.optim.SGD(pn.parameters(), lr=0.001, momentum=0.9)
    first = F.cross_entropy(pn(feats, lengths), labels).item()
    for _ in range(10):
        loss = F.cross_entropy(pn(feats, lengths), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(pn(feats, lengths), labels).item() < first


def test_nonparametric_rule_by_hand():
    # slice probabilities: lesion head (no lesion, lesion), four-class head
    lesion = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    classes = np.array([[0.7, 0.1, 0.1, 0.1],
                        [0.1, 0.6, 0.2, 0.1],
                        [0.1, 0.2, 0.6, 0.1],
                        [0.0, 0.7, 0.2, 0.1]])
    p = slice_class_probabilities(lesion, classes)
    # Eq. 4 by hand for slice 1: p0 = 0.2 + 0.8*0.1, p1 = 0.8*0.6, p2 = 0.8*0.2, p3 = 0.8*0.1
    np.testing.assert_allclose(p[1], [0.28, 0.48, 0.16, 0.08])
    np.testing.assert_allclose(p[0], [0.9 + 0.1 * 0.7, 0.01, 0.01, 0.01])
    result = assess(lesion, classes)
    # slices' argmax: Healthy, COVID, H1N1, COVID -> N0/N = 0.25 <= 0.99 -> COVID-19
    assert result.slice_counts.tolist() == [1, 2, 1, 0]
    assert result.diagnosis == 1
    np.testing.assert_allclose(result.scores, [0.25, 0.5, 0.25, 0.0])
    # all slices healthy -> Healthy; 1 disease slice in 200 is "most slices" healthy
    healthy = np.tile([[0.99, 0.01]], (200, 1))
    hc = np.tile([[0.9, 0.05, 0.03, 0.02]], (200, 1))
    assert assess(healthy, hc).diagnosis == 0
    healthy[0], hc[0] = [0.0, 1.0], [0.0, 0.0, 0.0, 1.0]
    assert assess(healthy, hc).diagnosis == 0          # 199/200 = 0.995 > 0.99
    healthy[1], hc[1] = [0.0, 1.0], [0.0, 0.0, 0.0, 1.0]
    assert assess(healthy, hc).diagnosis == 3          # 198/200 = 0.99, not > 0.99: CAP


def test_a_task_1_made_from_the_class_scores_is_not_counted_twice():
    """Hu 2020's task 1 is 1 - P(Healthy): Eq. 4 would add P(Healthy) to Healthy again and
    call a slice whose classes say COVID-19 (0.3 / 0.5 / 0.1 / 0.1) Healthy (0.51 against
    0.35); with ``task1_from_classes`` the class head decides."""
    classes = np.tile([[0.3, 0.5, 0.1, 0.1]], (10, 1))
    lesion = np.stack([classes[:, 0], 1 - classes[:, 0]], axis=1)
    assert assess(lesion, classes).diagnosis == 0
    result = assess(lesion, classes, task1_from_classes=True)
    assert result.diagnosis == 1 and result.slice_counts.tolist() == [0, 10, 0, 0]
