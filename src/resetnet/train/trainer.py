"""Training: one :class:`Trainer` for a single process and for every rank of a torchrun job::

    summary = train(load_config("quickstart"), "runs/quickstart", data_dir="~/data")
    runtime = launch_runtime(cfg)  # or piece by piece; the runtime: device, bf16, channels_last, torchrun's group
    summary = Trainer(cfg, build_model(cfg), build_data(cfg, runtime, data_dir), out_dir, runtime, callbacks=[...]).fit()

Callbacks are objects with any of ``on_fit_start(trainer)``, ``on_step_end(trainer, step, stats)``, ``on_eval(trainer, step, result)``
and ``on_fit_end(trainer, summary)``; one may call :meth:`Trainer.request_stop`. Under torchrun the model is wrapped in DDP,
evaluation is sharded, logged statistics are averaged and every rank takes the same decisions at the same step; rank 0 alone
logs and writes checkpoints (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .. import __version__
from .. import checkpoint as ckpt_io
from ..errors import ConfigError, require
from ..losses import HybridSkipReward, entropy_regularizer, entropy_terms
from . import distributed as D
from .config import Config, diff_configs, load_config
from .ema import WeightEMA
from .evaluate import autocast, count_parameters
from .metrics import MetricsLogger, NullLogger, truncate_metrics
from .params import frozen_batchnorms, select_parameters, set_frozen_bn_eval, set_trainable
from .runlock import LOCK_NAME, RunLock, prepare_run_dir, remove_empty_dirs
from .runtime import Runtime, launch_runtime, resolve_runtime
from .schedules import Schedules

__all__ = ["TrainingStopped", "NonFiniteLoss", "NonFiniteWeights", "TrainingInterrupted", "Trainer", "train", "RESUME_TOLERATED_KEYS", "provenance"]
__all__ += ["DataBundle", "build_model", "build_optimizer", "build_data", "routing_stats"]

log = logging.getLogger("resetnet")

_TRAIN_TOLERATED = ("progress", "tensorboard", "log_every", "eval_every", "checkpoint_every", "stop_after", "compile", "device", "dist_timeout_s")
#: Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_TOLERATED_KEYS = (*(f"train.{k}" for k in _TRAIN_TOLERATED), "data.download", "data.verify")
#: Steps between two agreements of the ranks on a stop signal (SIGINT/SIGTERM).
STOP_CHECK_EVERY = 16
_NO_BAD_STEP = 2**62  # the "no non-finite step yet" value of Trainer._first_bad


class TrainingStopped(RuntimeError):
    """Training ended early; ``summary`` describes the state at the stop. Keyword arguments become attributes."""

    def __init__(self, message: str, summary: dict | None = None, **attrs: Any) -> None:
        super().__init__(message)
        self.summary = summary or {}
        self.__dict__.update(attrs)


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN/inf at ``step``; the last good checkpoint was kept."""

    step: int


class NonFiniteWeights(NonFiniteLoss):
    """Weights or optimizer state hold NaN/inf at a checkpoint ``step`` (``tensors`` names them); nothing was written."""

    tensors: list[str]


class TrainingInterrupted(TrainingStopped):
    """SIGINT/SIGTERM (``signum``): a checkpoint was saved (unless a second signal came first); rerun with ``--resume``."""

    signum: int


def build_model(cfg: Config) -> nn.Module:
    """``create_model(model.name, **model.overrides)`` after seeding torch with ``train.seed``."""
    from ..models import create_model

    torch.manual_seed(cfg.train.seed)
    return create_model(cfg.model.name, **cfg.model.overrides)


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter], model: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam from ``cfg.optim``. With ``optim.controller_weight_decay`` set, the
    parameters of ``model``'s ReSet controllers form a group with that weight decay; with ``optim.norm_weight_decay`` set,
    the other 1-D parameters (norm scales and shifts, biases) form one with that."""
    params, o = list(params), cfg.optim
    if not params:
        raise ConfigError("config key 'trainable': no trainable parameters selected")
    controller = set()
    if o.controller_weight_decay is not None and model is not None:
        controller = {id(p) for p in select_parameters(model, ["controller"])}
    groups: list[list[nn.Parameter]] = [[], [], []]  # the rest, the controllers, 1-D parameters
    for p in params:
        groups[1 if id(p) in controller else 2 if p.ndim <= 1 and o.norm_weight_decay is not None else 0].append(p)
    decays = (o.weight_decay, o.controller_weight_decay, o.norm_weight_decay)
    params = [{"params": g, "weight_decay": wd} for g, wd in zip(groups, decays) if g]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


@dataclass
class DataBundle:
    """The loaders of a run: ``train``, ``eval`` (periodic evaluation on ``eval_split``, "test" or "val") and ``test`` (the final
    evaluation; the same object as ``eval`` when that is the test set)."""

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
    (x, y), test = arrays["train"], arrays["test"]
    val = None
    if d.val_split > 0:
        if d.val_split >= len(y):
            raise ConfigError(f"config key 'data.val_split': {d.val_split} >= the {len(y)} training images")
        x, y, *val = train_val_split(x, y, d.val_split, d.split_seed)
    loader = partial(DeviceLoader, device=runtime.device, channels_last=runtime.channels_last)
    try:
        shard = {"rank": runtime.rank, "world_size": runtime.world_size}
        train_loader = loader(x, y, t.batch_size, train=True, seed=t.seed, augment=d.augment, flip=d.flip, limit=d.limit_train, **shard)
    except ValueError as err:
        raise ConfigError(f"config keys 'train.batch_size'/'data.limit_train': {err}") from None
    eval_loader = partial(loader, batch_size=t.eval_batch_size, train=False, limit=d.limit_test)
    if val is None:
        return DataBundle(train_loader, eval_loader(*test))
    return DataBundle(train_loader, eval_loader(*val), "val", eval_loader(*test))


@torch.no_grad()
def routing_stats(routing: Sequence[Any]) -> dict[str, Any]:
    """Per-module routing statistics of one batch (the ``routing`` row of metrics.jsonl): the batch
    mean of the weights per iteration and unit (zero unit last), the two Eq. 13 terms, the skip rate."""
    weights = [r.weights.detach().float() for r in routing]
    terms = [entropy_terms([w]) for w in weights]
    return {
        "mean_weights": [w.mean(dim=0).cpu().tolist() for w in weights],
        "entropy_batch": [float(h.batch) for h in terms],
        "entropy_sample": [float(h.sample) for h in terms],
        "skip_rate": [float(r.skip_mask().float().mean()) for r in routing],
        "zero_weight": [float(w[..., -1].mean()) if r.zero_unit else None for w, r in zip(weights, routing)],
        "zero_unit": [bool(r.zero_unit) for r in routing],
    }


def provenance() -> dict[str, Any]:
    """The code that ran: ``resetnet.__version__``, and the git commit and dirty flag when run from a checkout."""
    git = partial(subprocess.run, cwd=Path(__file__).resolve().parents[3], capture_output=True, text=True, timeout=5, check=True)
    out: dict[str, Any] = {"version": __version__, "commit": None, "dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # not a git checkout: the version says it
        out["commit"] = git(["git", "rev-parse", "HEAD"]).stdout.strip()
        out["dirty"] = bool(git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
    return out


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

    def means(self) -> dict[str, float]:  # the mean per step; "correct" becomes "acc", per image
        return {("acc" if k == "correct" else k): float(v) / (self.images if k == "correct" else self.counts[k]) for k, v in self.sums.items()}


class Trainer:
    """Trains ``model`` on ``data`` as ``cfg`` says into ``out_dir``, on ``runtime.device``: the optimizer holds the
    ``cfg.trainable`` parameters, ``cfg.freeze_bn_stats`` fixes the frozen modules' BatchNorm statistics."""

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
        self.model = model.to(self.device, memory_format=torch.channels_last if self.runtime.channels_last else torch.preserve_format)
        try:
            self.trainable = set_trainable(self.model, cfg.trainable)
        except ValueError as err:
            raise ConfigError(f"config key 'trainable': {err}") from None
        self.frozen_bn = frozen_batchnorms(self.model) if cfg.freeze_bn_stats else []
        self.ema = WeightEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.optimizer = build_optimizer(cfg, self.trainable, self.model)
        resets = getattr(self.model, "reset_modules", list)()
        self.skip_reward = self._build_skip_reward(resets)
        self.reset_names = [n for n, m in self.model.named_modules() if any(m is r for r in resets)]
        self.has_routing = bool(resets)
        self.steps_per_epoch = len(data.train)
        t = cfg.train
        self.total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.schedules = Schedules(cfg, self.total_steps)
        self.marginal_reduce = D.all_reduce_mean_autograd if self.runtime.distributed and cfg.regularizers.entropy.global_marginal else None
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
        self._first_bad = torch.full((), _NO_BAD_STEP, dtype=torch.int64, device=self.device)
        self._stop_signal: int | None = None
        self._session_start: float | None = None
        self._train_time, self._train_images = 0.0, 0  # this session's training time (s) and images, for the summary
        self._test_acc: float | None = None
        self._ema_test_acc: float | None = None
        self._last_train: dict | None = None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

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

    def _build_skip_reward(self, resets: Sequence[nn.Module]) -> nn.Module | None:
        sr = self.cfg.regularizers.skip_reward
        if not sr.enabled:
            return None
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
        """End the run after the current step as if its budget were spent; ``reason`` goes into the summary and
        the checkpoint. Under torchrun any rank's request stops every rank (agreed at the end of the step)."""
        if self.runtime.distributed:
            self._pending_stop = self._pending_stop or str(reason)
        else:
            self.stop_reason = str(reason)

    def _notify(self, event: str, *args: Any) -> None:
        """Call ``callback.<event>(self, *args)`` on every callback that defines it."""
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(self, *args)

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
            # Own Gumbel noise per rank from (seed, step, rank): exact resume (rank 0 keeps the checkpointed stream).
            torch.manual_seed(D.rank_seed(t.seed, step, self.runtime.rank))
        if t.batch_repeat > 1:  # every image k times in the batch: k Gumbel samples per image
            x, y = x.repeat_interleave(t.batch_repeat, dim=0), y.repeat_interleave(t.batch_repeat, dim=0)
        sched = self.schedules.apply(step, self.model, self.optimizer)
        want_routing = self._entropy_active(sched["entropy_factor"]) or self.skip_reward is not None or self._route_log_step(step + 1)
        with autocast(self.device, self.runtime.amp):
            logits, routing = self.forward_model(x, return_routing=True) if want_routing else (self.forward_model(x), [])
        logits = logits.float()
        terms = self.compute_loss(logits, y, routing, sched)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.cfg.optim.grad_clip is not None:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip).detach()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(step)
        # The first non-finite step, remembered without a host sync; checked at log/eval/checkpoint time.
        self._first_bad = torch.where(torch.isfinite(terms["loss"].detach()), self._first_bad, self._first_bad.clamp(max=step + 1))
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

    def _agree(self, value: int, op: str) -> int:
        """``value`` reduced over the ranks with ``op`` ("max" or "min"), a collective every rank calls at the same step; itself in one process."""
        if not self.runtime.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        D.dist.all_reduce(t, op=D.dist.ReduceOp.MAX if op == "max" else D.dist.ReduceOp.MIN)
        return int(t.item())

    def _agree_stop(self) -> None:
        """Under torchrun, a stop requested on any rank during this step stops every rank now."""
        pending, self._pending_stop = self._pending_stop, None
        if self._agree(int(pending is not None), "max"):
            reasons: list[Any] = [None] * self.runtime.world_size
            D.dist.all_gather_object(reasons, pending)
            self.stop_reason = next(r for r in reasons if r is not None)

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteLoss` when the loss of a step was NaN/inf on any rank; synchronises with the device."""
        bad = self._agree(int(self._first_bad), "min")
        if bad >= _NO_BAD_STEP:
            return
        kept = f"the last good checkpoint in {self.out_dir} was kept" if ckpt_io.checkpoint_exists(self.out_dir) else "no checkpoint was written"
        raise NonFiniteLoss(
            f"non-finite loss at step {bad} (lr {self.schedules.values(bad - 1)['lr']:.3g}); training stopped, {kept}. "
            "Lower optim.lr, set optim.grad_clip, or check the data.",
            step=bad,
            summary=self.summary("nonfinite"),
        )

    def run_eval(self, loader: Any = None, split: str | None = None) -> dict[str, Any]:
        """Evaluate on ``loader`` (default: the periodic eval set; sharded over the ranks under torchrun), log an ``eval`` row, track the best."""
        loader, split = loader if loader is not None else self.data.eval, split or self.data.eval_split
        res = D.evaluate_sharded(self.model, loader, self.runtime, amp=self.runtime.amp)
        self.set_train_mode()
        row = {"split": split, "acc": res["acc"], "loss": res["loss"], "n": res["n"], "per_class_acc": res["per_class_acc"]}
        if split == self.data.eval_split and (not self.best or res["acc"] > self.best["acc"]):
            self.best = {"acc": res["acc"], "step": self.step, "split": split}
        row["best_acc"] = self.best.get("acc")
        self.last_eval = {"step": self.step, **{k: row[k] for k in ("split", "acc", "loss", "n")}}
        self.logger.log("eval", self.step, row)
        self._notify("on_eval", self.step, res)
        return res

    def checkpoint_meta(self) -> dict[str, Any]:
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        loader = dict(epoch=epoch, batch=batch, global_step=self.step, steps_per_epoch=self.steps_per_epoch, batch_size=self.data.train.batch_size)
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "epoch": epoch,
            "total_steps": self.total_steps,
            "schedule": self.schedules.values(self.step),
            "loader": loader,
            "rng": ckpt_io.rng_state(),
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
        aux = {k: m for k, m in (("skip_reward", self.skip_reward), ("ema", self.ema and self.ema.module)) if m is not None}
        tensors = ckpt_io.checkpoint_tensors(self.model, self.optimizer, aux)
        bad = ckpt_io.nonfinite_tensors(tensors)
        if bad:
            kept = f"the previous checkpoint in {self.out_dir} was kept" if ckpt_io.checkpoint_exists(self.out_dir) else "no checkpoint was written"
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            raise NonFiniteWeights(
                f"non-finite weights at step {self.step}: {len(bad)} of {len(tensors)} model/optimizer tensors hold "
                f"NaN/Inf (first: {shown}); the checkpoint was not written, {kept}. Lower optim.lr or set optim.grad_clip.",
                step=self.step,
                tensors=bad,
                summary=self.summary("nonfinite"),
            )
        if not self.runtime.is_main:
            return None
        return ckpt_io.save_checkpoint(self.out_dir, self.model, self.checkpoint_meta(), self.optimizer, aux, check_finite=False)

    def restore(self, ckpt: ckpt_io.Checkpoint) -> None:
        """Continue exactly from ``ckpt``: weights, optimizer, skip-reward baseline, step, RNG."""
        ckpt_io.load_weights(self.model, ckpt, strict=True)
        ckpt_io.optimizer_from_parts(self.optimizer, {k: v for k, v in ckpt.tensors.items() if k.startswith("optim/")}, ckpt.meta["optimizer"])
        if self.skip_reward is not None:
            self.skip_reward.load_state_dict(ckpt.section("aux/skip_reward"))
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt.section("aux/ema"))
        meta = ckpt.meta
        self.step, self.best, self.last_eval = int(meta["step"]), dict(meta.get("best") or {}), meta.get("last_eval")
        self.elapsed, self.stop_reason = float(meta.get("elapsed_s", 0.0)), meta.get("stop_reason")
        ckpt_io.set_rng_state(meta["rng"])

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
            "ema_test_acc": self._ema_test_acc,
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
            loss, acc = stats.get("loss", float("nan")), stats.get("acc", 0)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", lr=f"{sched['lr']:.3g}", img_s=f"{ips or 0:.0f}", refresh=False)

    def train_steps(self, stop_at: int, bar: Any = None) -> None:
        """The training loop from ``self.step`` to ``stop_at`` (or an early stop): steps, logging, periodic evaluation
        and checkpoints, signals. :meth:`fit` adds the set-up and the final evaluation; ``benchmarks/train_step.py`` times it."""
        t = self.cfg.train
        window, batches = _Window(), self.data.train.batches(self.step)
        tick = time.perf_counter()
        while self.step < stop_at and self.stop_reason is None:
            self._stop_on_signal()
            _, _, x, y = next(batches)
            stats = self.train_step(x, y)
            self.step += 1
            window.add(stats, int(y.shape[0]))
            if bar is not None:
                bar.update(1)
            self._notify("on_step_end", self.step, stats)
            if self.runtime.distributed and self.callbacks:
                self._agree_stop()
            ending = self.step == stop_at or self.stop_reason is not None
            log_now = self.step % t.log_every == 0 or ending
            eval_now = t.eval_every > 0 and self.step % t.eval_every == 0 and self.step < self.total_steps and self.stop_reason is None
            ckpt_now = t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and not ending
            if not (log_now or eval_now or ckpt_now):
                continue
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
        """Train from ``self.step`` to the budget (or ``train.stop_after`` more steps); returns the summary. Raises
        :class:`NonFiniteLoss` / :class:`NonFiniteWeights` or :class:`TrainingInterrupted` (checkpoint saved)."""
        if self.runtime.distributed and self._agree(self.step, "max") != self._agree(self.step, "min"):
            raise RuntimeError("ranks start at different steps: every rank must read the same checkpoint; put --out on a file system all nodes see")
        stop_at = self.total_steps if self.cfg.train.stop_after is None else min(self.total_steps, self.step + self.cfg.train.stop_after)
        self._session_start = time.perf_counter()
        self._train_time, self._train_images = 0.0, 0
        previous = self._install_signal_handlers()
        bar = self._progress_bar()
        self.set_train_mode()
        try:
            self._notify("on_fit_start")
            self.train_steps(stop_at, bar)
            self._check_finite()
            done = self.step >= self.total_steps or self.stop_reason is not None
            if done:
                if self.last_eval is None or self.last_eval["step"] != self.step:
                    self.run_eval()
                test = self.data.test
                self._test_acc = self.run_eval(test, "test")["acc"] if test is not None and test is not self.data.eval else self.last_eval["acc"]
                if self.ema is not None and test is not None:  # reported beside, never instead of, the trained weights' accuracy
                    res = D.evaluate_sharded(self.ema.module, test, self.runtime, amp=self.runtime.amp)
                    self._ema_test_acc = res["acc"]
                    self.logger.log("eval", self.step, {"split": "test_ema", **{k: res[k] for k in ("acc", "loss", "n", "per_class_acc")}})
            self.save_checkpoint()
            summary = self.summary("completed" if done else "paused")
            self._notify("on_fit_end", summary)
            D.barrier()  # rank 0 has written its checkpoint: a following train() on any rank may read it
            return summary
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if bar is not None:
                bar.close()
            self.logger.close()

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now, without a checkpoint
                raise TrainingInterrupted(
                    f"a second {signal.Signals(signum).name}: stopped at once, without saving; the last "
                    f"checkpoint in {self.out_dir} (if any) is kept; rerun with --resume to continue",
                    signum=signum,
                )
            self._stop_signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop_on_signal(self) -> None:
        """After SIGINT/SIGTERM: save a checkpoint and raise :class:`TrainingInterrupted`. Under torchrun the ranks agree on the
        signal (the largest over the ranks) every :data:`STOP_CHECK_EVERY` steps, so every rank stops at the same step with the same code."""
        if self.runtime.distributed and self.step % STOP_CHECK_EVERY:
            return
        signum = self._agree(self._stop_signal or 0, "max")
        if not signum:
            return
        self._check_finite()
        path = self.save_checkpoint()
        raise TrainingInterrupted(
            f"{signal.Signals(signum).name} received: checkpoint saved at step {self.step} in "
            f"{path.parent if path else self.out_dir}; rerun with --resume to continue",
            signum=signum,
            summary=self.summary("interrupted"),
        )


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
    """Train a model as ``config`` (a :class:`Config`, a raw mapping, a shipped config name or a YAML path) says into ``out_dir``
    (checkpoint, ``metrics.jsonl``, ``tb/``, ``config.yaml``); returns the summary dict. Data come from ``data_dir`` (default
    ``$RESETNET_DATA`` or ``~/.cache/resetnet``) or ``arrays`` (``{"train": (x, y), "test": (x, y)}``). ``resume`` continues the run
    in ``out_dir`` from its checkpoint (if any); without it, an ``out_dir`` holding one is an error. The main process checks that
    ``out_dir`` can be written and holds its lock (``out_dir/.lock``) for the whole call; a run that fails before writing anything
    removes the directories it created. Raises ``UserError`` subclasses, :class:`NonFiniteLoss`, :class:`TrainingInterrupted`."""
    cfg, out_dir = load_config(config), Path(out_dir)
    require("safetensors.torch", "train", "writing a checkpoint")  # before any work, not at the first checkpoint
    main_process = runtime.is_main if runtime is not None else os.environ.get("RANK", "0").strip() in ("", "0")
    created = prepare_run_dir(out_dir) if main_process else []
    lock = RunLock(out_dir).acquire() if main_process else None
    try:
        ckpt = None
        if ckpt_io.checkpoint_exists(out_dir):
            if not resume:
                raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
            ckpt = ckpt_io.read_checkpoint(out_dir)
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
            report = ckpt_io.load_weights(model, cfg.init_from.path, strict=cfg.init_from.strict)
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
