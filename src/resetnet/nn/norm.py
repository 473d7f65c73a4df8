"""Batch normalization with one set of statistics and parameters per iteration.

A unit of a ReSet module can run at any of the k iterations, and its input distribution
differs between iterations (Jastrzebski et al. 2017, "Residual connections encourage
iterative inference"); one shared BatchNorm's running estimate would fit none of them.
"""

from __future__ import annotations

import torch
from torch import nn

BN_MODES = ("per_iteration", "shared")


class IterationBatchNorm2d(nn.Module):
    """``BatchNorm2d`` with ``iterations`` independent copies (statistics and affine parameters).

    Args:
        num_features: channels C of the (B, C, H, W) input.
        iterations: number of copies; ``forward(x, iteration)`` uses copy ``iteration``.
            With ``iterations == 1`` this is a plain shared BatchNorm.
    """

    def __init__(self, num_features: int, iterations: int = 1) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"IterationBatchNorm2d needs iterations >= 1, got {iterations}")
        self.num_features = num_features
        self.norms = nn.ModuleList(nn.BatchNorm2d(num_features) for _ in range(iterations))

    @property
    def iterations(self) -> int:
        return len(self.norms)

    def forward(self, x: torch.Tensor, iteration: int = 0) -> torch.Tensor:
        if len(self.norms) > 1 and not 0 <= iteration < len(self.norms):
            raise IndexError(
                f"iteration {iteration} out of range for a per-iteration BatchNorm with "
                f"{len(self.norms)} copies; build the unit with bn_iterations >= the ReSet iterations"
            )
        return self.norm_for(iteration)(x)

    def norm_for(self, iteration: int) -> nn.BatchNorm2d:
        """The BatchNorm used at ``iteration`` (the shared one when there is a single copy)."""
        return self.norms[0] if len(self.norms) == 1 else self.norms[iteration]


def check_bn_mode(bn_mode: str) -> str:
    if bn_mode not in BN_MODES:
        raise ValueError(f"unknown BN mode {bn_mode!r}; valid modes: {', '.join(BN_MODES)}")
    return bn_mode
