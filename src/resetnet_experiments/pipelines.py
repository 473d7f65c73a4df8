"""The paper's training pipelines as short Python functions (Sec. 5.1, 5.3, 5.4).

A pipeline is a function ``pipeline(run, **vars)`` that calls :meth:`Runner.train` and
:meth:`Runner.transform` in order; each call is one stage, started from the previous stage's
weights unless it trains from scratch. A value ``{"smoke": a, "cpu": b, "full": c}`` is picked by
the budget (:meth:`Runner.pick`).

The runner caches stages by content: a stage's directory is named by a hash of everything that
changes its result (its checked config with the budget, recipe, seed and steps in it, its parent's
hash, its callbacks' parameters, the training data's fingerprint and the code version), so rows that
share a prefix (the pretrained Softmax ReSet-38 of Table 2 rows 8-20) train it once, a finished
stage (``stage.json``) is never retrained, an unfinished one resumes from its checkpoint, and a stage
trained on other data or by a version whose models compute something else is never reused.

| pipeline | paper | stages |
| --- | --- | --- |
| ``scratch`` | Table 2 rows 1-7, Tables 1 and 3 | one config from scratch |
| ``controller_only`` | Sec. 5.1 | ResNet -> its ReSet twin (``reset_from_resnet``) -> controllers only |
| ``relaxation`` | Sec. 5.3, Table 2 rows 9, 11-15, 17 | Softmax -> Gumbel-softmax (controllers) -> Gumbel-ST until the routes converge -> Hybrid RL to a skip rate |
| ``finetune`` | Table 2 rows 8, 10, 16 | a pretrained config, then one more stage |
| ``topk`` | Sec. 5.4.3, Table 2 rows 18-20 | pretrained Softmax -> top-k, every parameter |
| ``two_phase_fixed``, ``_convergence``, ``_progressive`` | Sec. 5.4.1 | controllers and units trained in alternating phases |
| ``incremental`` | Sec. 5.4.2 | pretrained Softmax -> stages unfrozen from the last one backwards |
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import resetnet
from resetnet.errors import ConfigError
from resetnet.models.transfer import reset_from_resnet as _transfer
from resetnet.train import Config, load_config, load_model, save_checkpoint, train
from resetnet.train.config import apply_sets, load_raw, load_recipe, merge
from resetnet.train.trainer import RESUME_TOLERATED_KEYS

from .hooks import PhaseSchedule, RouteConvergence, SkipRateTarget

__all__ = ["BUDGET_NAMES", "CODE_VERSION", "PIPELINES", "Runner", "StageResult", "data_fingerprint", "STAGE_FILE"]

log = logging.getLogger("resetnet.experiments")
BUDGET_NAMES = ("smoke", "cpu", "full")
STAGE_FILE = "stage.json"
#: Part of every stage key: bump resetnet.__version__ when a model computes something else.
CODE_VERSION = f"resetnet-{resetnet.__version__}"


def data_fingerprint(arrays: Mapping[str, Any] | None) -> str:
    """SHA-256 (16 hex digits) of the training and test arrays a pipeline trains and is judged on."""
    h = hashlib.sha256()
    for split in sorted(arrays or {}):
        for a in arrays[split]:
            a = np.ascontiguousarray(a)
            h.update(f"{split}:{a.dtype}:{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    key: str
    out_dir: Path
    summary: dict
    reused: bool
    wall_s: float
    config: Config | None = None


class _Done(Exception):
    """Raised by the runner after the stage named ``upto``: the pipeline stops there."""


class Runner:
    """Runs (or, with ``dry_run``, only plans) the stages a pipeline function asks for.

    Args:
        cache_dir: where stage directories live (``<name>-<key[:12]>``).
        budget: ``smoke``, ``cpu`` or ``full``; picks budget-mapped values.
        seed: ``train.seed`` of every training stage (a stage may fix its own).
        overrides: config overrides of every training stage (the budget's: data limits, logging).
        recipe: the recipe (``configs/recipes/NAME.yaml``) of every stage that trains from scratch with
            the recipe's optimizer; stages that continue a model and configs with another optimizer keep theirs.
        scale: multiplies every stage's step budget.
        arrays / data_dir: the data (``arrays`` in memory, else the CIFAR-10 files under ``data_dir``).
        fingerprint: the data's fingerprint (computed from ``arrays`` when not given).
        upto: stop after the stage of this name.
        dry_run: compute the stages' configs and keys without running anything.
        on_stage_end: ``fn(result)`` after each stage.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        budget: str,
        seed: int = 0,
        overrides: Mapping[str, Any] | None = None,
        recipe: str | None = None,
        scale: float = 1.0,
        arrays: Mapping[str, Any] | None = None,
        data_dir: str | None = None,
        fingerprint: str | None = None,
        upto: str | None = None,
        dry_run: bool = False,
        on_stage_end: Callable[[StageResult], None] | None = None,
        train_fn: Callable[..., dict] = train,
    ) -> None:
        if budget not in BUDGET_NAMES:
            raise ConfigError(f"unknown budget {budget!r}; valid budgets: {', '.join(BUDGET_NAMES)}")
        self.cache_dir, self.budget, self.seed = Path(cache_dir), budget, seed
        self.overrides, self.recipe = dict(overrides or {}), load_recipe(recipe) if recipe else None
        self.scale, self.arrays, self.data_dir, self.upto, self.dry_run = scale, arrays, data_dir, upto, dry_run
        self.fingerprint = fingerprint or (data_fingerprint(arrays) if arrays is not None else f"data-dir:{data_dir}")
        self.on_stage_end, self.train_fn = on_stage_end, train_fn
        self.stages: list[StageResult] = []

    # ------------------------------------------------------------- values
    def pick(self, value: Any) -> Any:
        """``value``, or its entry for this budget when it is a ``{smoke, cpu, full}`` mapping."""
        if isinstance(value, Mapping) and value and set(value) <= set(BUDGET_NAMES):
            return value.get(self.budget)
        return value

    def config(
        self,
        source: str | Mapping[str, Any],
        steps: int | None = None,
        *,
        init: str | None = None,
        seed: int | None = None,
        sets: Mapping[str, Any] | None = None,
    ) -> Config:
        """A stage's checked config: the config, the recipe (from scratch only), the budget's overrides,
        ``sets`` (dotted keys; None values leave the config's), then the steps, the seed and the initial weights."""
        raw = load_raw(source) if isinstance(source, str) else _inline(source)
        optimizer = raw.get("optim", {}).get("name", "sgd")
        if self.recipe and init is None and self.recipe.get("optim", {}).get("name", optimizer) == optimizer:
            raw = merge(raw, self.recipe)
        raw = apply_sets(merge(raw, self.overrides), {k: v for k, v in (sets or {}).items() if v is not None})
        steps = self.pick(steps)
        if steps is None and self.scale != 1.0:
            steps = load_config(raw).train.steps
        if steps is not None:
            raw = apply_sets(raw, {"train.steps": max(1, int(round(steps * self.scale))), "train.epochs": None})
        raw = apply_sets(raw, {"train.seed": self.seed if seed is None else seed})
        if init is not None:
            raw = apply_sets(raw, {"init_from.path": str(init)})
        return load_config(raw)

    # ------------------------------------------------------------- stages
    def _key(self, payload: Mapping[str, Any]) -> str:
        text = json.dumps({**payload, "data": self.fingerprint, "code": CODE_VERSION}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _dir(self, name: str, key: str) -> Path:
        found = sorted(self.cache_dir.glob(f"*-{key[:12]}")) if self.cache_dir.is_dir() else []
        return found[0] if found else self.cache_dir / f"{name}-{key[:12]}"

    def _parent(self) -> StageResult:
        if not self.stages:
            raise ConfigError("this stage continues the previous one, but it is the first stage of the pipeline")
        return self.stages[-1]

    def _run(self, name: str, key: str, payload: dict, work: Callable[[Path], dict], cfg: Config | None) -> StageResult:
        out_dir = self._dir(name, key)
        done = out_dir / STAGE_FILE
        if done.is_file():
            info = json.loads(done.read_text(encoding="utf-8"))
            result = StageResult(name, key, out_dir, info.get("summary", {}), True, float(info.get("wall_s", 0.0)), cfg)
            if not self.dry_run:
                log.info("  stage %d %s: done before (%s)", len(self.stages) + 1, name, out_dir)
        elif self.dry_run:
            result = StageResult(name, key, out_dir, {}, False, 0.0, cfg)
        else:
            log.info("  stage %d %s -> %s", len(self.stages) + 1, name, out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            summary = work(out_dir)
            wall = time.perf_counter() - start
            info = {
                "name": name,
                "key": key,
                "payload": payload,
                "summary": _jsonable(summary),
                "wall_s": wall,
                "budget": self.budget,
                "seed": self.seed,
            }
            from resetnet.checkpoint import atomic_write_bytes

            atomic_write_bytes(done, json.dumps(info, indent=1, default=str).encode("utf-8"))
            result = StageResult(name, key, out_dir, info["summary"], False, wall, cfg)
        self.stages.append(result)
        if self.on_stage_end is not None:
            self.on_stage_end(result)
        if name == self.upto:
            raise _Done
        return result

    def train(
        self,
        name: str,
        config: str | Mapping[str, Any],
        steps: Any = None,
        *,
        init: str = "previous",
        seed: int | None = None,
        sets: Mapping[str, Any] | None = None,
        callbacks: Sequence[Any] = (),
    ) -> StageResult:
        """A training stage. ``init``: ``"previous"`` (the previous stage's weights; none for the first
        stage), ``None`` (from scratch) or a checkpoint path."""
        parent = (self._parent() if self.stages else None) if init == "previous" else None
        cfg = self.config(config, steps, init=str(parent.out_dir) if parent else (None if init == "previous" else init), seed=seed, sets=sets)
        keyed = copy.deepcopy(cfg.to_dict())
        if parent is not None:
            keyed["init_from"]["path"] = f"stage:{parent.key}"
        for dotted in RESUME_TOLERATED_KEYS:
            section, key = dotted.split(".")
            keyed[section].pop(key, None)
        payload = {"config": keyed, "parent": parent.key if parent else None, "callbacks": [[type(c).__name__, c.spec()] for c in callbacks]}

        def work(out_dir: Path) -> dict:
            summary = self.train_fn(cfg, out_dir, self.data_dir, resume=True, arrays=self.arrays, callbacks=list(callbacks))
            if summary.get("status") != "completed":
                raise RuntimeError(f"stage {name!r} ended with status {summary.get('status')!r} in {out_dir}")
            return summary

        return self._run(name, self._key(payload), payload, work, cfg)

    def transform(self, name: str, fn: Callable[..., dict], **args: Any) -> StageResult:
        """A stage that runs ``fn(parent_dir, out_dir, seed, **args)`` instead of training."""
        parent = self._parent()
        payload = {"transform": fn.__name__, "args": args, "parent": parent.key, "seed": self.seed}
        return self._run(name, self._key(payload), payload, lambda out_dir: fn(parent.out_dir, out_dir, self.seed, **args), None)


def run_pipeline(pipeline: str | Callable[..., None], runner: Runner, variables: Mapping[str, Any] | None = None) -> list[StageResult]:
    """Run (or plan) every stage of ``pipeline`` (a name of :data:`PIPELINES` or a function) with ``variables``."""
    fn = PIPELINES[pipeline] if isinstance(pipeline, str) else pipeline
    if runner.upto is not None and not runner.dry_run:  # a misspelt stage fails now, not after the stages before it trained
        plan = copy.copy(runner)
        plan.dry_run, plan.stages, plan.on_stage_end = True, [], None
        run_pipeline(fn, plan, variables)
    try:
        fn(runner, **dict(variables or {}))
    except _Done:
        pass
    except TypeError as err:
        if "argument" in str(err):
            raise ConfigError(f"pipeline {getattr(fn, '__name__', fn)}: {err}") from None
        raise
    if runner.upto is not None and runner.stages[-1].name != runner.upto:
        raise ConfigError(f"pipeline {fn.__name__} has no stage {runner.upto!r}; stages: {', '.join(s.name for s in runner.stages)}")
    return runner.stages


def _inline(source: Mapping[str, Any]) -> dict:
    raw = dict(source)
    base = raw.pop("base", None)
    return merge(load_raw(base), raw) if base else raw


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


# ----------------------------------------------------------------------------- transforms
def reset_from_resnet(parent_dir: Path, out_dir: Path, seed: int, **overrides: Any) -> dict:
    """Sec. 5.1: move a trained ``resnet{6n+2}`` into its ``reset_seq{6n+2}`` twin (fresh controllers),
    saved as a step-0 checkpoint the next stage starts from."""
    resnet, meta = load_model(parent_dir)
    torch.manual_seed(seed)
    twin = _transfer(resnet, **overrides)
    cfg = apply_sets(meta["config"], {"model": {"name": twin.model_name, "overrides": dict(overrides)}, "init_from.path": None})
    save_checkpoint(out_dir, twin, {"config": load_config(cfg).to_dict(), "step": 0, "transform": "reset_from_resnet", "source": str(parent_dir)})
    return {"status": "completed", "model": twin.model_name, "source": str(parent_dir), "overrides": dict(overrides)}


# ----------------------------------------------------------------------------- the pipelines
#: Sec. 5.1's controller recipe: only the controllers train (every other parameter and the frozen modules'
#: BatchNorm statistics fixed), Adam lr 1e-3, an L2 regularizer and gradient clipping (values ours), 5,000 batches of 128.
CONTROLLER_ONLY = {
    "base": "resnet38",
    "trainable": ["controller"],
    "freeze_bn_stats": True,
    "optim": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-4, "grad_clip": 1.0, "schedule": {"kind": "constant"}},
    "train": {"steps": 5000, "eval_every": 1000, "checkpoint_every": 1000},
}
#: Every stage's steps when a row gives none: the config's own (64k from scratch) for ``full``.
PRETRAIN = {"smoke": 4, "cpu": 3000, "full": None}


def scratch(run: Runner, config: str = "reset38", steps: Any = PRETRAIN, batch_size: Any = None) -> None:
    """Table 2 rows 1-7, Tables 1 and 3: one config trained from scratch."""
    run.train("scratch", config, steps, init=None, sets={"train.batch_size": run.pick(batch_size)})


def controller_only(
    run: Runner,
    depth: Any = {"smoke": 20, "cpu": 20, "full": 38},
    controller: str = "rnn",
    pretrain_steps: Any = PRETRAIN,
    steps: Any = {"smoke": 3, "cpu": 500, "full": 5000},
    batch_size: Any = None,
) -> None:
    """Sec. 5.1: a ResNet (one model, seed 0, for every seed: the seeds vary the controllers), its blocks moved
    in order into the pools of its ReSet twin (iterations = blocks), then only the controllers train.
    A good controller finds the sequential policy."""
    depth = run.pick(depth)
    run.train("pretrain", {"base": "resnet38", "model": {"name": f"resnet{depth}"}}, pretrain_steps, init=None, seed=0)
    run.transform("twin", reset_from_resnet, controller=controller, scorer="softmax")
    stage = merge(CONTROLLER_ONLY, {"model": {"name": f"reset_seq{depth}", "overrides": {"controller": controller, "scorer": "softmax"}}})
    run.train("controller", stage, steps, sets={"train.batch_size": run.pick(batch_size)})


def _converged(run: Runner) -> RouteConvergence:
    """Sec. 5.3 step 6: fewer than 1% of 256 probe images' hard routes changed over 500 batches (cpu: 100)."""
    return RouteConvergence(
        threshold=0.01, window=run.pick({"smoke": 2, "cpu": 100, "full": 500}), every=run.pick({"smoke": 1, "cpu": 50, "full": 100}), probe_size=256
    )


def relaxation(
    run: Runner,
    pretrained: str = "t2_r2_sm",
    pretrain_steps: Any = PRETRAIN,
    gsm_steps: Any = {"smoke": 2, "cpu": 500, "full": 5000},
    gst_config: str = "table2/row10_contr_gst",
    gst_steps: Any = {"smoke": 3, "cpu": 1500, "full": 20000},
    hybrl_steps: Any = {"smoke": 3, "cpu": 1500, "full": 20000},
    reward: float = 0.05,
    skip_target: float = 0.2,
) -> None:
    """Sec. 5.3 steps 1-8: a pretrained Softmax ReSet-38; its controllers with the Gumbel-softmax scorer
    (5,000 batches); straight-through Gumbel until the routes converge (row 12: every parameter; row 17:
    batches of 4 copies); then the Hybrid-RL skip reward until the skip rate reaches the target."""
    run.train("pretrain", pretrained, pretrain_steps, init=None)
    run.train("gsm", "table2/row09_contr_gsm", gsm_steps)
    run.train("gst", gst_config, gst_steps, callbacks=[_converged(run)])
    window = run.pick({"smoke": 1, "cpu": 50, "full": 100})
    run.train(
        "hybrl",
        "table2/row13_hybrl",
        hybrl_steps,
        sets={"regularizers.skip_reward.reward": reward},
        callbacks=[SkipRateTarget(target=skip_target, window=window)],
    )


def finetune(
    run: Runner,
    pretrained: str = "t2_r2_sm",
    pretrain_steps: Any = PRETRAIN,
    stage: str = "table2/row08_contr_sm",
    steps: Any = {"smoke": 3, "cpu": 1000, "full": None},
    until_converged: bool = False,
) -> None:
    """Table 2 rows 8, 10, 16: a pretrained config, then one more stage (row 10: until the routes converge)."""
    run.train("pretrain", pretrained, pretrain_steps, init=None)
    run.train("finetune", stage, steps, callbacks=[_converged(run)] if until_converged else [])


def topk(
    run: Runner, pretrained: str = "t2_r2_sm", pretrain_steps: Any = PRETRAIN, k: int = 1, steps: Any = {"smoke": 2, "cpu": 1000, "full": None}
) -> None:
    """Sec. 5.4.3, Table 2 rows 18-20: the pretrained Softmax model switched to the top-k scorer, every parameter fine-tuned."""
    run.train("pretrain", pretrained, pretrain_steps, init=None)
    run.train("topk", "table2/row18_topk", steps, sets={"model.overrides.topk": k})


_PHASES = [["controller"], ["all", "-controller"]]  # the controllers' phase, then the units' (everything else)


def two_phase_fixed(run: Runner, steps: Any = {"smoke": 8, "cpu": 3000, "full": None}, length: Any = {"smoke": 2, "cpu": 200, "full": 1000}) -> None:
    """Sec. 5.4.1, "constant number of iterations": from scratch, controllers and units alternate every ``length`` steps."""
    n = run.pick(length)
    run.train("two_phase", "t2_r2_sm", steps, init=None, callbacks=[PhaseSchedule("fixed", _PHASES, length=[n, n])])


def two_phase_progressive(
    run: Runner, steps: Any = {"smoke": 8, "cpu": 3000, "full": None}, length: Any = {"smoke": 1, "cpu": 100, "full": 500}
) -> None:
    """Sec. 5.4.1, "progressive time for one of the phases": the units' phase doubles after each of its turns."""
    n = run.pick(length)
    run.train("two_phase", "t2_r2_sm", steps, init=None, callbacks=[PhaseSchedule("progressive", _PHASES, length=[n, n], growth=[1.0, 2.0])])


def two_phase_convergence(
    run: Runner,
    steps: Any = {"smoke": 8, "cpu": 3000, "full": None},
    window: Any = {"smoke": 1, "cpu": 50, "full": 200},
    min_length: Any = {"smoke": 2, "cpu": 100, "full": 400},
) -> None:
    """Sec. 5.4.1, "convergence of the current phase": switch when the phase's loss stopped improving."""
    schedule = PhaseSchedule("convergence", _PHASES, window=run.pick(window), tol=0.01, min_length=run.pick(min_length))
    run.train("two_phase", "t2_r2_sm", steps, init=None, callbacks=[schedule])


def incremental(
    run: Runner, pretrained: str = "t2_r2_sm", pretrain_steps: Any = PRETRAIN, steps: Any = {"smoke": 5, "cpu": 1000, "full": 10000}
) -> None:
    """Sec. 5.4.2: a pretrained Softmax model, everything frozen but the head, then the stages unfrozen from the
    last one backwards, one every 20% of the budget, then the stem (frozen parts' BatchNorm statistics fixed)."""
    run.train("pretrain", pretrained, pretrain_steps, init=None)
    run.train(
        "incremental", "table2/row16_finetune_all_sm", steps, sets={"freeze_bn_stats": True}, callbacks=[PhaseSchedule("incremental", every="20%")]
    )


PIPELINES: dict[str, Callable[..., None]] = {
    fn.__name__: fn
    for fn in (scratch, controller_only, relaxation, finetune, topk, two_phase_fixed, two_phase_convergence, two_phase_progressive, incremental)
}
