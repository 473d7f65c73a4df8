"""Schedules as pure functions of the step: learning rate, entropy-regularizer weight, temperature.

Every schedule is a function of ``(step, total_steps)`` only, so a resumed run
recomputes the same values from the step it restarts at; no scheduler state
needs to be saved. Positions (milestones, ``begin``/``end``, ``warmup``) are steps
when > 1 and fractions of ``total_steps`` when <= 1 (:func:`~resetnet.train.config.resolve_position`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from .config import resolve_position

__all__ = ["lr_factor", "ramp", "entropy_factor", "temperature_at", "apply_lr", "Schedules"]


def lr_factor(schedule: Mapping[str, Any], step: int, total: int) -> float:
    """Multiplier of the base learning rate for the update made at ``step`` (0-based).

    * ``step``: ``gamma ** (number of milestones <= step)`` (He et al.: x0.1 at 32k and 48k of 64k).
    * ``exponential``: ``gamma ** (step // every)`` (paper Sec. 5.2, Adam: x0.95 every 1000 batches).
    * ``cosine``: from 1 to ``final`` along a half cosine over the budget.
    * ``linear``: from 1 after the warm-up straight down to ``final`` at the end of the budget
      (with the warm-up: a one-cycle shape).
    * ``constant``: 1.
    A linear warm-up over ``warmup`` steps multiplies the result.
    """
    kind = schedule["kind"]
    if kind == "step":
        passed = sum(step >= resolve_position(m, total) for m in schedule["milestones"])
        factor = schedule["gamma"] ** passed
    elif kind == "exponential":
        factor = schedule["gamma"] ** (step // schedule["every"])
    elif kind == "cosine":
        t = min(step / max(total, 1), 1.0)
        final = schedule["final"]
        factor = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "linear":  # one-cycle shape with the warm-up: up linearly, then straight down to `final`
        warmup = resolve_position(schedule.get("warmup", 0), total) or 0
        t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        factor = 1.0 - (1.0 - schedule["final"]) * t
    elif kind == "constant":
        factor = 1.0
    else:  # pragma: no cover - validated by the config
        raise ValueError(f"unknown lr schedule {kind!r}")
    warmup = resolve_position(schedule.get("warmup", 0), total) or 0
    if warmup > 0 and step < warmup:
        factor *= (step + 1) / warmup
    return float(factor)


def ramp(spec: Mapping[str, Any], step: int, total: int) -> float:
    """A value that stays at ``initial`` until ``begin``, moves to ``final`` by ``end``, then stays.

    ``kind``: ``constant`` (always ``initial``), ``linear``, ``cosine`` (half cosine) or
    ``exponential`` (geometric interpolation: a constant rate of decay to the floor ``final``).
    """
    kind, a, b = spec["kind"], float(spec["initial"]), float(spec["final"])
    if kind == "constant":
        return a
    begin = resolve_position(spec["begin"], total) or 0
    end = resolve_position(spec["end"], total) or 0
    if step <= begin:
        return a
    if step >= end or end <= begin:
        return b
    t = (step - begin) / (end - begin)
    if kind == "linear":
        return a + (b - a) * t
    if kind == "cosine":
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "exponential":
        return a * (b / a) ** t
    raise ValueError(f"unknown ramp kind {kind!r}")  # pragma: no cover


def entropy_factor(cfg: Mapping[str, Any], step: int, total: int) -> float:
    """Multiplier of both entropy-regularizer weights at ``step`` (``regularizers.entropy.decay``)."""
    return ramp(cfg["regularizers"]["entropy"]["decay"], step, total)


def temperature_at(cfg: Mapping[str, Any], step: int, total: int) -> float | None:
    """Gumbel temperature at ``step`` (``scorer.temperature``), or None when not scheduled."""
    spec = cfg["scorer"]["temperature"]
    return None if spec is None else ramp(spec, step, total)


def apply_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Schedules:
    """The schedule values of one config at a step, and their application to a model/optimizer."""

    def __init__(self, cfg: Mapping[str, Any], total_steps: int) -> None:
        self.cfg = cfg
        self.total = int(total_steps)

    def values(self, step: int) -> dict[str, float | None]:
        return {
            "lr": self.cfg["optim"]["lr"] * lr_factor(self.cfg["optim"]["schedule"], step, self.total),
            "entropy_factor": entropy_factor(self.cfg, step, self.total),
            "temperature": temperature_at(self.cfg, step, self.total),
        }

    def apply(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float | None]:
        """Set the learning rate and the Gumbel temperature for the update made at ``step``."""
        from ..nn import set_temperature

        v = self.values(step)
        for group in optimizer.param_groups:
            group["lr"] = v["lr"]
        if v["temperature"] is not None:
            set_temperature(model, v["temperature"])
        return v
