"""The Deep Diagnostic Network (DDN).

A torchvision ResNet-50 backbone (He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016), a CBAM spatial-channel attention block on the last stage (and
optionally after earlier stages), global average pooling, dropout and one linear head per
task. Heads share the backbone (multi-task): the CXR head and the brain MRI head of the
bundled artifact are two ``nn.Linear`` layers on the same pooled features, so the
repository carries one backbone.

The network is split in two at the last convolutional stage so that Grad-CAM can run the
expensive part (``features``) once without gradients and back-propagate only through
``forward_from_features`` (attention, pooling, heads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torchvision
from torch import nn

from ddn_node.model.attention import SpatialChannelAttention

Backbone = Literal["resnet50", "resnet18", "tiny"]
Activation = Literal["sigmoid", "softmax"]
STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class HeadConfig:
    """One task head: its labels and how its logits become probabilities.

    ``sigmoid``: independent findings (multi-label, the paper's heads). ``softmax``:
    mutually exclusive classes (e.g. the four brain MRI classes).
    """

    name: str
    labels: tuple[str, ...]
    activation: Activation = "sigmoid"


@dataclass(frozen=True)
class DDNConfig:
    backbone: Backbone = "resnet50"
    heads: tuple[HeadConfig, ...] = ()
    attention_stages: tuple[str, ...] = ("layer4",)
    attention_reduction: int = 16
    dropout: float = 0.5
    # Only for the "tiny" backbone (tests): channel widths of the four stages.
    tiny_widths: tuple[int, int, int, int] = (8, 16, 32, 64)

    def head(self, name: str) -> HeadConfig:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(f"no head named {name!r}; have {[h.name for h in self.heads]}")


class _TinyBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def _tiny_backbone(widths: Sequence[int]) -> nn.Module:
    """A four-stage residual net with ResNet's attribute names, small enough for unit tests."""
    m = nn.Module()
    m.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(widths[0])
    m.relu = nn.ReLU(inplace=True)
    m.maxpool = nn.MaxPool2d(3, 2, 1)
    m.layer1 = _TinyBlock(widths[0], widths[0], 1)
    m.layer2 = _TinyBlock(widths[0], widths[1], 2)
    m.layer3 = _TinyBlock(widths[1], widths[2], 2)
    m.layer4 = _TinyBlock(widths[2], widths[3], 2)
    return m


def _stage_channels(backbone: DDN) -> dict[str, int]:
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        out = {}
        for s in STAGES:
            x = getattr(backbone, s)(x)
            out[s] = int(x.shape[1])
    return out


class DDN(nn.Module):
    """ResNet backbone + CBAM + global pooling + dropout + one linear head per task."""

    # The convolutional trunk, taken from the backbone in __init__.
    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, config: DDNConfig) -> None:
        super().__init__()
        if not config.heads:
            raise ValueError("a DDN needs at least one head")
        for s in config.attention_stages:
            if s not in STAGES:
                raise ValueError(f"attention stage {s!r} is not one of {STAGES}")
        self.config = config
        if config.backbone == "resnet50":
            # Any: nn.Module.__getattr__ would type the children read below Tensor | Module.
            bb: Any = torchvision.models.resnet50(weights=None)
        elif config.backbone == "resnet18":
            bb = torchvision.models.resnet18(weights=None)
        elif config.backbone == "tiny":
            bb = _tiny_backbone(config.tiny_widths)
        else:  # pragma: no cover - Literal guards this
            raise ValueError(f"unknown backbone {config.backbone!r}")
        # Keep only the convolutional trunk; torchvision's fc/avgpool are replaced by our heads.
        self.conv1, self.bn1, self.relu, self.maxpool = bb.conv1, bb.bn1, bb.relu, bb.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            bb.layer1,
            bb.layer2,
            bb.layer3,
            bb.layer4,
        )
        channels = _stage_channels(self)
        self.attention = nn.ModuleDict(
            {
                s: SpatialChannelAttention(channels[s], config.attention_reduction)
                for s in config.attention_stages
            }
        )
        self.num_features = channels["layer4"]
        self.dropout = nn.Dropout(config.dropout)
        self.heads = nn.ModuleDict(
            {h.name: nn.Linear(self.num_features, len(h.labels)) for h in config.heads}
        )

    # --- the two halves -------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last convolutional stage (the Grad-CAM target), before attention."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in STAGES:
            x = getattr(self, s)(x)
            if s != "layer4" and s in self.attention:
                x = self.attention[s](x)
        return x

    def pooled(self, feats: torch.Tensor) -> torch.Tensor:
        """Attention on the last stage, then global average pooling: (B, C)."""
        if "layer4" in self.attention:
            feats = self.attention["layer4"](feats)
        return torch.flatten(torch.mean(feats, dim=(2, 3), keepdim=True), 1)

    def forward_from_features(
        self, feats: torch.Tensor, heads: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits per head from last-stage features. Cheap: this is all Grad-CAM differentiates."""
        z = self.dropout(self.pooled(feats))
        names = list(self.heads.keys()) if heads is None else list(heads)
        return {n: self.heads[n](z) for n in names}

    def forward(
        self, x: torch.Tensor, heads: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        return self.forward_from_features(self.features(x), heads)

    # --- helpers --------------------------------------------------------------------

    def probabilities(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, z in logits.items():
            act = self.config.head(name).activation
            out[name] = torch.softmax(z, dim=1) if act == "softmax" else torch.sigmoid(z)
        return out

    def backbone_parameters(self, stages: Sequence[str]) -> list[nn.Parameter]:
        """Parameters of the named parts: "stem" and/or "layer1".."layer4"."""
        params: list[nn.Parameter] = []
        for s in stages:
            mods = [self.conv1, self.bn1] if s == "stem" else [getattr(self, s)]
            for m in mods:
                params.extend(m.parameters())
        return params

    def load_backbone_state(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load a torchvision ResNet state dict (e.g. ImageNet weights) into the trunk.

        The classifier (``fc.*``) is dropped. Returns the trunk keys that were not in
        ``state`` so the caller can refuse a mismatched file.
        """
        trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = [
            k for k in own if k.split(".")[0] in ("conv1", "bn1", *STAGES) and k not in trunk
        ]
        unexpected = [k for k in trunk if k not in own]
        if unexpected:
            raise ValueError(
                f"init weights do not match the {self.config.backbone} trunk: {unexpected[:5]}"
            )
        for k, v in trunk.items():
            if own[k].shape != v.shape:
                raise ValueError(
                    f"init weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                )
        self.load_state_dict(trunk, strict=False)
        return missing
