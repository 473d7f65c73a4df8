"""Scorers: turn controller logits (B, n_outputs) into unit weights y (B, n_outputs).

| name | train mode | eval mode | zeros in y |
| --- | --- | --- | --- |
| ``softmax`` | softmax(logits) (Eq. 5) | same | never |
| ``gumbel_softmax`` | softmax((logits + g) / tau), g ~ Gumbel(0, 1) (Eq. 7-8) | softmax(logits / tau), no noise | never |
| ``gumbel_st`` | one-hot(argmax(logits + g)) forward, gradient of the Gumbel-softmax (Sec. 3.3) | one-hot(argmax(logits)) | yes |
| ``topk`` | the k largest softmax weights, others exactly 0; gradient of the full softmax (straight-through) | same | yes |

Evaluation never samples: eval-mode outputs are deterministic functions of the logits.
``tau`` is the attribute ``temperature``; it may change between steps (:func:`set_temperature`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Scorer(nn.Module):
    """Base class. ``sparse``: the weights contain exact zeros (hard selection).
    ``stochastic``: training-mode weights are a sample (a policy a REINFORCE term can score)."""

    sparse: bool = False
    stochastic: bool = False

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class SoftmaxScorer(Scorer):
    """Eq. 5: y = softmax(logits)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)


def _gumbel_noise(logits: torch.Tensor) -> torch.Tensor:
    """g = -log(-log(u)), u ~ U(0,1) (Eq. 8), sampled as -log(Exp(1))."""
    return -torch.empty_like(logits).exponential_().log()


class _GumbelScorer(Scorer):
    """Gumbel scorers' base: ``relaxed`` is softmax((logits + g) / tau) in train mode (Eq. 7-8), softmax(logits / tau) in eval."""

    stochastic = True

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def relaxed(self, logits: torch.Tensor) -> torch.Tensor:
        if self.training:
            logits = logits + _gumbel_noise(logits)
        return torch.softmax(logits / self.temperature, dim=-1)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class GumbelSoftmaxScorer(_GumbelScorer):
    """Eq. 7-8: relaxed one-hot sample at temperature ``temperature``; noise-free at eval."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.relaxed(logits)


class GumbelSTScorer(_GumbelScorer):
    """Sec. 3.3: straight-through Gumbel. Exact one-hot forward, Gumbel-softmax gradient."""

    sparse = True

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        soft = self.relaxed(logits)
        hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
        # Forward value: exactly one-hot zeros ((0 - s) + s == 0 in IEEE arithmetic); gradient: d soft.
        return hard - soft.detach() + soft


class TopKScorer(Scorer):
    """Sec. 5.4.3: keep the k largest softmax weights (not renormalised), set the others to exactly 0.

    The backward pass is straight-through: the gradient is that of the full softmax.
    """

    sparse = True

    def __init__(self, k: int = 1) -> None:
        super().__init__()
        if isinstance(k, bool) or k != int(k) or k < 1:
            raise ValueError(f"top-k scorer needs an integer k >= 1, got {k!r}")
        self.k = int(k)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax(logits, dim=-1)
        mask = torch.zeros_like(soft).scatter_(-1, soft.topk(self.k, dim=-1).indices, 1.0)
        # soft + (kept - soft) is exactly kept = soft * mask (0 where masked, the softmax value where kept).
        return soft + (soft * mask - soft).detach()

    def extra_repr(self) -> str:
        return f"k={self.k}"


SCORERS: dict[str, Callable[..., Scorer]] = {
    "softmax": SoftmaxScorer,
    "gumbel_softmax": GumbelSoftmaxScorer,
    "gumbel_st": GumbelSTScorer,
    "topk": TopKScorer,
}


def build_scorer(spec: str | Scorer, **options: Any) -> Scorer:
    """A scorer from a registered name, with its options (``temperature`` or ``k``), or a Scorer instance."""
    if isinstance(spec, nn.Module):
        return spec
    if spec not in SCORERS:
        raise ValueError(f"unknown scorer {spec!r}; valid scorers: {', '.join(SCORERS)}")
    try:
        return SCORERS[spec](**options)
    except TypeError as err:
        raise ValueError(f"bad options {options} for scorer {spec!r}: {err}") from None


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of every Gumbel scorer in ``model``; returns how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, _GumbelScorer):
            module.temperature = float(temperature)
            count += 1
    return count
