"""An exponential moving average of a model's weights (Polyak averaging), for ``train.ema_decay``."""

import copy
import itertools

import torch
from torch import nn


class WeightEMA:
    """``module``: a frozen copy of ``model`` whose float parameters and buffers follow ``ema <- d ema + (1 - d) weights`` after each
    step t, ``d = min(decay, (1 + t) / (10 + t))`` (TensorFlow's warm-up); integer buffers are copied. Foreach ops, no host sync."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay
        pairs = list(zip(*(itertools.chain(m.parameters(), m.buffers()) for m in (self.module, model))))
        floats = [p for p in pairs if p[0].is_floating_point()]
        self._ema, self._live = [e for e, _ in floats], [w for _, w in floats]  # built once: update() is on the training step
        self._others = [p for p in pairs if not p[0].is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the live weights in after optimizer step ``step`` (0-based)."""
        if self._ema:
            torch._foreach_lerp_(self._ema, self._live, 1.0 - min(self.decay, (1 + step) / (10 + step)))
        for e, w in self._others:
            e.copy_(w)
