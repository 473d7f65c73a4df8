"""Training: the typed config, the trainer, schedules, parameter groups, metrics and evaluation.

Python API (see ``docs/training.md``)::

    from resetnet.train import load_config, train
    summary = train(load_config("smoke", ["train.steps=20"]), "runs/smoke", data_dir="data")
    model, meta = resetnet.load_model("runs/smoke")
"""

from ..checkpoint import load_weights, read_checkpoint, save_checkpoint
from ..errors import CheckpointError, ConfigError
from ..models import load_model
from .config import Config, config_table, list_configs, load_config, parse_set
from .evaluate import compare_timing, evaluate, mean_macs
from .params import freeze, select_parameters, set_trainable
from .runtime import Runtime, launch_runtime, resolve_runtime
from .trainer import (
    DataBundle,
    NonFiniteLoss,
    NonFiniteWeights,
    Trainer,
    TrainingInterrupted,
    TrainingStopped,
    build_data,
    build_model,
    build_optimizer,
    train,
)

__all__ = ["CheckpointError", "ConfigError", "load_model", "load_weights", "read_checkpoint", "save_checkpoint"]
__all__ += ["Config", "config_table", "list_configs", "load_config", "parse_set", "compare_timing", "evaluate", "mean_macs"]
__all__ += ["freeze", "select_parameters", "set_trainable", "Runtime", "launch_runtime", "resolve_runtime"]
__all__ += ["DataBundle", "NonFiniteLoss", "NonFiniteWeights", "Trainer", "TrainingInterrupted", "TrainingStopped"]
__all__ += ["build_data", "build_model", "build_optimizer", "train"]
