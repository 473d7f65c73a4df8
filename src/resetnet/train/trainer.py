"""Training: one :class:`Trainer` for a single process and for every rank of a torchrun job.

    from resetnet.train import load_config, train
    summary = train(load_config("quickstart"), "runs/quickstart", data_dir="~/data")

or piece by piece::

    runtime = launch_runtime(cfg)                   # device, bf16, channels_last; joins torchrun's group
    data = build_data(cfg, runtime, data_dir)       # device-resident loaders (or arrays=... for tests)
    model = build_model(cfg)                        # seeded create_model(name, **overrides)
    summary = Trainer(cfg, model, data, out_dir, runtime, callbacks=[...]).fit()

Callbacks are objects with any of ``on_fit_start(trainer)``, ``on_step_end(trainer, step,
stats)``, ``on_eval(trainer, step, result)`` and ``on_fit_end(trainer, summary)``; one may call
:meth:`Trainer.request_stop` to end the run as if its budget were spent.

Under torchrun (``runtime.distributed``) the same trainer wraps the model in DDP, shards the
evaluation, averages the logged statistics over the ranks and makes every rank take the same
decisions (stop signals, non-finite steps, callbacks' stop requests) at the same step; rank 0
alone logs and writes checkpoints (docs/distributed.md).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .. import __version__
from ..checkpoint import (
    Checkpoint,
    checkpoint_exists,
    checkpoint_tensors,
    load_weights,
    nonfinite_tensors,
    optimizer_from_parts,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..errors import ConfigError
from ..losses import HybridSkipReward, entropy_regularizer, entropy_terms
from . import distributed as D
from .config import Config, diff_configs, load_config
from .evaluate import autocast, count_parameters, evaluate
from .metrics import MetricsLogger, NullLogger, truncate_metrics
from .params import frozen_batchnorms, set_frozen_bn_eval, set_trainable
from .runtime import Runtime, launch_runtime, resolve_runtime
from .schedules import Schedules

__all__ = [
    "TrainingStopped",
    "NonFiniteLoss",
    "NonFiniteWeights",
    "TrainingInterrupted",
    "DataBundle",
    "build_model",
    "build_optimizer",
    "build_data",
    "routing_stats",
    "Trainer",
    "train",
    "RESUME_TOLERATED_KEYS",
    "provenance",
]

log = logging.getLogger("resetnet")

#: Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_TOLERATED_KEYS = (
    "train.progress",
    "train.tensorboard",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.stop_after",
    "train.compile",
    "train.device",
    "train.dist_timeout_s",
    "data.download",
    "data.verify",
)
#: Steps between two agreements of the ranks on a stop signal (SIGINT/SIGTERM).
STOP_CHECK_EVERY = 16


# ----------------------------------------------------------------------------- outcomes
class TrainingStopped(RuntimeError):
    """Training ended early; ``summary`` describes the state at the stop."""

    def __init__(self, message: str, summary: dict | None = None) -> None:
        super().__init__(message)
        self.summary = summary or {}


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN/inf at ``step``; the last good checkpoint was kept."""

    def __init__(self, message: str, step: int, summary: dict | None = None) -> None:
        super().__init__(message, summary)
        self.step = step


class NonFiniteWeights(NonFiniteLoss):
    """Weights or optimizer state hold NaN/inf at a checkpoint step (``tensors`` names them); nothing was written."""

    def __init__(self, message: str, step: int, tensors: list[str], summary: dict | None = None) -> None:
        super().__init__(message, step, summary)
        self.tensors = tensors


class TrainingInterrupted(TrainingStopped):
    """SIGINT/SIGTERM: a checkpoint was saved (unless a second signal came first); rerun with ``--resume``."""

    def __init__(self, message: str, signum: int, summary: dict | None = None) -> None:
        super().__init__(message, summary)
        self.signum = signum


# ----------------------------------------------------------------------------- builders
def build_model(cfg: Config) -> nn.Module:
    """``create_model(model.name, **model.overrides)`` after seeding torch with ``train.seed``."""
    from ..models import create_model

    torch.manual_seed(cfg.train.seed)
    return create_model(cfg.model.name, **cfg.model.overrides)


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam from ``cfg.optim``."""
    params, o = list(params), cfg.optim
    if not params:
        raise ConfigError("config key 'trainable': no trainable parameters selected")
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@dataclass
class DataBundle:
    """The loaders of a run: ``train``, ``eval`` (periodic evaluation on ``eval_split``, "test" or
    "val") and ``test`` (the final evaluation; the same object as ``eval`` when that is the test set)."""

    train: Any
    eval: Any
    eval_split: str = "test"
    test: Any = None

    def __post_init__(self) -> None:
        if self.test is None and self.eval_split == "test":
            self.test = self.eval


def build_data(
    cfg: Config, runtime: Runtime, data_dir: str | os.PathLike[str] | None = None, arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
) -> DataBundle:
    """Device-resident loaders; ``arrays`` (``{"train": (x, y), "test": (x, y)}``, uint8 NHWC) replaces the files."""
    from ..data import DeviceLoader, load_cifar10, resolve_data_dir, train_val_split

    d, t = cfg.data, cfg.train
    if arrays is None:
        root = resolve_data_dir(data_dir)
        arrays = {split: load_cifar10(root, split, download=d.download, verify=d.verify) for split in ("train", "test")}
    (train_x, train_y), test = arrays["train"], arrays["test"]
    val = None
    if d.val_split > 0:
        if d.val_split >= len(train_y):
            raise ConfigError(f"config key 'data.val_split': {d.val_split} >= the {len(train_y)} training images")
        train_x, train_y, *val = train_val_split(train_x, train_y, d.val_split, d.split_seed)
    common = dict(device=runtime.device, channels_last=runtime.channels_last)
    try:
        train_loader = DeviceLoader(
            train_x,
            train_y,
            t.batch_size,
            train=True,
            seed=t.seed,
            augment=d.augment,
            rank=runtime.rank,
            world_size=runtime.world_size,
            limit=d.limit_train,
            **common,
        )
    except ValueError as err:
        raise ConfigError(f"config keys 'train.batch_size'/'data.limit_train': {err}") from None
    test_loader = DeviceLoader(*test, t.eval_batch_size, train=False, limit=d.limit_test, **common)
    if val is None:
        return DataBundle(train_loader, test_loader)
    return DataBundle(train_loader, DeviceLoader(*val, t.eval_batch_size, train=False, limit=d.limit_test, **common), "val", test_loader)


@torch.no_grad()
def routing_stats(routing: Sequence[Any]) -> dict[str, Any]:
    """Per-module routing statistics of one batch (the ``routing`` row of metrics.jsonl): the batch
    mean of the weights per iteration and unit (zero unit last), the two Eq. 13 terms, the skip rate."""
    out: dict[str, Any] = {"mean_weights": [], "entropy_batch": [], "entropy_sample": [], "skip_rate": [], "zero_weight": [], "zero_unit": []}
    for r in routing:
        w = r.weights.detach().float()
        terms = entropy_terms([w])
        out["mean_weights"].append(w.mean(dim=0).cpu().tolist())
        out["entropy_batch"].append(float(terms.batch))
        out["entropy_sample"].append(float(terms.sample))
        out["skip_rate"].append(float(r.skip_mask().float().mean()))
        out["zero_weight"].append(float(w[..., -1].mean()) if r.zero_unit else None)
        out["zero_unit"].append(bool(r.zero_unit))
    return out


def provenance() -> dict[str, Any]:
    """The code that ran: ``resetnet.__version__``, and the git commit and dirty flag when run from a checkout."""
    import subprocess

    out: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    root = Path(__file__).resolve().parents[3]
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        out["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package: the version says it
    return out


# ----------------------------------------------------------------------------- trainer
@dataclass
class _Window:
    """Training statistics summed on the device between two log steps (no host syncs)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    images: int = 0

    def add(self, stats: Mapping[str, torch.Tensor], images: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.images += images

    def means(self) -> dict[str, float]:
        return {
            ("acc" if k == "correct" else k): float(v) / (max(self.images, 1) if k == "correct" else self.counts[k]) for k, v in self.sums.items()
        }


class Trainer:
    """Trains ``model`` on ``data`` as ``cfg`` says, writing into ``out_dir``.

    The model goes to ``runtime.device`` (channels_last when asked); ``cfg.trainable`` selects
    the parameters the optimizer holds, ``cfg.freeze_bn_stats`` fixes the BatchNorm statistics of
    the frozen modules. :meth:`fit` runs from ``self.step`` to the budget.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        data: DataBundle,
        out_dir: str | os.PathLike[str],
        runtime: Runtime | None = None,
        *,
        callbacks: Sequence[Any] = (),
        logger: Any = None,
    ) -> None:
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.runtime = runtime or resolve_runtime(cfg)
        self.device = self.runtime.device
        self.model = model.to(self.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        try:
            self.trainable = set_trainable(self.model, cfg.trainable)
        except ValueError as err:
            raise ConfigError(f"config key 'trainable': {err}") from None
        self.frozen_bn = frozen_batchnorms(self.model) if cfg.freeze_bn_stats else []
        self.optimizer = build_optimizer(cfg, self.trainable)
        self.skip_reward = self._build_skip_reward()
        resets = {id(m) for m in getattr(self.model, "reset_modules", list)()}
        self.reset_names = [n for n, m in self.model.named_modules() if id(m) in resets]
        self.has_routing = bool(resets)
        self.steps_per_epoch = len(data.train)
        t = cfg.train
        self.total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.schedules = Schedules(cfg, self.total_steps)
        distributed = self.runtime.distributed
        self.marginal_reduce = D.all_reduce_mean_autograd if distributed and cfg.regularizers.entropy.global_marginal else None
        self.callbacks = list(callbacks)
        self.logger = logger or (MetricsLogger(self.out_dir, tensorboard=t.tensorboard) if self.runtime.is_main else NullLogger())
        self._find_unused = False
        self.forward_model = self._wrap(self.model)
        self.step = 0
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.elapsed = 0.0  # seconds of training in earlier invocations (resume)
        self.stop_reason: str | None = None
        self._pending_stop: str | None = None  # a callback's stop request, agreed across ranks at the end of the step
        self._first_bad = torch.full((), 2**62, dtype=torch.int64, device=self.device)
        self._stop_signal: int | None = None
        self._session_start: float | None = None
        self._train_time, self._train_images = 0.0, 0
        self._test_acc: float | None = None
        self._last_train: dict | None = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------- set-up
    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward calls: DDP under torchrun, then torch.compile when asked."""
        if self.runtime.distributed:
            sync_bn = self.cfg.train.sync_bn
            # Callbacks may switch requires_grad during the run (phases): frozen parameters then get no gradient.
            try:
                model = D.wrap_model(model, self.runtime, find_unused=True if self.callbacks else None, sync_bn=sync_bn)
            except D.SyncBNError as err:
                raise ConfigError(f"config key 'train.sync_bn': {err}") from None
            self._find_unused = bool(model.find_unused_parameters)
            if sync_bn and self.cfg.freeze_bn_stats:
                self.frozen_bn = frozen_batchnorms(D.unwrap(model))  # the converted modules
        return torch.compile(model) if self.cfg.train.compile else model

    def _build_skip_reward(self) -> nn.Module | None:
        sr = self.cfg.regularizers.skip_reward
        if not sr.enabled:
            return None
        resets = getattr(self.model, "reset_modules", list)()
        if not resets or not all(m.scorer.sparse and m.scorer.stochastic for m in resets):
            raise ConfigError(
                "config key 'regularizers.skip_reward.enabled': the Hybrid-RL skip term (Eq. 9) is a REINFORCE estimate, "
                "so every ReSet module needs a hard scorer that samples its route (model.overrides.scorer: gumbel_st)"
            )
        if not all(m.zero_unit for m in resets):
            raise ConfigError("config key 'regularizers.skip_reward.enabled': the skip term needs ReSet modules with a zero unit")
        return HybridSkipReward(sr.reward, sr.momentum).to(self.device)

    def set_train_mode(self) -> None:
        """``model.train()`` with the BatchNorm of frozen modules kept in eval mode."""
        self.model.train()
        set_frozen_bn_eval(self.frozen_bn)
        if self.skip_reward is not None:
            self.skip_reward.train()

    def request_stop(self, reason: str) -> None:
        """End the run after the current step as if its budget were spent (final evaluation and
        checkpoint); ``reason`` goes into the summary and the checkpoint. Under torchrun the ranks
        agree at the end of the step: any rank's request stops every rank."""
        if self.runtime.distributed:
            self._pending_stop = self._pending_stop or str(reason)
        else:
            self.stop_reason = str(reason)

    # ------------------------------------------------------------- one step
    def _entropy_active(self, factor: float) -> bool:
        ent = self.cfg.regularizers.entropy
        return self.has_routing and factor > 0 and (ent.lambda_batch > 0 or ent.lambda_sample > 0)

    def _route_log_step(self, step: int) -> bool:
        every = self.cfg.train.route_log_every
        return self.has_routing and every > 0 and step % every == 0

    def compute_loss(self, logits: torch.Tensor, y: torch.Tensor, routing: Sequence[Any], sched: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cross-entropy + entropy regularizer (Eq. 13) + Hybrid-RL skip term (Eq. 9); ``loss`` is their sum."""
        ce_per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.cfg.train.label_smoothing)
        terms: dict[str, torch.Tensor] = {"ce": ce_per_sample.mean()}
        loss = terms["ce"]
        if routing and self._entropy_active(sched["entropy_factor"]):
            ent, f = self.cfg.regularizers.entropy, sched["entropy_factor"]
            reg, h = entropy_regularizer(routing, ent.lambda_batch * f, ent.lambda_sample * f, self.marginal_reduce, return_terms=True)
            loss = loss + reg
            terms.update(entropy_batch=h.batch.detach(), entropy_sample=h.sample.detach(), entropy_reg=reg.detach())
        if routing and self.skip_reward is not None:
            rl, _ = self.skip_reward(routing, ce_per_sample)
            loss = loss + self.cfg.regularizers.skip_reward.weight * rl
            terms["skip_rl"] = rl.detach()
            terms["skip_rate"] = torch.cat([r.skip_mask().float().flatten() for r in routing]).mean()
        if routing and self._find_unused:
            loss = loss + D.routing_anchor(routing)  # DDP: every routing output stays in the graph
        terms["loss"] = loss
        return terms

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update at ``self.step`` (0-based index of the batch); returns detached statistics."""
        step, t = self.step, self.cfg.train
        if self.runtime.distributed and self.runtime.rank > 0:
            # Each rank draws its own Gumbel noise from (seed, step, rank): exact resume on every rank
            # (rank 0 keeps the single-process stream, restored from the checkpoint).
            torch.manual_seed(D.rank_seed(t.seed, step, self.runtime.rank))
        if t.batch_repeat > 1:  # every image k times in the batch: k Gumbel samples per image
            x, y = x.repeat_interleave(t.batch_repeat, dim=0), y.repeat_interleave(t.batch_repeat, dim=0)
        sched = self.schedules.apply(step, self.model, self.optimizer)
        want_routing = self._entropy_active(sched["entropy_factor"]) or self.skip_reward is not None or self._route_log_step(step + 1)
        with autocast(self.device, self.runtime.amp):
            out = self.forward_model(x, return_routing=True) if want_routing else self.forward_model(x)
        logits, routing = out if want_routing else (out, [])
        logits = logits.float()
        terms = self.compute_loss(logits, y, routing, sched)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.cfg.optim.grad_clip is not None:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip).detach()
        self.optimizer.step()
        # The first non-finite step, remembered without a host sync; checked at log/eval/checkpoint time.
        finite = torch.isfinite(terms["loss"].detach())
        self._first_bad = torch.minimum(self._first_bad, torch.where(finite, self._first_bad, torch.full_like(self._first_bad, step + 1)))
        stats = {k: v.detach().float() for k, v in terms.items()}
        stats["correct"] = (logits.detach().argmax(dim=1) == y).sum().float() / t.batch_repeat  # per image
        if routing and self._route_log_step(step + 1) and self.runtime.is_main:
            self.logger.log("routing", step + 1, {**routing_stats(routing), "temperature": sched["temperature"], "modules": self.reset_names})
        if self.runtime.distributed and self.callbacks:
            # Callbacks decide (phase switches, early stops) from these statistics: the same global means on every rank.
            keys = sorted(stats)
            flat = D.all_reduce_sum(torch.stack([stats[k].reshape(()) for k in keys])) / self.runtime.world_size
            stats = dict(zip(keys, flat.unbind()))
        return stats

    # ------------------------------------------------------------- decisions every rank shares
    def _agree(self, value: int, op: str) -> int:
        """``value`` reduced over the ranks with ``op`` ("max" or "min"); itself in one process."""
        if not self.runtime.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        D.dist.all_reduce(t, op=D.dist.ReduceOp.MAX if op == "max" else D.dist.ReduceOp.MIN)
        return int(t.item())

    def _signal_received(self) -> int:
        """The stop signal received by this process (0: none); under torchrun the largest over the ranks,
        agreed every :data:`STOP_CHECK_EVERY` steps, so every rank stops at the same step with the same code."""
        local = self._stop_signal or 0
        if not self.runtime.distributed:
            return local
        return self._agree(local, "max") if self.step % STOP_CHECK_EVERY == 0 else 0

    def _agree_stop(self) -> None:
        """Under torchrun, a stop requested on any rank during this step stops every rank now."""
        pending, self._pending_stop = self._pending_stop, None
        if self._agree(int(pending is not None), "max"):
            reasons: list[Any] = [None] * self.runtime.world_size
            D.dist.all_gather_object(reasons, pending)
            self.stop_reason = next(r for r in reasons if r is not None)

    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss was NaN/inf (over all ranks), or None; synchronises with the device."""
        bad = self._agree(int(self._first_bad), "min")
        return None if bad >= 2**62 else bad

    def _check_finite(self) -> None:
        bad = self.first_nonfinite_step()
        if bad is None:
            return
        kept = f"the last good checkpoint in {self.out_dir} was kept" if checkpoint_exists(self.out_dir) else "no checkpoint was written"
        raise NonFiniteLoss(
            f"non-finite loss at step {bad} (lr {self.schedules.values(bad - 1)['lr']:.3g}); training stopped, {kept}. "
            "Lower optim.lr, set optim.grad_clip, or check the data.",
            step=bad,
            summary=self.summary("nonfinite"),
        )

    # ------------------------------------------------------------- evaluation and state
    def evaluate_loader(self, loader: Any) -> dict[str, Any]:
        """:func:`~resetnet.train.evaluate.evaluate` of the model (sharded over the ranks under torchrun)."""
        if self.runtime.distributed:
            return D.evaluate_sharded(self.model, loader, self.runtime, amp=self.runtime.amp)
        return evaluate(self.model, loader, amp=self.runtime.amp)

    def run_eval(self, loader: Any = None, split: str | None = None) -> dict[str, Any]:
        """Evaluate on ``loader`` (default: the periodic eval set), log an ``eval`` row, track the best."""
        loader, split = loader if loader is not None else self.data.eval, split or self.data.eval_split
        res = self.evaluate_loader(loader)
        self.set_train_mode()
        row = {"split": split, "acc": res["acc"], "loss": res["loss"], "n": res["n"], "per_class_acc": res["per_class_acc"]}
        if split == self.data.eval_split and (not self.best or res["acc"] > self.best["acc"]):
            self.best = {"acc": res["acc"], "step": self.step, "split": split}
        row["best_acc"] = self.best.get("acc")
        self.last_eval = {"step": self.step, **{k: row[k] for k in ("split", "acc", "loss", "n")}}
        self.logger.log("eval", self.step, row)
        for cb in self.callbacks:
            if hasattr(cb, "on_eval"):
                cb.on_eval(self, self.step, res)
        return res

    def checkpoint_meta(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "epoch": epoch,
            "total_steps": self.total_steps,
            "schedule": self.schedules.values(self.step),
            "loader": {
                "epoch": epoch,
                "batch": batch,
                "global_step": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.data.train.batch_size,
            },
            "rng": rng_state(),
            "best": self.best,
            "last_eval": self.last_eval,
            "stop_reason": self.stop_reason,
            "elapsed_s": self.elapsed + self._session_time(),
            "world_size": self.runtime.world_size,
            "model": {"name": self.cfg.model.name, "params": count_parameters(self.model)},
            "provenance": provenance(),
        }

    def save_checkpoint(self) -> Path | None:
        """Check every tensor for NaN/inf (one fused check, on every rank), then write the checkpoint
        (rank 0) and make it the current one. A diverged state is never written."""
        aux = {"skip_reward": self.skip_reward} if self.skip_reward is not None else None
        tensors = checkpoint_tensors(self.model, self.optimizer, aux)
        bad = nonfinite_tensors(tensors)
        if bad:
            kept = f"the previous checkpoint in {self.out_dir} was kept" if checkpoint_exists(self.out_dir) else "no checkpoint was written"
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise NonFiniteWeights(
                f"non-finite weights at step {self.step}: {len(bad)} of {len(tensors)} model/optimizer tensors hold "
                f"NaN/Inf (first: {shown}); the checkpoint was not written, {kept}. Lower optim.lr or set optim.grad_clip.",
                self.step,
                bad,
                summary=self.summary("nonfinite"),
            )
        if not self.runtime.is_main:
            return None
        return save_checkpoint(self.out_dir, self.model, self.checkpoint_meta(), self.optimizer, aux, check_finite=False)

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue exactly from ``ckpt``: weights, optimizer, skip-reward baseline, step, RNG."""
        load_weights(self.model, ckpt, strict=True)
        optimizer_from_parts(self.optimizer, {k: v for k, v in ckpt.tensors.items() if k.startswith("optim/")}, ckpt.meta["optimizer"])
        if self.skip_reward is not None:
            self.skip_reward.load_state_dict(ckpt.section("aux/skip_reward"))
        meta = ckpt.meta
        self.step, self.best, self.last_eval = int(meta["step"]), dict(meta.get("best") or {}), meta.get("last_eval")
        self.elapsed, self.stop_reason = float(meta.get("elapsed_s", 0.0)), meta.get("stop_reason")
        set_rng_state(meta["rng"])

    # ------------------------------------------------------------- the loop
    def _session_time(self) -> float:
        return 0.0 if self._session_start is None else time.perf_counter() - self._session_start

    def summary(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "out_dir": str(self.out_dir),
            "model": self.cfg.model.name,
            "params": count_parameters(self.model),
            "device": str(self.device),
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.step / max(self.steps_per_epoch, 1),
            "best": self.best,
            "last_eval": self.last_eval,
            "stop_reason": self.stop_reason,
            "test_acc": self._test_acc,
            "train": self._last_train,
            "wall_s": self._session_time(),
            "train_s": self._train_time,
            "images_per_s": self._train_images / self._train_time if self._train_images and self._train_time > 0 else None,
        }

    def _log_train(self, window: _Window, dt: float, sched: Mapping[str, Any], bar: Any) -> None:
        stats = window.means()
        if self.runtime.distributed:
            keys = sorted(stats)
            summed = D.all_reduce_sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device))
            stats = {k: v / self.runtime.world_size for k, v in zip(keys, summed.tolist())}
        ips = window.images * self.runtime.world_size / dt if dt > 0 else None
        row = {**stats, "lr": sched["lr"], "images_per_s": ips, "epoch": self.step / self.steps_per_epoch}
        if sched["temperature"] is not None:
            row["temperature"] = sched["temperature"]
        if self.has_routing and (self.cfg.regularizers.entropy.lambda_batch or self.cfg.regularizers.entropy.lambda_sample):
            row["entropy_factor"] = sched["entropy_factor"]
        self._last_train = {"step": self.step, **row}
        self.logger.log("train", self.step, row)
        if bar is not None:
            bar.set_postfix(
                loss=f"{stats.get('loss', float('nan')):.3f}",
                acc=f"{stats.get('acc', 0):.3f}",
                lr=f"{sched['lr']:.3g}",
                img_s=f"{ips or 0:.0f}",
                refresh=False,
            )

    def train_steps(self, stop_at: int, bar: Any = None) -> None:
        """The training loop from ``self.step`` to ``stop_at`` (or an early stop): steps, logging, periodic
        evaluation and checkpoints, signals. :meth:`fit` wraps it with the set-up and the final evaluation;
        ``benchmarks/train_step.py`` times it."""
        t, total = self.cfg.train, self.total_steps
        window, batches = _Window(), self.data.train.batches(self.step)
        tick = time.perf_counter()
        while self.step < stop_at and self.stop_reason is None:
            signum = self._signal_received()
            if signum:
                self._interrupt(signum)
            _, _, x, y = next(batches)
            stats = self.train_step(x, y)
            self.step += 1
            window.add(stats, int(y.shape[0]))
            if bar is not None:
                bar.update(1)
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, self.step, stats)
            if self.runtime.distributed and self.callbacks:
                self._agree_stop()
            ending = self.step == stop_at or self.stop_reason is not None
            log_now = self.step % t.log_every == 0 or ending
            eval_now = t.eval_every > 0 and self.step % t.eval_every == 0 and self.step < total and self.stop_reason is None
            ckpt_now = t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and not ending
            if log_now or eval_now or ckpt_now:
                self._check_finite()  # host sync
                now = time.perf_counter()
                self._train_time += now - tick
                self._train_images += window.images * self.runtime.world_size
                if log_now:
                    self._log_train(window, now - tick, self.schedules.values(self.step - 1), bar)
                    window = _Window()
                if eval_now:
                    self.run_eval()
                if ckpt_now:
                    self.save_checkpoint()
                tick = time.perf_counter()

    def _progress_bar(self) -> Any:
        if not (self.runtime.is_main and self.cfg.train.progress):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            log.warning("no progress bar: tqdm is not installed (pip install 'resetnet[train]')")
            return None
        return tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc=self.cfg.model.name)

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to the budget (or ``train.stop_after`` more steps); returns the summary.

        Raises :class:`NonFiniteLoss` / :class:`NonFiniteWeights` (the last good checkpoint kept) or
        :class:`TrainingInterrupted` (a checkpoint saved at the current step).
        """
        if self.runtime.distributed and self._agree(self.step, "max") != self._agree(self.step, "min"):
            raise RuntimeError("ranks start at different steps: every rank must read the same checkpoint; put --out on a file system all nodes see")
        stop_at = self.total_steps if self.cfg.train.stop_after is None else min(self.total_steps, self.step + self.cfg.train.stop_after)
        self._session_start = time.perf_counter()
        self._train_time, self._train_images = 0.0, 0
        previous = self._install_signal_handlers()
        bar = self._progress_bar()
        self.set_train_mode()
        try:
            for cb in self.callbacks:
                if hasattr(cb, "on_fit_start"):
                    cb.on_fit_start(self)
            self.train_steps(stop_at, bar)
            self._check_finite()
            status = "paused"
            if self.step >= self.total_steps or self.stop_reason is not None:
                if self.last_eval is None or self.last_eval["step"] != self.step:
                    self.run_eval()
                if self.data.test is not None and self.data.test is not self.data.eval:
                    self._test_acc = self.run_eval(self.data.test, "test")["acc"]
                elif self.last_eval is not None:
                    self._test_acc = self.last_eval["acc"]
                status = "completed"
            self.save_checkpoint()
            summary = self.summary(status)
            for cb in self.callbacks:
                if hasattr(cb, "on_fit_end"):
                    cb.on_fit_end(self, summary)
            D.barrier()  # rank 0 has written its checkpoint: a following train() on any rank may read it
            return summary
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.logger.close()

    # ------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now, without a checkpoint
                raise TrainingInterrupted(
                    f"a second {signal.Signals(signum).name}: stopped at once, without saving; the last "
                    f"checkpoint in {self.out_dir} (if any) is kept; rerun with --resume to continue",
                    signum,
                )
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _interrupt(self, signum: int) -> None:
        self._check_finite()
        path = self.save_checkpoint()
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} received: checkpoint saved at step {self.step} in "
            f"{path.parent if path else self.out_dir}; rerun with --resume to continue",
            signum=signum,
            summary=self.summary("interrupted"),
        )


# ----------------------------------------------------------------------------- entry point
def train(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config,
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    runtime: Runtime | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train a model as ``config`` says into ``out_dir``; returns the summary dict.

    Args:
        config: a :class:`Config`, a raw mapping (checked), a shipped config name or a YAML path.
        out_dir: the run directory: the checkpoint, ``metrics.jsonl``, ``tb/``, ``config.yaml``.
        data_dir: CIFAR-10 root (default ``$RESETNET_DATA`` or ``~/.cache/resetnet``).
        resume: continue the run in ``out_dir`` from its checkpoint (a fresh start when there is none).
            Without it, an ``out_dir`` holding a checkpoint is an error.
        arrays: in-memory ``{"train": (x, y), "test": (x, y)}`` instead of the files.
        runtime, callbacks: see the module docstring.

    The main process checks that ``out_dir`` can be written before anything else and holds its lock
    (``out_dir/.lock``) for the whole call; a run that fails before it wrote anything removes the
    directories it created. Raises ``ConfigError``, ``DataError``, ``CheckpointError``, ``RunDirError``
    (all :class:`resetnet.errors.UserError`), :class:`NonFiniteLoss`, :class:`TrainingInterrupted`.
    """
    from .runlock import LOCK_NAME, RunLock, prepare_run_dir, remove_empty_dirs

    cfg, out_dir = load_config(config), Path(out_dir)
    main_process = runtime.is_main if runtime is not None else os.environ.get("RANK", "0").strip() in ("", "0")
    created = prepare_run_dir(out_dir) if main_process else []
    lock = RunLock(out_dir).acquire() if main_process else None
    try:
        ckpt = None
        if checkpoint_exists(out_dir):
            if not resume:
                raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
            ckpt = read_checkpoint(out_dir)
            differing = [k for k in diff_configs(ckpt.meta["config"], cfg) if k not in RESUME_TOLERATED_KEYS]
            if differing:
                raise ConfigError(
                    f"cannot resume {out_dir}: the config differs from the checkpoint's in {', '.join(differing)}; "
                    "use the same config (or a new --out)"
                )
        runtime = runtime or launch_runtime(cfg)
        data = build_data(cfg, runtime, data_dir, arrays)  # first: a missing data set fails fast
        model = build_model(cfg)
        if cfg.init_from.path and ckpt is None:
            report = load_weights(model, cfg.init_from.path, strict=cfg.init_from.strict)
            skipped = {k: v for k, v in report.items() if v}
            if skipped and runtime.is_main:
                log.warning("init_from %s: not loaded: %s", cfg.init_from.path, "; ".join(f"{len(v)} {k}" for k, v in skipped.items()))
        if runtime.is_main:
            # Rows written after the checkpoint (or by an earlier attempt that never saved one) are redone.
            truncate_metrics(out_dir / "metrics.jsonl", int(ckpt.meta["step"]) if ckpt is not None else 0)
            if ckpt is None:
                (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        trainer = Trainer(cfg, model, data, out_dir, runtime, callbacks=callbacks)
        if ckpt is not None:
            trainer.restore(ckpt)
        return trainer.fit()
    finally:
        if lock is not None:  # a directory this call created and nothing was written to goes again
            lock.release(remove=bool(created) and [p.name for p in out_dir.iterdir()] == [LOCK_NAME])
        remove_empty_dirs(created)
