"""The typed training configuration: every knob once, with its default, its checks and where the value comes from.

The defaults are the paper's main model and protocol: ReSet-38, Softmax scorer, entropy regularizer, He et al.'s SGD
schedule (Table 2, row 4). A YAML config (a shipped name or a path) states only what it changes: ``base:`` inherits a
config, ``recipe:`` merges ``configs/recipes/NAME.yaml`` between the base and the file, ``--set key=value`` comes last.
Budget positions (milestones, warm-up, ramp ends) are a step or a share of the budget (``"50%"``). A bad key or value
is a :class:`ConfigError` naming the dotted key and what it expects.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import operator
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import ConfigError

#: A point in the budget: a step (int >= 0) or a share of it ("50%").
Position = int | str
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")


def resolve_position(position: Position | None, total: int) -> int | None:
    """A position in optimizer steps: ``"50%"`` of ``total``, or the step itself."""
    if isinstance(position, str):
        return int(round(float(_PERCENT.fullmatch(position).group(1)) / 100 * total))
    return None if position is None else int(position)


def knob(default: Any, doc: str, source: str = "our choice", **checks: Any) -> Any:
    """A config field: its default, what it does (``doc``), where the value comes from (``source``)
    and its checks (``choices``, ``min``, ``max``, ``above``: a strict minimum)."""
    meta = {"doc": doc, "source": source, **checks}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = knob("reset38", "registered model (`resetnet models`)", "paper Sec. 4, Fig. 3")
    overrides: dict = knob({}, "constructor overrides, e.g. {scorer: gumbel_st, controller: cnn}", "paper Table 2 rows")


@dataclass
class DataConfig:
    download: bool = knob(True, "fetch CIFAR-10 into the data dir when it is missing")
    verify: bool = knob(True, "check the CIFAR-10 files' sizes and MD5 sums")
    limit_train: int | None = knob(None, "train on the first N training images (null: all 50,000)", "paper Sec. 5", min=1)
    limit_test: int | None = knob(None, "evaluate on the first N test images (null: all 10,000)", "paper Sec. 5", min=1)
    val_split: int = knob(
        0,
        "hold out N training images as a validation set (0: evaluate on the test set)",
        'paper Sec. 5.2: "test set (used for validation here)"',
        min=0,
    )
    split_seed: int = knob(0, "seed of the stratified validation split", min=0)
    augment: bool = knob(True, "pad-4 random crop and horizontal flip", "He et al. 2016")
    flip: str = knob(
        "random", "horizontal flips: random, or alternating (Jordan 2024: mirrored every other epoch)", "He et al.", choices=("random", "alternating")
    )


@dataclass
class ScheduleConfig:
    kind: str = knob(
        "step",
        "step: x gamma at each milestone; exponential: x gamma every `every` steps; cosine; linear: after the warm-up straight down to `final`; constant",
        'He et al. (paper Sec. 5.2: "SGD: as in original paper")',
        choices=("step", "exponential", "cosine", "linear", "constant"),
    )
    milestones: list[Position] = knob(["50%", "75%"], "step schedule: where the lr is multiplied by gamma", "He et al.: 32k and 48k of 64k")
    gamma: float = knob(0.1, "multiplicative factor of the step and exponential schedules", "He et al.", above=0.0)
    every: int = knob(1000, "exponential schedule: steps between two multiplications", "paper Sec. 5.2 (Adam: x0.95 every 1000 batches)", min=1)
    final: float = knob(0.0, "cosine and linear schedules: the last lr as a fraction of `optim.lr`", min=0.0)
    warmup: Position = knob(0, "linear warm-up from 0 over this many steps (or share)")


@dataclass
class OptimConfig:
    name: str = knob("sgd", "optimizer", "paper Sec. 5.2: SGD with momentum beat Adam", choices=("sgd", "adam"))
    lr: float = knob(0.1, "base (peak) learning rate", "He et al.", above=0.0)
    momentum: float = knob(0.9, "SGD momentum", "He et al.", min=0.0, max=1.0)
    nesterov: bool = knob(False, "SGD Nesterov momentum", "He et al. (plain momentum)")
    betas: list[float] = knob([0.9, 0.999], "Adam betas", "torch's default")
    eps: float = knob(1e-8, "Adam epsilon", "torch's default", above=0.0)
    weight_decay: float = knob(
        1e-4, "L2 weight decay (coupled, as torch's SGD and Adam)", "He et al.; paper Sec. 5.1 names an L2 regularizer", min=0.0
    )
    controller_weight_decay: float | None = knob(
        None,
        "weight decay of the ReSet controllers' parameters (null: optim.weight_decay)",
        "our choice: with decay, Table 3's controllers shrank to an input-independent policy (docs/results.md)",
        min=0.0,
    )
    norm_weight_decay: float | None = knob(
        None, "weight decay of 1-D parameters: norm scales and shifts, biases (null: optim.weight_decay)", "our choice", min=0.0
    )
    grad_clip: float | None = knob(
        None, "clip the gradient norm to this value (null: off)", "paper Sec. 5.1 clips only in controller training", above=0.0
    )
    schedule: ScheduleConfig = knob(ScheduleConfig(), "learning-rate schedule")


@dataclass
class RampConfig:
    kind: str = knob(
        "constant",
        "constant: always `initial`; linear/cosine/exponential: from `initial` to `final` between `begin` and `end`",
        choices=("constant", "linear", "cosine", "exponential"),
    )
    initial: float = knob(1.0, "value until `begin`", min=0.0)
    final: float = knob(1.0, "value from `end` on", min=0.0)
    begin: Position = knob(0, "where the ramp starts")
    end: Position = knob("100%", "where the ramp reaches `final`")


@dataclass
class EntropyConfig:
    lambda_batch: float = knob(
        0.01,
        "weight of -sum_i H(E_batch y_i): different routes for different images (Eq. 13, lambda_1)",
        "paper Eq. 13 (no value given; ours)",
        min=0.0,
    )
    lambda_sample: float = knob(
        0.01, "weight of sum_i E_batch H(y_i): a decided route for each image (Eq. 13, lambda_2)", "paper Eq. 13 (no value given; ours)", min=0.0
    )
    decay: RampConfig = knob(
        RampConfig(kind="linear", initial=1.0, final=0.0, begin="50%", end="75%"),
        "factor on both lambdas: full weight, then to 0 between the two lr drops",
        'paper Sec. 5.2: "reducing it by the end of the training" (shape ours)',
    )
    global_marginal: bool = knob(False, "with several processes, the batch marginal over all ranks' samples")


@dataclass
class SkipRewardConfig:
    enabled: bool = knob(False, "add the Hybrid-RL skip term (Eq. 9); needs a sampling hard scorer (gumbel_st)", "paper Sec. 3.4")
    reward: float | list[float] = knob(
        0.1, "R_k: reward for choosing the zero unit (one value, or one per invocation)", "paper Eq. 9 (no value given; ours)"
    )
    momentum: float = knob(0.9, "moving-average factor of the REINFORCE baseline", min=0.0, max=1.0)
    weight: float = knob(1.0, "weight of the REINFORCE term in the loss", min=0.0)


@dataclass
class RegularizersConfig:
    entropy: EntropyConfig = knob(EntropyConfig(), "entropy regularizer (Eq. 13)", 'paper Table 2 row 4 "+ENTR"')
    skip_reward: SkipRewardConfig = knob(SkipRewardConfig(), "Hybrid-RL skip reward (Eq. 9)", "paper Sec. 3.4")


@dataclass
class TrainConfig:
    batch_size: int = knob(128, "global batch size (split over the processes)", "paper Sec. 5.1; He et al.", min=1)
    steps: int | None = knob(64000, "budget in optimizer steps (set exactly one of steps/epochs)", "He et al.: 64k", min=1)
    epochs: float | None = knob(None, "budget in epochs of the training set", above=0.0)
    seed: int = knob(0, "seed of the weights, the batch order and the augmentation", min=0)
    label_smoothing: float = knob(0.0, "label smoothing of the cross-entropy", "paper: none", min=0.0, max=1.0)
    ema_decay: float | None = knob(
        None,
        "keep an EMA of the weights, this decay per step; its test accuracy is reported beside (null: off)",
        "our choice, as timm's ModelEma",
        min=0.0,
        max=1.0,
    )
    batch_repeat: int = knob(1, "repeat every image k times in its batch (k Gumbel samples per image)", "paper Table 2 row 17", min=1)
    eval_every: int = knob(2000, "evaluate every N steps (0: only at the end)", min=0)
    eval_batch_size: int = knob(500, "evaluation batch size (memory only)", min=1)
    log_every: int = knob(100, "a train row in metrics.jsonl every N steps", min=1)
    route_log_every: int = knob(500, "a routing row every N steps (0: never), for the policy-evolution plot", "paper Fig. 6", min=0)
    checkpoint_every: int = knob(2000, "save a checkpoint every N steps (0: only at the end)", min=0)
    stop_after: int | None = knob(None, "leave, with a checkpoint, after N steps of this invocation; resume later", min=1)
    temperature: RampConfig | None = knob(None, "Gumbel temperature over the run (null: keep the model's)", "paper Eq. 7 (no value given)")
    compile: bool = knob(False, "torch.compile the model")
    amp: str | bool = knob("auto", "bf16 autocast (auto: on CUDA only)", choices=("auto", True, False))
    channels_last: str | bool = knob("auto", "channels_last memory format (auto: on CUDA only)", choices=("auto", True, False))
    device: str = knob("auto", "auto (CUDA if present), cpu, cuda, cuda:1, ...")
    sync_bn: bool = knob(False, "with several processes, SyncBatchNorm (docs/distributed.md)")
    dist_timeout_s: float = knob(600.0, "with several processes, seconds before a stalled collective fails the job", above=0.0)
    progress: bool = knob(True, "show a progress bar")
    tensorboard: bool = knob(True, "also write TensorBoard scalars to DIR/tb")


@dataclass
class InitFrom:
    path: str | None = knob(None, "checkpoint (run dir or .safetensors) whose weights start the run (null: He init)", "paper Sec. 5.1: He init")
    strict: bool = knob(True, "every weight must match; false loads what fits")


@dataclass
class Config:
    """A whole training run. Attribute access: ``cfg.optim.schedule.kind``."""

    model: ModelConfig = knob(ModelConfig(), "the model")
    data: DataConfig = knob(DataConfig(), "the data")
    optim: OptimConfig = knob(OptimConfig(), "the optimizer")
    train: TrainConfig = knob(TrainConfig(), "the run")
    regularizers: RegularizersConfig = knob(RegularizersConfig(), "routing regularizers")
    trainable: list[str] = knob(
        ["all"], "parameter groups that train (controller, units, stem, stage0-2, head, all)", 'paper Table 2: "Contr." trains the controllers only'
    )
    freeze_bn_stats: bool = knob(False, "keep the BatchNorm statistics of frozen modules fixed", "paper Sec. 5.3 step 2")
    init_from: InitFrom = knob(InitFrom(), "initial weights")

    def to_dict(self) -> dict:
        """A plain nested dict (for YAML/JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Check every key and value of a nested mapping; missing keys take their defaults.
        ``init_from: PATH`` is short for ``init_from: {path: PATH}``."""
        if isinstance(data, Mapping) and (data.get("init_from") is None or isinstance(data.get("init_from"), str)) and "init_from" in data:
            data = {**data, "init_from": {"path": data["init_from"]}}
        cfg = _build(cls, data, "")
        _check_whole(cfg)
        return cfg

    def replace(self, updates: Mapping[str, Any] | Iterable[str]) -> Config:
        """A new config with dotted ``--set``-style updates (``{"train.steps": 10}`` or ``["train.steps=10"]``)."""
        return Config.from_dict(apply_sets(self.to_dict(), updates))


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {expected}, got {value!r} ({type(value).__name__})")


#: Scalar types: whether a value is acceptable, and what is expected otherwise.
_SCALARS: dict[Any, tuple[typing.Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    str: (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    dict: (lambda v: isinstance(v, Mapping), "a mapping"),
    Position: (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        'a step (an integer >= 0) or a share of the budget such as "50%"',
    ),
}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked and normalised as type ``tp`` (a ConfigError names ``key`` otherwise)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if typing.get_origin(tp) in (Union, types.UnionType) and tp != Position:
        if value is None and type(None) in typing.get_args(tp):
            return None
        *first, last = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in first:
            with contextlib.suppress(ConfigError):
                return _coerce(arg, value, key)
        return _coerce(last, value, key)
    if typing.get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, "a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict and value is None:
        return {}
    if tp == Position and isinstance(value, str) and _PERCENT.fullmatch(value.strip()):
        return value.strip()
    if tp in (int, float) and isinstance(value, str):
        with contextlib.suppress(ValueError):  # PyYAML (YAML 1.1) reads 1e-4 as a string
            value = float(value)
    if tp in (int, Position) and isinstance(value, float) and value.is_integer():
        value = int(value)
    accepts, expected = _SCALARS[tp]
    if not accepts(value):
        raise _fail(key, value, expected)
    return float(value) if tp is float else dict(value) if tp is dict else value


#: The bounds a knob may set: whether a value is within one, and how to show it.
_BOUNDS = {"min": (operator.ge, ">="), "above": (operator.gt, ">"), "max": (operator.le, "<=")}


def _check_value(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config key {key!r}: unknown value {value!r}; valid values: {', '.join(map(str, meta['choices']))}")
    for bound, (within, sign) in _BOUNDS.items():
        if bound in meta and isinstance(value, (int, float)) and not isinstance(value, bool) and not within(value, meta[bound]):
            raise _fail(key, value, f"a number {sign} {meta[bound]}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the config dataclass ``cls`` from a mapping; missing keys take their defaults."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(prefix or "<config>", data, "a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            where = f"in {prefix!r}" if prefix else "at the top level"
            raise ConfigError(f"unknown config key {_join(prefix, str(k))!r} {where}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name in [n for n in fields if n in data]:  # in field order: the first bad key is reported
        key = _join(prefix, name)
        values[name] = _coerce(hints[name], data[name], key)
        _check_value(fields[name], values[name], key)
    return cls(**values)


def _check_whole(cfg: Config) -> None:
    """Rules across keys, and the model itself (built on the meta device: nothing allocated)."""
    import torch

    from ..models import create_model, get_model_constructor
    from .params import check_group_names

    t, o = cfg.train, cfg.optim
    if (t.steps is None) == (t.epochs is None):
        raise ConfigError("config keys 'train.steps' and 'train.epochs': set exactly one of them (the other to null)")
    if o.schedule.kind == "step":
        steps = [m for m in o.schedule.milestones if not isinstance(m, str)]
        shares = [float(m[:-1]) for m in o.schedule.milestones if isinstance(m, str)]
        if steps != sorted(steps) or shares != sorted(shares):
            raise ConfigError(f"config key 'optim.schedule.milestones': must be increasing, got {o.schedule.milestones}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise _fail("optim.betas", o.betas, "two numbers in [0, 1)")
    for name, ramp in (("regularizers.entropy.decay", cfg.regularizers.entropy.decay), ("train.temperature", t.temperature)):
        if ramp is not None and ramp.kind == "exponential" and (ramp.initial <= 0 or ramp.final <= 0):
            raise ConfigError(f"config key {name!r}: an exponential ramp needs positive initial and final values")
    if t.temperature is not None and (t.temperature.initial <= 0 or t.temperature.final <= 0):
        raise ConfigError("config key 'train.temperature': temperatures must be positive")
    try:
        check_group_names(cfg.trainable)
    except ValueError as err:
        raise ConfigError(f"config key 'trainable': {err}") from None
    if not cfg.trainable:
        raise _fail("trainable", cfg.trainable, "a non-empty list of parameter groups")
    if cfg.regularizers.skip_reward.enabled and cfg.model.overrides.get("scorer") == "topk":
        raise ConfigError(
            "config keys 'regularizers.skip_reward.enabled' and 'model.overrides.scorer': the Hybrid-RL skip reward "
            "(Eq. 9) is a REINFORCE estimate over sampled routes, and top-k routes are not sampled (there is no policy "
            "gradient to estimate); with k >= 2 a sample can never choose the zero unit alone, so the reward never "
            "fires. Use scorer: gumbel_st with the skip reward, or disable it"
        )
    try:
        get_model_constructor(cfg.model.name)
    except ValueError as err:
        raise ConfigError(f"config key 'model.name': {err}") from None
    try:
        with torch.device("meta"):
            create_model(cfg.model.name, **cfg.model.overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key 'model.overrides': cannot build {cfg.model.name!r}: {err}") from None


def _search_dirs() -> list[Path]:
    """Where config names are looked up: ``$RESETNET_CONFIGS`` (else the shipped ``resetnet/configs``), then the
    directory of every ``resetnet.configs`` entry point."""
    from importlib.metadata import entry_points

    env = os.environ.get("RESETNET_CONFIGS")
    dirs = [Path(env) if env else Path(str(resources.files("resetnet") / "configs"))]
    for ep in entry_points(group="resetnet.configs"):
        with contextlib.suppress(Exception):  # a broken plugin must not break the library
            dirs.append(Path(str(ep.load()())))
    return dirs


def list_configs() -> list[str]:
    """Names of the shipped configs (``NAME`` or ``folder/NAME``), recipes excluded."""
    return sorted({str(p.relative_to(d).with_suffix("")) for d in _search_dirs() for p in d.rglob("*.yaml") if p.parent.name != "recipes"})


def list_recipes() -> list[str]:
    return sorted({p.stem for d in _search_dirs() for p in (d / "recipes").glob("*.yaml")})


def _resolve(text: str, relative_to: Path | None = None) -> Path:
    name = text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"
    dirs = ([relative_to] if relative_to is not None else []) + _search_dirs()
    for path in [Path(text).expanduser(), *(d / name for d in dirs)]:
        if path.is_file():
            return path
    raise ConfigError(f"config {text!r} not found (neither a file nor a shipped config); shipped configs: {', '.join(list_configs()) or 'none'}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently).
    Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # a merge key may be overridden; a collection (unhashable) key is the base class's to report
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"{self.name}: line {line}: key {key!r} is given twice in the same mapping (first on line {seen[key]}); "
                        "YAML would silently keep the last value: delete one of them"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) or str(err)
    return " ".join(f"{where}{what}".split())


def _read_yaml(path: Path) -> dict:
    """A config file's top-level mapping; a one-line ConfigError if it is unreadable, invalid, empty or not a mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML, {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); a config is a YAML text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    if data is None:
        raise ConfigError(
            f"{path} is empty (no YAML content, only comments or blank lines); a config needs at least "
            "`base: NAME` (a config to start from, e.g. base: reset38) or one section such as `model:` or `train:`"
        )
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping at the top level (key: value lines), got {type(data).__name__}")
    return dict(data)


def load_recipe(name: str) -> dict:
    """A recipe fragment ``configs/recipes/NAME.yaml`` as a raw mapping."""
    for d in _search_dirs():
        path = d / "recipes" / f"{name}.yaml"
        if path.is_file():
            return _read_yaml(path)
    raise ConfigError(f"recipe {name!r} not found; available recipes: {', '.join(list_recipes()) or 'none'}")


def load_raw(name_or_path: str | os.PathLike[str], _seen: tuple[Path, ...] = (), _relative_to: Path | None = None) -> dict:
    """A config file with its ``base:`` chain and ``recipe:`` merged (base, recipe, file), not yet checked."""
    path = _resolve(str(name_or_path), _relative_to).resolve()
    if path in _seen:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(p.name for p in _seen + (path,))}")
    data = _read_yaml(path)
    base, recipe = data.pop("base", None), data.pop("recipe", None)
    if recipe is not None:
        if not isinstance(recipe, str):
            raise ConfigError(f"{path}: 'recipe' must be a recipe name, got {recipe!r}")
        data = merge(load_recipe(recipe), data)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a config name or path, got {base!r}")
    return merge(load_raw(base, _seen + (path,), path.parent), data)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict:
    """Deep merge: mappings merge key by key, everything else (lists included) is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def parse_set(items: Iterable[str]) -> list[tuple[list[str], Any]]:
    """``["a.b=1e-3", "c=[1, 2]"]`` -> ``[(["a", "b"], 0.001), (["c"], [1, 2])]`` (values parsed as YAML)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: bad key {key!r}; use dotted names like train.batch_size")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out.append((key.split("."), value))
    return out


def apply_sets(raw: Mapping[str, Any], sets: Mapping[str, Any] | Iterable[str]) -> dict:
    """Dotted updates (``{"train.steps": 10}`` or ``["train.steps=10"]``) applied to a raw mapping: each is merged in
    as the nested mapping it names (a mapping value merges into a mapping there, anything else replaces)."""
    pairs = [(k.split("."), v) for k, v in sets.items()] if isinstance(sets, Mapping) else parse_set(sets)
    out = copy.deepcopy(dict(raw))
    for path, value in pairs:
        for part in reversed(path):
            value = {part: value}
        out = merge(out, value)
    return out


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | Config, overrides: Iterable[str] = ()) -> Config:
    """A checked :class:`Config` from a shipped config name, a YAML path, a raw mapping or a Config,
    with ``--set`` overrides applied last."""
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = {k: v for k, v in source.items() if k != "base"}
    else:
        raw = load_raw(source)
    return Config.from_dict(apply_sets(raw, list(overrides)))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = _join(prefix, str(k))
        out.update(flatten(v, key) if isinstance(v, Mapping) and v else {key: v})
    return out


def diff_configs(a: Config | Mapping[str, Any], b: Config | Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = (flatten(c.to_dict() if isinstance(c, Config) else c) for c in (a, b))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<missing>") != fb.get(k, "<missing>"))


def config_table() -> str:
    """Every key of :class:`Config` as a Markdown table: default, what it does, source (docs/training.md)."""
    rows = ["| key | default | what it does | source |", "| --- | --- | --- | --- |"]

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            key, value = _join(prefix, f.name), getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key)
                continue
            shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            rows.append(f"| `{key}` | `{shown}` | {f.metadata['doc']} | {f.metadata['source']} |")

    walk(Config(), "")
    return "\n".join(rows)
