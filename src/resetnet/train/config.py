"""Experiment configurations: YAML files, one per experiment, over a validated base schema.

A config is a nested dict. :data:`SCHEMA` below lists every key with its default and
its check; :func:`load_config` reads a YAML file (a name in the repository's
``configs/`` folder or a path), follows ``base:`` inheritance, merges onto the
defaults, applies ``--set key=value`` overrides and validates the result.

* An unknown key anywhere is a :class:`ConfigError` that lists the valid keys at that level.
* A bad value (wrong type, negative learning rate, unknown optimizer or model) is a
  :class:`ConfigError` naming the dotted key.
* Positions in the training budget (LR milestones, schedule begin/end points) are
  steps when > 1 and fractions of the total number of steps when <= 1, so one
  config serves both a short CPU run and the full GPU run (:func:`resolve_position`).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

__all__ = [
    "ConfigError", "SCHEMA", "defaults", "load_config", "resolve_config_path", "list_configs", "configs_dir",
    "parse_set", "apply_overrides", "validate", "merge", "resolve_position", "flatten", "diff_configs",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


# ----------------------------------------------------------------------------- fields
class Field:
    """A leaf of the schema: a default value and a normaliser ``check(value, key) -> value``."""

    def __init__(self, default: Any, check: Callable[[Any, str], Any], doc: str = "", subschema: Mapping[str, Any] | None = None) -> None:
        self.default = default
        self.check = check
        self.doc = doc
        self.subschema = subschema  # keys reachable below this leaf (e.g. a nullable schedule)


class FreeDict(Field):
    """A leaf that holds an arbitrary mapping (e.g. model constructor overrides)."""

    def __init__(self, doc: str = "") -> None:
        super().__init__({}, _mapping, doc)


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key {key!r}: expected {expected}, got {value!r} ({type(value).__name__})")


def _as_number(value: Any) -> Any:
    # PyYAML (YAML 1.1) reads "1e-4" as a string; accept numeric strings.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _fail(key, value, "a mapping")
    return dict(value)


def Float(min: float | None = None, max: float | None = None, optional: bool = False, strict_min: bool = False):
    def check(value: Any, key: str) -> float | None:
        if value is None and optional:
            return None
        value = _as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(key, value, "a finite number" + (" or null" if optional else ""))
        value = float(value)
        if min is not None and (value < min or (strict_min and value == min)):
            _fail(key, value, f"a number {'>' if strict_min else '>='} {min}")
        if max is not None and value > max:
            _fail(key, value, f"a number <= {max}")
        return value

    return check


def Int(min: int | None = None, optional: bool = False):
    def check(value: Any, key: str) -> int | None:
        if value is None and optional:
            return None
        value = _as_number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer" + (" or null" if optional else ""))
        if min is not None and value < min:
            _fail(key, value, f"an integer >= {min}")
        return value

    return check


def Bool(optional: bool = False):
    def check(value: Any, key: str) -> bool | None:
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            _fail(key, value, "true or false" + (" or null" if optional else ""))
        return value

    return check


def Choice(*choices: Any):
    def check(value: Any, key: str) -> Any:
        if value not in choices:
            raise ConfigError(f"config key {key!r}: unknown value {value!r}; valid values: {', '.join(map(str, choices))}")
        return value

    return check


def Str(optional: bool = False):
    def check(value: Any, key: str) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            _fail(key, value, "a non-empty string" + (" or null" if optional else ""))
        return value

    return check


def Position(optional: bool = False):
    """A point in the training budget: a step (> 1) or a fraction of the total (<= 1)."""
    return Float(min=0.0, optional=optional)


def Positions(value: Any, key: str) -> list[float]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        _fail(key, value, "a list of steps (> 1) or fractions of the budget (<= 1)")
    out = [Float(min=0.0)(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return [int(v) if v > 1 and v.is_integer() else v for v in out]


def Betas(value: Any, key: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        _fail(key, value, "a list of two numbers in [0, 1)")
    out = [Float(min=0.0, max=1.0)(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if any(v >= 1.0 for v in out):
        _fail(key, value, "a list of two numbers in [0, 1)")
    return out


def Rewards(value: Any, key: str) -> float | list[float]:
    if isinstance(value, (list, tuple)):
        if not value:
            _fail(key, value, "a number or a non-empty list of numbers")
        return [Float()(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return Float()(value, key)


def _model_name(value: Any, key: str) -> str:
    value = Str()(value, key)
    from ..models import get_model_constructor

    try:
        get_model_constructor(value)
    except ValueError as err:
        raise ConfigError(f"config key {key!r}: {err}") from None
    return value


def _trainable(value: Any, key: str) -> list[str]:
    from .params import check_group_names

    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        _fail(key, value, "a non-empty list of parameter group names")
    try:
        return check_group_names(list(value))
    except ValueError as err:
        raise ConfigError(f"config key {key!r}: {err}") from None


SCHEDULE_KINDS = ("step", "exponential", "cosine", "linear", "constant")
RAMP_KINDS = ("constant", "linear", "cosine", "exponential")


def _ramp(doc: str, initial: float = 1.0, final: float = 1.0, kind: str = "constant", begin: float = 0.0, end: float = 1.0) -> dict:
    return {
        "kind": Field(kind, Choice(*RAMP_KINDS), "constant: always `initial`; linear/cosine/exponential: go from `initial` to `final` between `begin` and `end`"),
        "initial": Field(initial, Float(min=0.0), "value before `begin`"),
        "final": Field(final, Float(min=0.0), "value after `end`"),
        "begin": Field(begin, Position(), "where the ramp starts (step, or fraction of the budget when <= 1)"),
        "end": Field(end, Position(), "where the ramp reaches `final` (step, or fraction when <= 1)"),
    }


# ----------------------------------------------------------------------------- schema
SCHEMA: dict[str, Any] = {
    "model": {
        "name": Field("reset38", _model_name, "registered model name (`resetnet models`)"),
        "overrides": FreeDict("constructor overrides, e.g. {scorer: gumbel_softmax, controller: cnn}"),
    },
    "data": {
        "download": Field(True, Bool(), "fetch CIFAR-10 into the data dir when it is missing"),
        "verify": Field(True, Bool(), "check the CIFAR-10 files' sizes and MD5 sums"),
        "limit_train": Field(None, Int(min=1, optional=True), "use only the first N training images"),
        "limit_test": Field(None, Int(min=1, optional=True), "evaluate on the first N test (or validation) images"),
        "val_split": Field(0, Int(min=0), "hold out N training images as a validation set (0: evaluate on test, like the paper)"),
        "split_seed": Field(0, Int(min=0), "seed of the stratified validation split"),
        "augment": Field(True, Bool(), "He et al.'s pad-4 random crop + horizontal flip"),
    },
    "optim": {
        "name": Field("sgd", Choice("sgd", "adam"), "optimizer"),
        "lr": Field(0.1, Float(min=0.0, strict_min=True), "base learning rate"),
        "momentum": Field(0.9, Float(min=0.0, max=1.0), "SGD momentum"),
        "nesterov": Field(False, Bool(), "SGD Nesterov momentum"),
        "betas": Field([0.9, 0.999], Betas, "Adam betas"),
        "eps": Field(1e-8, Float(min=0.0, strict_min=True), "Adam epsilon"),
        "weight_decay": Field(1e-4, Float(min=0.0), "L2 weight decay (coupled, as torch.optim.SGD/Adam)"),
        "grad_clip": Field(None, Float(min=0.0, strict_min=True, optional=True), "clip the gradient norm to this value (null: off)"),
        "schedule": {
            "kind": Field("step", Choice(*SCHEDULE_KINDS), "step: x gamma at each milestone; exponential: x gamma every `every` steps; cosine; linear: after the warm-up, straight down to `final`; constant"),
            "milestones": Field([0.5, 0.75], Positions, "step schedule: where lr is multiplied by gamma (steps, or fractions when <= 1)"),
            "gamma": Field(0.1, Float(min=0.0, strict_min=True), "multiplicative factor"),
            "every": Field(1000, Int(min=1), "exponential schedule: steps between two multiplications by gamma"),
            "final": Field(0.0, Float(min=0.0), "cosine and linear schedules: final lr as a fraction of the base lr"),
            "warmup": Field(0, Position(), "linear warm-up from 0 over this many steps (or fraction when <= 1)"),
        },
    },
    "trainable": Field(["all"], _trainable, "parameter groups that are trained; the others are frozen"),
    "freeze_bn_stats": Field(False, Bool(), "keep the BatchNorm running statistics of frozen modules fixed"),
    "init_from": {
        "path": Field(None, Str(optional=True), "checkpoint (run dir or .safetensors) to initialise the weights from"),
        "strict": Field(True, Bool(), "require every weight to match; false skips missing/extra/misshapen weights"),
    },
    "train": {
        "batch_size": Field(128, Int(min=1), "global batch size"),
        "label_smoothing": Field(0.0, Float(min=0.0, max=1.0), "label smoothing of the cross-entropy (0: none, the paper's)"),
        "iterations": Field(64000, Int(min=1, optional=True), "budget in optimizer steps (exactly one of iterations/epochs)"),
        "epochs": Field(None, Float(min=0.0, strict_min=True, optional=True), "budget in epochs of the training set"),
        "seed": Field(0, Int(min=0), "seed of the weights, the batch order and the augmentation"),
        "eval_every": Field(2000, Int(min=0), "evaluate every N steps (0: only at the end)"),
        "eval_batch_size": Field(500, Int(min=1), "evaluation batch size"),
        "log_every": Field(100, Int(min=1), "write a train row to metrics.jsonl every N steps"),
        "route_log_every": Field(500, Int(min=0), "write a routing row every N steps (0: never)"),
        "checkpoint_every": Field(2000, Int(min=0), "save a checkpoint every N steps (0: only at the end)"),
        "stop_after": Field(None, Int(min=1, optional=True), "leave (with a checkpoint) after N steps of this invocation; resume later"),
        "compile": Field(False, Bool(), "torch.compile the model"),
        "sync_bn": Field(False, Bool(), "with several processes, SyncBatchNorm (see docs/distributed.md)"),
        "dist_timeout_s": Field(600.0, Float(min=0.0, strict_min=True), "with several processes, seconds before a stalled collective fails the job"),
        "batch_repeat": Field(1, Int(min=1), "repeat every training image k times in its batch (k Gumbel samples per image)"),
        "amp": Field("auto", Choice("auto", True, False), "bf16 autocast (auto: on CUDA only; true: also on the CPU, slow there, for testing)"),
        "channels_last": Field("auto", Choice("auto", True, False), "channels_last memory format (auto: on CUDA only)"),
        "device": Field("auto", Str(), "auto (CUDA if present), cpu, cuda, cuda:1, ..."),
        "progress": Field(True, Bool(), "show a tqdm progress bar"),
        "tensorboard": Field(True, Bool(), "also write TensorBoard scalars to DIR/tb"),
    },
    "regularizers": {
        "entropy": {
            "lambda_batch": Field(0.0, Float(min=0.0), "weight of -sum_i H(E_batch y_i) (Eq. 13, lambda_1)"),
            "lambda_sample": Field(0.0, Float(min=0.0), "weight of sum_i E_batch H(y_i) (Eq. 13, lambda_2)"),
            "decay": _ramp("factor multiplying both lambdas"),
            "global_marginal": Field(False, Bool(), "with several processes, average the batch marginal over all ranks"),
        },
        "skip_reward": {
            "enabled": Field(False, Bool(), "add the Hybrid-RL skip term (Eq. 9); needs a hard scorer"),
            "reward": Field(0.1, Rewards, "R_k: reward for choosing the zero unit (one number or one per invocation)"),
            "momentum": Field(0.9, Float(min=0.0, max=1.0), "moving-average factor of the REINFORCE baseline"),
            "weight": Field(1.0, Float(min=0.0), "weight of the REINFORCE term in the loss"),
        },
    },
    "scorer": {
        "temperature": Field(None, lambda v, k: _temperature(v, k), "Gumbel temperature schedule (null: keep the model's)",
                             subschema=_ramp("Gumbel temperature")),
    },
    # Staged-pipeline hooks (resetnet.train.hooks, docs/reproduction.md).
    "phases": Field(None, lambda v, k: _phases(v, k), "per-step schedule of trainable groups (null: `trainable` throughout)"),
    "stop": {
        "route_convergence": {
            "enabled": Field(False, Bool(), "stop when the hard routes of a probe batch stop changing"),
            "threshold": Field(0.01, Float(min=0.0, max=1.0), "fraction of changed routes below which the policy has converged"),
            "window": Field(500, Int(min=1), "steps over which the change is measured"),
            "every": Field(100, Int(min=1), "probe the routes every N steps"),
            "probe_size": Field(256, Int(min=1), "training images in the probe batch"),
            "min_steps": Field(0, Int(min=0), "never stop before this step"),
        },
        "skip_rate": {
            "target": Field(None, Float(min=0.0, max=1.0, optional=True), "stop when the mean training skip rate reaches this (null: off)"),
            "window": Field(100, Int(min=1), "steps in the mean"),
            "min_steps": Field(0, Int(min=0), "never stop before this step"),
        },
    },
}


def _phases(value: Any, key: str) -> dict | None:
    from .hooks import check_phases

    return check_phases(value, key)

_TEMPERATURE_SCHEMA = SCHEMA["scorer"]["temperature"].subschema


def _temperature(value: Any, key: str) -> dict | None:
    if value is None:
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = {"kind": "constant", "initial": value}
    if not isinstance(value, Mapping):
        _fail(key, value, "null, a number or a schedule mapping")
    merged = merge(_defaults_of(_TEMPERATURE_SCHEMA), value, key)
    out = _validate_tree(merged, _TEMPERATURE_SCHEMA, key)
    if out["initial"] <= 0 or out["final"] <= 0:
        _fail(key, value, "positive temperatures")
    return out


# ----------------------------------------------------------------------------- tree helpers
def _defaults_of(schema: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in schema.items():
        out[k] = _defaults_of(v) if isinstance(v, Mapping) else copy.deepcopy(v.default)
    return out


def defaults() -> dict:
    """A fresh copy of the default config (every key of :data:`SCHEMA`)."""
    return _defaults_of(SCHEMA)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _unknown(key: str, prefix: str, valid: Iterable[str]) -> ConfigError:
    where = f"in {prefix!r}" if prefix else "at the top level"
    return ConfigError(f"unknown config key {_join(prefix, key)!r} {where}; valid keys: {', '.join(valid)}")


def _schema_at(path: list[str]) -> Any:
    node: Any = SCHEMA
    for i, part in enumerate(path):
        if isinstance(node, FreeDict):
            return node
        if isinstance(node, Field) and node.subschema is not None:
            node = node.subschema
        if not isinstance(node, Mapping):
            raise ConfigError(f"config key {'.'.join(path[:i])!r} is a value, not a section; it has no key {part!r}")
        if part not in node:
            raise _unknown(part, ".".join(path[:i]), node)
        node = node[part]
    return node


def merge(base: Mapping[str, Any], update: Mapping[str, Any], prefix: str = "") -> dict:
    """Deep merge: mappings merge key by key, everything else (lists included) is replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v, _join(prefix, str(k)))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _normalize_shorthands(raw: Mapping[str, Any]) -> dict:
    raw = dict(raw)
    if "init_from" in raw and (raw["init_from"] is None or isinstance(raw["init_from"], str)):
        raw["init_from"] = {"path": raw["init_from"]}
    return raw


def _validate_tree(cfg: Any, schema: Mapping[str, Any], prefix: str) -> dict:
    if not isinstance(cfg, Mapping):
        _fail(prefix or "<config>", cfg, "a mapping")
    for k in cfg:
        if k not in schema:
            raise _unknown(str(k), prefix, schema)
    out = {}
    for k, node in schema.items():
        key = _join(prefix, k)
        value = cfg.get(k, _defaults_of(node) if isinstance(node, Mapping) else copy.deepcopy(node.default))
        out[k] = _validate_tree(value, node, key) if isinstance(node, Mapping) else node.check(value, key)
    return out


def validate(cfg: Mapping[str, Any]) -> dict:
    """Check every key and value; returns the normalised config (numbers coerced, shorthands expanded).

    Raises :class:`ConfigError` naming the key on the first problem.
    """
    cfg = _normalize_shorthands(cfg)
    out = _validate_tree(cfg, SCHEMA, "")
    train = out["train"]
    if (train["iterations"] is None) == (train["epochs"] is None):
        raise ConfigError("config keys 'train.iterations' and 'train.epochs': set exactly one of them (the other to null)")
    from ..models import get_model_constructor

    valid = getattr(get_model_constructor(out["model"]["name"]), "valid_overrides", None)
    if valid is not None:
        unknown = sorted(set(out["model"]["overrides"]) - set(valid))
        if unknown:
            raise ConfigError(f"config key 'model.overrides': unknown override(s) {unknown} for model {out['model']['name']!r}; valid overrides: {', '.join(sorted(valid))}")
    _check_model_builds(out["model"])
    if out["regularizers"]["skip_reward"]["enabled"] and out["model"]["overrides"].get("scorer") == "topk":
        raise ConfigError(
            "config keys 'regularizers.skip_reward.enabled' and 'model.overrides.scorer': the Hybrid-RL skip reward "
            "(Eq. 9) is a REINFORCE estimate over sampled routes, and top-k routes are not sampled (there is no policy "
            "gradient to estimate); with k >= 2 a sample can never choose the zero unit alone, so the reward never "
            "fires. Use scorer: gumbel_st with the skip reward, or disable it"
        )
    sched = out["optim"]["schedule"]
    if sched["kind"] == "step" and sorted(sched["milestones"]) != sched["milestones"]:
        raise ConfigError(f"config key 'optim.schedule.milestones': must be increasing, got {sched['milestones']}")
    for name, ramp in (("regularizers.entropy.decay", out["regularizers"]["entropy"]["decay"]), ("scorer.temperature", out["scorer"]["temperature"])):
        if ramp is not None and ramp["kind"] == "exponential" and (ramp["initial"] <= 0 or ramp["final"] <= 0):
            raise ConfigError(f"config key {name!r}: an exponential ramp needs positive initial and final values")
    return out


def _check_model_builds(model: Mapping[str, Any]) -> None:
    """Build the model on the meta device (no memory, no compute) so a bad override value fails here."""
    import torch

    from ..models import create_model

    try:
        with torch.device("meta"):
            create_model(model["name"], **model["overrides"])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config key 'model.overrides': cannot build {model['name']!r}: {err}") from None


# ----------------------------------------------------------------------------- files
def configs_dir() -> Path:
    """The repository's ``configs/`` folder (``$RESETNET_CONFIGS`` overrides it)."""
    env = os.environ.get("RESETNET_CONFIGS")
    if env:
        return Path(env)
    import resetnet

    return Path(resetnet.__file__).resolve().parents[2] / "configs"


def list_configs() -> list[str]:
    """Names of the shipped configs (``configs/*.yaml`` without the suffix)."""
    d = configs_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config_path(name_or_path: str | os.PathLike[str], relative_to: Path | None = None) -> Path:
    """A path to an existing file, or ``configs/NAME.yaml``; else a ConfigError listing the names."""
    text = str(name_or_path)
    candidates = [Path(text).expanduser()]
    if relative_to is not None:
        candidates.append(relative_to / text)
        if not text.endswith((".yaml", ".yml")):
            candidates.append(relative_to / f"{text}.yaml")
    candidates.append(configs_dir() / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"))
    for path in candidates:
        if path.is_file():
            return path
    folder = configs_dir()
    if not folder.is_dir():
        raise ConfigError(
            f"config {text!r} not found: it is not a file, and the config folder {folder} does not exist. "
            "The shipped configs live in the repository's configs/ folder (an editable install, "
            "`pip install -e .`, finds them); set RESETNET_CONFIGS to that folder or pass a YAML path"
        )
    raise ConfigError(f"config {text!r} not found (neither a file nor a name in {folder}); available configs: {', '.join(list_configs()) or 'none'}")


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


def load_raw(name_or_path: str | os.PathLike[str], _seen: tuple[Path, ...] = (), _relative_to: Path | None = None) -> dict:
    """A config file with its ``base:`` chain merged (child over base), not yet validated."""
    path = resolve_config_path(name_or_path, _relative_to).resolve()
    if path in _seen:
        chain = " -> ".join(str(p.name) for p in _seen + (path,))
        raise ConfigError(f"config inheritance cycle: {chain}")
    data = _read_yaml(path)
    base = data.pop("base", None)
    recipe = data.pop("recipe", None)
    data = _normalize_shorthands(data)
    if recipe is not None:  # a recipe fragment (configs/recipes/NAME.yaml) goes between the base and this file
        if not isinstance(recipe, str):
            raise ConfigError(f"{path}: 'recipe' must be a recipe name (configs/recipes/NAME.yaml), got {recipe!r}")
        data = merge(load_recipe(recipe), data)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a config name or path, got {base!r}")
    return merge(load_raw(base, _seen + (path,), path.parent), data)


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``configs/recipes/*.yaml``)."""
    d = configs_dir() / "recipes"
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_recipe(name: str | None) -> dict | None:
    """A recipe fragment ``configs/recipes/NAME.yaml`` (None: no recipe)."""
    if name is None:
        return None
    path = configs_dir() / "recipes" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe {name!r} not found; available recipes: {', '.join(list_recipes()) or 'none'}")
    return _normalize_shorthands(_read_yaml(path))


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
        out.append((key.split("."), _as_number(value) if isinstance(value, str) and _looks_numeric(value) else value))
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


def apply_overrides(cfg: Mapping[str, Any], sets: Iterable[tuple[list[str], Any]] | Iterable[str]) -> dict:
    """Apply ``--set`` overrides (strings or parsed pairs); unknown keys are ConfigErrors."""
    sets = list(sets)
    if sets and isinstance(sets[0], str):
        sets = parse_set(sets)  # type: ignore[arg-type]
    out = copy.deepcopy(dict(cfg))
    for path, value in sets:  # type: ignore[misc]
        if path[0] == "init_from" and len(path) == 1 and (value is None or isinstance(value, str)):
            path, value = ["init_from", "path"], value
        node = _schema_at(path)
        target = out
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        if isinstance(node, Mapping) and isinstance(value, Mapping):
            target[path[-1]] = merge(target.get(path[-1]) or {}, value)
        else:
            target[path[-1]] = value
    return out


def load_config(name_or_path: str | os.PathLike[str] | Mapping[str, Any], overrides: Iterable[str] = ()) -> dict:
    """Read, inherit, override and validate a config. A mapping is taken as the raw config."""
    raw = dict(name_or_path) if isinstance(name_or_path, Mapping) else load_raw(name_or_path)
    raw.pop("base", None)
    raw = merge(defaults(), _normalize_shorthands(raw))
    raw = apply_overrides(raw, list(overrides))
    return validate(raw)


# ----------------------------------------------------------------------------- budget
def resolve_position(value: float | int | None, total: int) -> int | None:
    """A budget position in steps: values <= 1 are fractions of ``total``, larger values are steps."""
    if value is None:
        return None
    if value <= 1:
        return int(round(value * total))
    return int(value)


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (free-form dicts are flattened too)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = _join(prefix, str(k))
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<missing>") != fb.get(k, "<missing>"))
