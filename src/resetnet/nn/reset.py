"""The ReSet module: a pool of computational units routed by a controller (Algorithm 1)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .controllers import build_controller
from .routing import Routing
from .scorers import Scorer, TopKScorer, build_scorer

EXECUTION_MODES = ("auto", "naive", "sparse", "fused")


def call_unit(unit: nn.Module, x: torch.Tensor, iteration: int) -> torch.Tensor:
    """Apply a unit; iteration-aware units (``takes_iteration = True``) get the iteration index."""
    if getattr(unit, "takes_iteration", False):
        return unit(x, iteration=iteration)
    return unit(x)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x``: index_select (the faster kernel) or, for a channels_last x, x[index] (keeps the layout)."""
    return x.index_select(0, index) if x.is_contiguous() else x[index]


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
        execution: how the units are evaluated: ``"naive"`` (every unit on the full
            batch, weights multiplied in; the reference), ``"sparse"`` (each unit runs
            only on the samples that gave it a non-zero weight), ``"fused"`` (all
            units in one wide/grouped conv; BasicBlock pools only) or ``"auto"``:
            sparse for scorers that output exact zeros (``gumbel_st``, ``topk``),
            fused for dense scorers when the pool can be fused, naive otherwise.
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
        if execution not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {execution!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        self.units = nn.ModuleList(units)
        self.iterations = iterations
        self.zero_unit = bool(zero_unit)
        self.num_outputs = len(units) + int(self.zero_unit)
        self.execution = execution

        scorer_options: dict[str, Any] = {}
        if temperature is not None:
            scorer_options["temperature"] = temperature
        if k is not None:
            scorer_options["k"] = k
        if isinstance(scorer, str) and scorer == "topk":
            kk = scorer_options.setdefault("k", 1)
            if kk > len(units):
                raise ValueError(f"top-k scorer with k={kk} needs at least k units; the pool has {len(units)}")
        elif isinstance(scorer, str) and k is not None:
            raise ValueError(f"k={k} is only valid with scorer='topk', not {scorer!r}")
        if isinstance(scorer, str) and scorer in ("softmax",) and temperature is not None:
            raise ValueError("temperature is only valid with the Gumbel scorers")
        self.scorer = build_scorer(scorer, **scorer_options)
        if isinstance(self.scorer, TopKScorer) and self.scorer.k > len(units):
            raise ValueError(f"top-k scorer with k={self.scorer.k} needs at least k units; the pool has {len(units)}")

        if isinstance(controller, str) and channels is None:
            raise ValueError(f"controller {controller!r} needs channels=C (the representation's channels)")
        self.controller = build_controller(controller, channels or 0, self.num_outputs, iterations, **(controller_options or {}))

    # ----------------------------------------------------------------- helpers
    def resolve_execution(self, execution: str | None = None) -> str:
        """The concrete execution mode for a call (``auto`` resolved; see the class docstring)."""
        mode = execution or self.execution
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {mode!r}; valid modes: {', '.join(EXECUTION_MODES)}")
        if mode != "auto":
            if mode == "fused" and not self.can_fuse():
                raise ValueError("execution='fused' needs a pool of BasicBlock units of one width; use 'naive' or 'sparse'")
            return mode
        if self.scorer.sparse:
            return "sparse"
        return "fused" if self.can_fuse() else "naive"

    def can_fuse(self) -> bool:
        from .fused import can_fuse

        return can_fuse(self.units)

    def _check(self, r: int, unit: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if y.shape != x.shape:
            raise ValueError(
                f"ReSet unit {r} ({type(unit).__name__}) changed the shape from {tuple(x.shape)} to "
                f"{tuple(y.shape)}; every unit must map (B, C, H, W) to the same shape"
            )

    # ----------------------------------------------------------- executions
    def _naive(self, x: torch.Tensor, w: torch.Tensor, iteration: int) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for r, unit in enumerate(self.units):
            y = call_unit(unit, x, iteration)
            self._check(r, unit, x, y)
            delta = delta + w[:, r].view(-1, 1, 1, 1).to(y.dtype) * y
        return delta

    def _sparse(self, x: torch.Tensor, w: torch.Tensor, iteration: int) -> torch.Tensor:
        # The routing is read on the host once per iteration (one device sync). A unit
        # chosen by no sample is not called at all; a unit chosen by every sample runs on
        # the batch as is; the other units run on their sub-batches, gathered from x with
        # one index_select. When every sample chose at most one unit (hard routing), the
        # update is assembled with one cat and one index_select (a zero row for the samples
        # that chose the zero unit); otherwise the weighted outputs are summed with index_add_.
        # When the weights need no gradient, weights of exactly 1 (arg-max one-hot routing)
        # are not multiplied in (1 * y == y exactly). A unit's output is never written in place.
        n = len(self.units)
        batch = x.shape[0]
        host = w[:, :n].detach().t().cpu()  # (n, B) on the host
        active = host != 0
        counts = active.sum(dim=1).tolist()
        if w.requires_grad and torch.is_grad_enabled():
            unit_ones = [False] * n
        else:
            unit_ones = ((host == 1) | ~active).all(dim=1).tolist()

        def weighted(r: int, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
            if unit_ones[r]:
                return y
            column = w[:, r] if index is None else w[:, r].index_select(0, index)
            return column.view(-1, 1, 1, 1).to(y.dtype) * y

        delta: torch.Tensor | None = None
        owned = False  # whether delta is a buffer of ours (in-place updates allowed)
        full = [r for r in range(n) if counts[r] == batch]
        partial = [r for r in range(n) if 0 < counts[r] < batch]
        for r in full:
            unit = self.units[r]
            y = call_unit(unit, x, iteration)
            self._check(r, unit, x, y)
            contrib = weighted(r, y, None)
            if delta is None:
                delta = contrib.to(torch.promote_types(x.dtype, contrib.dtype))
                owned = delta is not y  # a fresh product (or cast) is ours; the unit's output is not
            elif owned:
                delta.add_(contrib)
            else:
                delta, owned = delta + contrib, True
        if not partial:
            return delta if delta is not None else torch.zeros_like(x)  # None: every sample chose the zero unit

        rows = torch.cat([active[r].nonzero().squeeze(1) for r in partial])  # host: the sample of each gathered row
        index = rows.to(x.device, non_blocking=True)
        gathered = _take(x, index)
        sizes = [counts[r] for r in partial]
        contribs = []
        for r, sub, sub_index in zip(partial, gathered.split(sizes), index.split(sizes)):
            unit = self.units[r]
            y = call_unit(unit, sub, iteration)
            self._check(r, unit, sub, y)
            contribs.append(weighted(r, y, sub_index))
        dtype = torch.promote_types(x.dtype, contribs[0].dtype)
        contribs = [c.to(dtype) for c in contribs]
        if delta is None and int(active.sum(dim=0).max()) <= 1:
            # Each sample chose at most one unit: pick each sample's row (or a zero row).
            if rows.numel() < batch:
                contribs.append(torch.zeros_like(contribs[0][:1]))
            source = torch.full((batch,), rows.numel(), dtype=torch.long)
            source[rows] = torch.arange(rows.numel())
            return _take(torch.cat(contribs), source.to(x.device, non_blocking=True))
        stacked = torch.cat(contribs)
        if delta is None:
            delta, owned = torch.zeros_like(x, dtype=dtype), True
        if owned:
            return delta.index_add_(0, index, stacked.to(delta.dtype))
        return delta.index_add(0, index, stacked.to(delta.dtype))

    def _fused(self, x: torch.Tensor, w: torch.Tensor, iteration: int) -> torch.Tensor:
        from .fused import fused_forward

        return fused_forward(self.units, x, w[:, : len(self.units)], iteration)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, return_routing: bool = False, execution: str | None = None):
        """Run Algorithm 1. Returns ``x`` or, with ``return_routing=True``, ``(x, Routing)``."""
        if x.dim() != 4:
            raise ValueError(f"ReSet expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        mode = self.resolve_execution(execution)
        apply = {"naive": self._naive, "sparse": self._sparse, "fused": self._fused}[mode]
        init = getattr(self.controller, "initial_state", None)
        state = init(x) if init is not None else None  # C.reset_state()
        all_logits, all_weights = [], []
        for j in range(self.iterations):
            logits, state = self.controller(x, j, state)
            if logits.shape != (x.shape[0], self.num_outputs):
                raise ValueError(
                    f"controller returned logits of shape {tuple(logits.shape)}; expected "
                    f"({x.shape[0]}, {self.num_outputs}) = (batch, units{' + zero unit' if self.zero_unit else ''})"
                )
            weights = self.scorer(logits.float())
            x = x + apply(x, weights, j)
            all_logits.append(logits)
            all_weights.append(weights)
        if not return_routing:
            return x
        routing = Routing(torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1), self.zero_unit)
        return x, routing

    def extra_repr(self) -> str:
        return f"units={len(self.units)}, iterations={self.iterations}, zero_unit={self.zero_unit}, execution={self.execution!r}"
