"""Evaluation: accuracy with per-sample correctness, MACs under the actual routing, paired timing."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["autocast", "iterate_batches", "evaluate", "predict", "summarize_predictions", "mean_macs", "compare_timing", "count_parameters"]


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; restore their modes afterwards."""
    states = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, s in zip(models, states):
            m.train(s)


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CUDA or CPU) when ``enabled``; a no-op otherwise."""
    device = torch.device(device)
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def iterate_batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One full pass over ``loader`` from its first batch (a :class:`~resetnet.data.DeviceLoader` whatever its iteration state)."""
    yield from (loader.get_batch(0, b) for b in range(len(loader))) if hasattr(loader, "get_batch") else loader


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, amp: bool = False, num_classes: int = 10, flip: bool = False) -> dict[str, Any]:
    """Accuracy of ``model`` (in eval mode, restored afterwards) over one pass of ``loader``: ``acc``, ``loss`` (mean cross-entropy),
    ``n``, ``correct`` (bool array in loader order, for paired tests such as McNemar's), ``predictions`` and ``labels`` (int64),
    ``per_class_acc`` (``num_classes`` fractions; None for a class with no sample). ``flip``: see :func:`predict`."""
    p, t, sample_loss = predict(model, iterate_batches(loader), amp=amp, flip=flip)
    if len(t) == 0:
        raise ValueError("evaluate: the loader yielded no batches")
    return summarize_predictions(p, t, sample_loss, num_classes)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable, *, amp: bool = False, flip: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predictions, labels (int64) and per-sample cross-entropy (float64) over ``(x, y)`` batches, in eval mode (empty ones skipped).
    ``flip``: test-time augmentation, the mean of the logits of each image and its horizontal mirror (not the paper's protocol)."""
    preds, labels, losses = [], [], []
    with _eval_mode(model):
        for x, y in batches:
            if y.shape[0] == 0:
                continue
            with autocast(x.device, amp):
                logits = model(x).float()
                if flip:
                    logits = (logits + model(x.flip(3)).float()) / 2
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            preds.append(logits.argmax(dim=1))
            labels.append(y)

    def cat(parts: list[torch.Tensor], dtype: Any) -> np.ndarray:
        return torch.cat(parts).cpu().numpy().astype(dtype) if parts else np.zeros(0, dtype)

    return cat(preds, np.int64), cat(labels, np.int64), cat(losses, np.float64)


def summarize_predictions(p: np.ndarray, t: np.ndarray, sample_loss: np.ndarray, num_classes: int = 10) -> dict[str, Any]:
    """The :func:`evaluate` dictionary from predictions, labels and per-sample losses."""
    correct = p == t
    loss = float(sample_loss.sum()) / max(len(t), 1)
    per_class = [float(correct[t == c].mean()) if (t == c).any() else None for c in range(num_classes)]
    return dict(acc=float(correct.mean()), loss=loss, n=int(len(t)), correct=correct, predictions=p, labels=t, per_class_acc=per_class)


@torch.no_grad()
def mean_macs(model: nn.Module, loader: Iterable, *, limit: int | None = None) -> float:
    """Mean MACs per image under the routing the model (in eval mode) gives each image."""
    from ..profile import macs_per_image

    total, n = 0.0, 0
    with _eval_mode(model):
        for x, _ in iterate_batches(loader):
            if limit is not None:
                if n >= limit:
                    break
                x = x[: limit - n]
            macs = macs_per_image(model, x)
            total += float(macs.sum())
            n += int(macs.numel())
    return total / max(n, 1)


@torch.no_grad()
def time_forward(model: nn.Module, x: torch.Tensor, *, amp: bool = False) -> float:
    """Seconds for one eval-mode forward pass of ``x`` (device synchronised)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda device: None)
    sync(x.device)
    start = time.perf_counter()
    with autocast(x.device, amp):
        model(x)
    sync(x.device)
    return time.perf_counter() - start


@torch.no_grad()
def compare_timing(
    model: nn.Module, baseline: nn.Module | None, x: torch.Tensor, *, repeats: int = 10, warmup: int = 2, amp: bool = False
) -> dict[str, Any]:
    """Median forward time of ``model`` (and ``baseline``, alternating with it so that drifting load affects both alike) on the
    batch ``x``, in this process; ``ratio`` is the median of the paired ratios model/baseline (None without a baseline)."""
    models = [model] + ([baseline] if baseline is not None else [])
    repeats, warmup = max(repeats, 1), max(warmup, 0)
    with _eval_mode(*models):
        rounds = [[time_forward(m, x, amp=amp) for m in models] for _ in range(warmup + repeats)][warmup:]
    times = list(zip(*rounds))  # per model
    paired = baseline is not None
    return {
        "batch": int(x.shape[0]),
        "repeats": repeats,
        "model_s": statistics.median(times[0]),
        "baseline_s": statistics.median(times[1]) if paired else None,
        "ratio": statistics.median(a / b for a, b in zip(*times)) if paired else None,
    }
