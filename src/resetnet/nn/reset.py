"""The ReSet module: a pool of computational units routed by a controller (Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .controllers import build_controller
from .dispatch import call_unit, shares_memory, sparse_forward
from .fused import bn_modes_agree, can_fuse, fused_forward
from .routing import Routing
from .scorers import Scorer, TopKScorer, build_scorer

EXECUTION_MODES = ("auto", "naive", "sparse", "fused")


class ReSet(nn.Module):
    """Recurrent Set module (Kemaev et al. 2018, Sec. 4, Algorithm 1).

    For ``j = 0..iterations-1``: ``y_j = scorer(controller(x, j))`` and
    ``x = x + sum_r y_jr * F_r(x)``, where the optional zero unit (last index of
    ``y``) adds nothing.

    Args:
        units: the computational units F_r, any modules mapping (B,C,H,W) to the
            same shape. Units with ``takes_iteration = True`` receive ``iteration=j``.
        iterations: number of iterations k (>= 1).
        controller: ``"rnn"``, ``"cnn"`` or a module following the controller
            protocol (see :mod:`resetnet.nn.controllers`). Named controllers need
            ``channels``.
        scorer: ``"softmax"``, ``"gumbel_softmax"``, ``"gumbel_st"``, ``"topk"`` or a
            :class:`~resetnet.nn.scorers.Scorer` instance.
        zero_unit: add the zero unit (a skip) as the last option.
        channels: channels C of the representation (needed by named controllers).
        execution: how the units are evaluated in eval mode: ``"naive"`` (every unit on
            the full batch, weights multiplied in; the reference), ``"sparse"`` (each
            unit runs only on the samples that gave it a non-zero weight), ``"fused"``
            (all units in one wide/grouped conv; BasicBlock pools only) or ``"auto"``:
            sparse for scorers that output exact zeros (``gumbel_st``, ``topk``),
            otherwise fused when the pool can be fused, naive when it cannot.
        train_execution: the same choice in train mode. ``"auto"`` evaluates every unit
            (fused, or naive): the straight-through estimators of ``gumbel_st`` and
            ``topk`` (paper Sec. 3.3, 5.4.3) pass the relaxed weights' gradient to every
            unit's output, so they need F_r(x) for every r. ``"sparse"`` trains with
            sparse dispatch: faster, but unselected units give no gradient to the
            weights, a different (truncated) estimator; see docs/execution.md.
        temperature: Gumbel temperature (Gumbel scorers).
        k: number of kept units (``topk`` scorer), 1 <= k <= len(units).
        controller_options: extra keyword arguments for a named controller.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        iterations: int,
        controller: str | nn.Module = "rnn",
        scorer: str | Scorer = "softmax",
        zero_unit: bool = True,
        *,
        channels: int | None = None,
        execution: str = "auto",
        train_execution: str = "auto",
        temperature: float | None = None,
        k: int | None = None,
        controller_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        units = list(units)
        if not units:
            raise ValueError("ReSet needs a non-empty pool of units; got an empty list")
        for i, unit in enumerate(units):
            if not isinstance(unit, nn.Module):
                raise ValueError(f"unit {i} is a {type(unit).__name__}, not an nn.Module")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"ReSet needs iterations >= 1, got {iterations!r}")
        for name, mode in (("execution", execution), ("train_execution", train_execution)):
            if mode not in EXECUTION_MODES:
                raise ValueError(f"unknown {name} mode {mode!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        self.units = nn.ModuleList(units)
        self.iterations = iterations
        self.zero_unit = bool(zero_unit)
        self.num_outputs = len(units) + int(self.zero_unit)
        self.execution = execution
        self.train_execution = train_execution

        if isinstance(scorer, str) and scorer != "topk" and k is not None:
            raise ValueError(f"k={k} is only valid with scorer='topk', not {scorer!r}")
        if isinstance(scorer, str) and scorer == "softmax" and temperature is not None:
            raise ValueError("temperature is only valid with the Gumbel scorers")
        scorer_options = {name: value for name, value in (("temperature", temperature), ("k", k)) if value is not None}
        self.scorer = build_scorer(scorer, **scorer_options)
        if isinstance(self.scorer, TopKScorer) and self.scorer.k > len(units):
            raise ValueError(f"top-k scorer with k={self.scorer.k} needs at least k units; the pool has {len(units)}")

        if isinstance(controller, str) and channels is None:
            raise ValueError(f"controller {controller!r} needs channels=C (the representation's channels)")
        self.controller = build_controller(controller, channels or 0, self.num_outputs, iterations, **(controller_options or {}))

    def resolve_execution(self, execution: str | None = None, *, training: bool | None = None) -> str:
        """The concrete mode of a call: ``execution``, else ``train_execution``/``execution`` (train/eval), ``auto`` resolved.

        ``training`` asks about train (True) or eval (False) mode instead of the current one.
        """
        training = self.training if training is None else training
        mode = execution or (self.train_execution if training else self.execution)
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {mode!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        if mode == "auto":
            if self.scorer.sparse and not training:
                return "sparse"
            return "fused" if self.can_fuse() else "naive"
        if mode == "fused" and not self.can_fuse():
            raise ValueError("execution='fused' needs a pool of BasicBlock units of one width; use 'naive' or 'sparse'")
        return mode

    def can_fuse(self) -> bool:
        return can_fuse(self.units)

    def _check(self, r: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.shape != x.shape:
            raise ValueError(
                f"ReSet unit {r} ({type(self.units[r]).__name__}) changed the shape from {tuple(x.shape)} to "
                f"{tuple(y.shape)}; every unit must map (B, C, H, W) to the same shape"
            )

    def _dense(self, x: torch.Tensor, w: torch.Tensor, iteration: int, fused: bool) -> torch.Tensor:
        """``x + sum_r w_r F_r(x)`` with every unit on the full batch: fused, or unit by unit ("naive")."""
        # A partly frozen pool (BatchNorms in different modes) is evaluated unit by unit.
        if fused and bn_modes_agree(self.units, iteration):
            return x + fused_forward(self.units, x, w[:, : len(self.units)], iteration)
        delta = torch.zeros_like(x)
        for r, unit in enumerate(self.units):
            y = call_unit(unit, x, iteration)
            self._check(r, x, y)
            delta = delta + w[:, r].view(-1, 1, 1, 1).to(y.dtype) * y
        return x + delta

    def forward(self, x: torch.Tensor, return_routing: bool = False, execution: str | None = None):
        """Run Algorithm 1. Returns ``x`` or, with ``return_routing=True``, ``(x, Routing)``."""
        if x.dim() != 4:
            raise ValueError(f"ReSet expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        mode = self.resolve_execution(execution)
        init = getattr(self.controller, "initial_state", None)
        state = init(x) if init is not None else None  # C.reset_state()
        all_logits, all_weights = [], []
        source = x
        for j in range(self.iterations):
            logits, state = self.controller(x, j, state)
            if logits.shape != (x.shape[0], self.num_outputs):
                raise ValueError(
                    f"controller returned logits of shape {tuple(logits.shape)}; expected "
                    f"({x.shape[0]}, {self.num_outputs}) = (batch, units{' + zero unit' if self.zero_unit else ''})"
                )
            weights = self.scorer(logits.float())
            # In-place updates only without autograd, never into the caller's tensor, and not
            # into a tensor the controller keeps in its state.
            if mode == "sparse":
                inplace = x is not source and not torch.is_grad_enabled() and not shares_memory(x, state)
                x = sparse_forward(self.units, x, weights, j, inplace, self._check)  # never compiled (nn/dispatch.py)
            else:
                x = self._dense(x, weights, j, fused=mode == "fused")
            all_logits.append(logits)
            all_weights.append(weights)
        if not return_routing:
            return x
        routing = Routing(torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1), self.zero_unit, hard=self.scorer.sparse)
        return x, routing

    def extra_repr(self) -> str:
        return (
            f"units={len(self.units)}, iterations={self.iterations}, zero_unit={self.zero_unit}, "
            f"execution={self.execution!r}, train_execution={self.train_execution!r}"
        )
