"""Data-parallel training: ``torchrun`` processes, a ``torch.distributed`` group and DDP (see ``docs/distributed.md``).

:func:`init_distributed` joins the job (a single-process context without one, so the same code runs both ways),
:func:`wrap_model` wraps the model in DDP (optionally with SyncBatchNorm), :func:`global_marginal_reduce` makes the entropy
regularizer see the global batch marginal and :func:`evaluate_sharded` splits evaluation over the ranks. Data sharding is
:class:`resetnet.data.DeviceLoader`'s (``rank``, ``world_size``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DEFAULT_TIMEOUT_S", "RankInfo", "DistContext", "SyncBNError", "init_distributed", "env_world_size", "cleanup", "is_main", "barrier"]
__all__ += ["all_reduce_sum", "all_reduce_mean_autograd", "sync_buffers", "unwrap", "has_sparse_routing", "wrap_model", "zero_contribution"]
__all__ += ["global_marginal_reduce", "routing_anchor", "evaluate_sharded", "rank_seed"]

#: Default collective timeout (seconds): a rank that stops answering fails the others after this long instead of hanging them.
DEFAULT_TIMEOUT_S = 600.0


class SyncBNError(ValueError):
    """An invalid SyncBatchNorm request (sparse dispatch, fused evaluation or a CPU model)."""


class RankInfo:
    """``is_main`` and ``distributed`` of a record with ``rank``, ``world_size`` and ``backend``."""

    rank: int
    world_size: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives are in use (a process group with more than one rank)."""
        return self.backend is not None and self.world_size > 1


@dataclass(frozen=True)
class DistContext(RankInfo):
    """Where this process stands in the job: global ``rank``, ``world_size``, ``local_rank`` (selects ``cuda:local_rank``),
    ``device`` and ``backend`` (``"nccl"``/``"gloo"`` with a process group, ``None`` for a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 means a torchrun-style launch."""
    return _env_int("WORLD_SIZE", 1)


def _resolve_device(device: str | torch.device | None, local_rank: int, distributed: bool) -> torch.device:
    auto = device is None or str(device) == "auto"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if auto else torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; use device='cpu'")
    if not distributed:
        return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has {count} visible CUDA device(s); "
            "start at most one process per GPU (torchrun --nproc_per_node <= number of GPUs)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, device: str | torch.device | None = None, backend: str | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (an existing group is reused); return this process's context.

    ``WORLD_SIZE`` <= 1 or unset: a single-process context, nothing initialized. Otherwise ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    and ``MASTER_ADDR``/``MASTER_PORT`` (``env://``) are read; the backend is NCCL on CUDA (the process bound to ``cuda:LOCAL_RANK``)
    and gloo on CPU unless ``backend`` says otherwise. ``device``: ``"cuda"``, ``"cpu"`` or ``None``/``"auto"`` (CUDA if available);
    ``timeout_s`` bounds every collective (a rank that stops answering fails the others instead of hanging them).
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        dev = _resolve_device(device, local_rank, world > 1)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistContext(rank, world, local_rank, dev, dist.get_backend())

    world = env_world_size()
    if world <= 1:
        return DistContext(device=_resolve_device(device, 0, False))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    rank = _env_int("RANK", -1)
    local_rank = _env_int("LOCAL_RANK", -1)
    if not 0 <= rank < world:
        raise RuntimeError(f"WORLD_SIZE={world} needs RANK in [0, {world}); got RANK={os.environ.get('RANK')!r}. Launch with torchrun")
    if local_rank < 0:
        raise RuntimeError("WORLD_SIZE > 1 but LOCAL_RANK is not set; launch with torchrun")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE > 1 but {name} is not set; launch with torchrun (it sets it)")
    dev = _resolve_device(device, local_rank, True)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("the NCCL backend needs CUDA devices; use backend='gloo' on CPU")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=float(timeout_s))
    device_id = dev if backend == "nccl" else None  # binds the communicator to this GPU (barriers know the device)
    dist.init_process_group(backend, init_method="env://", timeout=timeout, world_size=world, rank=rank, device_id=device_id)
    return DistContext(rank, world, local_rank, dev, backend)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (true without a process group)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _active():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it; not autograd-aware (counts, metrics), on this process's GPU for NCCL."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_buffers(module: nn.Module, src: int = 0) -> None:
    """Broadcast every buffer of ``module`` (BatchNorm running statistics, updated by each rank's shard) from rank ``src``."""
    if _active():
        for buf in unwrap(module).buffers():
            dist.broadcast(buf, src)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper; ``model`` itself otherwise."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _reset_modules(model: nn.Module) -> list[nn.Module]:
    from ..nn import ReSet

    return [m for m in unwrap(model).modules() if isinstance(m, ReSet)]


def has_sparse_routing(model: nn.Module) -> bool:
    """Whether some ReSet module of ``model`` trains with sparse dispatch (so a unit can be unused on a rank)."""
    return any(m.resolve_execution(training=True) == "sparse" for m in _reset_modules(model))


def _check_sync_bn(model: nn.Module, device: torch.device) -> None:
    for m in _reset_modules(model):
        if m.train_execution == "fused":
            raise SyncBNError(
                "sync_bn=True with train_execution='fused': fused evaluation runs one BatchNorm kernel over the concatenated statistics "
                "of the pool and cannot synchronise them; use train_execution='auto' or 'naive' (auto falls back to naive once the BNs "
                "are SyncBatchNorm)"
            )
        if m.resolve_execution(training=True) == "sparse":
            raise SyncBNError(
                f"sync_bn=True cannot be combined with sparse dispatch in training (scorer {type(m.scorer).__name__} with "
                f"train_execution={m.train_execution!r}): a unit runs only on the ranks where some sample chose it, SyncBatchNorm "
                "needs every rank to call each BatchNorm the same number of times, and the job would deadlock. Either set "
                "sync_bn=False (each rank normalises a unit's sub-batch with its own statistics) or train with "
                "train_execution='auto' (every unit runs on the whole batch: the paper's straight-through estimator)"
            )
    if device.type != "cuda":
        raise SyncBNError(
            f"sync_bn=True needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernels); this model is on {device.type}. "
            "Train with sync_bn=False on CPU"
        )


def _forbid_sparse_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on ReSet modules of a SyncBN model: catch sparse dispatch chosen at call time."""
    if module.training and module.resolve_execution(kwargs.get("execution")) == "sparse":
        raise SyncBNError(
            "a ReSet module ran with sparse dispatch in training under SyncBatchNorm; this would deadlock (see resetnet.train.distributed.wrap_model)"
        )


def wrap_model(
    model: nn.Module, ctx: DistContext, find_unused: bool | None = None, sync_bn: bool = False, broadcast_buffers: bool = True
) -> nn.Module:
    """``DistributedDataParallel(model)`` (``model`` already on ``ctx.device``); ``model`` itself in a single-process context.

    ``find_unused``: DDP's ``find_unused_parameters``; ``None``: on exactly when some ReSet module uses sparse dispatch (a unit
    no sample of a rank chose gets no gradient there). ``sync_bn``: every ``BatchNorm*d`` (per-iteration copies too) becomes a
    ``SyncBatchNorm`` (state-dict keys unchanged); :class:`SyncBNError` with sparse dispatch (it would deadlock), with
    ``train_execution='fused'`` and on CPU, checked for a single process too. ``broadcast_buffers``: rank 0's buffers are
    broadcast at each training forward (DDP's ``forward_sync_buffers``, ``broadcast_buffers`` before torch 2.13).
    """
    for p in model.parameters():
        if p.device.type != ctx.device.type or (ctx.device.index is not None and p.device.index != ctx.device.index):
            raise ValueError(f"move the model to {ctx.device} before wrap_model (found a parameter on {p.device})")
    if sync_bn:
        _check_sync_bn(model, ctx.device)
    if not ctx.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for m in _reset_modules(model):
            m.register_forward_pre_hook(_forbid_sparse_hook, with_kwargs=True)
    sync: dict[str, Any] = {}
    if not broadcast_buffers:  # the default (True) is passed implicitly: no deprecation warning on torch >= 2.13, no error before
        new = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        sync["forward_sync_buffers" if new else "broadcast_buffers"] = False
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None  # output_device defaults to device_ids[0]
    find_unused = has_sparse_routing(model) if find_unused is None else find_unused
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=bool(find_unused), **sync)


def zero_contribution(model: nn.Module) -> torch.Tensor:
    """``0 * sum of every parameter``: added to the loss, every parameter gets a (zero) gradient. The alternative to
    ``find_unused_parameters=True`` for sparse routing: momentum and weight decay still move an unchosen unit (``docs/benchmarks.md``)."""
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return torch.stack([p.sum() for p in params]).sum() * 0.0


def all_reduce_mean_autograd(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all ranks, differentiable (the backward all-reduces the gradient); ``tensor`` without a group."""
    if not _active():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():  # it warns that it is deprecated in favour of a private module
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated", category=FutureWarning)
        return all_reduce(tensor, op=dist.ReduceOp.SUM) / dist.get_world_size()


def global_marginal_reduce(ctx: DistContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ``marginal_reduce`` of :func:`resetnet.losses.entropy_regularizer` (``None`` for one process): the autograd-aware mean of
    the ranks' batch-mean marginals, so ``H(mean_b y)`` is the global batch's entropy and (equal shards) the step is the single-process one."""
    return all_reduce_mean_autograd if ctx.distributed else None


def routing_anchor(routing: Any) -> torch.Tensor | float:
    """``0 * sum(controller logits)``: keeps every routing output in the loss graph. Under ``find_unused_parameters=True``, a rank
    where every sample chose the zero unit would leave controller parameters that DDP marked as used without a gradient (a hang)."""
    terms = [r.logits.float().sum() for r in routing or ()]
    return torch.stack(terms).sum() * 0.0 if terms else 0.0


@torch.no_grad()
def evaluate_sharded(model: nn.Module, loader: Any, ctx: DistContext, *, amp: bool = False, num_classes: int = 10) -> dict[str, Any]:
    """:func:`resetnet.train.evaluate.evaluate` with the work split over the ranks; same result on every rank.

    Every rank takes rank 0's BatchNorm statistics, evaluates its ``tensor_split`` chunk of every batch, and the per-sample
    results are gathered back in loader order: predictions equal a single-process evaluation, ``loss`` up to summation order.
    """
    from .evaluate import evaluate, iterate_batches, predict, summarize_predictions

    if not ctx.distributed:
        return evaluate(model, loader, amp=amp, num_classes=num_classes)
    import numpy as np

    net = unwrap(model)
    sync_buffers(net)
    sizes: list[int] = []

    def my_chunks():
        for x, y in iterate_batches(loader):
            xs, ys = x.tensor_split(ctx.world_size)[ctx.rank], y.tensor_split(ctx.world_size)[ctx.rank]
            sizes.append(int(ys.shape[0]))
            yield xs, ys

    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, (sizes, *predict(net, my_chunks(), amp=amp)))
    if not gathered[0][0]:
        raise ValueError("evaluate: the loader yielded no batches")
    # Re-interleave: batch b is rank 0's chunk, then rank 1's, ... (tensor_split order).
    offsets = [0] * ctx.world_size
    parts: list[list[np.ndarray]] = [[], [], []]
    for b in range(len(gathered[0][0])):
        for r, (rs, *arrays) in enumerate(gathered):
            for part, a in zip(parts, arrays):
                part.append(a[offsets[r] : offsets[r] + rs[b]])
            offsets[r] += rs[b]
    return summarize_predictions(*(np.concatenate(p) for p in parts), num_classes)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """The Gumbel-noise seed of ``rank`` at ``step`` (ranks > 0 draw their own noise; rank 0 keeps the
    single-process stream), a function of ``(seed, step, rank)`` so that resuming is exact on every rank."""
    h = hashlib.blake2b(f"{seed}|{step}|{rank}|gumbel".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
