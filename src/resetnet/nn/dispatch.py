"""Sparse dispatch (``execution="sparse"``): each unit runs only on the samples that gave it a non-zero weight.

One ReSet iteration under a hard scorer (``gumbel_st``, ``topk``), shaped like a sparse
mixture-of-experts block: :func:`plan_dispatch` reads the routing on the host (one device
sync per iteration) and groups the samples by unit with one ``nonzero``; :func:`sparse_forward`
gathers each partial unit's rows (``index_select``), runs it, and adds its output to those
rows only (``index_add_``), so samples that chose the zero unit cost nothing. The plan is
data-dependent, so :func:`sparse_forward` runs eagerly under ``torch.compile``. Details
(in-place updates, one-hot weights, channels_last): docs/execution.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DispatchPlan", "plan_dispatch", "sparse_forward", "shares_memory", "call_unit"]


def call_unit(unit: nn.Module, x: torch.Tensor, iteration: int) -> torch.Tensor:
    """Apply a unit; iteration-aware units (``takes_iteration = True``) get the iteration index."""
    if getattr(unit, "takes_iteration", False):
        return unit(x, iteration=iteration)
    return unit(x)


def shares_memory(x: torch.Tensor, obj: Any) -> bool:
    """Whether ``obj`` (a tensor or a tuple/list/dict of them, e.g. a controller state) holds x's memory."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return isinstance(obj, (tuple, list)) and any(shares_memory(x, o) for o in obj)


def _nhwc(x: torch.Tensor) -> bool:
    """Whether ``x`` is a (strictly) channels_last 4-D tensor: contiguous once seen as (B, H, W, C)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``x`` in x's memory format (the row kernels are slow on strided layouts)."""
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


@dataclass
class DispatchPlan:
    """Which unit runs on which samples in one iteration.

    Attributes:
        full: units chosen by every sample (run on the whole batch).
        partial: units chosen by some samples, in unit order.
        sizes: the sub-batch size of each partial unit.
        rows: the partial units' sample indices, grouped by unit (on x's device), or None.
        ones: every non-zero weight is exactly 1 and needs no gradient (weights are not multiplied in).
    """

    full: list[int]
    partial: list[int]
    sizes: list[int]
    rows: torch.Tensor | None
    ones: bool


def plan_dispatch(w: torch.Tensor, num_units: int, device: torch.device) -> DispatchPlan:
    """The plan for unit weights ``w`` (B, >= num_units); the zero unit's column, if any, is ignored."""
    batch = w.shape[0]
    host = w[:, :num_units].detach().cpu()
    active = host != 0
    unit_of, rows = active.t().nonzero(as_tuple=True)  # sorted by unit, then sample
    counts = torch.bincount(unit_of, minlength=num_units).tolist()
    ones = not (w.requires_grad and torch.is_grad_enabled()) and bool(((host == 1) | ~active).all())
    full = [r for r in range(num_units) if counts[r] == batch]
    partial = [r for r in range(num_units) if 0 < counts[r] < batch]
    if not partial:
        return DispatchPlan(full, [], [], None, ones)
    if full:  # keep only the partial units' rows
        rows = torch.cat([part for c, part in zip(counts, rows.split(counts)) if 0 < c < batch])
    return DispatchPlan(full, partial, [counts[r] for r in partial], rows.to(device, non_blocking=True), ones)


@torch.compiler.disable(recursive=True)
def sparse_forward(
    units: Sequence[nn.Module],
    x: torch.Tensor,
    w: torch.Tensor,
    iteration: int,
    inplace: bool,
    check: Callable[[int, torch.Tensor, torch.Tensor], None],
) -> torch.Tensor:
    """``x + sum_r w_r F_r(x)``, each unit evaluated only on the samples with a non-zero weight; never compiled.

    ``inplace``: the update may be written into ``x`` (the caller owns ``x`` and autograd is off);
    a unit's output is never written. ``check(r, input, output)`` validates a unit's output
    (ReSet raises on a shape change).
    """
    plan = plan_dispatch(w, len(units), x.device)

    def weighted(r: int, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if plan.ones:
            return y
        column = w[:, r] if index is None else w[:, r].index_select(0, index)
        return column.view(-1, 1, 1, 1).to(y.dtype) * y

    # Every unit output is computed before x is updated (the units read x).
    updates: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (contribution, rows or None = all)
    for r in plan.full:
        y = call_unit(units[r], x, iteration)
        check(r, x, y)
        updates.append((weighted(r, y, None), None))
    if plan.partial:
        gathered = _take(x, plan.rows)
        for r, sub, index in zip(plan.partial, gathered.split(plan.sizes), plan.rows.split(plan.sizes)):
            y = call_unit(units[r], sub, iteration)
            check(r, sub, y)
            updates.append((weighted(r, y, index), index))
    if not updates:
        return x  # every sample chose the zero unit
    dtype = functools.reduce(torch.promote_types, [c.dtype for c, _ in updates], x.dtype)
    # x is updated in place only if no contribution shares its memory (a unit may return its input).
    owned = inplace and dtype == x.dtype and not shares_memory(x, [c for c, _ in updates])
    out = x
    for contrib, index in updates:
        contrib = contrib.to(dtype)
        if index is None:
            out = out.add_(contrib) if owned else out.to(dtype) + contrib
        else:
            if not owned:  # a copy of ours, in x's memory format (index_add would make it contiguous)
                out = out.to(dtype=dtype, memory_format=torch.preserve_format, copy=True)
            out = _add_rows_(out, index, contrib)
        owned = True
    return out
