"""Spatial-channel attention (CBAM style).

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018
(arXiv:1807.06521): channel attention first (average- and max-pooled descriptors through a
shared two-layer MLP, summed, sigmoid), then spatial attention (channel-wise average and
max maps, concatenated, through one 7x7 convolution, sigmoid). Both are multiplicative
gates, so the block keeps its input's shape and can be inserted after any stage.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Channel gate: sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one weight per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        # 1x1 convolutions instead of Linear so the MLP works on (B, C, 1, 1) directly.
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=False),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        avg = torch.mean(x, dim=(2, 3), keepdim=True)
        mx = torch.amax(x, dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """Spatial gate: sigmoid(conv7x7([mean_c(x), max_c(x)])), one weight per position."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so the map keeps its size")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialChannelAttention(nn.Module):
    """CBAM: channel attention, then spatial attention, applied in sequence (paper's order)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two gates, (B, C, 1, 1) and (B, 1, H, W), for inspection and tests."""
        cg = self.channel.gate(x)
        sg = self.spatial.gate(x * cg)
        return cg, sg
