"""Residual building blocks for CIFAR ResNets and ReSet pools.

Every residual stage computes ``x <- x + F(x)`` with no activation after the addition:
the ReSet update (Eq. 12, ``x_{k+1} = x_k + sum_i y_ki F_i(x_k)``) with a sequential
one-hot policy, so blocks move between ResNets and ReSets unchanged (Sec. 5.1).
``F`` is He et al.'s BasicBlock branch: conv3x3-BN-ReLU-conv3x3-BN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .norm import IterationBatchNorm2d


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Residual branch ``F(x) = BN(conv(ReLU(BN(conv(x)))))`` mapping (B,C,H,W) to the same shape.

    Args:
        channels: input and output channels C.
        bn_iterations: number of BatchNorm copies. 1 shares BN across ReSet iterations;
            k gives each of k iterations its own statistics and affine parameters.

    Iteration-aware (``takes_iteration``): ReSet calls ``forward(x, iteration=j)``, which selects BN copy j.
    """

    takes_iteration = True

    def __init__(self, channels: int, bn_iterations: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = conv3x3(channels, channels)
        self.bn1 = IterationBatchNorm2d(channels, bn_iterations)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = IterationBatchNorm2d(channels, bn_iterations)

    def forward(self, x: torch.Tensor, iteration: int = 0) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x), iteration))
        return self.bn2(self.conv2(out), iteration)


class DownsampleBlock(nn.Module):
    """He et al.'s downsampling residual block with the parameter-free shortcut (option A).

    ``y = shortcut(x) + F(x)`` where ``F`` is a BasicBlock branch whose first
    conv has stride 2 and ``shortcut`` subsamples by 2 and zero-pads the new
    channels. Maps (B, C_in, H, W) to (B, C_out, H/2, W/2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("DownsampleBlock needs out_channels >= in_channels")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return shortcut + branch


class ConvBNReLU(nn.Sequential):
    """conv3x3 (optionally strided), BatchNorm, ReLU: the stem and the ReSet stage transition."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ResidualSequence(nn.Module):
    """A plain ResNet stage body: ``for F in blocks: x = x + F(x)``.

    Holds the branches in ``.blocks`` so that they can be copied into a ReSet pool in order.
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x
