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


def _shares_memory(x: torch.Tensor, obj: Any) -> bool:
    """Whether ``obj`` (a tensor or a tuple/list/dict of them, e.g. a controller state) holds x's memory."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    if isinstance(obj, (tuple, list)):
        return any(_shares_memory(x, o) for o in obj)
    if isinstance(obj, dict):
        return any(_shares_memory(x, o) for o in obj.values())
    return False


def _nhwc(x: torch.Tensor) -> bool:
    """Whether ``x`` is a (strictly) channels_last 4-D tensor: contiguous once seen as (B, H, W, C)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` (dim 0), in x's memory format.

    The row kernels are several times slower on a strided layout, so a channels_last
    ``x`` is indexed as the contiguous (B, H, W, C) tensor it is in memory.
    """
    if _nhwc(x):
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


def _add_rows_(out: torch.Tensor, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``out[index] += source`` in place (rows along dim 0); fast for contiguous and channels_last ``out``."""
    if _nhwc(out):
        source = source.contiguous(memory_format=torch.channels_last)
        out.permute(0, 2, 3, 1).index_add_(0, index, source.permute(0, 2, 3, 1))
    else:
        out.index_add_(0, index, source)
    return out


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
    def _naive(self, x: torch.Tensor, w: torch.Tensor, iteration: int, inplace: bool = False) -> torch.Tensor:
        delta = torch.zeros_like(x)
        for r, unit in enumerate(self.units):
            y = call_unit(unit, x, iteration)
            self._check(r, unit, x, y)
            delta = delta + w[:, r].view(-1, 1, 1, 1).to(y.dtype) * y
        return x + delta

    def _sparse(self, x: torch.Tensor, w: torch.Tensor, iteration: int, inplace: bool) -> torch.Tensor:
        # The routing is read on the host once per iteration (one device sync). A unit
        # chosen by no sample is not called at all; a unit chosen by every sample runs on
        # the batch as is; the other units run on their sub-batches, gathered from x with
        # one index_select. Each output is added only to the rows of its samples
        # (index_add), so the samples that chose the zero unit cost no arithmetic and no
        # memory traffic in the update. Without autograd (``inplace``) the update is
        # written into x itself (x is then a tensor of ours, never the caller's input);
        # with autograd the first addition makes a new tensor and the others go into it.
        # When the weights need no gradient and every non-zero weight is exactly 1 (arg-max
        # one-hot routing), no weight is multiplied in (1 * y == y exactly). A unit's output
        # is never written in place.
        n = len(self.units)
        batch = x.shape[0]
        host = w[:, :n].detach().cpu()  # (B, n) on the host
        active = host != 0
        # (unit, sample) of every non-zero weight, sorted by unit then sample: one nonzero call.
        unit_of, rows = active.t().nonzero(as_tuple=True)
        counts = torch.bincount(unit_of, minlength=n).tolist()
        # Arg-max one-hot routing: every non-zero weight is exactly 1 and is not multiplied in.
        ones = not (w.requires_grad and torch.is_grad_enabled()) and bool(((host == 1) | ~active).all())

        def weighted(r: int, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
            if ones:
                return y
            column = w[:, r] if index is None else w[:, r].index_select(0, index)
            return column.view(-1, 1, 1, 1).to(y.dtype) * y

        # Every unit output is computed before x is updated (the units read x).
        updates: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (contribution, rows or None = all)
        for r in range(n):
            if counts[r] == batch:
                unit = self.units[r]
                y = call_unit(unit, x, iteration)
                self._check(r, unit, x, y)
                updates.append((weighted(r, y, None), None))
        partial = [r for r in range(n) if 0 < counts[r] < batch]
        if partial:
            if updates:  # keep only the rows of the partial units (rows are grouped by unit)
                rows = torch.cat([part for c, part in zip(counts, rows.split(counts)) if 0 < c < batch])
            index = rows.to(x.device, non_blocking=True)
            sizes = [counts[r] for r in partial]
            gathered = _take(x, index)
            for r, sub, sub_index in zip(partial, gathered.split(sizes), index.split(sizes)):
                unit = self.units[r]
                y = call_unit(unit, sub, iteration)
                self._check(r, unit, sub, y)
                updates.append((weighted(r, y, sub_index), sub_index))
        if not updates:
            return x  # every sample chose the zero unit
        dtype = x.dtype
        for contrib, _ in updates:
            dtype = torch.promote_types(dtype, contrib.dtype)
        # x is updated in place only if no contribution shares its memory (a unit may return its input).
        owned = inplace and dtype == x.dtype and not _shares_memory(x, [c for c, _ in updates])
        out = x
        for contrib, sub_index in updates:
            contrib = contrib.to(dtype)
            if sub_index is None:
                out = out.add_(contrib) if owned else out.to(dtype) + contrib
            else:
                if not owned:  # a copy of ours, in x's memory format (index_add would make it contiguous)
                    out = out.to(dtype=dtype, memory_format=torch.preserve_format, copy=True)
                out = _add_rows_(out, sub_index, contrib)
            owned = True
        return out

    def _fused(self, x: torch.Tensor, w: torch.Tensor, iteration: int, inplace: bool = False) -> torch.Tensor:
        from .fused import fused_forward

        return x + fused_forward(self.units, x, w[:, : len(self.units)], iteration)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, return_routing: bool = False, execution: str | None = None):
        """Run Algorithm 1. Returns ``x`` or, with ``return_routing=True``, ``(x, Routing)``."""
        if x.dim() != 4:
            raise ValueError(f"ReSet expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        mode = self.resolve_execution(execution)
        # Each returns the updated x; only sparse uses ``inplace`` (the dense modes always allocate).
        apply = {"naive": self._naive, "sparse": self._sparse, "fused": self._fused}[mode]
        if mode == "sparse" and torch.compiler.is_compiling():
            # Sparse dispatch is data-dependent (host-read routing, sub-batch shapes that change
            # every batch); under torch.compile it runs eagerly, the rest of the model compiles.
            # (Compiled with inductor it recompiled per sub-batch shape and, in torch 2.13 on
            # CPU, corrupted the heap; see docs/execution.md.)
            apply = _eager_sparse.__get__(self)
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
            inplace = mode == "sparse" and x is not source and not torch.is_grad_enabled() and not _shares_memory(x, state)
            x = apply(x, weights, j, inplace)
            all_logits.append(logits)
            all_weights.append(weights)
        if not return_routing:
            return x
        routing = Routing(torch.stack(all_logits, dim=1), torch.stack(all_weights, dim=1), self.zero_unit)
        return x, routing

    def extra_repr(self) -> str:
        return f"units={len(self.units)}, iterations={self.iterations}, zero_unit={self.zero_unit}, execution={self.execution!r}"


_eager_sparse = torch.compiler.disable(ReSet._sparse, recursive=True)
