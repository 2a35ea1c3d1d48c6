"""The slice-level network as SPEC fills in the paper (III-B, Fig. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.profiles import PROFILES
from inference.slice_net import LESION, SliceNet, coordinate_maps, prototype_maps


def test_heads_and_shapes_paper_profile():
    p = PROFILES["paper"]
    net = SliceNet(p).eval()
    assert net.lesion_fc.weight.shape == (2, 1024)
    assert net.class_fc.weight.shape == (4, 2048)
    assert net.backbone.layer4[0].conv1.in_channels == 1028
    assert net.backbone.layer4[0].downsample[0].in_channels == 1028
    with torch.no_grad():
        out = net(torch.rand(2, 3, 128, 128))
    assert out.lesion_logits.shape == (2, 2) and out.class_logits.shape == (2, 4)
    assert out.lesion_map.shape == (2, 8, 8)          # ResBlock3: 1/16 of the input
    assert out.feature.shape == (2, 3072)              # GAP(F3) 1024 ++ GAP(F4) 2048


def test_attention_map_is_in_unit_range_and_uses_the_lesion_prototype():
    net = SliceNet(PROFILES["small"]).eval()
    captured = {}
    net.backbone.layer3.register_forward_hook(lambda m, i, o: captured.setdefault("f3", o))
    with torch.no_grad():
        out = net(torch.rand(3, 3, 256, 256))
    f3 = captured["f3"]
    assert out.lesion_map.shape == f3.shape[:1] + f3.shape[2:]
    assert out.lesion_map.min() >= 0 and out.lesion_map.max() <= 1
    cos = F.cosine_similarity(f3, net.lesion_fc.weight[LESION].view(1, -1, 1, 1), dim=1)
    torch.testing.assert_close(out.lesion_map, (cos + 1) / 2)


def test_layer4_sees_the_predicted_class_map_and_coordinates():
    net = SliceNet(PROFILES["small"]).eval()
    with torch.no_grad():  # make every slice predicted "no lesion"
        net.lesion_fc.bias.copy_(torch.tensor([50.0, -50.0]))
    seen = {}
    net.backbone.layer4.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    captured = {}
    net.backbone.layer3.register_forward_hook(lambda m, i, o: captured.setdefault("f3", o))
    with torch.no_grad():
        out = net(torch.rand(2, 3, 256, 256))
    assert out.lesion_logits.argmax(1).tolist() == [0, 0]
    x, f3 = seen["x"], captured["f3"]
    c3 = f3.shape[1]
    assert x.shape[1] == c3 + 4
    torch.testing.assert_close(x[:, :c3], f3)
    torch.testing.assert_close(x[:, c3], prototype_maps(f3, net.lesion_fc.weight)[:, 0])
    torch.testing.assert_close(x[:, c3 + 1:], coordinate_maps(*f3.shape[2:]).expand(2, -1, -1, -1))


def test_coordinate_maps():
    c = coordinate_maps(5, 7)
    assert c.shape == (3, 5, 7)
    x, y, d = c
    assert x[0, 0] == -1 and x[0, -1] == 1 and torch.all(x[:, 3] == 0)
    assert y[0, 0] == -1 and y[-1, 0] == 1 and torch.all(y[2] == 0)
    torch.testing.assert_close(d, torch.sqrt(x ** 2 + y ** 2))
    assert d[2, 3] == 0 and torch.isclose(d[0, 0], torch.tensor(2.0).sqrt())


def test_a_few_steps_lower_both_losses():
    torch.manual_seed(0)
    net = SliceNet(PROFILES["small"]).train()
    x = torch.rand(8, 3, 64, 64)
    x[4:, :, 20:40, 20:40] += 1.0                     # a bright "lesion" on half the slices
    lesion = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    klass = torch.tensor([0, 0, 0, 0, 1, 2, 3, 1])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def losses():
        out = net(x)
        return F.cross_entropy(out.lesion_logits, lesion), F.cross_entropy(out.class_logits, klass)

    first = [v.item() for v in losses()]
    for _ in range(15):
        l1, l2 = losses()
        opt.zero_grad()
        (l1 + l2).backward()
        opt.step()
    last = [v.item() for v in losses()]
    assert last[0] < first[0] and last[1] < first[1]


def test_lesion_evidence_attributes_task_1_at_resblock1_without_touching_weights():
    torch.manual_seed(0)
    net = SliceNet(PROFILES["small"]).eval()
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        plain = net(x)
    out, evidence = net.lesion_evidence(x)
    assert evidence.shape == (3, 32, 32)                # ResBlock1: 1/4 of the input
    assert evidence.min() >= 0 and evidence.max() > 0
    torch.testing.assert_close(out.lesion_logits, plain.lesion_logits)
    torch.testing.assert_close(out.class_logits, plain.class_logits)
    assert all(p.grad is None for p in net.parameters())

    # what it is: the positive part of d(lesion - no lesion)/d(F1) * F1, summed over channels
    f1 = net.backbone.stem_to_layer1(x).detach().requires_grad_(True)
    logits = net.lesion_fc(net.backbone.layer3(net.backbone.layer2(f1)).mean(dim=(2, 3)))
    (grad,) = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), f1)
    torch.testing.assert_close(evidence, F.relu((grad * f1).sum(dim=1)).detach())


def test_no_lesion_evidence_when_the_head_cannot_tell_lesion_from_none():
    net = SliceNet(PROFILES["small"]).eval()
    with torch.no_grad():
        net.lesion_fc.weight[1] = net.lesion_fc.weight[0]
    _, evidence = net.lesion_evidence(torch.rand(2, 3, 64, 64))
    assert torch.count_nonzero(evidence) == 0
