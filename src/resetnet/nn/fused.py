"""Fused dense evaluation of a pool of BasicBlock units (placeholder until implemented)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def can_fuse(units: Sequence[nn.Module]) -> bool:
    return False


def fused_forward(units: Sequence[nn.Module], x: torch.Tensor, weights: torch.Tensor, iteration: int) -> torch.Tensor:
    raise NotImplementedError
