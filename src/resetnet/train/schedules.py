"""Schedules as pure functions of ``(step, total_steps)``: learning rate, entropy-regularizer weight, Gumbel
temperature. A resumed run recomputes them from its step (no scheduler state is saved). Positions are steps or
shares of the budget (``"50%"``, :func:`~resetnet.train.config.resolve_position`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn import set_temperature
from .config import Config, RampConfig, ScheduleConfig, resolve_position

__all__ = ["lr_factor", "ramp", "Schedules"]


def lr_factor(schedule: ScheduleConfig, step: int, total: int) -> float:
    """Multiplier of the base learning rate for the update made at ``step`` (0-based).

    * ``step``: ``gamma ** (number of milestones <= step)`` (He et al.: x0.1 at 32k and 48k of 64k).
    * ``exponential``: ``gamma ** (step // every)`` (paper Sec. 5.2, Adam: x0.95 every 1000 batches).
    * ``cosine``: from 1 to ``final`` along a half cosine over the budget.
    * ``linear``: from 1 after the warm-up straight down to ``final`` at the end (with the warm-up: a one-cycle shape).
    * ``constant``: 1.
    A linear warm-up over ``warmup`` steps multiplies the result.
    """
    warmup = resolve_position(schedule.warmup, total) or 0
    if schedule.kind == "step":
        factor = schedule.gamma ** sum(step >= resolve_position(m, total) for m in schedule.milestones)
    elif schedule.kind == "exponential":
        factor = schedule.gamma ** (step // schedule.every)
    elif schedule.kind == "cosine":
        t = min(step / max(total, 1), 1.0)
        factor = schedule.final + (1 - schedule.final) * 0.5 * (1 + math.cos(math.pi * t))
    elif schedule.kind == "linear":
        t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        factor = 1.0 - (1.0 - schedule.final) * t
    else:
        factor = 1.0
    if warmup > 0 and step < warmup:
        factor *= (step + 1) / warmup
    return float(factor)


def ramp(spec: RampConfig, step: int, total: int) -> float:
    """``initial`` until ``begin``, then to ``final`` by ``end`` (``linear``, half ``cosine``, or
    ``exponential``: a constant rate of decay), then ``final``; ``constant``: always ``initial``."""
    a, b = float(spec.initial), float(spec.final)
    if spec.kind == "constant":
        return a
    begin, end = resolve_position(spec.begin, total), resolve_position(spec.end, total)
    if step <= begin:
        return a
    if step >= end or end <= begin:
        return b
    t = (step - begin) / (end - begin)
    if spec.kind == "linear":
        return a + (b - a) * t
    if spec.kind == "cosine":
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))
    return a * (b / a) ** t


class Schedules:
    """The schedule values of one config at a step, and their application to a model and optimizer."""

    def __init__(self, cfg: Config, total_steps: int) -> None:
        self.cfg, self.total = cfg, int(total_steps)

    def values(self, step: int) -> dict[str, float | None]:
        temperature = self.cfg.train.temperature
        return {
            "lr": self.cfg.optim.lr * lr_factor(self.cfg.optim.schedule, step, self.total),
            "entropy_factor": ramp(self.cfg.regularizers.entropy.decay, step, self.total),
            "temperature": None if temperature is None else ramp(temperature, step, self.total),
        }

    def apply(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
        """Set the learning rate and the Gumbel temperature for the update made at ``step``."""
        v = self.values(step)
        for group in optimizer.param_groups:
            group["lr"] = v["lr"]
        if v["temperature"] is not None:
            set_temperature(model, v["temperature"])
        return v
