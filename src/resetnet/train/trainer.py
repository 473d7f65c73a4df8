"""The training loop: builders, :class:`Trainer` and the :func:`train` entry point.

Small, composable pieces::

    cfg = load_config("reset38", ["train.iterations=1000"])
    runtime = resolve_runtime(cfg)                  # device, amp, channels_last, rank, world size
    data = build_data(cfg, runtime, data_dir)       # DeviceLoaders (or arrays=... for tests)
    model = build_model(cfg)                        # seeded; create_model(name, **overrides)
    trainer = Trainer(cfg, model, data, out_dir, runtime)
    summary = trainer.fit()

:func:`train` does all of this plus ``init_from``, resume and config bookkeeping; it is
what ``resetnet train`` and the staged pipelines call.

Extension points for distributed training (torchrun) and pipelines:

* :class:`Runtime` carries ``rank``/``world_size``; only ``runtime.is_main`` writes
  metrics, checkpoints and the progress bar. The loaders shard each global batch.
* :meth:`Trainer.wrap_model` (default: ``torch.compile`` when ``train.compile``) is where
  a subclass wraps the model in DDP; :meth:`Trainer.should_stop` is where a subclass
  agrees on a stop signal across ranks; :meth:`Trainer.reduce_stats` averages logged
  statistics across ranks.
* ``marginal_reduce``: with ``regularizers.entropy.global_marginal`` the batch marginal
  of the entropy regularizer goes through it (default with world_size > 1:
  :func:`distributed_mean`, an autograd-aware all-reduce mean).
* ``loss_hooks``: callables ``hook(trainer, logits, y, routing) -> {name: scalar tensor}``;
  their terms are added to the loss and logged.
* ``callbacks``: objects with optional ``on_fit_start(trainer)``,
  ``on_step_end(trainer, step, stats)``, ``on_eval(trainer, step, result)`` and
  ``on_fit_end(trainer, summary)``. A callback may call :meth:`Trainer.request_stop`
  to end the run early (final evaluation and checkpoint, ``stop_reason`` in the summary).
* :meth:`Trainer.evaluate_loader` (sharded evaluation), :meth:`Trainer.first_nonfinite_step`
  (agree on the first non-finite step across ranks).
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from .checkpoint import (
    Checkpoint, checkpoint_exists, load_weights, optimizer_from_parts, read_checkpoint, rng_state, save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, diff_configs, load_config, merge, defaults, validate
from .evaluate import autocast, count_parameters, evaluate
from .metrics import MetricsLogger, NullLogger, truncate_metrics
from .params import frozen_batchnorms, set_frozen_bn_eval, set_trainable
from .schedules import Schedules
from ..losses import entropy_regularizer

__all__ = [
    "TrainingStopped", "NonFiniteLoss", "TrainingInterrupted", "Runtime", "DataBundle", "resolve_runtime",
    "build_model", "build_optimizer", "load_arrays", "build_data", "count_total_steps", "routing_stats",
    "distributed_mean", "launch_runtime", "Trainer", "train", "RESUME_TOLERATED_KEYS",
]

#: Config keys that may differ between a run and its resumption (they do not change the result).
RESUME_TOLERATED_KEYS = (
    "train.progress", "train.tensorboard", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.stop_after", "train.compile", "train.device", "train.dist_timeout_s", "data.download", "data.verify",
)


# ----------------------------------------------------------------------------- errors
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


class TrainingInterrupted(TrainingStopped):
    """SIGINT/SIGTERM: a checkpoint was saved; rerun with ``--resume`` to continue."""

    def __init__(self, message: str, signum: int, summary: dict | None = None) -> None:
        super().__init__(message, summary)
        self.signum = signum


# ----------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where and how a process trains."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_runtime(cfg: Mapping[str, Any], rank: int = 0, world_size: int = 1, device: str | torch.device | None = None) -> Runtime:
    """Device (``train.device``; auto: CUDA if present), bf16 autocast and channels_last (auto: on CUDA)."""
    spec = device if device is not None else cfg["train"]["device"]
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"config key 'train.device': {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'train.device': {spec!r} requested but CUDA is not available")
    cuda = dev.type == "cuda"
    amp = cfg["train"]["amp"]
    cl = cfg["train"]["channels_last"]
    # auto: on CUDA only. An explicit true also autocasts on the CPU (bf16 there is slow on most
    # CPUs; it runs the GPU's mixed-precision numerics where no GPU is, e.g. in tests).
    return Runtime(dev, amp=cuda if amp == "auto" else bool(amp), channels_last=cuda if cl == "auto" else bool(cl), rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------- builders
def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """``create_model(model.name, **model.overrides)`` after seeding torch with ``train.seed``."""
    from ..models import create_model

    torch.manual_seed(cfg["train"]["seed"])
    try:
        return create_model(cfg["model"]["name"], **cfg["model"]["overrides"])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key 'model': cannot build {cfg['model']['name']!r}: {err}") from None


def build_optimizer(cfg: Mapping[str, Any], params: Iterable[nn.Parameter] | nn.Module) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov, weight decay) or Adam from ``optim``; ``params`` may be a model."""
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    params = list(params)
    if not params:
        raise ConfigError("config key 'trainable': no trainable parameters selected")
    o = cfg["optim"]
    if o["name"] == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"] and o["momentum"] > 0)
    if o["name"] == "adam":
        return torch.optim.Adam(params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])
    raise ConfigError(f"config key 'optim.name': unknown optimizer {o['name']!r}; valid values: sgd, adam")  # pragma: no cover


@dataclass
class DataBundle:
    """The loaders of a run: ``train``, ``eval`` (periodic evaluation, ``eval_split`` "test" or
    "val") and ``test`` (the final test evaluation; the same object as ``eval`` when it is the test set)."""

    train: Any
    eval: Any
    eval_split: str = "test"
    test: Any = None

    def __post_init__(self) -> None:
        if self.test is None and self.eval_split == "test":
            self.test = self.eval


def load_arrays(cfg: Mapping[str, Any], data_dir: str | os.PathLike[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """CIFAR-10 ``train``/``test`` arrays from the data dir (raises ``resetnet.data.DataError``)."""
    from ..data import load_cifar10, resolve_data_dir

    root = resolve_data_dir(data_dir)
    d = cfg["data"]
    train = load_cifar10(root, "train", download=d["download"], verify=d["verify"])
    test = load_cifar10(root, "test", download=d["download"], verify=d["verify"])
    return {"train": train, "test": test}


def build_data(
    cfg: Mapping[str, Any],
    runtime: Runtime,
    data_dir: str | os.PathLike[str] | None = None,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> DataBundle:
    """Device-resident loaders for ``cfg``. ``arrays`` (``{"train": (x, y), "test": (x, y)}``,
    uint8 NHWC images) replaces the files, e.g. for tests."""
    from ..data import DeviceLoader, train_val_split

    arrays = dict(arrays) if arrays is not None else load_arrays(cfg, data_dir)
    d, t = cfg["data"], cfg["train"]
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    val = None
    if d["val_split"] > 0:
        if d["val_split"] >= len(train_y):
            raise ConfigError(f"config key 'data.val_split': {d['val_split']} >= the {len(train_y)} training images")
        train_x, train_y, vx, vy = train_val_split(train_x, train_y, d["val_split"], d["split_seed"])
        val = (vx, vy)
    common = dict(device=runtime.device, channels_last=runtime.channels_last)
    try:
        train_loader = DeviceLoader(
            train_x, train_y, t["batch_size"], train=True, seed=t["seed"], augment=d["augment"],
            rank=runtime.rank, world_size=runtime.world_size, limit=d["limit_train"], **common,
        )
    except ValueError as err:
        raise ConfigError(f"config keys 'train.batch_size'/'data.limit_train': {err}") from None

    def eval_loader(x, y):
        return DeviceLoader(x, y, t["eval_batch_size"], train=False, limit=d["limit_test"], **common)

    test = eval_loader(test_x, test_y)
    if val is not None:
        return DataBundle(train=train_loader, eval=eval_loader(*val), eval_split="val", test=test)
    return DataBundle(train=train_loader, eval=test, eval_split="test", test=test)


def count_total_steps(cfg: Mapping[str, Any], steps_per_epoch: int) -> int:
    """The budget in optimizer steps: ``train.iterations``, or ``ceil(train.epochs * steps_per_epoch)``."""
    t = cfg["train"]
    if t["iterations"] is not None:
        return int(t["iterations"])
    return max(1, math.ceil(t["epochs"] * steps_per_epoch))


def distributed_mean(marginal: torch.Tensor) -> torch.Tensor:
    """All-reduce mean over the process group, differentiable (for a global entropy marginal)."""
    from .distributed import all_reduce_mean_autograd

    return all_reduce_mean_autograd(marginal)


def launch_runtime(cfg: Mapping[str, Any]) -> Runtime:
    """This process's runtime: under torchrun (``WORLD_SIZE`` > 1) join the process group
    (``resetnet.train.distributed.init_distributed``) and train as rank ``RANK`` on
    ``cuda:LOCAL_RANK`` (or CPU/gloo); otherwise :func:`resolve_runtime`."""
    from .distributed import env_world_size, init_distributed

    runtime = resolve_runtime(cfg)  # validates train.device
    if env_world_size() <= 1:
        return runtime
    ctx = init_distributed(timeout_s=cfg["train"]["dist_timeout_s"], device=runtime.device.type)
    return resolve_runtime(cfg, ctx.rank, ctx.world_size, device=ctx.device)


@torch.no_grad()
def routing_stats(routing: Sequence[Any]) -> dict[str, Any]:
    """Per-module routing statistics of one batch (the ``routing`` metrics row).

    ``mean_weights[module][iteration][unit]``: batch mean of the scorer weights, the zero
    unit last when present; ``entropy_batch``/``entropy_sample``: the two terms of Eq. 13
    per module; ``skip_rate``: fraction of (sample, iteration) pairs routed to the zero
    unit alone; ``zero_weight``: mean weight of the zero unit (None without one).
    """
    from ..losses import entropy_terms

    out: dict[str, Any] = {"mean_weights": [], "entropy_batch": [], "entropy_sample": [], "skip_rate": [], "zero_weight": [], "zero_unit": []}
    for r in routing:
        w = r.weights.detach().float()
        hb, hs = entropy_terms([w])
        out["mean_weights"].append(w.mean(dim=0).cpu().tolist())
        out["entropy_batch"].append(float(hb))
        out["entropy_sample"].append(float(hs))
        out["skip_rate"].append(float(r.skip_mask().float().mean()))
        out["zero_weight"].append(float(w[..., -1].mean()) if r.zero_unit else None)
        out["zero_unit"].append(bool(r.zero_unit))
    return out


# ----------------------------------------------------------------------------- trainer
@dataclass
class _Window:
    """Training statistics accumulated on the device between two log steps (no syncs)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # steps that reported each key
    steps: int = 0
    images: int = 0

    def add(self, stats: Mapping[str, torch.Tensor], images: int) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1
        self.images += images

    def means(self) -> dict[str, float]:
        out = {}
        for k, v in self.sums.items():
            if k == "correct":
                out["acc"] = float(v) / max(self.images, 1)
            else:
                out[k] = float(v) / self.counts[k]
        return out


class Trainer:
    """Trains ``model`` on ``data`` as ``cfg`` says, writing into ``out_dir``.

    The model is moved to ``runtime.device`` (channels_last when asked); the
    trainable groups are selected (``trainable``), BatchNorm statistics of frozen
    modules are fixed (``freeze_bn_stats``), and the optimizer is built over the
    trainable parameters. ``fit()`` runs from ``self.step`` to the budget.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        model: nn.Module,
        data: DataBundle,
        out_dir: str | os.PathLike[str],
        runtime: Runtime | None = None,
        *,
        marginal_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        loss_hooks: Sequence[Callable[..., Mapping[str, torch.Tensor]]] = (),
        callbacks: Sequence[Any] = (),
        logger: Any = None,
    ) -> None:
        self.cfg = cfg
        self.runtime = runtime or resolve_runtime(cfg)
        self.device = self.runtime.device
        self.out_dir = Path(out_dir)
        self.data = data
        self.model = model.to(self.device)
        if self.runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        try:
            self.trainable = set_trainable(self.model, cfg["trainable"])
        except ValueError as err:
            raise ConfigError(f"config key 'trainable': {err}") from None
        self.frozen_bn = frozen_batchnorms(self.model) if cfg["freeze_bn_stats"] else []
        self.optimizer = build_optimizer(cfg, self.trainable)
        self.skip_reward = self._build_skip_reward()
        resets = {id(m) for m in getattr(self.model, "reset_modules", lambda: [])()}
        self.reset_names = [n for n, m in self.model.named_modules() if id(m) in resets]
        self.has_routing = bool(resets)
        self.steps_per_epoch = len(data.train)
        self.total_steps = count_total_steps(cfg, self.steps_per_epoch)
        self.schedules = Schedules(cfg, self.total_steps)
        ent = cfg["regularizers"]["entropy"]
        if marginal_reduce is None and ent["global_marginal"] and self.runtime.world_size > 1:
            marginal_reduce = distributed_mean
        self.marginal_reduce = marginal_reduce if ent["global_marginal"] else None
        self.loss_hooks = list(loss_hooks)
        self.callbacks = list(callbacks)
        self.logger = logger if logger is not None else (
            MetricsLogger(self.out_dir, tensorboard=cfg["train"]["tensorboard"]) if self.runtime.is_main else NullLogger()
        )
        self.forward_model = self.wrap_model(self.model)
        self.step = 0
        self.best: dict[str, Any] = {}
        self.last_eval: dict[str, Any] | None = None
        self.elapsed = 0.0  # seconds of training in earlier invocations (resume)
        self.stop_reason: str | None = None  # set by request_stop()
        self._first_bad = torch.full((), 2**62, dtype=torch.int64, device=self.device)
        self._stop_signal: int | None = None
        self._train_time, self._train_images = 0.0, 0
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    # ------------------------------------------------------------- extension points
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module called in the training forward pass (compiled when ``train.compile``)."""
        return torch.compile(model) if self.cfg["train"]["compile"] else model

    def should_stop(self) -> bool:
        """Whether a stop signal arrived (a distributed subclass agrees on it across ranks)."""
        return self._stop_signal is not None

    def reduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Average logged statistics across ranks (identity in one process)."""
        return stats

    def evaluate_loader(self, loader: Any) -> dict[str, Any]:
        """:func:`~resetnet.train.evaluate.evaluate` of the model on ``loader`` (a distributed
        subclass shards it and gathers the result)."""
        return evaluate(self.model, loader, amp=self.runtime.amp)

    def request_stop(self, reason: str) -> None:
        """End the run after the current step as if its budget were spent (final evaluation and
        checkpoint); ``reason`` goes into the summary and the checkpoint as ``stop_reason``.
        For early-stop callbacks (e.g. converged routes)."""
        self.stop_reason = str(reason)

    # ------------------------------------------------------------- pieces
    def _build_skip_reward(self) -> nn.Module | None:
        sr = self.cfg["regularizers"]["skip_reward"]
        if not sr["enabled"]:
            return None
        from ..losses import HybridSkipReward

        resets = getattr(self.model, "reset_modules", lambda: [])()
        if not resets or not all(getattr(m.scorer, "sparse", False) and getattr(m.scorer, "stochastic", False) for m in resets):
            raise ConfigError(
                "config key 'regularizers.skip_reward.enabled': the Hybrid-RL skip term (Eq. 9) is a REINFORCE estimate, "
                "so every ReSet module needs a hard scorer that samples its route (model.overrides.scorer: gumbel_st)"
            )
        if not all(m.zero_unit for m in resets):
            raise ConfigError("config key 'regularizers.skip_reward.enabled': the skip term needs ReSet modules with a zero unit")
        return HybridSkipReward(sr["reward"], sr["momentum"]).to(self.device)

    def set_train_mode(self) -> None:
        """``model.train()`` with the BatchNorm of frozen modules kept in eval mode."""
        self.model.train()
        set_frozen_bn_eval(self.frozen_bn)
        if self.skip_reward is not None:
            self.skip_reward.train()

    def _entropy_active(self, factor: float) -> bool:
        ent = self.cfg["regularizers"]["entropy"]
        return self.has_routing and factor > 0 and (ent["lambda_batch"] > 0 or ent["lambda_sample"] > 0)

    def is_routing_log_step(self, step: int) -> bool:
        every = self.cfg["train"]["route_log_every"]
        return self.has_routing and every > 0 and step % every == 0

    def needs_routing(self, step: int, sched: Mapping[str, Any]) -> bool:
        """Call the model with ``return_routing=True`` only when a loss term or the log needs it."""
        return self._entropy_active(sched["entropy_factor"]) or self.skip_reward is not None or self.is_routing_log_step(step + 1) or (self.has_routing and bool(self.loss_hooks))

    def compute_loss(self, logits: torch.Tensor, y: torch.Tensor, routing: Sequence[Any], sched: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Cross-entropy + entropy regularizer (Eq. 13) + Hybrid-RL skip term (Eq. 9) + hook terms.

        Returns a dict of scalar tensors; ``loss`` is the total to differentiate.
        """
        ce_per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=self.cfg["train"]["label_smoothing"])
        ce = ce_per_sample.mean()
        terms: dict[str, torch.Tensor] = {"ce": ce}
        loss = ce
        ent = self.cfg["regularizers"]["entropy"]
        if routing and self._entropy_active(sched["entropy_factor"]):
            f = sched["entropy_factor"]
            reg, h = entropy_regularizer(routing, ent["lambda_batch"] * f, ent["lambda_sample"] * f, self.marginal_reduce, return_terms=True)
            loss = loss + reg
            terms.update(entropy_batch=h.batch.detach(), entropy_sample=h.sample.detach(), entropy_reg=reg.detach())
        if routing and self.skip_reward is not None:
            rl, _ = self.skip_reward(routing, ce_per_sample)
            loss = loss + self.cfg["regularizers"]["skip_reward"]["weight"] * rl
            terms["skip_rl"] = rl.detach()
            terms["skip_rate"] = torch.cat([r.skip_mask().float().flatten() for r in routing]).mean()
        for hook in self.loss_hooks:
            for name, value in hook(self, logits, y, routing).items():
                loss = loss + value
                terms[name] = value.detach()
        terms["loss"] = loss
        return terms

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One update at ``self.step`` (0-based index of the batch); returns detached statistics."""
        step = self.step
        repeat = self.cfg["train"]["batch_repeat"]
        if repeat > 1:  # every image k times in the batch: k Gumbel samples per image
            x, y = x.repeat_interleave(repeat, dim=0), y.repeat_interleave(repeat, dim=0)
        sched = self.schedules.apply(step, self.model, self.optimizer)
        want_routing = self.needs_routing(step, sched)
        with autocast(self.device, self.runtime.amp):
            out = self.forward_model(x, return_routing=True) if want_routing else self.forward_model(x)
        logits, routing = out if want_routing else (out, [])
        logits = logits.float()
        terms = self.compute_loss(logits, y, routing, sched)
        loss = terms["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.cfg["optim"]["grad_clip"]
        if clip is not None:
            terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, clip).detach()
        self.optimizer.step()
        # Remember the first non-finite step without a host sync; checked at log/eval/checkpoint time.
        bad = torch.where(torch.isfinite(loss.detach()), torch.full_like(self._first_bad, 2**62), torch.full_like(self._first_bad, step + 1))
        self._first_bad = torch.minimum(self._first_bad, bad)
        stats = {k: v.detach().float() for k, v in terms.items()}
        stats["correct"] = (logits.detach().argmax(dim=1) == y).sum().float() / repeat  # per image
        if routing and self.is_routing_log_step(step + 1) and self.runtime.is_main:
            row = routing_stats(routing)
            row["temperature"] = sched["temperature"]
            row["modules"] = self.reset_names
            self.logger.log("routing", step + 1, row)
        return stats

    # ------------------------------------------------------------- eval / state
    def run_eval(self, loader: Any = None, split: str | None = None, log: bool = True) -> dict[str, Any]:
        """Evaluate on ``loader`` (default: the periodic eval set), log an ``eval`` row, track the best."""
        loader = loader if loader is not None else self.data.eval
        split = split or self.data.eval_split
        res = self.evaluate_loader(loader)
        self.set_train_mode()
        row = {"split": split, "acc": res["acc"], "loss": res["loss"], "n": res["n"], "per_class_acc": res["per_class_acc"]}
        if split == self.data.eval_split and (not self.best or res["acc"] > self.best["acc"]):
            self.best = {"acc": res["acc"], "step": self.step, "split": split}
        row["best_acc"] = self.best.get("acc")
        self.last_eval = {"step": self.step, **{k: row[k] for k in ("split", "acc", "loss", "n")}}
        if log:
            self.logger.log("eval", self.step, row)
        for cb in self.callbacks:
            if hasattr(cb, "on_eval"):
                cb.on_eval(self, self.step, res)
        return res

    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss was NaN/inf, or None (synchronises with the device)."""
        v = int(self._first_bad)
        return None if v >= 2**62 else v

    def checkpoint_meta(self) -> dict[str, Any]:
        loader = self.data.train
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        return {
            "config": self.cfg,
            "step": self.step,
            "epoch": epoch,
            "total_steps": self.total_steps,
            "schedule": self.schedules.values(self.step),
            "loader": {"epoch": epoch, "batch": batch, "global_step": self.step, "steps_per_epoch": self.steps_per_epoch, "batch_size": loader.batch_size},
            "rng": rng_state(),
            "best": self.best,
            "last_eval": self.last_eval,
            "stop_reason": self.stop_reason,
            "elapsed_s": self.elapsed + self._session_time(),
            "world_size": self.runtime.world_size,
            "model": {"name": self.cfg["model"]["name"], "params": count_parameters(self.model)},
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (main process only) and make it the current one.

        Every process first checks the model's parameters and buffers, the optimizer state
        and the aux modules for NaN/Inf (one fused check, one host sync; the replicas are
        equal, so every rank stops together): a diverged state is never written and raises
        :class:`NonFiniteLoss` (``.tensors`` names them), the previous checkpoint kept.
        """
        from .checkpoint import checkpoint_tensors, nonfinite_tensors

        aux = {"skip_reward": self.skip_reward} if self.skip_reward is not None else None
        tensors = checkpoint_tensors(self.model, self.optimizer, aux)
        bad = nonfinite_tensors(tensors)
        if bad:
            kept = f"the previous checkpoint in {self.out_dir} was kept" if checkpoint_exists(self.out_dir) else "no checkpoint was written"
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            err = NonFiniteLoss(
                f"non-finite weights at step {self.step}: {len(bad)} of {len(tensors)} model/optimizer tensors hold NaN/Inf "
                f"(first: {shown}); the checkpoint was not written, {kept}. "
                "Lower optim.lr or set optim.grad_clip.",
                step=self.step, summary=self.summary("nonfinite"),
            )
            err.tensors = bad
            raise err
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
        self.step = int(meta["step"])
        self.best = dict(meta.get("best") or {})
        self.last_eval = meta.get("last_eval")
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        self.stop_reason = meta.get("stop_reason")
        set_rng_state(meta["rng"])

    # ------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: Mapping[int, Any]) -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    # ------------------------------------------------------------- loop
    def _session_time(self) -> float:
        start = getattr(self, "_session_start", None)
        return 0.0 if start is None else time.perf_counter() - start

    def summary(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "out_dir": str(self.out_dir),
            "model": self.cfg["model"]["name"],
            "params": count_parameters(self.model),
            "device": str(self.device),
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.step / max(self.steps_per_epoch, 1),
            "best": self.best,
            "last_eval": self.last_eval,
            "stop_reason": self.stop_reason,
            "test_acc": getattr(self, "_test_acc", None),
            "train": getattr(self, "_last_train", None),
            "wall_s": self._session_time(),
            "train_s": getattr(self, "_train_time", 0.0),
            "images_per_s": getattr(self, "_train_images", 0) / max(getattr(self, "_train_time", 0.0), 1e-9) if getattr(self, "_train_images", 0) else None,
        }

    def _check_finite(self) -> None:
        bad = self.first_nonfinite_step()
        if bad is None:
            return
        kept = f"the last good checkpoint in {self.out_dir} was kept" if checkpoint_exists(self.out_dir) else "no checkpoint was written"
        raise NonFiniteLoss(
            f"non-finite loss at step {bad} (lr {self.schedules.values(bad - 1)['lr']:.3g}); training stopped, {kept}. "
            "Lower optim.lr, set optim.grad_clip, or check the data.",
            step=bad, summary=self.summary("nonfinite"),
        )

    def _log_train(self, window: _Window, dt: float, sched: Mapping[str, Any], bar: Any) -> None:
        stats = self.reduce_stats(window.means())
        ips = window.images * self.runtime.world_size / dt if dt > 0 else None
        row = {**stats, "lr": sched["lr"], "images_per_s": ips, "epoch": self.step / self.steps_per_epoch}
        if sched["temperature"] is not None:
            row["temperature"] = sched["temperature"]
        if self._entropy_active(sched["entropy_factor"]) or self.cfg["regularizers"]["entropy"]["lambda_batch"] or self.cfg["regularizers"]["entropy"]["lambda_sample"]:
            row["entropy_factor"] = sched["entropy_factor"]
        self._last_train = {"step": self.step, **row}
        self.logger.log("train", self.step, row)
        if bar is not None:
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.3f}", acc=f"{stats.get('acc', 0):.3f}", lr=f"{sched['lr']:.3g}", img_s=f"{ips or 0:.0f}", refresh=False)

    def fit(self) -> dict[str, Any]:
        """Train from ``self.step`` to the budget (or ``train.stop_after`` more steps).

        Returns the summary. Raises :class:`NonFiniteLoss` (last good checkpoint kept) or
        :class:`TrainingInterrupted` (checkpoint saved at the current step).
        """
        t = self.cfg["train"]
        total = self.total_steps
        stop_at = total if t["stop_after"] is None else min(total, self.step + t["stop_after"])
        self._session_start = time.perf_counter()
        self._train_time, self._train_images = 0.0, 0
        previous = self._install_signal_handlers()
        bar = None
        if self.runtime.is_main and t["progress"]:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc=self.cfg["model"]["name"], file=sys.stderr)
        self.set_train_mode()
        try:
            for cb in self.callbacks:
                if hasattr(cb, "on_fit_start"):
                    cb.on_fit_start(self)
            self.train_steps(stop_at, bar)
            self._check_finite()
            if self.step >= total or self.stop_reason is not None:
                if self.last_eval is None or self.last_eval["step"] != self.step:
                    self.run_eval()
                if self.data.test is not None and self.data.test is not self.data.eval:
                    self._test_acc = self.run_eval(self.data.test, "test")["acc"]
                elif self.last_eval is not None:
                    self._test_acc = self.last_eval["acc"]
                status = "completed"
            else:
                status = "paused"
            self.save_checkpoint()
            summary = self.summary(status)
            for cb in self.callbacks:
                if hasattr(cb, "on_fit_end"):
                    cb.on_fit_end(self, summary)
            return summary
        finally:
            self._restore_signal_handlers(previous)
            if bar is not None:
                bar.close()
            self.logger.close()

    def train_steps(self, stop_at: int, bar: Any = None) -> None:
        """The training loop from ``self.step`` to ``stop_at`` (or an early stop): steps, logging,
        periodic evaluation and checkpoints, signals. :meth:`fit` wraps it with the set-up and the
        final evaluation; ``benchmarks/train_step.py`` times it."""
        t = self.cfg["train"]
        total = self.total_steps
        window = _Window()
        batches = self.data.train.batches(self.step)
        tick = time.perf_counter()
        while self.step < stop_at and self.stop_reason is None:
            if self.should_stop():
                self._interrupt(bar)
            _, _, x, y = next(batches)
            stats = self.train_step(x, y)
            self.step += 1
            window.add(stats, int(y.shape[0]))
            if bar is not None:
                bar.update(1)
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self, self.step, stats)
            ending = self.step == stop_at or self.stop_reason is not None
            log_now = self.step % t["log_every"] == 0 or ending
            eval_now = t["eval_every"] > 0 and self.step % t["eval_every"] == 0 and self.step < total and self.stop_reason is None
            ckpt_now = t["checkpoint_every"] > 0 and self.step % t["checkpoint_every"] == 0 and not ending
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

    def _interrupt(self, bar: Any) -> None:
        signum = self._stop_signal or signal.SIGINT
        self._check_finite()
        path = self.save_checkpoint()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name} received: checkpoint saved at step {self.step} in {path.parent if path else self.out_dir}; rerun with --resume to continue",
            signum=signum, summary=self.summary("interrupted"),
        )


# ----------------------------------------------------------------------------- entry point
def _as_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict:
    if isinstance(config, Mapping):
        raw = dict(config)
        raw.pop("base", None)
        return validate(merge(defaults(), raw))
    return load_config(config)


def train(
    config: str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    runtime: Runtime | None = None,
    callbacks: Sequence[Any] = (),
    loss_hooks: Sequence[Callable[..., Mapping[str, torch.Tensor]]] = (),
    marginal_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    trainer_class: type[Trainer] = Trainer,
) -> dict[str, Any]:
    """Train a model as ``config`` says into ``out_dir``; returns the summary dict.

    Args:
        config: a config dict (merged onto the defaults and validated), a name in
            ``configs/`` or a YAML path.
        out_dir: run directory: ``checkpoint.{json,safetensors}``, ``metrics.jsonl``,
            ``tb/``, ``config.yaml``.
        data_dir: CIFAR-10 root (default ``$RESETNET_DATA`` or ``~/.cache/resetnet``).
        resume: continue the run in ``out_dir`` from its checkpoint (fresh start when there
            is none). Without it, an ``out_dir`` holding a checkpoint is an error.
        arrays: in-memory ``{"train": (x, y), "test": (x, y)}`` instead of the files.
        runtime, callbacks, loss_hooks, marginal_reduce, trainer_class: extension points
            (see the module docstring).

    Raises ``ConfigError``, ``resetnet.data.DataError``, ``CheckpointError`` (resume,
    ``init_from``), ``resetnet.train.runlock.RunDirError`` (``out_dir`` cannot be created or
    written, or another process holds its lock: ``RunDirLocked``), :class:`NonFiniteLoss`,
    :class:`TrainingInterrupted`.

    The main process (rank 0 under torchrun) checks that ``out_dir`` can be written before
    anything else and holds its lock (``out_dir/.lock``, :mod:`resetnet.train.runlock`) for
    the whole call, released on return and on every exception. A run that fails before it
    wrote anything removes the directories it created.
    """
    cfg = _as_config(config)
    out_dir = Path(out_dir)
    import struct

    from safetensors import SafetensorError

    from .checkpoint import CheckpointError
    from .hooks import config_callbacks
    from .runlock import RunLock, prepare_run_dir, remove_empty_dirs

    def read_ckpt(what: str, fn: Callable[..., Any], *a: Any, **k: Any) -> Any:
        # A truncated or foreign file raises struct/JSON/safetensors errors inside the reader: one CheckpointError.
        try:
            return fn(*a, **k)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError, struct.error, SafetensorError) as err:
            raise CheckpointError(f"{what} is not a readable checkpoint ({type(err).__name__}: {err}); it is truncated, corrupt "
                                  "or not written by resetnet train") from None

    callbacks = config_callbacks(cfg) + list(callbacks)  # phases, early stops (config) run first
    main_process = runtime.is_main if runtime is not None else os.environ.get("RANK", "0").strip() in ("", "0")
    created = prepare_run_dir(out_dir) if main_process else []  # before any data loading or training
    lock = None
    try:
        if main_process:
            lock = RunLock(out_dir).acquire()  # another live process on this out_dir: RunDirLocked
        ckpt = None
        if checkpoint_exists(out_dir):
            if not resume:
                raise ConfigError(f"{out_dir} already holds a run (checkpoint.json); pass --resume to continue it or choose another --out")
            ckpt = read_ckpt(f"the checkpoint in {out_dir}", read_checkpoint, out_dir)
            differing = [k for k in diff_configs(ckpt.meta["config"], cfg) if k not in RESUME_TOLERATED_KEYS]
            if differing:
                raise ConfigError(f"cannot resume {out_dir}: the config differs from the checkpoint's in {', '.join(differing)}; use the same config (or a new --out)")
        runtime = runtime or launch_runtime(cfg)
        if runtime.world_size > 1:  # DDP through the extension points (docs/distributed.md)
            from .distributed import distributed_trainer_class

            trainer_class = distributed_trainer_class(trainer_class)
        data = build_data(cfg, runtime, data_dir, arrays)  # first: a missing dataset fails fast
        model = build_model(cfg)
        init = cfg["init_from"]
        if init["path"] and ckpt is None:
            report = read_ckpt(f"init_from.path {init['path']}", load_weights, model, init["path"], strict=init["strict"])
            skipped = {k: v for k, v in report.items() if v}
            if skipped and runtime.is_main:
                print(f"init_from {init['path']}: not loaded: " + "; ".join(f"{len(v)} {k}" for k, v in skipped.items()), file=sys.stderr)
        if runtime.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            # Rows written after the checkpoint (or by an earlier attempt that never saved one) are redone.
            truncate_metrics(out_dir / "metrics.jsonl", int(ckpt.meta["step"]) if ckpt is not None else 0)
            if ckpt is None:
                (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        trainer = trainer_class(cfg, model, data, out_dir, runtime, marginal_reduce=marginal_reduce, loss_hooks=loss_hooks, callbacks=callbacks)
        if ckpt is not None:
            trainer.restore(ckpt)
        return trainer.fit()
    finally:
        if lock is not None:
            lock.release()
        remove_empty_dirs(created)  # only when nothing was written (a failure before the run started)
