"""Staged training pipelines: a sequence of configs, each stage starting from the previous one.

A pipeline is a YAML file in ``configs/pipelines/`` (or any path)::

    description: Sec. 5.3 relaxation pipeline
    vars: {pretrained: reset38, reward: 0.1}       # defaults; rows and --var override them
    stages:
      - name: pretrain                             # a training stage: a trainer config ...
        config: ${pretrained}                      # ... by name/path, or an inline mapping (may have base:)
        iterations: {smoke: 3, cpu: 1500, full: null}   # budget; null keeps the config's own
      - name: twin                                 # a transform stage: a registered function
        transform: reset_from_resnet
        args: {controller: rnn}
      - name: gsm
        config: table2/contr_gsm
        set: {regularizers.skip_reward.reward: ${reward}}  # dotted overrides
        init_from: previous                        # default for every stage but the first

* ``${name}`` is replaced by a variable: a whole-string reference keeps the value's
  type, a reference inside a longer string is formatted into it.
* A mapping whose keys are budget names (``smoke``, ``cpu``, ``full``) is replaced by
  the value of the running budget (missing: null), anywhere in ``vars``, ``set``,
  ``iterations`` and ``args``.
* In ``set``, a null value leaves the config's value unchanged (so a variable can default to null).
* Every training stage gets the budget's global overrides (data limits, logging), the
  seed (``train.seed``) and ``init_from.path`` = the previous stage's run directory.

Stages are cached by content: a stage's directory is named by a hash of everything that
changes its result: its resolved config (budget, scale, recipe and seed included), its
parent's hash, the training data (:func:`data_fingerprint`) and the code version
(:data:`CODE_VERSION`). Rows that share a prefix (the pretrained softmax model of Table 2
rows 8-20) train it once, a finished stage (``stage.json``) is never retrained, and an
unfinished stage resumes from its checkpoint; a stage trained on other data, or by a
version whose models compute something else, is never reused.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from .config import ConfigError, apply_overrides, configs_dir, defaults, load_raw, load_recipe, merge, validate

__all__ = [
    "BUDGET_NAMES", "Stage", "Pipeline", "StageResult", "TRANSFORMS", "register_transform", "load_pipeline",
    "list_pipelines", "resolve_budget_values", "substitute", "resolve_stages", "stage_config", "stage_key",
    "run_pipeline", "plan_stages", "pipelines_dir", "STAGE_FILE", "data_fingerprint", "CODE_VERSION",
]

BUDGET_NAMES = ("smoke", "cpu", "full")
#: Part of every stage key: bump resetnet.__version__ when a model computes something else.
CODE_VERSION = f"resetnet-{__import__('resetnet').__version__}"
STAGE_FILE = "stage.json"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Stage:
    """One stage of a pipeline (after variable and budget resolution)."""

    name: str
    config: str | dict | None = None
    set: dict = field(default_factory=dict)
    iterations: int | None = None
    transform: str | None = None
    args: dict = field(default_factory=dict)
    init_from: str | None = "previous"
    seed: int | None = None  # a fixed seed for this stage (e.g. one pretrained model shared by every seed)

    @property
    def is_transform(self) -> bool:
        return self.transform is not None


@dataclass
class Pipeline:
    name: str
    description: str
    vars: dict
    stages: list[dict]  # raw stage mappings (resolved per budget by resolve_stages)
    path: Path | None = None


@dataclass
class StageResult:
    name: str
    key: str
    out_dir: Path
    summary: dict
    reused: bool
    wall_s: float


# ----------------------------------------------------------------------------- transforms
TRANSFORMS: dict[str, Callable[..., Any]] = {}


def register_transform(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn(parent_dir, out_dir, seed, **args) -> summary`` as a transform stage."""
    TRANSFORMS[fn.__name__] = fn
    return fn


@register_transform
def reset_from_resnet(parent_dir: Path, out_dir: Path, seed: int, **overrides: Any) -> dict:
    """Sec. 5.1: move a trained ``resnet{6n+2}`` into its ``reset_seq{6n+2}`` twin (fresh controllers).

    The twin is saved as a step-0 checkpoint whose config names the twin model and the
    overrides, so the next stage loads it with ``init_from`` (strict).
    """
    import torch

    from ..models.transfer import reset_from_resnet as transfer
    from .checkpoint import load_model, save_checkpoint

    resnet, meta = load_model(parent_dir)
    torch.manual_seed(seed)
    twin = transfer(resnet, **overrides)
    cfg = copy.deepcopy(meta.get("config") or defaults())
    cfg["model"] = {"name": twin.model_name, "overrides": dict(overrides)}
    cfg["init_from"] = {"path": str(parent_dir), "strict": True}
    cfg = validate(cfg)
    save_checkpoint(out_dir, twin, {"config": cfg, "step": 0, "transform": "reset_from_resnet", "source": str(parent_dir)})
    return {"status": "completed", "model": twin.model_name, "source": str(parent_dir), "overrides": dict(overrides)}


# ----------------------------------------------------------------------------- loading
def pipelines_dir() -> Path:
    return configs_dir() / "pipelines"


def list_pipelines() -> list[str]:
    d = pipelines_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_pipeline(name_or_path: str | os.PathLike[str]) -> Pipeline:
    """Read a pipeline YAML (a name in ``configs/pipelines/`` or a path)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_file():
        path = pipelines_dir() / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    if not path.is_file():
        raise ConfigError(f"pipeline {text!r} not found (neither a file nor a name in {pipelines_dir()}); available: {', '.join(list_pipelines()) or 'none'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    unknown = sorted(set(data) - {"description", "vars", "stages"})
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline key(s) {unknown}; valid keys: description, vars, stages")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    names = set()
    for i, s in enumerate(stages):
        if not isinstance(s, Mapping) or "name" not in s:
            raise ConfigError(f"{path}: stage {i} must be a mapping with a 'name'")
        bad = sorted(set(s) - {"name", "config", "set", "iterations", "transform", "args", "init_from", "seed"})
        if bad:
            raise ConfigError(f"{path}: stage {s['name']!r}: unknown key(s) {bad}; valid keys: name, config, set, iterations, transform, args, init_from, seed")
        if ("config" in s) == ("transform" in s):
            raise ConfigError(f"{path}: stage {s['name']!r} needs exactly one of 'config' (training) or 'transform'")
        if s["name"] in names:
            raise ConfigError(f"{path}: stage name {s['name']!r} is used twice")
        names.add(s["name"])
    return Pipeline(name=path.stem, description=str(data.get("description", "")), vars=dict(data.get("vars") or {}), stages=list(stages), path=path)


# ----------------------------------------------------------------------------- resolution
def _is_budget_map(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and set(value) <= set(BUDGET_NAMES)


def resolve_budget_values(value: Any, budget: str) -> Any:
    """Replace every ``{smoke: a, cpu: b, full: c}`` mapping by the value for ``budget``."""
    if _is_budget_map(value):
        return resolve_budget_values(value.get(budget), budget)
    if isinstance(value, Mapping):
        return {k: resolve_budget_values(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_budget_values(v, budget) for v in value]
    return value


def substitute(value: Any, variables: Mapping[str, Any]) -> Any:
    """Replace ``${name}`` references (typed for a whole-string reference)."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole:
            name = whole.group(1)
            if name not in variables:
                raise ConfigError(f"pipeline variable ${{{name}}} is not defined; defined: {', '.join(sorted(variables)) or 'none'}")
            return copy.deepcopy(variables[name])

        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in variables:
                raise ConfigError(f"pipeline variable ${{{m.group(1)}}} is not defined; defined: {', '.join(sorted(variables)) or 'none'}")
            return str(variables[m.group(1)])

        return _VAR.sub(repl, value)
    if isinstance(value, Mapping):
        return {substitute(k, variables) if isinstance(k, str) else k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    return value


def resolve_stages(pipeline: Pipeline, budget: str, variables: Mapping[str, Any] | None = None, upto: str | None = None) -> list[Stage]:
    """The pipeline's stages for ``budget`` with the variables substituted (up to stage ``upto``)."""
    if budget not in BUDGET_NAMES:
        raise ConfigError(f"unknown budget {budget!r}; valid budgets: {', '.join(BUDGET_NAMES)}")
    values = dict(pipeline.vars)
    values.update(variables or {})
    values = resolve_budget_values(values, budget)
    out = []
    for raw in pipeline.stages:
        s = resolve_budget_values(substitute(dict(raw), values), budget)
        iterations = s.get("iterations")
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
            raise ConfigError(f"pipeline {pipeline.name!r} stage {s['name']!r}: iterations must be a positive integer or null, got {iterations!r}")
        out.append(Stage(
            name=str(s["name"]), config=s.get("config"), set=dict(s.get("set") or {}), iterations=iterations,
            transform=s.get("transform"), args=dict(s.get("args") or {}), init_from=s.get("init_from", "previous"),
            seed=s.get("seed"),
        ))
        if upto is not None and s["name"] == upto:
            break
    else:
        if upto is not None:
            raise ConfigError(f"pipeline {pipeline.name!r} has no stage {upto!r}; stages: {', '.join(str(s['name']) for s in pipeline.stages)}")
    if out[0].init_from == "previous":
        out[0].init_from = None
    for s in out:
        if s.transform is not None and s.transform not in TRANSFORMS:
            raise ConfigError(f"pipeline {pipeline.name!r} stage {s.name!r}: unknown transform {s.transform!r}; valid: {', '.join(TRANSFORMS)}")
    return out


def _raw_config(spec: str | Mapping[str, Any]) -> dict:
    if isinstance(spec, Mapping):
        raw = dict(spec)
        base = raw.pop("base", None)
        return merge(load_raw(base), raw) if base else raw
    return load_raw(spec)


def stage_config(
    stage: Stage,
    *,
    budget_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    init_path: str | None = None,
    scale: float = 1.0,
    recipe: Mapping[str, Any] | None = None,
) -> dict:
    """The validated trainer config of a training stage.

    ``recipe`` (a config fragment, ``configs/recipes/NAME.yaml``) is merged over the config of a
    stage that trains from scratch (no ``init_path``) with the recipe's optimizer; stages that
    continue a model (Sec. 5.1's Adam controller training) and configs with another optimizer
    (Table 2's Adam rows) keep their own.
    """
    if stage.config is None:
        raise ConfigError(f"stage {stage.name!r} is a transform, it has no config")
    raw = merge(defaults(), _raw_config(stage.config))
    raw.pop("base", None)
    same_optimizer = (recipe or {}).get("optim", {}).get("name", raw["optim"]["name"]) == raw["optim"]["name"]
    if recipe and init_path is None and same_optimizer:  # (Table 2's Adam rows keep their Adam recipe)
        raw = merge(raw, recipe)
    if budget_overrides:
        raw = merge(raw, budget_overrides)
    sets = [(k.split("."), v) for k, v in stage.set.items() if v is not None]  # null: leave the config's value
    if sets:
        raw = apply_overrides(raw, sets)
    iterations = stage.iterations
    if iterations is None and raw["train"].get("iterations") is not None and scale != 1.0:
        iterations = int(raw["train"]["iterations"])
    if iterations is not None:
        raw["train"]["iterations"] = max(1, int(round(iterations * scale)))
        raw["train"]["epochs"] = None
    raw["train"]["seed"] = int(seed if stage.seed is None else stage.seed)
    if init_path is not None:
        raw["init_from"] = {"path": str(init_path), "strict": raw.get("init_from", {}).get("strict", True)}
    return validate(raw)


def data_fingerprint(arrays: Mapping[str, Any] | None) -> str:
    """SHA-256 (16 hex digits) of the training and test arrays a pipeline trains and is judged on."""
    h = hashlib.sha256()
    for split in sorted(arrays or {}):
        for a in arrays[split]:
            a = np.ascontiguousarray(a)
            h.update(f"{split}:{a.dtype}:{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def stage_key(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "stage"


def _find_stage_dir(cache_dir: Path, key: str, name: str) -> Path:
    short = key[:12]
    if cache_dir.is_dir():
        for p in cache_dir.glob(f"*-{short}"):
            return p
    return cache_dir / f"{_slug(name)}-{short}"


def _keyed_config(cfg: Mapping[str, Any], parent_key: str | None) -> dict:
    """The config as hashed: the parent's directory replaced by its key; tolerated keys dropped."""
    from .trainer import RESUME_TOLERATED_KEYS

    c = copy.deepcopy(dict(cfg))
    if c.get("init_from", {}).get("path") and parent_key is not None:
        c["init_from"]["path"] = f"stage:{parent_key}"
    for dotted in RESUME_TOLERATED_KEYS:
        node = c
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None) if isinstance(node, dict) else None
    return c


def run_pipeline(
    pipeline: Pipeline | str,
    cache_dir: str | os.PathLike[str],
    *,
    budget: str = "full",
    seed: int = 0,
    variables: Mapping[str, Any] | None = None,
    upto: str | None = None,
    budget_overrides: Mapping[str, Any] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    arrays: Mapping[str, Any] | None = None,
    scale: float = 1.0,
    recipe: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
    log: Callable[[str], None] | None = None,
    on_stage_end: Callable[[StageResult, int, int], None] | None = None,
    train_fn: Callable[..., dict] | None = None,
) -> list[StageResult]:
    """Run (or reuse) every stage; returns one :class:`StageResult` per stage, the last one final.

    ``train_fn`` defaults to :func:`resetnet.train.trainer.train` (injectable for tests).
    """
    if isinstance(pipeline, str):
        pipeline = load_pipeline(pipeline)
    if train_fn is None:
        from .trainer import train as train_fn  # noqa: PLW0127
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cache_dir = Path(cache_dir)
    if fingerprint is None:
        fingerprint = data_fingerprint(arrays) if arrays is not None else f"data-dir:{data_dir}"
    stages = resolve_stages(pipeline, budget, variables, upto)
    results: list[StageResult] = []
    parent: StageResult | None = None
    for index, stage in enumerate(stages):
        if stage.init_from not in (None, "previous"):
            init_path, parent_key = str(stage.init_from), stage_key({"path": str(stage.init_from)})
        elif stage.init_from == "previous" and parent is not None:
            init_path, parent_key = str(parent.out_dir), parent.key
        else:
            init_path, parent_key = None, None
        if stage.is_transform:
            if init_path is None:
                raise ConfigError(f"pipeline {pipeline.name!r}: transform stage {stage.name!r} needs a previous stage")
            payload = {"transform": stage.transform, "args": stage.args, "parent": parent_key, "seed": seed}
            cfg = None
        else:
            cfg = stage_config(stage, budget_overrides=budget_overrides, seed=seed, init_path=init_path, scale=scale, recipe=recipe)
            payload = {"config": _keyed_config(cfg, parent_key), "parent": parent_key}
        payload.update(data=fingerprint, code=CODE_VERSION)
        key = stage_key(payload)
        out_dir = _find_stage_dir(cache_dir, key, stage.name)
        done_file = out_dir / STAGE_FILE
        if done_file.is_file():
            info = json.loads(done_file.read_text(encoding="utf-8"))
            result = StageResult(stage.name, key, out_dir, info.get("summary", {}), True, float(info.get("wall_s", 0.0)))
            log(f"  stage {index + 1}/{len(stages)} {stage.name}: done before ({out_dir})")
        else:
            log(f"  stage {index + 1}/{len(stages)} {stage.name}: {'transform ' + stage.transform if cfg is None else cfg['model']['name']} -> {out_dir}")
            start = time.perf_counter()
            out_dir.mkdir(parents=True, exist_ok=True)
            if cfg is None:
                summary = TRANSFORMS[stage.transform](Path(init_path), out_dir, seed, **stage.args)
            else:
                summary = train_fn(cfg, out_dir, data_dir, resume=True, arrays=arrays)
                if summary.get("status") not in ("completed", "early_stopped"):
                    raise RuntimeError(f"stage {stage.name!r} ended with status {summary.get('status')!r} in {out_dir}")
            wall = time.perf_counter() - start
            info = {"name": stage.name, "pipeline": pipeline.name, "key": key, "payload": payload, "summary": _jsonable(summary), "wall_s": wall, "budget": budget, "seed": seed}
            tmp = out_dir / (STAGE_FILE + ".tmp")
            tmp.write_text(json.dumps(info, indent=1, default=str), encoding="utf-8")
            os.replace(tmp, done_file)
            result = StageResult(stage.name, key, out_dir, info["summary"], False, wall)
        results.append(result)
        if on_stage_end is not None:
            on_stage_end(result, index, len(stages))
        parent = result
    return results


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def plan_stages(
    pipeline: Pipeline | str,
    *,
    budget: str,
    seed: int = 0,
    variables: Mapping[str, Any] | None = None,
    upto: str | None = None,
    budget_overrides: Mapping[str, Any] | None = None,
    scale: float = 1.0,
    recipe: Mapping[str, Any] | None = None,
    fingerprint: str = "",
) -> list[tuple[Stage, dict | None, str]]:
    """``(stage, config or None, key)`` for every stage, without running anything (for cost estimates)."""
    if isinstance(pipeline, str):
        pipeline = load_pipeline(pipeline)
    out = []
    parent_key = None
    for stage in resolve_stages(pipeline, budget, variables, upto):
        if stage.is_transform:
            payload = {"transform": stage.transform, "args": stage.args, "parent": parent_key, "seed": seed}
            cfg = None
        else:
            cfg = stage_config(stage, budget_overrides=budget_overrides, seed=seed, init_path="stage:parent" if parent_key else None, scale=scale, recipe=recipe)
            payload = {"config": _keyed_config(cfg, parent_key), "parent": parent_key}
        payload.update(data=fingerprint, code=CODE_VERSION)
        key = stage_key(payload)
        out.append((stage, cfg, key))
        parent_key = key
    return out
