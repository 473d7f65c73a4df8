"""Fused dense evaluation of a pool of BasicBlock units.

With a dense scorer (``softmax``, ``gumbel_softmax``) every unit runs on every
sample at every iteration, and the reference loop evaluates the n units one by
one: 2n narrow convolutions, 2n BatchNorms. :func:`fused_forward` evaluates the
whole pool at once:

1. one wide conv: the n ``conv1`` weights concatenated along the output
   channels, (n*C, C, 3, 3), so ``x`` is read once and the GEMM is n times wider;
2. one BatchNorm over the n*C channels with the n units' BN copies for this
   iteration (``unit.bn1.norm_for(iteration)``), their affine parameters and
   running statistics concatenated;
3. ReLU;
4. one grouped conv (``groups=n``) with the n ``conv2`` weights;
5. one BatchNorm over n*C channels with the ``bn2`` copies;
6. the weighted sum ``sum_r w_r F_r(x)``: reshape to (B, n, C, H, W), weight, sum.

The result equals the reference loop up to float rounding in train and eval
mode, gradients included. In train mode every unit's BatchNorm gets exactly
the running-statistics update the loop would give it: ``running_mean``,
``running_var`` (unbiased batch variance), ``num_batches_tracked``, with each
BN's own ``momentum`` (``None`` = cumulative average, factor
``1 / num_batches_tracked``). The statistics come from the native BatchNorm
kernel run on a concatenated copy of the buffers, which are then written back
to the units without autograd.

The parameters are concatenated at every call (autograd sends the gradients
back to each unit's tensors; nothing is cached, so in-place optimizer updates
and ``load_state_dict`` are always seen). The cost is a copy of the pool's
conv weights, small next to the convolutions (see ``docs/benchmarks.md``).

The code is free of data-dependent Python control flow and host syncs, so it
compiles with ``torch.compile(fullgraph=True)``.

Limits: module hooks registered on the units or their sub-modules do not fire,
because the units' ``forward`` is not called (``resetnet.profile.count_invocations``
therefore counts nothing for a fused pool; use ``execution="naive"`` or
``"sparse"`` to profile per-unit calls).
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
        and conv.in_channels == channels
        and conv.out_channels == channels
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
    )


def _plain_bn(bn: nn.Module, channels: int) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and type(bn).forward is nn.BatchNorm2d.forward and bn.num_features == channels


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
    if not units:
        return False
    first = units[0]
    if not isinstance(first, BasicBlock):
        return False
    channels = first.channels
    bn_iterations = first.bn1.iterations if isinstance(first.bn1, IterationBatchNorm2d) else None
    seen: set[int] = set()
    norms: list[nn.Module] = []
    for unit in units:
        if not isinstance(unit, BasicBlock) or type(unit).forward is not BasicBlock.forward:
            return False
        if unit.channels != channels or id(unit) in seen:
            return False
        seen.add(id(unit))
        if not (_plain_conv3x3(unit.conv1, channels) and _plain_conv3x3(unit.conv2, channels)):
            return False
        for bn in (unit.bn1, unit.bn2):
            if not isinstance(bn, IterationBatchNorm2d) or type(bn).forward is not IterationBatchNorm2d.forward:
                return False
            if bn.iterations != bn_iterations:
                return False
            norms.extend(bn.norms)
    if len({id(bn) for bn in norms}) != len(norms):
        return False
    ref = norms[0]
    for bn in norms:
        if not _plain_bn(bn, channels):
            return False
        if bn.eps != ref.eps or bn.affine != ref.affine or bn.track_running_stats != ref.track_running_stats:
            return False
    return True


def _fused_batch_norm(norms: list[nn.BatchNorm2d], h: torch.Tensor) -> torch.Tensor:
    """BatchNorm of (B, n*C, H, W) with n BatchNorm2d(C) modules that share one training mode."""
    ref = norms[0]
    weight = torch.cat([bn.weight for bn in norms]) if ref.affine else None
    bias = torch.cat([bn.bias for bn in norms]) if ref.affine else None
    tracked = ref.track_running_stats and ref.running_mean is not None
    if not ref.training:
        if tracked:
            mean = torch.cat([bn.running_mean for bn in norms])
            var = torch.cat([bn.running_var for bn in norms])
            return F.batch_norm(h, mean, var, weight, bias, False, 0.0, ref.eps)
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, ref.eps)  # batch statistics, nothing to update
    if not tracked:
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, ref.eps)

    means = [bn.running_mean for bn in norms]
    variances = [bn.running_var for bn in norms]
    counters = [bn.num_batches_tracked for bn in norms]
    with torch.no_grad():  # as nn.BatchNorm2d: num_batches_tracked += 1 before the update
        torch._foreach_add_(counters, 1)
    momentum = ref.momentum
    if momentum is not None and all(bn.momentum == momentum for bn in norms):
        # Common case: one momentum. The kernel updates a concatenated copy exactly as it
        # would update each unit's buffers (unbiased variance); copy the slices back.
        run_mean = torch.cat(means)
        run_var = torch.cat(variances)
        out = F.batch_norm(h, run_mean, run_var, weight, bias, True, momentum, ref.eps)
        with torch.no_grad():
            _copy_back(means, run_mean)
            _copy_back(variances, run_var)
        return out

    # Per-BN factors (momentum=None: cumulative average 1/num_batches_tracked, or mixed
    # momenta). Momentum 1 makes the kernel write the batch mean and unbiased batch
    # variance into fresh buffers; then running += factor * (batch - running) per BN.
    n_ch = h.shape[1]
    batch_mean = h.new_zeros(n_ch, dtype=means[0].dtype)
    batch_var = h.new_ones(n_ch, dtype=variances[0].dtype)
    out = F.batch_norm(h, batch_mean, batch_var, weight, bias, True, 1.0, ref.eps)
    with torch.no_grad():
        channels = ref.num_features
        for i, bn in enumerate(norms):
            if bn.momentum is None:
                factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
            else:
                factor = bn.momentum
            sl = slice(i * channels, (i + 1) * channels)
            bn.running_mean.lerp_(batch_mean[sl], factor)
            bn.running_var.lerp_(batch_var[sl], factor)
    return out


def _copy_back(buffers: list[torch.Tensor], fused: torch.Tensor) -> None:
    torch._foreach_copy_(buffers, list(fused.split(buffers[0].shape[0])))


def bn_modes_agree(units: Sequence[nn.Module], iteration: int) -> bool:
    """Whether every BatchNorm the pool uses at ``iteration`` is in the same (train/eval) mode.

    A partly frozen pool (frozen BatchNorm statistics in some units) cannot share one fused
    BatchNorm call; ReSet evaluates such a pool unit by unit.
    """
    modes = {u.bn1.norm_for(iteration).training for u in units} | {u.bn2.norm_for(iteration).training for u in units}
    return len(modes) == 1


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
    batch, channels, height, width = x.shape
    if channels != units[0].channels:
        raise ValueError(f"fused pool of {units[0].channels}-channel units got an input with {channels} channels")
    if weights.shape != (batch, n):
        raise ValueError(f"fused_forward needs weights of shape ({batch}, {n}), got {tuple(weights.shape)}")
    norms1 = [u.bn1.norm_for(iteration) for u in units]
    norms2 = [u.bn2.norm_for(iteration) for u in units]
    if not bn_modes_agree(units, iteration):
        raise ValueError("fused_forward needs every unit BatchNorm in one mode (train or eval); evaluate a partly frozen pool unit by unit")

    w1 = torch.cat([u.conv1.weight for u in units])  # (n*C, C, 3, 3)
    w2 = torch.cat([u.conv2.weight for u in units])  # (n*C, C, 3, 3), groups=n
    h = F.conv2d(x, w1, None, 1, 1)
    h = F.relu(_fused_batch_norm(norms1, h), inplace=True)  # BN's backward does not need its output
    h = F.conv2d(h, w2, None, 1, 1, 1, n)
    h = _fused_batch_norm(norms2, h)
    y = h.unflatten(1, (n, channels))  # (B, n, C, H, W); a view, also for channels_last
    return (y * weights.to(y.dtype).view(batch, n, 1, 1, 1)).sum(1)
