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
