"""Network shapes, the CBAM block, heads and backbone loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ddn_node.model.attention import ChannelAttention, SpatialAttention, SpatialChannelAttention
from ddn_node.model.ddn import DDN, DDNConfig, HeadConfig

HEADS = (
    HeadConfig("cxr", tuple(f"l{i}" for i in range(14))),
    HeadConfig("mri", ("a", "b", "c", "d"), "softmax"),
)


def test_cbam_keeps_shape_and_gates_are_in_unit_interval() -> None:
    torch.manual_seed(0)
    block = SpatialChannelAttention(32, reduction=8)
    x = torch.randn(2, 32, 7, 9)
    y = block(x)
    assert y.shape == x.shape
    with torch.no_grad():
        cg, sg = block.gates(x)
    assert cg.shape == (2, 32, 1, 1) and sg.shape == (2, 1, 7, 9)
    assert (
        float(cg.min()) > 0 and float(cg.max()) < 1 and float(sg.min()) > 0 and float(sg.max()) < 1
    )
    # The block is exactly x * channel gate * spatial gate.
    assert torch.allclose(y, x * cg * sg, atol=1e-6)


def test_channel_attention_uses_both_average_and_max_descriptors() -> None:
    torch.manual_seed(0)
    ca = ChannelAttention(8, reduction=2).eval()
    a = torch.zeros(1, 8, 4, 4)
    b = a.clone()
    b[0, :, 0, 0] = 16.0  # same mean as c, different max
    c = torch.full((1, 8, 4, 4), 1.0)
    assert not torch.allclose(ca.gate(b), ca.gate(c))  # max pooling sees the spike
    d = torch.full((1, 8, 4, 4), 2.0)
    d[0, :, 0, 0] = 16.0  # same max as b, different mean
    assert not torch.allclose(ca.gate(b), ca.gate(d))  # average pooling sees the mean


def test_spatial_attention_uses_a_7x7_conv_on_two_pooled_maps() -> None:
    sa = SpatialAttention()
    assert sa.conv.in_channels == 2 and sa.conv.kernel_size == (7, 7)
    with pytest.raises(ValueError):
        SpatialAttention(kernel_size=4)


@pytest.mark.parametrize(
    "backbone,size,channels,grid",
    [("tiny", 64, 64, 2), ("resnet50", 64, 2048, 2), ("resnet18", 96, 512, 3)],
)
def test_shapes_per_backbone(backbone: str, size: int, channels: int, grid: int) -> None:
    torch.manual_seed(0)
    m = DDN(DDNConfig(backbone=backbone, heads=HEADS)).eval()  # type: ignore[arg-type]
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        f = m.features(x)
        out = m(x)
        again = m.forward_from_features(f)
    assert f.shape == (3, channels, grid, grid)
    assert set(out) == {"cxr", "mri"}
    assert out["cxr"].shape == (3, 14) and out["mri"].shape == (3, 4)
    assert torch.allclose(out["cxr"], again["cxr"])
    probs = m.probabilities(out)
    assert torch.allclose(probs["mri"].sum(1), torch.ones(3), atol=1e-5)  # softmax head
    assert float(probs["cxr"].min()) >= 0 and float(probs["cxr"].max()) <= 1  # sigmoid head


def test_resnet50_at_224_has_a_7x7_last_stage_and_attention_where_asked() -> None:
    m = DDN(DDNConfig(heads=HEADS[:1], attention_stages=("layer3", "layer4"))).eval()
    assert set(m.attention) == {"layer3", "layer4"}
    with torch.no_grad():
        f = m.features(torch.randn(1, 3, 224, 224))
    assert f.shape == (1, 2048, 7, 7)
    with pytest.raises(ValueError):
        DDN(DDNConfig(heads=HEADS[:1], attention_stages=("layer9",)))


def test_heads_share_one_backbone() -> None:
    m = DDN(DDNConfig(backbone="tiny", heads=HEADS))
    trunk = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("heads."))
    heads = sum(p.numel() for n, p in m.named_parameters() if n.startswith("heads."))
    assert heads == 64 * 14 + 14 + 64 * 4 + 4
    assert trunk > heads


def test_load_torchvision_state_dict_into_trunk() -> None:
    tv = torchvision.models.resnet18(weights=None)
    m = DDN(DDNConfig(backbone="resnet18", heads=HEADS[:1]))
    missing = m.load_backbone_state(tv.state_dict())
    assert missing == []
    assert torch.equal(m.layer4[0].conv1.weight, tv.layer4[0].conv1.weight)
    with pytest.raises(ValueError):
        DDN(DDNConfig(backbone="tiny", heads=HEADS[:1])).load_backbone_state(tv.state_dict())
