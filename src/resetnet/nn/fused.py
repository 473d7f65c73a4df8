"""Fused dense evaluation of a pool of BasicBlock units (``execution="fused"``).

The reference loop runs the n units one by one (2n narrow convs, 2n BatchNorms).
:func:`fused_forward` runs them at once: one conv with the n ``conv1`` weights
concatenated, (n*C, C, 3, 3); one BatchNorm over n*C channels with the units' BN copies
of this iteration; ReLU; one grouped conv (``groups=n``) with the ``conv2`` weights; one
BatchNorm; the weighted sum ``sum_r w_r F_r(x)``. It equals the loop up to float
rounding, gradients and running-statistics updates included, and compiles with
``torch.compile(fullgraph=True)``. Parameters are concatenated at every call (no cache).
The units' ``forward`` is not called, so hooks on them do not fire. See docs/execution.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock
from .norm import IterationBatchNorm2d


def _plain_conv3x3(conv: nn.Module, channels: int) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and conv.bias is None
        and (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        == (channels, channels, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
    )


def can_fuse(units: Sequence[nn.Module]) -> bool:
    """Whether :func:`fused_forward` can evaluate ``units``.

    True for a non-empty pool of distinct :class:`~resetnet.nn.BasicBlock` units
    (``forward`` not overridden) with one channel count C, one ``bn_iterations``,
    plain 3x3 stride-1 bias-free convolutions, and BatchNorms that agree on
    ``eps``, ``affine`` and ``track_running_stats`` (``momentum`` may differ).
    No BatchNorm may be shared between units (their running statistics are
    updated from one concatenated buffer).
    """
    units = list(units)
    if not units or len({id(u) for u in units}) != len(units):
        return False
    if not all(isinstance(u, BasicBlock) and type(u).forward is BasicBlock.forward for u in units):
        return False
    channels = units[0].channels
    iterations = {bn.iterations if isinstance(bn, IterationBatchNorm2d) else None for u in units for bn in (u.bn1, u.bn2)}
    if len(iterations) != 1 or None in iterations:
        return False
    if not all(u.channels == channels and _plain_conv3x3(u.conv1, channels) and _plain_conv3x3(u.conv2, channels) for u in units):
        return False
    if any(type(bn).forward is not IterationBatchNorm2d.forward for u in units for bn in (u.bn1, u.bn2)):
        return False
    norms = [norm for u in units for bn in (u.bn1, u.bn2) for norm in bn.norms]
    ref = norms[0]
    return len({id(bn) for bn in norms}) == len(norms) and all(
        isinstance(bn, nn.BatchNorm2d)
        and type(bn).forward is nn.BatchNorm2d.forward
        and (bn.num_features, bn.eps, bn.affine, bn.track_running_stats) == (channels, ref.eps, ref.affine, ref.track_running_stats)
        for bn in norms
    )


def _fused_batch_norm(norms: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    """BatchNorm of (B, n*C, H, W) with n BatchNorm2d(C) modules that share one training mode."""
    ref = norms[0]
    weight = torch.cat([bn.weight for bn in norms]) if ref.affine else None
    bias = torch.cat([bn.bias for bn in norms]) if ref.affine else None
    if not (ref.track_running_stats and ref.running_mean is not None):
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, ref.eps)  # batch statistics, nothing to update
    means = [bn.running_mean for bn in norms]
    variances = [bn.running_var for bn in norms]
    if not ref.training:
        return F.batch_norm(h, torch.cat(means), torch.cat(variances), weight, bias, False, 0.0, ref.eps)

    with torch.no_grad():  # as nn.BatchNorm2d: num_batches_tracked += 1 before the update
        torch._foreach_add_([bn.num_batches_tracked for bn in norms], 1)
    momentum = ref.momentum
    if momentum is not None and all(bn.momentum == momentum for bn in norms):
        # One momentum: the kernel updates a concatenated copy exactly as it would update
        # each unit's buffers (unbiased variance); copy the slices back.
        run_mean = torch.cat(means)
        run_var = torch.cat(variances)
        out = F.batch_norm(h, run_mean, run_var, weight, bias, True, momentum, ref.eps)
        with torch.no_grad():
            torch._foreach_copy_(means + variances, [*run_mean.split(ref.num_features), *run_var.split(ref.num_features)])
        return out

    # Per-BN factors (momentum=None: cumulative average 1/num_batches_tracked, or mixed momenta).
    # Momentum 1 makes the kernel write the batch mean and unbiased batch variance into fresh
    # buffers; then running += factor * (batch - running) per BN.
    batch_mean = h.new_zeros(h.shape[1], dtype=means[0].dtype)
    batch_var = h.new_ones(h.shape[1], dtype=variances[0].dtype)
    out = F.batch_norm(h, batch_mean, batch_var, weight, bias, True, 1.0, ref.eps)
    with torch.no_grad():
        for bn, mean, var in zip(norms, batch_mean.split(ref.num_features), batch_var.split(ref.num_features)):
            factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype) if bn.momentum is None else bn.momentum
            bn.running_mean.lerp_(mean, factor)
            bn.running_var.lerp_(var, factor)
    return out


def bn_modes_agree(units: Sequence[nn.Module], iteration: int) -> bool:
    """Whether every BatchNorm the pool uses at ``iteration`` is in the same (train/eval) mode.

    A partly frozen pool (frozen BatchNorm statistics in some units) cannot share one fused
    BatchNorm call; ReSet evaluates such a pool unit by unit.
    """
    return len({bn.norm_for(iteration).training for u in units for bn in (u.bn1, u.bn2)}) == 1


def fused_forward(units: Sequence[nn.Module], x: torch.Tensor, weights: torch.Tensor, iteration: int) -> torch.Tensor:
    """``sum_r weights[:, r] * F_r(x)`` for a fusable pool (see :func:`can_fuse`), all units at once.

    Args:
        units: the n BasicBlock units.
        x: (B, C, H, W) input.
        weights: (B, n) unit weights (the zero unit excluded).
        iteration: ReSet iteration j; selects each unit's BN copy ``norm_for(j)``.

    Returns:
        (B, C, H, W) weighted sum of the unit outputs. The units' BatchNorms must all be in
        one mode (:func:`bn_modes_agree`).
    """
    units = list(units)
    n = len(units)
    if x.dim() != 4:
        raise ValueError(f"fused_forward expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    batch, channels = x.shape[:2]
    if channels != units[0].channels:
        raise ValueError(f"fused pool of {units[0].channels}-channel units got an input with {channels} channels")
    if weights.shape != (batch, n):
        raise ValueError(f"fused_forward needs weights of shape ({batch}, {n}), got {tuple(weights.shape)}")
    if not bn_modes_agree(units, iteration):
        raise ValueError("fused_forward needs every unit BatchNorm in one mode (train or eval); evaluate a partly frozen pool unit by unit")

    w1 = torch.cat([u.conv1.weight for u in units])  # (n*C, C, 3, 3)
    w2 = torch.cat([u.conv2.weight for u in units])  # (n*C, C, 3, 3), groups=n
    h = F.conv2d(x, w1, None, 1, 1)
    h = F.relu(_fused_batch_norm([u.bn1.norm_for(iteration) for u in units], h), inplace=True)  # BN's backward does not need its output
    h = F.conv2d(h, w2, None, 1, 1, 1, n)
    h = _fused_batch_norm([u.bn2.norm_for(iteration) for u in units], h)
    y = h.unflatten(1, (n, channels))  # (B, n, C, H, W); a view, also for channels_last
    return (y * weights.to(y.dtype).view(batch, n, 1, 1, 1)).sum(1)
