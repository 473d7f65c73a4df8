"""The routing record a ReSet module returns on request."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """What one ReSet module decided for a batch.

    Attributes:
        logits: controller outputs, shape (B, iterations, n_outputs).
        weights: the unit weights y that were used in the forward pass, same shape.
            ``n_outputs`` is the number of units, plus one when the module has a
            zero unit, which is always the last index.
        zero_unit: whether the last column is the zero unit.
        hard: the weights came from a hard scorer (exact zeros; ``gumbel_st``, ``topk``).
    """

    logits: torch.Tensor
    weights: torch.Tensor
    zero_unit: bool = True
    hard: bool = False

    def probabilities(self) -> torch.Tensor:
        """The controller's probabilities ``softmax(logits)`` (float32), same shape as ``weights``."""
        return torch.softmax(self.logits.float(), dim=-1)

    @property
    def num_units(self) -> int:
        """Number of computational units (the zero unit excluded)."""
        return self.weights.shape[-1] - int(self.zero_unit)

    @property
    def iterations(self) -> int:
        return self.weights.shape[1]

    def hard_route(self) -> torch.Tensor:
        """(B, iterations) arg-max unit index per sample and iteration."""
        return self.weights.argmax(dim=-1)

    def skip_mask(self) -> torch.Tensor:
        """(B, iterations) bool: the zero unit was chosen (all units' weights are 0)."""
        if not self.zero_unit:
            return torch.zeros(self.weights.shape[:2], dtype=torch.bool, device=self.weights.device)
        return (self.weights[..., :-1] == 0).all(dim=-1)
