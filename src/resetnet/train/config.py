"""The typed training configuration: every knob once, with its default and where the value comes from.

The defaults are the paper's main model and protocol: ReSet-38 with the Softmax scorer and the
entropy regularizer, trained with He et al.'s SGD schedule (Table 2, row 4). A YAML config (a name
in the shipped ``configs/``, or a path) states only what it changes; ``base:`` inherits another
config, ``recipe:`` merges a recipe fragment (``configs/recipes/NAME.yaml``) between the base and
the file, and ``--set key=value`` overrides come last::

    cfg = load_config("quickstart", ["train.epochs=2"])
    cfg.train.batch_size, cfg.optim.schedule.milestones

Positions in the budget (lr milestones, warm-up, ramp ends) are a step (an integer) or a share of
the budget (a string such as ``"50%"``), so one config serves a short CPU run and the paper's.
Every key is checked: an unknown key, a wrong type or a bad value is a :class:`ConfigError`
naming the dotted key and what it expects.
"""

from __future__ import annotations

import copy
import dataclasses
import math
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

__all__ = [
    "ConfigError",
    "Config",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "ScheduleConfig",
    "RampConfig",
    "TrainConfig",
    "EntropyConfig",
    "SkipRewardConfig",
    "RegularizersConfig",
    "InitFrom",
    "Position",
    "load_config",
    "load_recipe",
    "list_configs",
    "list_recipes",
    "parse_set",
    "resolve_position",
    "config_table",
    "diff_configs",
]


#: A point in the budget: a step (int >= 0) or a share of it ("50%").
Position = int | str
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)%")


def resolve_position(position: Position | None, total: int) -> int | None:
    """A position in optimizer steps: ``"50%"`` of ``total``, or the step itself."""
    if position is None:
        return None
    if isinstance(position, str):
        return int(round(float(_PERCENT.fullmatch(position).group(1)) / 100 * total))
    return int(position)


def knob(default: Any, doc: str, source: str = "our choice", **checks: Any) -> Any:
    """A config field: its default, what it does (``doc``), where the value comes from (``source``)
    and its checks (``choices``, ``min``, ``max``, ``above``: a strict minimum)."""
    meta = {"doc": doc, "source": source, **checks}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections
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


@dataclass
class ScheduleConfig:
    kind: str = knob(
        "step",
        "step: x gamma at each milestone; exponential: x gamma every `every` steps; cosine; "
        "linear: after the warm-up straight down to `final`; constant",
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


# ----------------------------------------------------------------------------- checking
def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"config key {key!r}: expected {expected}, got {value!r} ({type(value).__name__})")


def _number(value: Any) -> Any:
    if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked and normalised as type ``tp`` (a ConfigError names ``key`` otherwise)."""
    if tp == Position:
        if isinstance(value, str) and _PERCENT.fullmatch(value.strip()):
            return value.strip()
        value = _number(value) if not isinstance(value, str) else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise _fail(key, value, 'a step (an integer >= 0) or a share of the budget such as "50%"')
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args[:-1]:
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        return _coerce(args[-1], value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, "a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise _fail(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(key, value, "true or false")
        return value
    if tp is int:
        value = _number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(key, value, "an integer")
        return value
    if tp is float:
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise _fail(key, value, "a non-empty string")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # pragma: no cover


def _check_value(f: dataclasses.Field, value: Any, key: str) -> None:
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"config key {key!r}: unknown value {value!r}; valid values: {', '.join(map(str, meta['choices']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            raise _fail(key, value, f"a number >= {meta['min']}")
        if "above" in meta and value <= meta["above"]:
            raise _fail(key, value, f"a number > {meta['above']}")
        if "max" in meta and value > meta["max"]:
            raise _fail(key, value, f"a number <= {meta['max']}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(prefix or "<config>", data, "a mapping")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f"in {prefix!r}" if prefix else "at the top level"
            raise ConfigError(f"unknown config key {_join(prefix, str(k))!r} {where}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name in data:
            value = _coerce(hints[f.name], data[f.name], key)
        else:
            value = f.default_factory() if f.default is dataclasses.MISSING else copy.deepcopy(f.default)
        _check_value(f, value, key)
        values[f.name] = value
    return cls(**values)


def _check_whole(cfg: Config) -> None:
    """Rules across keys, and the model itself (built on the meta device: nothing allocated)."""
    t, o = cfg.train, cfg.optim
    if (t.steps is None) == (t.epochs is None):
        raise ConfigError("config keys 'train.steps' and 'train.epochs': set exactly one of them (the other to null)")
    if o.schedule.kind == "step":
        steps = [resolve_position(m, 10**6) for m in o.schedule.milestones if not isinstance(m, str)]
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
    from .params import check_group_names

    try:
        check_group_names(cfg.trainable)
    except ValueError as err:
        raise ConfigError(f"config key 'trainable': {err}") from None
    if not cfg.trainable:
        raise _fail("trainable", cfg.trainable, "a non-empty list of parameter groups")
    sr = cfg.regularizers.skip_reward
    if sr.enabled and cfg.model.overrides.get("scorer") == "topk":
        raise ConfigError(
            "config keys 'regularizers.skip_reward.enabled' and 'model.overrides.scorer': the Hybrid-RL skip reward "
            "(Eq. 9) is a REINFORCE estimate over sampled routes, and top-k routes are not sampled (there is no policy "
            "gradient to estimate); with k >= 2 a sample can never choose the zero unit alone, so the reward never "
            "fires. Use scorer: gumbel_st with the skip reward, or disable it"
        )
    _check_model_builds(cfg.model)


def _check_model_builds(model: ModelConfig) -> None:
    import torch

    from ..models import create_model, get_model_constructor

    try:
        get_model_constructor(model.name)
    except ValueError as err:
        raise ConfigError(f"config key 'model.name': {err}") from None
    try:
        with torch.device("meta"):
            create_model(model.name, **model.overrides)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key 'model.overrides': cannot build {model.name!r}: {err}") from None


# ----------------------------------------------------------------------------- files
def configs_dir() -> Path:
    """The shipped configs (package data ``resetnet/configs``; ``$RESETNET_CONFIGS`` overrides it)."""
    env = os.environ.get("RESETNET_CONFIGS")
    return Path(env) if env else Path(str(resources.files("resetnet") / "configs"))


def _search_dirs() -> list[Path]:
    """Where config names are looked up: the library's, then every ``resetnet.configs`` entry point's."""
    from importlib.metadata import entry_points

    dirs = [configs_dir()]
    for ep in entry_points(group="resetnet.configs"):
        try:
            dirs.append(Path(str(ep.load()())))
        except Exception:  # pragma: no cover - a broken plugin must not break the library
            continue
    return dirs


def list_configs() -> list[str]:
    """Names of the shipped configs (``NAME`` or ``folder/NAME``), recipes excluded."""
    names = set()
    for d in _search_dirs():
        names.update(str(p.relative_to(d).with_suffix("")) for p in d.rglob("*.yaml") if p.parent.name != "recipes")
    return sorted(names)


def list_recipes() -> list[str]:
    return sorted({p.stem for d in _search_dirs() for p in (d / "recipes").glob("*.yaml")})


def _resolve(text: str, relative_to: Path | None = None) -> Path:
    candidates = [Path(text).expanduser()]
    name = text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [d / name for d in _search_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"config {text!r} not found (neither a file nor a shipped config); shipped configs: {', '.join(list_configs()) or 'none'}")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently).

    Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(x) for x in (getattr(err, "context", None), getattr(err, "problem", None)) if x) or str(err)
    return " ".join(f"{where}{what}".split())


def _read_yaml(path: Path) -> dict:
    """A config file's top-level mapping; a ConfigError (one line) for unreadable, invalid, empty or
    non-mapping files and for a key given twice in one mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{path}: line {dup.line}: key {dup.key!r} is given twice in the same mapping (first on line {dup.first}); "
            "YAML would silently keep the last value: delete one of them"
        ) from None
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
    """Dotted updates (``{"train.steps": 10}`` or ``["train.steps=10"]``) applied to a raw mapping."""
    pairs = [(k.split("."), v) for k, v in sets.items()] if isinstance(sets, Mapping) else parse_set(sets)
    out = copy.deepcopy(dict(raw))
    for path, value in pairs:
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if isinstance(value, Mapping) and isinstance(node.get(path[-1]), Mapping):
            node[path[-1]] = merge(node[path[-1]], value)
        else:
            node[path[-1]] = value
    return out


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | Config, overrides: Iterable[str] = ()) -> Config:
    """A checked :class:`Config` from a shipped config name, a YAML path, a raw mapping or a Config,
    with ``--set`` overrides applied last."""
    if isinstance(source, Config):
        raw = source.to_dict()
    elif isinstance(source, Mapping):
        raw = dict(source)
        raw.pop("base", None)
    else:
        raw = load_raw(source)
    return Config.from_dict(apply_sets(raw, list(overrides)))


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = _join(prefix, str(k))
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def diff_configs(a: Config | Mapping[str, Any], b: Config | Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa = flatten(a.to_dict() if isinstance(a, Config) else a)
    fb = flatten(b.to_dict() if isinstance(b, Config) else b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<missing>") != fb.get(k, "<missing>"))


# ----------------------------------------------------------------------------- docs
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
